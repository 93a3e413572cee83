//! Stdio that reaches outside the process tree (a shell's pipe, a
//! supervisor's, journald's socket): the process still checkpoints, and on
//! restore its output goes to the stdio log (`migrate restore
//! --stdio-log FILE`, default `DIR/stdio.log`) and its stdin reads end of
//! file. An fd above 2 on such a pipe is refused, naming it, and the process
//! keeps running.
//!
//! The workload is wl-dirty (4 MiB, no writes), which prints `tick N` about
//! every 100 ms: with its stdout on a pipe this test reads, the ticks before
//! the checkpoint arrive on the pipe, those after the restore in the log.
mod common;

use common::{assert_running_untraced, checkpoint, migrate, pid_exists, Procs};
use std::io::{BufRead, BufReader, PipeReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WL_DIRTY: &str = env!("CARGO_BIN_EXE_wl-dirty");
const WAIT: Duration = Duration::from_secs(20);

/// wl-dirty with stdin, stdout and stderr on pipes whose other ends this
/// test holds (outside the tree); `extra` also gets a pipe's write end at
/// fd 5. Returns the child's PID, its stdout reader, and the write ends the
/// test keeps open (stdin, and the fd-5 pipe's reader).
fn spawn_on_pipes(
    procs: &mut Procs,
    extra: bool,
) -> (
    i32,
    BufReader<PipeReader>,
    (std::io::PipeWriter, Option<PipeReader>),
) {
    let (in_r, in_w) = std::io::pipe().expect("pipe");
    let (out_r, out_w) = std::io::pipe().expect("pipe");
    let err_w = out_w.try_clone().expect("dup");
    let (x_r, x_w) = std::io::pipe().expect("pipe");
    let mut cmd = Command::new(WL_DIRTY);
    cmd.args(["4", "0"])
        .stdin(Stdio::from(in_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    common::only_std_fds(&mut cmd);
    let x_raw = x_w.as_raw_fd();
    if extra {
        // SAFETY: dup2 is a single async-signal-safe system call; its
        // result (fd 5, not close-on-exec) is what the child execs with.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(x_raw, 5) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("spawn wl-dirty");
    drop(x_w);
    let pid = child.id() as i32;
    procs.track(child);
    (
        pid,
        BufReader::new(out_r),
        (in_w, if extra { Some(x_r) } else { None }),
    )
}

/// The next line starting with `prefix` from `r`.
fn line_from(r: &mut BufReader<PipeReader>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).expect("read workload stdout");
        assert!(n > 0, "workload stdout closed before a `{prefix}` line");
        if line.starts_with(prefix) {
            return line.trim_end().to_string();
        }
    }
}

/// N of a `tick N ...` line.
fn tick(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a tick line: {line:?}"))
}

/// The last `tick N` of the log file, once it is above `after`.
fn log_tick_above(log: &Path, after: u64) -> u64 {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let last = text
            .lines()
            .filter(|l| l.starts_with("tick "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .next_back();
        if let Some(t) = last.filter(|t| *t > after) {
            return t;
        }
        assert!(
            start.elapsed() < WAIT,
            "no tick above {after} in the stdio log {} within {WAIT:?}: {text:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stdout_on_an_outside_pipe_goes_to_the_stdio_log_after_restore() {
    let _serial = common::setup();
    let mut procs = Procs::new();
    let (pid, mut out, _keep) = spawn_on_pipes(&mut procs, false);
    line_from(&mut out, "ready");
    let before = tick(&line_from(&mut out, "tick "));

    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img");
    checkpoint(pid, &img, false).assert_ok();
    let status = procs.reap(pid).expect("checkpoint kills the process");
    assert!(status.signal().is_some(), "killed by a signal: {status}");
    assert!(!pid_exists(pid));
    // The pipe's write ends died with the process: the reader sees EOF, the
    // restored process will not write here.
    let mut rest = String::new();
    while out.read_line(&mut rest).expect("read") > 0 {}

    let log = dir.path().join("out.log");
    let rs = migrate(&[
        "restore",
        "--dir",
        img.to_str().expect("utf-8"),
        "--stdio-log",
        log.to_str().expect("utf-8"),
    ]);
    rs.assert_ok();
    assert_eq!(rs.stdout, format!("{pid}\n"), "stderr: {}", rs.stderr);
    assert!(
        rs.stderr.contains(log.to_str().expect("utf-8")),
        "restore names the stdio log: {}",
        rs.stderr
    );
    procs.adopt(pid);
    assert_running_untraced(pid);
    // Its ticks go on, counted from where they were, into the log.
    let after = log_tick_above(&log, before);
    assert!(after > before, "tick {after} after tick {before}");
    // Its stdin is no longer the test's pipe.
    let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("fd 0");
    assert!(
        !stdin.to_string_lossy().starts_with("pipe:"),
        "stdin still a pipe: {}",
        stdin.display()
    );
    procs.kill(pid).expect("kill the restored process");
}

#[test]
fn an_fd_above_2_on_an_outside_pipe_is_refused_and_the_process_runs_on() {
    let _serial = common::setup();
    let mut procs = Procs::new();
    let (pid, mut out, _keep) = spawn_on_pipes(&mut procs, true);
    line_from(&mut out, "ready");
    let before = tick(&line_from(&mut out, "tick "));

    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img");
    checkpoint(pid, &img, false).assert_error(&["fd 5", "outside the process tree"]);
    assert_running_untraced(pid);
    let later = tick(&line_from(&mut out, "tick "));
    assert!(later > before, "it runs on: tick {later} after {before}");
    procs.kill(pid).expect("kill the workload");
}
