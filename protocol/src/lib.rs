//! `ferry-protocol`: the data ferry moves around, independent of how it is
//! captured or restored.
//!
//! - [`model`]: the image model, everything ferry records about a process
//!   tree (processes with their address space layout, threads, fds and
//!   process-wide state, over the open files, pipes and shared memory they
//!   share by id), and
//!   [`validate`]: the invariants every image must satisfy before it is used.
//! - [`image`]: the process image file (`process.img`), a versioned,
//!   checksummed container for a [`model::TreeImage`].
//! - [`pages`]: the page store, memory contents keyed by virtual address,
//!   zstd-compressed in batches with zero pages stored as markers; its batch
//!   codec is meant to be reused on the wire.
//!
//! - [`wire`]: the wire protocol between the source and destination agents
//!   (messages, framing, versioning), reusing the same validation.
//!
//! Nothing read from outside (a file, the network) is trusted: every length
//! is bounded, every checksum verified, and decoding never panics.

pub mod compress;
pub mod image;
pub mod model;
pub mod net;
pub mod packer;
pub mod pages;
pub mod unix;
pub mod validate;
pub mod wire;

pub use image::{read_tree_image, write_tree_image, ImageError};
pub use pages::{PageBatch, PageError, PageReader, PageRun, PageSpace, PageStats, PageWriter};
pub use validate::ValidationError;
