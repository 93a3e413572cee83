//! The destination's side of the lazy phase, without the network: the
//! userfaultfds of a restored process (and of children it forks), what each
//! address space still owes, faults turned into page requests, and pages
//! that arrive copied in with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`).
//!
//! The caller polls [`Pager::fds`], calls [`Pager::handle_events`] when one
//! is readable and sends the requests it returns to the source, and feeds
//! every batch that arrives to [`Pager::arrive`]. A page already arrived is
//! never requested again, with one exception: a forked child that misses a
//! page its parent received (the copy raced the fork) asks for it again.
//!
//! Faults on pages that were never owed (memory the process never touched
//! on the source, or dropped since) are answered with a zero page at once.
//! `mremap`, `munmap` and `MADV_DONTNEED`/`MADV_REMOVE` are followed through
//! their userfaultfd events; after each, threads waiting on the old range
//! are woken so they fault again against the new layout.

use super::owed::{Lookup, OwedMap};
use crate::error::{Error, Result};
use ferry_protocol::model::PAGE_SIZE;
use ferry_protocol::pages::PageBatch;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use userfaultfd::{Error as UError, Event, EventBuffer, Uffd};

/// Pages asked for per fault: the faulting page and the owed pages after it.
pub const PREFETCH_PAGES: u64 = 16;

/// How a batch reached the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Pushed in the background.
    Pushed,
    /// Sent in answer to a request.
    Requested,
}

/// What the lazy phase did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Faults on owed pages (they waited for the source).
    pub faults: u64,
    /// Faults answered with a zero page at once.
    pub zero_faults: u64,
    /// Owed pages that arrived in answer to a request.
    pub pages_requested: u64,
    /// Owed pages that arrived by the background push.
    pub pages_pushed: u64,
    /// Pages a forked child asked for again.
    pub refetched: u64,
    /// Longest time a faulting thread waited for its page.
    pub max_fault_wait: Duration,
    /// Time from the start to the last owed page of the process arriving.
    pub last_page: Option<Duration>,
    /// Processes forked during the lazy phase.
    pub forks: u64,
}

/// Pages the kernel refused to take for now (`EAGAIN`).
struct Deferred {
    space: usize,
    src: u64,
    pages: u64,
    /// Their contents (`None`: zeros).
    data: Option<Vec<u8>>,
    origin: Origin,
}

/// One address space served lazily.
struct Space {
    uffd: Uffd,
    owed: OwedMap,
    /// The restored process itself (not a child it forked).
    main: bool,
    /// Gone: its process exited or exec'd.
    dead: bool,
}

/// The lazy pages of one restored process and its children.
pub struct Pager {
    pid: i32,
    spaces: Vec<Space>,
    /// Source pages requested and not arrived yet.
    requested: HashMap<u64, Instant>,
    /// Source pages a thread is waiting for, since when.
    waiting: HashMap<u64, Instant>,
    /// Requests to send to the source, `(addr, pages)`.
    outbox: Vec<(u64, u32)>,
    /// Copies to retry once pending events are handled.
    deferred: Vec<Deferred>,
    stats: PagerStats,
    start: Instant,
    events: EventBuffer,
}

fn page_of(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

fn errno_of(e: &UError) -> Option<i32> {
    match e {
        UError::CopyFailed(n) | UError::ZeropageFailed(n) | UError::SystemError(n) => {
            Some(*n as i32)
        }
        UError::PartiallyCopied(_) => Some(libc::EAGAIN),
        _ => None,
    }
}

fn uerr(what: String, e: UError) -> Error {
    let io = match errno_of(&e) {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::other(e.to_string()),
    };
    Error::io(what, io)
}

/// What a copy attempt into one space came to.
enum Put {
    Done,
    /// The layout is changing: handle the space's events, then retry.
    Again,
    /// The range is not (or no longer) registered there.
    Gone,
    /// The process is gone.
    Dead,
}

fn put_result(r: std::result::Result<usize, UError>) -> std::result::Result<Put, UError> {
    match r {
        Ok(_) => Ok(Put::Done),
        Err(e) => match errno_of(&e) {
            Some(libc::EEXIST) => Ok(Put::Done),
            Some(libc::EAGAIN) => Ok(Put::Again),
            Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::EFAULT) => Ok(Put::Gone),
            Some(libc::ESRCH) => Ok(Put::Dead),
            _ => Err(e),
        },
    }
}

