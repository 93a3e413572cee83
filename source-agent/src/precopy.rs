//! Pre-copy: when to stop copying while the process runs, and which
//! written pages are worth sending again.
//!
//! Pass 0 sends every populated page; each later pass sends the pages
//! written since the previous one ([`ferry_engine::track`]). After each
//! pass [`Policy::decide`] looks at what the pass achieved and at the dirty
//! set now waiting, and says whether to run another pass or to freeze and
//! send the rest. [`DedupSink`] drops pages whose bytes did not change
//! since they were last sent (written with the same value, or written and
//! written back).

use ferry_engine::dump::PageSink;
use ferry_protocol::model::PAGE_SIZE;
use std::collections::HashMap;
use std::time::Duration;
use xxhash_rust::xxh3::xxh3_64;

/// Why pre-copy stopped and the process was frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// `--max-passes 0`: plain stop-and-copy.
    StopAndCopy,
    /// The rest fits the downtime target.
    FitsTarget,
    /// The dirty set stopped shrinking: the process writes about as fast as
    /// the link carries, so more passes would not help.
    NotConverging,
    /// `--max-passes` was reached.
    PassLimit,
}

impl SwitchReason {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::StopAndCopy => "stop-and-copy",
            SwitchReason::FitsTarget => "fits-downtime-target",
            SwitchReason::NotConverging => "not-converging",
            SwitchReason::PassLimit => "pass-limit",
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// Pass number, from 0.
    pub pass: u32,
    /// Pages found written (or populated, for pass 0) at the start.
    pub dirty_pages: u64,
    /// Pages actually sent (after dropping unchanged ones).
    pub pages_sent: u64,
    /// Encoded bytes sent.
    pub bytes_sent: u64,
    /// How long the pass took.
    pub duration: Duration,
}

impl PassStats {
    /// Memory moved per second (raw page bytes), the bandwidth achieved.
    pub fn raw_bandwidth(&self) -> f64 {
        (self.pages_sent * PAGE_SIZE) as f64 / self.duration.as_secs_f64().max(1e-6)
    }
}

/// The convergence policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Freeze once the rest is expected to take at most this long.
    pub max_downtime: Duration,
    /// Passes while the process runs (0: stop-and-copy).
    pub max_passes: u32,
}

impl Policy {
    /// After `done` passes (the last one just finished), with `next_dirty`
    /// pages written meanwhile: run another pass (`None`) or switch over.
    pub fn decide(&self, done: &[PassStats], next_dirty: u64) -> Option<SwitchReason> {
        let Some(last) = done.last() else {
            return (self.max_passes == 0).then_some(SwitchReason::StopAndCopy);
        };
        // The best bandwidth seen so far predicts the final pass.
        let bw = done
            .iter()
            .map(PassStats::raw_bandwidth)
            .fold(0.0f64, f64::max);
        let expected = (next_dirty * PAGE_SIZE) as f64 / bw.max(1.0);
        if expected <= self.max_downtime.as_secs_f64() {
            return Some(SwitchReason::FitsTarget);
        }
        if done.len() as u32 >= self.max_passes {
            return Some(SwitchReason::PassLimit);
        }
        // Not shrinking: the set waiting now is no smaller than 90% of the
        // one the last pass started with (pass 0 is not a fair base).
        if last.pass >= 1 && next_dirty * 10 >= last.dirty_pages * 9 {
            return Some(SwitchReason::NotConverging);
        }
        None
    }
}

/// Remembers a hash of every page sent, to skip pages whose contents did
/// not change since.
#[derive(Debug, Default)]
pub struct PageHashes {
    sent: HashMap<u64, u64>,
}

impl PageHashes {
    /// True if `page` at `addr` differs from what was last sent there (and
    /// records it as sent).
    pub fn changed(&mut self, addr: u64, page: &[u8]) -> bool {
        let h = xxh3_64(page);
        self.sent.insert(addr, h) != Some(h)
    }

    /// Forget `pages` pages at `addr` (sent as zero, or unmapped).
    pub fn forget(&mut self, addr: u64, pages: u64) {
        for i in 0..pages {
            self.sent.remove(&(addr + i * PAGE_SIZE));
        }
    }

    /// Forget every page in `[start, end)`: the destination mapped that
    /// range afresh, so what was sent there before is gone (see
    /// `ferry_engine::restore::memory::remapped`).
    pub fn forget_range(&mut self, start: u64, end: u64) {
        let pages = end.saturating_sub(start) / PAGE_SIZE;
        if pages > self.sent.len() as u64 {
            // A large range (a big reservation): one sweep of the map.
            self.sent.retain(|a, _| !(start..end).contains(a));
        } else {
            self.forget(start, pages);
        }
    }
}

/// A [`PageSink`] in front of another that drops pages unchanged since
/// they were last sent.
pub struct DedupSink<'a> {
    inner: &'a mut dyn PageSink,
    hashes: &'a mut PageHashes,
    /// Pages dropped because they had not changed.
    pub unchanged: u64,
    /// Pages passed on.
    pub sent: u64,
}

impl<'a> DedupSink<'a> {
    /// Filter what goes to `inner` through `hashes`.
    pub fn new(inner: &'a mut dyn PageSink, hashes: &'a mut PageHashes) -> Self {
        DedupSink {
            inner,
            hashes,
            unchanged: 0,
            sent: 0,
        }
    }
}

