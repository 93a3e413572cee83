//! The properties ferry's fuzz targets check, one function per target, for
//! every decoder of bytes that come from outside: the wire's frames and
//! control messages, page and lazy page frames, page batches, the image file
//! (`process.img`), the page store files and the trust store.
//!
//! Each function takes the raw input and panics if a property fails:
//!
//! - **no panic** in the decoder, whatever the input;
//! - **bounded allocation**: while decoding, the decoder's thread never has
//!   more bytes allocated than the format's declared limits allow for this
//!   input (measured with [`alloc::CountingAlloc`]);
//! - **round trip**: what a decoder accepts, the matching encoder encodes,
//!   and that encoding decodes to the same value (for frames: to the same
//!   bytes).
//!
//! Checksums would keep a fuzzer away from everything behind them, so a
//! property that meets a checksum mismatch fixes the checksum in its copy of
//! the input and decodes again: both the refusal and the deeper checks are
//! exercised by one input.
//!
//! Why a crate of its own: the fuzz targets (`fuzz/`, cargo-fuzz layout)
//! need nightly and libFuzzer and live outside the workspace, while the
//! corpus replay test (`tests/corpus.rs` here) must run on stable under
//! `cargo test --workspace`. Both call these functions, so they check exactly
//! the same thing; keeping them here leaves the production crates without a
//! fuzzing feature or hidden module, and only uses their public API.

pub mod alloc;

use std::cell::RefCell;
use std::fs;
use std::path::Path;

use ferry_protocol::image::{
    ImageError, ImageHeader, IMAGE_MAGIC, IMAGE_VERSION, KIND_PROCESS, PROCESS_FILE,
};
use ferry_protocol::model::{Vma, VmaKind, PAGE_SIZE};
use ferry_protocol::pages::{
    encode_batch, BatchDecoder, BatchError, BatchLimits, PageBatch, PageReader, PageRun,
    BATCH_HEADER_LEN, PAGES_FILE, RUN_LEN, TRAILER_LEN,
};
use ferry_protocol::validate::is_page_aligned;
use ferry_protocol::wire::{
    decode_control, decode_frame, encode_control, encode_frame, page_decoder, read_frame,
    DestState, Frame, MsgKind, PageSpan, StreamFrame, WireError, MAX_CONTROL_FRAME, MAX_PAGE_FRAME,
    PAGE_BATCH_LIMITS,
};
use ferry_protocol::{read_tree_image, write_tree_image, PageError};
use ferry_transport::trust::TRUST_FILE;
use ferry_transport::{Error as TransportError, Fingerprint, TrustStore};
use xxhash_rust::xxh3::xxh3_64 as xxh3;

/// A property: panics if the input breaks it.
pub type Property = fn(&[u8]);

/// Every fuzz target: its name (the file `fuzz/fuzz_targets/NAME.rs` and the
/// corpus directory `fuzz/corpus/NAME/`) and its property function.
pub const TARGETS: &[(&str, Property)] = &[
    ("frame", frame),
    ("control", control),
    ("stream", stream),
    ("batch", batch),
    ("image", image),
    ("page_store", page_store),
    ("trust", trust),
];

/// Allocation a decoder may make beyond what its input and limits explain
/// (small fixed buffers, error messages).
const SLACK: usize = 64 << 10;

/// Bound on what decoding `n` bytes of postcard (a control message or an
/// image) may allocate. serde pre-allocates a sequence from its declared
/// length but at most 1 MiB before its elements arrive, one sequence per
/// level of nesting is open at a time, and every element decoded costs at
/// least one input byte; no type of the model is more than
/// [`POSTCARD_FACTOR`] times larger in memory than its smallest encoding
/// (growth by doubling included).
fn postcard_bound(n: usize) -> usize {
    POSTCARD_FACTOR * n + POSTCARD_NESTING * (1 << 20) + SLACK
}
/// See [`postcard_bound`].
const POSTCARD_FACTOR: usize = 128;
/// See [`postcard_bound`]: nesting depth of the model's sequences.
const POSTCARD_NESTING: usize = 8;

// ---------------------------------------------------------------- frames --

/// `frame`: a byte stream of frames, as a control or page stream delivers
/// it. Each frame is split off with `decode_frame`, `read_frame` and the
/// transport's async `recv_frame`, which must agree; an accepted frame
/// re-encodes to exactly its bytes and its payload goes through the
/// decoder of its kind ([`check_frame`]).
pub fn frame(data: &[u8]) {
    for max in [MAX_CONTROL_FRAME, MAX_PAGE_FRAME] {
        frames_under(data, max);
    }
}

