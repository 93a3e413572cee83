//! wl-tree: a process tree sharing memory, files and a pipe, for the
//! checkpoint, restore and migration of whole trees.
//!
//! `wl-tree --dir DIR --shm-name NAME [--reap-at N] [--break WHAT]`
//!
//! The process started (R) calls setsid() (R leads its session and its
//! group), then creates four shared regions of 68 KiB (17 pages; the tests'
//! cleanup recognises the SysV segment by that size), each holding one u64
//! counter slot per process (R = 0, C1 = 1, G = 2, 3..7 spare):
//! - `anon`: mmap MAP_SHARED|MAP_ANONYMOUS; it also holds the control area
//!   through which R asks C1 and G for their reports (below);
//! - `memfd`: memfd_create("wl-tree", MFD_ALLOW_SEALING), ftruncate, mmap
//!   MAP_SHARED, sealed F_SEAL_SHRINK|F_SEAL_GROW; the memfd stays open;
//! - `posix`: shm_open("/NAME") (the file /dev/shm/NAME), ftruncate, mmap
//!   MAP_SHARED, then the fd is closed (only the mappings hold the file);
//! - `sysv`: shmget(IPC_PRIVATE) and shmat; never IPC_RMID'd while the tree
//!   runs (R removes it, and /dev/shm/NAME, when it exits on SIGTERM).
//!
//! It opens DIR/records (O_WRONLY|O_CREAT|O_TRUNC, no O_APPEND) and dup()s
//! it: two fds, one open file description, inherited by the children. It
//! makes a pipe (R writes, G reads; both ends O_NONBLOCK). Then R forks C1,
//! which calls setpgid(0,0) and forks G (in C1's group); R closes its read
//! end, G its write end, C1 keeps both. R forks Z, which exits at once with
//! status 7 and stays a zombie until a verify reaps it. C1 and G set
//! PR_SET_PDEATHSIG(SIGKILL) and exit when their parent is no longer the
//! one they had.
//!
//! Fds (as created): 0-2 inherited, 3 memfd, 4 and 5 records, 6 pipe read
//! end (C1, G), 7 pipe write end (R, C1).
//!
//! Every ~10 ms each of R, C1 and G adds one to its slot in all four regions
//! and checks that the other two's slots never go back; R and C1 each append
//! one 32-byte record (`R PID SEQ` / `C PID SEQ`, space padded, `\n`) to the
//! shared records description, R alternately through both fds, C1 too; R
//! writes the little-endian u64 sequence 0, 1, 2, ... to the pipe (up to 4
//! KiB a round) and G reads at most 2 KiB a round and checks it, so the pipe
//! stays full (64 KiB in flight).
//!
//! R prints, once all is set up,
//! `ready pid=R root=R c1=C1 g=G zombie=Z shmid=ID shm=/dev/shm/NAME sid=S
//! pgid_c1=P memfd=3 rec_fds=4,5 pipe_r=6 pipe_w=7 region=69632`, then
//! `tick N` about every 20 ms.
//!
//! On SIGUSR1 R bumps the request word of the control area; C1 and G stop
//! writing records and reading the pipe, wait until the slots of the other
//! two advance in all four regions (up to 3 s, bumping their own meanwhile),
//! check that their memfd fd, /dev/shm/NAME and the SysV id (attached again
//! read-only) show the same bytes as their mappings, and write a report:
//! their pid, ppid, pgid, sid and parent-death signal, what stalled or went
//! back, the offsets of their records fds, and (G) the pipe's count, last
//! value, errors and bytes in flight. R does the same checks for itself and
//! then: its own sid and pgid; C1's pgid = C1, ppid = R, sid = R; G's pgid =
//! C1, ppid = C1, sid = R; both parent-death signals SIGKILL; the offsets of
//! all records fds (R's, C1's, G's) equal the file size, which is 32 times
//! the records R and C1 wrote, and the file parses as whole records with
//! each writer's sequence contiguous from 0; G's pipe sequence unbroken and
//! bytes read by G plus bytes in the pipe = bytes R wrote; the SysV segment
//! has 3 attachments; and the zombie: before the N-th verify (`--reap-at
//! N`, default 1) waitid(WNOWAIT) must show Z exited with status 7
//! (`zombie=present status=7`); at the N-th, waitpid(Z, WNOHANG) must reap it
//! with status 7 (`zombie=reaped status=7`); after it, Z must be gone
//! (`zombie=gone`). It prints one line:
//! `verify ok n=K records=.. r_records=.. c1_records=.. offset=..
//! pipe_sent=.. pipe_count=.. pipe_last=.. pipe_inflight=.. nattch=3
//! zombie=.. [status=7] counters=R:..,C1:..,G:..` or `verify BAD <same
//! fields> bad: <reason>; <reason>...`. Then everyone resumes.
//!
//! SIGTERM to R: R SIGTERMs C1 (which SIGTERMs and reaps G), reaps C1 and
//! Z, removes /dev/shm/NAME and the SysV segment, prints `bye` and exits 0.
//!
//! `--break WHAT` makes one property false on purpose, to show that
//! verify catches it: `memcopy` (G replaces its memfd mapping by a private
//! copy, as a restore that copied shared memory would), `records` (C1
//! reopens the records file: its own offset, as a restore that did not
//! share the description would), `pipe` (R skips 8 bytes of the sequence),
//! `pgid` (G leaves C1's group), `zombie` (R reaps Z at once), `pdeath` (C1
//! clears its parent-death signal).
//!
//! `wl-tree --producer`: writes the lines `0\n1\n2\n...` to stdout, 4000
//! bytes at a time, forever (blocked on a full pipe most of the time).
//! `wl-tree --consumer`: prints `ready consumer pid=P ppid=PP`, then reads
//! stdin (at most 1 KiB every 10 ms), checks the numbers are 0, 1, 2, ...
//! and prints `consumer n=COUNT last=L bad=B first_bad=..` about every
//! 80 ms (and `consumer eof n=.. bad=..` at end of input).
mod shared;

