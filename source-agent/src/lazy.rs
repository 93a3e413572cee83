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
//! also packs and compresses them. A page is pushed at most once; a request
//! is answered whether or not the page was pushed already (the destination
//! asks only for pages it has not received).

use anyhow::{anyhow, bail, Context, Result};
use ferry_protocol::model::PAGE_SIZE;
use ferry_protocol::packer::PagePacker;
use ferry_protocol::pages::PageWriterOptions;
use ferry_protocol::wire::{ControlMsg, LazyOrigin, LazyStats};
use ferry_transport::frames::{recv_control, send_lazy_page};
use std::collections::VecDeque;
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
}

/// How the lazy phase is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LazyOptions {
    /// Cap on the background push, bytes per second of memory (`None`: as
    /// fast as the link goes).
    pub push_rate: Option<f64>,
}

/// Serve the owed pages of frozen process `pid` until the destination has
/// all of them. `send`/`recv` are the control stream; `unsent` is kept up
/// to date for the progress display.
pub async fn serve(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    pid: i32,
    owed: OwedPages,
    opts: LazyOptions,
    unsent: Arc<AtomicU64>,
) -> Result<LazyReport> {
    let t0 = Instant::now();
    let owed_pages = owed.total();
    let (req_tx, req_rx) = std::sync::mpsc::channel::<(u64, u32)>();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut push_txs = Vec::new();
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
        push_txs.push(tx);
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
    // A writer or the page thread that fails says so here (the control
    // stream read below is not cancellation-safe: only a failure may
    // interrupt it).
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    let pager = {
        let unsent = unsent.clone();
        let fail_tx = fail_tx.clone();
        std::thread::Builder::new()
            .name("lazy-pages".into())
            .spawn(move || {
                let r = pager(pid, owed, req_rx, reply_tx, push_txs, opts, unsent);
                if let Err(e) = &r {
                    let _ = fail_tx.send(anyhow!("serving pages: {e:#}"));
                }
                r
            })
            .context("starting the lazy page thread")?
    };
    let watch = tokio::spawn(async move {
        while let Some(r) = writers.join_next().await {
            match r {
                Ok(Err(e)) => {
                    let _ = fail_tx.send(e);
                }
                Err(e) => {
                    let _ = fail_tx.send(anyhow!("a page stream writer died: {e}"));
                }
                Ok(Ok(())) => {}
            }
        }
    });
    // Requests until LazyComplete (or a failure).
    let mut requests = 0u64;
    let ended: Result<LazyStats> = loop {
        tokio::select! {
            m = recv_control(recv) => match m {
                Ok(ControlMsg::PageRequest { addr, pages }) => {
                    requests += 1;
                    if req_tx.send((addr, pages)).is_err() {
                        break Err(anyhow!("the lazy page thread stopped"));
                    }
                }
                Ok(ControlMsg::LazyComplete { stats }) => break Ok(stats),
                Ok(ControlMsg::Abort { reason }) => break Err(anyhow!("the destination gave up: {reason}")),
                Ok(m) => break Err(anyhow!("protocol error: unexpected {} in the lazy phase", m.kind())),
                Err(e) => break Err(anyhow!(e).context("connection to the destination lost")),
            },
            Some(e) = fail_rx.recv() => break Err(e),
        }
    };
    drop(req_tx);
    let served = tokio::task::spawn_blocking(move || pager.join())
        .await
        .context("joining the lazy page thread")?
        .map_err(|_| anyhow!("the lazy page thread panicked"))?;
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
    let _ = tokio::time::timeout(Duration::from_secs(2), watch).await;
    Ok(LazyReport {
        owed_pages,
        stats,
        requests,
        duration: t0.elapsed(),
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

/// The page thread: answers requests at once, pushes the rest meanwhile.
fn pager(
    pid: i32,
    mut owed: OwedPages,
    requests: Receiver<(u64, u32)>,
    reply: mpsc::Sender<Vec<u8>>,
    push: Vec<mpsc::Sender<Vec<u8>>>,
    opts: LazyOptions,
    unsent: Arc<AtomicU64>,
) -> Result<()> {
    let mut reply_packer = PagePacker::new(PageWriterOptions {
        threads: 1,
        batch_bytes: 1 << 20,
        ..PageWriterOptions::default()
    });
    let mut push_packer = PagePacker::new(PageWriterOptions::default());
    let mut buf = vec![0u8; (PUSH_CHUNK_PAGES.max(512) * PAGE_SIZE) as usize];
    let mut ready: VecDeque<Vec<u8>> = VecDeque::new();
    let mut next_stream = 0usize;
    let mut pushed_bytes = 0u64;
    let mut finished = false;
    let t0 = Instant::now();
    loop {
        // Requests first.
        let req = match requests.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Disconnected) => return Ok(()),
            Err(TryRecvError::Empty) => None,
        };
        if let Some(r) = req {
            if !answer(pid, r, &mut owed, &mut reply_packer, &mut buf, &reply)? {
                return Ok(());
            }
            unsent.store(owed.unsent(), Ordering::Relaxed);
            continue;
        }
        // Hand encoded push batches to streams with room.
        while let Some(b) = ready.pop_front() {
            let mut b = Some(b);
            for _ in 0..push.len() {
                let tx = &push[next_stream];
                next_stream = (next_stream + 1) % push.len();
                match tx.try_send(b.take().unwrap_or_default()) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(x)) => b = Some(x),
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                }
            }
            if let Some(x) = b {
                ready.push_front(x);
                break;
            }
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
        // Nothing to do right now: wait a little for a request.
        let wait = if ready.is_empty() && owed.unsent() == 0 {
            Duration::from_millis(50)
        } else {
            Duration::from_micros(500)
        };
        match requests.recv_timeout(wait) {
            Ok(r) => {
                if !answer(pid, r, &mut owed, &mut reply_packer, &mut buf, &reply)? {
                    return Ok(());
                }
                unsent.store(owed.unsent(), Ordering::Relaxed);
            }
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
