//! The source's ptrace thread: pre-copy passes while the process tree
//! runs, then the freeze and the final pass, reported as [`Event`]s for the
//! network side to send, and the kill-or-thaw decision at the end.
//!
//! ```text
//!  freeze the tree ─ a tracker on in each process ─ thaw
//!  pass 0: PassStart(layout) Batch.. PassEnd      (tree running)
//!  pass n: PassStart(layout) Batch.. PassEnd      (per process: written
//!          pages, and areas the new layout remaps on the destination,
//!          whole: pass_ranges; shared memory: every page that changed)
//!  … until Policy::decide says switch …
//!  freeze ─ capture state ─ last written pages ─ trackers off
//!  pass N: PassStart Batch.. PassEnd, Frozen(image)
//!     (lazy, one process only: pass N sends only the eager pages, then
//!     LazyPlan(owed))
//!  wait for Decision: Kill (the destination runs it) or Thaw (abort);
//!     lazy: the network side serves the owed pages from the frozen
//!     process meanwhile, then decides Kill
//! ```
//!
//! Each batch belongs to one page space: a process's memory, or a shared
//! memory object's, which goes once however many processes map it. The
//! tree may change during pre-copy: a process that appears (a fork) has no
//! dirty tracker, so every pass reads all of it through the unchanged-page
//! filter; one that is gone is dropped (the destination follows each pass's
//! layout: [`ferry_engine::restore::TreeRestorer::relayout`]).
//!
//! Everything that needs ptrace happens on this one thread (a ptrace rule).

use crate::precopy::{DedupSink, PageHashes, PassStats, Policy, SwitchReason};
use ferry_engine::dump::tree::{live_layout, FrozenTree, Scope};
use ferry_engine::dump::{memory, Captured, PageSink};
use ferry_engine::lazy;
use ferry_engine::restore::memory::remapped;
use ferry_engine::track::{self, DirtyTracker, PageRange};
use ferry_protocol::model::{ShmemId, TreeImage, TreeLayout, Vma};
use ferry_protocol::packer::{PackError, PagePacker};
use ferry_protocol::pages::{PageSpace, PageWriterOptions};
use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Sender;

/// Most bytes of deleted files a migration carries (in the Switchover image).
const MAX_DELETED_BYTES_ON_WIRE: u64 = 32 << 20;

/// What the ptrace thread reports, in order.
#[derive(Debug)]
pub enum Event {
    /// The dirty-tracking backend in use (before pass 0).
    Tracker(&'static str),
    /// A pass begins; its pages lie in `layout`.
    PassStart { pass: u32, layout: Box<TreeLayout> },
    /// One encoded page batch of `space` in the current pass.
    Batch {
        pass: u32,
        space: PageSpace,
        bytes: Vec<u8>,
    },
    /// What the pass sent of each page space (before its `PassEnd`).
    Spaces { sent: Vec<SpaceSent> },
    /// The pass is complete.
    PassEnd { stats: PassEnd },
    /// The tree was frozen just now (the final pass follows).
    FreezeStarted,
    /// Lazy switchover: after the final pass, the spans `(addr, pages)` the
    /// source still owes (served from the frozen process).
    LazyPlan { owed: Vec<(u64, u64)> },
    /// The tree is frozen, all pages are sent; here is its state.
    Frozen {
        image: Box<TreeImage>,
        reason: SwitchReason,
    },
}

/// What one pass sent of one page space.
#[derive(Debug, Clone, Copy)]
pub struct SpaceSent {
    pub space: PageSpace,
    pub pages: u64,
    pub bytes: u64,
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
    /// Whether the tree was frozen during this pass.
    pub frozen: bool,
}

/// What the network side decides once the destination answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The destination runs the tree: kill this copy.
    Kill,
    /// Abort: the tree continues here untouched.
    Thaw,
}