impl Pager {
    /// Serve process `pid` through `uffd` (armed over the owed ranges);
    /// `owed` are the spans `(addr, pages)` the source still has.
    pub fn new(pid: i32, uffd: Uffd, owed: &[(u64, u64)]) -> Pager {
        Pager {
            pid,
            spaces: vec![Space {
                uffd,
                owed: OwedMap::new(owed),
                main: true,
                dead: false,
            }],
            requested: HashMap::new(),
            waiting: HashMap::new(),
            outbox: Vec::new(),
            deferred: Vec::new(),
            stats: PagerStats::default(),
            start: Instant::now(),
            events: EventBuffer::new(64),
        }
    }

    /// The restored process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The userfaultfds to poll for readability.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.spaces
            .iter()
            .filter(|s| !s.dead)
            .map(|s| s.uffd.as_fd())
            .collect()
    }

    /// What happened so far.
    pub fn stats(&self) -> PagerStats {
        self.stats
    }

    /// Pages the restored process itself still lacks.
    pub fn remaining(&self) -> u64 {
        self.spaces
            .iter()
            .filter(|s| s.main && !s.dead)
            .map(|s| s.owed.remaining())
            .sum()
    }

    /// True when no live address space lacks a page any more.
    pub fn is_complete(&self) -> bool {
        self.spaces
            .iter()
            .all(|s| s.dead || s.owed.remaining() == 0)
    }

    /// The pages some live address space still lacks, by *source* address:
    /// `(addr, pages)`, sorted, touching ranges merged (the union over the
    /// process and the children it forked). Pages the kernel refused for
    /// now are still owed in their map, so they are included.
    pub fn owed_sources(&self) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = self
            .spaces
            .iter()
            .filter(|s| !s.dead)
            .flat_map(|s| s.owed.owed_src_ranges())
            .collect();
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (s, e) in all {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
            .into_iter()
            .map(|(s, e)| (s, (e - s) / PAGE_SIZE))
            .collect()
    }

    /// Source pages requested and not arrived yet, sorted (a resumed lazy
    /// phase asks for them again: the requests went out on a lost
    /// connection).
    pub fn outstanding_requests(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.requested.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// When the oldest unanswered request was sent.
    pub fn oldest_request(&self) -> Option<Instant> {
        self.requested.values().min().copied()
    }

    /// The restored process exited (or exec'd): nothing to serve there.
    pub fn process_gone(&mut self) {
        for s in self.spaces.iter_mut().filter(|s| s.main) {
            s.dead = true;
        }
        self.note_complete();
    }

    fn note_complete(&mut self) {
        if self.stats.last_page.is_none() && self.remaining() == 0 {
            self.stats.last_page = Some(self.start.elapsed());
        }
    }

    /// Read and handle every pending event of every space; then
    /// [`Pager::take_requests`] has what to ask the source for.
    pub fn handle_events(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.spaces.len() {
            if !self.spaces[i].dead {
                self.drain(i)?;
            }
            i += 1;
        }
        if !self.deferred.is_empty() {
            self.retry()?;
        }
        Ok(())
    }

    /// The page requests to send to the source, `(addr, pages)`.
    pub fn take_requests(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.outbox)
    }

    /// Handle the pending events of space `i` (forks add spaces at the end).
    fn drain(&mut self, i: usize) -> Result<()> {
        loop {
            let mut got = Vec::new();
            {
                let s = &self.spaces[i];
                let read = match s.uffd.read_events(&mut self.events) {
                    Ok(it) => it.collect::<Vec<_>>(),
                    Err(UError::ReadEof) => {
                        self.spaces[i].dead = true;
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(uerr(format!("reading the userfaultfd of {}", self.pid), e))
                    }
                };
                for ev in read {
                    got.push(ev.map_err(|e| {
                        uerr(format!("decoding a userfaultfd event of {}", self.pid), e)
                    })?);
                }
            }
            if got.is_empty() {
                return Ok(());
            }
            for ev in got {
                self.on_event(i, ev)?;
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: Event) -> Result<()> {
        match ev {
            Event::Pagefault { addr, .. } => self.on_fault(i, page_of(addr as u64)),
            Event::Fork { uffd } => {
                self.stats.forks += 1;
                let owed = self.spaces[i].owed.clone();
                self.spaces.push(Space {
                    uffd,
                    owed,
                    main: false,
                    dead: false,
                });
                Ok(())
            }
            Event::Remap { from, to, len } => {
                let (from, to, len) = (from as u64, to as u64, len as u64);
                self.spaces[i].owed.remap(from, to, len);
                self.wake(i, from, len);
                Ok(())
            }
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                let (start, end) = (start as u64, end as u64);
                self.spaces[i].owed.remove(start, end);
                self.wake(i, start, end.saturating_sub(start));
                if self.spaces[i].main {
                    self.note_complete();
                }
                Ok(())
            }
        }
    }

    /// Wake threads waiting on `[start, start + len)` so that they fault
    /// again (the range moved or was dropped).
    fn wake(&self, i: usize, start: u64, len: u64) {
        if len > 0 {
            let _ = self.spaces[i]
                .uffd
                .wake(start as *mut libc::c_void, len as usize);
        }
    }

    fn zero_fill(&mut self, i: usize, page: u64) -> Result<()> {
        let s = &self.spaces[i];
        // SAFETY: UFFDIO_ZEROPAGE only acts on the target's registered
        // range; no memory of ours is touched.
        let r = unsafe {
            s.uffd
                .zeropage(page as *mut libc::c_void, PAGE_SIZE as usize, true)
        };
        match put_result(r) {
            Ok(Put::Dead) => self.spaces[i].dead = true,
            Ok(_) => self.wake(i, page, PAGE_SIZE),
            Err(e) => return Err(uerr(format!("zero page at {page:#x} of {}", self.pid), e)),
        }
        Ok(())
    }

    fn on_fault(&mut self, i: usize, page: u64) -> Result<()> {
        match self.spaces[i].owed.lookup(page) {
            Lookup::Outside => {
                self.stats.zero_faults += 1;
                self.zero_fill(i, page)
            }
            Lookup::Arrived { .. } if self.spaces[i].main => {
                // A fault read after its page was copied (the copy woke the
                // thread already), or a page reclaimed after MADV_FREE: a
                // zero page is right for the latter, a no-op for the former.
                self.zero_fill(i, page)
            }
            Lookup::Arrived { src } => {
                // A child that misses a page its parent received.
                self.stats.refetched += self.spaces[i].owed.set_owed(page, 1);
                self.stats.faults += 1;
                self.waiting.entry(src).or_insert_with(Instant::now);
                if let std::collections::hash_map::Entry::Vacant(e) = self.requested.entry(src) {
                    e.insert(Instant::now());
                    self.outbox.push((src, 1));
                }
                Ok(())
            }
            Lookup::Owed { src } => {
                self.stats.faults += 1;
                let now = Instant::now();
                self.waiting.entry(src).or_insert(now);
                let deferred = self
                    .deferred
                    .iter()
                    .any(|d| d.space == i && src >= d.src && src < d.src + d.pages * PAGE_SIZE);
                if deferred || self.requested.contains_key(&src) {
                    return Ok(());
                }
                let (run_src, run) = self.spaces[i]
                    .owed
                    .owed_run_at(page, PREFETCH_PAGES)
                    .unwrap_or((src, 1));
                let mut n = 0u64;
                while n < run.max(1) {
                    let p = run_src + n * PAGE_SIZE;
                    if n > 0 && self.requested.contains_key(&p) {
                        break;
                    }
                    self.requested.insert(p, now);
                    n += 1;
                }
                self.outbox.push((run_src, n as u32));
                Ok(())
            }
        }
    }

    /// Pages arrived from the source: copy them into every space that
    /// still lacks them.
    pub fn arrive(&mut self, batch: &PageBatch, origin: Origin) -> Result<()> {
        let now = Instant::now();
        let mut off = 0usize;
        for run in &batch.runs {
            let pages = u64::from(run.pages);
            let len = (pages * PAGE_SIZE) as usize;
            let data = if run.zero {
                None
            } else {
                let d = batch
                    .data
                    .get(off..off + len)
                    .ok_or_else(|| Error::parse("page batch", "data shorter than its runs"))?;
                off += len;
                Some(d)
            };
            let mut newly = 0u64;
            for i in 0..self.spaces.len() {
                if self.spaces[i].dead {
                    continue;
                }
                let n = self.put(i, run.addr, pages, data, origin)?;
                newly = newly.max(n);
            }
            match origin {
                Origin::Pushed => self.stats.pages_pushed += newly,
                Origin::Requested => self.stats.pages_requested += newly,
            }
            for k in 0..pages {
                let p = run.addr + k * PAGE_SIZE;
                self.requested.remove(&p);
                if let Some(t) = self.waiting.remove(&p) {
                    self.stats.max_fault_wait = self.stats.max_fault_wait.max(now - t);
                }
            }
        }
        self.note_complete();
        Ok(())
    }

    /// Copy source pages `[src, src + pages)` (contents `data`, or zeros)
    /// into space `i` where still owed; returns how many were copied. A
    /// piece the kernel refuses for now (`EAGAIN`: the layout is changing,
    /// an event is pending) stays owed and is kept for [`Pager::retry`].
    fn put(
        &mut self,
        i: usize,
        src: u64,
        pages: u64,
        data: Option<&[u8]>,
        origin: Origin,
    ) -> Result<u64> {
        let mut pieces = Vec::new();
        let mut total = self.spaces[i]
            .owed
            .arrive(src, pages, |d, s, n| pieces.push((d, s, n)));
        for (k, &(dest, s, n)) in pieces.iter().enumerate() {
            let len = (n * PAGE_SIZE) as usize;
            let off = ((s - src) / PAGE_SIZE * PAGE_SIZE) as usize;
            let sp = &self.spaces[i];
            let r = match data {
                Some(d) => {
                    let bytes = &d[off..off + len];
                    // SAFETY: `bytes` is a live buffer of `len` bytes;
                    // UFFDIO_COPY reads it and writes only the target's
                    // registered range.
                    unsafe {
                        sp.uffd.copy(
                            bytes.as_ptr() as *const libc::c_void,
                            dest as *mut libc::c_void,
                            len,
                            true,
                        )
                    }
                }
                // SAFETY: as in zero_fill: only the target's range.
                None => unsafe { sp.uffd.zeropage(dest as *mut libc::c_void, len, true) },
            };
            match put_result(r) {
                Ok(Put::Done) | Ok(Put::Gone) => {}
                Ok(Put::Dead) => {
                    self.spaces[i].dead = true;
                    return Ok(total);
                }
                Ok(Put::Again) => {
                    // Owed again (where the map has them before the pending
                    // event), kept to be copied once the event is handled.
                    for &(d2, s2, n2) in &pieces[k..] {
                        total -= self.spaces[i].owed.set_owed(d2, n2);
                        let o2 = ((s2 - src) / PAGE_SIZE * PAGE_SIZE) as usize;
                        self.deferred.push(Deferred {
                            space: i,
                            src: s2,
                            pages: n2,
                            data: data.map(|d| d[o2..o2 + (n2 * PAGE_SIZE) as usize].to_vec()),
                            origin,
                        });
                    }
                    return Ok(total);
                }
                Err(e) => {
                    return Err(uerr(
                        format!("copying {n} pages to {dest:#x} of {}", self.pid),
                        e,
                    ))
                }
            }
        }
        Ok(total)
    }

    /// True if pages wait to be copied once the layout settles.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Copy the pages the kernel refused earlier (`EAGAIN`), after the
    /// pending events were handled ([`Pager::handle_events`] calls it).
    ///
    /// A deferred piece goes to every live space that still lacks it, not
    /// only to the one that refused it: the refusal is typically a fork in
    /// progress, and the child's space, made from the parent's owed map
    /// when the fork event is read, lacks the same pages. The source sends
    /// each page once, so a space left out here would wait for it forever.
    fn retry(&mut self) -> Result<()> {
        for d in std::mem::take(&mut self.deferred) {
            if self.spaces.get(d.space).is_none_or(|s| s.dead) {
                continue;
            }
            let mut order = vec![d.space];
            order.extend((0..self.spaces.len()).filter(|&i| i != d.space));
            for i in order {
                if self.spaces[i].dead {
                    continue;
                }
                let n = self.put(i, d.src, d.pages, d.data.as_deref(), d.origin)?;
                if self.spaces[i].main {
                    match d.origin {
                        Origin::Pushed => self.stats.pages_pushed += n,
                        Origin::Requested => self.stats.pages_requested += n,
                    }
                }
            }
        }
        self.note_complete();
        Ok(())
    }

    /// Ask the source again for up to `max_pages` pages that a live space
    /// still lacks and that no request is out for. A backstop for pages
    /// the push went past (a space made by a fork after they were pushed,
    /// a copy refused and dropped): call it when no page came for a while;
    /// the source answers a request whether or not it pushed the page.
    /// Returns how many pages were asked for.
    pub fn request_stragglers(&mut self, max_pages: u64) -> u64 {
        let now = Instant::now();
        let mut asked = 0u64;
        for (addr, pages) in self.owed_sources() {
            let mut run_start = None;
            let mut run = 0u32;
            for k in 0..pages {
                if asked >= max_pages {
                    break;
                }
                let p = addr + k * PAGE_SIZE;
                let queued = self.requested.contains_key(&p)
                    || self
                        .deferred
                        .iter()
                        .any(|d| p >= d.src && p < d.src + d.pages * PAGE_SIZE);
                if queued || run == u32::MAX {
                    if let Some(s) = run_start.take() {
                        self.outbox.push((s, run));
                    }
                    run = 0;
                    if queued {
                        continue;
                    }
                }
                self.requested.insert(p, now);
                run_start.get_or_insert(p);
                run += 1;
                asked += 1;
            }
            if let Some(s) = run_start {
                self.outbox.push((s, run));
            }
            if asked >= max_pages {
                break;
            }
        }
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pager over a userfaultfd of this process with nothing registered:
    /// enough for the bookkeeping that never touches memory.
    fn pager(owed: &[(u64, u64)]) -> Pager {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .expect("userfaultfd (tests run as root)");
        Pager::new(std::process::id() as i32, uffd, owed)
    }

    #[test]
    fn stragglers_are_asked_for_once_in_runs_skipping_outstanding_requests() {
        let base = 0x7000_0000u64;
        let mut p = pager(&[(base, 8), (base + 100 * PAGE_SIZE, 2)]);
        // A request already out for page 3.
        p.requested.insert(base + 3 * PAGE_SIZE, Instant::now());
        assert_eq!(p.request_stragglers(u64::MAX), 9);
        assert_eq!(
            p.take_requests(),
            vec![
                (base, 3),
                (base + 4 * PAGE_SIZE, 4),
                (base + 100 * PAGE_SIZE, 2)
            ]
        );
        // Everything missing is requested now: nothing more to ask.
        assert_eq!(p.request_stragglers(u64::MAX), 0);
        assert!(p.take_requests().is_empty());
        assert!(!p.is_complete());
    }

    #[test]
    fn stragglers_respect_the_page_budget() {
        let base = 0x7000_0000u64;
        let mut p = pager(&[(base, 10)]);
        assert_eq!(p.request_stragglers(4), 4);
        assert_eq!(p.take_requests(), vec![(base, 4)]);
        assert_eq!(p.request_stragglers(100), 6);
        assert_eq!(p.take_requests(), vec![(base + 4 * PAGE_SIZE, 6)]);
    }
}
