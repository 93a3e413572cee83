//! Tell the neighbours on the link that an address is here now, so they
//! send to this host's hardware address at once instead of waiting for
//! their neighbour entry to time out.
//!
//! IPv4: gratuitous ARP, a request and a reply, each with sender and target
//! protocol address both the moved address and the sender hardware address
//! this interface's (RFC 5227 §3; Linux takes either kind as gratuitous and
//! overrides an existing entry even within its lock time). IPv6: an
//! unsolicited neighbour advertisement to all nodes (ff02::1) with the
//! Override flag and the target link-layer address option (RFC 4861
//! §7.2.6), hop limit 255 as receivers require. Neither creates an entry at
//! a neighbour that had none (nor needs to: it resolves afresh).

use super::sys;
use super::{NetError, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// The Override flag of a neighbour advertisement (first byte of flags).
const ND_NA_FLAG_OVERRIDE: u8 = 0x20;
/// Option "target link-layer address".
const ND_OPT_TARGET_LINKADDR: u8 = 2;

/// Announce `addr` on interface `index` (`dev`, hardware address `mac`).
pub fn announce(addr: IpAddr, index: u32, dev: &str, mac: &[u8]) -> Result<()> {
    let err = |source| NetError::Announce {
        addr,
        dev: dev.to_string(),
        source,
    };
    let mac: [u8; 6] = mac.try_into().map_err(|_| {
        err(std::io::Error::other(format!(
            "the interface has no Ethernet address (hardware address {mac:02x?})"
        )))
    })?;
    match addr {
        IpAddr::V4(a) => garp(a, index, mac).map_err(err)?,
        IpAddr::V6(a) => unsolicited_na(a, index, mac).map_err(err)?,
    }
    tracing::info!("announced {addr} on {dev}");
    Ok(())
}

/// The 28 bytes of an Ethernet/IPv4 ARP packet announcing `addr` at `mac`.
fn arp_packet(op: u16, addr: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    p.extend_from_slice(&[6, 4]);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&mac);
    p.extend_from_slice(&addr.octets());
    // Target hardware address: unknown (zero) in a request; the sender's
    // own in a gratuitous reply (Linux requires tha == sha there).
    p.extend_from_slice(&if op == ARPOP_REPLY { mac } else { [0; 6] });
    p.extend_from_slice(&addr.octets());
    p
}

fn garp(addr: Ipv4Addr, index: u32, mac: [u8; 6]) -> std::io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let fd = sys::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto))?;
    // SAFETY: sockaddr_ll is plain old data; all zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for op in [ARPOP_REQUEST, ARPOP_REPLY] {
        sys::sendto(&fd, &arp_packet(op, addr, mac), &to)?;
    }
    Ok(())
}

/// The ICMPv6 neighbour advertisement for `addr` at `mac` (checksum left
/// zero: the kernel fills it in for ICMPv6 raw sockets).
fn na_packet(addr: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]);
    p.extend_from_slice(&[ND_NA_FLAG_OVERRIDE, 0, 0, 0]);
    p.extend_from_slice(&addr.octets());
    p.extend_from_slice(&[ND_OPT_TARGET_LINKADDR, 1]);
    p.extend_from_slice(&mac);
    p
}

fn unsolicited_na(addr: Ipv6Addr, index: u32, mac: [u8; 6]) -> std::io::Result<()> {
    let fd = sys::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    sys::setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
    sys::setsockopt_int(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_IF,
        index as i32,
    )?;
    // SAFETY: sockaddr_in6 is plain old data; all zero is a valid value.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as u16;
    to.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    to.sin6_scope_id = index;
    // From the address itself when the kernel lets us (it is ours and, added
    // without DAD, usable); else the kernel picks one of the interface.
    // SAFETY: as above.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    from.sin6_family = libc::AF_INET6 as u16;
    from.sin6_addr.s6_addr = addr.octets();
    if let Err(e) = sys::bind(&fd, &from) {
        tracing::debug!("announce {addr}: bind to it: {e}; the kernel picks the source");
    }
    sys::sendto(&fd, &na_packet(addr, mac), &to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_have_the_wire_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let a = Ipv4Addr::new(198, 18, 0, 100);
        let req = arp_packet(ARPOP_REQUEST, a, mac);
        assert_eq!(req.len(), 28);
        assert_eq!(&req[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[8..14], &mac);
        assert_eq!(&req[14..18], &a.octets());
        assert_eq!(&req[18..24], &[0; 6]);
        assert_eq!(&req[24..28], &a.octets());
        let rep = arp_packet(ARPOP_REPLY, a, mac);
        assert_eq!(&rep[6..8], &[0, 2]);
        assert_eq!(&rep[18..24], &mac);
        let a6: Ipv6Addr = "2001:2:0:1::100".parse().unwrap();
        let na = na_packet(a6, mac);
        assert_eq!(na.len(), 32);
        assert_eq!(&na[..5], &[136, 0, 0, 0, 0x20]);
        assert_eq!(&na[8..24], &a6.octets());
        assert_eq!(&na[24..26], &[2, 1]);
        assert_eq!(&na[26..], &mac);
    }
}
