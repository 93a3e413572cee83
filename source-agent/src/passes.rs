//! The source's ptrace thread: pre-copy passes while the process runs,
//! then the freeze and the final pass, reported as [`Event`]s for the
//! network side to send, and the kill-or-thaw decision at the end.
//!
//! ```text
//!  freeze ─ tracker on ─ thaw
//!  pass 0: PassStart(layout) Batch.. PassEnd      (process running)
//!  pass n: PassStart(layout) Batch.. PassEnd      (written pages only)
//!  … until Policy::decide says switch …
//!  freeze ─ capture state ─ last written pages ─ tracker off
//!  pass N: PassStart Batch.. PassEnd, Frozen(image)
//!     (lazy: pass N sends only the eager pages, then LazyPlan(owed))
//!  wait for Decision: Kill (the destination runs it) or Thaw (abort);
//!     lazy: the network side serves the owed pages from the frozen
//!     process meanwhile, then decides Kill
//! ```
//!
//! Everything that needs ptrace happens on this one thread (a ptrace rule).

use crate::precopy::{DedupSink, PageHashes, PassStats, Policy, SwitchReason};
use ferry_engine::dump::{memory, Captured, PageSink};
use ferry_engine::freeze::Frozen;
use ferry_engine::lazy;
use ferry_engine::track::{self, DirtyTracker, PageRange};
use ferry_protocol::model::{ProcessImage, Vma};
use ferry_protocol::packer::{PackError, PagePacker};
use ferry_protocol::pages::PageWriterOptions;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Sender;

/// What the ptrace thread reports, in order.
#[derive(Debug)]
pub enum Event {
    /// The dirty-tracking backend in use (before pass 0).
    Tracker(&'static str),
    /// A pass begins; its pages lie in `vmas`.
    PassStart { pass: u32, vmas: Vec<Vma> },
    /// One encoded page batch of the current pass.
    Batch { pass: u32, bytes: Vec<u8> },
    /// The pass is complete.
    PassEnd { stats: PassEnd },
    /// The process was frozen just now (the final pass follows).
    FreezeStarted,
    /// Lazy switchover: after the final pass, the spans `(addr, pages)` the
    /// source still owes (served from the frozen process).
    LazyPlan { owed: Vec<(u64, u64)> },
    /// The process is frozen, all pages are sent; here is its state.
    Frozen {
        image: Box<ProcessImage>,
        reason: SwitchReason,
    },
}

/// Totals of a pass, as the wire's `PassEnd` wants them, plus timing.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassEnd {
    pub pass: u32,
    pub batches: u64,
    pub pages: u64,
    /// Of `pages`, those sent as zero markers.
    pub zero_pages: u64,
    pub bytes: u64,
    /// Pages found written (or populated) when the pass began.
    pub dirty_pages: u64,
    /// Pages skipped because they held what was already sent.
    pub unchanged: u64,
    pub duration: Duration,
    /// Whether the process was frozen during this pass.
    pub frozen: bool,
}

/// What the network side decides once the destination answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The destination runs the process: kill this copy.
    Kill,
    /// Abort: the process continues here untouched.
    Thaw,
}

/// Sends packed batches of one pass as events.
struct EventSink<'a> {
    packer: PagePacker,
    tx: &'a Sender<Event>,
    pass: u32,
    batches: u64,
    bytes: u64,
}

impl EventSink<'_> {
    fn drain(&mut self) -> ferry_engine::Result<()> {
        while let Some(mut e) = self.packer.pop() {
            self.batches += 1;
            self.bytes += e.bytes.len() as u64;
            let ev = Event::Batch {
                pass: self.pass,
                bytes: std::mem::take(&mut e.bytes),
            };
            self.packer.recycle(e);
            self.tx.blocking_send(ev).map_err(|_| gone())?;
        }
        Ok(())
    }

    fn packed(&mut self, r: Result<(), PackError>) -> ferry_engine::Result<()> {
        r.map_err(|e| ferry_engine::Error::io("packing pages", std::io::Error::other(e)))?;
        self.drain()
    }
}

