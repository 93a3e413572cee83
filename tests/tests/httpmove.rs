//! python's `http.server` serving a large download to client C while it is
//! migrated from A to B with its service address (`scripts/hosts`): the
//! download, rate-limited by the client so that it spans the migration,
//! completes over the same connection with the file's SHA-256, and the
//! server on B answers a new request.
mod common;

use common::hosts::{pair, Hosts};
use common::http::{self, PYTHON};
use common::Procs;

const SERVICE: &str = "198.18.0.100";
const PORT: &str = "7080";
/// The file: 48 MiB at 8 MiB/s, about 6 s of download.
const MIB: usize = 48;

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
    let digest = http::files(&www, MIB);

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
    http::wait_serving(&h, &format!("{url}/small.txt"));
    let client = http::start_download(&h, &mut procs, &format!("{url}/big.bin"), 8 << 20);

    h.migrate_with_address(&mut procs, server.pid);
    // The download was not over when the process moved (else this test
    // would show nothing: make the file bigger or the rate lower).
    assert!(
        !http::download_ended(&client),
        "the download ended before the migration did"
    );
    http::finish_download(&mut procs, &client, MIB, &digest);

    // The server, now on B, answers a new request on the same address.
    assert_eq!(
        http::get(&h, &format!("{url}/small.txt")).as_deref(),
        Some("hello from B\n")
    );
    assert!(h.exists_on_b(server.pid), "the server is not on B");
}
