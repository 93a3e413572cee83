//! ferry's engine: checkpoint a running process tree into a [`TreeImage`]
//! plus page stores, and restore one by remote control of stub processes.
//!
//! ```text
//!  checkpoint:  dump::tree (freeze root, then children) ──► per process
//!               dump::{memory, threads, mm, misc} + files + shmem ──► image dir
//!  restore:     image dir ──► restore::stub (clone3 set_tid, tear down)
//!               ──► restore::tree (fork children, sessions, zombies)
//!               ──► per process restore::{memory, mm, misc, threads} + files
//!               + shmem ──► detach
//! ```
//!
//! Kinds of shared object keep dump and restore side by side: [`files`]
//! (open file descriptions: regular files, pipes, stdio reaching outside)
//! and [`shmem`] (shared anonymous memory, memfd, POSIX and SysV).
//! [`net`] is the network around a migration: the service address that
//! moves with the process, and the block that keeps resets away meanwhile.
//!
//! [`TreeImage`]: ferry_protocol::model::TreeImage

pub mod dump;
pub mod error;
pub mod facts;
pub mod files;
pub mod freeze;
pub mod host;
pub mod lazy;
pub mod net;
pub mod procfs;
pub mod regs;
pub mod restore;
pub mod shmem;
#[cfg(test)]
mod testutil;
pub mod track;

pub use error::{Error, Result};
