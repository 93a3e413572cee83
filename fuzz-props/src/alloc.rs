//! A counting global allocator: how many bytes a decoder had allocated at
//! most while it ran, so that a property can check that decoding stays
//! within the bounds the format declares.
//!
//! A binary opts in with
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: ferry_fuzz_props::alloc::CountingAlloc = ferry_fuzz_props::alloc::CountingAlloc;
//! ```
//!
//! (every fuzz target and the corpus replay test do). The counters are per
//! thread, so tests running in parallel do not see each other's memory.
//! Memory that C code allocates with `malloc` (zstd's contexts) is not
//! counted; every buffer a decoder fills is Rust's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Bytes allocated and not yet freed by this thread.
    static LIVE: Cell<usize> = const { Cell::new(0) };
    /// Highest `LIVE` since the last [`measure`] began.
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    // Memory freed by another thread than the one that allocated it makes
    // this saturate at 0 rather than wrap.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

/// The system allocator, with per-thread counts of the bytes in use.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting around it touches only const-initialized thread locals without
// destructors (no allocation, no re-entry).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

/// True if this binary counts allocations ([`CountingAlloc`] is its global
/// allocator): only then does [`measure`] measure anything.
pub fn installed() -> bool {
    let before = LIVE.with(Cell::get);
    let b = std::hint::black_box(vec![0u8; 4096]);
    let during = LIVE.with(Cell::get);
    drop(b);
    during >= before + 4096
}

/// Runs `f` and returns its result and the most bytes this thread had
/// allocated at any moment during it, above what was in use before (0 if
/// [`CountingAlloc`] is not installed).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    let outer = PEAK.with(|p| p.replace(start));
    let r = f();
    let peak = PEAK.with(|p| p.replace(outer.max(p.get())));
    (r, peak.saturating_sub(start))
}

/// Panics if `f` allocated more than `bound` bytes at once (see [`measure`]).
pub fn bounded<R>(what: &str, bound: usize, f: impl FnOnce() -> R) -> R {
    let (r, peak) = measure(f);
    assert!(
        peak <= bound,
        "{what}: allocated {peak} bytes at its peak, more than its bound of {bound}"
    );
    r
}
