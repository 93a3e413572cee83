//! The service address moves with the process: which local addresses of a
//! process's sockets can move ([`classify`], [`movable`]), taking one off
//! this host ([`remove`]) and putting it on another ([`add`]), each undone by
//! its guard unless committed.
//!
//! What can move: an address that is not the host's own. For IPv4 that is a
//! *secondary* address (IFA_F_SECONDARY: the kernel marks every address
//! added to an interface after the first one of the same subnet), so the
//! host keeps its primary address of that subnet. For IPv6, which has no
//! secondary addresses, a static (IFA_F_PERMANENT) global address on an
//! interface that has another static global address, which stays. What
//! cannot: loopback addresses, the primary or only address of an interface
//! (removing an IPv4 primary would also take the subnet's secondaries
//! with it), link-local and dynamic (SLAAC, DHCPv6, temporary) IPv6
//! addresses, and addresses this host does not have. A wildcard address
//! (a listener on 0.0.0.0 or ::) needs nothing moved.

use super::rtnl::{IfAddr, Link, Rtnl};
use super::{announce, in_netns, this_netns, NetError, Result};
use netlink_packet_route::address::{AddressFlags, AddressScope};
use std::fmt;
use std::fs::File;
use std::net::IpAddr;

/// An address of this host: where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Interface name and index.
    pub dev: String,
    pub index: u32,
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.addr, self.prefix_len, self.dev)
    }
}

/// Why an address cannot move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// 127.0.0.0/8, ::1, or an address on a loopback interface.
    Loopback,
    /// The first (primary) address of its subnet on `dev`.
    Primary { dev: String, prefix_len: u8 },
    /// The only address of its family on `dev`.
    Only { dev: String },
    /// An IPv6 link-local address.
    LinkLocal { dev: String },
    /// An IPv6 address the kernel configured (SLAAC, DHCPv6, temporary).
    Dynamic { dev: String },
    /// Not an address of this host.
    NotHere,
}

/// An address that cannot move, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub addr: IpAddr,
    pub why: Why,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.addr;
        match &self.why {
            Why::Loopback => write!(
                f,
                "{a} is a loopback address: every host has its own, so a connection on it can only move with both of its ends"
            ),
            Why::Primary { dev, prefix_len } => write!(
                f,
                "{a} is the primary address of its subnet {a}/{prefix_len} on {dev}, the host's own address: removing it would cut the host off (and take the subnet's secondary addresses with it)"
            ),
            Why::Only { dev } => write!(
                f,
                "{a} is the only address of its kind on {dev}: it is the host's own and cannot leave it"
            ),
            Why::LinkLocal { dev } => write!(
                f,
                "{a} is a link-local address of {dev}: it belongs to the interface, not to a service"
            ),
            Why::Dynamic { dev } => write!(
                f,
                "{a} on {dev} was configured by the kernel (SLAAC, DHCPv6 or a temporary address), not by hand: the host would configure it again"
            ),
            Why::NotHere => write!(f, "{a} is not an address of this host"),
        }
    }
}

/// The message of [`NetError::NotMovable`]: every refusal, and what to do.
pub fn refusals_message(refused: &[Refused]) -> String {
    let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
    format!(
        "the process's connections use addresses that cannot move with it: {}. Give the service an address of its own (a secondary address on the interface, e.g. `ip addr add ADDR/PLEN dev DEV`) and have it use that, or migrate with --drop-connections (connections are closed, listeners kept)",
        list.join("; ")
    )
}

/// What a migration does with one local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A floating address: it moves.
    Move(HostAddr),
    /// 0.0.0.0 or ::: nothing to move (the destination has it too).
    Wildcard,
    /// It cannot move.
    Refuse(Refused),
}

