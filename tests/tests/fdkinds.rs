//! eventfds, timerfds and signalfds survive a checkpoint and restore, and a
//! migration to host B, as the kernel held them: wl-fdkinds
//! (tests/workloads/wl_fdkinds.rs) holds an eventfd with a count above 32
//! bits, a semaphore eventfd, a periodic timerfd with missed expirations,
//! an absolute and a relative timerfd, and a signalfd with two signals
//! pending for it (sent by the test before the checkpoint; one carries a
//! value). The test compares fdinfo before and after and then has the
//! workload check its fds itself (`fdkinds ok|BAD`).
mod common;

use common::hosts::{pair, Hosts, ADDR_B};
use common::{field, num, Procs, Workload};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const WL_FDKINDS: &str = env!("CARGO_BIN_EXE_wl-fdkinds");
/// The value wl-fdkinds expects with SIGRTMIN+2.
const SIGVAL: i32 = 77;
/// How long the checkpointed process stays away: long enough that an
/// absolute timer restored as a relative one would be off by more than the
/// workload's slack (500 ms).
const AWAY: Duration = Duration::from_millis(1500);

/// The fds of wl-fdkinds' ready line.
struct Ready {
    fds: BTreeMap<&'static str, u64>,
    min_missed: u64,
    rtsig: i32,
}

fn ready(w: &Workload) -> Ready {
    let (_, line) = w.out.wait_line(0, "ready ");
    assert_eq!(
        field(&line, "pid"),
        Some(w.pid.to_string().as_str()),
        "{line}"
    );
    let fds = ["efd", "sem", "periodic", "abs", "rel", "sfd"]
        .into_iter()
        .map(|k| (k, num(&line, k)))
        .collect();
    Ready {
        fds,
        min_missed: num(&line, "min_missed"),
        rtsig: num(&line, "rtsig") as i32,
    }
}

/// Queue SIGUSR2 and SIGRTMIN+2 (with `SIGVAL`) for the workload, which
/// blocks them: they wait pending for its signalfd.
fn send_signals(pid: i32, r: &Ready) {
    common::signal(pid, libc::SIGUSR2);
    // SAFETY: sigqueue to a PID the test started, with a plain value.
    let rc = unsafe {
        libc::sigqueue(
            pid,
            r.rtsig,
            libc::sigval {
                sival_ptr: SIGVAL as usize as *mut libc::c_void,
            },
        )
    };
    assert_eq!(rc, 0, "sigqueue: {}", std::io::Error::last_os_error());
}

/// `key: value` lines of an fdinfo text.
fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// What must not change of each fd: every fdinfo line except the ones that
/// move with time or name the inode, mount or instance.
fn stable(info: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let moving = ["pos", "mnt_id", "ino", "eventfd-id", "ticks", "it_value"];
    info.iter()
        .filter(|(k, _)| !moving.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The pending-signal lines of /proc/PID/status text.
fn pending(status: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| {
            l.starts_with("ShdPnd:") || l.starts_with("SigPnd:") || l.starts_with("SigBlk:")
        })
        .map(str::to_string)
        .collect()
}

/// Check the restored process's fds against `before` (fd -> fdinfo) with
/// `read(path)` reading a /proc file where it runs.
fn check_restored(
    r: &Ready,
    before: &BTreeMap<u64, BTreeMap<String, String>>,
    status_before: &[String],
    pid: i32,
    read: impl Fn(&str) -> String,
) {
    for (name, fd) in &r.fds {
        let after = parse_info(&read(&format!("/proc/{pid}/fdinfo/{fd}")));
        assert_eq!(
            stable(&after),
            stable(&before[fd]),
            "fdinfo of {name} (fd {fd})"
        );
    }
    // The missed expirations came back (fdinfo's count is not brought up
    // to date before a read, so it is the restored count, plus at most the
    // one expiry since).
    let periodic = parse_info(&read(&format!("/proc/{pid}/fdinfo/{}", r.fds["periodic"])));
    let ticks: u64 = periodic["ticks"].parse().expect("ticks");
    assert!(
        ticks >= r.min_missed,
        "periodic timer holds {ticks} expirations after the restore, expected at least {}",
        r.min_missed
    );
    assert_eq!(
        pending(&read(&format!("/proc/{pid}/status"))),
        status_before,
        "pending and blocked signals"
    );
}

/// SIGUSR1 (`kill` runs it where the process is) and require `fdkinds ok`.
fn self_check(w: &Workload, r: &Ready, kill: impl FnOnce()) {
    let from = w.out.lines().len();
    kill();
    let (_, line) = w.out.wait_line(from, "fdkinds ");
    assert!(
        line.starts_with("fdkinds ok "),
        "wl-fdkinds' own check failed: {line}"
    );
    assert!(num(&line, "missed") >= r.min_missed, "{line}");
}

/// Send the signals and wait until they are pending; returns the fdinfo
/// of every fd and the signal lines of status.
fn prepare(pid: i32, r: &Ready) -> (BTreeMap<u64, BTreeMap<String, String>>, Vec<String>) {
    send_signals(pid, r);
    let want = (1u64 << (libc::SIGUSR2 - 1)) | (1u64 << (r.rtsig - 1));
    common::wait_until(Duration::from_secs(5), "the signals to be pending", || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let shd = st
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))?
            .trim()
            .to_string();
        let v = u64::from_str_radix(&shd, 16).ok()?;
        (v & want == want).then_some(())
    });
    let before = r
        .fds
        .values()
        .map(|&fd| {
            let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                .unwrap_or_else(|e| panic!("fdinfo {fd} of {pid}: {e}"));
            (fd, parse_info(&t))
        })
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    (before, pending(&status))
}

#[test]
fn event_fds_survive_checkpoint_and_restore() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let w = procs.workload(WL_FDKINDS, &[], tmp.path(), "fdkinds");
    let pid = w.pid;
    let r = ready(&w);
    let (before, status_before) = prepare(pid, &r);
    w.out.wait_tick_above(2);

    let img = tmp.path().join("img");
    common::checkpoint(pid, &img, false).assert_ok();
    let status = procs
        .reap(pid)
        .unwrap_or_else(|e| panic!("checkpoint should have killed {pid}: {e}"));
    assert!(status.signal().is_some(), "checkpointed {pid}: {status}");
    std::thread::sleep(AWAY);
    let rs = common::restore(&img);
    rs.assert_ok();
    assert_eq!(rs.stdout, format!("{pid}\n"), "stderr: {}", rs.stderr);
    procs.adopt(pid);
    common::assert_running_untraced(pid);

    check_restored(&r, &before, &status_before, pid, |p| {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    });
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);
    self_check(&w, &r, || common::signal(pid, libc::SIGUSR1));
    procs.kill(pid).expect("reap the restored process");
}

#[test]
fn event_fds_migrate_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("ffdk", "m");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let w = procs.spawn(h.command(&["exec-a", WL_FDKINDS]), h.tmp(), "fdkinds");
    let pid = w.pid;
    let r = ready(&w);
    let (before, status_before) = prepare(pid, &r);
    w.out.wait_tick_above(2);

    let p = pid.to_string();
    h.migrate("a", &["--to", ADDR_B, &p, "--json"]).assert_ok();
    let status = procs.reap(pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );

    check_restored(&r, &before, &status_before, pid, |path| {
        let out = h.exec_b(&["cat", path]);
        out.assert_ok();
        out.stdout
    });
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last);
    self_check(&w, &r, || {
        h.exec_b(&["kill", "-USR1", &p]).assert_ok();
    });
    // Hosts' drop ends the process on B.
}
