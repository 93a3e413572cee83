//! Test helpers shared by the file tests: a forked child that sets up
//! exactly the fds it is told to, then waits in `pause()`.

use ferry_parasite::Tracee;
use std::ffi::CString;
use std::os::fd::RawFd;

/// One thing the child sets up.
pub enum Act {
    /// `open(path, flags)` placed at fd `at`, then `lseek(seek)`.
    Open {
        path: CString,
        flags: i32,
        at: i32,
        seek: i64,
        cloexec: bool,
    },
    /// A pipe with `data` written into it; read end at `r` (status
    /// flags `r_flags`), write end at `w` (`w_flags`).
    Pipe {
        r: i32,
        w: i32,
        r_flags: i32,
        w_flags: i32,
        r_cloexec: bool,
        w_cloexec: bool,
        data: Vec<u8>,
    },
    /// A Unix stream socket at `at`.
    Socket { at: i32 },
    /// An fd inherited from the test, placed at `at` (it shares the
    /// test's open file description).
    Keep { from: RawFd, at: i32 },
    /// `dup3(from, at)` of an fd the child already placed: a second fd on
    /// the same open file description.
    Dup { from: i32, at: i32, cloexec: bool },
}

/// A forked child killed and reaped (by PID) on drop.
pub struct ScriptChild {
    pub pid: i32,
}

/// Temporary fds sit at `TMP_BASE..` before moving to their place.
const TMP_BASE: i32 = 700;
const KEEP_BASE: i32 = 900;