use shared::{die, errno, on_signal, say};
use std::ffi::CString;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: wl-tree --dir DIR --shm-name NAME [--reap-at N] [--break WHAT] \
                     | wl-tree --producer | wl-tree --consumer";

const PAGE: usize = 4096;
/// Size of each of the four regions: 68 KiB, a size the tests' cleanup
/// uses to recognise the SysV segment.
const REGION: usize = 17 * PAGE;
const SLOTS: usize = 8;
const ROOT: usize = 0;
const CHILD: usize = 1;
const GRAND: usize = 2;
const WHO: [&str; SLOTS] = ["R", "C1", "G", "s3", "s4", "s5", "s6", "s7"];
const KINDS: [&str; 4] = ["anon", "memfd", "posix", "sysv"];
const ANON: usize = 0;
const MEMFD: usize = 1;
const POSIX: usize = 2;
const SYSV: usize = 3;
const REC_LEN: usize = 32;
const PERIOD: Duration = Duration::from_millis(10);
/// How long a child waits for the others' counters to advance.
const CHILD_WAIT: Duration = Duration::from_secs(3);
/// How long R waits for the reports (and the others' counters).
const ROOT_WAIT: Duration = Duration::from_secs(5);
/// Bytes R writes to the pipe per round at most (bursts of PIPE_BURST,
/// each atomic), and bytes G reads per round at most.
const PIPE_BURST: usize = 512;
const PIPE_BURSTS: usize = 8;
const PIPE_READ: usize = 2048;

// Words (u64 indexes) of the control area in the anonymous region.
/// Request number, bumped by R for each verify.
const CTL_REQ: usize = 512;
/// Set by R to the request number when the children may go on.
const CTL_RELEASE: usize = 513;
/// CTL_PID + slot: each process's pid, written by itself.
const CTL_PID: usize = 520;
/// REPORT + slot * REPORT_WORDS + F_*: the report of C1 and G.
const REPORT: usize = 1024;
const REPORT_WORDS: usize = 64;
const F_ACK: usize = 0;
const F_PID: usize = 1;
const F_PPID: usize = 2;
const F_PGID: usize = 3;
const F_SID: usize = 4;
const F_PDEATH: usize = 5;
const F_STALL: usize = 6;
const F_REGRESS: usize = 7;
const F_SELF: usize = 8;
const F_REC_OFF: usize = 9;
const F_REC_OFF2: usize = 10;
const F_REC_COUNT: usize = 11;
const F_REC_BAD: usize = 12;
const F_PIPE_COUNT: usize = 13;
const F_PIPE_CARRY: usize = 14;
const F_PIPE_BAD: usize = 15;
const F_PIPE_INFLIGHT: usize = 16;
const F_PIPE_LAST: usize = 17;
const F_PIPE_BAD_WANT: usize = 18;
const F_PIPE_BAD_GOT: usize = 19;

/// The self-checks (bits of F_SELF).
const SELF_CHECKS: [&str; 7] = [
    "memfd-fd-differs-from-mapping",
    "memfd-size",
    "memfd-seals",
    "posix-file-differs-from-mapping",
    "sysv-ipc-stat",
    "sysv-id-differs-from-mapping",
    "posix-file-size",
];

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_sig: libc::c_int) {
    TERM.store(true, SeqCst);
}

fn term() -> bool {
    TERM.load(SeqCst)
}

fn install_sigterm() {
    on_signal(libc::SIGTERM, on_sigterm);
}

/// In a forked child: message on stderr, then _exit(2) (nothing of R's
/// runs: no atexit handlers, no stdout buffers).
fn child_die(who: &str, msg: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "wl-tree {who}: {msg}");
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(2) }
}

fn os_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn bit(p: usize, r: usize) -> u64 {
    1u64 << (p * 4 + r)
}

/// "C1/memfd,G/anon" for a mask of bit(p, r).
fn mask_text(mask: u64) -> String {
    let mut v = Vec::new();
    for (p, who) in WHO.iter().enumerate() {
        for (r, kind) in KINDS.iter().enumerate() {
            if mask & bit(p, r) != 0 {
                v.push(format!("{who}/{kind}"));
            }
        }
    }
    v.join(",")
}

fn self_text(mask: u64) -> String {
    SELF_CHECKS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join(",")
}

/// Everything the three processes share (addresses and fds are the same in
/// all of them: inherited across fork).
struct Tree {
    /// Start of the anon, memfd, posix and sysv regions, REGION bytes each,
    /// mapped read-write and shared for the life of the process.
    base: [usize; 4],
    memfd: i32,
    rec: [i32; 2],
    pipe_r: i32,
    pipe_w: i32,
    shmid: i32,
    shm_path: String,
    records_path: String,
    brk: String,
}

impl Tree {
    fn word(&self, region: usize, idx: usize) -> &AtomicU64 {
        assert!(idx < REGION / 8, "word {idx} outside a region");
        // SAFETY: in bounds of a mapping that lives as long as the process
        // (see `base`), 8-byte aligned (page-aligned base); concurrent
        // access from other processes is through atomics only.
        unsafe { &*((self.base[region] + idx * 8) as *const AtomicU64) }
    }

    fn ctl(&self, idx: usize) -> &AtomicU64 {
        self.word(ANON, idx)
    }

    fn report(&self, slot: usize, field: usize) -> &AtomicU64 {
        self.ctl(REPORT + slot * REPORT_WORDS + field)
    }

    fn bump(&self, me: usize) {
        for r in 0..4 {
            let w = self.word(r, me);
            w.store(w.load(SeqCst) + 1, SeqCst);
        }
    }

    fn counters(&self, p: usize) -> [u64; 4] {
        [0, 1, 2, 3].map(|r| self.word(r, p).load(SeqCst))
    }
}