fn frames_under(data: &[u8], max: u32) {
    let mut bytes = data.to_vec();
    let mut off = 0;
    let mut repairs = 0;
    while off <= bytes.len() {
        let rest = &bytes[off..];
        let sliced = alloc::bounded("decode_frame", rest.len() + SLACK, || {
            decode_frame(rest, max).map(|(f, tail)| (f, rest.len() - tail.len()))
        });
        let read = alloc::bounded("read_frame", 2 * rest.len() + 2 * SLACK, || {
            read_frame(&mut &rest[..], max)
        });
        let recv = alloc::bounded("transport recv_frame", 2 * rest.len() + 2 * SLACK, || {
            recv_frame(rest, max)
        });
        same_outcome("read_frame", &sliced, &read);
        match (&sliced, recv) {
            (Err(WireError::EndOfStream), Ok(None)) => {}
            (Ok((a, _)), Ok(Some(b))) => assert_eq!(a, &b, "recv_frame decoded another frame"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "recv_frame"),
            (a, b) => panic!("decode_frame gave {a:?}, recv_frame {b:?}"),
        }
        match sliced {
            Ok((f, n)) => {
                let again = encode_frame(f.kind, &f.payload).expect("an accepted frame encodes");
                assert_eq!(again, rest[..n], "a frame does not re-encode to its bytes");
                // Every frame under the page limit is under the control
                // limit too: check its contents once.
                if max == MAX_CONTROL_FRAME {
                    check_frame(&f);
                }
                off += n;
            }
            Err(WireError::Checksum { found, .. }) if repairs < 4 => {
                bytes[off + 8..off + 16].copy_from_slice(&found.to_le_bytes());
                repairs += 1;
            }
            Err(_) => break,
        }
    }
}

fn same_outcome(what: &str, a: &Result<(Frame, usize), WireError>, b: &Result<Frame, WireError>) {
    match (a, b) {
        (Ok((x, _)), Ok(y)) => assert_eq!(x, y, "{what} decoded another frame"),
        (Err(x), Err(y)) => assert_eq!(x.to_string(), y.to_string(), "{what}"),
        (x, y) => panic!("decode_frame gave {x:?}, {what} {y:?}"),
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread tokio runtime");
}

fn recv_frame(bytes: &[u8], max: u32) -> Result<Option<Frame>, WireError> {
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let mut r = bytes;
            ferry_transport::frames::recv_frame(&mut r, max).await
        })
    })
}

/// The decoder of a checked frame's kind: a control message (validated;
/// re-encoded and decoded again to the same message) or a page stream frame
/// ([`check_stream_frame`]).
pub fn check_frame(f: &Frame) {
    if !f.kind.is_control() {
        check_stream_frame(f);
        return;
    }
    let msg = alloc::bounded("decode_control", postcard_bound(f.payload.len()), || {
        decode_control(f)
    });
    let Ok(msg) = msg else { return };
    let bytes = encode_control(&msg).expect("an accepted control message encodes");
    let (again, rest) = decode_frame(&bytes, MAX_CONTROL_FRAME).expect("its frame decodes");
    assert!(rest.is_empty());
    assert_eq!(
        decode_control(&again).expect("the re-encoded message decodes"),
        msg,
        "decode(encode(msg)) != msg"
    );
    // The destination's state machine takes any valid message without
    // panicking, in its first state and after a Hello.
    let mut st = DestState::new();
    let _ = st.accept(&msg);
    let _ = st.page_batch(0, 1, BATCH_HEADER_LEN as u64);
}

/// `control`: one control message: the first byte picks the kind, the rest
/// is its payload, framed with a correct header ([`check_frame`]).
pub fn control(data: &[u8]) {
    let kinds: Vec<MsgKind> = MsgKind::ALL
        .iter()
        .copied()
        .filter(|k| k.is_control())
        .collect();
    framed(data, &kinds);
}

/// `stream`: one page stream frame: the first byte picks `Pages` or
/// `LazyPages`, the rest is its payload ([`check_stream_frame`]).
pub fn stream(data: &[u8]) {
    framed(data, &[MsgKind::Pages, MsgKind::LazyPages]);
}

fn framed(data: &[u8], kinds: &[MsgKind]) {
    let Some((&k, payload)) = data.split_first() else {
        return;
    };
    let kind = kinds[k as usize % kinds.len()];
    let Ok(bytes) = encode_frame(kind, payload) else {
        return;
    };
    let (f, rest) = decode_frame(&bytes, MAX_CONTROL_FRAME.max(MAX_PAGE_FRAME))
        .expect("a frame made by encode_frame decodes");
    assert!(rest.is_empty());
    assert_eq!(f.payload, payload);
    check_frame(&f);
}

