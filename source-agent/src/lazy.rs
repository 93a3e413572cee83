//! The source's lazy phase (`migrate --lazy`): once the destination runs
//! the process, serve the pages it still lacks from the frozen copy here.
//!
//! ```text
//!  control stream  ◀── PageRequest{addr, pages} ── a thread faulted there
//!  reply stream    ──▶ LazyPages(Requested)       high priority, at once
//!  push streams    ──▶ LazyPages(Pushed)          everything else, in address
//!                                                 order from the last fault on
//!  control stream  ◀── LazyComplete{stats}        every page arrived: kill
//! ```
//!
//! Pages are read from the frozen process (it stays stopped under ptrace on
//! the ptrace thread) with `process_vm_readv` on a thread of its own, which
//! also packs and compresses them. A page is pushed at most once per
//! connection; a request is answered whether or not the page was pushed
//! already (the destination asks only for pages it has not received).
//!
//! If the connection dies (the link stayed down past the idle timeout; not
//! an `Abort`, not a protocol error), the frozen copy and the page thread
//! stay: `migrate` connects again every second until `--lazy-timeout`
//! passes, sends `LazyResume {pid}` instead of `Prepare`, and the
//! destination's `LazyResumed {owed}` says exactly which pages are still
//! to send (pages pushed on the dead connection may never have arrived);
//! the page thread gets the new streams and goes on.

use anyhow::{anyhow, bail, Context, Result};
use ferry_protocol::model::PAGE_SIZE;
use ferry_protocol::packer::PagePacker;
use ferry_protocol::pages::PageWriterOptions;
use ferry_protocol::wire::{
    ControlMsg, LazyOrigin, LazyStats, ProtocolVersion, WireError, LAZY_MINOR,
};
use ferry_transport::frames::{recv_control, send_control, send_lazy_page};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Pages read per push step (contiguous, inside one span).
const PUSH_CHUNK_PAGES: u64 = 64;
/// Encoded batches queued per push stream.
const PUSH_QUEUE: usize = 4;
/// Unidirectional streams for the background push.
const PUSH_STREAMS: usize = 2;

/// The owed pages of a lazy switchover and which of them were sent.
#[derive(Debug, Clone)]
pub struct OwedPages {
    /// Spans `(addr, pages)`, sorted.
    spans: Vec<(u64, u64)>,
    /// Index of each span's first page among all owed pages.
    first: Vec<u64>,
    sent: Vec<u64>,
    unsent: u64,
    /// Next page to push: (span, page within it).
    cursor: (usize, u64),
}

impl OwedPages {
    /// Owed `spans` (`(addr, pages)`, sorted and disjoint), none sent yet.
    pub fn new(spans: Vec<(u64, u64)>) -> Self {
        let mut first = Vec::with_capacity(spans.len());
        let mut total = 0u64;
        for s in &spans {
            first.push(total);
            total += s.1;
        }
        OwedPages {
            spans,
            first,
            sent: vec![0; total.div_ceil(64) as usize],
            unsent: total,
            cursor: (0, 0),
        }
    }

    /// Pages owed in all.
    pub fn total(&self) -> u64 {
        self.first
            .last()
            .zip(self.spans.last())
            .map_or(0, |(f, s)| f + s.1)
    }

    /// Pages not sent yet.
    pub fn unsent(&self) -> u64 {
        self.unsent
    }

    /// The span holding `addr`.
    fn span_of(&self, addr: u64) -> Option<usize> {
        let i = self.spans.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (a, n) = self.spans[i];
        (addr < a + n * PAGE_SIZE).then_some(i)
    }

    /// `[addr, addr + pages)` cut at span boundaries, as `(addr, pages)`
    /// pieces; `None` unless every page is owed (spans may touch, and the
    /// destination merges touching spans into one run).
    pub fn pieces(&self, addr: u64, pages: u64) -> Option<Vec<(u64, u64)>> {
        if !addr.is_multiple_of(PAGE_SIZE) || pages == 0 {
            return None;
        }
        let mut out = Vec::new();
        let (mut a, mut left) = (addr, pages);
        while left > 0 {
            let (s, n) = self.spans[self.span_of(a)?];
            let k = ((s + n * PAGE_SIZE - a) / PAGE_SIZE).min(left);
            out.push((a, k));
            a += k * PAGE_SIZE;
            left -= k;
        }
        Some(out)
    }