/// The last values seen of the others' slots; any decrease is recorded.
struct Watch {
    last: [[u64; 4]; SLOTS],
    regress: u64,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            last: [[0; 4]; SLOTS],
            regress: 0,
        }
    }

    fn observe(&mut self, t: &Tree, others: &[usize]) {
        for &p in others {
            for (r, (&now, last)) in t.counters(p).iter().zip(&mut self.last[p]).enumerate() {
                if now < *last {
                    self.regress |= bit(p, r);
                }
                *last = now;
            }
        }
    }
}

/// Wait until every slot of `others` in every region has advanced past its
/// value at the call, bumping our own meanwhile, and until `also()` holds;
/// gives up after `timeout`. Returns the slots that did not advance.
fn wait_advance(
    t: &Tree,
    me: usize,
    others: &[usize],
    timeout: Duration,
    mut also: impl FnMut() -> bool,
) -> u64 {
    let base: Vec<[u64; 4]> = others.iter().map(|&p| t.counters(p)).collect();
    let start = Instant::now();
    loop {
        t.bump(me);
        let mut stall = 0;
        for (i, &p) in others.iter().enumerate() {
            let now = t.counters(p);
            for r in 0..4 {
                if now[r] <= base[i][r] {
                    stall |= bit(p, r);
                }
            }
        }
        let done = also();
        if (stall == 0 && done) || start.elapsed() > timeout || term() {
            return stall;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pread_u64(fd: i32, off: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    // SAFETY: reading 8 bytes into a local buffer.
    let r = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), 8, off as libc::off_t) };
    (r == 8).then(|| u64::from_le_bytes(b))
}

fn fstat_size(fd: i32) -> Option<i64> {
    // SAFETY: fstat into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st.st_size)
    }
}

fn shm_stat(id: i32) -> Option<libc::shmid_ds> {
    // SAFETY: IPC_STAT into a zeroed struct.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        (libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0).then_some(ds)
    }
}

/// The checks of one process on its own view (bits of SELF_CHECKS): its
/// memfd fd, the file /dev/shm/NAME and the SysV id show the bytes of its
/// own slot in the corresponding mapping (only it writes that slot, and it
/// does not while it checks).
fn self_check(t: &Tree, me: usize) -> u64 {
    let mut bad = 0u64;
    let off = me * 8;
    if pread_u64(t.memfd, off) != Some(t.word(MEMFD, me).load(SeqCst)) {
        bad |= 1 << 0;
    }
    if fstat_size(t.memfd) != Some(REGION as i64) {
        bad |= 1 << 1;
    }
    // SAFETY: fcntl on our own fd.
    let seals = unsafe { libc::fcntl(t.memfd, libc::F_GET_SEALS) };
    if seals != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
        bad |= 1 << 2;
    }
    let path = CString::new(t.shm_path.as_str()).expect("no NUL in the shm path");
    // SAFETY: open with a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 || pread_u64(fd, off) != Some(t.word(POSIX, me).load(SeqCst)) {
        bad |= 1 << 3;
    }
    if fd >= 0 {
        if fstat_size(fd) != Some(REGION as i64) {
            bad |= 1 << 6;
        }
        // SAFETY: closing the fd we just opened.
        unsafe { libc::close(fd) };
    }
    match shm_stat(t.shmid) {
        Some(ds) if ds.shm_segsz == REGION => {}
        _ => bad |= 1 << 4,
    }
    // SAFETY: a new read-only attachment of the segment, detached below.
    let p = unsafe { libc::shmat(t.shmid, std::ptr::null(), libc::SHM_RDONLY) };
    if p as isize == -1 {
        bad |= 1 << 5;
    } else {
        // SAFETY: reading our slot inside the REGION-byte attachment.
        let v = unsafe { std::ptr::read_volatile((p as usize + off) as *const u64) };
        if v != t.word(SYSV, me).load(SeqCst) {
            bad |= 1 << 5;
        }
        // SAFETY: detaching the attachment we just made.
        unsafe { libc::shmdt(p) };
    }
    bad
}

fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

fn getppid() -> i32 {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() }
}

fn pdeathsig() -> i32 {
    let mut sig: libc::c_int = -1;
    // SAFETY: PR_GET_PDEATHSIG writes one int.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut libc::c_int) };
    sig
}

fn lseek_cur(fd: i32) -> i64 {
    // SAFETY: lseek on our own fd.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

/// Write one record `TAG PID SEQ` padded to REC_LEN bytes through `fd`.
fn write_record(fd: i32, tag: char, pid: i32, seq: u64) -> bool {
    let mut s = format!("{tag} {pid} {seq}");
    while s.len() < REC_LEN - 1 {
        s.push(' ');
    }
    s.push('\n');
    // SAFETY: writing from our own buffer.
    let r = unsafe { libc::write(fd, s.as_ptr().cast(), s.len()) };
    r == REC_LEN as isize
}

/// Fill the common part of a child's report, then the ack (last).
fn publish_report(t: &Tree, me: usize, req: u64, stall: u64, watch: &Watch) {
    let put = |f: usize, v: u64| t.report(me, f).store(v, SeqCst);
    // SAFETY: getsid/getpgid of ourselves cannot fail.
    let (sid, pgid) = unsafe { (libc::getsid(0), libc::getpgid(0)) };
    put(F_PID, getpid() as u64);
    put(F_PPID, getppid() as u64);
    put(F_PGID, pgid as u64);
    put(F_SID, sid as u64);
    put(F_PDEATH, pdeathsig() as u64);
    put(F_STALL, stall);
    put(F_REGRESS, watch.regress);
    put(F_SELF, self_check(t, me));
    put(F_REC_OFF, lseek_cur(t.rec[0]) as u64);
    put(F_REC_OFF2, lseek_cur(t.rec[1]) as u64);
    put(F_ACK, req);
}

/// Parent-death signal and the check that the parent did not die before it
/// was set.
fn tie_to_parent(who: &str, parent: i32) {
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        child_die(who, "prctl(PR_SET_PDEATHSIG) failed");
    }
    if getppid() != parent {
        child_die(who, "parent died before PR_SET_PDEATHSIG");
    }
}

