//! The destination's view of the conversation (see the state diagram in
//! [`crate::wire`]): which message is legal when, whether all page batches
//! of every pass have arrived, and whether the migration is lazy.

use std::fmt;

use super::{
    ControlMsg, MsgKind, ProtocolVersion, WireError, LAZY_MINOR, MAX_PASSES, NET_MINOR, WIRE_MAJOR,
};
use crate::model::HostInfo;

/// Where the destination is in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the source's `Hello`.
    AwaitHello,
    /// `Hello` received; the destination answers `HelloAck` (or `Refuse`).
    Greeted,
    /// Waiting for `Prepare`.
    AwaitPrepare,
    /// `Prepare` received; the destination checks and answers `Ready` or
    /// `Refuse`.
    Checking,
    /// Between passes: `PassStart` of the next pass, `LazyPlan` or
    /// `Switchover` may come (after a `LazyPlan`, only `Switchover`).
    PreCopy,
    /// Inside a pass, waiting for its `PassEnd`.
    InPass(u32),
    /// `Switchover` received; the destination restores and answers `Running`
    /// or `Failed`.
    Restoring,
    /// `LazyResume` received on a new connection; the destination answers
    /// `LazyResumed` (the lazy phase goes on here) or `Refuse`.
    Resuming,
    /// `Running` sent for a lazy migration (or `LazyResumed` on a new
    /// connection); pages are still being fetched (`PageRequest` out,
    /// `LazyPages` in) until `LazyComplete` is sent.
    Lazy,
    /// `Running` (or, in a lazy migration, `LazyComplete`) sent; waiting for
    /// `Done`.
    Running,
    /// The conversation is over (normally or not); nothing more is legal.
    Closed,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::InPass(n) => write!(f, "InPass({n})"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// What to do with a page frame ([`DestState::page_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAdmit {
    /// The pass has started: decode and apply the batch (it is counted).
    Accept,
    /// The frame belongs to the next pass, whose `PassStart` has not been
    /// read yet: hold it until then and ask again (nothing was counted).
    Wait,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    batches: u64,
    pages: u64,
    bytes: u64,
}

#[derive(Debug, Clone, Default)]
struct PassTally {
    received: Tally,
    declared: Option<Tally>,
}

impl PassTally {
    fn complete(&self) -> bool {
        self.declared == Some(self.received)
    }

    /// Errors if what arrived already contradicts what was declared.
    fn check(&self, pass: usize) -> Result<(), WireError> {
        let Some(d) = self.declared else {
            return Ok(());
        };
        let r = self.received;
        let over = r.batches > d.batches || r.pages > d.pages || r.bytes > d.bytes;
        let mismatch = r.batches == d.batches && r != d;
        if over || mismatch {
            return Err(WireError::Invalid(format!(
                "pass {pass}: received {} batches, {} pages, {} bytes; PassEnd declared {} batches, {} pages, {} bytes",
                r.batches, r.pages, r.bytes, d.batches, d.pages, d.bytes
            )));
        }
        Ok(())
    }
}

/// The destination's state machine: feed it every control message received
/// ([`DestState::accept`]), every control message about to be sent
/// ([`DestState::sent`]) and every page frame ([`DestState::page_batch`]);
/// an error means the peer (or this side) broke the protocol and the
/// connection must be closed.
#[derive(Debug, Clone)]
pub struct DestState {
    phase: Phase,
    version: Option<ProtocolVersion>,
    source_host: Option<HostInfo>,
    pid: Option<i32>,
    passes: Vec<PassTally>,
    lazy: bool,
    /// A `NetMove` was accepted (at most one).
    net_moved: bool,
}

impl Default for DestState {
    fn default() -> Self {
        Self::new()
    }
}

