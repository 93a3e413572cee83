//! Control of a foreign process: ptrace seize/interrupt/detach, registers,
//! remote system calls, and access to its memory.
//!
//! ```text
//!   ptrace::Tracee ── seize / interrupt / regs / xstate / sigmask / detach
//!        │
//!   remote::syscall ── run one system call inside a stopped thread by
//!        │             single-stepping a `syscall` instruction
//!   mem ── process_vm_readv/writev and /proc/PID/mem
//!   stub ── fork a paused child with a chosen PID (clone3 + set_tid)
//!   xsave ── this CPU's XSAVE size and features
//! ```
//!
//! Everything here is x86-64 Linux. Tracing must stay on one OS thread.

pub mod error;
pub mod mem;
pub mod ptrace;
pub mod remote;
pub mod stub;
pub mod xsave;

#[cfg(test)]
mod testutil;

pub use error::{Error, Result};
pub use ptrace::{Stop, Tracee};
