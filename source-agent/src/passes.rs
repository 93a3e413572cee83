//! The source's ptrace thread: pre-copy passes while the process runs,
//! then the freeze and the final pass, reported as [`Event`]s for the
//! network side to send, and the kill-or-thaw decision at the end.
//!
//! ```text
//!  freeze ─ tracker on ─ thaw
//!  pass 0: PassStart(layout) Batch.. PassEnd      (process running)
//!  pass n: PassStart(layout) Batch.. PassEnd      (written pages, and areas
//!          the new layout remaps on the destination, whole: pass_ranges)
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
use ferry_engine::restore::memory::remapped;
use ferry_engine::track::{self, DirtyTracker, PageRange};
use ferry_protocol::model::{TreeImage, Vma};
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
        image: Box<TreeImage>,
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

/// What the next pass, in layout `vmas`, must send: `dirty` (the pages
/// the tracker found written since the previous pass; `None` for pass 0
/// and stop-and-copy: everything) plus, whole, every private area the
/// destination maps afresh for this pass because it is not exactly as in
/// `layout`, the previous pass's layout ([`remapped`]).
///
/// The tracker does not report such an area when its pages did not change
/// here (an area split by an `munmap`/`mmap` or `mprotect` of a part, areas
/// merged, an area moved back to where it was); and where it does report
/// one (moved by `mremap`), [`DedupSink`] would skip every page already sent
/// at that address, so the hashes of those areas (and of areas gone) are
/// forgotten too. The layout in which the tracker collected `dirty` may
/// differ from `vmas` (the process runs in between); this rule makes that
/// harmless. An area that changed identity without changing its `Vma`
/// (unmapped and mapped again, or moved away and back, in between) keeps
/// its pages on the destination, but it lost its write protection, so a
/// collect reports it whole, its empty pages as zero pages that drop what
/// the destination has there.
///
/// `layout` becomes `vmas`: what the destination has mapped from now on.
fn pass_ranges(
    layout: &mut Vec<Vma>,
    hashes: &mut PageHashes,
    vmas: &[Vma],
    dirty: Option<Vec<PageRange>>,
) -> Option<Vec<PageRange>> {
    let prev = std::mem::replace(layout, vmas.to_vec());
    // Areas gone (or changed): what was sent there is gone too.
    for v in remapped(vmas, &prev) {
        hashes.forget_range(v.start, v.end);
    }
    let mut d = dirty?;
    for v in remapped(&prev, vmas) {
        if memory::has_private_pages(&v) {
            hashes.forget_range(v.start, v.end);
            d.push(PageRange {
                start: v.start,
                end: v.end,
            });
        }
    }
    track::normalize(&mut d);
    Some(d)
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
    /// The layout of the last pass sent (empty before pass 0): what the
    /// destination has mapped.
    layout: Vec<Vma>,
    pass: u32,
    /// A lazy switchover follows the passes.
    lazy: bool,
}

