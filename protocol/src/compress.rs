//! Ordered parallel batch encoding: batches go in, their encoded bytes come
//! out in the same order, compressed on a few worker threads.
//!
//! ```text
//!  submit(b0) ─► worker 0 ─┐
//!  submit(b1) ─► worker 1 ─┼─► collect(): b0, b1, b2, ... (in order)
//!  submit(b2) ─► worker 0 ─┘
//! ```
//!
//! Batch `i` always goes to worker `i % n` and each worker answers in
//! order, so collecting from worker `i % n` yields batch `i`.

use crate::pages::{BatchEncoder, PageRun};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Batches queued per worker before `submit` waits.
const QUEUE_DEPTH: usize = 2;

/// One batch to encode; its buffers come back in [`Encoded`] for reuse.
struct Job {
    runs: Vec<PageRun>,
    data: Vec<u8>,
    out: Vec<u8>,
}

/// An encoded batch, with the input buffers handed back (cleared).
pub struct Encoded {
    /// The encoded batch (header, run table, body).
    pub bytes: Vec<u8>,
    /// The batch's content checksum.
    pub checksum: u64,
    /// The run buffer, emptied, for reuse.
    pub runs: Vec<PageRun>,
    /// The data buffer, emptied, for reuse.
    pub data: Vec<u8>,
}

struct Worker {
    tx: Option<SyncSender<Job>>,
    rx: Receiver<Encoded>,
    handle: Option<JoinHandle<()>>,
}

/// A pool of batch encoders that keeps batches in order.
pub struct EncoderPool {
    workers: Vec<Worker>,
    submitted: u64,
    collected: u64,
}

/// A worker thread is gone (it panicked); the batches in flight are lost.
#[derive(Debug, thiserror::Error)]
#[error("a page compression worker stopped unexpectedly")]
pub struct WorkerGone;

impl EncoderPool {
    /// `threads` workers (at least one) encoding at zstd `level`.
    pub fn new(threads: usize, level: i32) -> Self {
        let workers = (0..threads.max(1))
            .map(|i| {
                let (tx, jobs) = mpsc::sync_channel::<Job>(QUEUE_DEPTH);
                let (done, rx) = mpsc::channel::<Encoded>();
                let handle = std::thread::Builder::new()
                    .name(format!("ferry-zstd-{i}"))
                    .spawn(move || {
                        let mut enc = BatchEncoder::new(level);
                        for mut job in jobs {
                            job.out.clear();
                            let checksum = enc.encode_into(&job.runs, &job.data, &mut job.out);
                            job.runs.clear();
                            job.data.clear();
                            let encoded = Encoded {
                                bytes: job.out,
                                checksum,
                                runs: job.runs,
                                data: job.data,
                            };
                            if done.send(encoded).is_err() {
                                break;
                            }
                        }
                    })
                    .ok();
                Worker {
                    tx: Some(tx),
                    rx,
                    handle,
                }
            })
            .collect();
        Self {
            workers,
            submitted: 0,
            collected: 0,
        }
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Batches submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        (self.submitted - self.collected) as usize
    }

    /// Queue a batch; `out` is a buffer to encode into (reused allocation).
    /// Waits while the chosen worker's queue is full.
    pub fn submit(
        &mut self,
        runs: Vec<PageRun>,
        data: Vec<u8>,
        out: Vec<u8>,
    ) -> Result<(), WorkerGone> {
        let n = self.workers.len() as u64;
        let w = &self.workers[(self.submitted % n) as usize];
        let tx = w.tx.as_ref().ok_or(WorkerGone)?;
        tx.send(Job { runs, data, out }).map_err(|_| WorkerGone)?;
        self.submitted += 1;
        Ok(())
    }

    /// The oldest batch not yet collected, waiting for it if needed; `None`
    /// when nothing is in flight.
    pub fn collect(&mut self) -> Result<Option<Encoded>, WorkerGone> {
        if self.collected == self.submitted {
            return Ok(None);
        }
        let n = self.workers.len() as u64;
        let w = &self.workers[(self.collected % n) as usize];
        let e = w.rx.recv().map_err(|_| WorkerGone)?;
        self.collected += 1;
        Ok(Some(e))
    }
}

impl Drop for EncoderPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx.take();
        }
        for w in &mut self.workers {
            // Drain so a worker blocked on send can finish.
            while w.rx.try_recv().is_ok() {}
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::{decode_batch, BatchLimits};

    #[test]
    fn batches_come_back_in_order_and_decode() {
        let mut pool = EncoderPool::new(3, 1);
        let mut got = Vec::new();
        for i in 0..20u64 {
            let runs = vec![PageRun {
                addr: i * 4096,
                pages: 1,
                zero: false,
            }];
            let data = vec![i as u8; 4096];
            pool.submit(runs, data, Vec::new()).expect("submit");
            if pool.in_flight() > 4 {
                got.push(pool.collect().expect("collect").expect("batch"));
            }
        }
        while let Some(e) = pool.collect().expect("collect") {
            got.push(e);
        }
        assert_eq!(got.len(), 20);
        for (i, e) in got.iter().enumerate() {
            let b = decode_batch(&e.bytes, BatchLimits::default()).expect("decode");
            assert_eq!(b.runs[0].addr, i as u64 * 4096);
            assert!(b.data.iter().all(|&x| x == i as u8));
            assert!(e.runs.is_empty() && e.data.is_empty());
        }
    }
}
