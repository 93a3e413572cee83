//! The destination's lazy phase: one OS thread per lazily restored process
//! owns its userfaultfds ([`Pager`]), polls them, copies arriving pages in
//! and reports page requests for the session to send to the source.
//!
//! The thread never leaves a fault unanswered forever: if the oldest
//! request waits longer than the configured bound, or the session goes away
//! before every page arrived, it kills the process (and the children it
//! forked meanwhile) *before* closing the userfaultfds — closing them first
//! would let the threads waiting on a fault run on with zero pages.

use ferry_engine::lazy::pager::{Origin, Pager, PagerStats};
use ferry_protocol::pages::PageBatch;
use ferry_protocol::wire::LazyStats;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TryRecvError, UnboundedSender};
use tokio::sync::oneshot;

/// How often the thread looks at the clock and the process when idle.
const TICK: Duration = Duration::from_millis(50);
/// Pushed batches queued for the thread: beyond this the stream readers
/// wait, QUIC's flow control slows the source, and a page asked for by a
/// fault never queues behind a long backlog of pushed ones.
const PUSH_QUEUE: usize = 8;
/// Pushed batches copied between two looks at faults and requested pages.
const PUSH_BURST: usize = 4;
/// No page for this long while some live address space still lacks pages
/// and no request is out: ask the source for them
/// ([`Pager::request_stragglers`]).
const STRAGGLER_AFTER: Duration = Duration::from_secs(1);
/// Pages asked for at most per straggler request round.
const STRAGGLER_PAGES: u64 = 4096;

/// What the lazy thread reports.
#[derive(Debug)]
pub enum LazyEvent {
    /// Ask the source for these pages, `(addr, pages)`.
    Requests(Vec<(u64, u32)>),
    /// Every owed page arrived (or the process is gone); the thread ended.
    Complete(PagerStats),
    /// The process could not be served and was killed; the thread ended.
    Failed(String),
}

/// What the lazy phase still needs from the source, for a resumed
/// connection ([`LazyThread::snapshot`]).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Pages still missing, by source address: `(addr, pages)`, sorted,
    /// merged.
    pub owed: Vec<(u64, u64)>,
    /// Source pages requested and not arrived yet, sorted.
    pub requested: Vec<u64>,
}

/// Where the stream readers deliver lazy pages (clonable; requested pages
/// go ahead of pushed ones).
#[derive(Clone)]
pub struct LazyInbox {
    requested: UnboundedSender<PageBatch>,
    pushed: mpsc::Sender<PageBatch>,
    wake: Arc<UnixStream>,
}

impl LazyInbox {
    /// Hand over a batch; waits while the push queue is full. False once
    /// the lazy phase is over (late duplicates are dropped).
    pub async fn deliver(&self, origin: Origin, batch: PageBatch) -> bool {
        let ok = match origin {
            Origin::Requested => self.requested.send(batch).is_ok(),
            Origin::Pushed => self.pushed.send(batch).await.is_ok(),
        };
        let _ = (&*self.wake).write(&[1]);
        ok
    }
}

/// Handle on a lazy thread; dropping it before the lazy phase completed
/// stops the process (it cannot go on without its memory).
pub struct LazyThread {
    stop: Arc<AtomicBool>,
    /// Why it is stopped, if the session says ([`LazyThread::abandon`]).
    reason: Arc<Mutex<Option<String>>>,
    wake: Arc<UnixStream>,
    queries: UnboundedSender<oneshot::Sender<Snapshot>>,
}

impl Drop for LazyThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&*self.wake).write(&[1]);
    }
}

impl LazyThread {
    /// What the pager still needs (`None` if the thread has ended).
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.queries.send(tx).ok()?;
        let _ = (&*self.wake).write(&[1]);
        rx.await.ok()
    }

    /// Stop the process (if pages are still missing) with this reason in
    /// the log.
    pub fn abandon(self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        drop(self);
    }

    /// Serve `pager` on a new thread; a request unanswered for `timeout`
    /// makes it give up. Pages go in through the returned inbox.
    pub fn start(
        pager: Pager,
        timeout: Duration,
        events: UnboundedSender<LazyEvent>,
    ) -> std::io::Result<(Self, LazyInbox)> {
        let (wake, wake_rx) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let wake = Arc::new(wake);
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let reason = Arc::new(Mutex::new(None));
        let (query_tx, query_rx) = mpsc::unbounded_channel();
        let input = Input {
            requested: req_rx,
            pushed: push_rx,
            wake: wake_rx,
            stop: stop.clone(),
            reason: reason.clone(),
            queries: query_rx,
        };
        // Should this agent die before every page arrived, the guard stops
        // the process (the kernel would close the uffds and let it run on
        // with zero pages).
        let guard = crate::guard::Guard::start(pager.pid())?;
        std::thread::Builder::new()
            .name(format!("lazy-{}", pager.pid()))
            .spawn(move || {
                let ev = run(pager, input, timeout, &events);
                match &ev {
                    LazyEvent::Complete(_) => guard.release(),
                    _ => guard.trip(),
                }
                let _ = events.send(ev);
            })?;
        let inbox = LazyInbox {
            requested: req_tx,
            pushed: push_tx,
            wake: wake.clone(),
        };
        Ok((
            Self {
                stop,
                reason,
                wake,
                queries: query_tx,
            },
            inbox,
        ))
    }
}

/// What the thread reads from.
struct Input {
    requested: mpsc::UnboundedReceiver<PageBatch>,
    pushed: mpsc::Receiver<PageBatch>,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<String>>>,
    queries: mpsc::UnboundedReceiver<oneshot::Sender<Snapshot>>,
}

