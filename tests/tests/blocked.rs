//! A process checkpointed while blocked in a system call (sleep, read,
//! futex wait) continues correctly after restore.
mod common;

use common::{num, Procs};
use std::time::Duration;

const WL_BLOCKED: &str = env!("CARGO_BIN_EXE_wl-blocked");

/// Run `wl-blocked MODE`, checkpoint it while its thread is blocked in
/// system call `nr`, restore it, and check the next two completed waits.
/// With `no_eintr`, the interrupted call must have been restarted
/// transparently (the program never sees EINTR), as the kernel does for
/// read and futex waits of a process without signal handlers.
fn blocked(mode: &str, nr: i64, prefix: &str, no_eintr: bool) {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let wl = procs.workload(WL_BLOCKED, &[mode], tmp.path(), mode);
    let pid = wl.pid;
    let (_, ready) = wl.out.wait_line(0, "ready ");
    let tid = num(&ready, "tid") as i32;
    let (_, first) = wl.out.wait_line(0, &format!("{prefix} n=1 "));
    assert!(first.ends_with(" ok"), "{first}");
    std::thread::sleep(Duration::from_millis(300));
    let in_call = common::wait_until(Duration::from_secs(5), "the blocked system call", || {
        (common::blocked_syscall(pid, tid) == Some(nr)).then_some(true)
    });
    assert!(in_call);

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));
    let done_prefix = format!("{prefix} n=");
    let done: u64 = wl
        .out
        .lines()
        .iter()
        .filter(|l| l.starts_with(&done_prefix))
        .map(|l| num(l, "n"))
        .max()
        .expect("completed waits before checkpoint");
    for n in done + 1..=done + 2 {
        let (_, line) = wl.out.wait_line(0, &format!("{prefix} n={n} "));
        assert!(line.ends_with(" ok"), "wait {n} after restore: {line}");
        assert_eq!(num(&line, "error"), 0, "{line}");
        if no_eintr {
            assert_eq!(num(&line, "eintr"), 0, "the call was not restarted: {line}");
        }
    }
    common::assert_running_untraced(pid);
    procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process");
}

/// Relative clock_nanosleep: its restart block is kernel state that cannot
/// be carried over, so EINTR (retried by the program) is allowed; sleeping
/// less than asked, or another error, is not.
#[test]
fn sleep_continues_after_restore() {
    blocked("sleep", libc::SYS_clock_nanosleep, "slept", false);
}

#[test]
fn blocking_read_on_a_pipe_continues_after_restore() {
    blocked("read", libc::SYS_read, "read", true);
}

#[test]
fn futex_wait_continues_after_restore() {
    blocked("futex", libc::SYS_futex, "futex", true);
}