impl ScriptChild {
    /// Fork a child that closes every inherited fd, sets up `acts` in
    /// order and waits in `pause()`; returns once it is there.
    pub fn spawn(acts: &[Act]) -> ScriptChild {
        let pid = fork_child(acts);
        assert!(pid > 0, "fork failed");
        let child = ScriptChild { pid };
        for _ in 0..5000 {
            let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
                return child;
            }
            if let Some(code) = exited(pid) {
                panic!("scripted child failed in step {}", code - 100);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("scripted child {pid} did not reach pause()");
    }
}

impl Drop for ScriptChild {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

pub use crate::testutil::kill_and_reap;

/// The exit code of our child if it has exited.
fn exited(pid: i32) -> Option<i32> {
    let mut st = 0;
    // SAFETY: non-blocking waitpid of our own child into a valid local.
    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
    (r == pid).then(|| libc::WEXITSTATUS(st))
}

/// fork; the child runs `acts` with raw system calls only and never
/// returns.
fn fork_child(acts: &[Act]) -> i32 {
    // SAFETY: the child only makes async-signal-safe libc calls on data
    // prepared before the fork (no allocation, no locks), then pauses
    // forever or `_exit`s.
    unsafe {
        let pid = libc::fork();
        if pid != 0 {
            return pid;
        }
        fn fail(step: usize) -> ! {
            // SAFETY: _exit is async-signal-safe and ends the child.
            unsafe { libc::_exit(100 + step as i32) }
        }
        // Park inherited fds we keep, close everything else.
        let mut nkeep = 0;
        for a in acts {
            if let Act::Keep { from, .. } = a {
                if libc::dup2(*from, KEEP_BASE + nkeep) < 0 {
                    fail(0);
                }
                nkeep += 1;
            }
        }
        libc::syscall(libc::SYS_close_range, 0u32, (KEEP_BASE - 1) as u32, 0u32);
        libc::syscall(
            libc::SYS_close_range,
            (KEEP_BASE + nkeep) as u32,
            u32::MAX,
            0u32,
        );
        // Move a fresh fd to TMP_BASE.. so it cannot clobber a target.
        let park = |fd: i32, step: usize| -> i32 {
            let t = libc::fcntl(fd, libc::F_DUPFD, TMP_BASE);
            if t < 0 {
                fail(step);
            }
            libc::close(fd);
            t
        };
        let place = |tmp: i32, at: i32, cloexec: bool, step: usize| {
            let fl = if cloexec { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(tmp, at, fl) < 0 {
                fail(step);
            }
            libc::close(tmp);
        };
        let mut keep_i = 0;
        for (step, a) in acts.iter().enumerate() {
            match a {
                Act::Open {
                    path,
                    flags,
                    at,
                    seek,
                    cloexec,
                } => {
                    let fd = libc::open(path.as_ptr(), *flags, 0o644);
                    if fd < 0 {
                        fail(step);
                    }
                    let t = park(fd, step);
                    place(t, *at, *cloexec, step);
                    if *seek != 0 && libc::lseek(*at, *seek, libc::SEEK_SET) < 0 {
                        fail(step);
                    }
                }
                Act::Pipe {
                    r,
                    w,
                    r_flags,
                    w_flags,
                    r_cloexec,
                    w_cloexec,
                    data,
                } => {
                    let mut p = [-1; 2];
                    if libc::pipe(p.as_mut_ptr()) < 0 {
                        fail(step);
                    }
                    let (tr, tw) = (park(p[0], step), park(p[1], step));
                    if !data.is_empty()
                        && libc::write(tw, data.as_ptr().cast(), data.len()) != data.len() as isize
                    {
                        fail(step);
                    }
                    if libc::fcntl(tr, libc::F_SETFL, *r_flags) < 0
                        || libc::fcntl(tw, libc::F_SETFL, *w_flags) < 0
                    {
                        fail(step);
                    }
                    place(tr, *r, *r_cloexec, step);
                    place(tw, *w, *w_cloexec, step);
                }
                Act::Socket { at } => {
                    let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    if s < 0 {
                        fail(step);
                    }
                    let t = park(s, step);
                    place(t, *at, false, step);
                }
                Act::Keep { at, .. } => {
                    place(KEEP_BASE + keep_i, *at, false, step);
                    keep_i += 1;
                }
                Act::Dup { from, at, cloexec } => {
                    let fl = if *cloexec { libc::O_CLOEXEC } else { 0 };
                    if libc::dup3(*from, *at, fl) < 0 {
                        fail(step);
                    }
                }
            }
        }
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

pub use crate::testutil::TempDir;

/// The standard scene used by the dump and round-trip tests.
pub fn scene(dir: &TempDir) -> (Vec<Act>, Vec<u8>) {
    let a = dir.file("a");
    let b = dir.file("b");
    std::fs::write(&a, vec![b'a'; 10_000]).expect("write a");
    std::fs::write(&b, b"0123456789").expect("write b");
    let data = pattern(1000);
    let acts = vec![
        Act::Open {
            path: cs("/dev/null"),
            flags: libc::O_RDONLY,
            at: 0,
            seek: 0,
            cloexec: false,
        },
        Act::Open {
            path: cs(&a),
            flags: libc::O_RDONLY,
            at: 3,
            seek: 1234,
            cloexec: true,
        },
        Act::Open {
            path: cs(&b),
            flags: libc::O_WRONLY | libc::O_APPEND,
            at: 4,
            seek: 7,
            cloexec: false,
        },
        Act::Open {
            path: cs(&dir.path.to_string_lossy()),
            flags: libc::O_RDONLY | libc::O_DIRECTORY,
            at: 5,
            seek: 0,
            cloexec: false,
        },
        Act::Pipe {
            r: 9,
            w: 7,
            r_flags: 0,
            w_flags: libc::O_NONBLOCK,
            r_cloexec: false,
            w_cloexec: true,
            data: data.clone(),
        },
        Act::Open {
            path: cs(&a),
            flags: libc::O_RDWR,
            at: 10,
            seek: 5,
            cloexec: false,
        },
    ];
    (acts, data)
}

/// A CString from a test string.
pub fn cs(s: &str) -> CString {
    CString::new(s).expect("no NUL in test path")
}

/// 1000 bytes of a recognisable pattern.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// A process of an image with only what the file code looks at.
pub fn process(
    pid: i32,
    fds: Vec<ferry_protocol::model::FdEntry>,
) -> ferry_protocol::model::ProcessImage {
    ferry_protocol::model::ProcessImage {
        pid,
        ppid: 1,
        pgid: pid,
        sid: pid,
        vmas: vec![],
        mm: ferry_protocol::model::MmFields::default(),
        threads: vec![],
        fds,
        misc: ferry_protocol::model::ProcessMisc::default(),
    }
}

/// An image of `tasks` over `files` and `pipes`, nothing else shared.
pub fn image(
    tasks: Vec<ferry_protocol::model::ProcessImage>,
    files: Vec<ferry_protocol::model::OpenFile>,
    pipes: Vec<ferry_protocol::model::PipeObject>,
) -> ferry_protocol::model::TreeImage {
    ferry_protocol::model::TreeImage {
        host: crate::host::host_info(),
        tasks,
        zombies: vec![],
        files,
        pipes,
        shmem: vec![],
        deleted: vec![],
        locks: vec![],
    }
}

/// Run `f` while every process of `pids` is held in a ptrace stop (a
/// collector reads frozen processes), then let them go.
pub fn frozen<T>(pids: &[i32], f: impl FnOnce() -> T) -> T {
    let mut held = Vec::with_capacity(pids.len());
    for &pid in pids {
        let mut t = Tracee::seize(pid).expect("seize");
        t.interrupt().expect("interrupt");
        held.push(t);
    }
    let out = f();
    for t in held {
        t.detach().expect("detach");
    }
    out
}