/// G: reads and checks the pipe, reports on request.
fn grandchild(t: &Tree, c1: i32) -> ! {
    tie_to_parent("G", c1);
    t.ctl(CTL_PID + GRAND).store(getpid() as u64, SeqCst);
    // SAFETY: closing our copy of the write end; setting O_NONBLOCK on the
    // read end (a description shared with C1, who does not read it).
    unsafe {
        libc::close(t.pipe_w);
        let fl = libc::fcntl(t.pipe_r, libc::F_GETFL);
        libc::fcntl(t.pipe_r, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    match t.brk.as_str() {
        // SAFETY: setpgid on ourselves.
        "pgid" => unsafe {
            libc::setpgid(0, 0);
        },
        "memcopy" => {
            // SAFETY: copy the memfd region, then map a private anonymous
            // region over exactly that range (ours) and put the copy back.
            unsafe {
                let base = t.base[MEMFD];
                let copy = std::slice::from_raw_parts(base as *const u8, REGION).to_vec();
                let p = libc::mmap(
                    base as *mut libc::c_void,
                    REGION,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                if p as usize != base {
                    child_die("G", "mmap over the memfd region failed");
                }
                std::ptr::copy_nonoverlapping(copy.as_ptr(), base as *mut u8, REGION);
            }
        }
        _ => {}
    }
    let others = [ROOT, CHILD];
    let mut watch = Watch::new();
    let mut answered = 0u64;
    let mut paused = false;
    let mut next = 0u64; // the value expected next from the pipe
    let mut count = 0u64;
    let mut last = u64::MAX;
    let mut bad = 0u64;
    let (mut bad_want, mut bad_got) = (0u64, 0u64);
    let mut carry: Vec<u8> = Vec::with_capacity(PIPE_READ + 8);
    let mut buf = vec![0u8; PIPE_READ];
    loop {
        if term() {
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) };
        }
        if getppid() != c1 {
            child_die("G", "C1 is no longer my parent");
        }
        t.bump(GRAND);
        watch.observe(t, &others);
        let req = t.ctl(CTL_REQ).load(SeqCst);
        if req != answered {
            paused = true;
            let stall = wait_advance(t, GRAND, &others, CHILD_WAIT, || true);
            let mut inflight: libc::c_int = -1;
            // SAFETY: FIONREAD into a local int.
            unsafe { libc::ioctl(t.pipe_r, libc::FIONREAD, &mut inflight) };
            let put = |f: usize, v: u64| t.report(GRAND, f).store(v, SeqCst);
            put(F_PIPE_COUNT, count);
            put(F_PIPE_CARRY, carry.len() as u64);
            put(F_PIPE_BAD, bad);
            put(F_PIPE_INFLIGHT, inflight as i64 as u64);
            put(F_PIPE_LAST, last);
            put(F_PIPE_BAD_WANT, bad_want);
            put(F_PIPE_BAD_GOT, bad_got);
            publish_report(t, GRAND, req, stall, &watch);
            answered = req;
        }
        if paused && t.ctl(CTL_RELEASE).load(SeqCst) == answered {
            paused = false;
        }
        if !paused {
            // SAFETY: non-blocking read into our own buffer.
            let r = unsafe { libc::read(t.pipe_r, buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                carry.extend_from_slice(&buf[..r as usize]);
                let whole = carry.len() / 8 * 8;
                for c in carry[..whole].chunks_exact(8) {
                    let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                    if v != next {
                        if bad == 0 {
                            (bad_want, bad_got) = (next, v);
                        }
                        bad += 1;
                    }
                    next = v.wrapping_add(1);
                    last = v;
                    count += 1;
                }
                carry.drain(..whole);
            } else if r == 0 {
                child_die("G", "EOF on the pipe");
            } else if errno() != libc::EAGAIN && errno() != libc::EINTR {
                child_die("G", &format!("read of the pipe: {}", os_err()));
            }
        }
        std::thread::sleep(PERIOD);
    }
}

/// C1: its own process group, forks G, writes records, reports on request.
fn child(t: &Tree, root: i32) -> ! {
    tie_to_parent("C1", root);
    // SAFETY: setpgid on ourselves (R does the same for us: no race).
    if unsafe { libc::setpgid(0, 0) } != 0 {
        child_die("C1", &format!("setpgid: {}", os_err()));
    }
    t.ctl(CTL_PID + CHILD).store(getpid() as u64, SeqCst);
    let me = getpid();
    // SAFETY: single-threaded; G runs only our code and leaves with _exit.
    let g = unsafe { libc::fork() };
    if g < 0 {
        child_die("C1", &format!("fork: {}", os_err()));
    }
    if g == 0 {
        grandchild(t, me);
    }
    match t.brk.as_str() {
        "records" => {
            let path = CString::new(t.records_path.as_str()).expect("no NUL");
            // SAFETY: a fresh description of the records file put in place
            // of both inherited fds.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    child_die("C1", "reopen records failed");
                }
                libc::dup2(fd, t.rec[0]);
                libc::dup2(fd, t.rec[1]);
                libc::close(fd);
            }
        }
        // SAFETY: prctl with integer arguments.
        "pdeath" => unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);
        },
        _ => {}
    }
    let others = [ROOT, GRAND];
    let mut watch = Watch::new();
    let mut answered = 0u64;
    let mut paused = false;
    let mut seq = 0u64;
    let mut rec_bad = 0u64;
    loop {
        if term() {
            // SAFETY: signalling and reaping our own child, then leaving.
            unsafe {
                libc::kill(g, libc::SIGTERM);
                let start = Instant::now();
                let mut status = 0;
                while libc::waitpid(g, &mut status, libc::WNOHANG) == 0 {
                    if start.elapsed() > Duration::from_secs(2) {
                        libc::kill(g, libc::SIGKILL);
                        libc::waitpid(g, &mut status, 0);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                libc::_exit(0);
            }
        }
        if getppid() != root {
            child_die("C1", "R is no longer my parent");
        }
        t.bump(CHILD);
        watch.observe(t, &others);
        let req = t.ctl(CTL_REQ).load(SeqCst);
        if req != answered {
            paused = true;
            let stall = wait_advance(t, CHILD, &others, CHILD_WAIT, || true);
            t.report(CHILD, F_REC_COUNT).store(seq, SeqCst);
            t.report(CHILD, F_REC_BAD).store(rec_bad, SeqCst);
            publish_report(t, CHILD, req, stall, &watch);
            answered = req;
        }
        if paused && t.ctl(CTL_RELEASE).load(SeqCst) == answered {
            paused = false;
        }
        if !paused {
            if write_record(t.rec[(seq % 2) as usize], 'C', me, seq) {
                seq += 1;
            } else {
                rec_bad += 1;
            }
        }
        std::thread::sleep(PERIOD);
    }
}

enum Zombie {
    /// Not reaped yet: reaped at verify number `reap_at`.
    Pending,
    Reaped,
}

struct Root {
    t: Tree,
    me: i32,
    c1: i32,
    g: i32,
    z: i32,
    reap_at: u64,
    zombie: Zombie,
    verifies: u64,
    watch: Watch,
    records: u64,
    rec_bad: u64,
    /// Bytes of the sequence written to the pipe.
    sent: u64,
    pipe_err: Option<String>,
}

impl Root {
    fn write_pipe(&mut self) {
        for _ in 0..PIPE_BURSTS {
            let mut buf = [0u8; PIPE_BURST];
            for (i, b) in buf.iter_mut().enumerate() {
                let pos = self.sent + i as u64;
                *b = (pos / 8).to_le_bytes()[(pos % 8) as usize];
            }
            // SAFETY: non-blocking write from our own buffer.
            let r = unsafe { libc::write(self.t.pipe_w, buf.as_ptr().cast(), buf.len()) };
            if r > 0 {
                self.sent += r as u64;
                if (r as usize) < buf.len() {
                    break;
                }
            } else {
                if errno() != libc::EAGAIN && errno() != libc::EINTR && self.pipe_err.is_none() {
                    self.pipe_err = Some(format!("write to the pipe: {}", os_err()));
                }
                break;
            }
        }
    }

    fn write_record(&mut self) {
        let fd = self.t.rec[(self.records % 2) as usize];
        if write_record(fd, 'R', self.me, self.records) {
            self.records += 1;
        } else {
            self.rec_bad += 1;
        }
    }

    /// Parse the records file; the number of R's and C1's records, or why
    /// it does not parse.
    fn parse_records(&self) -> Result<(u64, u64), String> {
        let data = std::fs::read(&self.t.records_path)
            .map_err(|e| format!("read {}: {e}", self.t.records_path))?;
        if data.len() % REC_LEN != 0 {
            return Err(format!(
                "records file is {} bytes, not whole records",
                data.len()
            ));
        }
        let (mut r, mut c) = (0u64, 0u64);
        for (i, rec) in data.chunks_exact(REC_LEN).enumerate() {
            let text = std::str::from_utf8(rec).unwrap_or("");
            let mut it = text.split_whitespace();
            let parsed = (|| {
                let tag = it.next()?;
                let pid: i32 = it.next()?.parse().ok()?;
                let seq: u64 = it.next()?.parse().ok()?;
                (text.ends_with('\n') && it.next().is_none()).then_some((tag, pid, seq))
            })();
            match parsed {
                Some(("R", pid, seq)) if pid == self.me && seq == r => r += 1,
                Some(("C", pid, seq)) if pid == self.c1 && seq == c => c += 1,
                _ => {
                    return Err(format!(
                        "record {i} is {:?} (expected R seq {r} or C seq {c})",
                        text.trim_end()
                    ))
                }
            }
        }
        Ok((r, c))
    }

    fn verify(&mut self) {
        let t = &self.t;
        self.verifies += 1;
        let n = self.verifies;
        let mut bad: Vec<String> = Vec::new();
        t.ctl(CTL_REQ).store(n, SeqCst);
        let answered = |slot: usize| t.report(slot, F_ACK).load(SeqCst) == n;
        let stall = wait_advance(t, ROOT, &[CHILD, GRAND], ROOT_WAIT, || {
            answered(CHILD) && answered(GRAND)
        });
        // Everyone is quiet now: no records written, no pipe I/O.
        if stall != 0 {
            bad.push(format!("R saw no progress of {}", mask_text(stall)));
        }
        if self.watch.regress != 0 {
            bad.push(format!("R saw {} go back", mask_text(self.watch.regress)));
        }
        let mine = self_check(t, ROOT);
        if mine != 0 {
            bad.push(format!("R: {}", self_text(mine)));
        }
        // SAFETY: getsid/getpgid of ourselves cannot fail.
        let (sid, pgid) = unsafe { (libc::getsid(0), libc::getpgid(0)) };
        if sid != self.me || pgid != self.me {
            bad.push(format!(
                "R has sid {sid} pgid {pgid}, expected {0} {0}",
                self.me
            ));
        }
        let mut offsets = vec![
            (format!("R fd {}", t.rec[0]), lseek_cur(t.rec[0])),
            (format!("R fd {}", t.rec[1]), lseek_cur(t.rec[1])),
        ];
        let kids = [
            (CHILD, "C1", self.c1, self.me),
            (GRAND, "G", self.g, self.c1),
        ];
        for &(slot, who, pid, parent) in &kids {
            if !answered(slot) {
                bad.push(format!("{who} did not answer within {ROOT_WAIT:?}"));
                continue;
            }
            let get = |f: usize| t.report(slot, f).load(SeqCst);
            let got = (
                get(F_PID) as i32,
                get(F_PPID) as i32,
                get(F_PGID) as i32,
                get(F_SID) as i32,
            );
            let want = (pid, parent, self.c1, self.me);
            if got != want {
                bad.push(format!(
                    "{who} has (pid, ppid, pgid, sid) {got:?}, expected {want:?}"
                ));
            }
            if get(F_PDEATH) as i32 != libc::SIGKILL {
                bad.push(format!(
                    "{who} has parent-death signal {}, expected SIGKILL",
                    get(F_PDEATH) as i64
                ));
            }
            if get(F_STALL) != 0 {
                bad.push(format!(
                    "{who} saw no progress of {}",
                    mask_text(get(F_STALL))
                ));
            }
            if get(F_REGRESS) != 0 {
                bad.push(format!("{who} saw {} go back", mask_text(get(F_REGRESS))));
            }
            if get(F_SELF) != 0 {
                bad.push(format!("{who}: {}", self_text(get(F_SELF))));
            }
            offsets.push((format!("{who} fd {}", t.rec[0]), get(F_REC_OFF) as i64));
            offsets.push((format!("{who} fd {}", t.rec[1]), get(F_REC_OFF2) as i64));
        }
        // Records: every fd's offset is the file's size, the file is whole
        // records, each writer's contiguous.
        let c1_records = t.report(CHILD, F_REC_COUNT).load(SeqCst);
        let rec_bad = self.rec_bad + t.report(CHILD, F_REC_BAD).load(SeqCst);
        if rec_bad != 0 {
            bad.push(format!("{rec_bad} record writes were short or failed"));
        }
        let size = fstat_size(t.rec[0]).unwrap_or(-1);
        let expect = ((self.records + c1_records) * REC_LEN as u64) as i64;
        if size != expect {
            bad.push(format!(
                "records file is {size} bytes, expected {expect} ({} of R + {c1_records} of C1)",
                self.records
            ));
        }
        for (who, off) in &offsets {
            if *off != size {
                bad.push(format!(
                    "records offset of {who} is {off}, file size {size}"
                ));
            }
        }
        match self.parse_records() {
            Ok((r, c)) if r == self.records && c == c1_records => {}
            Ok((r, c)) => bad.push(format!(
                "records file holds {r} of R and {c} of C1, expected {} and {c1_records}",
                self.records
            )),
            Err(e) => bad.push(e),
        }
        // The pipe.
        let g = |f: usize| t.report(GRAND, f).load(SeqCst);
        let (count, carry, inflight) = (g(F_PIPE_COUNT), g(F_PIPE_CARRY), g(F_PIPE_INFLIGHT));
        if let Some(e) = &self.pipe_err {
            bad.push(e.clone());
        }
        if answered(GRAND) {
            if g(F_PIPE_BAD) != 0 {
                bad.push(format!(
                    "G read {} out-of-sequence numbers, first {} where {} was due",
                    g(F_PIPE_BAD),
                    g(F_PIPE_BAD_GOT),
                    g(F_PIPE_BAD_WANT)
                ));
            }
            if inflight as i64 <= -1 || count * 8 + carry + inflight != self.sent {
                bad.push(format!(
                    "pipe: G read {count} numbers + {carry} bytes, {} bytes in the pipe, \
                     R wrote {} bytes",
                    inflight as i64, self.sent
                ));
            }
            if count > 0 && g(F_PIPE_LAST) != count - 1 {
                bad.push(format!(
                    "pipe: last value {} after {count} numbers",
                    g(F_PIPE_LAST)
                ));
            }
        }
        // The SysV segment: R, C1 and G attached.
        let nattch = shm_stat(t.shmid)
            .map(|ds| ds.shm_nattch as i64)
            .unwrap_or(-1);
        if nattch != 3 {
            bad.push(format!(
                "SysV segment {} has {nattch} attachments, expected 3",
                t.shmid
            ));
        }
        // C1 is alive (not exited).
        let mut status = 0;
        // SAFETY: waitpid on our own child with a local status.
        let w = unsafe { libc::waitpid(self.c1, &mut status, libc::WNOHANG) };
        if w != 0 {
            bad.push(format!(
                "waitpid(C1, WNOHANG) returned {w} (status {status:#x})"
            ));
        }
        // The zombie.
        let zombie = check_zombie(&mut self.zombie, self.z, self.reap_at, n, &mut bad);
        t.ctl(CTL_RELEASE).store(n, SeqCst);

        let counters = [ROOT, CHILD, GRAND]
            .iter()
            .map(|&p| format!("{}:{}", WHO[p], t.word(ANON, p).load(SeqCst)))
            .collect::<Vec<_>>()
            .join(",");
        let mut line = format!(
            "verify {} n={n} records={} r_records={} c1_records={c1_records} offset={size} \
             pipe_sent={} pipe_count={count} pipe_last={} pipe_inflight={} nattch={nattch} \
             {zombie} counters={counters}",
            if bad.is_empty() { "ok" } else { "BAD" },
            self.records + c1_records,
            self.records,
            self.sent,
            g(F_PIPE_LAST) as i64,
            inflight as i64,
        );
        if !bad.is_empty() {
            let _ = write!(line, " bad: {}", bad.join("; "));
        }
        say(&line);
    }

    fn shutdown(&mut self) -> ! {
        // SAFETY: signalling and reaping our own children.
        unsafe {
            libc::kill(self.c1, libc::SIGTERM);
            let start = Instant::now();
            let mut status = 0;
            while libc::waitpid(self.c1, &mut status, libc::WNOHANG) == 0 {
                if start.elapsed() > Duration::from_secs(4) {
                    libc::kill(self.c1, libc::SIGKILL);
                    libc::kill(self.g, libc::SIGKILL);
                    libc::waitpid(self.c1, &mut status, 0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Zombie::Pending = self.zombie {
                libc::waitpid(self.z, &mut status, libc::WNOHANG);
            }
            libc::shmctl(self.t.shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
        let _ = std::fs::remove_file(&self.t.shm_path);
        say("bye");
        std::process::exit(0);
    }
}

/// `zombie=present status=7`, `zombie=reaped status=7` or `zombie=gone`
/// (or what was found instead, with a reason in `bad`), at verify `n`.
fn check_zombie(
    zombie: &mut Zombie,
    z: i32,
    reap_at: u64,
    n: u64,
    bad: &mut Vec<String>,
) -> String {
    match zombie {
        Zombie::Pending if n < reap_at => {
            // SAFETY: waitid into a zeroed siginfo; WNOWAIT leaves Z a
            // zombie.
            let (r, code, pid, st) = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let r = libc::waitid(
                    libc::P_PID,
                    z as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                );
                (r, info.si_code, info.si_pid(), info.si_status())
            };
            if r == 0 && pid == z && code == libc::CLD_EXITED && st == 7 {
                "zombie=present status=7".into()
            } else {
                bad.push(format!(
                    "zombie {z}: waitid(WNOWAIT) returned {r} pid {pid} code {code} \
                         status {st} ({})",
                    os_err()
                ));
                "zombie=missing".into()
            }
        }
        Zombie::Pending => {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a local status.
            let r = unsafe { libc::waitpid(z, &mut status, libc::WNOHANG) };
            if r == z {
                *zombie = Zombie::Reaped;
            }
            if r == z && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7 {
                "zombie=reaped status=7".into()
            } else {
                bad.push(format!(
                    "zombie {z}: waitpid returned {r} status {status:#x} ({})",
                    os_err()
                ));
                "zombie=missing".into()
            }
        }
        Zombie::Reaped => {
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with a local status.
            let r = unsafe { libc::waitpid(z, &mut status, libc::WNOHANG) };
            if r == -1 && errno() == libc::ECHILD {
                "zombie=gone".into()
            } else {
                bad.push(format!("zombie {z} was reaped, now waitpid returns {r}"));
                "zombie=back".into()
            }
        }
    }
}

fn map_shared(fd: i32, flags: i32, what: &str) -> usize {
    // SAFETY: a new shared mapping of REGION bytes anywhere.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REGION,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        die(&format!("mmap of the {what} region: {}", os_err()));
    }
    p as usize
}

fn tree_main(dir: String, name: String, reap_at: u64, brk: String) -> ! {
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } < 0 {
        die(&format!(
            "setsid: {} (start wl-tree as a process that is not a group leader)",
            os_err()
        ));
    }
    shared::install_sigusr1();
    install_sigterm();
    let me = getpid();

    // (a) shared anonymous.
    let anon = map_shared(-1, libc::MAP_ANONYMOUS, "anon");
    // (b) memfd, kept open, sealed against shrinking and growing.
    // SAFETY: memfd_create with a static C string.
    let memfd = unsafe { libc::memfd_create(c"wl-tree".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if memfd < 0 {
        die(&format!("memfd_create: {}", os_err()));
    }
    // SAFETY: ftruncate on our own fd.
    if unsafe { libc::ftruncate(memfd, REGION as libc::off_t) } != 0 {
        die(&format!("ftruncate memfd: {}", os_err()));
    }
    let memfd_map = map_shared(memfd, 0, "memfd");
    // SAFETY: fcntl on our own fd.
    if unsafe {
        libc::fcntl(
            memfd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } != 0
    {
        die(&format!("F_ADD_SEALS: {}", os_err()));
    }
    // (c) POSIX shm /dev/shm/NAME, mapped, fd closed.
    let shm_name = CString::new(format!("/{name}")).expect("no NUL");
    // SAFETY: shm_open with a valid C string.
    let fd = unsafe { libc::shm_open(shm_name.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600) };
    if fd < 0 {
        die(&format!("shm_open /{name}: {}", os_err()));
    }
    // SAFETY: ftruncate on our own fd (to 0 first: a stale file starts over).
    unsafe {
        if libc::ftruncate(fd, 0) != 0 || libc::ftruncate(fd, REGION as libc::off_t) != 0 {
            die(&format!("ftruncate /dev/shm/{name}: {}", os_err()));
        }
    }
    let posix = map_shared(fd, 0, "posix");
    // SAFETY: closing our own fd; the mapping keeps the file.
    unsafe { libc::close(fd) };
    // (d) SysV, attached, not removed.
    // SAFETY: shmget/shmat with integer arguments.
    let shmid = unsafe { libc::shmget(libc::IPC_PRIVATE, REGION, libc::IPC_CREAT | 0o600) };
    if shmid < 0 {
        die(&format!("shmget: {}", os_err()));
    }
    // SAFETY: attaching the segment we just made, anywhere.
    let sysv = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
    if sysv as isize == -1 {
        die(&format!("shmat: {}", os_err()));
    }

    let records_path = format!("{dir}/records");
    let rp = CString::new(records_path.as_str()).expect("no NUL");
    // SAFETY: open with a valid C string; dup of the fd we got.
    let (rec0, rec1) = unsafe {
        let fd = libc::open(
            rp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o644,
        );
        if fd < 0 {
            die(&format!("open {records_path}: {}", os_err()));
        }
        (fd, libc::dup(fd))
    };
    if rec1 < 0 {
        die("dup failed");
    }
    let mut p = [0i32; 2];
    // SAFETY: pipe into a local array.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        die("pipe failed");
    }
    let t = Tree {
        base: [anon, memfd_map, posix, sysv as usize],
        memfd,
        rec: [rec0, rec1],
        pipe_r: p[0],
        pipe_w: p[1],
        shmid,
        shm_path: format!("/dev/shm/{name}"),
        records_path,
        brk,
    };
    t.ctl(CTL_PID + ROOT).store(me as u64, SeqCst);

    // SAFETY: single-threaded; C1 runs only our code and leaves with _exit.
    let c1 = unsafe { libc::fork() };
    if c1 < 0 {
        die(&format!("fork C1: {}", os_err()));
    }
    if c1 == 0 {
        child(&t, me);
    }
    // SAFETY: setpgid on our own child, as shells do, so that C1 is in its
    // own group whichever of the two calls runs first.
    unsafe { libc::setpgid(c1, c1) };
    // SAFETY: closing our read end, making our write end non-blocking.
    unsafe {
        libc::close(t.pipe_r);
        let fl = libc::fcntl(t.pipe_w, libc::F_GETFL);
        libc::fcntl(t.pipe_w, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    // SAFETY: Z only leaves.
    let z = unsafe { libc::fork() };
    if z < 0 {
        die(&format!("fork Z: {}", os_err()));
    }
    if z == 0 {
        // SAFETY: leaving at once with status 7.
        unsafe { libc::_exit(7) };
    }

    // Wait for C1 and G to be there and for Z to have exited.
    let start = Instant::now();
    let g = loop {
        let g = t.ctl(CTL_PID + GRAND).load(SeqCst) as i32;
        // SAFETY: waitid into a zeroed siginfo; WNOWAIT leaves Z a zombie.
        let z_done = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                z as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() == z
        };
        if g != 0 && t.ctl(CTL_PID + CHILD).load(SeqCst) as i32 == c1 && z_done {
            break g;
        }
        if start.elapsed() > Duration::from_secs(10) {
            die("C1 and G did not start, or Z did not exit, within 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut root = Root {
        t,
        me,
        c1,
        g,
        z,
        reap_at,
        zombie: Zombie::Pending,
        verifies: 0,
        watch: Watch::new(),
        records: 0,
        rec_bad: 0,
        sent: 0,
        pipe_err: None,
    };
    match root.t.brk.as_str() {
        "pipe" => root.sent += 8,
        "zombie" => {
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(z, &mut status, 0) };
        }
        _ => {}
    }
    // SAFETY: getsid/getpgid cannot fail for ourselves and our child.
    let (sid, pgid_c1) = unsafe { (libc::getsid(0), libc::getpgid(c1)) };
    say(&format!(
        "ready pid={me} root={me} c1={c1} g={g} zombie={z} shmid={shmid} shm={} sid={sid} \
         pgid_c1={pgid_c1} memfd={memfd} rec_fds={rec0},{rec1} pipe_r={} pipe_w={} region={REGION}",
        root.t.shm_path, p[0], p[1]
    ));
    let others = [CHILD, GRAND];
    let mut round = 0u64;
    let mut tick = 0u64;
    loop {
        if term() {
            root.shutdown();
        }
        root.t.bump(ROOT);
        root.watch.observe(&root.t, &others);
        root.write_record();
        root.write_pipe();
        round += 1;
        if round & 1 == 0 {
            tick += 1;
            say(&format!("tick {tick}"));
        }
        if shared::take_sigusr1() {
            root.verify();
        }
        std::thread::sleep(PERIOD);
    }
}

fn write_all(fd: i32, mut data: &[u8]) -> Result<(), std::io::Error> {
    while !data.is_empty() {
        // SAFETY: writing from our own buffer.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(os_err());
        }
        data = &data[r as usize..];
    }
    Ok(())
}

fn producer() -> ! {
    let mut n = 0u64;
    let mut buf = String::with_capacity(4096);
    loop {
        buf.clear();
        while buf.len() < 4000 {
            let _ = writeln!(buf, "{n}");
            n += 1;
        }
        if let Err(e) = write_all(1, buf.as_bytes()) {
            if e.raw_os_error() == Some(libc::EPIPE) {
                std::process::exit(0);
            }
            die(&format!("producer: write: {e}"));
        }
    }
}

fn consumer() -> ! {
    say(&format!(
        "ready consumer pid={} ppid={}",
        getpid(),
        getppid()
    ));
    let (mut expect, mut count, mut bad) = (0u64, 0u64, 0u64);
    let mut last: i64 = -1;
    let mut first_bad = String::from("none");
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    let mut reads = 0u64;
    loop {
        // SAFETY: reading into our own buffer.
        let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            die(&format!("consumer: read: {}", os_err()));
        }
        if r == 0 {
            say(&format!(
                "consumer eof n={count} last={last} bad={bad} first_bad={first_bad}"
            ));
            std::process::exit(0);
        }
        carry.extend_from_slice(&buf[..r as usize]);
        let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in carry[..end].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let v = std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            if v != Some(expect) {
                if bad == 0 {
                    first_bad = format!("{}@{expect}", String::from_utf8_lossy(line));
                }
                bad += 1;
            }
            expect = v.map_or(expect + 1, |v| v + 1);
            last = v.map_or(-1, |v| v as i64);
            count += 1;
        }
        carry.drain(..end);
        reads += 1;
        if reads & 7 == 0 {
            say(&format!(
                "consumer n={count} last={last} bad={bad} first_bad={first_bad}"
            ));
        }
        std::thread::sleep(PERIOD);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--producer") => producer(),
        Some("--consumer") => consumer(),
        _ => {}
    }
    let (mut dir, mut name, mut reap_at, mut brk) = (None, None, 1u64, String::new());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| die(USAGE));
        match a.as_str() {
            "--dir" => dir = Some(val()),
            "--shm-name" => name = Some(val()),
            "--reap-at" => reap_at = val().parse().unwrap_or_else(|_| die(USAGE)),
            "--break" => brk = val(),
            _ => die(USAGE),
        }
    }
    let (Some(dir), Some(name)) = (dir, name) else {
        die(USAGE)
    };
    if name.is_empty() || name.contains('/') {
        die("--shm-name must be a non-empty name without '/'");
    }
    if reap_at == 0 {
        die("--reap-at must be at least 1");
    }
    let known = ["", "memcopy", "records", "pipe", "pgid", "zombie", "pdeath"];
    if !known.contains(&brk.as_str()) {
        die(&format!("--break: one of {:?}", &known[1..]));
    }
    tree_main(dir, name, reap_at, brk)
}
