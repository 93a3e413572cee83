//! wl-files DIR: opens DIR/input.dat (created, 64 KiB of known bytes,
//! O_CLOEXEC) and seeks to 12345, DIR/append.log (O_WRONLY|O_APPEND), /dev/null,
//! DIR itself (O_DIRECTORY) and a pipe holding 1000 unread bytes (both ends
//! kept). Prints `ready pid=P input_fd=.. append_fd=.. null_fd=.. dir_fd=..
//! pipe_r=.. pipe_w=..`, then ticks. On SIGUSR1 it checks every fd and prints
//! `files ok n=N` or `files BAD <reasons>`; each check reads the next 100 bytes
//! of input.dat (so the expected offset moves on: 12345, 12445, ...) and
//! appends `verify N` to append.log.
mod shared;

use shared::{die, file_byte, say};
use std::ffi::CString;
use std::time::Duration;

const INPUT_LEN: usize = 64 * 1024;
const START_OFFSET: i64 = 12345;
const CHUNK: usize = 100;
const PIPE_BYTES: usize = 1000;

fn pipe_byte(i: usize) -> u8 {
    (i % 97) as u8 + b' '
}

fn open(path: &str, flags: i32) -> i32 {
    let c = match CString::new(path) {
        Ok(c) => c,
        Err(_) => die("path with NUL"),
    };
    // SAFETY: plain open(2) with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    if fd < 0 {
        die(&format!("open {path}: errno {}", shared::errno()));
    }
    fd
}

struct Fds {
    dir: String,
    input: i32,
    append: i32,
    null: i32,
    dirfd: i32,
    pipe_r: i32,
    pipe_w: i32,
}

fn read_exact(fd: i32, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: reading into our own buffer within bounds.
        let r = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), n - got) };
        if r < 0 {
            return Err(format!("read fd {fd}: errno {}", shared::errno()));
        }
        if r == 0 {
            return Err(format!("read fd {fd}: EOF after {got} of {n} bytes"));
        }
        got += r as usize;
    }
    Ok(buf)
}

fn write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    // SAFETY: writing from our own buffer.
    let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if r != data.len() as isize {
        return Err(format!(
            "write fd {fd}: returned {r} (errno {})",
            shared::errno()
        ));
    }
    Ok(())
}

fn fstat(fd: i32) -> Result<libc::stat, String> {
    // SAFETY: fstat into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(format!("fstat fd {fd}: errno {}", shared::errno()));
        }
        Ok(st)
    }
}

