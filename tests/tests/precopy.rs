//! Live migration with pre-copy between the two hosts of `scripts/hosts`:
//! a workload keeps dirtying memory while its pages move; several passes
//! happen, and afterwards every page holds exactly what the workload last
//! wrote there. An aborted pre-copy leaves no trace in the process.
mod common;

use common::hosts::{pair, verify_line, Hosts};
use common::{field, Procs};
use std::time::Duration;

#[test]
fn precopy_moves_a_process_that_keeps_writing() {
    let _serial = common::setup();
    let h = Hosts::up("p");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    // 64 MiB, dirtying 20 MB/s; a 1 ms downtime target forces more passes.
    let w = h.start_dirty(&mut procs, "64", "20", "wl");
    let before = verify_line(&h, &w, false);
    let pid = w.pid.to_string();
    let r = h.migrate(
        "a",
        &["--to", "198.18.0.2", &pid, "--json", "--max-downtime", "1"],
    );
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["tracker"].as_str(), Some("uffd-wp"), "{v}");
    let passes = v["passes"].as_array().expect("passes");
    assert!(passes.len() >= 3, "several passes (2 live + final): {v}");
    // Only the last pass ran frozen; pass 0 moved the bulk while running.
    let frozen: Vec<bool> = passes.iter().map(|p| p["frozen"] == true).collect();
    assert_eq!(frozen.iter().filter(|f| **f).count(), 1, "{v}");
    assert_eq!(frozen.last(), Some(&true), "{v}");
    let pass0 = passes[0]["pages"].as_u64().expect("pages");
    let last = passes
        .last()
        .and_then(|p| p["pages"].as_u64())
        .expect("pages");
    assert!(pass0 >= 16_000, "pass 0 moves all 64 MiB: {v}");
    assert!(last < pass0 / 4, "the frozen pass is a small delta: {v}");
    // Later passes found written pages.
    assert!(passes[1]["dirty_pages"].as_u64().expect("dirty") > 0, "{v}");
    assert!(v["switch_reason"].is_string(), "{v}");

    // Gone from A, running on B, every page as the workload last wrote it.
    procs.reap(w.pid).expect("reap the source copy");
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    let after = verify_line(&h, &w, true);
    let writes = |l: &str| field(l, "writes").and_then(|n| n.parse::<u64>().ok());
    assert!(
        writes(&after) > writes(&before),
        "it kept writing: {before} / {after}"
    );
}

#[test]
fn aborted_precopy_leaves_no_trace() {
    let _serial = common::setup();
    let h = Hosts::up("q");
    let mut procs = Procs::new();
    pair(&h);
    let w = h.start_dirty(&mut procs, "64", "20", "wl");
    let pid = w.pid;
    let maps = || std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let fds = || {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some(format!("{:?} {}", e.file_name(), target.display()))
            })
            .collect();
        v.sort();
        v
    };
    let (maps0, fds0) = (maps(), fds());
    // The destination pauses once pages arrive (pass 0 is running, the
    // tracker is armed in the process), then dies.
    let agent = h.start_agent(
        &mut procs,
        "b",
        7420,
        &[("FERRY_DEST_PAUSE_AT", "pages")],
        "agent",
    );
    let m = h.migrate_bg(
        "a",
        &[
            "--to",
            "198.18.0.2",
            &pid.to_string(),
            "--max-downtime",
            "1",
        ],
        "migrate",
    );
    agent.wait_log("pausing at pages", Duration::from_secs(30));
    agent.kill(&mut procs);
    let r = m.wait(Duration::from_secs(45));
    r.assert_error(&["resumed on this host"]);
    // No fd, mapping or write-protection of ours left behind, and writes
    // go on without stalling (ticks continue, pages verify).
    assert_eq!(fds(), fds0, "fd table changed");
    assert_eq!(maps(), maps0, "memory map changed");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "an area is still registered with userfaultfd"
    );
    common::assert_running_untraced(pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 3);
    verify_line(&h, &w, false);
}
