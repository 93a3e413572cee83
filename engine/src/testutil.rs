//! Test helpers shared by the engine's modules: stub processes that are
//! killed and reaped by PID whatever the test does.

use ferry_parasite::remote::{local_gadget_addr, mmap_anon, Injector};
use ferry_parasite::Tracee;

/// Kill and reap our own child `pid`.
pub fn kill_and_reap(pid: i32) {
    // SAFETY: kill and waitpid of our own child, by PID, with a valid
    // status pointer.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, libc::__WALL);
    }
}

/// A child of ours killed and reaped by PID on drop.
pub struct StubGuard(pub i32);

impl Drop for StubGuard {
    fn drop(&mut self) {
        kill_and_reap(self.0);
    }
}

/// A paused copy of this test process (our child), with its guard.
pub fn spawn_stub() -> StubGuard {
    StubGuard(ferry_parasite::stub::spawn_paused(None).expect("spawn stub"))
}

/// A stopped stub with a scratch page of ours mapped in it (and, with
/// `close_fds`, none of the fds it inherited); call `f` with an injector
/// on it. The stub lives until the returned guard is dropped.
pub fn with_stub<T>(
    close_fds: bool,
    f: impl FnOnce(i32, &mut Injector<'_>) -> T,
) -> (StubGuard, T) {
    let guard = spawn_stub();
    let pid = guard.0;
    let mut t = Tracee::seize(pid).expect("seize");
    t.interrupt().expect("interrupt");
    let ip = local_gadget_addr();
    let scratch =
        mmap_anon(&mut t, ip, 0, 4096, libc::PROT_READ | libc::PROT_WRITE).expect("mmap scratch");
    let out = {
        let mut inj = Injector::new(&mut t, ip, scratch, 4096);
        if close_fds {
            inj.call(
                "close_range",
                libc::SYS_close_range,
                &[0, u32::MAX as u64, 0],
            )
            .expect("close_range");
        }
        f(pid, &mut inj)
    };
    t.detach().expect("detach");
    (guard, out)
}

/// A fresh empty directory under the system temp dir, removed on drop. Its
/// path is canonical (tests compare it with paths read back from /proc).
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    /// A new empty directory; `tag` goes into its name.
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ferry-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        let path = path.canonicalize().expect("canonicalize temp dir");
        TempDir { path }
    }

    /// Path of `name` inside, as a string.
    pub fn file(&self, name: &str) -> String {
        self.path.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
