//! Pre-copy (no lazy pages) of a process that changes its memory layout
//! between the passes: it forks, moves a region back and forth with
//! `mremap`, unmaps regions and maps fresh ones at the same address, and
//! drops pages with `MADV_DONTNEED` while its pages are being copied.
//! Afterwards, on B, every page holds what the process last put there: an
//! area that moved, or was unmapped and mapped again, between two passes is
//! neither left empty nor left with stale contents on the destination.
mod common;

use common::hosts::{pair, verify_wl_lazy, Hosts, ADDR_B};
use common::{num, Procs, MIGRATE_TIMEOUT};
use std::os::unix::process::ExitStatusExt;

/// Migrate wl-lazy with pre-copy only (`--max-passes PASSES`, a downtime
/// target of DOWNTIME ms, small enough that live passes run), then check
/// it on B.
fn precopy_with_events(tag: &str, passes: &str, downtime: &str) {
    let _serial = common::setup();
    let h = Hosts::up_as("fpl", tag);
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_wl_lazy(&mut procs, "128", "2", "wl");
    let pid = w.pid.to_string();
    let before = verify_wl_lazy(&h, &w, &ready, false);

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
    let after = verify_wl_lazy(&h, &w, &ready, true);
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
