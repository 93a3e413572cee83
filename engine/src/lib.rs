//! ferry's engine: checkpoint a running process into a [`ProcessImage`]
//! plus a page store, and restore one by remote control of a stub process.
//!
//! ```text
//!  checkpoint:  freeze ──► dump::{memory, threads, mm, fds, misc} ──► image dir
//!  restore:     image dir ──► restore::stub (clone3 set_tid, tear down)
//!               ──► restore::{memory, mm, fds, misc, threads} ──► detach
//! ```
//!
//! [`ProcessImage`]: ferry_protocol::model::ProcessImage

pub mod dump;
pub mod error;
pub mod facts;
pub mod freeze;
pub mod host;
pub mod lazy;
pub mod procfs;
pub mod regs;
pub mod restore;
#[cfg(test)]
mod testutil;
pub mod track;

pub use error::{Error, Result};
