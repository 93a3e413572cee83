//! The page store: memory contents keyed by virtual address.
//!
//! Memory is described by [`PageRun`]s: `pages` consecutive 4 KiB pages
//! starting at `addr`, either all zero (stored as a marker only) or with
//! their contents. Runs are grouped into [`PageBatch`]es, and a batch is
//! encoded on its own ([`encode_batch`] / [`decode_batch`]) so that the same
//! codec can be used in an image file and on the wire.
//!
//! # Batch encoding
//!
//! All integers little-endian. A 40-byte header, the run table, then the
//! contents of the non-zero runs (in run order), possibly zstd-compressed:
//!
//! | offset | size | field                                                    |
//! |-------:|-----:|----------------------------------------------------------|
//! |      0 |    4 | magic `b"FPGB"`                                          |
//! |      4 |    4 | codec: 0 = stored, 1 = zstd                              |
//! |      8 |    4 | number of runs `r`                                       |
//! |     12 |    4 | reserved, 0                                              |
//! |     16 |    8 | raw data length (4096 × non-zero pages)                  |
//! |     24 |    8 | stored data length (as it follows the run table)         |
//! |     32 |    8 | xxh3-64 of the run table followed by the raw data        |
//! |     40 | 16·r | runs: u64 addr, u32 pages, u32 flags (bit 0: zero run)   |
//! |      … |    … | data                                                     |
//!
//! Decoding never trusts a length it has not bounded: the run count and the
//! raw length are capped by [`BatchLimits`], decompression writes into a
//! buffer of the declared (bounded) size and must fill it exactly, and the
//! checksum is verified over the decoded content.
//!
//! # The file `pages.img`
//!
//! A 16-byte header (magic `b"FERRYPGS"`, u32 version [`PAGES_VERSION`],
//! u32 flags, 0 today), then any number of batches back to back, then a 40-byte
//! trailer: magic `b"FPGT"`, u32 reserved, u64 batch count, u64 total pages,
//! u64 xxh3 of the concatenated batch checksums (catches dropped or reordered
//! batches), u64 xxh3 of the preceding 32 trailer bytes. A file without a
//! valid trailer is truncated; nothing may follow the trailer.
//!
//! When the same page appears in more than one batch, the later one wins.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};
use zstd::bulk::{Compressor, Decompressor};

use crate::model::PAGE_SIZE;
use crate::packer::{PackError, PagePacker};
use crate::validate::is_page_aligned;

#[cfg(test)]
const PAGE: usize = PAGE_SIZE as usize;

/// Name of the page store file inside an image directory (a page store of
/// no particular space: tests and tools).
pub const PAGES_FILE: &str = "pages.img";

/// A page space: what the addresses of one page store are relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSpace {
    /// The address space of the process with this PID (virtual addresses).
    Task(i32),
    /// A shared memory object of the tree (offsets into the object).
    Shmem(crate::model::ShmemId),
}

impl PageSpace {
    /// The page store file of this space inside an image directory.
    pub fn file_name(self) -> String {
        match self {
            PageSpace::Task(pid) => format!("pages-{pid}.img"),
            PageSpace::Shmem(id) => format!("shmem-{id}.img"),
        }
    }
}

impl std::fmt::Display for PageSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageSpace::Task(pid) => write!(f, "memory of process {pid}"),
            PageSpace::Shmem(id) => write!(f, "shared memory object {id}"),
        }
    }
}
/// Magic at the start of the page store file.
pub const PAGES_MAGIC: [u8; 8] = *b"FERRYPGS";
/// Current (and newest readable) page store version.
pub const PAGES_VERSION: u32 = 1;
/// Oldest page store version this build reads.
pub const MIN_PAGES_VERSION: u32 = 1;
/// Magic of an encoded batch.
pub const BATCH_MAGIC: [u8; 4] = *b"FPGB";
/// Magic of the page store trailer.
pub const TRAILER_MAGIC: [u8; 4] = *b"FPGT";
/// Size of an encoded batch's header.
pub const BATCH_HEADER_LEN: usize = 40;
/// Size of one encoded run.
pub const RUN_LEN: usize = 16;
/// Size of the page store file header.
pub const FILE_HEADER_LEN: usize = 16;
/// Size of the page store trailer.
pub const TRAILER_LEN: usize = 40;
/// Default zstd level (fast).
pub const DEFAULT_LEVEL: i32 = 1;
/// Default amount of non-zero data collected before a batch is flushed.
pub const DEFAULT_BATCH_BYTES: usize = 64 << 10;
/// Default cap on runs per batch written by [`PageWriter`].
pub const DEFAULT_MAX_RUNS: usize = 4096;

const CODEC_STORED: u32 = 0;
const CODEC_ZSTD: u32 = 1;
const RUN_FLAG_ZERO: u32 = 1;

/// `pages` consecutive pages starting at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Virtual address of the first page (page aligned).
    pub addr: u64,
    /// Number of pages (at least 1).
    pub pages: u32,
    /// All pages are zero: no data is stored for them.
    pub zero: bool,
}

impl PageRun {
    /// Length of the run in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE
    }

    /// One past the last byte, or `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len_bytes())
    }
}

/// A group of runs with the contents of the non-zero ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBatch {
    /// The runs, in the order they were added.
    pub runs: Vec<PageRun>,
    /// Concatenated contents of the non-zero runs, in run order.
    pub data: Vec<u8>,
}

impl PageBatch {
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.data.clear();
    }

    /// Number of pages covered, zero pages included.
    pub fn total_pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Number of non-zero pages (whose contents are in `data`).
    pub fn data_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| !r.zero)
            .map(|r| u64::from(r.pages))
            .sum()
    }

    /// Each run with its contents (`None` for a zero run). Stops early if
    /// `data` is shorter than the runs claim (never the case after
    /// [`decode_batch`]).
    pub fn iter(&self) -> impl Iterator<Item = (PageRun, Option<&[u8]>)> + '_ {
        let mut off = 0usize;
        self.runs.iter().map_while(move |r| {
            if r.zero {
                return Some((*r, None));
            }
            let len = usize::try_from(r.len_bytes()).ok()?;
            let end = off.checked_add(len)?;
            let d = self.data.get(off..end)?;
            off = end;
            Some((*r, Some(d)))
        })
    }
}

/// Bounds applied when decoding a batch from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest raw (uncompressed) data length accepted.
    pub max_raw: usize,
    /// Largest number of runs accepted.
    pub max_runs: u32,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_raw: 64 << 20,
            max_runs: 1 << 16,
        }
    }
}

