//! Whole process trees: a PID and all its descendants are checkpointed,
//! restored and migrated together, with what they share: open file
//! descriptions inherited across fork and dup, pipes between the
//! processes, shared memory of four kinds (shared anonymous, memfd, POSIX
//! shm in /dev/shm, SysV), process groups and sessions, and a zombie.
//!
//! - wl-tree (tests/workloads/wl_tree.rs): R (session leader) -> C1 (its own
//!   group) -> G, plus the zombie Z; the processes check each other through
//!   the shared memory and R prints `verify ok|BAD` on SIGUSR1;
//! - a shell pipeline `sh -c 'wl-tree --producer | wl-tree --consumer'`;
//! - python3's multiprocessing.Pool(3) in the middle of its work.
//!
//! Every test cleans up what it made, also when it fails: `Procs` reaps the
//! root it spawned (or adopted after a restore), `Cleanup` SIGKILLs the
//! root's descendants by PID, reaps them once they are re-parented to this
//! test process (a child subreaper), and removes wl-tree's /dev/shm file
//! and SysV segment (on host B too).
mod common;

use common::hosts::{pair, verify_line, Hosts, ADDR_B};
use common::{field, num, Procs, Workload, LINE_TIMEOUT};
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WL_TREE: &str = env!("CARGO_BIN_EXE_wl-tree");
const PYTHON: &str = "/usr/bin/python3";
/// The size of each of wl-tree's shared regions, its SysV segment's too.
const REGION: usize = 17 * 4096;

/// The PIDs and ids of wl-tree's `ready` line.
#[derive(Debug, Clone)]
struct Ready {
    root: i32,
    c1: i32,
    g: i32,
    z: i32,
    shmid: i32,
}

impl Ready {
    fn parse(line: &str, shm_name: &str) -> Ready {
        let r = Ready {
            root: num(line, "root") as i32,
            c1: num(line, "c1") as i32,
            g: num(line, "g") as i32,
            z: num(line, "zombie") as i32,
            shmid: num(line, "shmid") as i32,
        };
        assert_eq!(
            field(line, "shm"),
            Some(format!("/dev/shm/{shm_name}").as_str()),
            "ready line: {line}"
        );
        assert_eq!(num(line, "region"), REGION as u64, "ready line: {line}");
        r
    }
}

/// Fields 3 to 6 of /proc/PID/stat.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    state: char,
    ppid: i32,
    pgid: i32,
    sid: i32,
}

fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text.rsplit_once(") ")?.1;
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let mut n = || it.next()?.parse::<i32>().ok();
    Some(Stat {
        state,
        ppid: n()?,
        pgid: n()?,
        sid: n()?,
    })
}

/// /proc/PID/stat on this host (the test's pid namespace), if PID exists.
fn local_stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// /proc/PID/stat of each of `pids` in host B's pid namespace (None: no
/// such process there), with one `exec-b`.
fn stats_on_b(h: &Hosts, pids: &[i32]) -> Vec<Option<Stat>> {
    let list: Vec<String> = pids.iter().map(i32::to_string).collect();
    let script = format!(
        "for p in {}; do echo \"$p:$(cat /proc/$p/stat 2>/dev/null)\"; done",
        list.join(" ")
    );
    let r = h.exec_b(&["sh", "-c", &script]);
    r.assert_ok();
    pids.iter()
        .map(|pid| {
            r.stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{pid}:")))
                .and_then(parse_stat)
        })
        .collect()
}

