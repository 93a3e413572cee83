//! Shared helpers of the end-to-end tests: find `migrate`, run it with a
//! timeout, spawn workloads with their output in files, wait for lines, read
//! a process's memory and /proc state, and a guard that SIGKILLs and reaps
//! (by PID) every process a test started, even when the test panics.
#![allow(dead_code)]

#[path = "../../workloads/shared.rs"]
mod shared;

pub mod hosts;
pub mod http;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use shared::checksum;

/// How long a workload may take to print a line we wait for.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `migrate` command may take.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());

/// Call first in every test: fails loudly unless root, makes this test
/// process a child subreaper (restored processes are re-parented to it when
/// `migrate restore` exits, so tests can reap them), and serialises the tests
/// of one binary (2 cores; tests measure progress by time).
pub fn setup() -> MutexGuard<'static, ()> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "ferry's end-to-end tests must run as root (ptrace, clone3 set_tid, \
         ns_last_pid); CI runs them as root"
    );
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER) failed");
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `migrate` binary: `$FERRY_MIGRATE_BIN`, else `target/<profile>/migrate`
/// next to the `deps/` directory this test binary runs from.
pub fn migrate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_MIGRATE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "FERRY_MIGRATE_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not in target/<profile>/deps");
    let p = profile_dir.join("migrate");
    assert!(
        p.is_file(),
        "{} not found: build it first with `cargo build --workspace` (or set FERRY_MIGRATE_BIN)",
        p.display()
    );
    p
}

/// Make every inherited fd above 2 close-on-exec in the child, so workloads
/// start with exactly stdin, stdout and stderr (cargo may leave jobserver
/// pipes open, and checkpoint refuses pipes to the outside).
pub fn only_std_fds(cmd: &mut Command) {
    // SAFETY: close_range is a single async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// The outcome of one `migrate` command.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "`migrate {}` failed ({}):\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Exit status 1 and a message on stderr starting with `error:` that
    /// contains every one of `needles` (case-insensitive).
    pub fn assert_error(&self, needles: &[&str]) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(1),
            "`migrate {}` should have failed with status 1:\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.trim_start().starts_with("error:"),
            "stderr of `migrate {}` does not start with `error:`: {}",
            self.args.join(" "),
            self.stderr
        );
        let lower = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "stderr of `migrate {}` does not mention {n:?}: {}",
                self.args.join(" "),
                self.stderr
            );
        }
        self
    }
}

