//! Checkpoint: capture the state of a frozen process.

pub mod fds;
pub mod misc;
