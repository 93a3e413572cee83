//! python's `http.server` serving a large download to client C while it is
//! migrated from A to B with its service address (`scripts/hosts`): the
//! download, rate-limited by the client so that it spans the migration,
//! completes over the same connection with the file's SHA-256, and the
//! server on B answers a new request.
mod common;

use common::hosts::{pair, Hosts, ADDR_B};
use common::{field, Procs};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const PYTHON: &str = "/usr/bin/python3";
const SERVICE: &str = "198.18.0.100";
const PORT: &str = "7080";
/// The file: 48 MiB at 8 MiB/s, about 6 s of download.
const MIB: usize = 48;

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

/// The file's bytes (a fixed pseudo-random pattern) and its SHA-256.
fn big_file(dir: &std::path::Path) -> String {
    let mut data = vec![0u8; MIB << 20];
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

#[test]
fn python_http_server_download_survives_migration() {
    let _serial = common::setup();
    assert!(
        std::path::Path::new(PYTHON).exists(),
        "{PYTHON} is missing: install Debian's python3 (scripts/setup or .ci/run do)"
    );
    let h = Hosts::up_as("fhm", "a");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let www = h.tmp().join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    let digest = big_file(&www);

    let server = procs.spawn(
        h.command(&[
            "exec-a",
            PYTHON,
            "-I",
            "-m",
            "http.server",
            PORT,
            "--bind",
            SERVICE,
            "--directory",
            www.to_str().expect("utf-8"),
        ]),
        h.tmp(),
        "server",
    );
    let url = format!("http://{SERVICE}:{PORT}");
    common::wait_until(common::LINE_TIMEOUT, "http.server to listen", || {
        let r = h.exec_c(&[
            PYTHON,
            "-c",
            &format!(
            "import urllib.request; urllib.request.urlopen('{url}/small.txt', timeout=2).read()"
        ),
        ]);
        r.status.success().then_some(())
    });
    let rate = (8usize << 20).to_string();
    let client = procs.spawn(
        h.command(&[
            "exec-c",
            PYTHON,
            "-c",
            CLIENT,
            &format!("{url}/big.bin"),
            &rate,
        ]),
        h.tmp(),
        "client",
    );
    // Some of the download is done before the migration starts.
    client.out.wait_line(0, "got ");

    let pid = server.pid.to_string();
    let r = h.migrate("a", &["--to", ADDR_B, &pid, "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(
        v["addresses_moved"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    let status = procs.reap(server.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    // The download was not over when the process moved (else this test
    // would show nothing: make the file bigger or the rate lower).
    assert!(
        !client.out.lines().iter().any(|l| l.starts_with("done ")),
        "the download ended before the migration did"
    );

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
        Some((MIB << 20).to_string().as_str()),
        "{done}"
    );
    assert_eq!(field(&done, "sha256"), Some(digest.as_str()), "{done}");

    // The server, now on B, answers a new request on the same address.
    let r = h.exec_c(&[PYTHON, "-c", &format!(
        "import urllib.request; print(urllib.request.urlopen('{url}/small.txt', timeout=5).read().decode(), end='')"
    )]);
    r.assert_ok();
    assert_eq!(r.stdout, "hello from B\n");
    assert!(h.exists_on_b(server.pid), "the server is not on B");
}