/// IPv4-mapped IPv6 addresses (an AF_INET6 socket talking IPv4) as IPv4.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `addr` is in `net`/`prefix_len`.
fn contains(net: IpAddr, prefix_len: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn link_of(links: &[Link], index: u32) -> Option<&Link> {
    links.iter().find(|l| l.index == index)
}

fn dev_name(links: &[Link], index: u32) -> String {
    link_of(links, index).map_or_else(|| format!("interface #{index}"), |l| l.name.clone())
}

/// The verdict on one address, from the host's addresses and links.
fn judge(addr: IpAddr, all: &[IfAddr], links: &[Link]) -> Verdict {
    let refuse = |why| Verdict::Refuse(Refused { addr, why });
    if addr.is_unspecified() {
        return Verdict::Wildcard;
    }
    if addr.is_loopback() {
        return refuse(Why::Loopback);
    }
    let Some(here) = all.iter().find(|a| a.addr == addr) else {
        return refuse(Why::NotHere);
    };
    let dev = dev_name(links, here.index);
    if link_of(links, here.index).is_some_and(|l| l.loopback) {
        return refuse(Why::Loopback);
    }
    let host = HostAddr {
        addr,
        prefix_len: here.prefix_len,
        dev: dev.clone(),
        index: here.index,
    };
    let same_dev_family =
        |a: &&IfAddr| a.index == here.index && a.addr != addr && a.addr.is_ipv4() == addr.is_ipv4();
    match addr {
        IpAddr::V4(_) => {
            if here.flags.contains(AddressFlags::Secondary) {
                Verdict::Move(host)
            } else if all.iter().any(|a| same_dev_family(&a)) {
                refuse(Why::Primary {
                    dev,
                    prefix_len: here.prefix_len,
                })
            } else {
                refuse(Why::Only { dev })
            }
        }
        IpAddr::V6(_) => {
            if here.scope == AddressScope::Link {
                return refuse(Why::LinkLocal { dev });
            }
            if !here.flags.contains(AddressFlags::Permanent) {
                return refuse(Why::Dynamic { dev });
            }
            let stays = all.iter().filter(same_dev_family).any(|a| {
                a.scope == AddressScope::Universe && a.flags.contains(AddressFlags::Permanent)
            });
            if stays {
                Verdict::Move(host)
            } else {
                refuse(Why::Only { dev })
            }
        }
    }
}

/// The verdict on each of `addrs` (the local addresses of a process's
/// sockets), in order, without repeats (IPv4-mapped addresses as IPv4).
pub fn classify(addrs: &[IpAddr]) -> Result<Vec<(IpAddr, Verdict)>> {
    let mut rtnl = Rtnl::open()?;
    let all = rtnl.addresses()?;
    let links = rtnl.links()?;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for &a in addrs {
        let a = canonical(a);
        if seen.contains(&a) {
            continue;
        }
        seen.push(a);
        out.push((a, judge(a, &all, &links)));
    }
    Ok(out)
}

/// The addresses among `addrs` that must move, or [`NetError::NotMovable`]
/// naming every one that cannot (and what to do).
pub fn movable(addrs: &[IpAddr]) -> Result<Vec<HostAddr>> {
    let mut moving = Vec::new();
    let mut refused = Vec::new();
    for (_, v) in classify(addrs)? {
        match v {
            Verdict::Move(h) => moving.push(h),
            Verdict::Wildcard => {}
            Verdict::Refuse(r) => refused.push(r),
        }
    }
    if refused.is_empty() {
        Ok(moving)
    } else {
        Err(NetError::NotMovable(refused))
    }
}

fn if_addr(h: &HostAddr) -> IfAddr {
    IfAddr {
        addr: h.addr,
        prefix_len: h.prefix_len,
        index: h.index,
        flags: AddressFlags::empty(),
        scope: AddressScope::Universe,
    }
}

/// Send the announcement of `h` (gratuitous ARP or unsolicited neighbour
/// advertisement) from its interface.
fn announce_on(rtnl: &mut Rtnl, h: &HostAddr) -> Result<()> {
    let links = rtnl.links()?;
    let mac = link_of(&links, h.index)
        .map(|l| l.mac.clone())
        .ok_or_else(|| NetError::NoSuchDevice { dev: h.dev.clone() })?;
    announce::announce(h.addr, h.index, &h.dev, &mac)
}

/// Take `h` off this host. The guard puts it back (and announces it) when
/// dropped without [`Removed::commit`].
pub fn remove(h: &HostAddr) -> Result<Removed> {
    let netns = this_netns()?;
    let mut rtnl = Rtnl::open()?;
    match rtnl.del_address(&if_addr(h))? {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            return Err(NetError::NotHere { addr: h.addr })
        }
        Err(e) => {
            return Err(NetError::Netlink {
                what: format!("remove {h}"),
                source: e,
            })
        }
    }
    tracing::info!("removed {h}");
    Ok(Removed {
        netns,
        addr: h.clone(),
        armed: true,
    })
}

