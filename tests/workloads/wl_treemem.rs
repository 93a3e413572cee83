//! wl-treemem [--rate MB_PER_S] [--children N] [--private-mib M] [--shared-mib S]:
//! a process tree with a lot of memory being written, for the tree rows of
//! scripts/bench-downtime (what wl-dirty is for a single process).
//!
//! The root R maps S MiB (default 128) MAP_SHARED|MAP_ANONYMOUS, fills it
//! with incompressible data (splitmix64) and forks N children (default 3),
//! which share it with R through fork. Each of the N+1 processes then maps M
//! MiB (default 32) of private anonymous memory of its own and fills it with
//! other incompressible data. Every process then runs a loop about every
//! millisecond that writes its share of RATE MB/s (default 10; 0: nothing),
//! RATE/(N+1): half of its page writes into its private memory, half into its
//! own 1/(N+1) slice of the shared region (an 8-byte stamp per page, which
//! dirties the whole page).
//!
//! R prints `ready pid=R children=C1,C2,.. private_mib=M shared_mib=S
//! rate_mb=RATE` once every process has filled its memory, then, exactly as
//! wl-dirty does, every ~100 ms `tick N gap_max_us=G`: the longest wall-clock
//! gap between two iterations of its loop in that window (the freeze of the
//! tree for a migration shows up there). R dies if a child exits.
//!
//! The children set PR_SET_PDEATHSIG(SIGKILL), leave when their parent is no
//! longer R and keep the default SIGTERM (they end on it). SIGTERM to R: R
//! SIGTERMs and reaps the children, prints `bye` and exits 0.
mod shared;

use shared::{die, say, splitmix};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const USAGE: &str =
    "usage: wl-treemem [--rate MB_PER_S] [--children N] [--private-mib M] [--shared-mib S]";

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_sig: libc::c_int) {
    TERM.store(true, SeqCst);
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn os_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// In a child: message on stderr, then _exit(2) (nothing of R's runs).
fn child_die(msg: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "wl-treemem child: {msg}");
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(2) }
}

/// A new read-write anonymous mapping of `bytes`, MAP_SHARED or MAP_PRIVATE
/// (`flags`), that lives as long as the process.
fn map(bytes: usize, flags: i32) -> &'static mut [u8] {
    // SAFETY: a fresh anonymous mapping, never unmapped; this is its only
    // reference in this process.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            die(&format!("mmap of {} MiB: {}", bytes / MIB, os_err()));
        }
        std::slice::from_raw_parts_mut(p.cast::<u8>(), bytes)
    }
}

/// Fill `mem` with incompressible data, different for each `seed`.
fn fill(mem: &mut [u8], seed: u64) {
    for (i, w) in mem.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix((seed << 40) ^ i as u64).to_le_bytes());
    }
}

/// One process's page writes: its private memory and its slice of the
/// shared region, in turn, at `pages_per_s`.
struct Dirtier {
    areas: [&'static mut [u8]; 2],
    cursor: [usize; 2],
    pages_per_s: f64,
    start: Instant,
    written: u64,
}

impl Dirtier {
    fn new(private: &'static mut [u8], shared: &'static mut [u8], rate_mb: f64) -> Dirtier {
        Dirtier {
            areas: [private, shared],
            cursor: [0, 0],
            pages_per_s: rate_mb * 1e6 / PAGE as f64,
            start: Instant::now(),
            written: 0,
        }
    }

