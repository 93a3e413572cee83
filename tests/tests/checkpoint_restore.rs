//! A single-threaded process full of known memory: checkpoint (kill) and
//! restore on the same host. Memory checksums (read from outside and by the
//! workload itself), PID, TIDs, fds, counters and "not traced" are checked.
mod common;

use common::{num, Procs, Workload};
use std::path::Path;

const WL_MEMORY: &str = env!("CARGO_BIN_EXE_wl-memory");
const MIB: &str = "32";

struct Sums {
    addr: u64,
    len: usize,
    sum: u64,
    heap_addr: u64,
    heap_len: usize,
    heap_sum: u64,
}

fn start(procs: &mut Procs, dir: &Path) -> (Workload, Sums) {
    let dir_s = dir.to_str().expect("utf-8 temp dir");
    let wl = procs.workload(WL_MEMORY, &[MIB, dir_s], dir, "memory");
    let (_, ready) = wl.out.wait_line(0, "ready ");
    assert_eq!(num(&ready, "pid"), wl.pid as u64, "ready line: {ready}");
    let s = Sums {
        addr: num(&ready, "addr"),
        len: num(&ready, "len") as usize,
        sum: num(&ready, "checksum"),
        heap_addr: num(&ready, "heap_addr"),
        heap_len: num(&ready, "heap_len") as usize,
        heap_sum: num(&ready, "heap_checksum"),
    };
    assert_eq!(s.len + s.heap_len, 32 << 20, "pattern size: {ready}");
    assert_memory(wl.pid, &s, "before checkpoint");
    (wl, s)
}

/// The external view of the pattern regions matches the workload's checksums.
fn assert_memory(pid: i32, s: &Sums, when: &str) {
    assert_eq!(
        common::mem_checksum(pid, s.addr, s.len),
        s.sum,
        "mmap region checksum read with process_vm_readv ({when})"
    );
    assert_eq!(
        common::mem_checksum(pid, s.heap_addr, s.heap_len),
        s.heap_sum,
        "heap region checksum read with process_vm_readv ({when})"
    );
}

/// SIGUSR1: the workload re-checks all its memory (pattern regions, the
/// private file mapping, the .data page) and must answer `verify ok` with
/// the original checksums and a counter above `min_counter`.
fn assert_self_verify(wl: &Workload, s: &Sums, min_counter: u64) {
    let from = wl.out.lines().len();
    common::signal(wl.pid, libc::SIGUSR1);
    let (_, v) = wl.out.wait_line(from, "verify ");
    assert!(v.starts_with("verify ok "), "workload self-check: {v}");
    assert_eq!(num(&v, "checksum"), s.sum, "{v}");
    assert_eq!(num(&v, "heap_checksum"), s.heap_sum, "{v}");
    assert!(num(&v, "counter") > min_counter, "counter went back: {v}");
}

#[test]
fn memory_pid_and_counter_survive_checkpoint_and_restore() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, sums) = start(&mut procs, tmp.path());
    let pid = wl.pid;
    let tids_before = common::tids(pid);
    assert_eq!(tids_before.len(), 1, "wl-memory is single-threaded");
    let fds_before = common::fd_table(pid);
    let seen = wl.out.wait_tick_above(5);

    let img = tmp.path().join("img"); // does not exist yet: checkpoint creates it
    let summary = common::checkpoint_kill_restore(&mut procs, pid, &img);
    assert!(
        summary.contains("frozen_ms="),
        "checkpoint summary lacks frozen_ms=: {summary}"
    );
    let last = wl.out.last_tick().expect("ticks before checkpoint");
    assert!(last >= seen);

    let after = wl.out.wait_tick_above(last);
    assert!(after > last);
    assert_eq!(common::tids(pid), tids_before, "TIDs after restore");
    assert_eq!(common::fd_table(pid), fds_before, "fds after restore");
    assert_memory(pid, &sums, "after restore");
    assert_self_verify(&wl, &sums, last);
    common::assert_running_untraced(pid);

    let st = procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process (child subreaper)");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
}

#[test]
fn restored_process_can_be_checkpointed_and_restored_again() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, sums) = start(&mut procs, tmp.path());
    let pid = wl.pid;
    wl.out.wait_tick_above(3);

    for round in 1..=2 {
        let img = tmp.path().join(format!("img{round}"));
        common::checkpoint_kill_restore(&mut procs, pid, &img);
        let last = wl.out.last_tick().expect("ticks");
        wl.out.wait_tick_above(last + 2);
        assert_memory(pid, &sums, &format!("after restore {round}"));
        assert_self_verify(&wl, &sums, last);
    }
    procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process");
}

#[test]
fn leave_running_writes_an_image_and_leaves_the_process_untouched() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, sums) = start(&mut procs, tmp.path());
    let pid = wl.pid;
    let tids_before = common::tids(pid);
    let fds_before = common::fd_table(pid);
    wl.out.wait_tick_above(3);

    let img = tmp.path().join("img");
    let cp = common::checkpoint(pid, &img, true);
    cp.assert_ok();
    assert!(
        img.join("process.img").is_file(),
        "no process.img in {img:?}"
    );
    let size: u64 = std::fs::read_dir(&img)
        .expect("read image dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(size > 16 << 20, "image is only {size} bytes");

    common::assert_running_untraced(pid);
    let last = wl.out.last_tick().expect("ticks");
    wl.out.wait_tick_above(last + 5);
    assert_eq!(common::tids(pid), tids_before);
    assert_eq!(common::fd_table(pid), fds_before);
    assert_memory(pid, &sums, "after checkpoint --leave-running");
    assert_self_verify(&wl, &sums, last);
}