    fn bit(&self, i: u64) -> bool {
        self.sent[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// After a reconnect: exactly the pages of `owed` (`(addr, pages)`, by
    /// source address) are unsent, every other page counts as sent. An
    /// error names a span that is not owed (the list is left unchanged).
    pub fn reset_to(&mut self, owed: &[(u64, u64)]) -> Result<(), String> {
        let mut pieces = Vec::new();
        for &(addr, pages) in owed {
            match self.pieces(addr, pages) {
                Some(p) => pieces.extend(p),
                None => return Err(format!("{pages} pages at {addr:#x} were never owed")),
            }
        }
        let total = self.total();
        for w in &mut self.sent {
            *w = !0;
        }
        // Bits beyond the last page stay clear.
        if !total.is_multiple_of(64) {
            if let Some(last) = self.sent.last_mut() {
                *last = (1u64 << (total % 64)) - 1;
            }
        }
        self.unsent = 0;
        for (addr, pages) in pieces {
            let Some(s) = self.span_of(addr) else {
                continue;
            };
            let base = self.first[s] + (addr - self.spans[s].0) / PAGE_SIZE;
            for i in base..base + pages {
                if self.bit(i) {
                    self.sent[(i / 64) as usize] &= !(1 << (i % 64));
                    self.unsent += 1;
                }
            }
        }
        Ok(())
    }

    /// Record `[addr, addr + pages)` (inside one span) as sent.
    pub fn mark_sent(&mut self, addr: u64, pages: u64) {
        let Some(s) = self.span_of(addr) else { return };
        let base = self.first[s] + (addr - self.spans[s].0) / PAGE_SIZE;
        for i in base..base + pages.min(self.spans[s].1 - (base - self.first[s])) {
            if !self.bit(i) {
                self.sent[(i / 64) as usize] |= 1 << (i % 64);
                self.unsent -= 1;
            }
        }
    }

    /// Push on from `addr` (the neighbourhood of a recent fault).
    pub fn seek(&mut self, addr: u64) {
        if let Some(s) = self.span_of(addr) {
            self.cursor = (s, (addr - self.spans[s].0) / PAGE_SIZE);
        }
    }

    /// The next unsent pages from the cursor on (wrapping around once), at
    /// most `max`, contiguous inside one span: `(addr, pages)`.
    pub fn next_chunk(&mut self, max: u64) -> Option<(u64, u64)> {
        if self.unsent == 0 || self.spans.is_empty() {
            return None;
        }
        let (mut s, mut p) = self.cursor;
        // At most one full turn over the spans.
        for _ in 0..=self.spans.len() {
            if s >= self.spans.len() {
                s = 0;
                p = 0;
            }
            let (a, n) = self.spans[s];
            while p < n && self.bit(self.first[s] + p) {
                p += 1;
            }
            if p < n {
                let start = p;
                while p < n && p - start < max && !self.bit(self.first[s] + p) {
                    p += 1;
                }
                self.cursor = (s, p);
                return Some((a + start * PAGE_SIZE, p - start));
            }
            s += 1;
            p = 0;
        }
        None
    }
}

/// What the lazy phase did, as both sides saw it.
#[derive(Debug, Clone, Default)]
pub struct LazyReport {
    /// Pages owed at the switchover.
    pub owed_pages: u64,
    /// The destination's account.
    pub stats: LazyStats,
    /// Requests answered here.
    pub requests: u64,
    /// From Running to LazyComplete, as seen here.
    pub duration: Duration,
    /// Times the lazy phase moved to a new connection.
    pub reconnects: u32,
    /// UDP bytes sent on the connections lost meanwhile.
    pub earlier_bytes: u64,
}

/// How the lazy phase is run.
#[derive(Debug, Clone, Copy)]
pub struct LazyOptions {
    /// Cap on the background push, bytes per second of memory (`None`: as
    /// fast as the link goes).
    pub push_rate: Option<f64>,
    /// How long to try to reconnect after the connection was lost.
    pub reconnect_timeout: Duration,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            push_rate: None,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }
}

/// `migrate --lazy-timeout` by default, in seconds.
pub const DEFAULT_RECONNECT_SECS: u64 = 30;
const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(DEFAULT_RECONNECT_SECS);
/// Pause between two connection attempts.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Longest one connection attempt (handshake, Hello, LazyResume) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the lazy phase runs: the destination's address and the endpoint
/// to reconnect from.
pub struct Peer<'a> {
    /// The client endpoint of the migration.
    pub ep: &'a quinn::Endpoint,
    /// The destination.
    pub addr: SocketAddr,
}

