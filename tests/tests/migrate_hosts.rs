//! `migrate --to` and `dest-agent` between the two hosts of `scripts/hosts`:
//! host A (network namespace, root pid namespace) runs the workload and
//! `migrate`; host B (network namespace plus its own pid namespace) runs
//! `dest-agent`. The hosts share the filesystem, so a workload's output file
//! can be read from the test whichever host it runs on. The helpers live in
//! `common/hosts.rs`.
mod common;

use common::hosts::{dest_agent_bin, pair, verify, Hosts};
use common::Procs;
use std::os::unix::process::ExitStatusExt;

#[test]
fn migrate_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up("m");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "32", "wl");
    let pid = w.pid.to_string();

    let r = h.migrate("a", &["--to", "198.18.0.2", &pid, "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["pid"].as_i64(), Some(w.pid as i64), "{v}");
    let downtime = v["downtime_ms"].as_f64().expect("downtime_ms");
    let total = v["total_ms"].as_f64().expect("total_ms");
    assert!(downtime > 0.0 && total >= downtime, "{v}");
    assert!(
        v["bytes_on_wire"].as_u64().expect("bytes_on_wire") > 1 << 20,
        "{v}"
    );
    // 32 MiB, of which at most 1/8 of the anonymous half is never touched.
    assert!(v["pages_sent"].as_u64().expect("pages_sent") > 6000, "{v}");

    // Gone from A: killed by migrate after B confirmed.
    let status = procs.reap(w.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    // Running on B, same PID, memory intact, still ticking.
    let comm = h.exec_b(&["cat", &format!("/proc/{pid}/comm")]);
    comm.assert_ok();
    assert_eq!(comm.stdout.trim(), "wl-memory");
    let state = h.exec_b(&["cat", &format!("/proc/{pid}/stat")]);
    state.assert_ok();
    let st = state.stdout.rsplit_once(") ").expect("stat").1;
    assert!(matches!(st.chars().next(), Some('R' | 'S')), "stat: {st}");
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, true);
}

#[test]
fn untrusted_peers_are_refused() {
    let _serial = common::setup();
    let h = Hosts::up("u");
    let mut procs = Procs::new();
    let (m, d) = (common::migrate_bin(), dest_agent_bin());
    // A trusts B, B trusts nobody.
    let fb = h.identity(&d, "b");
    h.trust(&m, "a", &fb);
    // C trusts nobody; B will trust C.
    let fc = h.identity(&m, "c");
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "8", "wl");
    let pid = w.pid.to_string();

    // The destination does not trust the source.
    let r = h.migrate("a", &["--to", "198.18.0.2:7420", &pid]);
    r.assert_error(&["not a trusted peer", "dest-agent trust"]);
    common::assert_running_untraced(w.pid);

    // The source does not trust the destination (B now trusts C).
    h.trust(&d, "b", &fc);
    let r = h.migrate("c", &["--to", "198.18.0.2", &pid, "--json"]);
    r.assert_error(&["not a trusted peer", "migrate trust"]);
    assert_eq!(r.stdout, "", "no report on failure");

    common::assert_running_untraced(w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, false);

    // The running dest-agent picks up a new trust without a restart, and
    // still serves after the refused connections.
    let fa = h.identity(&m, "a");
    h.trust(&d, "b", &fa);
    let r = h.migrate("a", &["--to", "198.18.0.2", &pid]);
    r.assert_ok();
    for k in ["downtime", "total", "bytes on wire", "pages", "compression"] {
        assert!(r.stdout.contains(k), "report without {k:?}: {}", r.stdout);
    }
    let status = procs.reap(w.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    verify(&h, &w, &ready, true);
}

/// The workload maps a file it created; replacing that file (new content,
/// renamed over the old path) makes the destination's file differ from the
/// one the process maps, which the destination must refuse before the
/// source freezes anything.
#[test]
fn mismatch_is_refused_before_freezing() {
    let _serial = common::setup();
    let h = Hosts::up("x");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "8", "wl");
    let pid = w.pid.to_string();

    let mapped = h.tmp().join("wl").join(format!("wl-memory-{pid}.dat"));
    let mut content = std::fs::read(&mapped).expect("read the mapped file");
    content[0] ^= 0xff;
    let new = mapped.with_extension("new");
    std::fs::write(&new, &content).unwrap();
    std::fs::rename(&new, &mapped).unwrap();

    let r = h.migrate("a", &["--to", "198.18.0.2", &pid]);
    r.assert_error(&["refused", "differs", mapped.to_str().unwrap()]);
    let log = std::fs::read_to_string(h.tmp().join("dest-b.err")).unwrap_or_default();
    assert!(
        !log.contains("image received"),
        "the destination received an image: {log}"
    );

    common::assert_running_untraced(w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, false);
}
