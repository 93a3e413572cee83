//! Helpers shared by the workload programs and the integration tests
//! (included with `mod shared;` / `#[path]`, so it only uses std and libc).
#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// FNV-1a over little-endian 64-bit words (then the tail bytes one by one).
/// Fast enough for a few hundred MiB; the tests compute the same function
/// over memory they read with `process_vm_readv`.
pub fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

/// splitmix64: the deterministic pattern generator.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Byte `i` of the deterministic content of the data files the workloads
/// create (wl-files' input file, wl-memory's mapped file).
pub fn file_byte(i: usize) -> u8 {
    ((i * 7 + 3) % 251) as u8
}

/// Print one line to stdout and flush it; a workload whose stdout is broken
/// exits with status 3 (it cannot report anything any more).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(3);
    }
}

/// Print a message on stderr and exit with status 2.
pub fn die(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "workload error: {msg}");
    std::process::exit(2);
}

pub static SIGUSR1_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_sig: libc::c_int) {
    SIGUSR1_SEEN.store(true, Ordering::SeqCst);
}

/// Install `handler` for `sig` (SA_RESTART); `handler` must be
/// async-signal-safe.
pub fn on_signal(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a plain sigaction with an async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            die(&format!("sigaction({sig}) failed"));
        }
    }
}

/// Install a SIGUSR1 handler (SA_RESTART) that only sets `SIGUSR1_SEEN`.
pub fn install_sigusr1() {
    on_signal(libc::SIGUSR1, on_sigusr1);
}

/// True once per SIGUSR1 received (clears the flag).
pub fn take_sigusr1() -> bool {
    SIGUSR1_SEEN.swap(false, Ordering::SeqCst)
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Parse the single argument `name` as a number, or die with a usage message.
pub fn arg_num<T: std::str::FromStr>(pos: usize, usage: &str) -> T {
    match std::env::args().nth(pos).map(|a| a.parse::<T>()) {
        Some(Ok(v)) => v,
        _ => die(usage),
    }
}

/// Send one byte with `fd` attached (`SCM_RIGHTS`) on the unix socket
/// `over` (to its peer): a file descriptor in flight, which checkpoint
/// refuses.
pub fn send_fd_in_flight(over: std::os::fd::RawFd, fd: std::os::fd::RawFd) -> bool {
    let mut data = *b"f";
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut ctl = [0u64; 4];
    // SAFETY: a msghdr over live locals; one cmsg of one int fits in `ctl`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        libc::sendmsg(over, &msg, 0) == 1
    }
}
