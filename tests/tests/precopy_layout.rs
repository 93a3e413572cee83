//! Pre-copy (no lazy pages) of a process that changes its memory layout
//! between the passes: it forks, moves a region back and forth with
//! `mremap`, unmaps regions and maps fresh ones at the same address, and
//! drops pages with `MADV_DONTNEED` while its pages are being copied.
//! Afterwards, on B, every page holds what the process last put there: an
//! area that moved, or was unmapped and mapped again, between two passes is
//! neither left empty nor left with stale contents on the destination.
mod common;

use common::hosts::{pair, Hosts, ADDR_B};
use common::{field, num, Procs, Workload, MIGRATE_TIMEOUT};
use std::os::unix::process::ExitStatusExt;

/// Start `wl-lazy MIB THREADS` on A; returns it and its ready line once it
/// ticks.
fn start_lazy(
    h: &Hosts,
    procs: &mut Procs,
    mib: &str,
    threads: &str,
    name: &str,
) -> (Workload, String) {
    let cmd = h.command(&["exec-a", env!("CARGO_BIN_EXE_wl-lazy"), mib, threads]);
    let w = procs.spawn(cmd, h.tmp(), name);
    let (_, ready) = w.out.wait_line(0, "ready ");
    assert_eq!(field(&ready, "pid"), Some(w.pid.to_string().as_str()));
    assert_eq!(field(&ready, "threads"), Some(threads), "{ready}");
    assert!(field(&ready, "checksum").is_some(), "{ready}");
    w.out.wait_tick_above(2);
    (w, ready)
}

/// SIGUSR1 wl-lazy (on A or B) and require `verify ok` with no mismatch,
/// no failed child and the checksum of the ready line; returns the line.
/// (`fork_lost`, a child forked just before the freeze that stayed on A,
/// is not a failure.)
fn verify_lazy(h: &Hosts, w: &Workload, ready: &str, on_b: bool) -> String {
    let from = w.out.lines().len();
    if on_b {
        h.exec_b(&["kill", "-USR1", &w.pid.to_string()]).assert_ok();
    } else {
        common::signal(w.pid, libc::SIGUSR1);
    }
    let (_, line) = w.out.wait_line(from, "verify ");
    assert!(line.starts_with("verify ok"), "workload says: {line}");
    assert_eq!(num(&line, "bad"), 0, "{line}");
    assert_eq!(num(&line, "fork_bad"), 0, "{line}");
    assert_eq!(
        field(&line, "checksum"),
        field(ready, "checksum"),
        "checksum at the end against the one at start: {line} / {ready}"
    );
    line
}

/// Migrate wl-lazy with pre-copy only (`--max-passes PASSES`, a downtime
/// target of DOWNTIME ms, small enough that live passes run), then check
/// it on B.
fn precopy_with_events(tag: &str, passes: &str, downtime: &str) {
    let _serial = common::setup();
    let h = Hosts::up_as("fpl", tag);
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = start_lazy(&h, &mut procs, "128", "2", "wl");
    let pid = w.pid.to_string();
    let before = verify_lazy(&h, &w, &ready, false);

    let r = h
        .migrate_bg(
            "a",
            &[
                "--to",
                ADDR_B,
                &pid,
                "--max-passes",
                passes,
                "--max-downtime",
                downtime,
                "--json",
            ],
            "mig",
        )
        .wait(MIGRATE_TIMEOUT);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["pid"].as_i64(), Some(i64::from(w.pid)), "{v}");
    assert!(v["lazy"].is_null(), "no lazy phase: {v}");
    let all = v["passes"].as_array().expect("passes");
    assert!(
        all.len() >= 2,
        "at least one live pass and the final one: {v}"
    );

    let status = procs.reap(w.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    // A few more ticks on B: every kind of event happens again there, on
    // the memory the passes brought.
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 8);
    let after = verify_lazy(&h, &w, &ready, true);
    for key in ["forks", "remaps", "unmaps", "drops", "checks"] {
        assert!(
            num(&after, key) > num(&before, key),
            "{key} went on across the migration: {before} / {after}"
        );
    }
}

/// Two live passes (pass 0 and one delta), then the frozen one.
#[test]
fn precopy_survives_fork_mremap_munmap() {
    precopy_with_events("a", "3", "1");
}

/// No downtime target: passes go on until they stop shrinking (three or
/// four live passes here), each with its own layout.
#[test]
fn precopy_survives_layout_changes_over_more_passes() {
    precopy_with_events("b", "8", "0");
}