/// What the page thread is told.
enum PagerCmd {
    /// Send these pages first.
    Request(u64, u32),
    /// A new connection: the destination lacks exactly `owed`; send on
    /// these streams from now on.
    Reconnected {
        owed: Vec<(u64, u64)>,
        streams: Senders,
    },
}

/// The page thread's outlets: the reply stream and the push streams.
struct Senders {
    reply: mpsc::Sender<Vec<u8>>,
    push: Vec<mpsc::Sender<Vec<u8>>>,
}

/// The writer tasks of one connection's page streams.
struct Streams {
    senders: Senders,
    writers: tokio::task::JoinSet<Result<()>>,
}

/// Open the reply stream and the push streams on `conn`.
async fn open_streams(conn: &quinn::Connection) -> Result<Streams> {
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut push = Vec::new();
    let mut writers = tokio::task::JoinSet::new();
    // Replies first: the stream a faulting thread waits on.
    let mut reply = conn.open_uni().await.context("opening the reply stream")?;
    let _ = reply.set_priority(10);
    writers.spawn(async move {
        while let Some(b) = reply_rx.recv().await {
            send_lazy_page(&mut reply, LazyOrigin::Requested, &b)
                .await
                .context("sending requested pages")?;
        }
        reply.finish().context("finishing the reply stream")?;
        Ok::<(), anyhow::Error>(())
    });
    for i in 0..PUSH_STREAMS {
        let mut s = conn.open_uni().await.context("opening a push stream")?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PUSH_QUEUE);
        push.push(tx);
        writers.spawn(async move {
            while let Some(b) = rx.recv().await {
                send_lazy_page(&mut s, LazyOrigin::Pushed, &b)
                    .await
                    .with_context(|| format!("pushing pages on stream {i}"))?;
            }
            s.finish().context("finishing a push stream")?;
            Ok::<(), anyhow::Error>(())
        });
    }
    Ok(Streams {
        senders: Senders {
            reply: reply_tx,
            push,
        },
        writers,
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Read the control stream on a task of its own (reads are not
/// cancellation-safe; the loop below selects on several things).
fn read_control(
    mut recv: quinn::RecvStream,
) -> (mpsc::Receiver<Result<ControlMsg, WireError>>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            let r = recv_control(&mut recv).await;
            let stop = r.is_err();
            if tx.send(r).await.is_err() || stop {
                break;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

/// True if `conn` died of silence (the link went away), as opposed to
/// being closed by either side on purpose.
fn link_lost(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
    )
}

/// Why a resume attempt did not work.
enum ResumeError {
    /// The destination answered no: final.
    Refused(String),
    /// The attempt failed (link still down, ...): try again.
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for ResumeError {
    fn from(e: E) -> Self {
        ResumeError::Failed(e.into())
    }
}

/// A resumed connection: its control stream and what the destination
/// still lacks.
struct Resumed {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    owed: Vec<(u64, u64)>,
}

/// One attempt: connect, Hello, HelloAck, LazyResume, LazyResumed.
async fn resume_once(peer: &Peer<'_>, pid: i32) -> Result<Resumed, ResumeError> {
    let conn = ferry_transport::connect(peer.ep, peer.addr)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_control(
        &mut send,
        &ControlMsg::Hello {
            version: ProtocolVersion::CURRENT,
            host: ferry_engine::host::host_info(),
            agent: crate::remote::agent(),
        },
    )
    .await?;
    match recv_control(&mut recv).await? {
        ControlMsg::HelloAck { version, agent, .. } => {
            let minor = ProtocolVersion::CURRENT
                .negotiate(version)
                .map_or(0, |v| v.minor);
            if minor < LAZY_MINOR {
                return Err(ResumeError::Refused(format!(
                    "the destination now runs {agent}, protocol {}.{}, without lazy pages",
                    version.major, version.minor
                )));
            }
        }
        ControlMsg::Refuse { reason, .. } => return Err(ResumeError::Refused(reason)),
        m => return Err(anyhow!("protocol error: expected HelloAck, got {}", m.kind()).into()),
    }
    send_control(&mut send, &ControlMsg::LazyResume { pid }).await?;
    match recv_control(&mut recv).await? {
        ControlMsg::LazyResumed { owed } => Ok(Resumed {
            conn,
            send,
            recv,
            owed: owed.iter().map(|s| (s.addr, s.pages)).collect(),
        }),
        ControlMsg::Refuse { reason, .. } | ControlMsg::Abort { reason } => {
            Err(ResumeError::Refused(reason))
        }
        m => Err(anyhow!("protocol error: expected LazyResumed, got {}", m.kind()).into()),
    }
}

/// Connect again, every [`RECONNECT_PAUSE`], until `timeout` passes.
async fn reconnect(
    peer: &Peer<'_>,
    pid: i32,
    timeout: Duration,
    notify: &(dyn Fn(&str) + Sync),
) -> Result<Resumed> {
    let deadline = Instant::now() + timeout;
    let host = peer.addr;
    let mut last: Option<anyhow::Error> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = last
                .map(|e| format!(" (last attempt: {e:#})"))
                .unwrap_or_default();
            bail!(
                "the connection to {host} was lost and could not be re-established within {} s{why}",
                timeout.as_secs()
            );
        }
        notify(&format!(
            "reconnecting to {host} ({} s left)",
            left.as_secs_f64().ceil() as u64
        ));
        let started = Instant::now();
        match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), resume_once(peer, pid)).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(ResumeError::Refused(reason))) => {
                bail!("the destination refused to resume the lazy phase: {reason}")
            }
            Ok(Err(ResumeError::Failed(e))) => {
                tracing::debug!("reconnecting to {host}: {e:#}");
                last = Some(e);
            }
            Err(_) => {
                tracing::debug!("reconnecting to {host}: no answer");
                last = Some(anyhow!("no answer within {:?}", left.min(ATTEMPT_TIMEOUT)));
            }
        }
        let pause = RECONNECT_PAUSE.saturating_sub(started.elapsed());
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
    }
}