/// Why an encoded batch was rejected.
#[derive(Debug, Error)]
pub enum BatchError {
    /// Fewer bytes than the header, or not exactly header + body.
    #[error("batch is {found} bytes, expected {expected}")]
    Length { found: u64, expected: u64 },
    /// Not a batch.
    #[error("bad batch magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    /// An unknown codec number.
    #[error("unknown batch codec {0}")]
    UnknownCodec(u32),
    /// Reserved header field is not zero.
    #[error("reserved batch header field is {0:#x}, expected 0")]
    Reserved(u32),
    /// More runs than [`BatchLimits::max_runs`].
    #[error("{found} runs in a batch (at most {max})")]
    TooManyRuns { found: u32, max: u32 },
    /// Raw length above [`BatchLimits::max_raw`].
    #[error("batch raw length {found} exceeds the limit {max}")]
    TooLarge { found: u64, max: u64 },
    /// Stored length impossible for the codec and raw length.
    #[error("batch stored length {found} is impossible for raw length {raw} (codec {codec})")]
    BadStoredLength { found: u64, raw: u64, codec: u32 },
    /// A run with no pages.
    #[error("run #{run} has no pages")]
    EmptyRun { run: u32 },
    /// A run whose address is not page aligned.
    #[error("run #{run} address {addr:#x} is not page aligned")]
    UnalignedRun { run: u32, addr: u64 },
    /// A run that wraps around the address space.
    #[error("run #{run} at {addr:#x} with {pages} pages overflows the address space")]
    RunOverflow { run: u32, addr: u64, pages: u32 },
    /// Unknown run flags.
    #[error("run #{run} has unknown flags {flags:#x}")]
    RunFlags { run: u32, flags: u32 },
    /// Raw length does not match the non-zero pages of the runs.
    #[error("batch raw length {found} does not match its runs ({expected} bytes)")]
    DataLength { found: u64, expected: u64 },
    /// zstd refused the data.
    #[error("batch data does not decompress: {0}")]
    Decompress(#[source] io::Error),
    /// Decompressed to a different size than declared.
    #[error("batch data decompressed to {found} bytes, expected {expected}")]
    DecompressedLength { found: u64, expected: u64 },
    /// Content checksum mismatch.
    #[error("batch checksum mismatch (header {expected:#018x}, content {found:#018x})")]
    ChecksumMismatch { expected: u64, found: u64 },
}

/// Errors of the page store and of batch decoding.
#[derive(Debug, Error)]
pub enum PageError {
    /// The page store file does not exist.
    #[error("page store {path} does not exist")]
    Missing { path: PathBuf },
    /// Any other I/O failure.
    #[error("I/O error on page store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`PAGES_MAGIC`].
    #[error("{path} is not a ferry page store (magic {found:02x?})")]
    NotAPageStore { path: PathBuf, found: [u8; 8] },
    /// Written by a newer ferry.
    #[error("page store {path}: version {found} is newer than this ferry supports ({supported}): upgrade ferry")]
    VersionTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Written by a ferry too old for this one.
    #[error("page store {path}: version {found} is older than the oldest this ferry supports ({oldest})")]
    VersionTooOld {
        path: PathBuf,
        found: u32,
        oldest: u32,
    },
    /// The file header has flags this build does not know.
    #[error("page store {path} uses unknown header flags {found:#x}")]
    UnknownFlags { path: PathBuf, found: u32 },
    /// The file ends before its trailer.
    #[error(
        "page store {path} is truncated: it ends in or before batch #{batch}, without a trailer"
    )]
    Truncated { path: PathBuf, batch: u64 },
    /// A batch in the file is corrupt.
    #[error("page store {path} is corrupt: batch #{batch}: {source}")]
    CorruptBatch {
        path: PathBuf,
        batch: u64,
        #[source]
        source: BatchError,
    },
    /// The trailer is damaged or does not match the batches read.
    #[error("page store {path} is corrupt: trailer {what} is {found:#x}, expected {expected:#x}")]
    CorruptTrailer {
        path: PathBuf,
        what: &'static str,
        found: u64,
        expected: u64,
    },
    /// Bytes after the trailer.
    #[error("page store {path} is corrupt: data after the trailer")]
    TrailingData { path: PathBuf },
    /// A batch (not from a file) is corrupt.
    #[error("corrupt page batch: {0}")]
    Batch(#[from] BatchError),
    /// [`PageWriter::add`] was given an unaligned address or length.
    #[error("pages at {addr:#x} with {len} bytes: address and length must be page multiples and not wrap")]
    BadRange { addr: u64, len: u64 },
    /// [`PageWriter::add`] was called after an earlier write failed.
    #[error("page store {path}: writer unusable after an earlier error")]
    Poisoned { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PageError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound {
            PageError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            PageError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn le_u32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(o..o + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(o..o + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// True if the page (or any slice) is all zero bytes. Processes 256-byte
/// blocks with a wide OR reduction and exits at the first non-zero block.
pub fn is_zero(p: &[u8]) -> bool {
    let mut blocks = p.chunks_exact(256);
    for b in &mut blocks {
        let mut acc = 0u64;
        for w in b.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// The parsed fixed header of an encoded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// 0 = stored, 1 = zstd.
    pub codec: u32,
    /// Number of runs.
    pub runs: u32,
    /// Uncompressed data length.
    pub raw_len: u64,
    /// Data length as stored.
    pub stored_len: u64,
    /// xxh3 of run table + raw data.
    pub checksum: u64,
}

impl BatchHeader {
    /// Parses and bounds-checks a batch header.
    pub fn parse(h: &[u8; BATCH_HEADER_LEN], limits: &BatchLimits) -> Result<Self, BatchError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&h[0..4]);
        if magic != BATCH_MAGIC {
            return Err(BatchError::BadMagic { found: magic });
        }
        let hdr = Self {
            codec: le_u32(h, 4),
            runs: le_u32(h, 8),
            raw_len: le_u64(h, 16),
            stored_len: le_u64(h, 24),
            checksum: le_u64(h, 32),
        };
        let reserved = le_u32(h, 12);
        if reserved != 0 {
            return Err(BatchError::Reserved(reserved));
        }
        if hdr.runs > limits.max_runs {
            return Err(BatchError::TooManyRuns {
                found: hdr.runs,
                max: limits.max_runs,
            });
        }
        if hdr.raw_len > limits.max_raw as u64 {
            return Err(BatchError::TooLarge {
                found: hdr.raw_len,
                max: limits.max_raw as u64,
            });
        }
        let ok = match hdr.codec {
            CODEC_STORED => hdr.stored_len == hdr.raw_len,
            CODEC_ZSTD => {
                // raw_len is bounded above, so this fits.
                hdr.stored_len <= zstd::zstd_safe::compress_bound(hdr.raw_len as usize) as u64
            }
            c => return Err(BatchError::UnknownCodec(c)),
        };
        if !ok {
            return Err(BatchError::BadStoredLength {
                found: hdr.stored_len,
                raw: hdr.raw_len,
                codec: hdr.codec,
            });
        }
        Ok(hdr)
    }

    /// Bytes following the header: run table plus stored data. Bounded by
    /// the limits the header was parsed with.
    pub fn body_len(&self) -> u64 {
        u64::from(self.runs) * RUN_LEN as u64 + self.stored_len
    }
}

/// Encodes batches, reusing a zstd context and scratch buffer.
pub struct BatchEncoder {
    comp: Option<Compressor<'static>>,
    scratch: Vec<u8>,
}

impl BatchEncoder {
    /// A new encoder at zstd `level` (if zstd cannot be set up, batches are
    /// stored uncompressed).
    pub fn new(level: i32) -> Self {
        Self {
            comp: Compressor::new(level).ok(),
            scratch: Vec::new(),
        }
    }

    /// Appends the encoding of (`runs`, `data`) to `out` and returns the
    /// content checksum. `data` must be the contents of the non-zero runs;
    /// if it is not, the result is rejected by the decoder.
    pub fn encode_into(&mut self, runs: &[PageRun], data: &[u8], out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        out.reserve(BATCH_HEADER_LEN + runs.len() * RUN_LEN + data.len());
        out.extend_from_slice(&[0u8; BATCH_HEADER_LEN]);
        for r in runs {
            out.extend_from_slice(&r.addr.to_le_bytes());
            out.extend_from_slice(&r.pages.to_le_bytes());
            let flags = if r.zero { RUN_FLAG_ZERO } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        let mut h = Xxh3::new();
        h.update(&out[start + BATCH_HEADER_LEN..]);
        h.update(data);
        let checksum = h.digest();

        let mut codec = CODEC_STORED;
        if let (Some(comp), false) = (self.comp.as_mut(), data.is_empty()) {
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(data.len()));
            if let Ok(n) = comp.compress_to_buffer(data, &mut self.scratch) {
                if n < data.len() {
                    codec = CODEC_ZSTD;
                }
            }
        }
        let stored: &[u8] = if codec == CODEC_ZSTD {
            &self.scratch
        } else {
            data
        };
        out.extend_from_slice(stored);

        let hdr = &mut out[start..start + BATCH_HEADER_LEN];
        hdr[0..4].copy_from_slice(&BATCH_MAGIC);
        hdr[4..8].copy_from_slice(&codec.to_le_bytes());
        hdr[8..12].copy_from_slice(&(runs.len() as u32).to_le_bytes());
        hdr[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
        hdr[24..32].copy_from_slice(&(stored.len() as u64).to_le_bytes());
        hdr[32..40].copy_from_slice(&checksum.to_le_bytes());
        checksum
    }
}

/// Decodes batches, reusing a zstd context.
pub struct BatchDecoder {
    dec: Option<Decompressor<'static>>,
    limits: BatchLimits,
}

impl BatchDecoder {
    /// A new decoder enforcing `limits`.
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            dec: Decompressor::new().ok(),
            limits,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &BatchLimits {
        &self.limits
    }

    /// Decodes and fully validates `bytes` (exactly one encoded batch) into
    /// `batch`, reusing its buffers. Returns the content checksum.
    pub fn decode_into(&mut self, bytes: &[u8], batch: &mut PageBatch) -> Result<u64, BatchError> {
        batch.clear();
        let mut hbuf = [0u8; BATCH_HEADER_LEN];
        match bytes.get(..BATCH_HEADER_LEN) {
            Some(h) => hbuf.copy_from_slice(h),
            None => {
                return Err(BatchError::Length {
                    found: bytes.len() as u64,
                    expected: BATCH_HEADER_LEN as u64,
                })
            }
        }
        let hdr = BatchHeader::parse(&hbuf, &self.limits)?;
        let expected = BATCH_HEADER_LEN as u64 + hdr.body_len();
        if bytes.len() as u64 != expected {
            return Err(BatchError::Length {
                found: bytes.len() as u64,
                expected,
            });
        }
        // All lengths below are bounded by `expected`, which fits in memory.
        let table_end = BATCH_HEADER_LEN + hdr.runs as usize * RUN_LEN;
        let table = &bytes[BATCH_HEADER_LEN..table_end];
        let stored = &bytes[table_end..];

        batch.runs.reserve(hdr.runs as usize);
        let mut data_pages = 0u64;
        for (i, e) in table.chunks_exact(RUN_LEN).enumerate() {
            let run = i as u32;
            let addr = le_u64(e, 0);
            let pages = le_u32(e, 8);
            let flags = le_u32(e, 12);
            if flags & !RUN_FLAG_ZERO != 0 {
                return Err(BatchError::RunFlags { run, flags });
            }
            if pages == 0 {
                return Err(BatchError::EmptyRun { run });
            }
            if !is_page_aligned(addr) {
                return Err(BatchError::UnalignedRun { run, addr });
            }
            let r = PageRun {
                addr,
                pages,
                zero: flags & RUN_FLAG_ZERO != 0,
            };
            if r.end().is_none() {
                return Err(BatchError::RunOverflow { run, addr, pages });
            }
            if !r.zero {
                data_pages += u64::from(pages);
            }
            batch.runs.push(r);
        }
        // data_pages <= max_runs * u32::MAX: no overflow in u64 * 4096.
        let want = data_pages.saturating_mul(PAGE_SIZE);
        if want != hdr.raw_len {
            return Err(BatchError::DataLength {
                found: hdr.raw_len,
                expected: want,
            });
        }
        let raw_len = hdr.raw_len as usize;
        match hdr.codec {
            CODEC_ZSTD => {
                batch.data.reserve(raw_len);
                let n = match self.dec.as_mut() {
                    Some(d) => d
                        .decompress_to_buffer(stored, &mut batch.data)
                        .map_err(BatchError::Decompress)?,
                    None => {
                        return Err(BatchError::Decompress(io::Error::other(
                            "zstd decompressor unavailable",
                        )))
                    }
                };
                if n != raw_len {
                    batch.clear();
                    return Err(BatchError::DecompressedLength {
                        found: n as u64,
                        expected: hdr.raw_len,
                    });
                }
            }
            _ => batch.data.extend_from_slice(stored),
        }
        let mut h = Xxh3::new();
        h.update(table);
        h.update(&batch.data);
        let found = h.digest();
        if found != hdr.checksum {
            batch.clear();
            return Err(BatchError::ChecksumMismatch {
                expected: hdr.checksum,
                found,
            });
        }
        Ok(found)
    }
}

/// Encodes a batch (see the module docs) at zstd `level`. An inconsistent
/// batch (data not matching its runs) encodes to bytes that
/// [`decode_batch`] rejects. For many batches, reuse a [`BatchEncoder`].
pub fn encode_batch(batch: &PageBatch, level: i32) -> Vec<u8> {
    let mut out = Vec::new();
    BatchEncoder::new(level).encode_into(&batch.runs, &batch.data, &mut out);
    out
}

/// Decodes and validates one encoded batch. For many batches, reuse a
/// [`BatchDecoder`].
pub fn decode_batch(bytes: &[u8], limits: BatchLimits) -> Result<PageBatch, PageError> {
    let mut batch = PageBatch::default();
    BatchDecoder::new(limits).decode_into(bytes, &mut batch)?;
    Ok(batch)
}

/// Tuning of a [`PageWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWriterOptions {
    /// zstd level.
    pub level: i32,
    /// Non-zero data collected before a batch is flushed.
    pub batch_bytes: usize,
    /// Runs collected before a batch is flushed.
    pub max_runs: usize,
    /// Threads compressing batches in parallel (at least one).
    pub threads: usize,
}

impl Default for PageWriterOptions {
    fn default() -> Self {
        Self {
            level: DEFAULT_LEVEL,
            batch_bytes: DEFAULT_BATCH_BYTES,
            max_runs: DEFAULT_MAX_RUNS,
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4),
        }
    }
}

/// What a [`PageWriter`] stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Batches written.
    pub batches: u64,
    /// Pages recorded, zero pages included.
    pub pages: u64,
    /// Pages recorded as zero markers.
    pub zero_pages: u64,
    /// Pages stored with contents.
    pub data_pages: u64,
    /// Memory covered, in bytes (`pages` × 4096).
    pub raw_bytes: u64,
    /// Size of the file written, header and trailer included.
    pub bytes_written: u64,
}

/// Size of the write buffer; encoded batches are collected up to this size
/// before a write system call.
const WRITE_BUF: usize = 1 << 20;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes a page store file ([`PAGES_FILE`]) into an image directory.
///
/// The file is written under a temporary name and renamed into place by
/// [`PageWriter::finish`]; dropping the writer without finishing removes it.
pub struct PageWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    packer: PagePacker,
    out: Vec<u8>,
    stats: PageStats,
    content: Xxh3,
    done: bool,
    poisoned: bool,
}

impl PageWriter {
    /// Creates `dir/`[`PAGES_FILE`] with default options.
    pub fn create(dir: &Path) -> Result<Self, PageError> {
        Self::create_with(dir, PageWriterOptions::default())
    }

    /// Creates `dir/`[`PAGES_FILE`] with the given options.
    pub fn create_with(dir: &Path, opts: PageWriterOptions) -> Result<Self, PageError> {
        Self::create_named(dir, PAGES_FILE, opts)
    }

    /// Creates the page store of `space` in `dir` with default options.
    pub fn create_space(dir: &Path, space: PageSpace) -> Result<Self, PageError> {
        Self::create_named(dir, &space.file_name(), PageWriterOptions::default())
    }

    fn create_named(dir: &Path, name: &str, opts: PageWriterOptions) -> Result<Self, PageError> {
        let path = dir.join(name);
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let packer = PagePacker::new(opts);
        let batch_bytes = packer.options().batch_bytes;
        let mut out = Vec::with_capacity(WRITE_BUF + batch_bytes + (batch_bytes >> 7) + 4096);
        out.extend_from_slice(&PAGES_MAGIC);
        out.extend_from_slice(&PAGES_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        Ok(Self {
            path,
            tmp,
            file,
            packer,
            out,
            stats: PageStats {
                bytes_written: FILE_HEADER_LEN as u64,
                ..PageStats::default()
            },
            content: Xxh3::new(),
            done: false,
            poisoned: false,
        })
    }

    /// Records `data` (a whole number of pages) as the contents of memory
    /// starting at `addr`. All-zero pages are stored as markers only;
    /// adjacent pages of the same kind are merged into runs. A run never
    /// spans two calls, so a run lies inside whatever range the caller
    /// passed in one call (e.g. inside one VMA, even when VMAs touch).
    pub fn add(&mut self, addr: u64, data: &[u8]) -> Result<(), PageError> {
        self.check_poisoned()?;
        let r = self.packer.add(addr, data);
        self.packed(r)
    }

    /// Records `pages` zero pages starting at `addr` without needing their
    /// contents (e.g. pages known to be unpopulated).
    pub fn add_zero(&mut self, addr: u64, pages: u64) -> Result<(), PageError> {
        self.check_poisoned()?;
        let r = self.packer.add_zero(addr, pages);
        self.packed(r)
    }

    fn check_poisoned(&self) -> Result<(), PageError> {
        if self.poisoned || self.done {
            return Err(PageError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Turns a packer error into ours, then writes out the batches that are ready.
    fn packed(&mut self, r: Result<(), PackError>) -> Result<(), PageError> {
        match r {
            Ok(()) => {}
            Err(PackError::BadRange { addr, len }) => {
                return Err(PageError::BadRange { addr, len })
            }
            Err(e @ PackError::Worker(_)) => {
                self.poisoned = true;
                return Err(io_err(&self.tmp)(std::io::Error::other(e)));
            }
        }
        while let Some(e) = self.packer.pop() {
            self.out.extend_from_slice(&e.bytes);
            self.content.update(&e.checksum.to_le_bytes());
            self.stats.batches += 1;
            self.stats.bytes_written += e.bytes.len() as u64;
            self.packer.recycle(e);
            if self.out.len() >= WRITE_BUF {
                self.write_out()?;
            }
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), PageError> {
        if let Err(e) = self.file.write_all(&self.out) {
            self.poisoned = true;
            return Err(io_err(&self.tmp)(e));
        }
        self.out.clear();
        Ok(())
    }

    /// Statistics so far (pages in batches not yet written included).
    pub fn stats(&self) -> PageStats {
        let p = self.packer.stats();
        PageStats {
            pages: p.pages,
            zero_pages: p.zero_pages,
            data_pages: p.data_pages,
            raw_bytes: p.pages * PAGE_SIZE,
            ..self.stats
        }
    }

    /// Flushes the last batch, writes the trailer, syncs and renames the
    /// file into place.
    pub fn finish(mut self) -> Result<PageStats, PageError> {
        self.check_poisoned()?;
        let r = self.packer.finish();
        self.packed(r)?;
        let pages = self.packer.stats().pages;
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&TRAILER_MAGIC);
        t[8..16].copy_from_slice(&self.stats.batches.to_le_bytes());
        t[16..24].copy_from_slice(&pages.to_le_bytes());
        t[24..32].copy_from_slice(&self.content.digest().to_le_bytes());
        let sum = xxh3_64(&t[..32]);
        t[32..40].copy_from_slice(&sum.to_le_bytes());
        self.out.extend_from_slice(&t);
        self.stats.bytes_written += TRAILER_LEN as u64;
        self.write_out()?;
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        self.done = true;
        Ok(self.stats())
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Reads and validates a page store file batch by batch.
pub struct PageReader {
    path: PathBuf,
    file: BufReader<File>,
    dec: BatchDecoder,
    buf: Vec<u8>,
    index: u64,
    pages: u64,
    content: Xxh3,
    done: bool,
    version: u32,
}

impl PageReader {
    /// Opens `dir/`[`PAGES_FILE`] with default [`BatchLimits`].
    pub fn open(dir: &Path) -> Result<Self, PageError> {
        Self::open_with_limits(dir, BatchLimits::default())
    }

    /// Opens `dir/`[`PAGES_FILE`] enforcing `limits` on every batch.
    pub fn open_with_limits(dir: &Path, limits: BatchLimits) -> Result<Self, PageError> {
        Self::open_path(dir.join(PAGES_FILE), limits)
    }

    /// Opens the page store of `space` in `dir` with default [`BatchLimits`].
    pub fn open_space(dir: &Path, space: PageSpace) -> Result<Self, PageError> {
        Self::open_path(dir.join(space.file_name()), BatchLimits::default())
    }

    fn open_path(path: PathBuf, limits: BatchLimits) -> Result<Self, PageError> {
        let f = File::open(&path).map_err(io_err(&path))?;
        let mut file = BufReader::with_capacity(256 << 10, f);
        let mut h = [0u8; FILE_HEADER_LEN];
        let n = read_full(&mut file, &mut h).map_err(io_err(&path))?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[..8]);
        if h[..n.min(8)] != PAGES_MAGIC[..n.min(8)] {
            return Err(PageError::NotAPageStore { path, found: magic });
        }
        if n < FILE_HEADER_LEN {
            return Err(PageError::Truncated { path, batch: 0 });
        }
        let version = le_u32(&h, 8);
        let flags = le_u32(&h, 12);
        if flags != 0 {
            return Err(PageError::UnknownFlags { path, found: flags });
        }
        if version > PAGES_VERSION {
            return Err(PageError::VersionTooNew {
                path,
                found: version,
                supported: PAGES_VERSION,
            });
        }
        if version < MIN_PAGES_VERSION {
            return Err(PageError::VersionTooOld {
                path,
                found: version,
                oldest: MIN_PAGES_VERSION,
            });
        }
        Ok(Self {
            path,
            file,
            dec: BatchDecoder::new(limits),
            buf: Vec::new(),
            index: 0,
            pages: 0,
            content: Xxh3::new(),
            done: false,
            version,
        })
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Path of the file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next batch. `Ok(None)` after a valid trailer.
    pub fn next_batch(&mut self) -> Result<Option<PageBatch>, PageError> {
        let mut b = PageBatch::default();
        Ok(self.read_batch_into(&mut b)?.then_some(b))
    }

    /// Reads the next batch into `batch`, reusing its buffers. Returns
    /// `false` (and leaves `batch` empty) after a valid trailer.
    pub fn read_batch_into(&mut self, batch: &mut PageBatch) -> Result<bool, PageError> {
        batch.clear();
        if self.done {
            return Ok(false);
        }
        // Any error ends the iteration.
        self.done = true;
        let mut magic = [0u8; 4];
        if read_full(&mut self.file, &mut magic).map_err(io_err(&self.path))? < 4 {
            return Err(self.truncated());
        }
        if magic == TRAILER_MAGIC {
            self.read_trailer()?;
            return Ok(false);
        }
        self.buf.clear();
        self.buf.extend_from_slice(&magic);
        self.buf.resize(BATCH_HEADER_LEN, 0);
        if read_full(&mut self.file, &mut self.buf[4..]).map_err(io_err(&self.path))?
            < BATCH_HEADER_LEN - 4
        {
            return Err(self.truncated());
        }
        let mut h = [0u8; BATCH_HEADER_LEN];
        h.copy_from_slice(&self.buf);
        let hdr = BatchHeader::parse(&h, self.dec.limits()).map_err(|e| self.corrupt(e))?;
        // Bounded by the limits checked in `parse`; the buffer grows as the
        // body is read, so a file that ends early costs only what it holds.
        let body = hdr.body_len();
        let got = (&mut self.file)
            .take(body)
            .read_to_end(&mut self.buf)
            .map_err(io_err(&self.path))?;
        if (got as u64) < body {
            return Err(self.truncated());
        }
        let sum = self
            .dec
            .decode_into(&self.buf, batch)
            .map_err(|e| self.corrupt(e))?;
        self.content.update(&sum.to_le_bytes());
        self.pages += batch.total_pages();
        self.index += 1;
        self.done = false;
        Ok(true)
    }

    fn truncated(&self) -> PageError {
        PageError::Truncated {
            path: self.path.clone(),
            batch: self.index,
        }
    }

    fn corrupt(&self, source: BatchError) -> PageError {
        PageError::CorruptBatch {
            path: self.path.clone(),
            batch: self.index,
            source,
        }
    }

    fn read_trailer(&mut self) -> Result<(), PageError> {
        let mut t = [0u8; TRAILER_LEN];
        t[..4].copy_from_slice(&TRAILER_MAGIC);
        if read_full(&mut self.file, &mut t[4..]).map_err(io_err(&self.path))? < TRAILER_LEN - 4 {
            return Err(self.truncated());
        }
        let bad = |what, found, expected| PageError::CorruptTrailer {
            path: self.path.clone(),
            what,
            found,
            expected,
        };
        let sum = xxh3_64(&t[..32]);
        if sum != le_u64(&t, 32) {
            return Err(bad("checksum", le_u64(&t, 32), sum));
        }
        if le_u32(&t, 4) != 0 {
            return Err(bad("reserved field", u64::from(le_u32(&t, 4)), 0));
        }
        if le_u64(&t, 8) != self.index {
            return Err(bad("batch count", le_u64(&t, 8), self.index));
        }
        if le_u64(&t, 16) != self.pages {
            return Err(bad("page count", le_u64(&t, 16), self.pages));
        }
        let content = self.content.digest();
        if le_u64(&t, 24) != content {
            return Err(bad("content hash", le_u64(&t, 24), content));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.file, &mut extra).map_err(io_err(&self.path))? != 0 {
            return Err(PageError::TrailingData {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl Iterator for PageReader {
    type Item = Result<PageBatch, PageError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for c in buf.chunks_mut(8) {
                let v = self.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
    }

    /// Kinds of page contents: zero, compressible text-like, random.
    fn page(rng: &mut Rng, kind: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        match kind {
            0 => {}
            1 => {
                let tag = rng.next();
                for (i, c) in p.chunks_mut(16).enumerate() {
                    c[..8].copy_from_slice(&tag.to_le_bytes());
                    c[8..].copy_from_slice(&(i as u64).to_le_bytes());
                }
            }
            2 => rng.fill(&mut p),
            _ => {
                // Mostly zero with one non-zero byte at the very end.
                p[PAGE - 1] = 1;
            }
        }
        p
    }

    /// Reads a whole store back into address -> page contents.
    fn read_all(dir: &Path) -> Result<BTreeMap<u64, Vec<u8>>, PageError> {
        let mut map = BTreeMap::new();
        for b in PageReader::open(dir)? {
            let b = b?;
            let mut data_bytes = 0;
            for (run, data) in b.iter() {
                for i in 0..u64::from(run.pages) {
                    let a = run.addr + i * PAGE_SIZE;
                    let p = match data {
                        None => vec![0u8; PAGE],
                        Some(d) => {
                            let o = (i as usize) * PAGE;
                            d[o..o + PAGE].to_vec()
                        }
                    };
                    map.insert(a, p);
                }
                data_bytes += data.map_or(0, |d| d.len());
            }
            assert_eq!(data_bytes, b.data.len(), "iter covers all data");
        }
        Ok(map)
    }

    fn sample_store(dir: &Path, opts: PageWriterOptions) -> (BTreeMap<u64, Vec<u8>>, PageStats) {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut w = PageWriter::create_with(dir, opts).expect("create");
        let mut expected = BTreeMap::new();
        // A "file-like" region: text pages with zero pages in the middle.
        let kinds = [1, 1, 0, 0, 1, 2, 0, 3, 1, 1, 0];
        let mut region = Vec::new();
        for &k in &kinds {
            region.extend_from_slice(&page(&mut rng, k));
        }
        w.add(0x40_0000, &region).expect("add");
        for (i, p) in region.chunks(PAGE).enumerate() {
            expected.insert(0x40_0000 + i as u64 * PAGE_SIZE, p.to_vec());
        }
        // A big compressible heap, enough for several batches.
        let mut heap = Vec::new();
        for _ in 0..100 {
            heap.extend_from_slice(&page(&mut rng, 1));
        }
        w.add(0x60_0000, &heap).expect("add");
        for (i, p) in heap.chunks(PAGE).enumerate() {
            expected.insert(0x60_0000 + i as u64 * PAGE_SIZE, p.to_vec());
        }
        // Known-zero pages near the top of user space.
        w.add_zero(0x7fff_ffff_0000, 16).expect("add_zero");
        for i in 0..16 {
            expected.insert(0x7fff_ffff_0000 + i * PAGE_SIZE, vec![0; PAGE]);
        }
        let stats = w.finish().expect("finish");
        (expected, stats)
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        for i in [0, 7, 8, 255, 256, 2048, PAGE - 1] {
            p[i] = 0x80;
            assert!(!is_zero(&p), "byte {i}");
            p[i] = 0;
        }
        assert!(is_zero(&[0u8; 10]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }

    #[test]
    fn batch_round_trip() {
        let mut rng = Rng(7);
        let mut data = page(&mut rng, 1);
        data.extend_from_slice(&page(&mut rng, 2));
        data.extend_from_slice(&page(&mut rng, 1));
        let batch = PageBatch {
            runs: vec![
                PageRun {
                    addr: 0x1000,
                    pages: 2,
                    zero: false,
                },
                PageRun {
                    addr: 0x3000,
                    pages: 1000,
                    zero: true,
                },
                PageRun {
                    addr: 0x7fff_0000_0000,
                    pages: 1,
                    zero: false,
                },
            ],
            data,
        };
        for level in [1, 3, -5] {
            let enc = encode_batch(&batch, level);
            assert_eq!(&enc[..4], b"FPGB");
            let dec = decode_batch(&enc, BatchLimits::default()).expect("decode");
            assert_eq!(dec, batch);
            assert_eq!(dec.total_pages(), 1003);
            assert_eq!(dec.data_pages(), 3);
        }
        // Empty batch.
        let enc = encode_batch(&PageBatch::default(), 1);
        assert_eq!(enc.len(), BATCH_HEADER_LEN);
        assert_eq!(
            decode_batch(&enc, BatchLimits::default()).expect("decode"),
            PageBatch::default()
        );
    }

    #[test]
    fn codec_choice() {
        let mut rng = Rng(99);
        let run = |n| PageRun {
            addr: 0,
            pages: n,
            zero: false,
        };
        // Compressible data is compressed...
        let mut data = Vec::new();
        for _ in 0..16 {
            data.extend_from_slice(&page(&mut rng, 1));
        }
        let b = PageBatch {
            runs: vec![run(16)],
            data,
        };
        let enc = encode_batch(&b, 1);
        assert_eq!(le_u32(&enc, 4), CODEC_ZSTD);
        assert!(enc.len() < b.data.len() / 4, "{} bytes", enc.len());
        // ...random data is stored as is.
        let b = PageBatch {
            runs: vec![run(1)],
            data: page(&mut rng, 2),
        };
        let enc = encode_batch(&b, 1);
        assert_eq!(le_u32(&enc, 4), CODEC_STORED);
        assert_eq!(enc.len(), BATCH_HEADER_LEN + RUN_LEN + PAGE);
        assert_eq!(decode_batch(&enc, BatchLimits::default()).expect("ok"), b);
    }

    fn batch_err(bytes: &[u8], limits: BatchLimits) -> BatchError {
        match decode_batch(bytes, limits) {
            Err(PageError::Batch(e)) => e,
            other => panic!("expected a batch error, got {other:?}"),
        }
    }

    fn one(addr: u64, pages: u32, zero: bool, data: Vec<u8>) -> Vec<u8> {
        encode_batch(
            &PageBatch {
                runs: vec![PageRun { addr, pages, zero }],
                data,
            },
            1,
        )
    }

    #[test]
    fn batch_rejections() {
        let lim = BatchLimits::default();
        // Random contents: stored uncompressed, so byte flips reach the checksum.
        let mut rnd = vec![0u8; PAGE];
        Rng(3).fill(&mut rnd);
        let good = one(0x1000, 1, false, rnd);
        assert_eq!(le_u32(&good, 4), CODEC_STORED);
        assert!(decode_batch(&good, lim).is_ok());

        let e = batch_err(&good[..good.len() - 1], lim);
        assert!(matches!(e, BatchError::Length { .. }), "{e}");
        assert!(matches!(
            batch_err(&good[..10], lim),
            BatchError::Length { .. }
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(batch_err(&b, lim), BatchError::Length { .. }));

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(batch_err(&b, lim), BatchError::BadMagic { .. }));
        let mut b = good.clone();
        b[4] = 7;
        assert!(matches!(batch_err(&b, lim), BatchError::UnknownCodec(7)));
        let mut b = good.clone();
        b[12] = 1;
        assert!(matches!(batch_err(&b, lim), BatchError::Reserved(1)));

        assert!(matches!(
            batch_err(&good, BatchLimits { max_runs: 0, ..lim }),
            BatchError::TooManyRuns { found: 1, max: 0 }
        ));
        assert!(matches!(
            batch_err(
                &good,
                BatchLimits {
                    max_raw: PAGE - 1,
                    ..lim
                }
            ),
            BatchError::TooLarge { .. }
        ));

        // Flipped content bytes: checksum mismatch (the data is stored raw).
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        let e = batch_err(&b, lim);
        assert!(matches!(e, BatchError::ChecksumMismatch { .. }), "{e}");
        // Flipped checksum field.
        let mut b = good.clone();
        b[33] ^= 1;
        assert!(matches!(
            batch_err(&b, lim),
            BatchError::ChecksumMismatch { .. }
        ));

        assert!(matches!(
            batch_err(&one(0x1001, 1, true, vec![]), lim),
            BatchError::UnalignedRun {
                run: 0,
                addr: 0x1001
            }
        ));
        assert!(matches!(
            batch_err(&one(0x1000, 0, true, vec![]), lim),
            BatchError::EmptyRun { run: 0 }
        ));
        assert!(matches!(
            batch_err(&one(u64::MAX - 4095, 2, true, vec![]), lim),
            BatchError::RunOverflow { .. }
        ));
        // A run ending exactly at 2^64 is representable? No: end overflows.
        assert!(matches!(
            batch_err(&one(u64::MAX - 4095, 1, true, vec![]), lim),
            BatchError::RunOverflow { .. }
        ));
        // Data not matching the runs.
        assert!(matches!(
            batch_err(&one(0x1000, 2, false, vec![1; PAGE]), lim),
            BatchError::DataLength { .. }
        ));
        assert!(matches!(
            batch_err(&one(0x1000, 1, true, vec![1; PAGE]), lim),
            BatchError::DataLength { .. }
        ));
        // Unknown run flags.
        let mut b = one(0x1000, 1, true, vec![]);
        b[BATCH_HEADER_LEN + 12] = 3;
        assert!(matches!(
            batch_err(&b, lim),
            BatchError::RunFlags { run: 0, flags: 3 }
        ));
    }

    /// A zstd frame that inflates far beyond the declared length is refused
    /// without allocating its full size.
    #[test]
    fn decompression_bomb() {
        let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 1).expect("compress");
        let mut b = Vec::new();
        b.extend_from_slice(&BATCH_MAGIC);
        b.extend_from_slice(&CODEC_ZSTD.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(PAGE as u64).to_le_bytes());
        b.extend_from_slice(&(bomb.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&bomb);
        let e = batch_err(&b, BatchLimits::default());
        assert!(
            matches!(
                e,
                BatchError::Decompress(_) | BatchError::BadStoredLength { .. }
            ),
            "{e}"
        );
        // Same with a plausible stored length: a frame that inflates to
        // 2 pages where 1 is declared.
        let two = zstd::bulk::compress(&vec![5u8; 2 * PAGE], 1).expect("compress");
        let mut b2 = b[..BATCH_HEADER_LEN + RUN_LEN].to_vec();
        b2[24..32].copy_from_slice(&(two.len() as u64).to_le_bytes());
        b2.extend_from_slice(&two);
        let e = batch_err(&b2, BatchLimits::default());
        assert!(matches!(e, BatchError::Decompress(_)), "{e}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0xdead_beef);
        let mut good = Vec::new();
        for k in [1, 2, 0, 1] {
            good.extend_from_slice(&page(&mut rng, k));
        }
        let batch = PageBatch {
            runs: vec![
                PageRun {
                    addr: 0x10_0000,
                    pages: 2,
                    zero: false,
                },
                PageRun {
                    addr: 0x10_2000,
                    pages: 1,
                    zero: true,
                },
                PageRun {
                    addr: 0x10_3000,
                    pages: 1,
                    zero: false,
                },
            ],
            data: [&good[..2 * PAGE], &good[3 * PAGE..]].concat(),
        };
        let enc = encode_batch(&batch, 1);
        let mut dec = BatchDecoder::new(BatchLimits::default());
        let mut out = PageBatch::default();
        for _ in 0..2000 {
            let mut b = enc.clone();
            let flips = 1 + rng.below(4);
            for _ in 0..flips {
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            if b == enc {
                continue;
            }
            // Any single change must be detected.
            assert!(dec.decode_into(&b, &mut out).is_err());
        }
        dec.decode_into(&enc, &mut out)
            .expect("decoder still works");
        assert_eq!(out, batch);
    }

    #[test]
    fn store_round_trip_multi_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (expected, stats) = sample_store(dir.path(), PageWriterOptions::default());
        let got = read_all(dir.path()).expect("read");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "contents differ");
        assert_eq!(stats.pages, 11 + 100 + 16);
        assert_eq!(stats.zero_pages, 4 + 16);
        assert_eq!(stats.data_pages, 7 + 100);
        assert_eq!(stats.raw_bytes, stats.pages * PAGE_SIZE);
        // 107 data pages at 16 pages per batch: 7 batches (the last holding
        // the zero run too).
        assert_eq!(stats.batches, 7);
        let len = fs::metadata(dir.path().join(PAGES_FILE))
            .expect("stat")
            .len();
        assert_eq!(stats.bytes_written, len);
        assert!(len < 107 * PAGE_SIZE / 3, "compressed to {len}");
        let n = PageReader::open(dir.path()).expect("open").count();
        assert_eq!(n as u64, stats.batches);
    }

    #[test]
    fn zero_pages_are_markers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PageWriter::create(dir.path()).expect("create");
        // 64 MiB of zeros, in 1 MiB adds: one run per add, tiny file.
        let zeros = vec![0u8; 1 << 20];
        for i in 0..64u64 {
            w.add(0x1000_0000 + i * (1 << 20), &zeros).expect("add");
        }
        let stats = w.finish().expect("finish");
        assert_eq!(stats.zero_pages, 64 * 256);
        assert_eq!(stats.data_pages, 0);
        assert_eq!(stats.batches, 1);
        assert_eq!(
            stats.bytes_written,
            (FILE_HEADER_LEN + BATCH_HEADER_LEN + 64 * RUN_LEN + TRAILER_LEN) as u64
        );
        let b: Vec<_> = PageReader::open(dir.path())
            .expect("open")
            .collect::<Result<_, _>>()
            .expect("read");
        let want: Vec<_> = (0..64u64)
            .map(|i| PageRun {
                addr: 0x1000_0000 + (i << 20),
                pages: 256,
                zero: true,
            })
            .collect();
        assert_eq!(b[0].runs, want);
    }

    /// Adjacent ranges added separately (touching VMAs) never share a run;
    /// pages within one call are merged.
    #[test]
    fn runs_do_not_span_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PageWriter::create(dir.path()).expect("create");
        let mut two = vec![7u8; 2 * PAGE];
        w.add(0x1000, &two).expect("add");
        w.add(0x3000, &two).expect("add");
        two.fill(0);
        w.add(0x5000, &two).expect("add");
        w.add_zero(0x7000, 1).expect("add_zero");
        w.finish().expect("finish");
        let b = PageReader::open(dir.path())
            .expect("open")
            .next_batch()
            .expect("read")
            .expect("one batch");
        let runs: Vec<_> = b.runs.iter().map(|r| (r.addr, r.pages, r.zero)).collect();
        assert_eq!(
            runs,
            vec![
                (0x1000, 2, false),
                (0x3000, 2, false),
                (0x5000, 2, true),
                (0x7000, 1, true)
            ]
        );
    }

    #[test]
    fn empty_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = PageWriter::create(dir.path())
            .expect("create")
            .finish()
            .expect("finish");
        assert_eq!(
            stats,
            PageStats {
                bytes_written: (FILE_HEADER_LEN + TRAILER_LEN) as u64,
                ..PageStats::default()
            }
        );
        let mut r = PageReader::open(dir.path()).expect("open");
        assert_eq!(r.version(), PAGES_VERSION);
        assert!(r.next_batch().expect("read").is_none());
        assert!(r.next_batch().expect("read again").is_none());
    }

    #[test]
    fn writer_rejects_bad_ranges_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PageWriter::create(dir.path()).expect("create");
        assert!(matches!(
            w.add(0x1001, &[0; PAGE]),
            Err(PageError::BadRange { .. })
        ));
        assert!(matches!(
            w.add(0x1000, &[0; 100]),
            Err(PageError::BadRange { .. })
        ));
        assert!(matches!(
            w.add(u64::MAX - 4095, &[0; 2 * PAGE]),
            Err(PageError::BadRange { .. })
        ));
        assert!(matches!(
            w.add_zero(0x1000, u64::MAX / 2),
            Err(PageError::BadRange { .. })
        ));
        w.add(0x1000, &[1; PAGE]).expect("add");
        drop(w);
        // Dropping an unfinished writer leaves nothing behind.
        assert_eq!(fs::read_dir(dir.path()).expect("readdir").count(), 0);
    }

    #[test]
    fn missing_and_foreign_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = PageReader::open(dir.path()).err().expect("missing");
        assert!(matches!(e, PageError::Missing { .. }), "{e}");
        let p = dir.path().join(PAGES_FILE);
        fs::write(&p, b"FERRYIMG and more bytes").expect("write");
        let e = PageReader::open(dir.path()).err().expect("foreign");
        assert!(matches!(e, PageError::NotAPageStore { .. }), "{e}");
        fs::write(&p, b"FERRY").expect("write");
        let e = PageReader::open(dir.path()).err().expect("short");
        assert!(matches!(e, PageError::Truncated { batch: 0, .. }), "{e}");
    }

    fn small_store() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = PageWriterOptions {
            batch_bytes: 2 * PAGE,
            ..PageWriterOptions::default()
        };
        sample_store(dir.path(), opts);
        let bytes = fs::read(dir.path().join(PAGES_FILE)).expect("read");
        assert!(bytes.len() < 40_000, "{} bytes", bytes.len());
        (dir, bytes)
    }

    /// Offsets at which each batch starts, and the trailer's offset.
    fn batch_offsets(bytes: &[u8]) -> (Vec<usize>, usize) {
        let mut v = Vec::new();
        let mut o = FILE_HEADER_LEN;
        while bytes[o..o + 4] == BATCH_MAGIC {
            v.push(o);
            let runs = le_u32(bytes, o + 8) as usize;
            let stored = le_u64(bytes, o + 24) as usize;
            o += BATCH_HEADER_LEN + runs * RUN_LEN + stored;
        }
        (v, o)
    }

    /// Reads a whole store, checking everything, without keeping contents.
    fn read_check(dir: &Path) -> Result<u64, PageError> {
        let mut r = PageReader::open(dir)?;
        let mut b = PageBatch::default();
        let mut pages = 0;
        while r.read_batch_into(&mut b)? {
            pages += b.total_pages();
        }
        Ok(pages)
    }

    fn read_err(dir: &Path, bytes: &[u8]) -> PageError {
        fs::write(dir.join(PAGES_FILE), bytes).expect("write");
        match read_check(dir) {
            Err(e) => e,
            Ok(_) => panic!("store should have been rejected"),
        }
    }

    #[test]
    fn truncation_is_detected_everywhere() {
        let (dir, bytes) = small_store();
        let (offsets, trailer) = batch_offsets(&bytes);
        assert!(offsets.len() > 10, "{} batches", offsets.len());
        assert_eq!(trailer + TRAILER_LEN, bytes.len());
        // Every cut in the first batches and around the trailer, a sample
        // elsewhere (each cut costs a file write and a full read).
        let cuts = (FILE_HEADER_LEN..bytes.len())
            .filter(|&c| c < offsets[3] || c + 2 * TRAILER_LEN > bytes.len() || c % 37 == 0);
        for cut in cuts {
            let e = read_err(dir.path(), &bytes[..cut]);
            let want = offsets.iter().filter(|&&o| o < cut).count() as u64;
            // A cut exactly at a batch boundary ends "before" that batch.
            let want = if offsets.contains(&cut) || cut == trailer {
                want
            } else {
                want - 1
            };
            let want = if cut > trailer {
                offsets.len() as u64
            } else {
                want
            };
            match e {
                PageError::Truncated { batch, .. } => assert_eq!(batch, want, "cut {cut}"),
                e => panic!("cut {cut}: {e}"),
            }
        }
        let e = read_err(dir.path(), &bytes[..FILE_HEADER_LEN + 1]);
        assert!(e.to_string().contains("is truncated"), "{e}");
        assert!(e.to_string().contains(PAGES_FILE), "{e}");
    }

    /// A batch header that declares the largest body the limits allow, in a
    /// file that ends right after it: truncated, read without sizing a
    /// buffer for the declared body first (found by the `page_store` fuzz
    /// target; the allocation is checked in ferry-fuzz-props' regression
    /// tests).
    #[test]
    fn a_declared_body_that_never_comes_is_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = PAGES_MAGIC.to_vec();
        b.extend_from_slice(&PAGES_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&BATCH_MAGIC);
        for v in [CODEC_ZSTD, 1 << 16, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [64u64 << 20, 64 << 20, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[0; RUN_LEN]);
        let e = read_err(dir.path(), &b);
        assert!(matches!(e, PageError::Truncated { batch: 0, .. }), "{e}");
    }

    #[test]
    fn corruption_is_detected() {
        let (dir, bytes) = small_store();
        let (offsets, trailer) = batch_offsets(&bytes);
        // A flipped byte in the data of batch 3.
        let mut b = bytes.clone();
        let next = offsets[4];
        b[next - 1] ^= 0x10;
        let e = read_err(dir.path(), &b);
        assert!(matches!(e, PageError::CorruptBatch { batch: 3, .. }), "{e}");
        assert!(e.to_string().contains("batch #3"), "{e}");
        // Every single byte flip is detected: all bytes of the file header,
        // the first batches, the head of every batch, the trailer, and a
        // sample of the rest.
        let flips = (0..bytes.len()).filter(|&i| {
            i < offsets[3]
                || i >= trailer
                || offsets.iter().any(|&o| (o..o + 64).contains(&i))
                || i % 41 == 0
        });
        for i in flips {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            fs::write(dir.path().join(PAGES_FILE), &b).expect("write");
            assert!(read_check(dir.path()).is_err(), "flip at {i} undetected");
        }
        // Version newer than supported.
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = read_err(dir.path(), &b);
        assert!(
            matches!(
                e,
                PageError::VersionTooNew {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        let e = read_err(dir.path(), &b);
        assert!(
            matches!(e, PageError::VersionTooOld { found: 0, .. }),
            "{e}"
        );
        // A batch dropped from the middle.
        let b = [&bytes[..offsets[2]], &bytes[offsets[3]..]].concat();
        let e = read_err(dir.path(), &b);
        assert!(
            matches!(
                e,
                PageError::CorruptTrailer {
                    what: "batch count",
                    ..
                }
            ),
            "{e}"
        );
        // Two batches swapped.
        let b = [
            &bytes[..offsets[2]],
            &bytes[offsets[3]..offsets[4]],
            &bytes[offsets[2]..offsets[3]],
            &bytes[offsets[4]..],
        ]
        .concat();
        let e = read_err(dir.path(), &b);
        assert!(matches!(e, PageError::CorruptTrailer { .. }), "{e}");
        // Garbage after the trailer.
        let mut b = bytes.clone();
        b.push(0);
        let e = read_err(dir.path(), &b);
        assert!(matches!(e, PageError::TrailingData { .. }), "{e}");
        // A broken trailer.
        let mut b = bytes.clone();
        b[trailer + 20] ^= 1;
        let e = read_err(dir.path(), &b);
        assert!(
            matches!(
                e,
                PageError::CorruptTrailer {
                    what: "checksum",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Random layouts: regions at random addresses with random page kinds,
    /// written with random batch sizes, must read back exactly.
    #[test]
    fn random_layouts_round_trip() {
        let mut rng = Rng(0x5eed_0000_0000_0001);
        for round in 0..40 {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = PageWriterOptions {
                level: [1, 3, -1][round % 3],
                batch_bytes: PAGE * (1 + rng.below(24) as usize),
                max_runs: 1 + rng.below(12) as usize,
                threads: 1 + round % 3,
            };
            let mut w = PageWriter::create_with(dir.path(), opts).expect("create");
            let mut expected = BTreeMap::new();
            let mut addr = rng.below(1 << 20) * PAGE_SIZE;
            let (mut zero, mut data) = (0u64, 0u64);
            for _ in 0..rng.below(30) {
                if rng.below(4) == 0 {
                    let n = 1 + rng.below(100);
                    w.add_zero(addr, n).expect("add_zero");
                    for i in 0..n {
                        expected.insert(addr + i * PAGE_SIZE, vec![0; PAGE]);
                    }
                    zero += n;
                    addr += n * PAGE_SIZE;
                } else {
                    let n = 1 + rng.below(40);
                    let mut buf = Vec::with_capacity(n as usize * PAGE);
                    for i in 0..n {
                        let kind = rng.below(4);
                        let p = page(&mut rng, kind);
                        if is_zero(&p) {
                            zero += 1;
                        } else {
                            data += 1;
                        }
                        expected.insert(addr + i * PAGE_SIZE, p.clone());
                        buf.extend_from_slice(&p);
                    }
                    w.add(addr, &buf).expect("add");
                    addr += n * PAGE_SIZE;
                }
                // Sometimes leave a gap, sometimes stay adjacent.
                if rng.below(2) == 0 {
                    addr += (1 + rng.below(1000)) * PAGE_SIZE;
                }
            }
            let stats = w.finish().expect("finish");
            assert_eq!(stats.zero_pages, zero, "round {round}");
            assert_eq!(stats.data_pages, data, "round {round}");
            assert_eq!(stats.pages, expected.len() as u64, "round {round}");
            let got = read_all(dir.path()).expect("read");
            assert!(got == expected, "round {round}: contents differ");
            // Each batch respects the writer's bounds.
            for b in PageReader::open(dir.path()).expect("open") {
                let b = b.expect("batch");
                assert!(b.runs.len() <= opts.max_runs, "round {round}");
                assert!(b.data.len() <= opts.batch_bytes, "round {round}");
            }
        }
    }

    /// Later entries for the same page win, and the reader reports them in
    /// order.
    #[test]
    fn later_pages_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = PageWriter::create(dir.path()).expect("create");
        w.add(0x1000, &[1; PAGE]).expect("add");
        w.add(0x1000, &[2; PAGE]).expect("add");
        w.add_zero(0x2000, 1).expect("add_zero");
        w.add(0x2000, &[3; PAGE]).expect("add");
        w.finish().expect("finish");
        let got = read_all(dir.path()).expect("read");
        assert_eq!(got[&0x1000], vec![2; PAGE]);
        assert_eq!(got[&0x2000], vec![3; PAGE]);
    }

    /// Throughput check; run with
    /// `cargo test --release -p ferry-protocol -- --ignored --nocapture page_throughput`.
    #[test]
    #[ignore]
    fn page_throughput() {
        use std::time::Instant;
        const SIZE: usize = 512 << 20;
        let mut rng = Rng(42);
        let mut mem = vec![0u8; SIZE];
        // Mostly zero: 1 page in 64 has data.
        for p in mem.chunks_mut(PAGE).step_by(64) {
            rng.fill(&mut p[..64]);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let bench = |name: &str, mem: &[u8]| {
            let t = Instant::now();
            let mut w = PageWriter::create(dir.path()).expect("create");
            for (i, c) in mem.chunks(1 << 20).enumerate() {
                w.add(0x1000_0000 + ((i as u64) << 20), c).expect("add");
            }
            let t2 = Instant::now();
            let st = w.finish().expect("finish");
            let ft = t2.elapsed().as_secs_f64();
            let wt = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let pages = read_check(dir.path()).expect("read");
            let rt = t.elapsed().as_secs_f64();
            assert_eq!(pages, st.pages);
            println!(
                "{name}: write {:.2} GB/s ({:.2} s in finish/fsync), read {:.2} GB/s, {} -> {} bytes",
                SIZE as f64 / wt / 1e9,
                ft,
                SIZE as f64 / rt / 1e9,
                st.raw_bytes,
                st.bytes_written
            );
        };
        bench("mostly zero", &mem);
        // Compressible: text-like pages with some randomness.
        for (i, p) in mem.chunks_mut(PAGE).enumerate() {
            for (j, c) in p.chunks_mut(16).enumerate() {
                let v = (rng.next() & 0x0f0f) ^ (i as u64 * 31 + j as u64);
                c[..8].copy_from_slice(&v.to_le_bytes());
                c[8..].copy_from_slice(b"ferry!!\n");
            }
        }
        bench("compressible", &mem);
        rng.fill(&mut mem);
        bench("random", &mem);
    }
}