impl DestState {
    /// A fresh conversation, waiting for `Hello`.
    pub fn new() -> Self {
        Self {
            phase: Phase::AwaitHello,
            version: None,
            source_host: None,
            pid: None,
            passes: Vec::new(),
            lazy: false,
            net_moved: false,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The negotiated version (major, lower of both minors) once `Hello`
    /// was accepted.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The PID announced in `Prepare`.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Number of passes started so far.
    pub fn passes_started(&self) -> u32 {
        self.passes.len() as u32
    }

    /// True if pass `pass` ended and all its declared batches arrived.
    pub fn pass_complete(&self, pass: u32) -> bool {
        self.passes
            .get(pass as usize)
            .is_some_and(PassTally::complete)
    }

    /// True once a `LazyPlan` was accepted: the migration is lazy.
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// True if every started pass is complete (and at least one started).
    pub fn all_passes_complete(&self) -> bool {
        !self.passes.is_empty() && self.passes.iter().all(PassTally::complete)
    }

    fn unexpected(&self, got: MsgKind) -> WireError {
        WireError::UnexpectedMessage {
            state: self.phase,
            got,
        }
    }

    /// Takes a control message received from the source: checks that it is
    /// legal now and advances. Run [`super::decode_control`] first (it
    /// validates the message on its own).
    pub fn accept(&mut self, msg: &ControlMsg) -> Result<(), WireError> {
        let kind = msg.kind();
        let next = match (self.phase, msg) {
            (Phase::AwaitHello, ControlMsg::Hello { version, host, .. }) => {
                let v = ProtocolVersion::CURRENT.negotiate(*version).ok_or(
                    WireError::UnsupportedVersion {
                        found: version.major,
                        supported: WIRE_MAJOR,
                    },
                )?;
                self.version = Some(v);
                self.source_host = Some(host.clone());
                Phase::Greeted
            }
            (Phase::AwaitPrepare, ControlMsg::Prepare { pid, .. }) => {
                self.pid = Some(*pid);
                Phase::Checking
            }
            (Phase::AwaitPrepare, ControlMsg::LazyResume { pid }) => {
                let minor = self.version.map_or(0, |v| v.minor);
                if minor < LAZY_MINOR {
                    return Err(WireError::Invalid(format!(
                        "LazyResume needs protocol minor version {LAZY_MINOR}, but {WIRE_MAJOR}.{minor} was negotiated"
                    )));
                }
                self.pid = Some(*pid);
                self.lazy = true;
                Phase::Resuming
            }
            (Phase::PreCopy, ControlMsg::PassStart { pass, .. }) if !self.lazy => {
                let expected = self.passes.len() as u32;
                if *pass != expected {
                    return Err(WireError::Invalid(format!(
                        "PassStart for pass {pass}, expected pass {expected}"
                    )));
                }
                if *pass >= MAX_PASSES {
                    return Err(WireError::Invalid(format!("more than {MAX_PASSES} passes")));
                }
                self.passes.push(PassTally::default());
                Phase::InPass(*pass)
            }
            (
                Phase::InPass(n),
                ControlMsg::PassEnd {
                    pass,
                    batches,
                    pages,
                    bytes,
                },
            ) => {
                if *pass != n {
                    return Err(WireError::Invalid(format!(
                        "PassEnd for pass {pass} inside pass {n}"
                    )));
                }
                let t = self
                    .passes
                    .get_mut(n as usize)
                    .ok_or_else(|| WireError::Invalid(format!("pass {n} was never started")))?;
                t.declared = Some(Tally {
                    batches: *batches,
                    pages: *pages,
                    bytes: *bytes,
                });
                t.check(n as usize)?;
                Phase::PreCopy
            }
            (Phase::PreCopy, ControlMsg::LazyPlan { .. }) if !self.lazy => {
                let minor = self.version.map_or(0, |v| v.minor);
                if minor < LAZY_MINOR {
                    return Err(WireError::Invalid(format!(
                        "LazyPlan needs protocol minor version {LAZY_MINOR}, but {WIRE_MAJOR}.{minor} was negotiated"
                    )));
                }
                if self.passes.is_empty() {
                    return Err(WireError::Invalid(
                        "LazyPlan before any pass was sent".into(),
                    ));
                }
                self.lazy = true;
                Phase::PreCopy
            }
            (Phase::PreCopy, ControlMsg::NetMove { .. }) if !self.net_moved => {
                let minor = self.version.map_or(0, |v| v.minor);
                if minor < NET_MINOR {
                    return Err(WireError::Invalid(format!(
                        "NetMove needs protocol minor version {NET_MINOR}, but {WIRE_MAJOR}.{minor} was negotiated"
                    )));
                }
                if self.passes.is_empty() {
                    return Err(WireError::Invalid(
                        "NetMove before any pass was sent".into(),
                    ));
                }
                self.net_moved = true;
                Phase::PreCopy
            }
            (Phase::PreCopy, ControlMsg::Switchover { image }) => {
                if self.passes.is_empty() {
                    return Err(WireError::Invalid(
                        "Switchover before any pass was sent".into(),
                    ));
                }
                if self.pid != Some(image.root_pid()) {
                    return Err(WireError::Invalid(format!(
                        "Switchover image has pid {}, Prepare announced {:?}",
                        image.root_pid(),
                        self.pid
                    )));
                }
                if self.source_host.as_ref() != Some(&image.host) {
                    return Err(WireError::Invalid(
                        "Switchover image was taken on a host other than the one in Hello".into(),
                    ));
                }
                Phase::Restoring
            }
            (Phase::Running, ControlMsg::Done) => Phase::Closed,
            (p, ControlMsg::Abort { .. }) if p != Phase::Running && p != Phase::Closed => {
                Phase::Closed
            }
            _ => return Err(self.unexpected(kind)),
        };
        self.phase = next;
        Ok(())
    }

    /// Takes a control message this side is about to send: checks that it
    /// is legal now and advances. An error here is a bug of this side.
    pub fn sent(&mut self, msg: &ControlMsg) -> Result<(), WireError> {
        let kind = msg.kind();
        let next = match (self.phase, msg) {
            (Phase::Greeted, ControlMsg::HelloAck { .. }) => Phase::AwaitPrepare,
            (Phase::Greeted | Phase::Checking | Phase::Resuming, ControlMsg::Refuse { .. }) => {
                Phase::Closed
            }
            (Phase::Resuming, ControlMsg::LazyResumed { .. }) => Phase::Lazy,
            (Phase::Checking, ControlMsg::Ready) => Phase::PreCopy,
            (Phase::Restoring, ControlMsg::Running { pid, .. }) => {
                if !self.all_passes_complete() {
                    return Err(WireError::Invalid(
                        "Running sent before every page batch arrived".into(),
                    ));
                }
                if self.pid != Some(*pid) {
                    return Err(WireError::Invalid(format!(
                        "Running with pid {pid}, Prepare announced {:?}",
                        self.pid
                    )));
                }
                if self.lazy {
                    Phase::Lazy
                } else {
                    Phase::Running
                }
            }
            (Phase::Restoring, ControlMsg::Failed { .. }) => Phase::Closed,
            (Phase::Lazy, ControlMsg::PageRequest { .. }) => Phase::Lazy,
            (Phase::Lazy, ControlMsg::LazyComplete { .. }) => Phase::Running,
            (p, ControlMsg::Abort { .. }) if p != Phase::Running && p != Phase::Closed => {
                Phase::Closed
            }
            _ => return Err(self.unexpected(kind)),
        };
        self.phase = next;
        Ok(())
    }

    /// Checks that a lazy page frame (`LazyPages`) is legal now: in
    /// [`Phase::Lazy`], and in [`Phase::Running`] of a lazy migration (late
    /// duplicates after `LazyComplete`, which the caller ignores). Whether its
    /// runs are owed is [`super::LazyFrame::decode_batch`]'s job.
    pub fn lazy_frame(&self) -> Result<(), WireError> {
        match self.phase {
            Phase::Lazy => Ok(()),
            Phase::Running if self.lazy => Ok(()),
            _ => Err(self.unexpected(MsgKind::LazyPages)),
        }
    }

    /// Takes a page frame of pass `pass` covering `pages` pages with
    /// `bytes` encoded batch bytes (call it after the batch decoded and its
    /// runs were checked, so the counts are the real ones).
    ///
    /// [`PageAdmit::Wait`] for a frame of the pass after the last one
    /// started, while more passes may still start (not after `Switchover`
    /// or `LazyPlan`); an error for a pass that
    /// can no longer receive batches, or if the pass now has more than its
    /// `PassEnd` declared.
    pub fn page_batch(
        &mut self,
        pass: u32,
        pages: u64,
        bytes: u64,
    ) -> Result<PageAdmit, WireError> {
        let open = matches!(self.phase, Phase::PreCopy | Phase::InPass(_));
        if !open && self.phase != Phase::Restoring {
            return Err(self.unexpected(MsgKind::Pages));
        }
        let started = self.passes.len() as u32;
        if pass >= started {
            if open && !self.lazy && pass == started && pass < MAX_PASSES {
                return Ok(PageAdmit::Wait);
            }
            return Err(WireError::Invalid(format!(
                "page frame for pass {pass}, but only {started} passes started"
            )));
        }
        let t = &mut self.passes[pass as usize];
        if t.complete() {
            return Err(WireError::Invalid(format!(
                "page frame for pass {pass}, which already received all it declared"
            )));
        }
        t.received.batches += 1;
        t.received.pages = t.received.pages.saturating_add(pages);
        t.received.bytes = t.received.bytes.saturating_add(bytes);
        t.check(pass as usize)?;
        Ok(PageAdmit::Accept)
    }
}