/// Run `migrate ARGS` with output to files (no pipe for a restored process
/// to hold open) and a timeout (SIGKILL of that `migrate` by PID).
pub fn migrate(args: &[&str]) -> Run {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_path = tmp.path().join("stdout");
    let err_path = tmp.path().join("stderr");
    let mut cmd = Command::new(migrate_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"));
    only_std_fds(&mut cmd);
    let mut child = cmd.spawn().expect("spawn migrate");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for migrate") {
            break st;
        }
        if start.elapsed() > MIGRATE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`migrate {}` did not finish within {MIGRATE_TIMEOUT:?}; stderr: {}",
                args.join(" "),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// `migrate checkpoint PID --dir DIR [--leave-running]`.
pub fn checkpoint(pid: i32, dir: &Path, leave_running: bool) -> Run {
    let pid = pid.to_string();
    let dir = dir.to_str().expect("utf-8 dir");
    let mut args = vec!["checkpoint", pid.as_str(), "--dir", dir];
    if leave_running {
        args.push("--leave-running");
    }
    migrate(&args)
}

/// `migrate restore --dir DIR`.
pub fn restore(dir: &Path) -> Run {
    migrate(&["restore", "--dir", dir.to_str().expect("utf-8 dir")])
}

/// A workload's stdout file, read line by line (complete lines only).
pub struct Out {
    pub path: PathBuf,
    pub err_path: PathBuf,
}

impl Out {
    pub fn lines(&self) -> Vec<String> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        lines.pop(); // the part after the last '\n' is not a complete line
        lines
    }

    fn tail(&self) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(15);
        format!(
            "last lines of {}:\n{}\nstderr: {}",
            self.path.display(),
            lines[from..].join("\n"),
            std::fs::read_to_string(&self.err_path).unwrap_or_default()
        )
    }

    /// Wait until a line at index >= `from` satisfies `f`; returns its index
    /// and `f`'s value. Panics after `timeout` with the file's tail.
    pub fn wait_for<T>(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> (usize, T) {
        let start = Instant::now();
        loop {
            let lines = self.lines();
            for (i, l) in lines.iter().enumerate().skip(from) {
                if let Some(v) = f(l) {
                    return (i, v);
                }
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; {}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for a line starting with `prefix` at index >= `from`.
    pub fn wait_line(&self, from: usize, prefix: &str) -> (usize, String) {
        self.wait_for(from, LINE_TIMEOUT, &format!("a line {prefix:?}"), |l| {
            l.starts_with(prefix).then(|| l.to_string())
        })
    }

    /// The highest `tick N` printed so far.
    pub fn last_tick(&self) -> Option<u64> {
        self.lines()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("tick ")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
    }

    /// Wait until a `tick N` with N > `after` appears.
    pub fn wait_tick_above(&self, after: u64) -> u64 {
        self.wait_for(0, LINE_TIMEOUT, &format!("a tick above {after}"), |l| {
            let n: u64 = l
                .strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            (n > after).then_some(n)
        })
        .1
    }
}

/// Value of `key=value` in a whitespace-separated line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
}

/// Numeric value (decimal or 0x-hex) of `key=value` in a line.
pub fn num(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("bad number {key}={v} in {line:?}"))
}

struct Entry {
    pid: i32,
    child: Option<Child>,
    reaped: bool,
}

/// Every process a test started (or had restored). Drop SIGKILLs and reaps
/// those not reaped yet, by PID, in reverse order of registration.
#[derive(Default)]
pub struct Procs {
    entries: Vec<Entry>,
}

/// A running workload and its output.
pub struct Workload {
    pub pid: i32,
    pub out: Out,
}

impl Procs {
    pub fn new() -> Procs {
        Procs::default()
    }

    /// Spawn `cmd` with stdin /dev/null and stdout/stderr to DIR/NAME.out and
    /// DIR/NAME.err (regular files), and track it.
    pub fn spawn(&mut self, mut cmd: Command, dir: &Path, name: &str) -> Workload {
        let out = Out {
            path: dir.join(format!("{name}.out")),
            err_path: dir.join(format!("{name}.err")),
        };
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out.path).expect("create workload stdout"))
            .stderr(File::create(&out.err_path).expect("create workload stderr"));
        only_std_fds(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id() as i32;
        self.entries.push(Entry {
            pid,
            child: Some(child),
            reaped: false,
        });
        Workload { pid, out }
    }

    /// Track a child spawned by the test itself (with stdio of its choice).
    pub fn track(&mut self, child: Child) {
        self.entries.push(Entry {
            pid: child.id() as i32,
            child: Some(child),
            reaped: false,
        });
    }

    /// Spawn a workload binary of this package (`exe` from
    /// `env!("CARGO_BIN_EXE_...")`).
    pub fn workload(&mut self, exe: &str, args: &[&str], dir: &Path, name: &str) -> Workload {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        self.spawn(cmd, dir, name)
    }

    /// Track a process that is not a `Child` of ours (a restored one).
    pub fn adopt(&mut self, pid: i32) {
        self.entries.push(Entry {
            pid,
            child: None,
            reaped: false,
        });
    }

    /// Wait (up to 10 s) for the tracked, not yet reaped `pid` to exit and
    /// reap it. Returns its wait status, or Err if it is not our child
    /// (then it is only waited for until /proc/PID is gone).
    pub fn reap(&mut self, pid: i32) -> Result<ExitStatus, String> {
        let entry = self
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.pid == pid && !e.reaped)
            .unwrap_or_else(|| panic!("pid {pid} is not tracked or already reaped"));
        let start = Instant::now();
        let timeout = Duration::from_secs(10);
        let result = loop {
            if let Some(child) = entry.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(st)) => break Ok(st),
                    Ok(None) => {}
                    Err(e) => break Err(format!("wait for {pid}: {e}")),
                }
            } else {
                let mut status = 0;
                // SAFETY: waitpid on a specific PID with a local status.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
                if r == pid {
                    break Ok(ExitStatus::from_raw(status));
                }
                if r < 0 {
                    // Not our child: wait until it is gone.
                    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < timeout {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    break Err(format!(
                        "pid {pid} is not a child of the test process (waitpid: {})",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            if start.elapsed() > timeout {
                return Err(format!("pid {pid} did not exit within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        entry.reaped = true;
        result
    }

    /// SIGKILL `pid` and reap it.
    pub fn kill(&mut self, pid: i32) -> Result<ExitStatus, String> {
        // SAFETY: kill with a PID we started and have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.reap(pid)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let pids: Vec<i32> = self
            .entries
            .iter()
            .rev()
            .filter(|e| !e.reaped)
            .map(|e| e.pid)
            .collect();
        for pid in pids {
            let _ = self.kill(pid);
        }
    }
}

/// Send `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill with a PID the test owns.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}) failed");
}

pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Read `len` bytes at `addr` of `pid` with process_vm_readv.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(4 << 20);
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: n,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: the local iovec points into `buf` within bounds.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        assert!(
            r > 0,
            "process_vm_readv({pid}, {:#x}, {n}) failed: {}",
            addr as usize + done,
            std::io::Error::last_os_error()
        );
        done += r as usize;
    }
    buf
}

/// Checksum (the workloads' function) of `len` bytes at `addr` in `pid`.
pub fn mem_checksum(pid: i32, addr: u64, len: usize) -> u64 {
    checksum(&read_mem(pid, addr, len))
}

/// TIDs listed in /proc/PID/task.
pub fn tids(pid: i32) -> BTreeSet<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/task: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A field of /proc/PID/status, e.g. "TracerPid".
pub fn status_field(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The state letter of /proc/PID/stat (R, S, D, T, t, Z, ...).
pub fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    let after = stat.rsplit_once(") ").expect("malformed stat").1;
    after.chars().next().expect("no state in stat")
}

/// The process exists, runs (not stopped, traced-stopped or zombie) and has
/// no tracer. Checks every thread.
pub fn assert_running_untraced(pid: i32) {
    assert!(pid_exists(pid), "process {pid} is gone");
    for tid in tids(pid) {
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .unwrap_or_else(|e| panic!("read stat of {pid}/{tid}: {e}"));
        let s = st
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        assert!(
            matches!(s, Some('R' | 'S' | 'D')),
            "thread {tid} of {pid} is in state {s:?}, expected running or sleeping"
        );
    }
    assert_eq!(
        status_field(pid, "TracerPid"),
        "0",
        "process {pid} is still traced"
    );
}

/// /proc/PID/fd as fd -> target, with pipe/socket inode numbers removed.
pub fn fd_table(pid: i32) -> BTreeMap<i32, String> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let t = target.to_string_lossy().into_owned();
            let t = match t.split_once(":[") {
                Some((kind, _)) if kind == "pipe" || kind == "socket" => kind.to_string(),
                _ => t,
            };
            Some((fd, t))
        })
        .collect()
}

