//! Filesystem-side fds survive (workload tests/workloads/wl_fsfds.rs): a
//! named pipe holding unread data, flock / POSIX / OFD locks, an inotify
//! watch, an O_PATH fd.
//!
//! - checkpoint, kill, restore on one host: the FIFO data reads back; this
//!   test (a second process) sees every lock held by the restored process
//!   (`flock -n`, `F_GETLK`, `F_OFD_GETLK`) and free once it is killed; the
//!   inotify watch reports a file created after the restore, after an
//!   IN_Q_OVERFLOW for the event that was waiting at the freeze;
//! - migration to host B without locks (`--no-locks`): the same FIFO,
//!   inotify and O_PATH checks on B (the hosts share the filesystem);
//! - migration to host B with locks: hosts A and B share one kernel here,
//!   so the frozen source still holds the locks while B restores; the
//!   migration is refused naming the lock and the source goes on, locks
//!   and all.
//!
//! Every test reaps what it started (Procs) and removes its directory.
mod common;

use common::hosts::{pair, Hosts, ADDR_B};
use common::{field, num, Procs, Workload};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

const WL_FSFDS: &str = env!("CARGO_BIN_EXE_wl-fsfds");
const FIFO_DATA: &str = "unread-fifo-bytes";
/// `F_OFD_GETLK` (not in the libc crate).
const F_OFD_GETLK: libc::c_int = 36;

/// `flock -n FILE true` run by the test: false when someone holds a lock.
fn flock_free(path: &Path) -> bool {
    let s = Command::new("flock")
        .arg("-n")
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock");
    match s.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("flock -n {}: {other:?}", path.display()),
    }
}

/// The lock (`F_GETLK`, or `F_OFD_GETLK` with `ofd`) that blocks a write
/// lock on bytes 0..len of `path`, from a description of this process.
fn blocker(path: &Path, ofd: bool, len: i64) -> libc::flock {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: len,
        l_pid: 0,
    };
    let cmd = if ofd { F_OFD_GETLK } else { libc::F_GETLK };
    // SAFETY: F_GETLK reads and writes one `struct flock`, a valid local.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(r, 0, "F_GETLK: {}", std::io::Error::last_os_error());
    fl
}

/// Every lock of wl-fsfds in `dir` is held by process `pid` (as this pid
/// namespace sees it), or every one is free with `pid == None`.
fn assert_locks(dir: &Path, pid: Option<i32>, when: &str) {
    let flock = dir.join("flock.dat");
    let posix = blocker(&dir.join("posix.dat"), false, 100);
    let ofd = blocker(&dir.join("ofd.dat"), true, 0);
    match pid {
        Some(pid) => {
            assert!(!flock_free(&flock), "{when}: the flock is not held");
            assert_eq!(
                (posix.l_type, posix.l_pid),
                (libc::F_WRLCK as libc::c_short, pid),
                "{when}: the POSIX lock"
            );
            assert_eq!(
                (posix.l_start, posix.l_len),
                (0, 100),
                "{when}: POSIX range"
            );
            assert_eq!(
                (ofd.l_type, ofd.l_pid),
                (libc::F_WRLCK as libc::c_short, -1),
                "{when}: the OFD lock"
            );
        }
        None => {
            assert!(flock_free(&flock), "{when}: the flock is still held");
            assert_eq!(
                posix.l_type,
                libc::F_UNLCK as libc::c_short,
                "{when}: POSIX"
            );
            assert_eq!(ofd.l_type, libc::F_UNLCK as libc::c_short, "{when}: OFD");
        }
    }
}

/// SIGUSR1 (on B with `h`), and the `fsfds ` line that answers.
fn check_line(w: &Workload, h: Option<&Hosts>) -> String {
    let from = w.out.lines().len();
    match h {
        Some(h) => {
            h.exec_b(&["kill", "-USR1", &w.pid.to_string()]).assert_ok();
        }
        None => common::signal(w.pid, libc::SIGUSR1),
    }
    let (_, line) = w.out.wait_line(from, "fsfds ");
    line
}