/// Serve the owed pages of frozen process `pid` until the destination has
/// all of them. `conn`, `send` and `recv` are the connection and its
/// control stream; after a reconnect `conn` and `send` are the new ones.
/// `unsent` is kept up to date for the progress display, `notify` shows a
/// line of progress (reconnecting).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    conn: &mut quinn::Connection,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    peer: &Peer<'_>,
    pid: i32,
    owed: OwedPages,
    opts: LazyOptions,
    unsent: Arc<AtomicU64>,
    notify: &(dyn Fn(&str) + Sync),
) -> Result<LazyReport> {
    let t0 = Instant::now();
    let owed_pages = owed.total();
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<PagerCmd>();
    let Streams {
        senders,
        mut writers,
    } = open_streams(conn).await?;
    let (mut ctl_rx, mut ctl_reader) = read_control(recv);
    // The page thread that fails says so here.
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    let pager = {
        let unsent = unsent.clone();
        std::thread::Builder::new()
            .name("lazy-pages".into())
            .spawn(move || {
                let r = pager(pid, owed, cmd_rx, senders, opts, unsent);
                if let Err(e) = &r {
                    let _ = fail_tx.send(anyhow!("serving pages: {e:#}"));
                }
                r
            })
            .context("starting the lazy page thread")?
    };
    // Requests until LazyComplete (or a failure).
    let mut requests = 0u64;
    let mut reconnects = 0u32;
    let mut earlier_bytes = 0u64;
    let ended: Result<LazyStats> = loop {
        // An error of the connection: a lost link is reconnected, anything
        // else ends the lazy phase.
        let lost: anyhow::Error = tokio::select! {
            m = ctl_rx.recv() => match m {
                Some(Ok(ControlMsg::PageRequest { addr, pages })) => {
                    requests += 1;
                    if cmd_tx.send(PagerCmd::Request(addr, pages)).is_err() {
                        break Err(anyhow!("the lazy page thread stopped"));
                    }
                    continue;
                }
                Some(Ok(ControlMsg::LazyComplete { stats })) => break Ok(stats),
                Some(Ok(ControlMsg::Abort { reason })) => break Err(anyhow!("the destination gave up: {reason}")),
                Some(Ok(m)) => break Err(anyhow!("protocol error: unexpected {} in the lazy phase", m.kind())),
                Some(Err(e)) => anyhow!(e).context("connection to the destination lost"),
                None => anyhow!("the control stream reader stopped"),
            },
            Some(r) = writers.join_next() => match r {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => break Err(anyhow!("a page stream writer died: {e}")),
            },
            Some(e) = fail_rx.recv() => break Err(e),
        };
        if !link_lost(conn) {
            let e = match ferry_transport::close_error(conn) {
                Some(ce) => anyhow!("{ce}"),
                None => lost,
            };
            break Err(e);
        }
        // The link is gone, not the destination's will: keep the frozen
        // copy and the page thread, and connect again.
        tracing::warn!(
            "lazy phase of process {pid}: {lost:#}; reconnecting for up to {} s",
            opts.reconnect_timeout.as_secs()
        );
        writers.abort_all();
        ctl_reader.0.abort();
        let r = match reconnect(peer, pid, opts.reconnect_timeout, notify).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        earlier_bytes += conn.stats().udp_tx.bytes;
        conn.close(2u32.into(), b"reconnected");
        *conn = r.conn;
        *send = r.send;
        (ctl_rx, ctl_reader) = read_control(r.recv);
        let streams = match open_streams(conn).await {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        writers = streams.writers;
        let owed_now: u64 = r.owed.iter().map(|s| s.1).sum();
        if cmd_tx
            .send(PagerCmd::Reconnected {
                owed: r.owed,
                streams: streams.senders,
            })
            .is_err()
        {
            break Err(anyhow!("the lazy page thread stopped"));
        }
        reconnects += 1;
        tracing::info!(
            "lazy phase of process {pid} resumed on a new connection; {owed_now} pages still owed"
        );
        notify(&format!(
            "resumed on a new connection; {owed_now} pages still owed"
        ));
    };
    drop(cmd_tx);
    let served = crate::remote::join_thread(pager, "the lazy page thread").await?;
    // The page thread's own failure is the reason when it stopped first.
    let stats = match (ended, served) {
        (Ok(s), _) => s,
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(pe)) => {
            tracing::debug!("{e:#}");
            return Err(pe.context("serving pages"));
        }
    };
    // The destination has everything: a stream it stopped reading is fine.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while writers.join_next().await.is_some() {}
    })
    .await;
    drop(ctl_reader);
    Ok(LazyReport {
        owed_pages,
        stats,
        requests,
        duration: t0.elapsed(),
        reconnects,
        earlier_bytes,
    })
}

