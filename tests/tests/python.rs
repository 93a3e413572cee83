//! A real interpreter: Debian's python3 running 3 threads that each print
//! numbered lines and re-check a SHA-256 of 1 MiB they hold in memory.
mod common;

use common::{field, num, Procs};
use std::collections::BTreeSet;
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";
const THREADS: usize = 3;

const SCRIPT: &str = r#"
import hashlib, os, sys, threading, time
data = bytes((i * 131 + 7) % 256 for i in range(1 << 20))
digest = hashlib.sha256(data).hexdigest()
lock = threading.Lock()
def say(s):
    with lock:
        sys.stdout.write(s + "\n")
        sys.stdout.flush()
tids = [0] * 3
started = threading.Barrier(4)
def work(i):
    tids[i] = threading.get_native_id()
    started.wait()
    n = 0
    while True:
        n += 1
        ok = hashlib.sha256(data).hexdigest() == digest
        say(f"py thread {i} n={n} {'ok' if ok else 'BAD'}")
        time.sleep(0.05)
for i in range(3):
    threading.Thread(target=work, args=(i,), daemon=True).start()
started.wait()
say(f"ready pid={os.getpid()} tids={','.join(map(str, tids))}")
while True:
    time.sleep(0.1)
"#;

/// Highest n per thread in lines at index >= from, and whether all were ok.
fn progress(lines: &[String], from: usize) -> ([u64; THREADS], bool) {
    let mut max = [0u64; THREADS];
    let mut all_ok = true;
    for l in lines.iter().skip(from) {
        let Some(rest) = l.strip_prefix("py thread ") else {
            continue;
        };
        let i: usize = rest
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        if i < THREADS {
            max[i] = max[i].max(num(l, "n"));
            all_ok &= l.ends_with(" ok");
        }
    }
    (max, all_ok)
}

#[test]
fn python_threads_continue_after_checkpoint_and_restore() {
    let _serial = common::setup();
    assert!(
        std::path::Path::new(PYTHON).exists(),
        "{PYTHON} is missing: install Debian's python3 (scripts/setup or .ci/run do)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-I", "-c", SCRIPT]);
    let wl = procs.spawn(cmd, tmp.path(), "python");
    let pid = wl.pid;
    let (_, ready) = wl.out.wait_line(0, "ready ");
    assert_eq!(num(&ready, "pid"), pid as u64);
    let mut all: BTreeSet<i32> = field(&ready, "tids")
        .expect("tids=")
        .split(',')
        .map(|t| t.parse().expect("numeric tid"))
        .collect();
    assert_eq!(all.len(), THREADS);
    all.insert(pid);
    assert_eq!(common::tids(pid), all, "python's threads before checkpoint");
    common::wait_until(common::LINE_TIMEOUT, "python threads to print", || {
        let (max, _) = progress(&wl.out.lines(), 0);
        max.iter().all(|&n| n >= 3).then_some(())
    });

    common::checkpoint_kill_restore(&mut procs, pid, &tmp.path().join("img"));
    let lines = wl.out.lines();
    let mark = lines.len();
    let (before, ok_before) = progress(&lines, 0);
    assert!(ok_before, "a BAD line before checkpoint");
    assert_eq!(common::tids(pid), all, "python's threads after restore");

    common::wait_until(common::LINE_TIMEOUT, "every python thread to go on", || {
        let (now, _) = progress(&wl.out.lines(), mark);
        now.iter()
            .zip(&before)
            .all(|(n, b)| *n >= b + 5)
            .then_some(())
    });
    let (_, ok_after) = progress(&wl.out.lines(), mark);
    assert!(ok_after, "a BAD line after restore (python lost its data)");
    common::assert_running_untraced(pid);
    procs
        .kill(pid)
        .expect("the restored process must be reaped by the test process");
}