impl Source {
    /// Passes while the process runs, until the policy says switch.
    fn live_passes(&mut self) -> ferry_engine::Result<SwitchReason> {
        if let Some(r) = self.policy.decide(&[], 0) {
            if self.lazy {
                self.layout_pass()?;
            }
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
            let ranges = pass_ranges(&mut self.layout, &mut self.hashes, &vmas, dirty.take());
            let end = send_pass(
                self.pid,
                self.pass,
                &vmas,
                ranges.as_deref(),
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

    /// Lazy at once: a pass with the layout only, while the process runs,
    /// so that the destination builds the process (stub, areas) before the
    /// freeze rather than during it; the frozen pass then only adjusts the
    /// layout.
    fn layout_pass(&mut self) -> ferry_engine::Result<()> {
        let vmas = memory::collect_vmas(self.pid)?;
        send_pass(
            self.pid,
            self.pass,
            &vmas,
            Some(&[]),
            &mut self.hashes,
            &self.tx,
            false,
        )?;
        self.layout = vmas;
        self.pass += 1;
        Ok(())
    }

    /// With the process frozen: the pages written since the last pass and
    /// the areas remapped since ([`pass_ranges`]), or everything for
    /// stop-and-copy. The tracker stays registered: taking write protection
    /// off costs time in proportion to the memory, so it happens after the
    /// decision, outside the downtime (and not at all when the process is
    /// killed).
    fn final_dirty(&mut self, vmas: &[Vma]) -> ferry_engine::Result<Option<Vec<PageRange>>> {
        let d = match self.tracker.as_mut() {
            Some(t) => {
                let mut d = std::mem::take(&mut self.carried);
                t.collect(vmas, &mut d)?;
                Some(d)
            }
            None => None,
        };
        Ok(pass_ranges(&mut self.layout, &mut self.hashes, vmas, d))
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
        layout: Vec::new(),
        pass: 0,
        lazy,
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
    if let Some(why) = network_refusal(&c) {
        src.stop_tracker();
        let _ = c.thaw();
        return Err(format!("process {pid} cannot be migrated: {why}"));
    }
    let vmas = c.task().vmas.clone();
    let mut owed = None;
    let last = src.final_dirty(&vmas).and_then(|dirty| {
        // Lazy: only what must go now; the rest stays owed.
        let eager = if lazy {
            let plan = lazy::plan::plan(pid, &vmas, dirty.as_deref(), &c.task().threads)?;
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
    let image = Box::new(c.tree.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::model::{VmaKind, PAGE_SIZE};

    fn anon(start: u64, end: u64, prot: i32) -> Vma {
        Vma {
            start: start * PAGE_SIZE,
            end: end * PAGE_SIZE,
            prot: prot as u32,
            flags: libc::MAP_PRIVATE as u32,
            kind: VmaKind::Anonymous,
            name: None,
        }
    }

    fn range(start: u64, end: u64) -> PageRange {
        PageRange {
            start: start * PAGE_SIZE,
            end: end * PAGE_SIZE,
        }
    }

    /// Whether a page at `page` is still known as sent.
    fn known(h: &mut PageHashes, page: u64) -> bool {
        let zero = [0u8; PAGE_SIZE as usize];
        let k = !h.changed(page * PAGE_SIZE, &zero);
        if !k {
            h.forget(page * PAGE_SIZE, 1);
        }
        k
    }

    /// Areas the destination maps afresh go whole into the next pass and
    /// lose their hashes; areas kept as they were do not.
    #[test]
    fn remapped_areas_are_sent_again_whole() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let vdso = Vma {
            kind: VmaKind::Special {
                name: "[vdso]".into(),
            },
            ..anon(0x900, 0x902, libc::PROT_READ | libc::PROT_EXEC)
        };
        let mut layout = Vec::new();
        let mut hashes = PageHashes::default();
        let zero = [0u8; PAGE_SIZE as usize];
        // Pass 0: everything; the layout is recorded.
        let first = vec![anon(0x10, 0x20, rw), anon(0x40, 0x50, rw), vdso.clone()];
        assert_eq!(pass_ranges(&mut layout, &mut hashes, &first, None), None);
        assert_eq!(layout, first);
        for p in (0x10..0x20).chain(0x40..0x50) {
            hashes.changed(p * PAGE_SIZE, &zero);
        }
        // Same layout: only what the tracker found.
        let d = pass_ranges(
            &mut layout,
            &mut hashes,
            &first,
            Some(vec![range(0x12, 0x13)]),
        );
        assert_eq!(d, Some(vec![range(0x12, 0x13)]));
        assert!(known(&mut hashes, 0x12) && known(&mut hashes, 0x45));
        // The second area is split (a part unmapped and mapped again, or
        // made read-only): both parts are new to the destination.
        let split = vec![
            anon(0x10, 0x20, rw),
            anon(0x40, 0x48, rw),
            anon(0x48, 0x50, libc::PROT_READ),
            vdso.clone(),
        ];
        let d = pass_ranges(
            &mut layout,
            &mut hashes,
            &split,
            Some(vec![range(0x11, 0x12)]),
        );
        assert_eq!(d, Some(vec![range(0x11, 0x12), range(0x40, 0x50)]));
        assert!(known(&mut hashes, 0x12), "kept area keeps its hashes");
        assert!(!known(&mut hashes, 0x41) && !known(&mut hashes, 0x4f));
        // Back as it was: remapped again. The first area goes away.
        hashes.changed(0x41 * PAGE_SIZE, &zero);
        let back = vec![anon(0x40, 0x50, rw), vdso];
        let d = pass_ranges(&mut layout, &mut hashes, &back, Some(Vec::new()));
        assert_eq!(d, Some(vec![range(0x40, 0x50)]));
        assert!(!known(&mut hashes, 0x41), "remapped area forgotten");
        assert!(!known(&mut hashes, 0x12), "area gone forgotten");
        assert_eq!(layout, back);
    }
}

/// What the frozen tree holds that live migration cannot move yet (it may
/// have forked or mapped shared memory since the check before Prepare).
fn network_refusal(c: &Captured) -> Option<String> {
    let t = &c.tree;
    if t.tasks.len() > 1 || !t.zombies.is_empty() {
        return Some(format!(
            "it has {} child process(es) now: live migration of a process tree is not supported yet",
            t.tasks.len() - 1 + t.zombies.len()
        ));
    }
    if !t.shmem.is_empty() {
        return Some("it maps shared memory now: live migration of shared memory is not supported yet".into());
    }
    None
}