impl PageSink for DedupSink<'_> {
    fn add(&mut self, addr: u64, data: &[u8]) -> ferry_engine::Result<()> {
        let page = PAGE_SIZE as usize;
        // Pass on maximal runs of changed pages.
        let mut run: Option<usize> = None;
        let n = data.len() / page;
        for i in 0..=n {
            let changed = i < n
                && self
                    .hashes
                    .changed(addr + (i * page) as u64, &data[i * page..(i + 1) * page]);
            match (run, changed) {
                (None, true) => run = Some(i),
                (Some(s), false) => {
                    self.inner
                        .add(addr + (s * page) as u64, &data[s * page..i * page])?;
                    self.sent += (i - s) as u64;
                    run = None;
                }
                _ => {}
            }
            if i < n && !changed {
                self.unchanged += 1;
            }
        }
        Ok(())
    }

    fn add_zero(&mut self, addr: u64, pages: u64) -> ferry_engine::Result<()> {
        self.hashes.forget(addr, pages);
        self.sent += pages;
        self.inner.add_zero(addr, pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(pass: u32, dirty: u64, sent: u64, ms: u64) -> PassStats {
        PassStats {
            pass,
            dirty_pages: dirty,
            pages_sent: sent,
            bytes_sent: sent * PAGE_SIZE,
            duration: Duration::from_millis(ms),
        }
    }

    #[test]
    fn policy() {
        let p = Policy {
            max_downtime: Duration::from_millis(10),
            max_passes: 8,
        };
        // 1 GiB in 1 s: 1 GiB/s. 10 ms fits 2560 pages.
        let first = [pass(0, 262_144, 262_144, 1000)];
        assert_eq!(p.decide(&first, 100_000), None);
        assert_eq!(p.decide(&first, 2000), Some(SwitchReason::FitsTarget));
        // Not shrinking after pass 1.
        let two = [first[0], pass(1, 100_000, 100_000, 400)];
        assert_eq!(p.decide(&two, 95_000), Some(SwitchReason::NotConverging));
        assert_eq!(p.decide(&two, 50_000), None);
        // Pass limit.
        let limited = Policy { max_passes: 2, ..p };
        assert_eq!(limited.decide(&two, 50_000), Some(SwitchReason::PassLimit));
        // Stop-and-copy.
        let sac = Policy { max_passes: 0, ..p };
        assert_eq!(sac.decide(&[], 0), Some(SwitchReason::StopAndCopy));
        assert_eq!(p.decide(&[], 0), None);
    }

    #[derive(Default)]
    struct Collect(Vec<(u64, usize)>, Vec<(u64, u64)>);
    impl PageSink for Collect {
        fn add(&mut self, addr: u64, data: &[u8]) -> ferry_engine::Result<()> {
            self.0.push((addr, data.len() / PAGE_SIZE as usize));
            Ok(())
        }
        fn add_zero(&mut self, addr: u64, pages: u64) -> ferry_engine::Result<()> {
            self.1.push((addr, pages));
            Ok(())
        }
    }

    #[test]
    fn unchanged_pages_are_not_sent_again() {
        let page = PAGE_SIZE as usize;
        let mut mem = vec![0u8; 6 * page];
        for i in 0..6 {
            mem[i * page] = i as u8 + 1;
        }
        let mut hashes = PageHashes::default();
        let mut out = Collect::default();
        {
            let mut s = DedupSink::new(&mut out, &mut hashes);
            s.add(0x1000, &mem).expect("add");
            assert_eq!((s.sent, s.unchanged), (6, 0));
        }
        assert_eq!(out.0, vec![(0x1000, 6)]);
        // Pages 1 and 2 change, 4 is written with the same bytes.
        mem[page] = 9;
        mem[2 * page + 7] = 9;
        let mut out2 = Collect::default();
        {
            let mut s = DedupSink::new(&mut out2, &mut hashes);
            s.add(0x1000, &mem).expect("add");
            assert_eq!((s.sent, s.unchanged), (2, 4));
            s.add_zero(0x1000 + 3 * PAGE_SIZE, 1).expect("zero");
        }
        assert_eq!(out2.0, vec![(0x1000 + PAGE_SIZE, 2)]);
        assert_eq!(out2.1, vec![(0x1000 + 3 * PAGE_SIZE, 1)]);
        // A page sent as zero is sent again when it holds data.
        let mut out3 = Collect::default();
        {
            let mut s = DedupSink::new(&mut out3, &mut hashes);
            s.add(0x1000 + 3 * PAGE_SIZE, &mem[3 * page..4 * page])
                .expect("add");
        }
        assert_eq!(out3.0, vec![(0x1000 + 3 * PAGE_SIZE, 1)]);
        // After the destination mapped the range afresh, unchanged pages
        // are sent again.
        hashes.forget_range(0x1000 + PAGE_SIZE, 0x1000 + 3 * PAGE_SIZE);
        let mut out4 = Collect::default();
        {
            let mut s = DedupSink::new(&mut out4, &mut hashes);
            s.add(0x1000, &mem).expect("add");
            assert_eq!((s.sent, s.unchanged), (2, 4));
        }
        assert_eq!(out4.0, vec![(0x1000 + PAGE_SIZE, 2)]);
        // A range larger than the map takes the other way.
        hashes.forget_range(0, 1 << 40);
        let mut out5 = Collect::default();
        DedupSink::new(&mut out5, &mut hashes)
            .add(0x1000, &mem)
            .expect("add");
        assert_eq!(out5.0, vec![(0x1000, 6)]);
    }
}
