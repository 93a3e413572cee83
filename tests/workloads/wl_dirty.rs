//! wl-dirty MIB RATE: fills MIB MiB of anonymous memory with a pattern,
//! then dirties it at RATE MB/s (0: only ticks) from its main loop, which
//! runs about every millisecond. Every ~100 ms it prints
//! `tick N gap_max_us=G`: the longest wall-clock gap between two loop
//! iterations in that window — a stall of the process (a freeze for
//! migration) shows up there. On SIGUSR1 it checks that every page holds
//! exactly what it wrote (pattern plus the last stamp it recorded for the
//! page) and prints `verify ok pages=N writes=W` or `verify BAD ...`.
mod shared;

use shared::{arg_num, die, install_sigusr1, say, splitmix, take_sigusr1};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: usize = 4096;
const USAGE: &str = "usage: wl-dirty MIB RATE_MB_PER_S";

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The page's contents apart from its first 8 bytes (the stamp).
fn pattern_word(page: usize, word: usize) -> u64 {
    splitmix(((page as u64) << 12) ^ word as u64 ^ 0x5eed)
}

fn main() {
    let mib: usize = arg_num(1, USAGE);
    let rate_mb: f64 = arg_num(2, USAGE);
    if mib == 0 {
        die(USAGE);
    }
    install_sigusr1();
    let pages = mib * 1024 * 1024 / PAGE;
    let mut mem = vec![0u8; pages * PAGE];
    // stamp[p]: what the first 8 bytes of page p hold (0: never written).
    let mut stamp = vec![0u64; pages];
    for (p, page) in mem.chunks_mut(PAGE).enumerate() {
        for (w, word) in page.chunks_exact_mut(8).enumerate().skip(1) {
            word.copy_from_slice(&pattern_word(p, w).to_le_bytes());
        }
    }
    say(&format!(
        "ready pid={} pages={pages} rate_mb={rate_mb}",
        std::process::id()
    ));
    let pages_per_s = rate_mb * 1e6 / PAGE as f64;
    let start = Instant::now();
    let mut written = 0u64;
    let mut cursor = 0usize;
    let mut tick = 0u64;
    let mut last = wall_us();
    let mut gap_max = 0u64;
    let mut window = Instant::now();
    loop {
        let now = wall_us();
        gap_max = gap_max.max(now.saturating_sub(last));
        last = now;
        // Catch up to the target number of page writes.
        let due = (start.elapsed().as_secs_f64() * pages_per_s) as u64;
        while written < due {
            // A stride that visits every page, in a scattered order.
            cursor = (cursor + 7919) % pages;
            written += 1;
            stamp[cursor] = written;
            mem[cursor * PAGE..cursor * PAGE + 8].copy_from_slice(&written.to_le_bytes());
        }
        if window.elapsed() >= Duration::from_millis(100) {
            tick += 1;
            say(&format!("tick {tick} gap_max_us={gap_max}"));
            gap_max = 0;
            window = Instant::now();
            last = wall_us();
        }
        if take_sigusr1() {
            let mut bad = None;
            'pages: for (p, page) in mem.chunks(PAGE).enumerate() {
                let first = u64::from_le_bytes(page[..8].try_into().unwrap_or_default());
                if first != stamp[p] {
                    bad = Some(format!("page {p} stamp {first} expected {}", stamp[p]));
                    break;
                }
                for (w, word) in page.chunks_exact(8).enumerate().skip(1) {
                    let v = u64::from_le_bytes(word.try_into().unwrap_or_default());
                    if v != pattern_word(p, w) {
                        bad = Some(format!("page {p} word {w}"));
                        break 'pages;
                    }
                }
            }
            match bad {
                None => say(&format!("verify ok pages={pages} writes={written}")),
                Some(b) => say(&format!("verify BAD {b}")),
            }
            last = wall_us();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