/// The tree's shape: R leads its session and group; C1 is R's child and
/// leads its own group in R's session; G is C1's child in C1's group; Z is
/// R's zombie child in R's group. R's own parent is not checked (whatever
/// the restore made it).
fn assert_shape(t: &Ready, stat: impl Fn(i32) -> Option<Stat>, when: &str) {
    let get = |who: &str, pid: i32| {
        stat(pid).unwrap_or_else(|| panic!("{who} (pid {pid}) does not exist {when}"))
    };
    let running = |who: &str, pid: i32, s: Stat| {
        assert!(
            matches!(s.state, 'R' | 'S' | 'D'),
            "{who} (pid {pid}) is in state {:?} {when}, expected running or sleeping",
            s.state
        )
    };
    let r = get("R", t.root);
    running("R", t.root, r);
    assert_eq!(
        (r.pgid, r.sid),
        (t.root, t.root),
        "R (pid {}) must lead its process group and session {when}: {r:?}",
        t.root
    );
    let c1 = get("C1", t.c1);
    running("C1", t.c1, c1);
    assert_eq!(
        (c1.ppid, c1.pgid, c1.sid),
        (t.root, t.c1, t.root),
        "C1 (pid {}) must be R's child, lead its own group, in R's session {when}: {c1:?}",
        t.c1
    );
    let g = get("G", t.g);
    running("G", t.g, g);
    assert_eq!(
        (g.ppid, g.pgid, g.sid),
        (t.c1, t.c1, t.root),
        "G (pid {}) must be C1's child in C1's group and R's session {when}: {g:?}",
        t.g
    );
    let z = get("Z", t.z);
    assert_eq!(
        (z.state, z.ppid, z.pgid, z.sid),
        ('Z', t.root, t.root, t.root),
        "Z (pid {}) must be a zombie child of R in R's group {when}: {z:?}",
        t.z
    );
}

/// SIGUSR1 wl-tree's root on this host; require `verify ok` with
/// `zombie=ZOMBIE`; returns the line.
fn verify_here(w: &Workload, zombie: &str) -> String {
    let from = w.out.lines().len();
    common::signal(w.pid, libc::SIGUSR1);
    let (_, line) = w.out.wait_line(from, "verify ");
    check_verify(&line, zombie)
}

fn check_verify(line: &str, zombie: &str) -> String {
    assert!(
        line.starts_with("verify ok "),
        "wl-tree's own check of the tree failed: {line}"
    );
    assert_eq!(
        field(line, "zombie"),
        Some(zombie),
        "zombie state in the verify line: {line}"
    );
    if zombie != "gone" {
        assert_eq!(
            field(line, "status"),
            Some("7"),
            "the zombie's exit status: {line}"
        );
    }
    line.to_string()
}

/// The later verify shows more progress than the earlier one (the tests
/// let R tick 10 times, 200 ms, between the two).
fn assert_progress(before: &str, after: &str) {
    for key in ["records", "pipe_count", "pipe_sent"] {
        assert!(
            num(after, key) > num(before, key),
            "{key} did not grow:\nbefore: {before}\nafter:  {after}"
        );
    }
}

/// Wait (up to 10 s) until `pid` is reaped by us (it was re-parented to
/// this subreaper) or gone; then require it gone.
fn reap_gone(pid: i32, what: &str) {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on one PID with a local status.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid || (r < 0 && !common::pid_exists(pid)) {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !common::pid_exists(pid),
        "{what} (pid {pid}) still exists here 10 s after the tree was checkpointed or migrated away (which must end the whole tree here): {:?}",
        local_stat(pid)
    );
}

/// The PIDs listed in /proc/PID/task/PID/children.
fn children(pid: i32) -> BTreeSet<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// `migrate restore --dir DIR` must succeed and print the root's PID first.
fn restore_root(img: &Path, root: i32) {
    let rs = common::restore(img);
    rs.assert_ok();
    assert_eq!(
        rs.stdout.split_whitespace().next(),
        Some(root.to_string().as_str()),
        "restore must print the root's PID; stdout: {:?}, stderr: {}",
        rs.stdout,
        rs.stderr
    );
}