/// The areas page frames are checked against: a large anonymous area, a
/// kernel special area and a shared memory area above it.
fn fixed_vmas() -> Vec<Vma> {
    let vma = |start: u64, end: u64, kind| Vma {
        start,
        end,
        prot: 3,
        flags: 2,
        kind,
        name: None,
    };
    vec![
        vma(PAGE_SIZE, 1 << 46, VmaKind::Anonymous),
        vma(
            1 << 46,
            (1 << 46) + 4 * PAGE_SIZE,
            VmaKind::Special {
                name: "[vdso]".into(),
            },
        ),
        vma((1 << 46) + 4 * PAGE_SIZE, 1 << 47, VmaKind::Anonymous),
    ]
}

/// The owed spans lazy frames are checked against.
const FIXED_OWED: [PageSpan; 2] = [
    PageSpan {
        addr: PAGE_SIZE,
        pages: (1 << 34) - 1,
    },
    PageSpan {
        addr: 1 << 46,
        pages: 1 << 30,
    },
];

/// A page stream frame: split with [`StreamFrame::from_frame`] (a split frame
/// re-encodes to the same frame), its batch decoded with the wire's decoder
/// and checked against fixed areas (or owed spans), with the checksum of the
/// batch fixed if needed ([`check_batch`] on the batch itself).
pub fn check_stream_frame(f: &Frame) {
    let Ok(sf) = StreamFrame::from_frame(f.clone()) else {
        return;
    };
    let encoded = match &sf {
        StreamFrame::Pages(p) => p.encode(),
        StreamFrame::Lazy(l) => l.encode(),
    }
    .expect("an accepted page frame encodes");
    let (again, _) = decode_frame(&encoded, MAX_PAGE_FRAME).expect("its frame decodes");
    assert_eq!(&again, f, "a page frame does not re-encode to itself");

    let batch_bytes = match &sf {
        StreamFrame::Pages(p) => &p.batch,
        StreamFrame::Lazy(l) => &l.batch,
    };
    let Some(fixed) = check_batch(batch_bytes, PAGE_BATCH_LIMITS) else {
        return;
    };
    let mut dec = page_decoder();
    let mut out = PageBatch::default();
    let vmas = fixed_vmas();
    let bound = fixed.len() + PAGE_BATCH_LIMITS.max_raw + SLACK;
    let r = alloc::bounded("page frame batch", bound, || match sf {
        StreamFrame::Pages(mut p) => {
            p.batch = fixed;
            p.decode_batch(&mut dec, &vmas, &mut out)
        }
        StreamFrame::Lazy(mut l) => {
            l.batch = fixed;
            l.decode_batch(&mut dec, &FIXED_OWED, &mut out)
        }
    });
    if let Err(WireError::Invalid(_)) = r {
        assert!(
            out.runs.is_empty() && out.data.is_empty(),
            "a batch refused by the run check must leave the output empty"
        );
    }
}

// --------------------------------------------------------------- batches --

/// `batch`: one encoded page batch under the wire's limits.
pub fn batch(data: &[u8]) {
    check_batch(data, PAGE_BATCH_LIMITS);
}

/// Decodes `bytes` as one batch under `limits` (fixing its checksum if that
/// is all that is wrong) and checks the decoded batch: its data matches its
/// runs, and it re-encodes (at two zstd levels) to bytes that decode to the
/// same batch with the same checksum. Returns the bytes that decoded, if
/// any: `bytes` itself or its copy with the checksum fixed.
pub fn check_batch(bytes: &[u8], limits: BatchLimits) -> Option<Vec<u8>> {
    let bound = bytes.len() + limits.max_raw + SLACK;
    let mut dec = BatchDecoder::new(limits);
    let mut out = PageBatch::default();
    let r = alloc::bounded("batch decode", bound, || dec.decode_into(bytes, &mut out));
    let (bytes, sum) = match r {
        Ok(sum) => (bytes.to_vec(), sum),
        Err(BatchError::ChecksumMismatch { found, .. }) => {
            assert!(out.runs.is_empty() && out.data.is_empty());
            let mut fixed = bytes.to_vec();
            fixed[32..40].copy_from_slice(&found.to_le_bytes());
            let sum = dec
                .decode_into(&fixed, &mut out)
                .expect("a batch whose only fault was its checksum decodes once it is fixed");
            (fixed, sum)
        }
        Err(_) => return None,
    };
    check_decoded_batch(&out, sum, limits);
    Some(bytes)
}