/// The destination's lazy statistics in the wire's form.
pub fn wire_stats(s: &PagerStats) -> LazyStats {
    LazyStats {
        faults: s.faults,
        pages_requested: s.pages_requested,
        pages_pushed: s.pages_pushed,
        max_fault_wait_us: s.max_fault_wait.as_micros() as u64,
        last_page_us: s.last_page.map_or(0, |d| d.as_micros() as u64),
    }
}

/// True if `pid` exited (gone or a zombie).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Kill the process and what it forked (by PID; they were restored or
/// forked here and cannot go on without their memory).
fn kill_all(pid: i32) {
    for p in crate::guard::with_descendants(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
    }
}

fn run(
    mut pager: Pager,
    mut input: Input,
    timeout: Duration,
    events: &UnboundedSender<LazyEvent>,
) -> LazyEvent {
    let pid = pager.pid();
    let fail = |pager: Pager, why: String| {
        kill_all(pid);
        drop(pager);
        tracing::error!("lazy phase of process {pid} failed; stopped process {pid}: {why}");
        LazyEvent::Failed(why)
    };
    let mut last_check = Instant::now();
    // The last time a page came from the source (or the start).
    let mut last_page = Instant::now();
    loop {
        {
            let mut fds: Vec<PollFd> = pager
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(input.wake.as_fd(), PollFlags::POLLIN));
            // Copies refused while the layout changed are retried soon.
            let tick = if pager.has_deferred() {
                Duration::from_millis(1)
            } else {
                TICK
            };
            let ms = u16::try_from(tick.as_millis()).unwrap_or(u16::MAX);
            if let Err(e) = poll(&mut fds, PollTimeout::from(ms)) {
                if e != nix::errno::Errno::EINTR {
                    return fail(pager, format!("poll: {e}"));
                }
            }
        }
        let mut sink = [0u8; 256];
        while matches!(input.wake.read(&mut sink), Ok(n) if n > 0) {}
        if input.stop.load(Ordering::SeqCst) {
            if pager.is_complete() {
                return LazyEvent::Complete(pager.stats());
            }
            let why = input
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| "the migration ended before every page arrived".to_string());
            return fail(pager, why);
        }
        while let Ok(q) = input.queries.try_recv() {
            let _ = q.send(Snapshot {
                owed: pager.owed_sources(),
                requested: pager.outstanding_requests(),
            });
        }
        // Faults and requested pages first, then a few pushed batches,
        // until nothing is waiting.
        loop {
            if let Err(e) = pager.handle_events() {
                return fail(pager, format!("{e}"));
            }
            let mut busy = false;
            while let Ok(batch) = input.requested.try_recv() {
                busy = true;
                last_page = Instant::now();
                if let Err(e) = pager.arrive(&batch, Origin::Requested) {
                    return fail(pager, format!("{e}"));
                }
            }
            let reqs = pager.take_requests();
            if !reqs.is_empty() && events.send(LazyEvent::Requests(reqs)).is_err() {
                return fail(pager, "the session is gone".to_string());
            }
            for _ in 0..PUSH_BURST {
                match input.pushed.try_recv() {
                    Ok(batch) => {
                        busy = true;
                        last_page = Instant::now();
                        if let Err(e) = pager.arrive(&batch, Origin::Pushed) {
                            return fail(pager, format!("{e}"));
                        }
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !busy || pager.is_complete() {
                break;
            }
        }
        let reqs = pager.take_requests();
        if !reqs.is_empty() && events.send(LazyEvent::Requests(reqs)).is_err() {
            return fail(pager, "the session is gone".to_string());
        }
        if last_check.elapsed() >= TICK {
            last_check = Instant::now();
            if exited(pid) && !pager.is_complete() {
                tracing::warn!(
                    pid,
                    "process {pid} ended during the lazy phase, {} pages still owed: \
                     the rest is not fetched",
                    pager.remaining()
                );
                pager.process_gone();
            }
        }
        if pager.is_complete() {
            return LazyEvent::Complete(pager.stats());
        }
        if last_page.elapsed() > STRAGGLER_AFTER
            && pager.oldest_request().is_none()
            && !pager.has_deferred()
        {
            let asked = pager.request_stragglers(STRAGGLER_PAGES);
            let reqs = pager.take_requests();
            if asked > 0 {
                tracing::debug!(
                    "process {pid}: no page for {:.1} s; asking again for {asked} pages still missing",
                    last_page.elapsed().as_secs_f64()
                );
            }
            if !reqs.is_empty() && events.send(LazyEvent::Requests(reqs)).is_err() {
                return fail(pager, "the session is gone".to_string());
            }
        }
        // Pages still owed and none came for the whole bound (also when no
        // thread is waiting on a fault): the source is gone.
        if last_page.elapsed() > timeout {
            let why = format!(
                "no page from the source for {:.1} s while {} are still missing \
                 ({} in all, with the children it forked) (the limit is {} s): \
                 the source or the link is gone",
                last_page.elapsed().as_secs_f64(),
                pager.remaining(),
                pager.owed_sources().iter().map(|s| s.1).sum::<u64>(),
                timeout.as_secs()
            );
            return fail(pager, why);
        }
        if let Some(t) = pager.oldest_request() {
            if t.elapsed() > timeout {
                return fail(
                    pager,
                    format!(
                        "no page from the source for {:.1} s (the limit is {} s): \
                         the source or the link is gone",
                        t.elapsed().as_secs_f64(),
                        timeout.as_secs()
                    ),
                );
            }
        }
    }
}