fn ipc_ns() -> String {
    std::fs::read_link("/proc/self/ns/ipc")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Remove the SysV segment `id` of this IPC namespace if it is wl-tree's
/// (IPC_PRIVATE, REGION bytes, mode 600): an id that was freed may have
/// been taken by someone else.
fn remove_sysv(id: i32) {
    // SAFETY: IPC_STAT into a zeroed struct, IPC_RMID of that id.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0
            && ds.shm_perm.__key == libc::IPC_PRIVATE
            && ds.shm_segsz == REGION
            && ds.shm_perm.mode & 0o777 == 0o600
        {
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

/// What a test made besides the processes `Procs` tracks. Declare it after
/// the `Procs` (so that it drops first) and after the `Hosts`.
struct Cleanup<'h> {
    /// Host B, when the tree may have moved there.
    hosts: Option<&'h Hosts>,
    /// wl-tree's POSIX shm name (/dev/shm/NAME).
    shm_name: Option<String>,
    /// wl-tree's SysV segment id.
    shmid: Option<i32>,
    /// The root while it runs on this host (Procs reaps it): SIGKILLed
    /// first, so that its descendants are re-parented to us.
    root: Option<i32>,
    /// Its descendants on this host, while they exist: SIGKILLed, then
    /// reaped.
    kids: Vec<i32>,
}

impl<'h> Cleanup<'h> {
    fn new(hosts: Option<&'h Hosts>, shm_name: Option<&str>) -> Cleanup<'h> {
        Cleanup {
            hosts,
            shm_name: shm_name.map(str::to_string),
            shmid: None,
            root: None,
            kids: Vec::new(),
        }
    }

    /// The tree runs here (again).
    fn running(&mut self, root: i32, kids: &[i32]) {
        self.root = Some(root);
        self.kids = kids.to_vec();
    }

    /// The tree is gone from here (checked by the test).
    fn gone(&mut self) {
        self.root = None;
        self.kids.clear();
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for &pid in self.root.iter().chain(&self.kids) {
            // SAFETY: kill of a PID of the tree this test started, which
            // still exists (the test clears the list once the tree is gone).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let start = Instant::now();
        let mut left = self.kids.clone();
        while !left.is_empty() && start.elapsed() < Duration::from_secs(10) {
            left.retain(|&pid| {
                let mut status = 0;
                // SAFETY: waitpid on one PID with a local status.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
                r != pid && (r == 0 || common::pid_exists(pid))
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(name) = &self.shm_name {
            let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
            if let Some(h) = self.hosts {
                // B's mount namespace is a copy of the host's, so this is
                // normally the same file; in case B gets its own /dev/shm.
                let _ = h.exec_b(&["rm", "-f", &format!("/dev/shm/{name}")]);
            }
        }
        if let Some(id) = self.shmid {
            remove_sysv(id);
            if let Some(h) = self.hosts {
                // Only when B has an IPC namespace of its own (then only
                // this test's processes live in it): there a restored
                // segment would have the same id.
                let b_ns = h.exec_b(&["readlink", "/proc/self/ns/ipc"]);
                if b_ns.status.success() && b_ns.stdout.trim() != ipc_ns() {
                    let _ = h.exec_b(&["ipcrm", "-m", &id.to_string()]);
                }
            }
        }
    }
}

fn shm_name(tag: &str) -> String {
    format!("ferry-tree-{}-{tag}", std::process::id())
}

/// Wait for wl-tree's ready line (spawned as `w`, whose PID must be R's)
/// and a few ticks; record its PIDs and ids in `cleanup`.
fn tree_ready(w: &Workload, name: &str, cleanup: &mut Cleanup) -> Ready {
    let (_, line) = w.out.wait_line(0, "ready ");
    let t = Ready::parse(&line, name);
    cleanup.shmid = Some(t.shmid);
    cleanup.running(t.root, &[t.c1, t.g, t.z]);
    assert_eq!(
        t.root, w.pid,
        "the spawned PID is not wl-tree's root: {line}"
    );
    assert!(
        Path::new(&format!("/dev/shm/{name}")).exists(),
        "wl-tree did not create /dev/shm/{name}"
    );
    w.out.wait_tick_above(5);
    t
}

#[test]
fn tree_checkpoint_restore_on_one_host() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_str().expect("utf-8 temp dir");
    let name = shm_name("cr");
    let mut procs = Procs::new();
    let mut cleanup = Cleanup::new(None, Some(&name));
    let w = procs.workload(
        WL_TREE,
        &["--dir", dir, "--shm-name", &name, "--reap-at", "2"],
        tmp.path(),
        "tree",
    );
    let t = tree_ready(&w, &name, &mut cleanup);
    assert_shape(&t, local_stat, "before the checkpoint");
    let v1 = verify_here(&w, "present");

    // Checkpoint (and kill) the whole tree.
    let img = tmp.path().join("img");
    common::checkpoint(t.root, &img, false).assert_ok();
    let status = procs
        .reap(t.root)
        .unwrap_or_else(|e| panic!("checkpoint should have killed R ({}): {e}", t.root));
    assert!(
        status.signal().is_some(),
        "checkpointed R ({}) should have been killed, got {status}",
        t.root
    );
    for (who, pid) in [("C1", t.c1), ("G", t.g), ("Z", t.z)] {
        reap_gone(pid, who);
    }
    cleanup.gone();
    let last = w.out.last_tick().expect("ticks before the checkpoint");

    // Restore: the same PIDs, parents, groups, session, and the zombie.
    restore_root(&img, t.root);
    procs.adopt(t.root);
    cleanup.running(t.root, &[t.c1, t.g, t.z]);
    for pid in [t.root, t.c1, t.g] {
        common::assert_running_untraced(pid);
    }
    assert_shape(&t, local_stat, "after the restore");
    w.out.wait_tick_above(last + 10);

    // The tree's own checks, which reap the zombie (status 7), then again.
    let v2 = verify_here(&w, "reaped");
    assert_progress(&v1, &v2);
    common::wait_until(
        Duration::from_secs(5),
        "R's reaped zombie to be gone",
        || (!common::pid_exists(t.z)).then_some(()),
    );
    cleanup.running(t.root, &[t.c1, t.g]);
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last + 10);
    let v3 = verify_here(&w, "gone");
    assert_progress(&v2, &v3);

    // SIGTERM: R stops C1 and G, removes its shared memory, exits 0.
    let from = w.out.lines().len();
    common::signal(t.root, libc::SIGTERM);
    w.out.wait_line(from, "bye");
    match procs.reap(t.root) {
        Ok(st) => assert_eq!(st.code(), Some(0), "R's exit after SIGTERM: {st}"),
        Err(e) => assert!(!common::pid_exists(t.root), "R did not exit: {e}"),
    }
    common::wait_until(Duration::from_secs(10), "C1 and G to be gone", || {
        (!common::pid_exists(t.c1) && !common::pid_exists(t.g)).then_some(())
    });
    cleanup.gone();
}

#[test]
fn tree_migrates_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("ftree", "m");
    let name = shm_name("mig");
    let mut procs = Procs::new();
    let mut cleanup = Cleanup::new(Some(&h), Some(&name));
    pair(&h);
    h.start_dest(&mut procs, "b");
    let dir = h.tmp().join("tree");
    std::fs::create_dir_all(&dir).expect("create the workload's directory");
    // exec-a execs `ip netns exec`, which execs wl-tree: the PID is R's.
    let cmd = h.command(&[
        "exec-a",
        WL_TREE,
        "--dir",
        dir.to_str().expect("utf-8 dir"),
        "--shm-name",
        &name,
        "--reap-at",
        "2",
    ]);
    let w = procs.spawn(cmd, h.tmp(), "tree");
    let t = tree_ready(&w, &name, &mut cleanup);
    assert_shape(&t, local_stat, "on host A before the migration");
    let v1 = verify_here(&w, "present");

    let root = t.root.to_string();
    let r = h.migrate("a", &["--to", ADDR_B, &root, "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["pid"].as_i64(), Some(t.root as i64), "{v}");

    // Gone from A: killed by migrate after B confirmed.
    let status = procs.reap(t.root).expect("reap the source copy of R");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy of R: {status}"
    );
    for (who, pid) in [("C1", t.c1), ("G", t.g), ("Z", t.z)] {
        reap_gone(pid, &format!("source copy of {who}"));
    }
    cleanup.gone();

    // On B: the same PIDs, parents, groups, session and zombie.
    let pids = [t.root, t.c1, t.g, t.z];
    let on_b: Vec<(i32, Option<Stat>)> = pids.iter().copied().zip(stats_on_b(&h, &pids)).collect();
    assert_shape(
        &t,
        |pid| on_b.iter().find(|(p, _)| *p == pid).and_then(|(_, s)| *s),
        "on host B after the migration",
    );
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last + 10);
    let v2 = check_verify(&verify_line(&h, &w, true), "reaped");
    assert_progress(&v1, &v2);
    assert_eq!(
        stats_on_b(&h, &[t.z])[0],
        None,
        "Z (pid {}) still exists on B after R reaped it",
        t.z
    );
    let last = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(last + 10);
    let v3 = check_verify(&verify_line(&h, &w, true), "gone");
    assert_progress(&v2, &v3);

    // SIGTERM on B: R stops C1 and G and exits (its parent there may leave
    // it a zombie).
    let from = w.out.lines().len();
    h.exec_b(&["kill", "-TERM", &root]).assert_ok();
    w.out.wait_line(from, "bye");
    common::wait_until(Duration::from_secs(10), "the tree to end on B", || {
        let s = stats_on_b(&h, &[t.root, t.c1, t.g]);
        let ended = matches!(s[0], None | Some(Stat { state: 'Z', .. }));
        (ended && s[1].is_none() && s[2].is_none()).then_some(())
    });
}

/// `N` of a `consumer n=N ...` line.
fn consumer_n(line: &str) -> Option<u64> {
    line.strip_prefix("consumer n=")?;
    Some(num(line, "n"))
}

#[test]
fn shell_pipeline_migrates() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let mut cleanup = Cleanup::new(None, None);
    let script = format!("'{WL_TREE}' --producer | '{WL_TREE}' --consumer");
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]);
    let w = procs.spawn(cmd, tmp.path(), "pipeline");
    let sh = w.pid;
    cleanup.running(sh, &[]);
    let (_, ready) = w.out.wait_line(0, "ready consumer ");
    let consumer = num(&ready, "pid") as i32;
    assert_eq!(
        num(&ready, "ppid") as i32,
        sh,
        "the consumer is not sh's child: {ready}"
    );
    let kids = common::wait_until(LINE_TIMEOUT, "sh to have forked both sides", || {
        let c = children(sh);
        (c.len() == 2 && c.contains(&consumer)).then_some(c)
    });
    let producer = *kids.iter().find(|&&p| p != consumer).expect("two children");
    cleanup.running(sh, &[producer, consumer]);
    let cmdline = std::fs::read(format!("/proc/{producer}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--producer"),
        "sh's other child (pid {producer}) is not the producer"
    );
    w.out
        .wait_for(0, LINE_TIMEOUT, "the consumer to read 3000 numbers", |l| {
            consumer_n(l).filter(|&n| n >= 3000)
        });

    let img = tmp.path().join("img");
    common::checkpoint(sh, &img, false).assert_ok();
    let status = procs
        .reap(sh)
        .unwrap_or_else(|e| panic!("checkpoint should have killed sh ({sh}): {e}"));
    assert!(status.signal().is_some(), "checkpointed sh: {status}");
    reap_gone(producer, "the producer");
    reap_gone(consumer, "the consumer");
    cleanup.gone();
    let lines = w.out.lines();
    let mark = lines.len();
    let before = lines
        .iter()
        .filter_map(|l| consumer_n(l))
        .max()
        .unwrap_or(0);

    restore_root(&img, sh);
    procs.adopt(sh);
    cleanup.running(sh, &[producer, consumer]);
    for pid in [sh, producer, consumer] {
        common::assert_running_untraced(pid);
    }
    assert_eq!(
        children(sh),
        kids,
        "sh's children after the restore (producer {producer}, consumer {consumer})"
    );
    for pid in [producer, consumer] {
        let s = local_stat(pid).expect("stat");
        assert_eq!(s.ppid, sh, "pid {pid}'s parent after the restore: {s:?}");
    }
    w.out.wait_for(
        mark,
        Duration::from_secs(30),
        "the consumer to read 10000 more numbers after the restore",
        |l| consumer_n(l).filter(|&n| n >= before + 10000),
    );
    let lines = w.out.lines();
    for l in lines.iter().filter(|l| l.starts_with("consumer ")) {
        assert_eq!(num(l, "bad"), 0, "the consumer saw a gap or a repeat: {l}");
        assert!(!l.starts_with("consumer eof"), "the pipe was closed: {l}");
    }
    for l in lines[mark..].iter().filter(|l| consumer_n(l).is_some()) {
        assert!(
            consumer_n(l).unwrap() >= before,
            "the consumer's count went back below {before} after the restore: {l}"
        );
    }
}

const POOL_TASKS: u64 = 600;

const POOL_SCRIPT: &str = r#"
import multiprocessing, os, sys, time
N = 600
def value(i):
    return (7 * i * i + 3 * i) % 1000003
def work(i):
    time.sleep(0.02)
    return value(i)
def say(s):
    sys.stdout.write(s + "\n")
    sys.stdout.flush()
if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    expected = sum(value(i) for i in range(N))
    with ctx.Pool(3) as pool:
        workers = [p.pid for p in pool._pool]
        say(f"ready pid={os.getpid()} workers={','.join(map(str, workers))} tasks={N} expected={expected}")
        total = done = 0
        for v in pool.imap_unordered(work, range(N), chunksize=1):
            total += v
            done += 1
            if done % 10 == 0:
                say(f"progress done={done} total={total}")
        say(f"result total={total} expected={expected} done={done} {'ok' if total == expected else 'BAD'}")
"#;

fn pool_expected() -> u64 {
    (0..POOL_TASKS)
        .map(|i| (7 * i * i + 3 * i) % 1_000_003)
        .sum()
}

/// `done` of a `progress done=N ...` line.
fn progress_done(line: &str) -> Option<u64> {
    line.strip_prefix("progress ")?;
    Some(num(line, "done"))
}

#[test]
fn python_multiprocessing_pool_migrates() {
    let _serial = common::setup();
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: install Debian's python3 (scripts/setup or .ci/run do)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let mut cleanup = Cleanup::new(None, None);
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-I", "-c", POOL_SCRIPT]);
    let w = procs.spawn(cmd, tmp.path(), "pool");
    let pid = w.pid;
    cleanup.running(pid, &[]);
    let (_, ready) = w.out.wait_line(0, "ready ");
    assert_eq!(num(&ready, "pid") as i32, pid, "{ready}");
    assert_eq!(num(&ready, "expected"), pool_expected(), "{ready}");
    let workers: Vec<i32> = field(&ready, "workers")
        .expect("workers=")
        .split(',')
        .map(|p| p.parse().expect("numeric pid"))
        .collect();
    assert_eq!(workers.len(), 3, "{ready}");
    cleanup.running(pid, &workers);
    for &wp in &workers {
        let s = local_stat(wp).unwrap_or_else(|| panic!("worker {wp} does not exist"));
        assert_eq!(s.ppid, pid, "worker {wp} is not the pool's child: {s:?}");
    }
    w.out.wait_for(0, LINE_TIMEOUT, "60 tasks done", |l| {
        progress_done(l).filter(|&d| d >= 60)
    });

    let img = tmp.path().join("img");
    common::checkpoint(pid, &img, false).assert_ok();
    let status = procs
        .reap(pid)
        .unwrap_or_else(|e| panic!("checkpoint should have killed python ({pid}): {e}"));
    assert!(status.signal().is_some(), "checkpointed python: {status}");
    for &wp in &workers {
        reap_gone(wp, "a pool worker");
    }
    cleanup.gone();
    let lines = w.out.lines();
    let mark = lines.len();
    let before = lines
        .iter()
        .filter_map(|l| progress_done(l))
        .max()
        .unwrap_or(0);
    assert!(
        !lines.iter().any(|l| l.starts_with("result ")),
        "the pool finished before the checkpoint; make the work longer"
    );

    restore_root(&img, pid);
    procs.adopt(pid);
    cleanup.running(pid, &workers);
    common::assert_running_untraced(pid);
    for &wp in &workers {
        common::assert_running_untraced(wp);
        let s = local_stat(wp).expect("stat");
        assert_eq!(s.ppid, pid, "worker {wp}'s parent after the restore: {s:?}");
    }
    let (_, result) = w
        .out
        .wait_for(mark, Duration::from_secs(40), "the pool's result", |l| {
            l.starts_with("result ").then(|| l.to_string())
        });
    assert!(
        w.out.lines()[mark..]
            .iter()
            .filter_map(|l| progress_done(l))
            .any(|d| d > before),
        "no progress line after the restore"
    );
    assert_eq!(num(&result, "done"), POOL_TASKS, "{result}");
    assert_eq!(
        num(&result, "total"),
        pool_expected(),
        "the pool's sum after the restore is wrong: {result}"
    );
    assert!(result.ends_with(" ok"), "{result}");
    // The pool's exit terminates and joins its workers; python exits 0.
    match procs.reap(pid) {
        Ok(st) => assert_eq!(st.code(), Some(0), "python's exit: {st}"),
        Err(e) => assert!(!common::pid_exists(pid), "python did not exit: {e}"),
    }
    common::wait_until(
        Duration::from_secs(10),
        "the pool workers to be gone",
        || {
            workers
                .iter()
                .all(|&wp| !common::pid_exists(wp))
                .then_some(())
        },
    );
    cleanup.gone();
}