/// An address taken off this host; put back on drop unless committed.
#[derive(Debug)]
pub struct Removed {
    /// The namespace it was removed from (the guard may be dropped
    /// elsewhere).
    netns: File,
    addr: HostAddr,
    armed: bool,
}

impl Removed {
    pub fn addr(&self) -> &HostAddr {
        &self.addr
    }

    /// The move is done: the address stays off this host.
    pub fn commit(mut self) {
        self.armed = false;
    }

    /// Put the address back now (and announce it, so that neighbours that
    /// learnt the other host's hardware address come back at once).
    pub fn restore(mut self) -> Result<()> {
        self.armed = false;
        self.put_back()
    }

    fn put_back(&mut self) -> Result<()> {
        let h = &self.addr;
        in_netns(&self.netns, || {
            let mut rtnl = Rtnl::open()?;
            match rtnl.add_address(&if_addr(h))? {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(NetError::Netlink {
                        what: format!("put back {h}"),
                        source: e,
                    })
                }
            }
            tracing::info!("put back {h}");
            announce_on(&mut rtnl, h)
        })
    }
}

impl Drop for Removed {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.put_back() {
                tracing::error!("could not put back {}: {e}", self.addr);
            }
        }
    }
}

/// Put `addr`/`prefix_len` on this host: on `dev` when named, else on the
/// interface that has a subnet containing it. The guard removes it again
/// when dropped without [`Added::commit`].
pub fn add(addr: IpAddr, prefix_len: u8, dev: Option<&str>) -> Result<Added> {
    let addr = canonical(addr);
    let netns = this_netns()?;
    let mut rtnl = Rtnl::open()?;
    let links = rtnl.links()?;
    let all = rtnl.addresses()?;
    if let Some(a) = all.iter().find(|a| a.addr == addr) {
        return Err(NetError::AlreadyHere {
            addr,
            dev: dev_name(&links, a.index),
        });
    }
    let index = match dev {
        Some(name) => {
            links
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| NetError::NoSuchDevice {
                    dev: name.to_string(),
                })?
                .index
        }
        None => {
            all.iter()
                .filter(|a| a.scope == AddressScope::Universe)
                .filter(|a| link_of(&links, a.index).is_some_and(|l| !l.loopback))
                .find(|a| contains(a.addr, a.prefix_len, addr))
                .ok_or(NetError::NoSubnet { addr })?
                .index
        }
    };
    let h = HostAddr {
        addr,
        prefix_len,
        dev: dev_name(&links, index),
        index,
    };
    match rtnl.add_address(&if_addr(&h))? {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(NetError::AlreadyHere {
                addr,
                dev: h.dev.clone(),
            })
        }
        Err(e) => {
            return Err(NetError::Netlink {
                what: format!("add {h}"),
                source: e,
            })
        }
    }
    tracing::info!("added {h}");
    Ok(Added {
        netns,
        addr: h,
        armed: true,
    })
}

/// An address put on this host; removed on drop unless committed.
#[derive(Debug)]
pub struct Added {
    /// The namespace it was added in.
    netns: File,
    addr: HostAddr,
    armed: bool,
}

impl Added {
    pub fn addr(&self) -> &HostAddr {
        &self.addr
    }

    /// Tell the neighbours that the address is here now.
    pub fn announce(&self) -> Result<()> {
        in_netns(&self.netns, || announce_on(&mut Rtnl::open()?, &self.addr))
    }

    /// The move is done: the address stays.
    pub fn commit(mut self) {
        self.armed = false;
    }

    /// Remove the address again now.
    pub fn undo(mut self) -> Result<()> {
        self.armed = false;
        self.take_off()
    }

    fn take_off(&mut self) -> Result<()> {
        let h = &self.addr;
        in_netns(&self.netns, || {
            match Rtnl::open()?.del_address(&if_addr(h))? {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(NetError::Netlink {
                        what: format!("remove {h}"),
                        source: e,
                    })
                }
            }
            tracing::info!("removed {h} again");
            Ok(())
        })
    }
}

