//! One migration on one connection, the destination side of the protocol
//! in [`ferry_protocol::wire`]; [`DestState`] enforces the order of the
//! messages.
//!
//! ```text
//! Hello → checks (version, host) → HelloAck | Refuse
//! Prepare → checks (PID/TIDs free, one migration per PID, files identical) → Ready | Refuse
//! PassStart{0} → restorer thread: Restorer::begin
//! page streams (accepted concurrently) → frames → decoded and written on the restorer thread
//! PassEnd → (the pass completes when every declared batch arrived)
//! Switchover → (all passes complete) → finish → Running → resume → Done
//! ```
//!
//! Anything malformed or out of order ends the session with an error: the
//! caller closes the connection with it, and dropping the restorer thread
//! kills what was built.
//!
//! In the lazy phase a lost connection (the idle timeout, not a close by
//! the source) does not end the session: it parks, the lazy thread keeps
//! serving faults, and a new connection from the same source that says
//! `LazyResume {pid}` instead of `Prepare` is handed over to it
//! ([`Shared::lazy_sessions`]); without one within the lazy timeout the
//! process is stopped as before.
//!
//! ```text
//! Hello → HelloAck → LazyResume{pid} → (same fingerprint, lazy phase of pid going on) → hand over | Refuse
//! parked session: LazyResumed{owed} → PageRequest again for every request unanswered → lazy phase
//! ```

mod lazy;