fn gone() -> ferry_engine::Error {
    ferry_engine::Error::io(
        "sending pages",
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the network side is gone"),
    )
}

impl PageSink for EventSink<'_> {
    fn add(&mut self, addr: u64, data: &[u8]) -> ferry_engine::Result<()> {
        let r = self.packer.add(addr, data);
        self.packed(r)
    }
    fn add_zero(&mut self, addr: u64, pages: u64) -> ferry_engine::Result<()> {
        let r = self.packer.add_zero(addr, pages);
        self.packed(r)
    }
}

/// One pass: PassStart, the pages (all of them, or those in `dirty`), PassEnd.
fn send_pass(
    pid: i32,
    pass: u32,
    vmas: &[Vma],
    dirty: Option<&[PageRange]>,
    hashes: &mut PageHashes,
    tx: &Sender<Event>,
    frozen: bool,
) -> ferry_engine::Result<PassEnd> {
    let t = Instant::now();
    tx.blocking_send(Event::PassStart {
        pass,
        vmas: vmas.to_vec(),
    })
    .map_err(|_| gone())?;
    let mut sink = EventSink {
        packer: PagePacker::new(PageWriterOptions::default()),
        tx,
        pass,
        batches: 0,
        bytes: 0,
    };
    let (sent, unchanged) = {
        let mut dedup = DedupSink::new(&mut sink, hashes);
        memory::dump_pages_in(pid, vmas, dirty, &mut dedup)?;
        (dedup.sent, dedup.unchanged)
    };
    let r = sink.packer.finish();
    sink.packed(r)?;
    let end = PassEnd {
        pass,
        batches: sink.batches,
        pages: sink.packer.stats().pages,
        zero_pages: sink.packer.stats().zero_pages,
        bytes: sink.bytes,
        dirty_pages: dirty.map_or(sent + unchanged, |d| d.iter().map(PageRange::pages).sum()),
        unchanged,
        duration: t.elapsed(),
        frozen,
    };
    tx.blocking_send(Event::PassEnd { stats: end })
        .map_err(|_| gone())?;
    Ok(end)
}

/// The state of the source side between passes.
struct Source {
    pid: i32,
    policy: Policy,
    tx: Sender<Event>,
    hashes: PageHashes,
    history: Vec<PassStats>,
    tracker: Option<Box<dyn DirtyTracker>>,
    /// Written pages collected but not sent yet (go into the final pass).
    carried: Vec<PageRange>,
    pass: u32,
}

impl Source {
    /// Passes while the process runs, until the policy says switch.
    fn live_passes(&mut self) -> ferry_engine::Result<SwitchReason> {
        if let Some(r) = self.policy.decide(&[], 0) {
            return Ok(r);
        }
        // Only taking the userfaultfd needs the process stopped; protecting
        // its memory happens while it runs, before pass 0 reads it.
        let mut f = Frozen::freeze(self.pid)?;
        let started = track::start(self.pid, &mut f);
        f.thaw()?;
        let tracker = self.tracker.insert(started?);
        tracker.arm()?;
        let _ = self.tx.blocking_send(Event::Tracker(tracker.backend()));
        let mut dirty: Option<Vec<PageRange>> = None;
        loop {
            let vmas = memory::collect_vmas(self.pid)?;
            let end = send_pass(
                self.pid,
                self.pass,
                &vmas,
                dirty.as_deref(),
                &mut self.hashes,
                &self.tx,
                false,
            )?;
            self.history.push(PassStats {
                pass: self.pass,
                dirty_pages: end.dirty_pages,
                pages_sent: end.pages,
                bytes_sent: end.bytes,
                duration: end.duration,
            });
            self.pass += 1;
            let vmas = memory::collect_vmas(self.pid)?;
            let mut d = Vec::new();
            tracker.collect(&vmas, &mut d)?;
            let waiting: u64 = d.iter().map(PageRange::pages).sum();
            if let Some(r) = self.policy.decide(&self.history, waiting) {
                self.carried = d;
                return Ok(r);
            }
            dirty = Some(d);
        }
    }

