//! The destination side of moving the service address with the process
//! (`ferry_engine::net` has the whole sequence):
//!
//! ```text
//!  NetMove      the addresses the source took off (kept until Switchover)
//!  Switchover   block TCP to and from them, then put them on (the interface
//!               whose subnet contains each, or `--addr-dev DEV`): nothing
//!               here answers the peers before the sockets exist
//!  restore      the sockets come back and leave repair mode (behind the block)
//!  running      announce the addresses, delete the block, keep them
//! ```
//!
//! A failure before that (or the session dropped) removes the addresses and
//! the block again: the guards of `ferry_engine::net` undo on drop.

use anyhow::{Context, Result};
use ferry_engine::net::addr::{self, Added};
use ferry_engine::net::block::{self, Block};
use ferry_protocol::wire::MovedAddr;
use std::net::IpAddr;

/// The network of one migration on this side.
#[derive(Default)]
pub struct DestNet {
    expected: Vec<MovedAddr>,
    block: Option<Block>,
    added: Vec<Added>,
}

impl DestNet {
    /// `NetMove`: these addresses come with the process.
    pub fn expect(&mut self, addrs: Vec<MovedAddr>) {
        self.expected = addrs;
    }

    /// `Switchover` of process `pid`: block, then put the addresses on
    /// (`dev` when named).
    pub fn arrive(&mut self, pid: i32, dev: Option<&str>) -> Result<()> {
        if self.expected.is_empty() {
            return Ok(());
        }
        let addrs: Vec<IpAddr> = self.expected.iter().map(|m| m.addr).collect();
        // Every port: the address is new here, nothing else uses it yet.
        let b = block::install(&format!("dst_{pid}"), &addrs, &[])
            .context("blocking the service address until the process runs")?;
        self.block = Some(b);
        for m in &self.expected {
            let a = addr::add(m.addr, m.prefix_len, dev)
                .with_context(|| format!("putting {}/{} on this host", m.addr, m.prefix_len))?;
            self.added.push(a);
        }
        Ok(())
    }

    /// The process runs: tell the neighbours, let the peers through, keep
    /// the addresses.
    pub fn open(&mut self) {
        for a in &self.added {
            if let Err(e) = a.announce() {
                // The neighbours find it when their entry goes stale.
                tracing::warn!("{e}");
            }
        }
        if let Some(b) = self.block.take() {
            if let Err(e) = b.remove() {
                tracing::error!("{e}");
            }
        }
        for a in self.added.drain(..) {
            tracing::info!("{} moved here", a.addr());
            a.commit();
        }
    }
}
