//! Debian's nginx (a master and two workers running as `nobody`, real
//! config, `sendfile on`) streaming a large file to client C over one
//! connection is migrated from A to B in the middle of the download, with
//! its service address: the download completes without a reset with the
//! file's SHA-256, and nginx on B serves new requests and still obeys its
//! master (a reload by SIGHUP starts new workers that serve).
mod common;

use common::hosts::{pair, Hosts};
use common::http::{self, PYTHON};
use common::Procs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const NGINX: &str = "/usr/sbin/nginx";
const SERVICE: &str = "198.18.0.100";
const PORT: u16 = 8088;
/// The "video": 64 MiB at 8 MiB/s, about 8 s of download.
const MIB: usize = 64;

/// The PIDs of nginx's workers: the master's children, as seen on B.
fn workers_on_b(h: &Hosts, master: i32) -> Vec<i32> {
    let r = h.exec_b(&["cat", &format!("/proc/{master}/task/{master}/children")]);
    r.assert_ok();
    r.stdout
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn nginx_streaming_a_download_moves_to_b() {
    let _serial = common::setup();
    for bin in [NGINX, PYTHON] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: scripts/setup and .ci/run install it"
        );
    }
    let h = Hosts::up_as("fng", "a");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    // The workers run as nobody: they must reach the files.
    std::fs::set_permissions(h.tmp(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = h.tmp().join("nginx");
    let www = root.join("www");
    std::fs::create_dir_all(root.join("logs")).expect("mkdir logs");
    std::fs::create_dir_all(&www).expect("mkdir www");
    let digest = http::files(&www, MIB);
    let conf = root.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 2;\n\
             user nobody nogroup;\n\
             pid {root}/nginx.pid;\n\
             error_log {root}/logs/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log {root}/logs/access.log;\n\
               sendfile on;\n\
               client_body_temp_path {root}/tmp;\n\
               proxy_temp_path {root}/tmp;\n\
               fastcgi_temp_path {root}/tmp;\n\
               uwsgi_temp_path {root}/tmp;\n\
               scgi_temp_path {root}/tmp;\n\
               server {{ listen {SERVICE}:{PORT}; root {www}; }}\n\
             }}\n",
            root = root.display(),
            www = www.display()
        ),
    )
    .expect("write nginx.conf");
    let prefix = format!("{}/", root.display());
    let master = procs.spawn(
        h.command(&[
            "exec-a",
            NGINX,
            "-c",
            conf.to_str().expect("utf-8"),
            "-p",
            &prefix,
        ]),
        h.tmp(),
        "nginx",
    );
    let url = format!("http://{SERVICE}:{PORT}");
    http::wait_serving(&h, &format!("{url}/small.txt"));
    let client = http::start_download(&h, &mut procs, &format!("{url}/big.bin"), 8 << 20);

    h.migrate_with_address(&mut procs, master.pid);
    assert!(
        !http::download_ended(&client),
        "the download ended before the migration did"
    );
    let workers = workers_on_b(&h, master.pid);
    assert_eq!(workers.len(), 2, "workers on B: {workers:?}");
    for w in &workers {
        let st = h.exec_b(&["grep", "^Uid:", &format!("/proc/{w}/status")]);
        st.assert_ok();
        assert!(
            st.stdout.contains("65534"),
            "worker {w} runs as nobody: {}",
            st.stdout
        );
    }

    http::finish_download(&mut procs, &client, MIB, &digest);
    assert_eq!(
        http::get(&h, &format!("{url}/small.txt")).as_deref(),
        Some("hello from B\n")
    );
    // The master still commands its workers over the restored channels:
    // a reload replaces them, and the new ones serve.
    h.exec_b(&["kill", "-HUP", &master.pid.to_string()])
        .assert_ok();
    common::wait_until(Duration::from_secs(20), "new workers after SIGHUP", || {
        let now = workers_on_b(&h, master.pid);
        (now.len() == 2 && now.iter().all(|w| !workers.contains(w))).then_some(())
    });
    assert_eq!(
        http::get(&h, &format!("{url}/small.txt")).as_deref(),
        Some("hello from B\n")
    );
}
