//! wl-lazy MIB THREADS: a workload for lazy (post-copy) migration, where
//! the process resumes on the destination with most of its memory still on
//! the source and every first touch of a page is a fault served over the
//! network.
//!
//! Memory (all private anonymous):
//! - the main region, MIB MiB: word `w` of page `p` holds
//!   `splitmix(SEED_MAIN ^ (p * 512 + w))`, except every 16th page (`p % 16
//!   == 15`), which is never touched and must read as zeros;
//! - the move region, 4 MiB of another pattern, inside an 8 MiB PROT_NONE
//!   reservation: it is moved with `mremap` between the two halves;
//! - 16 "unmap" regions of 64 KiB (another pattern), unmapped one after the
//!   other and replaced by fresh (zero) mappings at the same address;
//! - a 64 KiB "drop" region, emptied with `MADV_DONTNEED` and refilled.
//!
//! It prints `ready pid=PID threads=T checksum=HEX` (checksum: `shared::
//! checksum` of the main region), then `tick N` about every 20 ms. THREADS
//! reader threads check the first and last word of pseudo-random pages of
//! the main region all the time (200 µs apart), so that many faults arrive
//! together. Each tick the main thread does one event, in rotation: fork a
//! child that checks 64 pages of the main region and 64 of the move region
//! and exits 0 (all match) or 1; mremap the move region to the other half
//! of its reservation and check 16 of its pages; check, unmap and remap the
//! next unmap region (first round: pattern, later: zeros); check the drop
//! region, MADV_DONTNEED it, check it reads zeros, write the next pattern.
//!
//! On SIGUSR1 it compares every page of the main and the move region and
//! prints
//! `verify ok checksum=HEX pages=N checks=C bad=0 forks=F fork_bad=0 remaps=R unmaps=U drops=D fork_lost=L`
//! (`verify BAD ...` with the same fields plus `expected_checksum=HEX
//! first_bad=WHAT` otherwise). `pages` is the number of pages compared (main
//! plus move region), `checks` the reader threads' checks, `bad` every
//! mismatch seen (reader threads, events, the full compare), `fork_bad` the
//! children that failed (or forks that failed), `fork_lost` the children
//! it could not wait for because a migration froze it between fork and
//! waitpid (the child stays behind on the source host: ECHILD). It is `ok`
//! only when bad and fork_bad are 0 and the checksum equals the one of the
//! ready line.
mod shared;

use shared::{arg_num, checksum, die, install_sigusr1, say, splitmix, take_sigusr1};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const USAGE: &str = "usage: wl-lazy MIB THREADS";
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Every HOLE_EVERY-th page of the main region is never touched.
const HOLE_EVERY: usize = 16;
const SEED_MAIN: u64 = 0x6c61_7a79_0000_0001;
const SEED_MOVE: u64 = 0x6d6f_7665_0000_0002;
const SEED_UNMAP: u64 = 0x756e_6d61_0000_0003;
const SEED_DROP: u64 = 0x6472_6f70_0000_0004;
const MOVE_LEN: usize = 4 << 20;
const MOVE_PAGES: usize = MOVE_LEN / PAGE;
const UNMAP_LEN: usize = 64 << 10;
const UNMAP_PAGES: usize = UNMAP_LEN / PAGE;
const UNMAPS: usize = 16;
const DROP_LEN: usize = 64 << 10;
const DROP_PAGES: usize = DROP_LEN / PAGE;
/// Pages a forked child checks in the main region and in the move region.
const FORK_CHECKS: usize = 64;
/// Pages checked in the move region after each move.
const REMAP_CHECKS: usize = 16;
const READER_PAUSE: Duration = Duration::from_micros(200);
const TICK: Duration = Duration::from_millis(20);

/// Checks done by the reader threads, and the mismatches they found.
static CHECKS: AtomicU64 = AtomicU64::new(0);
static READER_BAD: AtomicU64 = AtomicU64::new(0);
/// The first page a reader found wrong (u64::MAX: none).
static READER_FIRST_BAD: AtomicU64 = AtomicU64::new(u64::MAX);