/// Reads pages of the frozen process into `buf`.
fn read_pages(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    ferry_parasite::mem::read(pid, addr, buf)
        .or_else(|_| ferry_parasite::mem::read_forced(pid, addr, buf))
        .with_context(|| format!("reading {} bytes at {addr:#x} of {pid}", buf.len()))
}

/// Answer one page request on the reply stream; false if it is gone.
fn answer(
    pid: i32,
    (addr, pages): (u64, u32),
    owed: &mut OwedPages,
    packer: &mut PagePacker,
    buf: &mut [u8],
    reply: &mpsc::Sender<Vec<u8>>,
) -> Result<bool> {
    let pages = u64::from(pages);
    let Some(pieces) = owed.pieces(addr, pages) else {
        bail!("the destination asked for {pages} pages at {addr:#x}, which are not owed");
    };
    // One run per span: a run never crosses a span boundary.
    for (a, n) in pieces {
        let b = &mut buf[..(n * PAGE_SIZE) as usize];
        read_pages(pid, a, b)?;
        packer.add(a, b)?;
        owed.mark_sent(a, n);
    }
    packer.finish()?;
    while let Some(mut e) = packer.pop() {
        let bytes = std::mem::take(&mut e.bytes);
        packer.recycle(e);
        if reply.blocking_send(bytes).is_err() {
            return Ok(false);
        }
    }
    owed.seek(addr + pages * PAGE_SIZE);
    Ok(true)
}

fn new_push_packer() -> PagePacker {
    PagePacker::new(PageWriterOptions::default())
}

