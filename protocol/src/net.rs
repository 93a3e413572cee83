//! Sockets in the image model: what a TCP socket of the tree needs to be
//! rebuilt (its addresses, the state of its connection, its queues and the
//! options the program set), and the rules such a record must follow.
//!
//! ```text
//!  FileKind::Tcp { socket: TcpSocket }
//!    family (AF_INET, AF_INET6)   options (SocketOptions)
//!    state: Closed { bound }        a socket not yet listening or connected
//!           Listen { addr, backlog }
//!           Established(TcpConnection)   sequences, queues, TCP options,
//!                                        window: what TCP_REPAIR restores
//! ```
//!
//! Sequence numbers are those the kernel reports in repair mode
//! (`TCP_QUEUE_SEQ`): `send_seq` is the sequence after the last byte the
//! process wrote, `recv_seq` the one after the last byte received; the
//! queues end there.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;
/// Most bytes a socket queue of an image may hold.
pub const MAX_QUEUE_DATA: usize = 64 << 20;
/// Largest TCP window scale (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// A TCP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocket {
    /// Address family (`SO_DOMAIN`): [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub state: TcpState,
    pub options: SocketOptions,
}

/// Where a TCP socket is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TcpState {
    /// Neither listening nor connected; bound to `bound` if it was.
    Closed { bound: Option<SocketAddr> },
    /// Listening on `addr` with `backlog` (`sk_max_ack_backlog`).
    Listen { addr: SocketAddr, backlog: u32 },
    /// A connection (ESTABLISHED).
    Established(Box<TcpConnection>),
}

/// An established TCP connection, as `TCP_REPAIR` reads and rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnection {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Sequence number after the last byte written (`write_seq`).
    pub send_seq: u32,
    /// Sequence number after the last byte received (`rcv_nxt`).
    pub recv_seq: u32,
    /// Bytes in the send queue (`SIOCOUTQ`: sent but not acknowledged,
    /// then never sent); `send_queue` holds exactly that many.
    pub send_queue_len: u32,
    /// Of those, bytes never sent (`SIOCOUTQNSD`), the tail of the queue.
    pub unsent_len: u32,
    /// The send queue's contents.
    pub send_queue: Vec<u8>,
    /// Bytes received and not yet read (`SIOCINQ`); `recv_queue` holds
    /// exactly that many.
    pub recv_queue_len: u32,
    /// The receive queue's contents.
    pub recv_queue: Vec<u8>,
    /// Largest segment the peer takes (`mss_clamp`, `TCP_MAXSEG` in repair).
    pub mss: u32,
    /// Window scales (send, receive) if both ends agreed on scaling.
    pub wscale: Option<(u8, u8)>,
    /// Selective acknowledgements agreed.
    pub sack: bool,
    /// Timestamps agreed.
    pub timestamps: bool,
    /// The socket's timestamp clock (`TCP_TIMESTAMP`).
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`.
    pub window: TcpWindow,
}

/// `struct tcp_repair_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// The socket options ferry carries, as `getsockopt` reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SocketOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`.
    pub keepidle: i32,
    pub keepintvl: i32,
    pub keepcnt: i32,
    pub nodelay: bool,
    /// `SO_SNDBUF` / `SO_RCVBUF` as read (the kernel doubles what was set).
    pub sndbuf: i32,
    pub rcvbuf: i32,
    /// `SO_LINGER` (on, seconds).
    pub linger: Option<i32>,
    /// `IP_TOS` (IPv4) or `IPV6_TCLASS` (IPv6).
    pub tos: i32,
    /// `IPV6_V6ONLY` (IPv6 sockets only).
    pub v6only: bool,
    /// `SO_RCVTIMEO` / `SO_SNDTIMEO` in microseconds (0: none).
    pub rcvtimeo_us: u64,
    pub sndtimeo_us: u64,
    /// `SO_BROADCAST` (UDP).
    pub broadcast: bool,
}

/// A UDP socket: bound and connected as it was. Datagrams queued at the
/// checkpoint are not carried: `dropped` says how many there were (UDP
/// allows loss; the checkpoint reports it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpSocket {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub bound: Option<SocketAddr>,
    /// The address it is connected to.
    pub peer: Option<SocketAddr>,
    pub options: SocketOptions,
    /// Datagrams that were queued at the checkpoint (not carried).
    pub dropped: u32,
}

impl UdpSocket {
    /// Check the record; the error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let fam = family_name(self.family)?;
        let v6 = self.family == AF_INET6;
        if let Some(a) = self
            .bound
            .iter()
            .chain(self.peer.iter())
            .find(|a| a.is_ipv6() != v6)
        {
            return Err(format!("address {a} in an {fam} socket"));
        }
        if self.peer.is_some_and(|p| p.port() == 0) {
            return Err("connected to port 0".into());
        }
        Ok(())
    }
}

/// "IPv4" or "IPv6", or why `family` is not supported.
fn family_name(family: u16) -> Result<&'static str, String> {
    match family {
        AF_INET => Ok("IPv4"),
        AF_INET6 => Ok("IPv6"),
        other => Err(format!(
            "address family {other} is not supported (only AF_INET {AF_INET} and AF_INET6 {AF_INET6})"
        )),
    }
}

