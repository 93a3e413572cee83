//! ferry's destination agent, and the stop-and-copy control protocol it
//! speaks with `migrate --to` ([`link`]).
//!
//! This is the first slice of issue 3: a migration is stop-and-copy (the
//! source freezes the process, writes its image and sends the two image files
//! on the control stream). The messages live here, private to the two agents,
//! until they move to `ferry_protocol::wire` with the pre-copy protocol.

pub mod link;
