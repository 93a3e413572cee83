//! Unix domain sockets in the image model: what a unix socket of the tree
//! needs to be rebuilt (its type, its name, who it is connected to, the
//! messages waiting in its receive queue), and the rules such a record
//! must follow.
//!
//! ```text
//!  FileKind::Unix { socket: UnixSocket }
//!    ty: stream | datagram | seqpacket     name: path | abstract | none
//!    state: Unconnected                     a socket neither listening nor connected
//!           Listening { backlog }           (no connection waiting: those are refused)
//!           Connected { peer }              peer: the open file of the other end,
//!                                           None if that end was closed
//!    queue: [UnixMessage]                   its receive queue, message by message
//! ```
//!
//! The other end of a connection is always an open file of the same tree:
//! a socket connected to something outside is refused at checkpoint.

use serde::{Deserialize, Serialize};

/// Most messages a receive queue of an image may hold.
pub const MAX_UNIX_MESSAGES: usize = 1 << 16;
/// Most bytes a receive queue of an image may hold.
pub const MAX_UNIX_QUEUE: usize = 64 << 20;
/// Longest socket name (`sun_path` is 108 bytes).
pub const MAX_UNIX_NAME: usize = 108;

/// The type of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixType {
    Stream,
    Datagram,
    Seqpacket,
}

/// The address a unix socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnixName {
    /// A socket file at this path.
    Path(String),
    /// An abstract name (without the leading NUL byte).
    Abstract(Vec<u8>),
}

impl std::fmt::Display for UnixName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnixName::Path(p) => write!(f, "{p}"),
            UnixName::Abstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

/// Where a unix socket is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixState {
    /// Neither listening nor connected (a bound datagram server, a fresh
    /// socket).
    Unconnected,
    /// Listening (`listen(backlog)`), with no connection waiting.
    Listening { backlog: u32 },
    /// Connected; `peer` is the open file of the other end, `None` if the
    /// other end was closed (reads see what is queued, then end of file).
    Connected { peer: Option<u32> },
}

/// Credentials a message carries (`SCM_CREDENTIALS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixCreds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// One message of a receive queue (a datagram or a seqpacket record; for
/// a stream socket, a run of bytes with the same credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixMessage {
    pub data: Vec<u8>,
    /// The credentials it carries, recorded when the receiver has
    /// `SO_PASSCRED` (the only case in which the program can see them).
    pub creds: Option<UnixCreds>,
}

/// A unix domain socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocket {
    pub ty: UnixType,
    /// The address it is bound to (an accepted socket shows its
    /// listener's).
    pub name: Option<UnixName>,
    pub state: UnixState,
    /// `sk_shutdown`: bit 0 no more receiving, bit 1 no more sending.
    pub shutdown: u8,
    /// The receive queue, oldest first.
    pub queue: Vec<UnixMessage>,
    /// `SO_PASSCRED`.
    pub passcred: bool,
    /// `SO_SNDBUF` / `SO_RCVBUF` as read.
    pub sndbuf: i32,
    pub rcvbuf: i32,
}