fn check_decoded_batch(b: &PageBatch, sum: u64, limits: BatchLimits) {
    assert!(b.runs.len() <= limits.max_runs as usize);
    assert!(b.data.len() <= limits.max_raw);
    assert_eq!(b.data.len() as u64, b.data_pages() * PAGE_SIZE);
    assert!(b
        .runs
        .iter()
        .all(|r: &PageRun| r.pages > 0 && is_page_aligned(r.addr) && r.end().is_some()));
    assert_eq!(b.iter().count(), b.runs.len(), "iter stops early");
    for level in [1, 3] {
        let again = encode_batch(b, level);
        assert!(again.len() >= BATCH_HEADER_LEN + b.runs.len() * RUN_LEN);
        let mut dec = BatchDecoder::new(limits);
        let mut back = PageBatch::default();
        let sum2 = dec
            .decode_into(&again, &mut back)
            .expect("a decoded batch re-encodes to a valid batch");
        assert_eq!(&back, b, "decode(encode(batch)) != batch");
        assert_eq!(sum2, sum, "the checksum changed in a round trip");
    }
}

// ----------------------------------------------------------- image files --

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Runs `f` in this thread's scratch directory (on `/dev/shm` if it
/// exists), emptied first.
fn in_scratch<R>(f: impl FnOnce(&Path) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| {
            tempfile::Builder::new()
                .prefix("ferry-fuzz.")
                .tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .expect("a scratch directory")
        });
        let path = dir.path();
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        }
        f(path)
    })
}

/// `image`: an image file (`process.img`). An input that starts with the
/// image magic is the whole file; any other input is the payload, given a
/// correct header. An accepted image is written back and reads as the same
/// image.
pub fn image(data: &[u8]) {
    let mut file = if data.starts_with(&IMAGE_MAGIC) {
        data.to_vec()
    } else {
        let h = ImageHeader {
            version: IMAGE_VERSION,
            kind: KIND_PROCESS,
            payload_len: data.len() as u64,
            checksum: xxh3(data),
        };
        let mut f = h.to_bytes().to_vec();
        f.extend_from_slice(data);
        f
    };
    in_scratch(|dir| {
        for _ in 0..2 {
            fs::write(dir.join(PROCESS_FILE), &file).expect("write the scratch image");
            let r = alloc::bounded("read_tree_image", postcard_bound(file.len()), || {
                read_tree_image(dir)
            });
            match r {
                Ok(img) => {
                    let out = dir.join("out");
                    fs::create_dir_all(&out).expect("scratch subdirectory");
                    write_tree_image(&out, &img).expect("an accepted image can be written");
                    let back = read_tree_image(&out).expect("a written image reads back");
                    assert_eq!(back, img, "read(write(image)) != image");
                    return;
                }
                Err(ImageError::ChecksumMismatch { found, .. }) => {
                    file[24..32].copy_from_slice(&found.to_le_bytes());
                }
                Err(_) => return,
            }
        }
    });
}

// ------------------------------------------------------------ page store --