    /// Catch up to the target number of page writes.
    fn step(&mut self) {
        let due = (self.start.elapsed().as_secs_f64() * self.pages_per_s) as u64;
        while self.written < due {
            self.written += 1;
            let a = (self.written & 1) as usize;
            let pages = self.areas[a].len() / PAGE;
            // A stride that visits every page, in a scattered order.
            self.cursor[a] = (self.cursor[a] + 7919) % pages;
            let off = self.cursor[a] * PAGE;
            self.areas[a][off..off + 8].copy_from_slice(&self.written.to_le_bytes());
        }
    }
}

fn child(
    root: i32,
    private_bytes: usize,
    shared: &'static mut [u8],
    seed: u64,
    rate_mb: f64,
    ready_w: i32,
) -> ! {
    // SAFETY: prctl and getppid with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            child_die(&format!("PR_SET_PDEATHSIG: {}", os_err()));
        }
        if libc::getppid() != root {
            libc::_exit(0);
        }
    }
    let private = map(private_bytes, libc::MAP_PRIVATE);
    fill(private, seed);
    // SAFETY: one byte to R's readiness pipe, then our end is closed.
    unsafe {
        if libc::write(ready_w, [1u8].as_ptr().cast(), 1) != 1 {
            child_die(&format!("write to the readiness pipe: {}", os_err()));
        }
        libc::close(ready_w);
    }
    let mut d = Dirtier::new(private, shared, rate_mb);
    loop {
        // SAFETY: getppid has no arguments.
        if unsafe { libc::getppid() } != root {
            // SAFETY: leaving without running anything of R's.
            unsafe { libc::_exit(0) };
        }
        d.step();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn num<T: std::str::FromStr>(v: &str) -> T {
    v.parse().unwrap_or_else(|_| die(USAGE))
}

fn main() {
    let (mut rate_mb, mut children, mut private_mib, mut shared_mib) =
        (10f64, 3usize, 32usize, 128usize);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().unwrap_or_else(|| die(USAGE));
        match a.as_str() {
            "--rate" => rate_mb = num(&v),
            "--children" => children = num(&v),
            "--private-mib" => private_mib = num(&v),
            "--shared-mib" => shared_mib = num(&v),
            _ => die(USAGE),
        }
    }
    let procs = children + 1;
    let slice = shared_mib * MIB / procs / PAGE * PAGE;
    if rate_mb < 0.0 || private_mib == 0 || slice == 0 {
        die(USAGE);
    }
    let rate_each = rate_mb / procs as f64;
    // SAFETY: getpid has no arguments.
    let me = unsafe { libc::getpid() };

    let shared = map(shared_mib * MIB, libc::MAP_SHARED);
    fill(shared, 0);
    let mut slices = shared.chunks_exact_mut(slice);
    let mut ready = [0i32; 2];
    // SAFETY: pipe into a local array.
    if unsafe { libc::pipe(ready.as_mut_ptr()) } != 0 {
        die(&format!("pipe: {}", os_err()));
    }
    let own = slices.next().expect("a slice per process");
    let mut kids = Vec::new();
    for k in 1..procs {
        let s = slices.next().expect("a slice per process");
        // SAFETY: single-threaded; the child runs only `child` and leaves
        // with _exit.
        match unsafe { libc::fork() } {
            -1 => die(&format!("fork: {}", os_err())),
            0 => {
                // SAFETY: closing the read end we inherited.
                unsafe { libc::close(ready[0]) };
                child(me, private_mib * MIB, s, k as u64, rate_each, ready[1]);
            }
            pid => kids.push(pid),
        }
    }
    // SAFETY: closing our write end; a plain sigaction with an
    // async-signal-safe handler (after the forks: the children keep the
    // default SIGTERM).
    unsafe {
        libc::close(ready[1]);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) != 0 {
            die("sigaction(SIGTERM) failed");
        }
    }
    let private = map(private_mib * MIB, libc::MAP_PRIVATE);
    fill(private, procs as u64);
    // One byte from each child once it has filled its memory; EOF once all
    // have closed their end.
    let mut got = 0;
    let mut buf = [0u8; 16];
    loop {
        // SAFETY: reading into our own buffer.
        let r = unsafe { libc::read(ready[0], buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 && shared::errno() == libc::EINTR {
            continue;
        }
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    // SAFETY: closing our read end.
    unsafe { libc::close(ready[0]) };
    if got != children {
        die(&format!("{got} of {children} children got ready"));
    }
    let list: Vec<String> = kids.iter().map(i32::to_string).collect();
    say(&format!(
        "ready pid={me} children={} private_mib={private_mib} shared_mib={shared_mib} rate_mb={rate_mb}",
        list.join(",")
    ));

    let mut d = Dirtier::new(private, own, rate_each);
    let mut tick = 0u64;
    let mut last = wall_us();
    let mut gap_max = 0u64;
    let mut window = Instant::now();
    loop {
        let now = wall_us();
        gap_max = gap_max.max(now.saturating_sub(last));
        last = now;
        d.step();
        if window.elapsed() >= Duration::from_millis(100) {
            tick += 1;
            say(&format!("tick {tick} gap_max_us={gap_max}"));
            gap_max = 0;
            window = Instant::now();
            let mut status = 0;
            // SAFETY: waitpid into a local status.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                die(&format!("child {pid} exited (status {status:#x})"));
            }
            last = wall_us();
        }
        if TERM.load(SeqCst) {
            for &pid in &kids {
                let mut status = 0;
                // SAFETY: signalling and reaping our own children.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                    libc::waitpid(pid, &mut status, 0);
                }
            }
            say("bye");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
