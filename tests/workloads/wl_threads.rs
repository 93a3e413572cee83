//! wl-threads: 8 worker threads. Each loads a pattern of its own into
//! ymm8..ymm11 and r12 once, then loops forever inside one `asm!` block:
//! compare the registers with the pattern in memory (vxorps/vorps/vptest),
//! count a mismatch, increment its counter, sleep 1 ms with a raw
//! `nanosleep` syscall (the kernel preserves vector registers across system
//! calls). The registers are never touched by anything else, so they only
//! change if the checkpoint/restore loses them. The main thread prints
//! `ready pid=P tids=...` and then every 100 ms one line per worker:
//! `thread I tid=T count=N regs=ok|BAD`.
mod shared;

use shared::{die, say};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const THREADS: usize = 8;

/// Shared between a worker and the main thread; offsets are fixed because
/// the asm addresses the fields directly.
#[repr(C, align(64))]
struct Slot {
    pattern: [u64; 16],    // 0: ymm8, 32: ymm9, 64: ymm10, 96: ymm11
    count: AtomicU64,      // 128
    bad: AtomicU64,        // 136
    gp_magic: u64,         // 144: expected value of r12
    _pad: u64,             // 152
    sleep: libc::timespec, // 160: 1 ms
    tid: AtomicI32,
}

const _: () = {
    assert!(std::mem::offset_of!(Slot, count) == 128);
    assert!(std::mem::offset_of!(Slot, bad) == 136);
    assert!(std::mem::offset_of!(Slot, gp_magic) == 144);
    assert!(std::mem::offset_of!(Slot, sleep) == 160);
};

impl Slot {
    fn new(i: usize) -> Slot {
        let mut pattern = [0u64; 16];
        for (k, p) in pattern.iter_mut().enumerate() {
            *p = shared::splitmix(((i as u64) << 8) | k as u64);
        }
        Slot {
            pattern,
            count: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            gp_magic: shared::splitmix(0xabc0 + i as u64),
            _pad: 0,
            sleep: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            },
            tid: AtomicI32::new(0),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn spin(slot: &Slot) -> ! {
    // SAFETY: the asm only reads `slot` and updates its atomic counters with
    // locked instructions; it never returns, so clobbering registers is fine.
    unsafe {
        std::arch::asm!(
            "mov r13, {slot}",
            "vmovdqu ymm8, [r13]",
            "vmovdqu ymm9, [r13 + 32]",
            "vmovdqu ymm10, [r13 + 64]",
            "vmovdqu ymm11, [r13 + 96]",
            "mov r12, [r13 + 144]",
            "2:",
            "vxorps ymm0, ymm8, [r13]",
            "vxorps ymm1, ymm9, [r13 + 32]",
            "vorps ymm0, ymm0, ymm1",
            "vxorps ymm1, ymm10, [r13 + 64]",
            "vorps ymm0, ymm0, ymm1",
            "vxorps ymm1, ymm11, [r13 + 96]",
            "vorps ymm0, ymm0, ymm1",
            "vptest ymm0, ymm0",
            "jz 3f",
            "lock inc qword ptr [r13 + 136]",
            "3:",
            "cmp r12, [r13 + 144]",
            "je 4f",
            "lock inc qword ptr [r13 + 136]",
            "4:",
            "lock inc qword ptr [r13 + 128]",
            "mov eax, 35", // SYS_nanosleep
            "lea rdi, [r13 + 160]",
            "xor esi, esi",
            "syscall",
            "jmp 2b",
            slot = in(reg) slot as *const Slot,
            options(noreturn)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn spin(_slot: &Slot) -> ! {
    die("wl-threads needs x86-64");
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if !is_x86_feature_detected!("avx") {
        die("wl-threads needs AVX");
    }
    #[cfg(not(target_arch = "x86_64"))]
    die("wl-threads needs x86-64");

    let slots: Vec<Arc<Slot>> = (0..THREADS).map(|i| Arc::new(Slot::new(i))).collect();
    for slot in &slots {
        let slot = Arc::clone(slot);
        let spawned = std::thread::Builder::new().spawn(move || {
            slot.tid.store(shared::gettid(), Ordering::SeqCst);
            spin(&slot)
        });
        if spawned.is_err() {
            die("cannot spawn a thread");
        }
    }
    // Wait until every worker has published its TID and started counting.
    for _ in 0..1000 {
        if slots
            .iter()
            .all(|s| s.tid.load(Ordering::SeqCst) != 0 && s.count.load(Ordering::SeqCst) > 0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let tids: Vec<String> = slots
        .iter()
        .map(|s| s.tid.load(Ordering::SeqCst).to_string())
        .collect();
    if tids.iter().any(|t| t == "0") {
        die("workers did not start");
    }
    say(&format!(
        "ready pid={} tids={}",
        std::process::id(),
        tids.join(",")
    ));
    loop {
        for (i, s) in slots.iter().enumerate() {
            let regs = if s.bad.load(Ordering::SeqCst) == 0 {
                "ok"
            } else {
                "BAD"
            };
            say(&format!(
                "thread {i} tid={} count={} regs={regs}",
                s.tid.load(Ordering::SeqCst),
                s.count.load(Ordering::SeqCst)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