/// `page_store`: a page store file (`pages.img`), read batch by batch with
/// the default limits (as restore reads an image); each batch is checked
/// like [`check_batch`]'s. A trailer that does not match what was read is
/// fixed and the file read again, so that the complete-file path is
/// reached.
pub fn page_store(data: &[u8]) {
    let limits = BatchLimits::default();
    let mut file = data.to_vec();
    in_scratch(|dir| {
        for _ in 0..3 {
            fs::write(dir.join(PAGES_FILE), &file).expect("write the scratch page store");
            // Reading: a 256 KiB buffer, at most one batch's raw data and
            // its encoding, bounded by the limits and by the file.
            let bound = (256 << 10) + 2 * file.len() + limits.max_raw + SLACK;
            let r = alloc::bounded("page store", bound, || {
                let mut reader = PageReader::open_with_limits(dir, limits)?;
                let mut batches = Vec::new();
                while let Some(b) = reader.next_batch()? {
                    batches.push(b);
                }
                Ok::<_, PageError>(batches)
            });
            match r {
                Ok(batches) => {
                    for b in &batches {
                        let encoded = encode_batch(b, 1);
                        let mut back = PageBatch::default();
                        BatchDecoder::new(limits)
                            .decode_into(&encoded, &mut back)
                            .expect("a batch of an accepted page store re-encodes");
                        assert_eq!(&back, b);
                    }
                    return;
                }
                Err(PageError::CorruptTrailer { .. }) if file.len() >= TRAILER_LEN => {
                    if !fix_trailer(dir, &mut file) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
}

/// Rewrites the last [`TRAILER_LEN`] bytes of `file` as the trailer the
/// batches before them call for (count, pages, content hash, checksum);
/// false if the batches cannot be read.
fn fix_trailer(dir: &Path, file: &mut [u8]) -> bool {
    let t = file.len() - TRAILER_LEN;
    if file[t..t + 4] != *b"FPGT" {
        return false;
    }
    // Read the batches alone (with a trailer whose checksum is right but
    // whose counts are zero) to learn what the trailer must say.
    let mut probe = file.to_vec();
    probe[t + 4..t + 32].fill(0);
    let sum = xxh3(&probe[t..t + 32]);
    probe[t + 32..].copy_from_slice(&sum.to_le_bytes());
    let _ = fs::write(dir.join(PAGES_FILE), &probe);
    let Ok(mut reader) = PageReader::open(dir) else {
        return false;
    };
    let mut count = 0u64;
    let mut pages = 0u64;
    let mut content = Vec::new();
    loop {
        let mut b = PageBatch::default();
        match reader.read_batch_into(&mut b) {
            Ok(true) => {
                count += 1;
                pages += b.total_pages();
                // The batch checksum is the xxh3 of run table and data.
                let mut table = Vec::with_capacity(b.runs.len() * RUN_LEN);
                for r in &b.runs {
                    table.extend_from_slice(&r.addr.to_le_bytes());
                    table.extend_from_slice(&r.pages.to_le_bytes());
                    table.extend_from_slice(&u32::from(r.zero).to_le_bytes());
                }
                table.extend_from_slice(&b.data);
                content.extend_from_slice(&xxh3(&table).to_le_bytes());
            }
            Ok(false) => break,
            Err(PageError::CorruptTrailer { .. }) => break,
            Err(_) => return false,
        }
    }
    let mut tr = [0u8; TRAILER_LEN];
    tr[..4].copy_from_slice(b"FPGT");
    tr[8..16].copy_from_slice(&count.to_le_bytes());
    tr[16..24].copy_from_slice(&pages.to_le_bytes());
    tr[24..32].copy_from_slice(&xxh3(&content).to_le_bytes());
    let sum = xxh3(&tr[..32]);
    tr[32..].copy_from_slice(&sum.to_le_bytes());
    file[t..].copy_from_slice(&tr);
    true
}

// ----------------------------------------------------------- trust store --

/// `trust`: a trust store file (`trusted_peers`). An accepted store holds
/// canonical fingerprints only, survives being written out and read again,
/// and takes a new peer with a comment made of the input without losing any
/// of its own. A refused one names a line of the file. Every line is also
/// parsed as a fingerprint on its own (as `migrate trust ARG` does).
pub fn trust(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines().take(64) {
        if let Ok(fp) = line.parse::<Fingerprint>() {
            let again: Fingerprint = fp.as_str().parse().expect("a canonical fingerprint parses");
            assert_eq!(again, fp);
            assert_eq!(fp.as_str().len(), "sha256:".len() + 64);
            assert_eq!(fp.as_str(), fp.as_str().to_ascii_lowercase());
        }
    }
    in_scratch(|dir| {
        fs::write(dir.join(TRUST_FILE), data).expect("write the scratch trust store");
        let r = alloc::bounded("trust store", 4 * data.len() + SLACK, || {
            TrustStore::load(dir)
        });
        let store = match r {
            Ok(s) => s,
            Err(TransportError::TrustFile { line, .. }) => {
                assert!(line >= 1 && line <= text.lines().count().max(1));
                return;
            }
            Err(_) => {
                assert!(
                    std::str::from_utf8(data).is_err(),
                    "valid text refused without a line"
                );
                return;
            }
        };
        let fps = store.fingerprints();
        for fp in &fps {
            assert_eq!(&fp.as_str().parse::<Fingerprint>().expect("canonical"), fp);
        }
        let other = dir.join("other");
        fs::create_dir_all(&other).expect("scratch subdirectory");
        let listed: String = fps.iter().map(|f| format!("{f}\n")).collect();
        fs::write(other.join(TRUST_FILE), listed).expect("write");
        let back = TrustStore::load(&other).expect("a written-out store loads");
        assert_eq!(back.fingerprints(), fps);

        let new = Fingerprint::of_der(data);
        let added = store
            .add_with_comment(new.as_str(), &text)
            .expect("adding a peer to an accepted store");
        assert_eq!(added, !fps.contains(&new));
        let after = TrustStore::load(dir).expect("the store loads after an add");
        let mut want = fps.clone();
        if !want.contains(&new) {
            want.push(new);
            want.sort();
        }
        assert_eq!(after.fingerprints(), want, "an add lost or invented peers");
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_have_unique_names() {
        let mut names: Vec<_> = super::TARGETS.iter().map(|t| t.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::TARGETS.len());
    }
}