pub use self::lazy::LazyWaiter;
use self::lazy::{deliver_lazy, next_resume, resume, Resumed};
use crate::lazy::{wire_stats, LazyEvent, LazyInbox, LazyThread, Snapshot};
use crate::restorer::{Command, Decoded, Event, RestorerThread};
use anyhow::{anyhow, bail, Context, Result};
use ferry_engine::files::StdioPolicy;
use ferry_engine::lazy::pager::{Origin, Pager};
use ferry_protocol::model::PAGE_SIZE;
use ferry_protocol::model::{HostInfo, TreeImage, TreeLayout};
use ferry_protocol::pages::{BatchDecoder, PageBatch};
use ferry_protocol::wire::{
    check_spans_in_anonymous, find_owed_span, page_decoder, space_areas, ControlMsg, DestState,
    LazyFrame, LazyOrigin, LazyStats, PageFrame, PageSpan, Phase, ProtocolVersion, RefuseCode,
    StreamFrame, WireError, MAX_REASON_LEN, MAX_REQUEST_PAGES,
};
use ferry_transport::frames::{recv_control, recv_stream_frame, send_control};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long the source may take to open the control stream and say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the conversation may stay silent (no message, no page, no
/// answer of the restorer) before the session gives up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for `Done` after `Running`.
pub const DONE_TIMEOUT: Duration = Duration::from_secs(30);
/// Page frames held because their pass has not started yet.
const MAX_HELD_FRAMES: usize = 64;
/// Page frames queued between the stream readers and the session.
const FRAME_QUEUE: usize = 16;
/// Page streams one connection may open.
const MAX_PAGE_STREAMS: usize = 64;
/// How long a lazily restored process may wait for a page from the source
/// before it is stopped (`dest-agent --lazy-timeout`).
pub const DEFAULT_LAZY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a testing aid may stop the agent ([`PAUSE_ENV`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePoint {
    /// After Hello was received.
    Hello,
    /// After Prepare was received.
    Prepare,
    /// After the first page batch of pass 0 was written.
    Pages,
    /// After Switchover was received, before finishing the restore.
    Switchover,
    /// After the restore finished, before Running is sent.
    Restored,
}

/// The environment variable that names a [`PausePoint`].
pub const PAUSE_ENV: &str = "FERRY_DEST_PAUSE_AT";

impl PausePoint {
    /// Every point, with its name.
    pub const ALL: [(PausePoint, &'static str); 5] = [
        (PausePoint::Hello, "hello"),
        (PausePoint::Prepare, "prepare"),
        (PausePoint::Pages, "pages"),
        (PausePoint::Switchover, "switchover"),
        (PausePoint::Restored, "restored"),
    ];

    /// The point called `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(p, _)| *p)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }
}

/// What every session of the daemon shares.
#[derive(Default)]
pub struct Shared {
    /// The testing aid: stop at this point.
    pub pause_at: Option<PausePoint>,
    /// PIDs with a migration in progress (one at a time per PID).
    pub active: Mutex<HashSet<i32>>,
    /// PIDs of restored processes (our children), to reap.
    pub children: Mutex<Vec<i32>>,
    /// The lazy phase's bound on waiting for the source (default
    /// [`DEFAULT_LAZY_TIMEOUT`]).
    pub lazy_timeout: Option<Duration>,
    /// Sessions in the lazy phase, by PID: where a new connection that
    /// resumes one (`LazyResume`) is handed over.
    pub lazy_sessions: Mutex<HashMap<i32, LazyWaiter>>,
    /// Where the output of a tree whose stdio reached outside it goes
    /// (`DIR/ferry-PID.log`).
    pub stdio_dir: std::path::PathBuf,
    /// Where moved service addresses go (`--addr-dev`); default: the
    /// interface whose subnet contains each.
    pub addr_dev: Option<String>,
}

/// Default of [`Shared::stdio_dir`].
pub const DEFAULT_STDIO_DIR: &str = "/var/log/ferry";

/// How [`handle`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The conversation is over: close the connection.
    Finished,
    /// The connection resumes a lazy phase and was handed over to its
    /// session, which now owns it: do not close it.
    HandedOver,
}

/// Close `conn` the way a session that ended with `r` does (an error's
/// text, cut to 512 bytes, is the close reason).
pub fn close_with(conn: &quinn::Connection, r: &Result<()>) {
    match r {
        Ok(()) => conn.close(0u32.into(), b""),
        Err(e) => {
            let reason = cut_to(format!("dest-agent: {e:#}"), 512);
            conn.close(1u32.into(), reason.as_bytes());
        }
    }
}

impl Shared {
    async fn pause(&self, at: PausePoint) {
        if self.pause_at == Some(at) {
            tracing::warn!("pausing at {}", at.name());
            std::future::pending::<()>().await;
        }
    }
}

/// Holds a PID as "migration in progress" until dropped.
struct PidClaim<'a> {
    shared: &'a Shared,
    pid: i32,
}

impl Drop for PidClaim<'_> {
    fn drop(&mut self) {
        lock(&self.shared.active).remove(&self.pid);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn cut(s: String) -> String {
    cut_to(s, MAX_REASON_LEN)
}

/// `s` cut to at most `max` bytes, on a char boundary.
fn cut_to(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut n = max;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
    s
}

fn agent() -> String {
    format!("ferry dest-agent {}", env!("CARGO_PKG_VERSION"))
}

/// The control stream's sending half, with the state machine.
struct Control {
    send: quinn::SendStream,
    state: DestState,
}

impl Control {
    async fn send(&mut self, msg: &ControlMsg) -> Result<()> {
        self.state
            .sent(msg)
            .with_context(|| format!("about to send {}", msg.kind()))?;
        send_control(&mut self.send, msg)
            .await
            .with_context(|| format!("sending {}", msg.kind()))
    }

    /// Send a refusal, let the source read it, and end.
    async fn refuse(&mut self, conn: &quinn::Connection, code: RefuseCode, reason: String) {
        tracing::warn!("refusing: {reason}");
        let msg = ControlMsg::Refuse {
            code,
            reason: cut(reason),
        };
        if let Err(e) = self.send(&msg).await {
            tracing::warn!("{e:#}");
        }
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }
}

fn host_refusal(src: &HostInfo, here: &HostInfo) -> Option<(RefuseCode, String)> {
    let why = ferry_engine::host::incompatibility(src, here)?;
    let code = if src.arch != here.arch {
        RefuseCode::Arch
    } else if src.kernel != here.kernel && src.xstate_size == here.xstate_size {
        RefuseCode::Kernel
    } else {
        RefuseCode::CpuFeatures
    };
    Some((code, format!("incompatible hosts: {why}")))
}

/// Why the process described by Prepare cannot come here.
fn prepare_refusal(
    tids: &[i32],
    exe: &ferry_protocol::wire::FileFacts,
    files: &[ferry_protocol::wire::FileFacts],
) -> Option<(RefuseCode, String)> {
    for &t in tids {
        if ferry_engine::procfs::exists(t) {
            let what = if t == tids[0] { "PID" } else { "PID/TID" };
            return Some((
                RefuseCode::PidTaken,
                format!("{what} {t} is already in use on the destination"),
            ));
        }
    }
    std::iter::once(exe)
        .chain(files)
        .find_map(ferry_engine::facts::file_mismatch)
}

/// Run one migration on `conn`. An error means the session broke off; the
/// caller closes the connection with it.
pub async fn handle(shared: &Shared, conn: &quinn::Connection) -> Result<Outcome> {
    let (send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no control stream within {HELLO_TIMEOUT:?}"))?
        .context("accepting the control stream")?;
    let mut ctl = Control {
        send,
        state: DestState::new(),
    };
    let here = ferry_engine::host::host_info();

    let hello = tokio::time::timeout(HELLO_TIMEOUT, recv_control(&mut recv))
        .await
        .map_err(|_| anyhow!("no Hello within {HELLO_TIMEOUT:?}"))?
        .context("reading Hello")?;
    ctl.state.accept(&hello)?;
    let ControlMsg::Hello {
        host: src_host,
        agent: src_agent,
        ..
    } = hello
    else {
        bail!("expected Hello");
    };
    tracing::info!(agent = %src_agent, "hello");
    shared.pause(PausePoint::Hello).await;
    if let Some((code, reason)) = host_refusal(&src_host, &here) {
        ctl.refuse(conn, code, reason).await;
        return Ok(Outcome::Finished);
    }
    ctl.send(&ControlMsg::HelloAck {
        version: ProtocolVersion::CURRENT,
        host: here,
        agent: agent(),
    })
    .await?;

    let prepare = tokio::time::timeout(IDLE_TIMEOUT, recv_control(&mut recv))
        .await
        .map_err(|_| anyhow!("no Prepare within {IDLE_TIMEOUT:?}"))?
        .context("reading Prepare")?;
    ctl.state.accept(&prepare)?;
    if let ControlMsg::LazyResume { pid } = prepare {
        return resume(shared, conn, ctl, recv, pid).await;
    }
    let ControlMsg::Prepare {
        pid,
        tids,
        exe,
        files,
    } = prepare
    else {
        bail!("expected Prepare");
    };
    tracing::info!(
        pid,
        threads = tids.len(),
        files = files.len() + 1,
        "prepare"
    );
    shared.pause(PausePoint::Prepare).await;
    let claimed = lock(&shared.active).insert(pid);
    if !claimed {
        let reason = format!("a migration of PID {pid} is already in progress here");
        ctl.refuse(conn, RefuseCode::Busy, reason).await;
        return Ok(Outcome::Finished);
    }
    let _claim = PidClaim { shared, pid };
    let refusal = {
        let tids = tids.clone();
        tokio::task::spawn_blocking(move || prepare_refusal(&tids, &exe, &files))
            .await
            .context("checking the process's needs")?
    };
    if let Some((code, reason)) = refusal {
        ctl.refuse(conn, code, reason).await;
        return Ok(Outcome::Finished);
    }
    ctl.send(&ControlMsg::Ready).await?;

    let mut m = Migration {
        shared,
        conn: conn.clone(),
        fingerprint: ferry_transport::peer_fingerprint(conn).map(|f| f.to_string()),
        switched: false,
        lazy_active: false,
        pending_complete: None,
        resume_rx: None,
        ctl,
        pid,
        src_host,
        restorer: None,
        layouts: Vec::new(),
        applied: 0,
        applied_watch: watch::channel(0).0,
        held: Vec::new(),
        shared_layouts: Arc::default(),
        image: None,
        finishing: false,
        switchover_at: None,
        first_batch_seen: false,
        owed: None,
        shared_owed: Arc::default(),
        lazy: None,
        lazy_inbox: Arc::default(),
        lazy_events: mpsc::unbounded_channel(),
        net: crate::netmove::DestNet::default(),
    };
    let r = m.run(recv).await;
    if m.switched {
        // The session ended on a connection of a resumed lazy phase; the
        // caller closes the one it started on.
        close_with(&m.conn, &r);
    }
    r.map(|()| Outcome::Finished)
}

/// Decode a page frame whose pass's layout is known, checking every run
/// against it.
fn decode(
    decoder: &mut BatchDecoder,
    layouts: &RwLock<Vec<Arc<TreeLayout>>>,
    f: PageFrame,
) -> Result<Decoded> {
    let layout = layouts
        .read()
        .ok()
        .and_then(|l| l.get(f.pass as usize).cloned())
        .ok_or_else(|| anyhow!("page frame of pass {} that never started", f.pass))?;
    let vmas = space_areas(&layout, f.space).ok_or_else(|| {
        anyhow!(
            "page frame of pass {} for {}, which the pass's layout does not have",
            f.pass,
            f.space
        )
    })?;
    let mut batch = PageBatch::default();
    f.decode_batch(decoder, &vmas, &mut batch)
        .map_err(|e| anyhow!(e).context(format!("page frame of pass {}", f.pass)))?;
    Ok(Decoded {
        pass: f.pass,
        space: f.space,
        batch,
        bytes: f.batch.len() as u64,
    })
}

/// The migration after Ready.
struct Migration<'a> {
    shared: &'a Shared,
    /// The connection (a new one once a lazy phase resumed).
    conn: quinn::Connection,
    /// The source's TLS fingerprint: only it may resume the lazy phase.
    fingerprint: Option<String>,
    /// The connection is no longer the one the session started on.
    switched: bool,
    /// In the lazy phase until `Done` (registered in
    /// [`Shared::lazy_sessions`]): a lost connection may be resumed.
    lazy_active: bool,
    /// Every page arrived, but `LazyComplete` may not have reached the
    /// source (sent again after a resume).
    pending_complete: Option<LazyStats>,
    /// New connections that resume the lazy phase.
    resume_rx: Option<mpsc::Receiver<Resumed>>,
    ctl: Control,
    pid: i32,
    src_host: HostInfo,
    restorer: Option<RestorerThread>,
    /// The layout of each started pass.
    layouts: Vec<Arc<TreeLayout>>,
    /// Passes whose layout was handed to the restorer thread.
    applied: usize,
    /// `applied`, for the page stream readers: a reader that meets a frame
    /// of a pass not applied yet waits, holding back only its own stream
    /// (QUIC flow control then slows the source). Streams carry passes in
    /// order, so the frames that complete the current pass never wait.
    applied_watch: watch::Sender<u32>,
    /// Frames whose pass's layout is not applied yet.
    held: Vec<Decoded>,
    /// `layouts`, for the stream readers that decode frames.
    shared_layouts: Arc<RwLock<Vec<Arc<TreeLayout>>>>,
    /// The Switchover image, until the restore is finished with it.
    image: Option<Box<TreeImage>>,
    finishing: bool,
    switchover_at: Option<Instant>,
    first_batch_seen: bool,
    /// A lazy switchover: the spans the source still owes.
    owed: Option<Arc<Vec<(u64, u64)>>>,
    /// The same, for the stream readers that decode lazy frames.
    shared_owed: Arc<RwLock<Option<Arc<Vec<PageSpan>>>>>,
    /// The lazy phase's thread, while it runs.
    lazy: Option<LazyThread>,
    /// Its inbox, for the stream readers (set when the lazy phase starts).
    lazy_inbox: Arc<OnceLock<LazyInbox>>,
    lazy_events: (
        mpsc::UnboundedSender<LazyEvent>,
        mpsc::UnboundedReceiver<LazyEvent>,
    ),
    /// The service addresses moving here, and their guards.
    net: crate::netmove::DestNet,
}

/// The tasks reading one connection: the control stream and the page
/// streams (aborted when dropped).
struct Readers {
    ctl_rx: mpsc::Receiver<Result<ControlMsg, WireError>>,
    frame_rx: mpsc::Receiver<Result<Decoded>>,
    frames_open: bool,
    _ctl_reader: AbortOnDrop,
    _accepter: AbortOnDrop,
}

impl Drop for Migration<'_> {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl Migration<'_> {
    async fn run(&mut self, recv: quinn::RecvStream) -> Result<()> {
        let mut rd = self.readers(recv);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        loop {
            // A resumed connection to take, or why the current one ended.
            let r: Result<bool> = tokio::select! {
                msg = rd.ctl_rx.recv() => match msg {
                    Some(Ok(m)) => self.on_control(m, &ev_tx).await,
                    Some(Err(e)) => Err(anyhow!(e).context("control stream")),
                    None => Err(anyhow!("the control stream ended")),
                },
                f = rd.frame_rx.recv(), if rd.frames_open => match f {
                    Some(Ok(f)) => self.on_frame(f).map(|()| false),
                    Some(Err(e)) => Err(e),
                    // No more streams: the connection is going away;
                    // the control stream will say so.
                    None => {
                        rd.frames_open = false;
                        Ok(false)
                    }
                },
                ev = ev_rx.recv() => match ev {
                    Some(ev) => self.on_event(ev, &mut rd.ctl_rx).await,
                    None => Err(anyhow!("the restorer thread is gone")),
                },
                ev = self.lazy_events.1.recv() => match ev {
                    Some(ev) => self.on_lazy_event(ev, &mut rd.ctl_rx).await,
                    // The sender lives in `self`: never None.
                    None => Ok(false),
                },
                res = next_resume(&mut self.resume_rx) => {
                    let Some(res) = res else { continue };
                    // The source saw the old connection die before this
                    // side did (idle timers differ): take the new one.
                    tracing::warn!(pid = self.pid, "the source reconnected; dropping the old connection");
                    self.conn.close(2u32.into(), b"superseded by a resumed connection");
                    drop(rd);
                    match self.resume_with(res).await? {
                        Some(new) => rd = new,
                        None => return Ok(()),
                    }
                    continue;
                }
                // In the lazy phase the lazy thread bounds the silence
                // (pages may flow without the session seeing them).
                _ = tokio::time::sleep(IDLE_TIMEOUT), if self.lazy.is_none() => {
                    Err(anyhow!("nothing happened for {IDLE_TIMEOUT:?} in state {}", self.ctl.state.phase()))
                }
            };
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if self.may_resume() => {
                    drop(rd);
                    let Some(res) = self.park(e).await? else {
                        return Ok(());
                    };
                    match self.resume_with(res).await? {
                        Some(new) => rd = new,
                        None => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Start reading a connection: its control stream (`recv`) and the page
    /// streams the source opens.
    fn readers(&self, recv: quinn::RecvStream) -> Readers {
        // The control stream is read by its own task (reads are not
        // cancellation-safe), page streams by one task each.
        let (ctl_tx, ctl_rx) = mpsc::channel::<Result<ControlMsg, WireError>>(4);
        let ctl_reader = AbortOnDrop(tokio::spawn(async move {
            let mut recv = recv;
            loop {
                let r = recv_control(&mut recv).await;
                let stop = r.is_err();
                if ctl_tx.send(r).await.is_err() || stop {
                    break;
                }
            }
        }));
        let (frame_tx, frame_rx) = mpsc::channel::<Result<Decoded>>(FRAME_QUEUE);
        let conn = self.conn.clone();
        let applied_rx = self.applied_watch.subscribe();
        let layouts = self.shared_layouts.clone();
        let owed = self.shared_owed.clone();
        let inbox = self.lazy_inbox.clone();
        let accepter = AbortOnDrop(tokio::spawn(async move {
            let mut readers = tokio::task::JoinSet::new();
            let mut n = 0usize;
            while let Ok(mut stream) = conn.accept_uni().await {
                n += 1;
                if n > MAX_PAGE_STREAMS {
                    let _ = frame_tx
                        .send(Err(anyhow!("more than {MAX_PAGE_STREAMS} page streams")))
                        .await;
                    break;
                }
                let tx = frame_tx.clone();
                let mut applied = applied_rx.clone();
                let layouts = layouts.clone();
                let owed = owed.clone();
                let inbox = inbox.clone();
                readers.spawn(async move {
                    let mut decoder = page_decoder();
                    loop {
                        match recv_stream_frame(&mut stream).await {
                            Ok(Some(StreamFrame::Pages(f))) => {
                                while f.pass >= *applied.borrow_and_update() {
                                    if applied.changed().await.is_err() {
                                        return;
                                    }
                                }
                                let d = decode(&mut decoder, &layouts, f);
                                if tx.send(d).await.is_err() {
                                    break;
                                }
                            }
                            Ok(Some(StreamFrame::Lazy(f))) => {
                                if let Err(e) = deliver_lazy(&mut decoder, &owed, &inbox, f).await {
                                    let _ = tx.send(Err(e)).await;
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx
                                    .send(Err(anyhow!(e).context(format!("page stream {n}"))))
                                    .await;
                                break;
                            }
                        }
                    }
                });
            }
            // Dropping the set aborts the readers.
            drop(readers);
        }));
        Readers {
            ctl_rx,
            frame_rx,
            frames_open: true,
            _ctl_reader: ctl_reader,
            _accepter: accepter,
        }
    }

    fn restorer(&self) -> Result<&RestorerThread> {
        self.restorer
            .as_ref()
            .ok_or_else(|| anyhow!("no restore in progress"))
    }

    fn command(&self, cmd: Command) -> Result<()> {
        if !self.restorer()?.send(cmd) {
            bail!("the restorer thread is gone");
        }
        Ok(())
    }

    /// A control message; true when the session is over.
    async fn on_control(
        &mut self,
        msg: ControlMsg,
        ev_tx: &mpsc::UnboundedSender<Event>,
    ) -> Result<bool> {
        self.ctl.state.accept(&msg)?;
        match msg {
            ControlMsg::PassStart { pass, layout } => {
                let vmas: usize = layout.tasks.iter().map(|t| t.vmas.len()).sum();
                tracing::info!(
                    pid = self.pid,
                    pass,
                    processes = layout.tasks.len(),
                    vmas,
                    shmem = layout.shmem.len(),
                    "pass start"
                );
                let layout: Arc<TreeLayout> = Arc::from(layout);
                self.layouts.push(layout.clone());
                if let Ok(mut l) = self.shared_layouts.write() {
                    l.push(layout);
                }
                if pass == 0 {
                    let r = RestorerThread::start(format!("restore-{}", self.pid), ev_tx.clone())
                        .context("starting the restorer thread")?;
                    self.restorer = Some(r);
                }
                self.advance()?;
            }
            ControlMsg::PassEnd {
                pass,
                batches,
                pages,
                bytes,
            } => {
                tracing::info!(pid = self.pid, pass, batches, pages, bytes, "pass end");
                self.advance()?;
            }
            ControlMsg::Switchover { image } => {
                self.switchover_at = Some(Instant::now());
                tracing::info!(pid = self.pid, "switchover");
                self.shared.pause(PausePoint::Switchover).await;
                self.net.arrive(self.pid, self.shared.addr_dev.as_deref())?;
                self.image = Some(image);
                self.advance()?;
            }
            ControlMsg::LazyPlan { owed } => {
                let layout = self
                    .layouts
                    .last()
                    .ok_or_else(|| anyhow!("LazyPlan before any pass"))?;
                check_spans_in_anonymous(&owed, &layout.tasks[0].vmas)?;
                let pages: u64 = owed.iter().map(|s| s.pages).sum();
                tracing::info!(pid = self.pid, spans = owed.len(), pages, "lazy plan");
                self.owed = Some(Arc::new(owed.iter().map(|s| (s.addr, s.pages)).collect()));
                if let Ok(mut o) = self.shared_owed.write() {
                    *o = Some(Arc::new(owed));
                }
            }
            ControlMsg::Abort { reason } => {
                // Final: no resume after the source gave up.
                self.unregister();
                if self.lazy.is_some() {
                    // Dropping the lazy thread's handle stops the process.
                    bail!("the source gave up during the lazy phase: {reason}");
                }
                tracing::warn!(pid = self.pid, "the source aborted: {reason}");
                return Ok(true);
            }
            ControlMsg::Done => {
                tracing::info!(pid = self.pid, "source confirmed");
                return Ok(true);
            }
            ControlMsg::NetMove { addrs } => {
                tracing::info!(pid = self.pid, ?addrs, "addresses move here");
                self.net.expect(addrs);
            }
            m => bail!("unexpected {}", m.kind()),
        }
        Ok(false)
    }

    /// Hand the restorer thread what it can take now: the next layout once
    /// the previous pass is complete, the frames held for it, and the
    /// image once every pass is complete.
    fn advance(&mut self) -> Result<()> {
        while self.applied < self.layouts.len()
            && (self.applied == 0 || self.ctl.state.pass_complete(self.applied as u32 - 1))
        {
            let layout = self.layouts[self.applied].clone();
            if self.applied == 0 {
                let stdio = StdioPolicy::in_dir(&self.shared.stdio_dir, self.pid);
                self.command(Command::Begin {
                    host: self.src_host.clone(),
                    layout,
                    stdio,
                })?;
            } else {
                self.command(Command::Relayout { layout })?;
            }
            self.applied += 1;
            let applied = self.applied as u32;
            self.applied_watch.send_replace(applied);
            let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|f| f.pass < applied);
            self.held = later;
            for f in now {
                self.forward(f)?;
            }
        }
        if !self.finishing && self.ctl.state.all_passes_complete() {
            if let Some(image) = self.image.take() {
                self.finishing = true;
                let owed = self.owed.clone();
                self.command(Command::Finish { image, owed })?;
            }
        }
        Ok(())
    }

    fn forward(&self, d: Decoded) -> Result<()> {
        self.command(Command::Pages(d))
    }

    fn on_frame(&mut self, f: Decoded) -> Result<()> {
        let started = self.layouts.len();
        let open = matches!(self.ctl.state.phase(), Phase::PreCopy | Phase::InPass(_));
        if (f.pass as usize) < self.applied {
            return self.forward(f);
        }
        let may_wait = (f.pass as usize) < started || (open && f.pass as usize == started);
        if !may_wait {
            bail!(
                "page frame of pass {} in state {} ({started} passes started)",
                f.pass,
                self.ctl.state.phase()
            );
        }
        if self.held.len() >= MAX_HELD_FRAMES {
            bail!("more than {MAX_HELD_FRAMES} page frames ahead of their pass");
        }
        self.held.push(f);
        Ok(())
    }

    /// An answer of the restorer thread; true when the session is over.
    async fn on_event(
        &mut self,
        ev: Event,
        ctl_rx: &mut mpsc::Receiver<Result<ControlMsg, WireError>>,
    ) -> Result<bool> {
        match ev {
            Event::Layout(r) => {
                if let Err(reason) = r {
                    return self.give_up(reason).await;
                }
            }
            Event::Batch(r) => {
                let (pass, pages, bytes) = r.map_err(|e| anyhow!(e))?;
                self.ctl.state.page_batch(pass, pages, bytes)?;
                if pass == 0 && !self.first_batch_seen {
                    self.first_batch_seen = true;
                    self.shared.pause(PausePoint::Pages).await;
                }
                self.advance()?;
            }
            Event::Finished(Ok((summary, uffd))) => {
                self.shared.pause(PausePoint::Restored).await;
                if let Some(log) = &summary.stdio_log {
                    tracing::info!(
                        pid = self.pid,
                        "output of the tree that went outside it on the source goes to {}",
                        log.display()
                    );
                }
                let restore_us = self
                    .switchover_at
                    .map_or(0, |t| t.elapsed().as_micros() as u64);
                let running = ControlMsg::Running {
                    pid: self.pid,
                    restore_us,
                };
                // Running first: only once it is sent may the process run;
                // if sending fails, the restorer thread is dropped with the
                // session and the stopped process is killed.
                if let Some(e) = ferry_transport::close_error(&self.conn) {
                    bail!("the source is gone before Running: {e}");
                }
                if let (Some(uffd), Some(owed)) = (uffd, &self.owed) {
                    // Faults are served from before the first instruction;
                    // if Running cannot be sent, dropping the thread's
                    // handle stops the process again.
                    let pager = Pager::new(self.pid, uffd.0, owed);
                    let timeout = self.shared.lazy_timeout.unwrap_or(DEFAULT_LAZY_TIMEOUT);
                    let (t, inbox) = LazyThread::start(pager, timeout, self.lazy_events.0.clone())
                        .context("starting the lazy page thread")?;
                    self.lazy = Some(t);
                    let _ = self.lazy_inbox.set(inbox);
                }
                self.ctl.send(&running).await?;
                if self.lazy.is_some() {
                    // From now on a lost connection may be resumed.
                    self.register();
                }
                self.command(Command::Resume)?;
                self.net.open();
                tracing::info!(
                    pid = self.pid,
                    threads = summary.threads,
                    pages = summary.pages,
                    restore_ms = restore_us as f64 / 1e3,
                    "running"
                );
            }
            Event::Finished(Err(reason)) => {
                tracing::warn!(pid = self.pid, "restore failed: {reason}");
                self.ctl
                    .send(&ControlMsg::Failed {
                        reason: cut(reason),
                    })
                    .await?;
                let _ = self.ctl.send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await;
                return Ok(true);
            }
            Event::Resumed(r) => {
                match r {
                    Ok(_) => lock(&self.shared.children).push(self.pid),
                    Err(e) => {
                        // Running was sent: the source kills its copy.
                        tracing::error!(
                            pid = self.pid,
                            "resuming the restored process failed: {e}"
                        );
                    }
                }
                self.restorer = None;
                if self.lazy.is_some() {
                    // The lazy phase goes on: pages, requests, completion.
                    return Ok(false);
                }
                return self.wait_done(ctl_rx).await.map(|()| true);
            }
        }
        Ok(false)
    }

    /// Before Running: tell the source why, and end with that error (the
    /// connection is closed with it, the restorer thread dropped).
    async fn give_up(&mut self, reason: String) -> Result<bool> {
        let _ = self
            .ctl
            .send(&ControlMsg::Abort {
                reason: cut(reason.clone()),
            })
            .await;
        let _ = self.ctl.send.finish();
        Err(anyhow!(reason))
    }

    async fn wait_done(
        &mut self,
        ctl_rx: &mut mpsc::Receiver<Result<ControlMsg, WireError>>,
    ) -> Result<()> {
        let pid = self.pid;
        let got = tokio::time::timeout(DONE_TIMEOUT, ctl_rx.recv()).await;
        if matches!(got, Ok(Some(Err(_))) | Ok(None)) && self.may_resume() {
            // LazyComplete may be lost with the link: park and say it
            // again on the resumed connection.
            bail!("the connection was lost while waiting for Done");
        }
        self.unregister();
        match got {
            Ok(Some(Ok(msg))) => match self.ctl.state.accept(&msg) {
                Ok(()) if msg == ControlMsg::Done => tracing::info!(pid, "source confirmed"),
                Ok(()) => tracing::warn!(pid, "expected Done, got {}", msg.kind()),
                Err(e) => tracing::warn!(pid, "expected Done: {e}"),
            },
            Ok(Some(Err(e))) => tracing::warn!(
                pid,
                "no Done from the source (the process keeps running here): {e}"
            ),
            Ok(None) | Err(_) => tracing::warn!(
                pid,
                "no Done from the source (the process keeps running here)"
            ),
        }
        let _ = self.ctl.send.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_points_by_name() {
        for (p, n) in PausePoint::ALL {
            assert_eq!(PausePoint::parse(n), Some(p));
            assert_eq!(p.name(), n);
        }
        assert_eq!(PausePoint::parse("Hello"), None);
        assert_eq!(PausePoint::parse(""), None);
    }

    #[test]
    fn reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_LEN);
        let c = cut(long);
        assert!(c.len() <= MAX_REASON_LEN && c.chars().all(|ch| ch == 'é'));
        assert_eq!(cut("short".into()), "short");
    }
}