fn check(f: &Fds, n: usize) -> Vec<String> {
    let mut bad = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            bad.push(e);
        }
    };
    // Regular file: offset, content, close-on-exec.
    note((|| {
        let expect = START_OFFSET + (n * CHUNK) as i64;
        // SAFETY: lseek/fcntl on our own fd.
        let off = unsafe { libc::lseek(f.input, 0, libc::SEEK_CUR) };
        if off != expect {
            return Err(format!("input offset {off}, expected {expect}"));
        }
        let data = read_exact(f.input, CHUNK)?;
        let want: Vec<u8> = (expect as usize..expect as usize + CHUNK)
            .map(file_byte)
            .collect();
        if data != want {
            return Err(format!("input bytes at {expect} differ"));
        }
        // SAFETY: as above.
        let fdflags = unsafe { libc::fcntl(f.input, libc::F_GETFD) };
        if fdflags & libc::FD_CLOEXEC == 0 {
            return Err("input fd lost FD_CLOEXEC".into());
        }
        Ok(())
    })());
    // O_APPEND file: flags, append lands at the end.
    note((|| {
        // SAFETY: fcntl on our own fd.
        let fl = unsafe { libc::fcntl(f.append, libc::F_GETFL) };
        if fl & libc::O_APPEND == 0 || fl & libc::O_ACCMODE != libc::O_WRONLY {
            return Err(format!("append fd flags {fl:#o}"));
        }
        // SAFETY: fcntl on our own fd.
        let fdflags = unsafe { libc::fcntl(f.append, libc::F_GETFD) };
        if fdflags & libc::FD_CLOEXEC != 0 {
            return Err("append fd gained FD_CLOEXEC".into());
        }
        let path = format!("{}/append.log", f.dir);
        let before = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        // Move the offset away: O_APPEND must still write at the end.
        // SAFETY: lseek on our own fd.
        unsafe { libc::lseek(f.append, 0, libc::SEEK_SET) };
        let line = format!("verify {n}\n");
        write_all(f.append, line.as_bytes())?;
        let content = std::fs::read(&path).map_err(|e| e.to_string())?;
        if content.len() as u64 != before + line.len() as u64 || !content.ends_with(line.as_bytes())
        {
            return Err("append.log not appended at its end".into());
        }
        Ok(())
    })());
    // /dev/null: a character device 1:3 that swallows writes and reads EOF.
    note((|| {
        let st = fstat(f.null)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFCHR || st.st_rdev != libc::makedev(1, 3) {
            return Err("null fd is not /dev/null".into());
        }
        write_all(f.null, b"0123456789")?;
        let mut b = [0u8; 4];
        // SAFETY: reading into a local buffer.
        let r = unsafe { libc::read(f.null, b.as_mut_ptr().cast(), b.len()) };
        if r != 0 {
            return Err(format!("read /dev/null returned {r}"));
        }
        Ok(())
    })());
    // Directory fd: same directory, usable with openat.
    note((|| {
        let st = fstat(f.dirfd)?;
        let real = std::fs::metadata(&f.dir).map_err(|e| e.to_string())?;
        use std::os::unix::fs::MetadataExt;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_ino != real.ino() {
            return Err("dir fd is not the directory".into());
        }
        // SAFETY: openat with a static C string.
        let fd = unsafe { libc::openat(f.dirfd, c"input.dat".as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            return Err("openat(dir_fd, input.dat) failed".into());
        }
        // SAFETY: closing the fd we just opened.
        unsafe { libc::close(fd) };
        Ok(())
    })());
    // Pipe: exactly the 1000 unread bytes, then put them back.
    note((|| {
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD into a local int.
        if unsafe { libc::ioctl(f.pipe_r, libc::FIONREAD, &mut avail) } != 0 {
            return Err("FIONREAD on the pipe failed".into());
        }
        if avail as usize != PIPE_BYTES {
            return Err(format!("pipe holds {avail} bytes, expected {PIPE_BYTES}"));
        }
        let data = read_exact(f.pipe_r, PIPE_BYTES)?;
        if data.iter().enumerate().any(|(i, &b)| b != pipe_byte(i)) {
            return Err("pipe bytes differ".into());
        }
        let again: Vec<u8> = (0..PIPE_BYTES).map(pipe_byte).collect();
        write_all(f.pipe_w, &again)
    })());
    bad
}

fn main() {
    let dir = match std::env::args().nth(1) {
        Some(d) => d,
        None => die("usage: wl-files DIR"),
    };
    let content: Vec<u8> = (0..INPUT_LEN).map(file_byte).collect();
    if let Err(e) = std::fs::write(format!("{dir}/input.dat"), content) {
        die(&format!("cannot write input.dat: {e}"));
    }
    let input = open(
        &format!("{dir}/input.dat"),
        libc::O_RDONLY | libc::O_CLOEXEC,
    );
    // SAFETY: lseek on our own fd.
    if unsafe { libc::lseek(input, START_OFFSET, libc::SEEK_SET) } != START_OFFSET {
        die("lseek failed");
    }
    let append = open(
        &format!("{dir}/append.log"),
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
    );
    if let Err(e) = write_all(append, b"hello\n") {
        die(&e);
    }
    let null = open("/dev/null", libc::O_RDWR);
    let dirfd = open(&dir, libc::O_RDONLY | libc::O_DIRECTORY);
    let mut p = [0i32; 2];
    // SAFETY: pipe into a local array.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        die("pipe failed");
    }
    let fill: Vec<u8> = (0..PIPE_BYTES).map(pipe_byte).collect();
    if let Err(e) = write_all(p[1], &fill) {
        die(&e);
    }
    let fds = Fds {
        dir,
        input,
        append,
        null,
        dirfd,
        pipe_r: p[0],
        pipe_w: p[1],
    };
    shared::install_sigusr1();
    say(&format!(
        "ready pid={} input_fd={} append_fd={} null_fd={} dir_fd={} pipe_r={} pipe_w={}",
        std::process::id(),
        fds.input,
        fds.append,
        fds.null,
        fds.dirfd,
        fds.pipe_r,
        fds.pipe_w
    ));
    let mut checks = 0usize;
    let mut tick = 0u64;
    loop {
        tick += 1;
        say(&format!("tick {tick}"));
        if shared::take_sigusr1() {
            let bad = check(&fds, checks);
            checks += 1;
            if bad.is_empty() {
                say(&format!("files ok n={checks}"));
            } else {
                say(&format!("files BAD {}", bad.join("; ")));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