/// The system call number a thread is blocked in (first field of
/// /proc/PID/task/TID/syscall), or None while it runs.
pub fn blocked_syscall(pid: i32, tid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Poll `f` every 10 ms until it returns Some, or panic after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checkpoint `pid` (killing it), reap it, check its PID is free, restore it
/// from `dir`, check `restore` printed exactly the PID, adopt the restored
/// process and check it runs untraced. Returns checkpoint's stdout.
pub fn checkpoint_kill_restore(procs: &mut Procs, pid: i32, dir: &Path) -> String {
    let cp = checkpoint(pid, dir, false);
    cp.assert_ok();
    let status = procs
        .reap(pid)
        .unwrap_or_else(|e| panic!("checkpoint should have killed {pid}: {e}"));
    assert!(
        status.signal().is_some(),
        "checkpointed process {pid} should have been killed, got {status}"
    );
    assert!(!pid_exists(pid), "pid {pid} still exists after reaping it");
    assert!(
        dir.join("process.img").is_file(),
        "checkpoint wrote no {}",
        dir.join("process.img").display()
    );
    let rs = restore(dir);
    rs.assert_ok();
    assert_eq!(
        rs.stdout,
        format!("{pid}\n"),
        "restore must print exactly the PID; stderr: {}",
        rs.stderr
    );
    procs.adopt(pid);
    assert_running_untraced(pid);
    cp.stdout
}
