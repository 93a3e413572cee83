//! A large download from client C, for the web server tests: the file
//! (a fixed pseudo-random pattern) and its SHA-256, and a python client
//! that fetches it rate-limited (so that the download spans a migration)
//! and reports the bytes and the SHA-256 it got.

use super::hosts::Hosts;
use super::{field, Procs, Workload};
use std::path::Path;
use std::time::Duration;

pub const PYTHON: &str = "/usr/bin/python3";

/// The client: one GET, read at `rate` bytes/s in 64 KiB pieces, printing
/// `got N` now and then and `done bytes=N sha256=HEX` at the end; any
/// error (a reset, a short body) is a non-zero exit with the reason.
const CLIENT: &str = r#"
import hashlib, sys, time, urllib.request
url, rate = sys.argv[1], int(sys.argv[2])
h = hashlib.sha256()
n = 0
start = time.monotonic()
with urllib.request.urlopen(url, timeout=60) as r:
    want = int(r.headers["Content-Length"])
    while True:
        b = r.read(65536)
        if not b:
            break
        h.update(b)
        n += len(b)
        if n % (1 << 20) < 65536:
            print(f"got {n}", flush=True)
        ahead = n / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
if n != want:
    sys.exit(f"short body: {n} of {want} bytes")
print(f"done bytes={n} sha256={h.hexdigest()}", flush=True)
"#;

/// Write `dir/big.bin` (`mib` MiB) and `dir/small.txt` ("hello from B\n");
/// returns the SHA-256 of big.bin.
pub fn files(dir: &Path, mib: usize) -> String {
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("big.bin"), &data).expect("write big.bin");
    std::fs::write(dir.join("small.txt"), b"hello from B\n").expect("write small.txt");
    let r = std::process::Command::new("sha256sum")
        .arg(dir.join("big.bin"))
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// GET `url` from C: the body, or None if the request failed.
pub fn get(h: &Hosts, url: &str) -> Option<String> {
    let r = h.exec_c(&[
        PYTHON,
        "-c",
        &format!(
            "import urllib.request; print(urllib.request.urlopen('{url}', timeout=5).read().decode(), end='')"
        ),
    ]);
    r.status.success().then_some(r.stdout)
}

/// Wait until `url` answers from C.
pub fn wait_serving(h: &Hosts, url: &str) {
    super::wait_until(super::LINE_TIMEOUT, "the web server to answer", || {
        get(h, url).map(|_| ())
    });
}

/// Start the rate-limited download of `url` on C; returns once some of it
/// arrived.
pub fn start_download(h: &Hosts, procs: &mut Procs, url: &str, rate: usize) -> Workload {
    let client = procs.spawn(
        h.command(&["exec-c", PYTHON, "-c", CLIENT, url, &rate.to_string()]),
        h.tmp(),
        "client",
    );
    client.out.wait_line(0, "got ");
    client
}

/// True if the download already ended (then a test would show nothing).
pub fn download_ended(client: &Workload) -> bool {
    client.out.lines().iter().any(|l| l.starts_with("done "))
}

/// Wait for the download to end; require it complete (`mib` MiB) with
/// `digest`.
pub fn finish_download(procs: &mut Procs, client: &Workload, mib: usize, digest: &str) {
    let (_, done) = client
        .out
        .wait_for(0, Duration::from_secs(60), "the download to end", |l| {
            l.starts_with("done ").then(|| l.to_string())
        });
    let status = procs.reap(client.pid).expect("reap the client");
    assert_eq!(
        status.code(),
        Some(0),
        "client: {status}; its output:\n{}",
        client.out.lines().join("\n")
    );
    assert_eq!(
        field(&done, "bytes"),
        Some((mib << 20).to_string().as_str()),
        "{done}"
    );
    assert_eq!(field(&done, "sha256"), Some(digest), "{done}");
}
