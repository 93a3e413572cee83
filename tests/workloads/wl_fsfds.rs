//! wl-fsfds DIR: the filesystem-side fd kinds. It makes DIR/fifo (a named
//! pipe) and opens it read-write, writing FIFO_DATA into it (left unread);
//! holds flock(LOCK_EX) on DIR/flock.dat, a POSIX write lock on bytes
//! 0..100 of DIR/posix.dat (F_SETLK), an OFD write lock on all of
//! DIR/ofd.dat (F_OFD_SETLK); watches DIR/watched (a directory) for
//! IN_CREATE with an inotify instance (non-blocking); and holds DIR/opath.dat
//! with O_PATH. With `--no-locks` (after DIR) it takes no lock (the lock
//! fds are -1). Prints `ready pid=P fifo_fd=.. flock_fd=.. posix_fd=..
//! ofd_fd=.. inotify_fd=.. opath_fd=..`, then ticks.
//!
//! On SIGUSR1 it checks its fds and prints `fsfds ok fifo=<bytes read back>
//! created=<names the inotify watch reported, comma-separated>` or
//! `fsfds BAD <reasons>`; it writes the FIFO data back after reading it,
//! so a later check sees it again.
mod shared;

use shared::{die, say};
use std::ffi::CString;
use std::time::Duration;

const FIFO_DATA: &[u8] = b"unread-fifo-bytes";
/// `F_OFD_SETLK` (not in the libc crate).
const F_OFD_SETLK: libc::c_int = 37;

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| die("path with NUL"))
}

fn open(path: &str, flags: i32) -> i32 {
    let c = cstr(path);
    // SAFETY: plain open(2) with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    if fd < 0 {
        die(&format!("open {path}: errno {}", shared::errno()));
    }
    fd
}

fn write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    // SAFETY: writing from a valid slice.
    let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if r != data.len() as isize {
        return Err(format!("write fd {fd}: {r} errno {}", shared::errno()));
    }
    Ok(())
}

fn whole_lock(ty: i32, len: i64) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: len,
        l_pid: 0,
    }
}

struct Fds {
    fifo: i32,
    inotify: i32,
    opath: i32,
    opath_path: String,
    created: Vec<String>,
}

/// Read every inotify event waiting (non-blocking) into `created`.
fn read_events(f: &mut Fds) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(f.inotify, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if shared::errno() == libc::EAGAIN {
                return Ok(());
            }
            return Err(format!("inotify read errno {}", shared::errno()));
        }
        let n = n as usize;
        let mut off = 0;
        while off + 16 <= n {
            let word = |i: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(&buf[off + i..off + i + 4]);
                u32::from_ne_bytes(w)
            };
            let mask = word(4);
            let len = word(12) as usize;
            if mask & libc::IN_Q_OVERFLOW != 0 {
                f.created.push("OVERFLOW".into());
            } else if mask & libc::IN_CREATE != 0 {
                let name = String::from_utf8_lossy(&buf[off + 16..off + 16 + len])
                    .trim_end_matches('\0')
                    .to_string();
                f.created.push(name);
            }
            off += 16 + len;
        }
    }
}

fn check(f: &mut Fds) -> Result<String, String> {
    // The FIFO's unread bytes, then put back.
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD into a local int.
    if unsafe { libc::ioctl(f.fifo, libc::FIONREAD, &mut avail) } != 0 {
        return Err("FIONREAD on the FIFO failed".into());
    }
    let mut data = vec![0u8; avail.max(0) as usize];
    if !data.is_empty() {
        // SAFETY: reading into our own buffer of `avail` bytes.
        let r = unsafe { libc::read(f.fifo, data.as_mut_ptr().cast(), data.len()) };
        if r != data.len() as isize {
            return Err(format!("FIFO read {r} of {avail}"));
        }
        write_all(f.fifo, &data)?;
    }
    read_events(f)?;
    // The O_PATH fd still names the file.
    // SAFETY: fstat into a zeroed local.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(f.opath, &mut st) != 0 {
            return Err("fstat of the O_PATH fd failed".into());
        }
        st
    };
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::metadata(&f.opath_path).map_err(|e| e.to_string())?;
    if st.st_ino != real.ino() {
        return Err("the O_PATH fd is another file".into());
    }
    // SAFETY: fcntl on our own fd.
    let fl = unsafe { libc::fcntl(f.opath, libc::F_GETFL) };
    if fl & libc::O_PATH == 0 {
        return Err(format!("the O_PATH fd has flags {fl:#o}"));
    }
    Ok(format!(
        "fsfds ok fifo={} created={}",
        String::from_utf8_lossy(&data),
        f.created.join(",")
    ))
}

