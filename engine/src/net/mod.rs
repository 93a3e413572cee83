//! The network around a migration: the service address moves with the
//! process, and nothing answers its connections with a reset meanwhile.
//!
//! ```text
//!  source (A)                                  destination (B)
//!  addr::classify(local addrs of sockets)
//!    refuse before the freeze if one cannot move
//!  block::Block::install(addr, ports)          block::Block::install(addr, ports)
//!  freeze, dump (sockets in repair mode)
//!  addr::remove(addr) ──► Removed guard ──────► addr::add(addr, plen, dev)
//!                                                ──► Added guard
//!                                              sockets leave repair mode
//!                                              announce::announce(addr, dev)
//!  Removed::commit, Block::remove              Added::commit, Block::remove
//! ```
//!
//! Every step is undone by its guard when dropped uncommitted: a removed
//! address goes back on A (and A announces it again), an added one leaves
//! B, a block's table is deleted. [`block::cleanup`] removes a table of
//! ours that a crashed agent left.
//!
//! Each function acts in the network namespace of the calling thread; the
//! guards keep what they need to act in the namespace they were made in
//! (a netlink socket, an open namespace fd), wherever they are dropped.

pub mod addr;
pub mod announce;
pub mod block;
mod rtnl;
mod sys;

use std::net::IpAddr;

/// What went wrong with the network side of a migration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {what}: unexpected answer: {detail}")]
    NetlinkAnswer { what: String, detail: String },
    #[error("{}", addr::refusals_message(.0))]
    NotMovable(Vec<addr::Refused>),
    #[error("no interface of this host has a subnet containing {addr}: name the interface to put it on (dest-agent --addr-dev DEV)")]
    NoSubnet { addr: IpAddr },
    #[error("no network interface named {dev:?} on this host")]
    NoSuchDevice { dev: String },
    #[error("{addr} is already an address of this host (on {dev}): it cannot be moved here while something else uses it")]
    AlreadyHere { addr: IpAddr, dev: String },
    #[error("{addr} is not an address of this host")]
    NotHere { addr: IpAddr },
    #[error("announce {addr} on {dev}: {source}")]
    Announce {
        addr: IpAddr,
        dev: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the `nft` program (package nftables) is needed to block traffic during a migration and was not found: install it (apt-get install nftables)")]
    NftMissing,
    #[error("nft {what}: {detail}")]
    Nft { what: String, detail: String },
    #[error("network namespace of this thread: {0}")]
    Namespace(#[source] std::io::Error),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// The network namespace of the calling thread, kept open.
fn this_netns() -> Result<std::fs::File> {
    std::fs::File::open("/proc/thread-self/ns/net").map_err(NetError::Namespace)
}

/// Run `f` on a thread in network namespace `ns`.
fn in_netns<T: Send>(ns: &std::fs::File, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            sys::setns_net(ns).map_err(NetError::Namespace)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Namespace(std::io::Error::other(
                "the thread panicked",
            )))
        })
    })
}