/// Sends packed batches of one page space in one pass as events.
struct EventSink<'a> {
    packer: PagePacker,
    tx: &'a Sender<Event>,
    pass: u32,
    space: PageSpace,
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
                space: self.space,
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

/// Totals of the spaces of one pass.
#[derive(Default)]
struct Tally {
    batches: u64,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    sent: u64,
    unchanged: u64,
}

/// Send the pages of one space through the unchanged-page filter of its
/// hashes: `fill` puts them into the sink it is given.
fn send_space(
    pass: u32,
    space: PageSpace,
    hashes: &mut PageHashes,
    tx: &Sender<Event>,
    tally: &mut Tally,
    fill: &mut dyn FnMut(&mut dyn PageSink) -> ferry_engine::Result<()>,
) -> ferry_engine::Result<()> {
    let mut sink = EventSink {
        packer: PagePacker::new(PageWriterOptions::default()),
        tx,
        pass,
        space,
        batches: 0,
        bytes: 0,
    };
    {
        let mut dedup = DedupSink::new(&mut sink, hashes);
        fill(&mut dedup)?;
        tally.sent += dedup.sent;
        tally.unchanged += dedup.unchanged;
    }
    let r = sink.packer.finish();
    sink.packed(r)?;
    tally.batches += sink.batches;
    tally.bytes += sink.bytes;
    tally.pages += sink.packer.stats().pages;
    tally.zero_pages += sink.packer.stats().zero_pages;
    Ok(())
}

