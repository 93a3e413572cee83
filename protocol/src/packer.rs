//! Packing memory into encoded page batches: all-zero pages become markers,
//! adjacent pages merge into runs, a batch closes at a size or run limit,
//! and batches are compressed on worker threads ([`EncoderPool`]), coming
//! out in order. The page store file and the wire both send what this
//! produces.

use crate::compress::{Encoded, EncoderPool, WorkerGone};
use crate::model::PAGE_SIZE;
use crate::pages::{is_zero, PageRun, PageWriterOptions};
use crate::validate::is_page_aligned;
use std::collections::VecDeque;

const PAGE: usize = PAGE_SIZE as usize;

/// Why pages could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The range is not whole pages, or overflows.
    #[error("bad page range: {len} bytes at {addr:#x} (must be whole, page-aligned pages)")]
    BadRange { addr: u64, len: u64 },
    /// A compression worker died.
    #[error(transparent)]
    Worker(#[from] WorkerGone),
}

/// Counts of what was packed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Pages packed, zero pages included.
    pub pages: u64,
    /// Pages recorded as zero markers.
    pub zero_pages: u64,
    /// Pages stored with contents.
    pub data_pages: u64,
}

/// Turns pages into encoded batches, in order.
pub struct PagePacker {
    opts: PageWriterOptions,
    pool: EncoderPool,
    /// Emptied buffers handed back, for the next batches.
    spare: Vec<(Vec<PageRun>, Vec<u8>, Vec<u8>)>,
    runs: Vec<PageRun>,
    data: Vec<u8>,
    /// The next page starts a new run (set at each `add`/`add_zero`).
    new_run: bool,
    done: VecDeque<Encoded>,
    stats: PackStats,
}

impl PagePacker {
    /// A packer with these options (bounds are clamped to sane values).
    pub fn new(opts: PageWriterOptions) -> Self {
        let opts = PageWriterOptions {
            level: opts.level,
            batch_bytes: opts.batch_bytes.clamp(PAGE, 16 << 20),
            max_runs: opts.max_runs.clamp(1, 1 << 16),
            threads: opts.threads.clamp(1, 64),
        };
        PagePacker {
            pool: EncoderPool::new(opts.threads, opts.level),
            spare: Vec::new(),
            runs: Vec::with_capacity(opts.max_runs),
            data: Vec::with_capacity(opts.batch_bytes + PAGE),
            new_run: true,
            done: VecDeque::new(),
            stats: PackStats::default(),
            opts,
        }
    }

    /// The options in force (after clamping).
    pub fn options(&self) -> &PageWriterOptions {
        &self.opts
    }

    /// What was packed so far.
    pub fn stats(&self) -> PackStats {
        self.stats
    }

    /// Pack `data` (whole pages) as the contents of memory at `addr`. A run
    /// never spans two calls, so each run lies inside what one call passed
    /// (e.g. one memory area, even when areas touch).
    pub fn add(&mut self, addr: u64, data: &[u8]) -> Result<(), PackError> {
        let len = data.len() as u64;
        if !is_page_aligned(addr) || !is_page_aligned(len) || addr.checked_add(len).is_none() {
            return Err(PackError::BadRange { addr, len });
        }
        self.new_run = true;
        let mut a = addr;
        for page in data.chunks_exact(PAGE) {
            let zero = is_zero(page);
            self.push(a, 1, zero)?;
            if !zero {
                self.data.extend_from_slice(page);
                if self.data.len() >= self.opts.batch_bytes {
                    self.flush()?;
                }
            }
            a += PAGE_SIZE;
        }
        Ok(())
    }

    /// Pack `pages` zero pages at `addr` without their contents.
    pub fn add_zero(&mut self, addr: u64, pages: u64) -> Result<(), PackError> {
        let len = pages.checked_mul(PAGE_SIZE);
        if !is_page_aligned(addr) || len.and_then(|l| addr.checked_add(l)).is_none() {
            return Err(PackError::BadRange {
                addr,
                len: len.unwrap_or(u64::MAX),
            });
        }
        self.new_run = true;
        let (mut a, mut left) = (addr, pages);
        while left > 0 {
            let n = left.min(u64::from(u32::MAX)) as u32;
            self.push(a, n, true)?;
            a += u64::from(n) * PAGE_SIZE;
            left -= u64::from(n);
        }
        Ok(())
    }

