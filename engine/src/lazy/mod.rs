//! Lazy pages (post-copy): the process runs on the destination before all
//! of its memory has arrived; missing pages are fetched on fault through a
//! userfaultfd while the rest is pushed in the background.
//!
//! * [`plan`]: the source's split at the switchover (eager pages, owed spans).
//! * [`uffd`]: the destination's userfaultfd of the restored process.
//! * [`owed`]: which pages of an address space the source still owes.
//! * [`pager`]: faults, events and arriving pages on the destination.

pub mod owed;
pub mod pager;
pub mod plan;
pub mod uffd;