/// One pass: PassStart, the pages of every process (all of them, or those
/// in its `dirty` ranges; `dirty[i]` for `layout.tasks[i]`) and of every
/// shared memory object (read by `shmem`), PassEnd.
fn send_pass(
    pass: u32,
    layout: &TreeLayout,
    dirty: &[Option<Vec<PageRange>>],
    hashes: &mut HashMap<PageSpace, PageHashes>,
    shmem: &mut dyn FnMut(ShmemId, &mut dyn PageSink) -> ferry_engine::Result<()>,
    tx: &Sender<Event>,
    frozen: bool,
) -> ferry_engine::Result<PassEnd> {
    let t = Instant::now();
    tx.blocking_send(Event::PassStart {
        pass,
        layout: Box::new(layout.clone()),
    })
    .map_err(|_| gone())?;
    let mut tally = Tally::default();
    let mut dirty_pages = 0;
    let mut sent = Vec::with_capacity(layout.tasks.len() + layout.shmem.len());
    let mut note = |space: PageSpace, tally: &Tally, (pages, bytes): (u64, u64)| {
        sent.push(SpaceSent {
            space,
            pages: tally.pages - pages,
            bytes: tally.bytes - bytes,
        });
    };
    for (task, d) in layout.tasks.iter().zip(dirty) {
        let pid = task.id.pid;
        let space = PageSpace::Task(pid);
        let h = hashes.entry(space).or_default();
        let before = tally.sent + tally.unchanged;
        let start = (tally.pages, tally.bytes);
        let r = send_space(pass, space, h, tx, &mut tally, &mut |sink| {
            memory::dump_pages_in(pid, &task.vmas, d.as_deref(), sink)
        });
        match r {
            // Gone while the tree runs: the next layout drops it.
            Err(_) if !frozen && !ferry_engine::procfs::exists(pid) => {}
            r => r?,
        }
        note(space, &tally, start);
        dirty_pages += d
            .as_ref()
            .map_or(tally.sent + tally.unchanged - before, |d| {
                d.iter().map(PageRange::pages).sum()
            });
    }
    for obj in &layout.shmem {
        let space = PageSpace::Shmem(obj.id);
        let h = hashes.entry(space).or_default();
        let before = tally.sent;
        let start = (tally.pages, tally.bytes);
        send_space(pass, space, h, tx, &mut tally, &mut |sink| {
            shmem(obj.id, sink)
        })?;
        note(space, &tally, start);
        dirty_pages += tally.sent - before;
    }
    tx.blocking_send(Event::Spaces { sent })
        .map_err(|_| gone())?;
    let end = PassEnd {
        pass,
        batches: tally.batches,
        pages: tally.pages,
        zero_pages: tally.zero_pages,
        bytes: tally.bytes,
        dirty_pages,
        unchanged: tally.unchanged,
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

/// Pre-copy state of one process of the tree.
struct TaskSource {
    pid: i32,
    tracker: Option<Box<dyn DirtyTracker>>,
    /// Written pages collected but not sent yet (go into the final pass).
    carried: Vec<PageRange>,
    /// The layout of the last pass sent (empty before pass 0): what the
    /// destination has mapped.
    layout: Vec<Vma>,
}

/// The state of the source side between passes.
struct Source {
    root: i32,
    policy: Policy,
    tx: Sender<Event>,
    /// Per page space: what was sent.
    hashes: HashMap<PageSpace, PageHashes>,
    history: Vec<PassStats>,
    /// In the last layout's order; empty until the trackers start.
    tasks: Vec<TaskSource>,
    pass: u32,
    /// A lazy switchover follows the passes.
    lazy: bool,
    /// What moves: the tree, or (lazy) the root process alone.
    scope: Scope,
}

impl Source {
    /// The trackers and pass 0's members, with the tree frozen only while
    /// the userfaultfds are taken.
    fn start_trackers(&mut self) -> ferry_engine::Result<()> {
        let mut tree = FrozenTree::freeze_scope(self.root, self.scope)?;
        let mut r = Ok(());
        for (id, f) in tree.tasks.iter_mut() {
            match track::start(id.pid, f) {
                Ok(t) => self.tasks.push(TaskSource {
                    pid: id.pid,
                    tracker: Some(t),
                    carried: Vec::new(),
                    layout: Vec::new(),
                }),
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        tree.thaw()?;
        r?;
        for t in &mut self.tasks {
            if let Some(tr) = t.tracker.as_mut() {
                tr.arm()?;
            }
        }
        if let Some(tr) = self.tasks.first().and_then(|t| t.tracker.as_ref()) {
            let _ = self.tx.blocking_send(Event::Tracker(tr.backend()));
        }
        Ok(())
    }

    /// The running tree's layout.
    fn layout(&self) -> ferry_engine::Result<(TreeLayout, ferry_engine::shmem::ShmemCollector)> {
        live_layout(self.root, self.scope)
    }

    /// Follow the tree's members to `layout`: a process that appeared has no
    /// tracker (every pass reads all of it; the unchanged-page filter keeps
    /// what is sent small), one that is gone loses its tracker and what was
    /// sent of it.
    fn follow(&mut self, layout: &TreeLayout) {
        let mut old = std::mem::take(&mut self.tasks);
        for t in &layout.tasks {
            let pid = t.id.pid;
            match old.iter().position(|o| o.pid == pid) {
                Some(i) => self.tasks.push(old.swap_remove(i)),
                None => self.tasks.push(TaskSource {
                    pid,
                    tracker: None,
                    carried: Vec::new(),
                    layout: Vec::new(),
                }),
            }
        }
        for gone in old {
            tracing::info!("process {} left the tree during pre-copy", gone.pid);
            self.hashes.remove(&PageSpace::Task(gone.pid));
            if let Some(tr) = gone.tracker {
                let _ = tr.stop();
            }
        }
    }

    /// Passes while the tree runs, until the policy says switch.
    fn live_passes(&mut self) -> ferry_engine::Result<SwitchReason> {
        if let Some(r) = self.policy.decide(&[], 0) {
            if self.lazy {
                self.layout_pass()?;
            }
            return Ok(r);
        }
        // Only taking the userfaultfds needs the tree stopped; protecting
        // its memory happens while it runs, before pass 0 reads it.
        self.start_trackers()?;
        let mut dirty: HashMap<i32, Vec<PageRange>> = HashMap::new();
        let mut first = true;
        loop {
            let (layout, shmem) = self.layout()?;
            self.follow(&layout);
            let mut ranges = Vec::with_capacity(self.tasks.len());
            for (t, l) in self.tasks.iter_mut().zip(&layout.tasks) {
                let h = self.hashes.entry(PageSpace::Task(t.pid)).or_default();
                // Pass 0, and a process without a tracker: everything.
                let d = if first || t.tracker.is_none() {
                    None
                } else {
                    Some(dirty.remove(&t.pid).unwrap_or_default())
                };
                ranges.push(pass_ranges(&mut t.layout, h, &l.vmas, d));
            }
            first = false;
            let end = send_pass(
                self.pass,
                &layout,
                &ranges,
                &mut self.hashes,
                &mut |id, sink| shmem.dump_contents(id, sink),
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
            let mut waiting = 0;
            let mut found = HashMap::new();
            for t in &mut self.tasks {
                let Some(tr) = t.tracker.as_mut() else {
                    continue;
                };
                let vmas = match memory::collect_vmas(t.pid) {
                    Ok(v) => v,
                    // Gone meanwhile: the next layout drops it.
                    Err(_) if !ferry_engine::procfs::exists(t.pid) => continue,
                    Err(e) => return Err(e),
                };
                let mut d = Vec::new();
                tr.collect(&vmas, &mut d)?;
                waiting += d.iter().map(PageRange::pages).sum::<u64>();
                found.insert(t.pid, d);
            }
            if let Some(r) = self.policy.decide(&self.history, waiting) {
                for t in &mut self.tasks {
                    if let Some(d) = found.remove(&t.pid) {
                        t.carried = d;
                    }
                }
                return Ok(r);
            }
            dirty = found;
        }
    }

    /// Lazy at once: a pass with the layout only, while the process runs,
    /// so that the destination builds the process (stub, areas) before the
    /// freeze rather than during it; the frozen pass then only adjusts the
    /// layout.
    fn layout_pass(&mut self) -> ferry_engine::Result<()> {
        let (layout, shmem) = self.layout()?;
        let none = vec![Some(Vec::new()); layout.tasks.len()];
        send_pass(
            self.pass,
            &layout,
            &none,
            &mut self.hashes,
            &mut |id, sink| shmem.dump_contents(id, sink),
            &self.tx,
            false,
        )?;
        self.tasks = layout
            .tasks
            .iter()
            .map(|t| TaskSource {
                pid: t.id.pid,
                tracker: None,
                carried: Vec::new(),
                layout: t.vmas.clone(),
            })
            .collect();
        self.pass += 1;
        Ok(())
    }

    /// With the tree frozen: per process, the pages written since the last
    /// pass and the areas remapped since ([`pass_ranges`]), or everything
    /// for stop-and-copy. The trackers stay registered: taking write
    /// protection off costs time in proportion to the memory, so it
    /// happens after the decision, outside the downtime (and not at all
    /// when the tree is killed).
    fn final_dirty(
        &mut self,
        layout: &TreeLayout,
    ) -> ferry_engine::Result<Vec<Option<Vec<PageRange>>>> {
        if self.tasks.is_empty() {
            return Ok(vec![None; layout.tasks.len()]);
        }
        self.follow(layout);
        let mut out = Vec::with_capacity(self.tasks.len());
        for (t, l) in self.tasks.iter_mut().zip(&layout.tasks) {
            let d = match t.tracker.as_mut() {
                Some(tr) => {
                    let mut d = std::mem::take(&mut t.carried);
                    tr.collect(&l.vmas, &mut d)?;
                    Some(d)
                }
                None => None,
            };
            let h = self.hashes.entry(PageSpace::Task(t.pid)).or_default();
            out.push(pass_ranges(&mut t.layout, h, &l.vmas, d));
        }
        Ok(out)
    }

    /// Take write protection off every process (it goes on running).
    fn stop_trackers(&mut self) {
        for t in &mut self.tasks {
            if let Some(tr) = t.tracker.take() {
                if let Err(e) = tr.stop() {
                    tracing::error!("stopping dirty tracking of {}: {e}", t.pid);
                }
            }
        }
    }

    /// Close the trackers of a tree that is killed (its memory goes with it).
    fn drop_trackers(&mut self) {
        for t in &mut self.tasks {
            if let Some(tr) = t.tracker.take() {
                let _ = tr.stop();
            }
        }
    }
}

/// Run the whole source side of a migration of the tree of `pid` on this
/// thread. Errors before [`Event::Frozen`] leave the tree running
/// untouched; after it, `decision` says whether to kill the tree (it runs
/// on the destination) or let it continue. Returns how long it was frozen.
/// `before_freeze` runs right before the freeze (the network block); its
/// error ends the migration with the tree untouched.
pub fn run(
    pid: i32,
    policy: Policy,
    lazy: bool,
    tx: Sender<Event>,
    decision: Receiver<Decision>,
    before_freeze: crate::netmove::BeforeFreeze,
) -> Result<Duration, String> {
    let mut src = Source {
        root: pid,
        policy,
        tx,
        hashes: HashMap::new(),
        history: Vec::new(),
        tasks: Vec::new(),
        pass: 0,
        lazy,
        scope: if lazy { Scope::Process } else { Scope::Tree },
    };
    let reason = match src.live_passes() {
        Ok(r) => r,
        Err(e) => {
            let gone = src
                .tasks
                .iter()
                .map(|t| t.pid)
                .find(|&p| !ferry_engine::procfs::exists(p));
            src.stop_trackers();
            if let Some(gone) = gone {
                return Err(format!(
                    "pre-copy of process {pid} failed: the process tree changed during pre-copy \
                     (process {gone} exited): try again, or migrate with --max-passes 0"
                ));
            }
            return Err(format!("pre-copy of process {pid} failed: {e}"));
        }
    };
    if let Err(e) = before_freeze() {
        src.stop_trackers();
        return Err(format!("process {pid} was not frozen: {e}"));
    }
    // The image travels in one control frame (64 MiB at most).
    let c = match Captured::freeze_with(pid, src.scope, MAX_DELETED_BYTES_ON_WIRE) {
        Ok(c) => {
            let _ = src.tx.blocking_send(Event::FreezeStarted);
            c
        }
        Err(e) => {
            src.stop_trackers();
            return Err(format!("checkpoint of process {pid} failed: {e}"));
        }
    };
    let layout = c.tree.layout();
    if lazy && !layout.shmem.is_empty() {
        src.stop_trackers();
        let _ = c.thaw();
        return Err(format!(
            "process {pid} cannot be migrated lazily: it maps shared memory now (lazy pages \
             move a single process without shared memory); migrate without --lazy"
        ));
    }
    let mut owed = None;
    let last = src.final_dirty(&layout).and_then(|dirty| {
        // Lazy: only what must go now; the rest stays owed.
        let ranges = if lazy {
            let t = c.task();
            let plan = lazy::plan::plan(pid, &t.vmas, dirty[0].as_deref(), &t.threads)?;
            owed = Some(plan.owed);
            vec![Some(plan.eager)]
        } else {
            dirty
        };
        send_pass(
            src.pass,
            &layout,
            &ranges,
            &mut src.hashes,
            &mut |id, sink| c.dump_shmem(id, sink),
            &src.tx,
            true,
        )
    });
    if let Err(e) = last {
        src.stop_trackers();
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
        src.stop_trackers();
        let _ = c.thaw();
        return Err("the network side is gone".into());
    }
    let d = decision.recv().unwrap_or(Decision::Thaw);
    let r = match d {
        Decision::Kill => {
            let r = c.kill();
            src.drop_trackers();
            r
        }
        Decision::Thaw => {
            // No write protection may stay behind in a tree that goes on.
            src.stop_trackers();
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