    fn push(&mut self, a: u64, n: u32, zero: bool) -> Result<(), PackError> {
        let merge = !std::mem::take(&mut self.new_run);
        if let Some(r) = self.runs.last_mut().filter(|_| merge) {
            if r.zero == zero && r.end() == Some(a) {
                if let Some(p) = r.pages.checked_add(n) {
                    r.pages = p;
                    self.count(n, zero);
                    return Ok(());
                }
            }
        }
        if self.runs.len() >= self.opts.max_runs {
            self.flush()?;
        }
        self.runs.push(PageRun {
            addr: a,
            pages: n,
            zero,
        });
        self.count(n, zero);
        Ok(())
    }

    fn count(&mut self, n: u32, zero: bool) {
        let n = u64::from(n);
        self.stats.pages += n;
        if zero {
            self.stats.zero_pages += n;
        } else {
            self.stats.data_pages += n;
        }
    }

    /// Close the current batch (if any) and hand it to the compressors;
    /// batches already compressed become available from [`PagePacker::pop`].
    pub fn flush(&mut self) -> Result<(), PackError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let (runs, data, out) = self.spare.pop().unwrap_or_else(|| {
            (
                Vec::with_capacity(self.opts.max_runs),
                Vec::with_capacity(self.opts.batch_bytes + PAGE),
                Vec::new(),
            )
        });
        let runs = std::mem::replace(&mut self.runs, runs);
        let data = std::mem::replace(&mut self.data, data);
        self.pool.submit(runs, data, out)?;
        while self.pool.in_flight() > 2 * self.pool.threads() {
            if let Some(e) = self.pool.collect()? {
                self.done.push_back(e);
            }
        }
        Ok(())
    }

    /// Close the last batch and wait until every batch is compressed.
    pub fn finish(&mut self) -> Result<(), PackError> {
        self.flush()?;
        while let Some(e) = self.pool.collect()? {
            self.done.push_back(e);
        }
        Ok(())
    }

    /// The next encoded batch, in order, if one is ready. Give it back with
    /// [`PagePacker::recycle`] once its bytes are sent.
    pub fn pop(&mut self) -> Option<Encoded> {
        self.done.pop_front()
    }

    /// Return a batch's buffers for reuse.
    pub fn recycle(&mut self, mut e: Encoded) {
        e.bytes.clear();
        self.spare.push((e.runs, e.data, e.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::{decode_batch, BatchLimits};

    #[test]
    fn packs_in_order_with_zero_markers() {
        let mut p = PagePacker::new(PageWriterOptions {
            batch_bytes: 2 * PAGE,
            threads: 2,
            ..PageWriterOptions::default()
        });
        let mut mem = vec![0u8; 16 * PAGE];
        for i in [1usize, 2, 3, 7, 8, 15] {
            mem[i * PAGE] = i as u8;
        }
        p.add(0x10000, &mem).expect("add");
        p.add_zero(0x100000, 3).expect("add_zero");
        p.finish().expect("finish");
        let mut data_pages = Vec::new();
        let mut zero = 0u64;
        while let Some(e) = p.pop() {
            let b = decode_batch(&e.bytes, BatchLimits::default()).expect("decode");
            for (run, d) in b.iter() {
                if run.zero {
                    zero += u64::from(run.pages);
                } else if let Some(d) = d {
                    for (k, page) in d.chunks(PAGE).enumerate() {
                        data_pages.push((run.addr + (k * PAGE) as u64, page[0]));
                    }
                }
            }
            p.recycle(e);
        }
        let want: Vec<(u64, u8)> = [1u64, 2, 3, 7, 8, 15]
            .iter()
            .map(|&i| (0x10000 + i * PAGE_SIZE, i as u8))
            .collect();
        assert_eq!(data_pages, want);
        assert_eq!(zero, 10 + 3);
        assert_eq!(p.stats().pages, 19);
        assert_eq!(p.stats().data_pages, 6);
        assert!(matches!(p.add(1, &mem), Err(PackError::BadRange { .. })));
    }
}