fn assert_ok_line(line: &str, created: &str) {
    assert!(line.starts_with("fsfds ok "), "{line}");
    assert_eq!(field(line, "fifo"), Some(FIFO_DATA), "FIFO data: {line}");
    assert_eq!(field(line, "created"), Some(created), "inotify: {line}");
}

#[test]
fn fifo_locks_inotify_and_o_path_survive_checkpoint_and_restore() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let mut procs = Procs::new();
    let w = procs.workload(
        WL_FSFDS,
        &[work.to_str().expect("utf-8")],
        tmp.path(),
        "fsfds",
    );
    let pid = w.pid;
    let (_, ready) = w.out.wait_line(0, "ready ");
    assert_eq!(num(&ready, "pid"), pid as u64);
    assert_locks(&work, Some(pid), "before the checkpoint");
    std::fs::write(work.join("watched/before"), b"").expect("create");
    assert_ok_line(&check_line(&w, None), "before");
    // An event the workload has not read when it is frozen: it does not
    // travel, and the restored instance says so with IN_Q_OVERFLOW.
    std::fs::write(work.join("watched/queued"), b"").expect("create");

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);

    assert_locks(&work, Some(pid), "after the restore");
    std::fs::write(work.join("watched/after-restore"), b"").expect("create");
    assert_ok_line(&check_line(&w, None), "before,OVERFLOW,after-restore");
    let table = common::fd_table(pid);
    let fifo_fd = num(&ready, "fifo_fd") as i32;
    assert_eq!(
        table.get(&fifo_fd).map(String::as_str),
        work.join("fifo").to_str(),
        "the FIFO is reopened by its path"
    );
    assert_eq!(
        table
            .get(&(num(&ready, "inotify_fd") as i32))
            .map(String::as_str),
        Some("anon_inode:inotify")
    );
    common::assert_running_untraced(pid);
    procs.kill(pid).expect("reap the restored process");
    assert_locks(&work, None, "after the restored process died");
}

/// Start wl-fsfds on A in a directory both hosts see.
fn start_on_a(h: &Hosts, procs: &mut Procs, name: &str, locks: bool) -> (Workload, String) {
    let dir = h.tmp().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let d = dir.to_str().expect("utf-8");
    let mut args = vec!["exec-a", WL_FSFDS, d];
    if !locks {
        args.push("--no-locks");
    }
    let w = procs.spawn(h.command(&args), h.tmp(), name);
    let (_, ready) = w.out.wait_line(0, "ready ");
    assert_eq!(
        num(&ready, "pid"),
        w.pid as u64,
        "the spawned PID is the workload's"
    );
    w.out.wait_tick_above(1);
    (w, d.to_string())
}

#[test]
fn fifo_inotify_and_o_path_migrate_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("ffs", "m");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, dir) = start_on_a(&h, &mut procs, "fsm", false);
    let pid = w.pid.to_string();
    h.migrate("a", &["--to", ADDR_B, &pid]).assert_ok();
    let status = procs.reap(w.pid).expect("reap the source copy");
    assert!(
        status.code().is_none(),
        "the source copy was killed: {status}"
    );
    assert!(h.exists_on_b(w.pid), "runs on B");
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);
    std::fs::write(format!("{dir}/watched/on-b"), b"").expect("create");
    assert_ok_line(&check_line(&w, Some(&h)), "on-b");
    h.exec_b(&["kill", "-KILL", &pid]).assert_ok();
}

#[test]
fn locks_shared_with_the_destination_refuse_the_migration_and_stay_held() {
    let _serial = common::setup();
    let h = Hosts::up_as("ffs", "l");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, dir) = start_on_a(&h, &mut procs, "fsl", true);
    let dir = Path::new(&dir);
    let pid = w.pid.to_string();
    let r = h.migrate("a", &["--to", ADDR_B, &pid]);
    r.assert_error(&["flock write lock", "held by another process"]);
    assert!(!h.exists_on_b(w.pid), "nothing is left on B");
    // The source goes on, untouched, with its locks.
    common::assert_running_untraced(w.pid);
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);
    assert_locks(dir, Some(w.pid), "after the refused migration");
    std::fs::write(dir.join("watched/still-on-a"), b"").expect("create");
    assert_ok_line(&check_line(&w, None), "still-on-a");
}
