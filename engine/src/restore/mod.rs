//! Restore: rebuild a process from an image by remote control of a stub.

pub mod fds;
pub mod misc;