/// flock, POSIX and OFD locks on three files of `dir`: their fds.
fn take_locks(dir: &str) -> (i32, i32, i32) {
    let flock_fd = open(&format!("{dir}/flock.dat"), libc::O_RDWR | libc::O_CREAT);
    // SAFETY: flock on our own fd.
    if unsafe { libc::flock(flock_fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        die("flock failed");
    }
    let posix = open(&format!("{dir}/posix.dat"), libc::O_RDWR | libc::O_CREAT);
    let fl = whole_lock(libc::F_WRLCK, 100);
    // SAFETY: F_SETLK reads one struct flock.
    if unsafe { libc::fcntl(posix, libc::F_SETLK, &fl) } != 0 {
        die("F_SETLK failed");
    }
    let ofd = open(&format!("{dir}/ofd.dat"), libc::O_RDWR | libc::O_CREAT);
    let fl = whole_lock(libc::F_WRLCK, 0);
    // SAFETY: F_OFD_SETLK reads one struct flock.
    if unsafe { libc::fcntl(ofd, F_OFD_SETLK, &fl) } != 0 {
        die("F_OFD_SETLK failed");
    }
    (flock_fd, posix, ofd)
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| die("usage: wl-fsfds DIR"));
    let locks = !std::env::args().skip(2).any(|a| a == "--no-locks");
    let fifo_path = format!("{dir}/fifo");
    // SAFETY: mkfifo with a valid C string.
    if unsafe { libc::mkfifo(cstr(&fifo_path).as_ptr(), 0o600) } != 0 {
        die(&format!("mkfifo: errno {}", shared::errno()));
    }
    let fifo = open(&fifo_path, libc::O_RDWR);
    if let Err(e) = write_all(fifo, FIFO_DATA) {
        die(&e);
    }
    let (flock_fd, posix, ofd) = if locks {
        take_locks(&dir)
    } else {
        (-1, -1, -1)
    };
    let watched = format!("{dir}/watched");
    if let Err(e) = std::fs::create_dir(&watched) {
        die(&format!("mkdir watched: {e}"));
    }
    // SAFETY: plain inotify calls with a valid C string.
    let inotify = unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK);
        if fd < 0 || libc::inotify_add_watch(fd, cstr(&watched).as_ptr(), libc::IN_CREATE) != 1 {
            die("inotify set-up failed");
        }
        fd
    };
    let opath_path = format!("{dir}/opath.dat");
    if let Err(e) = std::fs::write(&opath_path, b"o") {
        die(&format!("write opath.dat: {e}"));
    }
    let opath = open(&opath_path, libc::O_PATH);
    shared::install_sigusr1();
    say(&format!(
        "ready pid={} fifo_fd={fifo} flock_fd={flock_fd} posix_fd={posix} ofd_fd={ofd} inotify_fd={inotify} opath_fd={opath}",
        std::process::id()
    ));
    let mut f = Fds {
        fifo,
        inotify,
        opath,
        opath_path,
        created: Vec::new(),
    };
    let mut tick = 0u64;
    loop {
        if shared::take_sigusr1() {
            match check(&mut f) {
                Ok(line) => say(&line),
                Err(e) => say(&format!("fsfds BAD {e}")),
            }
        }
        say(&format!("tick {tick}"));
        tick += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}