impl Drop for Added {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.take_off() {
                tracing::error!("could not remove {}: {e}", self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_contain_their_addresses_only() {
        let n: IpAddr = "198.18.0.1".parse().unwrap();
        assert!(contains(n, 24, "198.18.0.100".parse().unwrap()));
        assert!(!contains(n, 24, "198.18.1.100".parse().unwrap()));
        assert!(contains(n, 0, "10.0.0.1".parse().unwrap()));
        assert!(!contains(n, 24, "2001:2::1".parse().unwrap()));
        let n6: IpAddr = "2001:2:0:1::1".parse().unwrap();
        assert!(contains(n6, 64, "2001:2:0:1::100".parse().unwrap()));
        assert!(!contains(n6, 64, "2001:2:0:2::100".parse().unwrap()));
        assert!(contains(n6, 128, n6));
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let m: IpAddr = "::ffff:198.18.0.100".parse().unwrap();
        assert_eq!(canonical(m), "198.18.0.100".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:2::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn secondary_moves_primary_and_loopback_do_not() {
        let links = vec![
            Link {
                index: 1,
                name: "lo".into(),
                loopback: true,
                mac: vec![0; 6],
            },
            Link {
                index: 2,
                name: "eth0".into(),
                loopback: false,
                mac: vec![2, 0, 0, 0, 0, 1],
            },
        ];
        let a = |addr: &str, index, flags, scope| IfAddr {
            addr: addr.parse().unwrap(),
            prefix_len: if addr.contains(':') { 64 } else { 24 },
            index,
            flags,
            scope,
        };
        let all = vec![
            a("127.0.0.1", 1, AddressFlags::Permanent, AddressScope::Host),
            a(
                "198.18.0.1",
                2,
                AddressFlags::Permanent,
                AddressScope::Universe,
            ),
            a(
                "198.18.0.100",
                2,
                AddressFlags::Permanent | AddressFlags::Secondary,
                AddressScope::Universe,
            ),
            a(
                "2001:2::1",
                2,
                AddressFlags::Permanent,
                AddressScope::Universe,
            ),
            a(
                "2001:2::100",
                2,
                AddressFlags::Permanent,
                AddressScope::Universe,
            ),
            a(
                "2001:2::abcd",
                2,
                AddressFlags::empty(),
                AddressScope::Universe,
            ),
            a("fe80::1", 2, AddressFlags::Permanent, AddressScope::Link),
        ];
        let v = |s: &str| judge(s.parse().unwrap(), &all, &links);
        assert!(
            matches!(v("198.18.0.100"), Verdict::Move(h) if h.dev == "eth0" && h.prefix_len == 24)
        );
        assert!(matches!(v("2001:2::100"), Verdict::Move(_)));
        assert!(matches!(
            v("198.18.0.1"),
            Verdict::Refuse(Refused {
                why: Why::Primary { .. },
                ..
            })
        ));
        assert!(matches!(
            v("127.0.0.1"),
            Verdict::Refuse(Refused {
                why: Why::Loopback,
                ..
            })
        ));
        assert!(matches!(
            v("::1"),
            Verdict::Refuse(Refused {
                why: Why::Loopback,
                ..
            })
        ));
        assert!(matches!(
            v("fe80::1"),
            Verdict::Refuse(Refused {
                why: Why::LinkLocal { .. },
                ..
            })
        ));
        assert!(matches!(
            v("2001:2::abcd"),
            Verdict::Refuse(Refused {
                why: Why::Dynamic { .. },
                ..
            })
        ));
        assert!(matches!(
            v("198.18.0.9"),
            Verdict::Refuse(Refused {
                why: Why::NotHere,
                ..
            })
        ));
        assert_eq!(v("0.0.0.0"), Verdict::Wildcard);
        assert_eq!(v("::"), Verdict::Wildcard);
        // The only address of an interface.
        let only = vec![a(
            "198.18.0.1",
            2,
            AddressFlags::Permanent,
            AddressScope::Universe,
        )];
        assert!(matches!(
            judge("198.18.0.1".parse().unwrap(), &only, &links),
            Verdict::Refuse(Refused {
                why: Why::Only { .. },
                ..
            })
        ));
        let msg = refusals_message(&[Refused {
            addr: "198.18.0.1".parse().unwrap(),
            why: Why::Primary {
                dev: "eth0".into(),
                prefix_len: 24,
            },
        }]);
        assert!(
            msg.contains("primary address") && msg.contains("--drop-connections"),
            "{msg}"
        );
    }
}
