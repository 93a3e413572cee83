//! 8 threads, each counting and holding its own values in ymm8..ymm11 and
//! r12 across the checkpoint: after restore, same PID and TIDs, every
//! counter continues and every thread still sees its register values.
mod common;

use common::{field, num, Procs};
use std::collections::BTreeSet;

const WL_THREADS: &str = env!("CARGO_BIN_EXE_wl-threads");
const THREADS: usize = 8;

/// Latest (tid, count, regs) per thread index, from lines at index >= from.
fn latest(lines: &[String], from: usize) -> Vec<Option<(u64, u64, String)>> {
    let mut v = vec![None; THREADS];
    for l in lines.iter().skip(from) {
        let Some(rest) = l.strip_prefix("thread ") else {
            continue;
        };
        let Some(i) = rest
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if i < THREADS {
            let regs = field(l, "regs").unwrap_or("?").to_string();
            v[i] = Some((num(l, "tid"), num(l, "count"), regs));
        }
    }
    v
}

#[test]
fn threads_tids_counters_and_avx_registers_survive() {
    let _serial = common::setup();
    assert!(
        std::arch::is_x86_feature_detected!("avx"),
        "this test needs a CPU with AVX"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let wl = procs.workload(WL_THREADS, &[], tmp.path(), "threads");
    let pid = wl.pid;
    let (ready_idx, ready) = wl.out.wait_line(0, "ready ");
    assert_eq!(num(&ready, "pid"), pid as u64);
    let worker_tids: Vec<i32> = field(&ready, "tids")
        .expect("tids= in ready line")
        .split(',')
        .map(|t| t.parse().expect("numeric tid"))
        .collect();
    assert_eq!(worker_tids.len(), THREADS);
    let mut all: BTreeSet<i32> = worker_tids.iter().copied().collect();
    all.insert(pid);
    assert_eq!(common::tids(pid), all, "/proc/{pid}/task before checkpoint");

    // Every worker has reported at least once, with intact registers.
    common::wait_until(common::LINE_TIMEOUT, "a report of every thread", || {
        let lines = wl.out.lines();
        latest(&lines, ready_idx)
            .iter()
            .all(|t| matches!(t, Some((_, c, _)) if *c > 0))
            .then_some(())
    });

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));
    let lines = wl.out.lines();
    let mark = lines.len();
    let before = latest(&lines, ready_idx);
    for (i, t) in before.iter().enumerate() {
        let (tid, _, regs) = t.as_ref().expect("every thread reported");
        assert_eq!(*tid, worker_tids[i] as u64, "thread {i} tid");
        assert_eq!(regs, "ok", "thread {i} registers before checkpoint");
    }
    assert_eq!(common::tids(pid), all, "/proc/{pid}/task after restore");

    // Every counter moves past its value at checkpoint time.
    common::wait_until(common::LINE_TIMEOUT, "every counter to continue", || {
        let lines = wl.out.lines();
        let now = latest(&lines, mark);
        now.iter()
            .zip(&before)
            .all(|(n, b)| match (n, b) {
                (Some((_, c, _)), Some((_, cb, _))) => c > cb,
                _ => false,
            })
            .then_some(())
    });
    // Let them run a little longer, then every report since restore must be
    // regs=ok with the original TIDs.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = wl.out.lines();
    for l in lines.iter().skip(mark).filter(|l| l.starts_with("thread ")) {
        assert_eq!(field(l, "regs"), Some("ok"), "after restore: {l}");
    }
    for (i, t) in latest(&lines, mark).iter().enumerate() {
        let (tid, _, _) = t.as_ref().expect("thread reported after restore");
        assert_eq!(*tid, worker_tids[i] as u64, "thread {i} tid after restore");
    }
    common::assert_running_untraced(pid);
    procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process");
}