/// Word `w` of page `p` of a pattern.
fn pattern(seed: u64, p: usize, w: usize) -> u64 {
    splitmix(seed ^ ((p * WORDS + w) as u64))
}

/// Word `w` of page `p` of the main region (zero in the untouched pages).
fn main_word(p: usize, w: usize) -> u64 {
    if p % HOLE_EVERY == HOLE_EVERY - 1 {
        0
    } else {
        pattern(SEED_MAIN, p, w)
    }
}

fn move_word(p: usize, w: usize) -> u64 {
    pattern(SEED_MOVE, p, w)
}

/// Word `w` of page `q` of unmap region `i` (its first incarnation).
fn unmap_word(i: usize, q: usize, w: usize) -> u64 {
    pattern(SEED_UNMAP, i * UNMAP_PAGES + q, w)
}

/// Word `w` of page `q` of the drop region in generation `g`.
fn drop_word(g: u64, q: usize, w: usize) -> u64 {
    pattern(SEED_DROP ^ (g << 32), q, w)
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A live read-write private anonymous mapping of ours. Only built over
/// mappings this program made; the main thread keeps the move region's
/// `Region` up to date when it moves it, and the main region is never
/// unmapped. Accesses are volatile (they are the point: faults) and
/// bounds-checked.
#[derive(Clone, Copy)]
struct Region {
    addr: usize,
    pages: usize,
}

impl Region {
    fn len(&self) -> usize {
        self.pages * PAGE
    }

    fn word(&self, p: usize, w: usize) -> u64 {
        if p >= self.pages || w >= WORDS {
            // SAFETY: _exit is async-signal-safe (this also runs in forked
            // children) and never returns.
            unsafe { libc::_exit(4) };
        }
        let ptr = (self.addr + p * PAGE + w * 8) as *const u64;
        // SAFETY: in bounds of a live mapping (see the type), aligned.
        unsafe { std::ptr::read_volatile(ptr) }
    }

    fn set_word(&self, p: usize, w: usize, v: u64) {
        if p >= self.pages || w >= WORDS {
            die("write outside a region");
        }
        let ptr = (self.addr + p * PAGE + w * 8) as *mut u64;
        // SAFETY: in bounds of a live read-write mapping, aligned.
        unsafe { std::ptr::write_volatile(ptr, v) }
    }

    /// Whether every word of page `p` equals `expect(p, w)`. Allocation
    /// free: forked children use it.
    fn page_matches(&self, p: usize, expect: impl Fn(usize, usize) -> u64) -> bool {
        (0..WORDS).all(|w| self.word(p, w) == expect(p, w))
    }

    fn fill(&self, expect: impl Fn(usize, usize) -> u64) {
        for p in 0..self.pages {
            for w in 0..WORDS {
                self.set_word(p, w, expect(p, w));
            }
        }
    }
}

/// mmap a private anonymous read-write region of `len` bytes (at `addr`
/// with `extra` flags such as MAP_FIXED, or anywhere with addr 0).
fn map_anon(addr: usize, len: usize, prot: i32, extra: i32, what: &str) -> usize {
    // SAFETY: a new anonymous mapping; with MAP_FIXED/MAP_FIXED_NOREPLACE
    // the callers only pass address ranges of their own reservations.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        die(&format!(
            "mmap of the {what} ({len} bytes at {addr:#x}) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if addr != 0 && p as usize != addr {
        die(&format!(
            "mmap of the {what} landed at {:#x}, not {addr:#x}",
            p as usize
        ));
    }
    p as usize
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn reader(idx: usize, main: Region) -> ! {
    let mut x = splitmix(0x5eed_0000 + idx as u64) | 1;
    loop {
        let p = (xorshift(&mut x) % main.pages as u64) as usize;
        let ok = main.word(p, 0) == main_word(p, 0)
            && main.word(p, WORDS - 1) == main_word(p, WORDS - 1);
        CHECKS.fetch_add(1, Ordering::Relaxed);
        if !ok {
            READER_BAD.fetch_add(1, Ordering::Relaxed);
            let _ = READER_FIRST_BAD.compare_exchange(
                u64::MAX,
                p as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        std::thread::sleep(READER_PAUSE);
    }
}

/// What the main thread does and counts.
struct State {
    main: Region,
    /// The 8 MiB reservation holding the move region in one half.
    reserve: usize,
    /// The move region (in the first or second half of `reserve`).
    mv: Region,
    unmap: [usize; UNMAPS],
    drop: Region,
    drop_gen: u64,
    forks: u64,
    fork_bad: u64,
    /// Children that were no longer ours to wait for (left on the source
    /// host by a migration between fork and waitpid).
    fork_lost: u64,
    remaps: u64,
    unmaps: u64,
    drops: u64,
    /// Mismatches found by the events.
    event_bad: u64,
    first_bad: Option<String>,
}

impl State {
    fn bad(&mut self, what: String) {
        self.event_bad += 1;
        if self.first_bad.is_none() {
            self.first_bad = Some(what);
        }
    }

    /// Fork a child that checks pages of the main and the move region.
    fn fork(&mut self) {
        let seed = splitmix(0xf0f0_0000 ^ self.forks) | 1;
        let (main, mv) = (self.main, self.mv);
        // SAFETY: the child only reads memory (no allocation, no locks) and
        // leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            self.fork_bad += 1;
            self.bad(format!("fork:{}", std::io::Error::last_os_error()));
            return;
        }
        if pid == 0 {
            let mut x = seed;
            let mut ok = true;
            for _ in 0..FORK_CHECKS {
                let p = (xorshift(&mut x) % main.pages as u64) as usize;
                ok &= main.page_matches(p, main_word);
                let q = (xorshift(&mut x) % MOVE_PAGES as u64) as usize;
                ok &= mv.page_matches(q, move_word);
            }
            // SAFETY: leaving the forked child without running anything of
            // the parent's (atexit handlers, stdio buffers).
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        self.forks += 1;
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a local status.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            if r < 0 && shared::errno() == libc::EINTR {
                continue;
            }
            if r < 0 && shared::errno() == libc::ECHILD {
                // Migrated between fork and waitpid: the child stayed on
                // the source host. Not a memory error.
                self.fork_lost += 1;
                return;
            }
            die(&format!(
                "waitpid({pid}) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            self.fork_bad += 1;
            if self.first_bad.is_none() {
                self.first_bad = Some(format!("fork:{}:status:{status:#x}", self.forks));
            }
        }
    }

    /// Move the move region to the other half of its reservation (keeping
    /// the vacated half reserved) and check some of its pages.
    fn remap(&mut self) {
        let from = self.mv.addr;
        let to = if from == self.reserve {
            self.reserve + MOVE_LEN
        } else {
            self.reserve
        };
        // SAFETY: moves our own mapping onto our own PROT_NONE placeholder
        // (MREMAP_FIXED replaces it); nothing else refers to either range.
        let r = unsafe {
            libc::mremap(
                from as *mut libc::c_void,
                MOVE_LEN,
                MOVE_LEN,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        if r == libc::MAP_FAILED || r as usize != to {
            let e = std::io::Error::last_os_error();
            die(&format!(
                "mremap {from:#x} -> {to:#x} failed: {e}; mappings around it:\n{}",
                maps_near(self.reserve, 2 * MOVE_LEN)
            ));
        }
        self.mv.addr = to;
        // Reserve the vacated half again, so that no other mapping lands
        // there before the region moves back.
        map_anon(
            from,
            MOVE_LEN,
            libc::PROT_NONE,
            libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
            "move placeholder",
        );
        self.remaps += 1;
        let mut x = splitmix(0x4e4e_0000 ^ self.remaps) | 1;
        for _ in 0..REMAP_CHECKS {
            let q = (xorshift(&mut x) % MOVE_PAGES as u64) as usize;
            if !self.mv.page_matches(q, move_word) {
                self.bad(format!("remap:{}:page:{q}", self.remaps));
            }
        }
    }

    /// Check the next unmap region, unmap it and map a fresh one there.
    fn unmap(&mut self) {
        let i = (self.unmaps % UNMAPS as u64) as usize;
        let first_round = self.unmaps < UNMAPS as u64;
        let r = Region {
            addr: self.unmap[i],
            pages: UNMAP_PAGES,
        };
        for q in 0..UNMAP_PAGES {
            let ok = if first_round {
                r.page_matches(q, |q, w| unmap_word(i, q, w))
            } else {
                r.page_matches(q, |_, _| 0)
            };
            if !ok {
                self.bad(format!("unmap:{i}:round:{}:page:{q}", self.unmaps));
            }
        }
        // SAFETY: unmaps our own region; nothing refers to it any more.
        if unsafe { libc::munmap(r.addr as *mut libc::c_void, UNMAP_LEN) } != 0 {
            die(&format!(
                "munmap of unmap region {i} failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        map_anon(
            r.addr,
            UNMAP_LEN,
            RW,
            libc::MAP_FIXED_NOREPLACE,
            "fresh unmap region",
        );
        self.unmaps += 1;
    }

    /// Check the drop region, MADV_DONTNEED it, check it reads zeros and
    /// write the next generation of its pattern.
    fn drop_pages(&mut self) {
        let d = self.drop;
        let g = self.drop_gen;
        for q in 0..DROP_PAGES {
            if !d.page_matches(q, |q, w| drop_word(g, q, w)) {
                self.bad(format!("drop:gen:{g}:page:{q}"));
            }
        }
        // SAFETY: discards the contents of our own private anonymous region.
        let r =
            unsafe { libc::madvise(d.addr as *mut libc::c_void, DROP_LEN, libc::MADV_DONTNEED) };
        if r != 0 {
            die(&format!(
                "madvise(MADV_DONTNEED) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        for q in 0..DROP_PAGES {
            if !d.page_matches(q, |_, _| 0) {
                self.bad(format!("drop:gen:{g}:not-zero:page:{q}"));
            }
        }
        self.drop_gen += 1;
        let g = self.drop_gen;
        d.fill(|q, w| drop_word(g, q, w));
        self.drops += 1;
    }

    /// Compare every page of the main and the move region; print the
    /// verdict.
    fn verify(&mut self, ready_sum: u64) {
        // SAFETY: the main region is mapped for the process's lifetime and
        // never written after it was filled.
        let sum = checksum(unsafe {
            std::slice::from_raw_parts(self.main.addr as *const u8, self.main.len())
        });
        let mut bad_pages = 0u64;
        for p in 0..self.main.pages {
            if !self.main.page_matches(p, main_word) {
                bad_pages += 1;
                if self.first_bad.is_none() {
                    self.first_bad = Some(format!("main:page:{p}"));
                }
            }
        }
        for q in 0..self.mv.pages {
            if !self.mv.page_matches(q, move_word) {
                bad_pages += 1;
                if self.first_bad.is_none() {
                    self.first_bad = Some(format!("move:page:{q}"));
                }
            }
        }
        let reader_bad = READER_BAD.load(Ordering::Relaxed);
        if reader_bad > 0 && self.first_bad.is_none() {
            let p = READER_FIRST_BAD.load(Ordering::Relaxed);
            self.first_bad = Some(format!("reader:page:{p}"));
        }
        let bad = reader_bad + self.event_bad + bad_pages;
        let ok = bad == 0 && self.fork_bad == 0 && sum == ready_sum;
        let mut line = format!(
            "verify {} checksum={sum:#x} pages={} checks={} bad={bad} forks={} fork_bad={} \
             remaps={} unmaps={} drops={} fork_lost={}",
            if ok { "ok" } else { "BAD" },
            self.main.pages + self.mv.pages,
            CHECKS.load(Ordering::Relaxed),
            self.forks,
            self.fork_bad,
            self.remaps,
            self.unmaps,
            self.drops,
            self.fork_lost,
        );
        if !ok {
            line.push_str(&format!(
                " expected_checksum={ready_sum:#x} first_bad={}",
                self.first_bad.as_deref().unwrap_or("none")
            ));
        }
        say(&line);
    }
}

fn main() {
    let mib: usize = arg_num(1, USAGE);
    let threads: usize = arg_num(2, USAGE);
    if mib == 0 {
        die("MIB must be at least 1");
    }
    let main = Region {
        addr: map_anon(0, mib << 20, RW, 0, "main region"),
        pages: (mib << 20) / PAGE,
    };
    for p in 0..main.pages {
        if p % HOLE_EVERY != HOLE_EVERY - 1 {
            for w in 0..WORDS {
                main.set_word(p, w, main_word(p, w));
            }
        }
    }

    let reserve = map_anon(
        0,
        2 * MOVE_LEN,
        libc::PROT_NONE,
        libc::MAP_NORESERVE,
        "move reservation",
    );
    let mv = Region {
        addr: map_anon(reserve, MOVE_LEN, RW, libc::MAP_FIXED, "move region"),
        pages: MOVE_PAGES,
    };
    mv.fill(move_word);

    let mut unmap = [0usize; UNMAPS];
    for (i, slot) in unmap.iter_mut().enumerate() {
        let r = Region {
            addr: map_anon(0, UNMAP_LEN, RW, 0, "unmap region"),
            pages: UNMAP_PAGES,
        };
        r.fill(|q, w| unmap_word(i, q, w));
        *slot = r.addr;
    }

    let drop = Region {
        addr: map_anon(0, DROP_LEN, RW, 0, "drop region"),
        pages: DROP_PAGES,
    };
    drop.fill(|q, w| drop_word(0, q, w));

    // SAFETY: the main region is mapped for the process's lifetime and
    // never written after this point.
    let ready_sum =
        checksum(unsafe { std::slice::from_raw_parts(main.addr as *const u8, main.len()) });

    install_sigusr1();
    for idx in 0..threads {
        let spawned = std::thread::Builder::new().spawn(move || reader(idx, main));
        if let Err(e) = spawned {
            die(&format!("cannot start reader thread {idx}: {e}"));
        }
    }
    say(&format!(
        "ready pid={} threads={threads} checksum={ready_sum:#x}",
        std::process::id()
    ));

    let mut st = State {
        main,
        reserve,
        mv,
        unmap,
        drop,
        drop_gen: 0,
        forks: 0,
        fork_bad: 0,
        fork_lost: 0,
        remaps: 0,
        unmaps: 0,
        drops: 0,
        event_bad: 0,
        first_bad: None,
    };
    let mut tick: u64 = 0;
    loop {
        tick += 1;
        say(&format!("tick {tick}"));
        match tick % 4 {
            1 => st.fork(),
            2 => st.remap(),
            3 => st.unmap(),
            _ => st.drop_pages(),
        }
        if take_sigusr1() {
            st.verify(ready_sum);
        }
        std::thread::sleep(TICK);
    }
}

/// The lines of /proc/self/maps that touch `[start - len, start + 2 len)`
/// (what an mremap failure is explained by).
fn maps_near(start: usize, len: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let (lo, hi) = (start.saturating_sub(len), start + 2 * len);
    maps.lines()
        .filter(|l| {
            let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap_or(0),
                usize::from_str_radix(b, 16).unwrap_or(0),
            );
            a < hi && b > lo
        })
        .collect::<Vec<_>>()
        .join("\n")
}