impl UnixSocket {
    /// Check the record; `exists(id)` says whether open file `id` is a
    /// unix socket of the image. The error says what is wrong.
    pub fn check(&self, exists: impl Fn(u32) -> bool) -> Result<(), String> {
        match &self.name {
            Some(UnixName::Path(p))
                if p.is_empty() || p.len() >= MAX_UNIX_NAME || p.contains('\0') =>
            {
                return Err(format!("socket path {p:?} is empty, too long or has a NUL"));
            }
            Some(UnixName::Abstract(n)) if n.len() >= MAX_UNIX_NAME => {
                return Err(format!(
                    "abstract name of {} bytes (at most {})",
                    n.len(),
                    MAX_UNIX_NAME - 1
                ));
            }
            _ => {}
        }
        if self.queue.len() > MAX_UNIX_MESSAGES {
            return Err(format!(
                "{} queued messages (at most {MAX_UNIX_MESSAGES})",
                self.queue.len()
            ));
        }
        let bytes = self
            .queue
            .iter()
            .fold(0usize, |n, m| n.saturating_add(m.data.len()));
        if bytes > MAX_UNIX_QUEUE {
            return Err(format!("{bytes} queued bytes (at most {MAX_UNIX_QUEUE})"));
        }
        if self.shutdown > 3 {
            return Err(format!("shutdown mask {} (at most 3)", self.shutdown));
        }
        if self.sndbuf < 0 || self.rcvbuf < 0 {
            return Err("negative buffer size".into());
        }
        match &self.state {
            UnixState::Listening { .. } => {
                if self.ty == UnixType::Datagram {
                    return Err("a listening datagram socket".into());
                }
                if self.name.is_none() {
                    return Err("a listening socket without a name".into());
                }
                if !self.queue.is_empty() {
                    return Err("a listening socket with queued messages".into());
                }
            }
            UnixState::Connected { peer: Some(p) } => {
                if !exists(*p) {
                    return Err(format!(
                        "connected to open file {p}, which is not a unix socket of the image"
                    ));
                }
            }
            UnixState::Connected { peer: None } | UnixState::Unconnected => {}
        }
        if self.ty == UnixType::Stream && self.queue.iter().any(|m| m.data.is_empty()) {
            return Err("an empty message in the queue of a stream socket".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UnixSocket {
        UnixSocket {
            ty: UnixType::Seqpacket,
            name: Some(UnixName::Abstract(b"x".to_vec())),
            state: UnixState::Connected { peer: Some(2) },
            shutdown: 0,
            queue: vec![UnixMessage {
                data: b"abc".to_vec(),
                creds: None,
            }],
            passcred: false,
            sndbuf: 1000,
            rcvbuf: 1000,
        }
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample().check(|id| id == 2), Ok(()));
    }

    #[test]
    fn rejects_bad_records() {
        let e = sample().check(|_| false).unwrap_err();
        assert!(e.contains("open file 2"), "{e}");

        let mut s = sample();
        s.name = Some(UnixName::Path("x".repeat(200)));
        assert!(s.check(|_| true).unwrap_err().contains("too long"));

        let mut s = sample();
        s.queue = vec![
            UnixMessage {
                data: vec![],
                creds: None
            };
            MAX_UNIX_MESSAGES + 1
        ];
        assert!(s.check(|_| true).unwrap_err().contains("queued messages"));

        let mut s = sample();
        s.queue = vec![UnixMessage {
            data: vec![0; MAX_UNIX_QUEUE + 1],
            creds: None,
        }];
        assert!(s.check(|_| true).unwrap_err().contains("queued bytes"));

        let mut s = sample();
        s.state = UnixState::Listening { backlog: 5 };
        assert!(s.check(|_| true).unwrap_err().contains("queued messages"));

        let mut s = sample();
        s.ty = UnixType::Datagram;
        s.state = UnixState::Listening { backlog: 5 };
        assert!(s.check(|_| true).unwrap_err().contains("datagram"));

        let mut s = sample();
        s.shutdown = 4;
        assert!(s.check(|_| true).unwrap_err().contains("shutdown"));
    }

    #[test]
    fn images_check_their_unix_sockets() {
        use crate::model::FileKind;
        use crate::validate::ValidationError;
        let mut img = crate::validate::tests::sample_image();
        img.files[0].kind = FileKind::Unix {
            socket: Box::new(sample()),
        };
        match img.validate() {
            Err(ValidationError::BadSocket { file, why }) => {
                assert_eq!(file, img.files[0].id);
                assert!(why.contains("open file 2"), "{why}");
            }
            other => panic!("expected BadSocket, got {other:?}"),
        }
        let mut s = sample();
        s.state = UnixState::Connected {
            peer: Some(img.files[0].id),
        };
        img.files[0].kind = FileKind::Unix {
            socket: Box::new(s),
        };
        assert_eq!(img.validate(), Ok(()));
    }
}