    /// With the process frozen: the pages written since the last pass
    /// (everything for stop-and-copy). The tracker stays registered: taking
    /// write protection off costs time in proportion to the memory, so it
    /// happens after the decision, outside the downtime (and not at all
    /// when the process is killed).
    fn final_dirty(&mut self, vmas: &[Vma]) -> ferry_engine::Result<Option<Vec<PageRange>>> {
        let Some(t) = self.tracker.as_mut() else {
            return Ok(None);
        };
        let mut d = std::mem::take(&mut self.carried);
        t.collect(vmas, &mut d)?;
        track::normalize(&mut d);
        Ok(Some(d))
    }

    fn stop_tracker(&mut self) {
        if let Some(t) = self.tracker.take() {
            if let Err(e) = t.stop() {
                tracing::error!("stopping dirty tracking of {}: {e}", self.pid);
            }
        }
    }
}

/// Run the whole source side of a migration of `pid` on this thread.
/// Errors before [`Event::Frozen`] leave the process running untouched;
/// after it, `decision` says whether to kill the process (it runs on the
/// destination) or let it continue. Returns how long it was frozen.
pub fn run(
    pid: i32,
    policy: Policy,
    lazy: bool,
    tx: Sender<Event>,
    decision: Receiver<Decision>,
) -> Result<Duration, String> {
    let mut src = Source {
        pid,
        policy,
        tx,
        hashes: PageHashes::default(),
        history: Vec::new(),
        tracker: None,
        carried: Vec::new(),
        pass: 0,
    };
    let reason = match src.live_passes() {
        Ok(r) => r,
        Err(e) => {
            src.stop_tracker();
            return Err(format!("pre-copy of process {pid} failed: {e}"));
        }
    };
    let c = match Captured::freeze(pid) {
        Ok(c) => {
            let _ = src.tx.blocking_send(Event::FreezeStarted);
            c
        }
        Err(e) => {
            src.stop_tracker();
            return Err(format!("checkpoint of process {pid} failed: {e}"));
        }
    };
    let vmas = c.image.vmas.clone();
    let mut owed = None;
    let last = src.final_dirty(&vmas).and_then(|dirty| {
        // Lazy: only what must go now; the rest stays owed.
        let eager = if lazy {
            let plan = lazy::plan::plan(pid, &vmas, dirty.as_deref(), &c.image.threads)?;
            owed = Some(plan.owed);
            Some(plan.eager)
        } else {
            dirty
        };
        send_pass(
            pid,
            src.pass,
            &vmas,
            eager.as_deref(),
            &mut src.hashes,
            &src.tx,
            true,
        )
    });
    if let Err(e) = last {
        src.stop_tracker();
        let _ = c.thaw();
        return Err(format!("final pass of process {pid} failed: {e}"));
    }
    let image = Box::new(c.image.clone());
    let plan_sent = match owed {
        Some(owed) => src.tx.blocking_send(Event::LazyPlan { owed }).is_ok(),
        None => true,
    };
    if !plan_sent
        || src
            .tx
            .blocking_send(Event::Frozen { image, reason })
            .is_err()
    {
        src.stop_tracker();
        let _ = c.thaw();
        return Err("the network side is gone".into());
    }
    let d = decision.recv().unwrap_or(Decision::Thaw);
    let r = match d {
        Decision::Kill => {
            let r = c.kill();
            // Its memory is gone with it: just close our userfaultfd.
            if let Some(t) = src.tracker.take() {
                let _ = t.stop();
            }
            r
        }
        Decision::Thaw => {
            // No write protection may stay behind in a process that goes on.
            src.stop_tracker();
            c.thaw()
        }
    };
    r.map_err(|e| format!("{d:?} of process {pid} failed: {e}"))
}
