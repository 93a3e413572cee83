//! wl-memory MIB [DIR]: fills MIB MiB of memory with a deterministic pattern
//! (half in a heap `Vec`, half in an anonymous mmap whose every 8th page is
//! left untouched), dirties a private mapping of a file it creates in DIR
//! (default: the temp dir) and a page of a `.data` static, then ticks every
//! ~20 ms. On SIGUSR1 it re-checks all of it and prints `verify ok ...` or
//! `verify BAD ...`.
mod shared;

use shared::{checksum, die, file_byte, say, splitmix};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const PAGE: usize = 4096;
const DATA_WORDS: usize = 1024; // 8 KiB: two pages of .data
const DATA_INIT: u64 = 0x0123_4567_89ab_cdef;
/// Non-zero initialiser: lives in `.data` (a private file-backed mapping).
static DATA: [AtomicU64; DATA_WORDS] = [const { AtomicU64::new(DATA_INIT) }; DATA_WORDS];
const DATA_DIRTY: usize = 256; // words 0..256 are rewritten (first page only)
const FILE_PAGES: usize = 4;
const FILE_DIRTY_PAGE: usize = 1;

fn fill_anon(region: &mut [u8], seed: u64) {
    for (p, page) in region.chunks_mut(PAGE).enumerate() {
        if p % 8 == 7 {
            continue; // left untouched: a hole (never populated)
        }
        for (w, word) in page.chunks_exact_mut(8).enumerate() {
            let v = splitmix(seed ^ ((p * PAGE / 8 + w) as u64));
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn fill_heap(region: &mut [u8], seed: u64) {
    for (p, page) in region.chunks_mut(PAGE).enumerate() {
        if p % 8 == 3 {
            page.fill(0); // populated, but zero
            continue;
        }
        for (w, word) in page.chunks_exact_mut(8).enumerate() {
            let v = splitmix(seed ^ ((p * PAGE / 8 + w) as u64));
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn data_expected(i: usize) -> u64 {
    if i < DATA_DIRTY {
        splitmix(i as u64 + 77)
    } else {
        DATA_INIT
    }
}

fn file_expected(page: usize, off: usize) -> u8 {
    if page == FILE_DIRTY_PAGE {
        (splitmix((page * PAGE + off) as u64) & 0xff) as u8
    } else {
        file_byte(page * PAGE + off)
    }
}

/// Creates DIR/wl-memory-PID.dat, maps it MAP_PRIVATE and rewrites one page.
fn map_private_file(dir: &str) -> &'static mut [u8] {
    let path = format!("{dir}/wl-memory-{}.dat", std::process::id());
    let content: Vec<u8> = (0..FILE_PAGES * PAGE).map(file_byte).collect();
    if let Err(e) = std::fs::write(&path, &content) {
        die(&format!("cannot write {path}: {e}"));
    }
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => die(&format!("cannot open {path}: {e}")),
    };
    use std::os::fd::AsRawFd;
    // SAFETY: mapping a file we just created; the mapping is private and
    // stays valid after the fd is closed.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            FILE_PAGES * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        die("mmap of the data file failed");
    }
    // SAFETY: the mapping is FILE_PAGES*PAGE bytes and never unmapped.
    let map = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, FILE_PAGES * PAGE) };
    for off in 0..PAGE {
        map[FILE_DIRTY_PAGE * PAGE + off] = file_expected(FILE_DIRTY_PAGE, off);
    }
    map
}

fn main() {
    let mib: usize = shared::arg_num(1, "usage: wl-memory MIB [DIR]");
    if mib == 0 {
        die("MIB must be at least 1");
    }
    let dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| std::env::temp_dir().to_string_lossy().into_owned());
    let total = mib * 1024 * 1024;
    let heap_len = (total / 2) & !(PAGE - 1);
    let anon_len = total - heap_len;

    // Keep the heap Vec in the brk heap when it fits under glibc's maximum
    // mmap threshold (32 MiB on 64-bit); larger ones fall back to mmap.
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let mut heap: Vec<u8> = vec![1u8; heap_len];
    fill_heap(&mut heap, 0xfeed);

    // SAFETY: a fresh private anonymous mapping, never unmapped.
    let anon_ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            anon_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if anon_ptr == libc::MAP_FAILED {
        die("anonymous mmap failed");
    }
    // SAFETY: the mapping is anon_len bytes long and lives until exit.
    let anon = unsafe { std::slice::from_raw_parts_mut(anon_ptr as *mut u8, anon_len) };
    fill_anon(anon, 0xbeef);

    let file_map = map_private_file(&dir);
    for (i, w) in DATA.iter().enumerate().take(DATA_DIRTY) {
        w.store(data_expected(i), Ordering::Relaxed);
    }

    let anon_sum = checksum(anon);
    let heap_sum = checksum(&heap);
    shared::install_sigusr1();
    say(&format!(
        "ready pid={} addr={:#x} len={} checksum={:#x} heap_addr={:#x} heap_len={} heap_checksum={:#x}",
        std::process::id(),
        anon.as_ptr() as usize,
        anon_len,
        anon_sum,
        heap.as_ptr() as usize,
        heap_len,
        heap_sum
    ));

    let mut counter: u64 = 0;
    loop {
        counter += 1;
        say(&format!("tick {counter}"));
        if shared::take_sigusr1() {
            let mut bad = Vec::new();
            let a = checksum(anon);
            if a != anon_sum {
                bad.push(format!("anon checksum={a:#x} expected={anon_sum:#x}"));
            }
            let h = checksum(&heap);
            if h != heap_sum {
                bad.push(format!("heap checksum={h:#x} expected={heap_sum:#x}"));
            }
            let mut fresh = vec![0u8; anon.len().min(PAGE * 16)];
            fill_anon(&mut fresh, 0xbeef);
            if anon[..fresh.len()] != fresh[..] {
                bad.push("anon pattern differs in the first 16 pages".to_string());
            }
            for page in 0..FILE_PAGES {
                if (0..PAGE).any(|o| file_map[page * PAGE + o] != file_expected(page, o)) {
                    bad.push(format!("file mapping page {page} differs"));
                }
            }
            if let Some(i) =
                (0..DATA_WORDS).find(|&i| DATA[i].load(Ordering::Relaxed) != data_expected(i))
            {
                bad.push(format!(".data word {i} differs"));
            }
            if bad.is_empty() {
                say(&format!(
                    "verify ok checksum={a:#x} heap_checksum={h:#x} counter={counter}"
                ));
            } else {
                say(&format!("verify BAD {} counter={counter}", bad.join("; ")));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