impl TcpSocket {
    /// Check the record; the error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let fam = family_name(self.family)?;
        let fits = |a: &SocketAddr| match self.family {
            AF_INET => a.is_ipv4(),
            _ => a.is_ipv6(),
        };
        let addrs: Vec<&SocketAddr> = match &self.state {
            TcpState::Closed { bound } => bound.iter().collect(),
            TcpState::Listen { addr, .. } => vec![addr],
            TcpState::Established(c) => vec![&c.local, &c.peer],
        };
        if let Some(a) = addrs.iter().find(|a| !fits(a)) {
            return Err(format!("address {a} in an {fam} socket"));
        }
        if self.options.sndbuf < 0 || self.options.rcvbuf < 0 {
            return Err("negative buffer size".into());
        }
        let TcpState::Established(c) = &self.state else {
            return Ok(());
        };
        if c.peer.port() == 0 || c.local.port() == 0 {
            return Err("a connection with port 0".into());
        }
        let queue = |name: &str, data: &[u8], len: u32| {
            if data.len() > MAX_QUEUE_DATA {
                return Err(format!(
                    "{name} queue of {} bytes is longer than the most an image may hold ({MAX_QUEUE_DATA})",
                    data.len()
                ));
            }
            if data.len() != len as usize {
                return Err(format!(
                    "{name} queue holds {} bytes but its recorded size is {len}",
                    data.len()
                ));
            }
            Ok(())
        };
        queue("send", &c.send_queue, c.send_queue_len)?;
        queue("receive", &c.recv_queue, c.recv_queue_len)?;
        if c.unsent_len > c.send_queue_len {
            return Err(format!(
                "{} unsent bytes in a send queue of {}",
                c.unsent_len, c.send_queue_len
            ));
        }
        if c.mss == 0 || c.mss > 65535 {
            return Err(format!("MSS {} out of range 1..=65535", c.mss));
        }
        if let Some((s, r)) = c.wscale {
            if s > MAX_WSCALE || r > MAX_WSCALE {
                return Err(format!("window scale ({s}, {r}) above {MAX_WSCALE}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TcpSocket {
        TcpSocket {
            family: AF_INET,
            state: TcpState::Established(Box::new(TcpConnection {
                local: "127.0.0.1:5000".parse().unwrap(),
                peer: "127.0.0.1:40000".parse().unwrap(),
                send_seq: 1000,
                recv_seq: 2000,
                send_queue_len: 3,
                unsent_len: 1,
                send_queue: b"abc".to_vec(),
                recv_queue_len: 2,
                recv_queue: b"xy".to_vec(),
                mss: 65483,
                wscale: Some((7, 7)),
                sack: true,
                timestamps: true,
                timestamp: 12345,
                window: TcpWindow {
                    snd_wl1: 1,
                    snd_wnd: 2,
                    max_window: 3,
                    rcv_wnd: 4,
                    rcv_wup: 5,
                },
            })),
            options: SocketOptions::default(),
        }
    }

    fn conn(s: &mut TcpSocket) -> &mut TcpConnection {
        match &mut s.state {
            TcpState::Established(c) => c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn images_check_their_sockets() {
        use crate::model::FileKind;
        use crate::validate::ValidationError;
        let mut img = crate::validate::tests::sample_image();
        img.files[0].kind = FileKind::Tcp {
            socket: Box::new(sample()),
        };
        assert_eq!(img.validate(), Ok(()));
        let mut bad = sample();
        conn(&mut bad).send_queue.push(0);
        img.files[0].kind = FileKind::Tcp {
            socket: Box::new(bad),
        };
        match img.validate() {
            Err(ValidationError::BadSocket { file, why }) => {
                assert_eq!(file, img.files[0].id);
                assert!(why.contains("send queue holds 4 bytes"), "{why}");
            }
            other => panic!("expected BadSocket, got {other:?}"),
        }
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample().check(), Ok(()));
    }

    #[test]
    fn rejects_bad_records() {
        let mut s = sample();
        s.family = 1;
        assert!(s.check().unwrap_err().contains("family 1 is not supported"));

        let mut s = sample();
        s.family = AF_INET6;
        assert!(s.check().unwrap_err().contains("in an IPv6 socket"));

        let mut s = sample();
        conn(&mut s).recv_queue.push(b'z');
        let e = s.check().unwrap_err();
        assert!(
            e.contains("receive queue holds 3 bytes but its recorded size is 2"),
            "{e}"
        );

        let mut s = sample();
        conn(&mut s).send_queue.extend_from_slice(b"more");
        assert!(s.check().unwrap_err().contains("send queue holds 7"));

        let mut s = sample();
        conn(&mut s).unsent_len = 4;
        assert!(s.check().unwrap_err().contains("4 unsent bytes"));

        let mut s = sample();
        conn(&mut s).wscale = Some((15, 0));
        assert!(s.check().unwrap_err().contains("window scale"));

        let mut s = sample();
        conn(&mut s).mss = 0;
        assert!(s.check().unwrap_err().contains("MSS 0"));
    }
}
