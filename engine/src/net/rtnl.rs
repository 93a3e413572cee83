//! A small synchronous route-netlink client: list links and addresses, add
//! and delete an address. One socket, one request at a time, each answered
//! before the next (a dump until NLMSG_DONE, a change until its ACK).

use super::{NetError, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::net::IpAddr;

/// One address of an interface, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Interface index.
    pub index: u32,
    /// IFA_F_* flags (header and IFA_FLAGS attribute together).
    pub flags: AddressFlags,
    pub scope: AddressScope,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// Hardware address (empty for interfaces without one).
    pub mac: Vec<u8>,
}

/// A route-netlink socket in the network namespace it was opened in.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

fn nl_err(what: &str, source: std::io::Error) -> NetError {
    NetError::Netlink {
        what: what.to_string(),
        source,
    }
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| nl_err("socket", e))?;
        sock.bind_auto().map_err(|e| nl_err("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| nl_err("connect", e))?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Send `msg` with `flags` and collect the answers until the dump ends
    /// or the kernel acknowledges. A kernel error comes back as
    /// `Err(io::Error)` inside `Ok` so callers can tell EEXIST from others.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<std::result::Result<Vec<RouteNetlinkMessage>, std::io::Error>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|e| nl_err(what, e))?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(|e| nl_err(what, e))?;
            let mut offset = 0;
            while offset < data.len() {
                let msg: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&data[offset..]).map_err(|e| {
                        NetError::NetlinkAnswer {
                            what: what.to_string(),
                            detail: e.to_string(),
                        }
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NetError::NetlinkAnswer {
                        what: what.to_string(),
                        detail: "a message of length 0".into(),
                    });
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(Ok(out)),
                    NetlinkPayload::Error(e) => {
                        if e.code.is_none() && !dump {
                            return Ok(Ok(out));
                        }
                        return Ok(Err(e.to_io()));
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Every address of every interface (both families).
    pub fn addresses(&mut self) -> Result<Vec<IfAddr>> {
        let what = "list addresses";
        let msgs = self
            .request(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                NLM_F_DUMP,
                what,
            )?
            .map_err(|e| nl_err(what, e))?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            let mut local = None;
            let mut address = None;
            let mut flags = AddressFlags::from_bits_retain(a.header.flags.bits() as u32);
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    AddressAttribute::Flags(f) => flags |= *f,
                    _ => {}
                }
            }
            // IFA_LOCAL is the address itself on point-to-point links,
            // where IFA_ADDRESS is the peer; elsewhere they are equal.
            if let Some(addr) = local.or(address) {
                out.push(IfAddr {
                    addr,
                    prefix_len: a.header.prefix_len,
                    index: a.header.index,
                    flags,
                    scope: a.header.scope,
                });
            }
        }
        Ok(out)
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let what = "list links";
        let msgs = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
                what,
            )?
            .map_err(|e| nl_err(what, e))?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewLink(l) = m else {
                continue;
            };
            let mut name = String::new();
            let mut mac = Vec::new();
            for attr in &l.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Address(a) => mac = a.clone(),
                    _ => {}
                }
            }
            out.push(Link {
                index: l.header.index,
                name,
                loopback: l.header.flags.contains(LinkFlags::Loopback),
                mac,
            });
        }
        Ok(out)
    }

    fn address_message(a: &IfAddr, nodad: bool) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = match a.addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = a.prefix_len;
        m.header.index = a.index;
        m.header.scope = AddressScope::Universe;
        if nodad {
            m.header.flags = AddressHeaderFlags::Nodad;
        }
        m.attributes.push(AddressAttribute::Local(a.addr));
        m.attributes.push(AddressAttribute::Address(a.addr));
        m
    }

    /// Add `a` (exclusively: an address already there is an EEXIST error).
    /// IPv6 addresses skip duplicate address detection: they must work at
    /// once, and the migration has just taken the address off the other
    /// host.
    pub fn add_address(&mut self, a: &IfAddr) -> Result<std::result::Result<(), std::io::Error>> {
        let mut m = Self::address_message(a, a.addr.is_ipv6());
        if a.addr.is_ipv6() {
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let r = self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "add address",
        )?;
        Ok(r.map(drop))
    }

    /// Delete `a`.
    pub fn del_address(&mut self, a: &IfAddr) -> Result<std::result::Result<(), std::io::Error>> {
        let m = Self::address_message(a, false);
        let r = self.request(
            RouteNetlinkMessage::DelAddress(m),
            NLM_F_ACK,
            "delete address",
        )?;
        Ok(r.map(drop))
    }
}
