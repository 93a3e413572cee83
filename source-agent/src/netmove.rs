//! The source side of moving the service address with the process
//! (`ferry_engine::net` has the whole sequence):
//!
//! ```text
//!  plan        before anything is frozen: the local addresses of the tree's
//!              TCP/UDP sockets (/proc/PID/fd + /proc/PID/net/{tcp,udp}{,6});
//!              one that cannot move refuses the migration here
//!  hook        on the ptrace thread, right before the freeze: block TCP to
//!              and from the moving addresses and ports (nothing of a
//!              connection is acknowledged after its queues are read)
//!  take_off    after the dump: the addresses leave this host (NetMove)
//!  give_back   a failure before the destination runs: the addresses come
//!              back (and are announced) before the tree thaws
//!  unblock     after the tree thawed or was killed: the table goes
//! ```
//!
//! Every guard undoes its step when dropped, so a [`SourceNet`] dropped in
//! the middle of a failure leaves the host as it was.

use anyhow::{anyhow, Context, Result};
use ferry_engine::net::addr::{self, HostAddr, Removed};
use ferry_engine::net::block::{self, Block};
use ferry_protocol::wire::MovedAddr;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// A local endpoint of one of the tree's inet sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Local {
    addr: IpAddr,
    port: u16,
    tcp: bool,
}

/// What moves with the tree of one migration, and the guards of the steps
/// done so far.
pub struct SourceNet {
    pid: i32,
    moving: Vec<HostAddr>,
    ports: Vec<u16>,
    block: Arc<Mutex<Option<Block>>>,
    removed: Vec<Removed>,
}

/// The hook the ptrace thread runs right before the freeze.
pub type BeforeFreeze = Box<dyn FnOnce() -> Result<(), String> + Send>;

impl SourceNet {
    /// What must move for the tree of `pids` (root first): refuses, naming
    /// every address that cannot move and what to do, before anything is
    /// frozen.
    pub fn plan(pids: &[i32]) -> Result<SourceNet> {
        let root = *pids.first().ok_or_else(|| anyhow!("no process"))?;
        let locals = locals(pids)?;
        let addrs: Vec<IpAddr> = locals.iter().map(|l| l.addr).collect();
        let moving =
            addr::movable(&addrs).map_err(|e| anyhow!("{e} (process {root} was not touched)"))?;
        let mut ports: Vec<u16> = locals
            .iter()
            .filter(|l| l.tcp && moving.iter().any(|h| h.addr == canonical(l.addr)))
            .map(|l| l.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(SourceNet {
            pid: root,
            moving,
            ports,
            block: Arc::default(),
            removed: Vec::new(),
        })
    }

    /// True if no address moves.
    pub fn is_empty(&self) -> bool {
        self.moving.is_empty()
    }

    /// The moving addresses, for the report (`ADDR/PLEN on DEV`).
    pub fn moved(&self) -> Vec<String> {
        self.moving.iter().map(ToString::to_string).collect()
    }

    /// The hook that blocks the moving addresses' TCP in this network
    /// namespace (run right before the freeze; nothing when nothing moves).
    pub fn before_freeze(&self) -> BeforeFreeze {
        let addrs: Vec<IpAddr> = self.moving.iter().map(|h| h.addr).collect();
        let ports = self.ports.clone();
        let slot = self.block.clone();
        let tag = format!("src_{}", self.pid);
        Box::new(move || {
            if addrs.is_empty() {
                return Ok(());
            }
            let b = block::install(&tag, &addrs, &ports)
                .map_err(|e| format!("blocking the service address before the freeze: {e}"))?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
            Ok(())
        })
    }

    /// After the dump: take the addresses off this host; what the
    /// destination must put on (`NetMove`).
    pub fn take_off(&mut self) -> Result<Vec<MovedAddr>> {
        for h in &self.moving {
            let r = addr::remove(h).with_context(|| format!("taking {h} off this host"))?;
            self.removed.push(r);
        }
        Ok(self
            .moving
            .iter()
            .map(|h| MovedAddr {
                addr: h.addr,
                prefix_len: h.prefix_len,
            })
            .collect())
    }

    /// A failure before the destination runs the process: the addresses
    /// come back here (announced), before the tree thaws.
    pub fn give_back(&mut self) {
        for r in self.removed.drain(..) {
            let what = r.addr().to_string();
            if let Err(e) = r.restore() {
                tracing::error!("could not put back {what}: {e}");
            }
        }
    }

    /// The tree thawed or is gone: delete the block.
    pub fn unblock(&mut self) {
        let b = self.block.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(b) = b {
            let table = b.table().to_string();
            if let Err(e) = b.remove() {
                tracing::error!("could not delete table {table}: {e}");
            }
        }
    }

    /// The destination runs the process: the addresses stay there.
    pub fn commit(&mut self) {
        for r in self.removed.drain(..) {
            r.commit();
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// The local endpoints of the inet sockets open in `pids` (their fds), read
/// from the root's network namespace without stopping anything.
fn locals(pids: &[i32]) -> Result<Vec<Local>> {
    let mut inodes = HashSet::new();
    for &p in pids {
        let dir = format!("/proc/{p}/fd");
        // A process that exited meanwhile has no sockets to move.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            if let Some(ino) = socket_inode(&link.to_string_lossy()) {
                inodes.insert(ino);
            }
        }
    }
    let root = pids[0];
    let mut out = Vec::new();
    for (file, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        let path = format!("/proc/{root}/net/{file}");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // No IPv6 in this kernel or namespace: nothing to find there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!(e).context(format!("reading {path}"))),
        };
        for (addr, port, ino) in parse_table(&text) {
            if inodes.contains(&ino) {
                out.push(Local { addr, port, tcp });
            }
        }
    }
    Ok(out)
}

/// `socket:[INODE]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// (local address, local port, inode) of each row of /proc/net/{tcp,udp}{,6}.
fn parse_table(text: &str) -> Vec<(IpAddr, u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (a, p) = f.get(1)?.split_once(':')?;
            let ino = f.get(9)?.parse().ok()?;
            Some((parse_addr(a)?, u16::from_str_radix(p, 16).ok()?, ino))
        })
        .collect()
}

/// An address as /proc/net prints it: 32-bit words in host byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_rows_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 640012C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_table(v4),
            vec![("198.18.0.100".parse().unwrap(), 8080, 12345)]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 02000120010000000000000000010000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        assert_eq!(
            parse_table(v6),
            vec![("2001:2:0:1::100".parse().unwrap(), 8080, 777)]
        );
        assert_eq!(socket_inode("socket:[42]"), Some(42));
        assert_eq!(socket_inode("pipe:[42]"), None);
        assert_eq!(
            canonical("::ffff:198.18.0.100".parse().unwrap()),
            "198.18.0.100".parse::<IpAddr>().unwrap()
        );
    }
}