/// The page thread: answers requests at once, pushes the rest meanwhile.
/// When a stream of the connection is gone, it waits for the streams of a
/// resumed connection ([`PagerCmd::Reconnected`]); it ends when the
/// command channel closes.
fn pager(
    pid: i32,
    mut owed: OwedPages,
    cmds: Receiver<PagerCmd>,
    senders: Senders,
    opts: LazyOptions,
    unsent: Arc<AtomicU64>,
) -> Result<()> {
    let mut reply_packer = PagePacker::new(PageWriterOptions {
        threads: 1,
        batch_bytes: 1 << 20,
        ..PageWriterOptions::default()
    });
    let mut push_packer = new_push_packer();
    let mut buf = vec![0u8; (PUSH_CHUNK_PAGES.max(512) * PAGE_SIZE) as usize];
    let mut ready: VecDeque<Vec<u8>> = VecDeque::new();
    let mut next_stream = 0usize;
    let mut pushed_bytes = 0u64;
    let mut finished = false;
    let mut t0 = Instant::now();
    // `None` while the connection is gone.
    let mut out: Option<Senders> = Some(senders);
    let mut pending: Option<PagerCmd> = None;
    loop {
        // Commands first: requests and new connections.
        let cmd = match pending.take() {
            Some(c) => Some(c),
            None => match cmds.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Disconnected) => return Ok(()),
                Err(TryRecvError::Empty) => None,
            },
        };
        let cmd = match cmd {
            Some(c) => Some(c),
            None if out.is_none() => match cmds.recv_timeout(Duration::from_millis(50)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            },
            None => None,
        };
        match cmd {
            Some(PagerCmd::Request(addr, pages)) => {
                // Without a connection the request is moot: the
                // destination asks again on the resumed one.
                if let Some(o) = &out {
                    let ok = answer(
                        pid,
                        (addr, pages),
                        &mut owed,
                        &mut reply_packer,
                        &mut buf,
                        &o.reply,
                    )?;
                    if !ok {
                        out = None;
                        ready.clear();
                    }
                    unsent.store(owed.unsent(), Ordering::Relaxed);
                }
                continue;
            }
            Some(PagerCmd::Reconnected { owed: now, streams }) => {
                owed.reset_to(&now)
                    .map_err(|e| anyhow!("LazyResumed from the destination: {e}"))?;
                unsent.store(owed.unsent(), Ordering::Relaxed);
                // What was packed or queued for the dead connection is
                // covered by the list: start afresh.
                ready.clear();
                push_packer = new_push_packer();
                finished = false;
                pushed_bytes = 0;
                t0 = Instant::now();
                next_stream = 0;
                out = Some(streams);
                continue;
            }
            None => {}
        }
        let Some(o) = &out else { continue };
        let push = &o.push;
        // Hand encoded push batches to streams with room.
        let mut closed = false;
        while let Some(b) = ready.pop_front() {
            let mut b = Some(b);
            for _ in 0..push.len() {
                let tx = &push[next_stream];
                next_stream = (next_stream + 1) % push.len();
                match tx.try_send(b.take().unwrap_or_default()) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(x)) => b = Some(x),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                break;
            }
            if let Some(x) = b {
                ready.push_front(x);
                break;
            }
        }
        if closed {
            // The connection is gone; the resumed one says what to send.
            out = None;
            ready.clear();
            continue;
        }
        let allowed = opts
            .push_rate
            .is_none_or(|r| (pushed_bytes as f64) < r * t0.elapsed().as_secs_f64());
        let room = ready.len() < 2 * push.len();
        if room && allowed {
            if let Some((addr, pages)) = owed.next_chunk(PUSH_CHUNK_PAGES) {
                let b = &mut buf[..(pages * PAGE_SIZE) as usize];
                read_pages(pid, addr, b)?;
                push_packer.add(addr, b)?;
                owed.mark_sent(addr, pages);
                unsent.store(owed.unsent(), Ordering::Relaxed);
                pushed_bytes += pages * PAGE_SIZE;
                if owed.unsent() == 0 {
                    push_packer.finish()?;
                }
                while let Some(mut e) = push_packer.pop() {
                    ready.push_back(std::mem::take(&mut e.bytes));
                    push_packer.recycle(e);
                }
                continue;
            }
            if !finished {
                finished = true;
                push_packer.finish()?;
                while let Some(mut e) = push_packer.pop() {
                    ready.push_back(std::mem::take(&mut e.bytes));
                    push_packer.recycle(e);
                }
                continue;
            }
        }
        // Nothing to do right now: wait a little for a command.
        let wait = if ready.is_empty() && owed.unsent() == 0 {
            Duration::from_millis(50)
        } else {
            Duration::from_micros(500)
        };
        match cmds.recv_timeout(wait) {
            Ok(c) => pending = Some(c),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn chunks_cover_every_page_once() {
        let mut o = OwedPages::new(vec![(0x1000, 3), (0x10000, 130)]);
        assert_eq!(o.total(), 133);
        let mut seen = Vec::new();
        while let Some((a, n)) = o.next_chunk(64) {
            assert!(n <= 64 && o.pieces(a, n).is_some());
            o.mark_sent(a, n);
            seen.push((a, n));
        }
        assert_eq!(o.unsent(), 0);
        assert_eq!(seen.iter().map(|c| c.1).sum::<u64>(), 133);
        assert_eq!(seen[0], (0x1000, 3));
    }

    #[test]
    fn requests_move_the_cursor_and_are_not_pushed_again() {
        let mut o = OwedPages::new(vec![(0, 100)]);
        o.mark_sent(50 * P, 2);
        o.seek(52 * P);
        assert_eq!(o.next_chunk(10), Some((52 * P, 10)));
        o.mark_sent(52 * P, 10);
        // Wraps around to the start, skipping what was sent.
        o.seek(95 * P);
        assert_eq!(o.next_chunk(100), Some((95 * P, 5)));
        o.mark_sent(95 * P, 5);
        assert_eq!(o.next_chunk(100), Some((0, 50)));
        o.mark_sent(0, 50);
        assert_eq!(o.next_chunk(100), Some((62 * P, 33)));
        o.mark_sent(62 * P, 33);
        assert_eq!(o.next_chunk(100), None);
        assert_eq!(o.unsent(), 0);
        // Marking twice does not count twice.
        o.mark_sent(0, 1);
        assert_eq!(o.unsent(), 0);
    }

    #[test]
    fn a_resume_sets_exactly_the_owed_pages_unsent() {
        let mut o = OwedPages::new(vec![
            (0x10000, 100),
            (0x10000 + 100 * P, 30),
            (0x200000, 70),
        ]);
        assert_eq!(o.total(), 200);
        while let Some((a, n)) = o.next_chunk(64) {
            o.mark_sent(a, n);
        }
        assert_eq!(o.unsent(), 0);
        // Spans that touch may come merged; pieces of both spans.
        let owed = [(0x10000 + 90 * P, 20), (0x200000 + 69 * P, 1)];
        o.reset_to(&owed).unwrap();
        assert_eq!(o.unsent(), 21);
        let mut seen = Vec::new();
        o.seek(0);
        while let Some((a, n)) = o.next_chunk(64) {
            o.mark_sent(a, n);
            seen.push((a, n));
        }
        assert_eq!(
            seen,
            vec![
                (0x10000 + 90 * P, 10),
                (0x10000 + 100 * P, 10),
                (0x200000 + 69 * P, 1)
            ]
        );
        // Nothing owed: everything counts as sent.
        o.reset_to(&[]).unwrap();
        assert_eq!(o.unsent(), 0);
        assert_eq!(o.next_chunk(64), None);
        // Everything owed again.
        o.reset_to(&[(0x10000, 130), (0x200000, 70)]).unwrap();
        assert_eq!(o.unsent(), 200);
        // Pages never owed are refused, and nothing changes.
        let e = o.reset_to(&[(0x10000, 1), (0x300000, 1)]).unwrap_err();
        assert!(e.contains("0x300000"), "{e}");
        assert!(o.reset_to(&[(0x10000, 131)]).is_err());
        assert_eq!(o.unsent(), 200);
        // The bitmap's spare bits stay clear (200 is not a multiple of 64).
        o.reset_to(&[]).unwrap();
        assert!(o.sent.iter().map(|w| w.count_ones() as u64).sum::<u64>() == 200);
    }

    #[test]
    fn covers_only_whole_owed_runs() {
        let o = OwedPages::new(vec![(0x10000, 4)]);
        assert!(o.pieces(0x10000, 4).is_some());
        assert!(o.pieces(0x10000, 5).is_none());
        assert!(o.pieces(0x0f000, 1).is_none());
        assert!(o.pieces(0x10001, 1).is_none());
        assert!(o.pieces(0x10000, 0).is_none());
        // Touching spans: a request across them is cut at the boundary.
        let t = OwedPages::new(vec![(0x10000, 2), (0x12000, 3)]);
        assert_eq!(t.pieces(0x11000, 3), Some(vec![(0x11000, 1), (0x12000, 2)]));
        assert_eq!(t.pieces(0x11000, 5), None);
    }
}
