//! Open files survive: a regular file at an offset (O_CLOEXEC), an O_APPEND
//! file, /dev/null, a directory and a pipe holding 1000 unread bytes.
mod common;

use common::{num, Procs};
use std::collections::BTreeMap;

const WL_FILES: &str = env!("CARGO_BIN_EXE_wl-files");

/// `pos` and `flags` of /proc/PID/fdinfo/FD.
fn fdinfo(pid: i32, fd: u64) -> (u64, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_else(|e| panic!("fdinfo {fd} of {pid}: {e}"));
    let mut pos = None;
    let mut flags = None;
    for l in text.lines() {
        if let Some(v) = l.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("flags:") {
            flags = Some(v.trim().to_string());
        }
    }
    (
        pos.expect("pos: in fdinfo"),
        flags.expect("flags: in fdinfo"),
    )
}

#[test]
fn file_offsets_flags_and_pipe_data_survive() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let mut procs = Procs::new();
    let wl = procs.workload(
        WL_FILES,
        &[work.to_str().expect("utf-8")],
        tmp.path(),
        "files",
    );
    let pid = wl.pid;
    let (_, ready) = wl.out.wait_line(0, "ready ");
    let names = [
        "input_fd",
        "append_fd",
        "null_fd",
        "dir_fd",
        "pipe_r",
        "pipe_w",
    ];
    let fds: BTreeMap<&str, u64> = names.iter().map(|n| (*n, num(&ready, n))).collect();

    // First self-check before checkpoint: reads 100 bytes at 12345.
    let from = wl.out.lines().len();
    common::signal(pid, libc::SIGUSR1);
    let (_, v) = wl.out.wait_line(from, "files ");
    assert_eq!(v, "files ok n=1", "self-check before checkpoint");
    assert_eq!(fdinfo(pid, fds["input_fd"]).0, 12445, "input offset");

    let table_before = common::fd_table(pid);
    let info_before: BTreeMap<u64, (u64, String)> =
        fds.values().map(|&fd| (fd, fdinfo(pid, fd))).collect();

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));
    let last = wl.out.last_tick().expect("ticks");
    wl.out.wait_tick_above(last);

    assert_eq!(
        common::fd_table(pid),
        table_before,
        "fd numbers and targets"
    );
    for (&fd, before) in &info_before {
        assert_eq!(&fdinfo(pid, fd), before, "pos/flags of fd {fd}");
    }
    let from = wl.out.lines().len();
    common::signal(pid, libc::SIGUSR1);
    let (_, v) = wl.out.wait_line(from, "files ");
    assert_eq!(v, "files ok n=2", "self-check after restore");
    assert_eq!(fdinfo(pid, fds["input_fd"]).0, 12545, "input offset");
    assert_eq!(
        std::fs::read_to_string(work.join("append.log")).expect("append.log"),
        "hello\nverify 0\nverify 1\n"
    );
    common::assert_running_untraced(pid);
    procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process");
}
