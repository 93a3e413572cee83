//! The wire protocol between `migrate` (the source agent) and `dest-agent`
//! (the destination agent): messages, framing, versioning, limits, and the
//! destination's state machine. This comment is the specification; the code
//! below implements it and nothing else.
//!
//! The module is transport-agnostic: it works on byte slices and on
//! `std::io::{Read, Write}`. The agents carry the frames over QUIC: **one
//! bidirectional control stream** (opened by the source) carries
//! [`ControlMsg`]s in both directions, and **any number of unidirectional page
//! streams** (opened by the source) carry [`PageFrame`]s and, in a lazy
//! migration after `Running`, [`LazyFrame`]s (a receiver that does not know
//! which a stream carries reads [`StreamFrame`]s). An async transport
//! reads the fixed [`HEADER_LEN`]-byte header, checks it with
//! [`FrameHeader::parse`] (which bounds the length before anything is
//! allocated), reads the payload and finishes with [`Frame::from_parts`].
//!
//! # A migration
//!
//! ```text
//!  source (migrate)                                         destination (dest-agent)
//!  ────────────────                                         ────────────────────────
//!        │  QUIC + mutual TLS (pinned fingerprints; outside this module)  │
//!        │── Hello {version, host: HostInfo, agent} ───────────────────────▶│ major must match
//!        │◀───────────────────────── HelloAck {version, host: HostInfo} ──│   (else close)
//!        │── Prepare {pid, tids, exe, files: [path,size,mtime,hash]} ─────▶│ compatibility check:
//!        │◀────────────────────────────────────────── Ready ──────────────│ arch, xstate, files,
//!        │   or ◀─────────────────────── Refuse {code, reason}; close ────│ PID/TIDs free
//!        │                                                               │
//!        │ ╔═ pre-copy pass n = 0, 1, 2, … (process keeps running) ═════╗ │
//!        │── PassStart {pass: n, layout: TreeLayout} ──────────────────▶│ apply layout n
//!        │══ page streams: PageFrame {pass: n, space, batch} × k ═════════▶│ write pages
//!        │── PassEnd {pass: n, batches: k, pages, bytes} ──────────────▶│ tally
//!        │ ╚═════════════════════════════════════════════════════════════╝ │
//!        │ freeze; the last pass (PassStart … PassEnd) sends the final delta│
//!        │ (service address moving: blocked before the freeze, off A now)  │
//!        │── NetMove {addrs: [addr/prefix]} (minor ≥ 2, if any) ──────────▶│ kept for Switchover
//!        │── Switchover {image: TreeImage} ────────────────────────────────▶│ wait for all batches,
//!        │                                                               │ (block, add addresses)
//!        │                                                               │ restore, resume
//!        │◀──────────────────────────── Running {pid, restore_us} ────────│
//!        │   or ◀────────────────────────────── Failed {reason}; close ───│ (source resumes)
//!        │── Done ─────────────────────────────────────────────────────▶│ close
//!        │ kill the source copy                                          │
//! ```
//!
//! A lazy migration (negotiated minor ≥ [`LAZY_MINOR`]) leaves some pages
//! behind and fetches them after the process runs on the destination:
//!
//! ```text
//!  source (migrate)                                         destination (dest-agent)
//!  ────────────────                                         ────────────────────────
//!        │   … passes as above; after the last pass's PassEnd:            │
//!        │── LazyPlan {owed: [PageSpan]} ────────────────────────────────▶│ check owed spans
//!        │── Switchover {image: TreeImage} ──────────────────────────────▶│ restore without the
//!        │                                                                │ owed pages, resume
//!        │◀────────────────────────────────── Running {pid, restore_us} ──│ (Phase::Lazy)
//!        │ serve pages; never resume                                      │ a thread faults on an
//!        │◀────────────────────────────────── PageRequest {addr, pages} ──│ owed page: ask for it
//!        │══ request stream: LazyPages {Requested, batch} ═══════════════▶│ place, wake the thread
//!        │══ push streams: LazyPages {Pushed, batch} × m ════════════════▶│ place in the background
//!        │                                                                │ every owed page is in
//!        │◀──────────────────────────── LazyComplete {stats: LazyStats} ──│
//!        │── Done ───────────────────────────────────────────────────────▶│ close
//!        │ kill the source copy                                           │
//! ```
//!
//! Either side may send `Abort {reason}` at any time before `Running` (and, in
//! a lazy migration, before `LazyComplete`) and then close the connection;
//! before `Running` the source then resumes its process untouched.
//!
//! * **Hello / HelloAck**: protocol versions and the hosts' [`HostInfo`]
//!   (architecture, kernel, XSAVE size and features). Both sides can decide
//!   compatibility of the CPUs from these alone.
//! * **Prepare** carries the rest of the compatibility facts: the PID and
//!   TIDs that must be free on the destination (`tids[0] == pid`), and for
//!   the executable and every mapped file its path, size, mtime and content
//!   hash ([`FileFacts`]). Identity is *size + hash*; the mtime is
//!   informational (it lets a side cache its hashes). Nothing is frozen yet.
//! * **Ready** means: everything checked, the PID is reserved, send pages.
//!   **Refuse** carries a [`RefuseCode`] and a human-readable reason; the
//!   destination closes the connection after it.
//! * **Passes**. Pass 0 sends every populated page, each later pass the pages
//!   written since the previous one; the last pass is sent after the freeze.
//!   Passes are numbered 0, 1, 2, … without gaps. `PassStart` declares the
//!   layout of the pass ([`TreeLayout`]): the processes of the tree with
//!   their identities (PID, parent, group, session) and address-space
//!   layouts (sorted, non-overlapping VMAs), its zombies and its shared
//!   memory objects. The members may change from one pass to the next (a
//!   process forks or exits while the tree runs): the destination forks a
//!   new process from its parent and maps it afresh (the pass then sends all
//!   of its pages), removes one that is gone, makes new zombies and shared
//!   memory objects and reaps zombies that are gone; a process keeps its
//!   parent, group and session, and the root stays. Every
//!   page frame names its page space: a process of the layout, or a shared
//!   memory object (pages keyed by offset into it); every page run must lie
//!   inside one non-special, non-shared VMA of that process's layout, or
//!   inside the object ([`space_areas`], [`check_runs_within`]). Shared
//!   memory is written once, not once per process that maps it. `PassEnd` declares how many batches, pages and
//!   bytes (encoded batch bytes) the pass sent, so the destination knows when
//!   it has all of them (page streams and the control stream are not ordered
//!   relative to each other).
//! * **Switchover** carries the final [`TreeImage`] (threads' registers,
//!   fds, signals, …); its VMAs equal the last pass's layout. It follows the
//!   `PassEnd` of the last pass, and at least one pass precedes it.
//! * **Running** means: the process runs on the destination, `restore_us`
//!   after the `Switchover` arrived. **Failed** means the restore failed and
//!   the destination removed what it built. **Done** tells the destination
//!   that the source has seen `Running` (in a lazy migration:
//!   `LazyComplete`) and kills its copy.
//! * **NetMove** (minor ≥ [`NET_MINOR`]; at most once, after a `PassEnd`
//!   and before `Switchover`) lists the service addresses ([`MovedAddr`])
//!   the source took off after the freeze: the destination blocks TCP to
//!   them, puts them on, restores, announces them and unblocks once the
//!   process runs (`ferry_engine::net`).
//! * **LazyPlan** (minor ≥ [`LAZY_MINOR`]; at most once, after the last
//!   pass's `PassEnd` and before `Switchover`; no `PassStart` may follow it)
//!   makes the migration lazy: `owed` lists the pages whose content the
//!   source still owes ([`PageSpan`]s: page aligned, not empty, sorted, not
//!   overlapping; touching is allowed). Each span lies inside one anonymous
//!   VMA of the last pass's layout ([`check_spans_in_anonymous`]; only
//!   private anonymous memory is restored lazily). The destination restores
//!   the process with the owed pages missing, whatever earlier passes sent
//!   for them, and fetches them on demand (userfaultfd). An empty plan is
//!   legal: the destination sends `LazyComplete` right after `Running`.
//! * **PageRequest** (destination → source, only between `Running` and
//!   `LazyComplete`): a thread faulted on an owed page; `pages` pages
//!   (1..=[`MAX_REQUEST_PAGES`]) from `addr`, inside one owed span
//!   ([`find_owed_span`]; the source refuses others), are sent before the
//!   rest. A request may name pages already sent (a fault races the push):
//!   the source sends them again.
//! * **LazyPages** frames carry owed pages on page streams the source opens
//!   after it received `Running`: answers to requests with origin
//!   [`LazyOrigin::Requested`] on one stream of high priority, the
//!   background push of everything else with origin [`LazyOrigin::Pushed`]
//!   on the others. Every run lies inside one owed span
//!   ([`check_runs_owed`]). The source's copy is frozen, so a page sent twice
//!   has the same content both times; the destination keeps the first and
//!   ignores the others, also after `LazyComplete`.
//! * **LazyComplete** (destination → source) means every owed page arrived;
//!   it carries the destination's [`LazyStats`]. The source then kills its
//!   copy and sends `Done`.
//! * **LazyResume / LazyResumed** (minor ≥ [`LAZY_MINOR`]) carry the lazy
//!   phase over to a new connection when its connection is lost (see
//!   *Resuming the lazy phase* below).
//!
//! # Resuming the lazy phase
//!
//! A link that stays down longer than the transport's idle timeout kills
//! the connection of the lazy phase on both sides, but neither side has to
//! give up: the process runs on the destination and the frozen copy waits
//! on the source. The source connects again (every second or so, for as
//! long as it is willing to wait) and, instead of `Prepare`, asks to resume:
//!
//! ```text
//!  source (migrate)                                         destination (dest-agent)
//!  ────────────────                                         ────────────────────────
//!        │  the connection of the lazy phase is lost (not Abort)          │ park the lazy phase:
//!        │  keep the frozen copy; connect again                          │ faults keep waiting
//!        │── Hello {version, host, agent} ────────────────────────────────▶│
//!        │◀──────────────────────────────────────── HelloAck {…} ─────────│
//!        │── LazyResume {pid} ────────────────────────────────────────────▶│ same source fingerprint,
//!        │◀──────────────────────────────────────── LazyResumed {owed} ───│ lazy phase of pid going on
//!        │   or ◀──────────────────────────── Refuse {code, reason}; close│ (else)
//!        │ owed = exactly what is still to send                          │ ask again for every
//!        │◀─────────────────────────────────── PageRequest {addr, pages} ─│ request not answered
//!        │══ new page streams: LazyPages … ═══════════════════════════════▶│
//!        │   … LazyComplete, Done as above                                │
//! ```
//!
//! * The destination accepts `LazyResume {pid}` only if the lazy phase of
//!   `pid` is still going on there (not completed, not given up) and the
//!   new connection's peer presents the same TLS fingerprint as the one
//!   that started the migration; otherwise it answers `Refuse` and the
//!   source has lost the process. A resume may arrive before the
//!   destination noticed the loss of the old connection (the two sides'
//!   idle timers do not expire at the same moment): the destination then
//!   drops the old connection and takes the new one.
//! * `LazyResumed {owed}` lists, by source address, every page the
//!   destination (the restored process and the children it forked) still
//!   lacks: page aligned, not empty, sorted, not overlapping, each page
//!   inside a span of the `LazyPlan` (checked by the source). Pages pushed
//!   on the lost connection may never have arrived: the source sends every
//!   page of `owed` again and no other one. The destination then sends a
//!   `PageRequest` again for every request still unanswered (they were
//!   sent on the lost connection), and the lazy phase goes on as before;
//!   if every page arrived while the link was down, `LazyComplete` follows
//!   `LazyResumed` at once.
//! * The destination's bounded wait covers the outage: a thread waiting
//!   for a page longer than the destination allows stops the process,
//!   connection or not, and the destination waits for a resume no longer
//!   than that bound either.
//!
//! The commit point is the source receiving `Running`: before it, any failure
//! (including a lost connection) makes the source resume its process and the
//! destination tear down what it built; after it, the source kills its copy.
//! A destination that sent `Running` keeps its process even if `Done` never
//! arrives. (If the connection breaks exactly while `Running` is in flight,
//! both copies run: the window is one network delay; the agents log it.)
//!
//! A lazy migration commits at the same point, but after `Running` the
//! process runs on the destination while part of its memory exists only on
//! the source. The source never resumes its copy after `Running` (the
//! process has already run elsewhere); it keeps it frozen only to serve the
//! owed pages and kills it after `LazyComplete`. If the source or the link is
//! lost (or an `Abort` arrives) before every owed page is in, a faulting
//! thread cannot continue: once the destination's bounded wait runs out, the
//! destination must stop the process, and the migration has lost it.
//! Pre-copy alone never has this risk: `Running` is sent only when every
//! page is in.
//!
//! # The destination's state machine ([`DestState`])
//!
//! ```text
//!   AwaitHello ──recv Hello──▶ Greeted ──send HelloAck──▶ AwaitPrepare
//!   Greeted ──send Refuse──▶ Closed
//!   AwaitPrepare ──recv Prepare──▶ Checking ──send Ready──▶ PreCopy
//!                                  Checking ──send Refuse──▶ Closed
//!   PreCopy ──recv PassStart{n = next}──▶ InPass(n) ──recv PassEnd{n}──▶ PreCopy
//!   PreCopy (≥ 1 pass ended, minor ≥ 1) ──recv LazyPlan──▶ PreCopy, lazy
//!   PreCopy (≥ 1 pass ended) ──recv Switchover──▶ Restoring
//!   Restoring ──send Running (all batches in)──▶ Running ──recv Done──▶ Closed
//!   Restoring ──send Running (all batches in, lazy)──▶ Lazy
//!   Lazy ──send PageRequest──▶ Lazy ──send LazyComplete──▶ Running
//!   AwaitPrepare (minor ≥ 1) ──recv LazyResume──▶ Resuming ──send LazyResumed──▶ Lazy
//!   Resuming ──send Refuse──▶ Closed
//!   Restoring ──send Failed──▶ Closed
//!   any state before Running, and Lazy ──send or recv Abort──▶ Closed
//! ```
//!
//! A lazy `PreCopy` (after `LazyPlan`, [`DestState::is_lazy`]) accepts no
//! `PassStart`, and no second `LazyPlan`.
//!
//! Anything else is [`WireError::UnexpectedMessage`] and closes the
//! connection. Page frames ([`DestState::page_batch`]) are legal in
//! `PreCopy`, `InPass` and `Restoring`, for passes already started; a frame of
//! the *next* pass may overtake its `PassStart` (different streams) and
//! must wait for it ([`PageAdmit::Wait`]). A pass is complete when its
//! `PassEnd` arrived and the received batches, pages and bytes equal the
//! declared ones; more than declared, or a mismatch at the declared batch
//! count, is an error. The destination applies the layout of pass `n` only
//! when pass `n − 1` is complete ([`DestState::pass_complete`]), and sends
//! `Running` only when all passes are complete. Lazy page frames
//! ([`DestState::lazy_frame`]) are legal in `Lazy`, and in `Running` of a
//! lazy migration (late duplicates, ignored).
//!
//! # Framing
//!
//! Every message is one frame: a fixed 16-byte header, then the payload. All
//! integers little-endian.
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! |      0 |    2 | magic `0xFE77` ([`WIRE_MAGIC`])                         |
//! |      2 |    1 | major protocol version ([`WIRE_MAJOR`])                 |
//! |      3 |    1 | kind ([`MsgKind`]; 0 is reserved and always invalid)    |
//! |      4 |    4 | payload length                                         |
//! |      8 |    8 | xxh3-64 (seed 0) of the payload                        |
//! |     16 |    n | payload                                                |
//!
//! A control payload is the postcard encoding of the message's fields in
//! declaration order (exactly as a struct with those fields); the kind byte
//! is the only discriminant, and unit messages (`Ready`, `Done`) have an
//! empty payload. A page payload (`Pages`) is the pass number (u32) and the
//! page space (u32: a process's PID, or a shared memory object's id with bit
//! 31 set; [`encode_space`]) followed by one batch in the page batch codec of [`crate::pages`] (runs, zero-page
//! markers, zstd, its own checksum). A lazy page payload (`LazyPages`) is the
//! origin ([`LazyOrigin`] as a u32: 0 pushed, 1 requested) followed by one
//! batch in the same codec.
//!
//! A receiver checks, in this order, and each failure is its own
//! [`WireError`]: magic, version, kind, the length against the limit of the
//! stream and of the kind (*before* reading or allocating the payload), the
//! complete payload, the checksum, the decoding with no byte left over, and
//! the message's semantic rules ([`ControlMsg::validate`], which includes
//! [`TreeImage::validate`] for the image; for pages the batch codec's own
//! checks under [`PAGE_BATCH_LIMITS`] and [`check_runs_within`], for lazy
//! pages the same codec checks and [`check_runs_owed`]). A sender
//! runs the same checks before sending: what would be refused is not sent.
//! A stream that ends cleanly between frames is [`WireError::EndOfStream`];
//! one that ends inside a frame is [`WireError::Truncated`].
//!
//! # Versioning
//!
//! * The header layout above never changes, in any version.
//! * The header's version byte is the major version. A frame whose major
//!   version differs from this build's is refused
//!   ([`WireError::UnsupportedVersion`]) and the connection closed: majors
//!   must match. `Hello` and `HelloAck` also carry the minor version; both
//!   sides then use the lower of the two minors.
//! * A minor version may only add message kinds, or variants of enums inside
//!   messages (such as [`RefuseCode`] or [`ContentHash`]); a side sends them
//!   only when the negotiated minor has them. Changing the body of an existing
//!   message, or its meaning, requires a new major version.
//! * An unknown kind byte is [`WireError::UnknownKind`] and closes the
//!   connection with an error: there is no "skip what you don't know".
//!
//! Major versions: **1** carried one process in `Switchover`; **2** carries
//! a process tree ([`TreeImage`]: processes over open files, pipes and
//! shared memory objects by id).
//!
//! Minor versions:
//!
//! * **0**: kinds 1–12 and 32 (pre-copy).
//! * **1** ([`LAZY_MINOR`]): lazy pages, kinds 13 `LazyPlan`, 14
//!   `PageRequest`, 15 `LazyComplete`, 16 `LazyResume`, 17 `LazyResumed`
//!   and 33 `LazyPages`. A source that
//!   negotiated minor 0 migrates by pre-copy only.
//! * **2** ([`NET_MINOR`]): kind 18 `NetMove`, the service addresses that
//!   move with the process (sent between the last `PassEnd` and
//!   `Switchover`; at most once). A source whose process has an address to
//!   move refuses, before freezing, a destination of a lower minor.
//!
//! # Limits
//!
//! | what                                      | limit                                   |
//! |-------------------------------------------|-----------------------------------------|
//! | control frame payload                     | [`MAX_CONTROL_FRAME`] (64 MiB)          |
//! | `PageRequest` / `LazyComplete` payload    | 32 / 64 bytes                           |
//! | `LazyResume` payload                      | 16 bytes                                |
//! | page frame payload (`Pages`, `LazyPages`) | [`MAX_PAGE_FRAME`]                      |
//! | raw data / runs in one page batch         | [`PAGE_BATCH_LIMITS`]                   |
//! | reasons (`Refuse`, `Failed`, `Abort`)     | [`MAX_REASON_LEN`] bytes                |
//! | `agent` and host strings in `Hello`       | [`MAX_NAME_LEN`] bytes                  |
//! | paths                                     | [`MAX_PATH_LEN`] bytes                  |
//! | TIDs in `Prepare`                         | [`MAX_TIDS`]                            |
//! | files in `Prepare`                        | [`MAX_FILES`]                           |
//! | VMAs in `PassStart`                       | [`MAX_VMAS`](crate::validate::MAX_VMAS) |
//! | passes                                    | [`MAX_PASSES`]                          |
//! | owed spans in `LazyPlan`, `LazyResumed`   | [`MAX_LAZY_SPANS`]                      |
//! | pages in one `PageRequest`                | [`MAX_REQUEST_PAGES`]                   |
//!
//! The image in `Switchover` and the spans of `LazyPlan` are bounded by their
//! own rules and by the frame limit. Strings never contain NUL bytes.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

use crate::model::{HostInfo, TreeImage, TreeLayout, Vma, VmaKind, PAGE_SIZE};
use crate::pages::PageSpace;
use crate::pages::{BatchDecoder, BatchError, BatchLimits, PageBatch, BATCH_HEADER_LEN, RUN_LEN};
/// Checks a declared memory layout (re-exported: the same rules as [`TreeImage::validate`]).
pub use crate::validate::validate_vmas;
use crate::validate::{
    is_page_aligned, ValidationError, MAX_PATH_LEN, MAX_XSTATE_SIZE, PID_MAX_LIMIT,
};

mod state;
pub use state::{DestState, PageAdmit, Phase};

/// Magic at the start of every frame.
pub const WIRE_MAGIC: u16 = 0xFE77;
/// Major protocol version: must be equal on both sides.
pub const WIRE_MAJOR: u8 = 3;
/// Minor protocol version of this build; the lower of both sides' is used.
pub const WIRE_MINOR: u16 = 2;
/// The minor version that introduced the lazy pages (post-copy) messages
/// (`LazyPlan`, `PageRequest`, `LazyComplete`, `LazyPages`): a side sends
/// them only when the negotiated minor is at least this.
pub const LAZY_MINOR: u16 = 1;
/// The minor version that introduced `NetMove` (the service address moves
/// with the process).
pub const NET_MINOR: u16 = 2;
/// Most addresses in one `NetMove`.
pub const MAX_MOVED_ADDRS: usize = 16;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload of a control frame (the final image can be large).
pub const MAX_CONTROL_FRAME: u32 = 64 << 20;
/// Limits under which page batches from the network are decoded.
pub const PAGE_BATCH_LIMITS: BatchLimits = BatchLimits {
    max_raw: 16 << 20,
    max_runs: 1 << 16,
};
/// Size of the prefix in front of the batch in a `Pages` frame's payload:
/// the pass number and the page space ([`encode_space`]).
pub const PAGE_PREFIX_LEN: usize = 8;
/// Size of the prefix in front of the batch in a `LazyPages` frame's
/// payload: the [`LazyOrigin`].
pub const LAZY_PREFIX_LEN: usize = 4;
/// High bit of an encoded page space: a shared memory object (else a PID).
const SPACE_SHMEM_BIT: u32 = 1 << 31;

/// A page space as the u32 of a page frame: a process's PID, or a shared
/// memory object's id with the high bit set.
pub fn encode_space(space: PageSpace) -> u32 {
    match space {
        PageSpace::Task(pid) => pid as u32,
        PageSpace::Shmem(id) => id | SPACE_SHMEM_BIT,
    }
}

/// The page space of a page frame's u32 (see [`encode_space`]).
pub fn decode_space(v: u32) -> Result<PageSpace, WireError> {
    if v & SPACE_SHMEM_BIT != 0 {
        return Ok(PageSpace::Shmem(v & !SPACE_SHMEM_BIT));
    }
    let pid = v as i32;
    if !(1..=PID_MAX_LIMIT).contains(&pid) {
        return Err(invalid(format!("page frame for PID {pid}, out of range")));
    }
    Ok(PageSpace::Task(pid))
}
/// Largest payload of a page frame (`Pages` or `LazyPages`): prefix, batch
/// header, a full run table and the zstd bound of [`PAGE_BATCH_LIMITS`]'s raw
/// size.
pub const MAX_PAGE_FRAME: u32 = (PAGE_PREFIX_LEN
    + BATCH_HEADER_LEN
    + PAGE_BATCH_LIMITS.max_runs as usize * RUN_LEN
    + zstd_compress_bound(PAGE_BATCH_LIMITS.max_raw)) as u32;
/// Longest reason string in `Refuse`, `Failed` and `Abort`.
pub const MAX_REASON_LEN: usize = 4096;
/// Longest agent name or host string in `Hello`/`HelloAck`.
pub const MAX_NAME_LEN: usize = 256;
/// Most TIDs in a `Prepare`.
pub const MAX_TIDS: usize = 1 << 16;
/// Most files in a `Prepare`.
pub const MAX_FILES: usize = 1 << 16;
/// Most pre-copy passes in one migration (the last one included).
pub const MAX_PASSES: u32 = 1 << 12;
/// Most spans in a `LazyPlan`.
pub const MAX_LAZY_SPANS: usize = 1 << 22;
/// Most pages in one `PageRequest`.
pub const MAX_REQUEST_PAGES: u32 = 512;
/// Largest payload of a `PageRequest` (two varints: at most 15 bytes).
const MAX_PAGE_REQUEST_FRAME: u32 = 32;
/// Largest payload of a `LazyComplete` (five varints: at most 50 bytes).
const MAX_LAZY_COMPLETE_FRAME: u32 = 64;
/// Largest payload of a `LazyResume` (one varint: at most 5 bytes).
const MAX_LAZY_RESUME_FRAME: u32 = 16;

/// `ZSTD_COMPRESSBOUND`, usable in constants.
const fn zstd_compress_bound(src: usize) -> usize {
    let small = if src < (128 << 10) {
        ((128 << 10) - src) >> 11
    } else {
        0
    };
    src + (src >> 8) + small
}

/// The kind byte of a frame. 0 is reserved: a zeroed header means nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    /// Source → destination, first message: versions and host facts.
    Hello = 1,
    /// Destination → source, answer to `Hello`.
    HelloAck = 2,
    /// Source → destination: compatibility facts of the process.
    Prepare = 3,
    /// Destination → source: compatible, PID reserved, send pages.
    Ready = 4,
    /// Destination → source: incompatible, with the reason.
    Refuse = 5,
    /// Source → destination: a pass begins, with its layout.
    PassStart = 6,
    /// Source → destination: a pass's totals.
    PassEnd = 7,
    /// Source → destination: the final process image.
    Switchover = 8,
    /// Destination → source: the process runs.
    Running = 9,
    /// Destination → source: the restore failed.
    Failed = 10,
    /// Source → destination: the source copy is being killed.
    Done = 11,
    /// Either side: the migration is abandoned.
    Abort = 12,
    /// Source → destination (minor ≥ [`LAZY_MINOR`]): the pages the source
    /// still owes; the destination restores without them.
    LazyPlan = 13,
    /// Destination → source (minor ≥ [`LAZY_MINOR`]): a thread faulted on
    /// owed pages; send these first.
    PageRequest = 14,
    /// Destination → source (minor ≥ [`LAZY_MINOR`]): every owed page
    /// arrived.
    LazyComplete = 15,
    /// Source → destination (minor ≥ [`LAZY_MINOR`]), instead of `Prepare`
    /// on a new connection: continue the lazy phase of this process.
    LazyResume = 16,
    /// Destination → source (minor ≥ [`LAZY_MINOR`]), the answer to
    /// `LazyResume`: the pages still missing; the lazy phase goes on.
    LazyResumed = 17,
    /// Source → destination (minor ≥ [`NET_MINOR`]), between the last
    /// `PassEnd` and `Switchover`: the addresses that leave the source
    /// with the process.
    NetMove = 18,
    /// Source → destination on a page stream: one page batch.
    Pages = 32,
    /// Source → destination on a page stream opened after `Running`
    /// (minor ≥ [`LAZY_MINOR`]): one batch of owed pages.
    LazyPages = 33,
}

impl MsgKind {
    /// Every kind, in kind-byte order.
    pub const ALL: [MsgKind; 20] = [
        MsgKind::Hello,
        MsgKind::HelloAck,
        MsgKind::Prepare,
        MsgKind::Ready,
        MsgKind::Refuse,
        MsgKind::PassStart,
        MsgKind::PassEnd,
        MsgKind::Switchover,
        MsgKind::Running,
        MsgKind::Failed,
        MsgKind::Done,
        MsgKind::Abort,
        MsgKind::LazyPlan,
        MsgKind::PageRequest,
        MsgKind::LazyComplete,
        MsgKind::LazyResume,
        MsgKind::LazyResumed,
        MsgKind::NetMove,
        MsgKind::Pages,
        MsgKind::LazyPages,
    ];

    /// The kind for a byte, or `None` for 0 and unknown bytes.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u8 == b)
    }

    /// Largest payload this kind may have.
    pub fn max_payload(self) -> u32 {
        match self {
            MsgKind::Ready | MsgKind::Done => 0,
            MsgKind::PageRequest => MAX_PAGE_REQUEST_FRAME,
            MsgKind::LazyComplete => MAX_LAZY_COMPLETE_FRAME,
            MsgKind::LazyResume => MAX_LAZY_RESUME_FRAME,
            MsgKind::Pages | MsgKind::LazyPages => MAX_PAGE_FRAME,
            _ => MAX_CONTROL_FRAME,
        }
    }

    /// True for the kinds carried by the control stream (all but the page
    /// frames, `Pages` and `LazyPages`).
    pub fn is_control(self) -> bool {
        !matches!(self, MsgKind::Pages | MsgKind::LazyPages)
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a frame or message was refused.
#[derive(Debug, Error)]
pub enum WireError {
    /// The underlying stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The stream ended cleanly between two frames.
    #[error("the stream ended")]
    EndOfStream,
    /// The stream or buffer ended inside a frame.
    #[error("truncated frame: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes available.
        found: u64,
        /// Bytes the frame needs.
        expected: u64,
    },
    /// The frame does not start with [`WIRE_MAGIC`].
    #[error("bad frame magic {0:#06x} (expected {WIRE_MAGIC:#06x}): not a ferry peer")]
    BadMagic(u16),
    /// A different major protocol version.
    #[error("protocol version {found} is not supported (this ferry speaks {supported}): upgrade the older side")]
    UnsupportedVersion {
        /// The peer's major version.
        found: u8,
        /// This build's major version.
        supported: u8,
    },
    /// A kind byte this build does not know (or the reserved 0).
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The declared payload length is above the limit.
    #[error("{kind} frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The frame's kind.
        kind: MsgKind,
        /// The declared (or attempted) payload length.
        len: u64,
        /// The limit that applies.
        max: u64,
    },
    /// The payload does not match the header's checksum.
    #[error("{kind} frame checksum mismatch (header {expected:#018x}, payload {found:#018x})")]
    Checksum {
        /// The frame's kind.
        kind: MsgKind,
        /// Checksum in the header.
        expected: u64,
        /// Checksum of the payload received.
        found: u64,
    },
    /// The payload does not decode as the message the kind announces.
    #[error("{kind} payload does not decode: {source}")]
    Decode {
        /// The frame's kind.
        kind: MsgKind,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// The payload decodes but has bytes left over.
    #[error("{kind} payload has {extra} undecoded bytes")]
    TrailingBytes {
        /// The frame's kind.
        kind: MsgKind,
        /// Bytes left over.
        extra: usize,
    },
    /// A message could not be encoded.
    #[error("cannot encode {kind}: {source}")]
    Encode {
        /// The message's kind.
        kind: MsgKind,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// The message decodes but breaks a rule of the protocol.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The image in `Switchover` breaks an invariant of the image model.
    #[error("invalid image in Switchover: {0}")]
    InvalidImage(#[source] ValidationError),
    /// The batch in a page frame was refused by the batch codec.
    #[error("invalid page batch: {0}")]
    Batch(#[source] BatchError),
    /// A page frame on the control stream, or a control frame on a page
    /// stream.
    #[error("{kind} frame on the wrong kind of stream")]
    WrongStream {
        /// The frame's kind.
        kind: MsgKind,
    },
    /// A message that is not legal in the receiver's current state.
    #[error("unexpected {got} in state {state}")]
    UnexpectedMessage {
        /// The receiver's state.
        state: Phase,
        /// The message that came.
        got: MsgKind,
    },
}

fn invalid(s: impl Into<String>) -> WireError {
    WireError::Invalid(s.into())
}

/// The protocol version a side speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Must be equal on both sides ([`WIRE_MAJOR`]).
    pub major: u8,
    /// Features added compatibly; the lower of both sides' is used.
    pub minor: u16,
}

impl ProtocolVersion {
    /// The version of this build.
    pub const CURRENT: ProtocolVersion = ProtocolVersion {
        major: WIRE_MAJOR,
        minor: WIRE_MINOR,
    };

    /// The version two sides use: `None` if the majors differ, else the
    /// common major with the lower minor.
    pub fn negotiate(self, peer: ProtocolVersion) -> Option<ProtocolVersion> {
        (self.major == peer.major).then(|| ProtocolVersion {
            major: self.major,
            minor: self.minor.min(peer.minor),
        })
    }
}

/// A content hash of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContentHash {
    /// xxh3-128 (seed 0) of the whole file: fast, for trusted peers.
    Xxh3_128(u128),
    /// SHA-256 of the whole file.
    Sha256([u8; 32]),
}

/// What identifies a file that must be identical on both hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFacts {
    /// Absolute path (the same path is used on the destination).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in ns since the epoch (informational).
    pub mtime_ns: i128,
    /// Hash of the contents.
    pub hash: ContentHash,
}

/// Why the destination refuses a migration (details in the reason text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// Different CPU architecture.
    Arch,
    /// A kernel the destination cannot restore for.
    Kernel,
    /// XSAVE features or size the destination's CPU lacks.
    CpuFeatures,
    /// The executable or a mapped file does not exist on the destination.
    FileMissing,
    /// The executable or a mapped file differs (size or hash).
    FileDiffers,
    /// The PID or a TID is in use on the destination.
    PidTaken,
    /// Not enough memory or another resource on the destination.
    Resources,
    /// The destination is busy with another migration.
    Busy,
    /// Anything else.
    Other,
}

/// `pages` pages from `addr`: a span of memory whose content the source
/// still owes in a lazy migration (`LazyPlan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageSpan {
    /// First byte (page aligned).
    pub addr: u64,
    /// Number of pages (at least 1).
    pub pages: u64,
}

impl PageSpan {
    /// One past the last byte, or `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| self.addr.checked_add(len))
    }

    /// True if `[addr, addr+len)` lies inside this span.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|e| self.end().is_some_and(|end| e <= end))
    }
}

/// The destination's account of the lazy phase of a migration, sent in
/// `LazyComplete`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyStats {
    /// Page faults of the restored process that needed pages from the source.
    pub faults: u64,
    /// Pages fetched on request (`PageRequest`, origin
    /// [`LazyOrigin::Requested`]).
    pub pages_requested: u64,
    /// Pages that arrived by the background push (origin
    /// [`LazyOrigin::Pushed`]).
    pub pages_pushed: u64,
    /// The longest a faulting thread waited for its page, in microseconds.
    pub max_fault_wait_us: u64,
    /// Microseconds from sending `Running` to the arrival of the last owed
    /// page.
    pub last_page_us: u64,
}

/// Why the source sent a `LazyPages` frame (the `u32` in front of its batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum LazyOrigin {
    /// Sent by the background push, in address order.
    Pushed = 0,
    /// Sent in answer to a `PageRequest` (a thread waits for it).
    Requested = 1,
}

impl LazyOrigin {
    /// The origin for a prefix value, or `None` for unknown values.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(LazyOrigin::Pushed),
            1 => Some(LazyOrigin::Requested),
            _ => None,
        }
    }
}

/// A control-stream message. Each variant is one [`MsgKind`]; its payload is
/// the postcard encoding of its fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Source → destination, first message on the control stream.
    Hello {
        /// The source's protocol version.
        version: ProtocolVersion,
        /// The source host.
        host: HostInfo,
        /// Software name and version, for logs (`"ferry 0.1.0"`).
        agent: String,
    },
    /// Destination → source, the answer to `Hello`.
    HelloAck {
        /// The destination's protocol version.
        version: ProtocolVersion,
        /// The destination host.
        host: HostInfo,
        /// Software name and version, for logs.
        agent: String,
    },
    /// Source → destination: the facts the destination checks before
    /// anything is frozen.
    Prepare {
        /// The root's PID, to be given back on the destination.
        pid: i32,
        /// Every PID and TID of the tree (zombies included), `tids[0] == pid`.
        tids: Vec<i32>,
        /// The root's executable.
        exe: FileFacts,
        /// Every other executable and file mapped into a process of the tree
        /// (each path once).
        files: Vec<FileFacts>,
    },
    /// Destination → source: compatible; the PID is reserved.
    Ready,
    /// Destination → source: incompatible; the connection closes.
    Refuse {
        /// Machine-readable category.
        code: RefuseCode,
        /// Precise reason for the user (which file, which PID, ...).
        reason: String,
    },
    /// Source → destination: pass `pass` begins; its pages lie in the
    /// areas of `layout`.
    PassStart {
        /// Pass number: 0, then one more each time.
        pass: u32,
        /// The tree's layout in this pass: its processes (each with its
        /// sorted, non-overlapping areas), zombies and shared memory
        /// objects.
        layout: Box<TreeLayout>,
    },
    /// Source → destination: pass `pass` sent these totals on the page
    /// streams.
    PassEnd {
        /// The pass that ended.
        pass: u32,
        /// Number of page frames.
        batches: u64,
        /// Pages covered, zero pages included.
        pages: u64,
        /// Sum of the encoded batch lengths (page frame payloads minus the
        /// pass number).
        bytes: u64,
    },
    /// Source → destination: the process is frozen and all passes are sent;
    /// here is the rest of its state.
    Switchover {
        /// The final image; its VMAs are the last pass's layout.
        image: Box<TreeImage>,
    },
    /// Destination → source: the process runs.
    Running {
        /// Its PID on the destination (the original one).
        pid: i32,
        /// Microseconds from receiving `Switchover` to resuming.
        restore_us: u64,
    },
    /// Destination → source: the restore failed and was cleaned up.
    Failed {
        /// What went wrong.
        reason: String,
    },
    /// Source → destination: `Running` was seen; the source copy is killed.
    Done,
    /// Either side: the migration is abandoned; the connection closes.
    Abort {
        /// Why.
        reason: String,
    },
    /// Source → destination, after the last pass's `PassEnd` and before
    /// `Switchover`: the migration is lazy; the destination restores the
    /// process without these pages and fetches them on demand.
    LazyPlan {
        /// The pages whose content the source still owes: sorted,
        /// non-overlapping, each inside one anonymous VMA of the last pass's
        /// layout ([`check_spans_in_anonymous`]).
        owed: Vec<PageSpan>,
    },
    /// Destination → source, in the lazy phase: a thread faulted; send these
    /// pages first.
    PageRequest {
        /// First page (page aligned).
        addr: u64,
        /// Number of pages, `1..=`[`MAX_REQUEST_PAGES`].
        pages: u32,
    },
    /// Destination → source, in the lazy phase: every owed page arrived; the
    /// source may kill its copy (and then sends `Done`).
    LazyComplete {
        /// How the lazy phase went.
        stats: LazyStats,
    },
    /// Source → destination, first message after `HelloAck` on a new
    /// connection (instead of `Prepare`): the connection of the lazy phase
    /// of process `pid` was lost; continue it here. Accepted only from the
    /// source (TLS fingerprint) that started that migration, and only while
    /// its lazy phase is still going on at the destination.
    LazyResume {
        /// The migrated process (its PID on both hosts).
        pid: i32,
    },
    /// Destination → source, the answer to `LazyResume`: the lazy phase
    /// continues on this connection (`PageRequest`, `LazyPages` on new page
    /// streams, `LazyComplete`, `Done`, exactly as before).
    LazyResumed {
        /// The pages the destination still lacks, by source address
        /// (sorted, not overlapping, each inside the owed spans of the
        /// `LazyPlan`). The source sends these again, whatever it sent on
        /// the lost connection, and none of the others.
        owed: Vec<PageSpan>,
    },
    /// Source → destination (minor ≥ [`NET_MINOR`]), after the last
    /// `PassEnd` and before `Switchover`: these addresses were taken off
    /// the source (the process's sockets use them); the destination puts
    /// them on before the sockets exist, blocked until the process runs.
    NetMove {
        /// At most [`MAX_MOVED_ADDRS`], each once; none unspecified,
        /// loopback, multicast or link-local, prefix within its family.
        addrs: Vec<MovedAddr>,
    },
}

/// A service address that moves with the process (`NetMove`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MovedAddr {
    /// The address (IPv4-mapped IPv6 addresses are sent as IPv4).
    pub addr: std::net::IpAddr,
    /// Its prefix length on the source's interface.
    pub prefix_len: u8,
}

fn check_moved(addrs: &[MovedAddr]) -> Result<(), WireError> {
    use std::net::IpAddr;
    if addrs.len() > MAX_MOVED_ADDRS {
        return Err(invalid(format!(
            "NetMove: {} addresses, at most {MAX_MOVED_ADDRS}",
            addrs.len()
        )));
    }
    let mut seen = HashSet::with_capacity(addrs.len());
    for m in addrs {
        let a = m.addr;
        let (max_plen, bad) = match a {
            IpAddr::V4(v4) => (
                32,
                v4.is_unspecified()
                    || v4.is_loopback()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.is_link_local(),
            ),
            IpAddr::V6(v6) => (
                128,
                v6.is_unspecified()
                    || v6.is_loopback()
                    || v6.is_multicast()
                    || v6.to_ipv4_mapped().is_some()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80,
            ),
        };
        if bad {
            return Err(invalid(format!(
                "NetMove: {a} cannot be a service address (unspecified, loopback, multicast, broadcast, link-local or IPv4-mapped)"
            )));
        }
        if m.prefix_len == 0 || m.prefix_len > max_plen {
            return Err(invalid(format!(
                "NetMove: prefix length {} of {a} is not in 1..={max_plen}",
                m.prefix_len
            )));
        }
        if !seen.insert(a) {
            return Err(invalid(format!("NetMove: {a} appears twice")));
        }
    }
    Ok(())
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(invalid(format!(
            "{field}: {} bytes, at most {max}",
            s.len()
        )));
    }
    if s.as_bytes().contains(&0) {
        return Err(invalid(format!("{field}: contains a NUL byte")));
    }
    Ok(())
}

fn check_host(field: &str, h: &HostInfo) -> Result<(), WireError> {
    check_text(&format!("{field}.arch"), &h.arch, MAX_NAME_LEN)?;
    check_text(&format!("{field}.kernel"), &h.kernel, MAX_NAME_LEN)?;
    if h.xstate_size > MAX_XSTATE_SIZE {
        return Err(invalid(format!(
            "{field}.xstate_size {} is above {MAX_XSTATE_SIZE}",
            h.xstate_size
        )));
    }
    Ok(())
}

fn check_file(field: &str, f: &FileFacts) -> Result<(), WireError> {
    check_text(field, &f.path, MAX_PATH_LEN)?;
    if !f.path.starts_with('/') {
        return Err(invalid(format!(
            "{field}: path {:?} is not absolute",
            f.path
        )));
    }
    Ok(())
}

fn check_spans(what: &str, owed: &[PageSpan]) -> Result<(), WireError> {
    if owed.len() > MAX_LAZY_SPANS {
        return Err(invalid(format!(
            "{what}: {} spans, at most {MAX_LAZY_SPANS}",
            owed.len()
        )));
    }
    let mut prev_end = None;
    for (i, s) in owed.iter().enumerate() {
        if !is_page_aligned(s.addr) {
            return Err(invalid(format!(
                "{what}: span #{i} at {:#x} is not page aligned",
                s.addr
            )));
        }
        if s.pages == 0 {
            return Err(invalid(format!(
                "{what}: span #{i} at {:#x} has no pages",
                s.addr
            )));
        }
        let Some(end) = s.end() else {
            return Err(invalid(format!(
                "{what}: span #{i} at {:#x} ({} pages) runs past the end of the address space",
                s.addr, s.pages
            )));
        };
        if let Some(p) = prev_end {
            if s.addr < p {
                return Err(invalid(format!(
                    "{what}: span #{i} at {:#x} starts before the end {p:#x} of span #{}: spans must be sorted and must not overlap",
                    s.addr,
                    i - 1
                )));
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

fn check_id(field: &str, id: i32) -> Result<(), WireError> {
    if !(1..=PID_MAX_LIMIT).contains(&id) {
        return Err(invalid(format!(
            "{field} {id} is out of range 1..={PID_MAX_LIMIT}"
        )));
    }
    Ok(())
}

impl ControlMsg {
    /// The kind byte of this message.
    pub fn kind(&self) -> MsgKind {
        match self {
            ControlMsg::Hello { .. } => MsgKind::Hello,
            ControlMsg::HelloAck { .. } => MsgKind::HelloAck,
            ControlMsg::Prepare { .. } => MsgKind::Prepare,
            ControlMsg::Ready => MsgKind::Ready,
            ControlMsg::Refuse { .. } => MsgKind::Refuse,
            ControlMsg::PassStart { .. } => MsgKind::PassStart,
            ControlMsg::PassEnd { .. } => MsgKind::PassEnd,
            ControlMsg::Switchover { .. } => MsgKind::Switchover,
            ControlMsg::Running { .. } => MsgKind::Running,
            ControlMsg::Failed { .. } => MsgKind::Failed,
            ControlMsg::Done => MsgKind::Done,
            ControlMsg::Abort { .. } => MsgKind::Abort,
            ControlMsg::LazyPlan { .. } => MsgKind::LazyPlan,
            ControlMsg::PageRequest { .. } => MsgKind::PageRequest,
            ControlMsg::LazyComplete { .. } => MsgKind::LazyComplete,
            ControlMsg::LazyResume { .. } => MsgKind::LazyResume,
            ControlMsg::LazyResumed { .. } => MsgKind::LazyResumed,
            ControlMsg::NetMove { .. } => MsgKind::NetMove,
        }
    }

    /// Checks the message's own rules (bounds, consistency), independent of
    /// the conversation's state (that is [`DestState`]'s job).
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            ControlMsg::Hello { host, agent, .. } | ControlMsg::HelloAck { host, agent, .. } => {
                check_host("host", host)?;
                check_text("agent", agent, MAX_NAME_LEN)
            }
            ControlMsg::Prepare {
                pid,
                tids,
                exe,
                files,
            } => {
                check_id("pid", *pid)?;
                if tids.len() > MAX_TIDS {
                    return Err(invalid(format!(
                        "Prepare: {} tids, at most {MAX_TIDS}",
                        tids.len()
                    )));
                }
                match tids.first() {
                    None => return Err(invalid("Prepare: no tids")),
                    Some(t) if t != pid => {
                        return Err(invalid(format!(
                            "Prepare: first tid {t} is not the pid {pid}"
                        )))
                    }
                    Some(_) => {}
                }
                let mut seen = HashSet::with_capacity(tids.len());
                for &t in tids {
                    check_id("Prepare: tid", t)?;
                    if !seen.insert(t) {
                        return Err(invalid(format!("Prepare: tid {t} appears twice")));
                    }
                }
                check_file("Prepare: exe", exe)?;
                if files.len() > MAX_FILES {
                    return Err(invalid(format!(
                        "Prepare: {} files, at most {MAX_FILES}",
                        files.len()
                    )));
                }
                let mut paths = HashSet::with_capacity(files.len());
                for (i, f) in files.iter().enumerate() {
                    check_file(&format!("Prepare: file #{i}"), f)?;
                    if !paths.insert(f.path.as_str()) {
                        return Err(invalid(format!("Prepare: file {:?} appears twice", f.path)));
                    }
                }
                Ok(())
            }
            ControlMsg::Ready | ControlMsg::Done => Ok(()),
            ControlMsg::Refuse { reason, .. } => {
                check_text("Refuse reason", reason, MAX_REASON_LEN)
            }
            ControlMsg::Failed { reason } => check_text("Failed reason", reason, MAX_REASON_LEN),
            ControlMsg::Abort { reason } => check_text("Abort reason", reason, MAX_REASON_LEN),
            ControlMsg::PassStart { pass, layout } => {
                if *pass >= MAX_PASSES {
                    return Err(invalid(format!(
                        "PassStart: pass {pass} is beyond the limit of {MAX_PASSES} passes"
                    )));
                }
                layout
                    .validate()
                    .map_err(|e| invalid(format!("PassStart {pass}: layout: {e}")))
            }
            ControlMsg::PassEnd {
                pass,
                batches,
                pages,
                bytes,
            } => {
                if *pass >= MAX_PASSES {
                    return Err(invalid(format!(
                        "PassEnd: pass {pass} is beyond the limit of {MAX_PASSES} passes"
                    )));
                }
                let min_bytes = batches.checked_mul(BATCH_HEADER_LEN as u64);
                let max_bytes = batches.checked_mul(u64::from(MAX_PAGE_FRAME));
                let ok = match (min_bytes, max_bytes) {
                    (Some(lo), Some(hi)) => (lo..=hi).contains(bytes),
                    _ => false,
                };
                if !ok || (*batches == 0) != (*pages == 0) {
                    return Err(invalid(format!(
                        "PassEnd {pass}: {batches} batches, {pages} pages and {bytes} bytes are inconsistent"
                    )));
                }
                Ok(())
            }
            ControlMsg::Switchover { image } => image.validate().map_err(WireError::InvalidImage),
            ControlMsg::Running { pid, .. } => check_id("Running: pid", *pid),
            ControlMsg::LazyPlan { owed } => check_spans("LazyPlan", owed),
            ControlMsg::LazyResumed { owed } => check_spans("LazyResumed", owed),
            ControlMsg::LazyResume { pid } => check_id("LazyResume: pid", *pid),
            ControlMsg::PageRequest { addr, pages } => {
                if !is_page_aligned(*addr) {
                    return Err(invalid(format!(
                        "PageRequest: address {addr:#x} is not page aligned"
                    )));
                }
                if !(1..=MAX_REQUEST_PAGES).contains(pages) {
                    return Err(invalid(format!(
                        "PageRequest at {addr:#x}: {pages} pages, must be 1..={MAX_REQUEST_PAGES}"
                    )));
                }
                if addr.checked_add(u64::from(*pages) * PAGE_SIZE).is_none() {
                    return Err(invalid(format!(
                        "PageRequest: {pages} pages at {addr:#x} run past the end of the address space"
                    )));
                }
                Ok(())
            }
            ControlMsg::LazyComplete { .. } => Ok(()),
            ControlMsg::NetMove { addrs } => check_moved(addrs),
        }
    }

    /// The payload of this message (without validation).
    fn payload(&self) -> Result<Vec<u8>, postcard::Error> {
        use postcard::to_stdvec as enc;
        match self {
            ControlMsg::Hello {
                version,
                host,
                agent,
            }
            | ControlMsg::HelloAck {
                version,
                host,
                agent,
            } => enc(&(version, host, agent)),
            ControlMsg::Prepare {
                pid,
                tids,
                exe,
                files,
            } => enc(&(pid, tids, exe, files)),
            ControlMsg::Ready | ControlMsg::Done => Ok(Vec::new()),
            ControlMsg::Refuse { code, reason } => enc(&(code, reason)),
            ControlMsg::PassStart { pass, layout } => enc(&(pass, layout)),
            ControlMsg::PassEnd {
                pass,
                batches,
                pages,
                bytes,
            } => enc(&(pass, batches, pages, bytes)),
            ControlMsg::Switchover { image } => enc(image),
            ControlMsg::Running { pid, restore_us } => enc(&(pid, restore_us)),
            ControlMsg::Failed { reason } | ControlMsg::Abort { reason } => enc(reason),
            ControlMsg::LazyPlan { owed } => enc(owed),
            ControlMsg::PageRequest { addr, pages } => enc(&(addr, pages)),
            ControlMsg::LazyComplete { stats } => enc(stats),
            ControlMsg::LazyResume { pid } => enc(pid),
            ControlMsg::LazyResumed { owed } => enc(owed),
            ControlMsg::NetMove { addrs } => enc(addrs),
        }
    }

    /// Parses a payload of `kind` (without validation).
    fn from_payload(kind: MsgKind, p: &[u8]) -> Result<Self, WireError> {
        fn dec<'a, T: Deserialize<'a>>(kind: MsgKind, p: &'a [u8]) -> Result<T, WireError> {
            let (v, rest) = postcard::take_from_bytes(p)
                .map_err(|source| WireError::Decode { kind, source })?;
            if !rest.is_empty() {
                return Err(WireError::TrailingBytes {
                    kind,
                    extra: rest.len(),
                });
            }
            Ok(v)
        }
        let empty = |m: ControlMsg| {
            if p.is_empty() {
                Ok(m)
            } else {
                Err(WireError::TrailingBytes {
                    kind,
                    extra: p.len(),
                })
            }
        };
        Ok(match kind {
            MsgKind::Hello => {
                let (version, host, agent) = dec(kind, p)?;
                ControlMsg::Hello {
                    version,
                    host,
                    agent,
                }
            }
            MsgKind::HelloAck => {
                let (version, host, agent) = dec(kind, p)?;
                ControlMsg::HelloAck {
                    version,
                    host,
                    agent,
                }
            }
            MsgKind::Prepare => {
                let (pid, tids, exe, files) = dec(kind, p)?;
                ControlMsg::Prepare {
                    pid,
                    tids,
                    exe,
                    files,
                }
            }
            MsgKind::Ready => return empty(ControlMsg::Ready),
            MsgKind::Done => return empty(ControlMsg::Done),
            MsgKind::Refuse => {
                let (code, reason) = dec(kind, p)?;
                ControlMsg::Refuse { code, reason }
            }
            MsgKind::PassStart => {
                let (pass, layout) = dec(kind, p)?;
                ControlMsg::PassStart { pass, layout }
            }
            MsgKind::PassEnd => {
                let (pass, batches, pages, bytes) = dec(kind, p)?;
                ControlMsg::PassEnd {
                    pass,
                    batches,
                    pages,
                    bytes,
                }
            }
            MsgKind::Switchover => ControlMsg::Switchover {
                image: Box::new(dec(kind, p)?),
            },
            MsgKind::Running => {
                let (pid, restore_us) = dec(kind, p)?;
                ControlMsg::Running { pid, restore_us }
            }
            MsgKind::Failed => ControlMsg::Failed {
                reason: dec(kind, p)?,
            },
            MsgKind::Abort => ControlMsg::Abort {
                reason: dec(kind, p)?,
            },
            MsgKind::LazyPlan => ControlMsg::LazyPlan {
                owed: dec(kind, p)?,
            },
            MsgKind::PageRequest => {
                let (addr, pages) = dec(kind, p)?;
                ControlMsg::PageRequest { addr, pages }
            }
            MsgKind::LazyComplete => ControlMsg::LazyComplete {
                stats: dec(kind, p)?,
            },
            MsgKind::LazyResume => ControlMsg::LazyResume { pid: dec(kind, p)? },
            MsgKind::LazyResumed => ControlMsg::LazyResumed {
                owed: dec(kind, p)?,
            },
            MsgKind::NetMove => ControlMsg::NetMove {
                addrs: dec(kind, p)?,
            },
            MsgKind::Pages | MsgKind::LazyPages => return Err(WireError::WrongStream { kind }),
        })
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload is.
    pub kind: MsgKind,
    /// Payload length in bytes (already bounded when parsed).
    pub len: u32,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

impl FrameHeader {
    /// The header of a frame carrying `payload` (version [`WIRE_MAJOR`]).
    pub fn for_payload(kind: MsgKind, payload: &[u8]) -> Result<Self, WireError> {
        let max = kind.max_payload();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= max)
            .ok_or(WireError::TooLarge {
                kind,
                len: payload.len() as u64,
                max: u64::from(max),
            })?;
        Ok(Self {
            kind,
            len,
            checksum: xxh3_64(payload),
        })
    }

    /// Serializes the header, magic and version included.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&WIRE_MAGIC.to_le_bytes());
        h[2] = WIRE_MAJOR;
        h[3] = self.kind as u8;
        h[4..8].copy_from_slice(&self.len.to_le_bytes());
        h[8..16].copy_from_slice(&self.checksum.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, kind, and the length
    /// against `max` and the kind's own limit. Call this before allocating
    /// anything for the payload.
    pub fn parse(h: &[u8; HEADER_LEN], max: u32) -> Result<Self, WireError> {
        let magic = u16::from_le_bytes([h[0], h[1]]);
        if magic != WIRE_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if h[2] != WIRE_MAJOR {
            return Err(WireError::UnsupportedVersion {
                found: h[2],
                supported: WIRE_MAJOR,
            });
        }
        let kind = MsgKind::from_u8(h[3]).ok_or(WireError::UnknownKind(h[3]))?;
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let limit = max.min(kind.max_payload());
        if len > limit {
            return Err(WireError::TooLarge {
                kind,
                len: u64::from(len),
                max: u64::from(limit),
            });
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[8..16]);
        Ok(Self {
            kind,
            len,
            checksum: u64::from_le_bytes(c),
        })
    }
}

/// A complete frame whose checksum has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: MsgKind,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Joins a parsed header and its payload, checking length and checksum.
    pub fn from_parts(header: FrameHeader, payload: Vec<u8>) -> Result<Self, WireError> {
        if payload.len() as u64 != u64::from(header.len) {
            return Err(WireError::Truncated {
                found: (HEADER_LEN + payload.len()) as u64,
                expected: HEADER_LEN as u64 + u64::from(header.len),
            });
        }
        let found = xxh3_64(&payload);
        if found != header.checksum {
            return Err(WireError::Checksum {
                kind: header.kind,
                expected: header.checksum,
                found,
            });
        }
        Ok(Self {
            kind: header.kind,
            payload,
        })
    }
}

/// Encodes a complete frame (header and payload).
pub fn encode_frame(kind: MsgKind, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let h = FrameHeader::for_payload(kind, payload)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&h.to_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Writes one frame to `w`.
pub fn write_frame(w: &mut impl Write, kind: MsgKind, payload: &[u8]) -> Result<(), WireError> {
    let h = FrameHeader::for_payload(kind, payload)?;
    w.write_all(&h.to_bytes())?;
    w.write_all(payload)?;
    Ok(())
}

/// Reads one frame from `r`, with payloads bounded by `max` (use
/// [`MAX_CONTROL_FRAME`] on the control stream, [`MAX_PAGE_FRAME`] on page
/// streams). The payload buffer grows only as bytes actually arrive.
pub fn read_frame(r: &mut impl Read, max: u32) -> Result<Frame, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(WireError::EndOfStream),
            Ok(0) => {
                return Err(WireError::Truncated {
                    found: got as u64,
                    expected: HEADER_LEN as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = FrameHeader::parse(&h, max)?;
    let len = header.len as usize;
    let mut payload = Vec::with_capacity(len.min(64 << 10));
    r.take(u64::from(header.len)).read_to_end(&mut payload)?;
    Frame::from_parts(header, payload)
}

/// Splits the first frame off `bytes`: the frame and the rest of the bytes.
/// [`WireError::Truncated`] if `bytes` ends inside the frame,
/// [`WireError::EndOfStream`] if `bytes` is empty.
pub fn decode_frame(bytes: &[u8], max: u32) -> Result<(Frame, &[u8]), WireError> {
    if bytes.is_empty() {
        return Err(WireError::EndOfStream);
    }
    let mut h = [0u8; HEADER_LEN];
    match bytes.get(..HEADER_LEN) {
        Some(s) => h.copy_from_slice(s),
        None => {
            return Err(WireError::Truncated {
                found: bytes.len() as u64,
                expected: HEADER_LEN as u64,
            })
        }
    }
    let header = FrameHeader::parse(&h, max)?;
    let end = HEADER_LEN + header.len as usize;
    let payload = bytes.get(HEADER_LEN..end).ok_or(WireError::Truncated {
        found: bytes.len() as u64,
        expected: end as u64,
    })?;
    let frame = Frame::from_parts(header, payload.to_vec())?;
    Ok((frame, &bytes[end..]))
}

/// Validates and encodes a control message as a complete frame. A message
/// the receiver would refuse is refused here.
pub fn encode_control(msg: &ControlMsg) -> Result<Vec<u8>, WireError> {
    msg.validate()?;
    let kind = msg.kind();
    let payload = msg
        .payload()
        .map_err(|source| WireError::Encode { kind, source })?;
    encode_frame(kind, &payload)
}

/// Decodes and validates a control message from a checked frame: no bytes
/// may be left over, and [`ControlMsg::validate`] must pass.
pub fn decode_control(frame: &Frame) -> Result<ControlMsg, WireError> {
    let msg = ControlMsg::from_payload(frame.kind, &frame.payload)?;
    msg.validate()?;
    Ok(msg)
}

/// Validates `msg` and writes it as one frame to `w`.
pub fn write_control(w: &mut impl Write, msg: &ControlMsg) -> Result<(), WireError> {
    w.write_all(&encode_control(msg)?)?;
    Ok(())
}

/// Reads one frame from the control stream `r` and decodes it.
pub fn read_control(r: &mut impl Read) -> Result<ControlMsg, WireError> {
    decode_control(&read_frame(r, MAX_CONTROL_FRAME)?)
}

/// Decodes `batch` with `decoder` into `out` and runs `check` on it; on a
/// failed check `out` is left empty.
fn decode_checked(
    decoder: &mut BatchDecoder,
    batch: &[u8],
    out: &mut PageBatch,
    check: impl FnOnce(&PageBatch) -> Result<(), WireError>,
) -> Result<(), WireError> {
    decoder.decode_into(batch, out).map_err(WireError::Batch)?;
    if let Err(e) = check(out) {
        out.clear();
        return Err(e);
    }
    Ok(())
}

/// A page frame: one encoded page batch of pass `pass`, for the pages of
/// `space` (a process's address space, or a shared memory object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageFrame {
    /// The pass the batch belongs to.
    pub pass: u32,
    /// Whose pages these are.
    pub space: PageSpace,
    /// The batch, in the page batch codec ([`crate::pages::encode_batch`]).
    pub batch: Vec<u8>,
}

/// Encodes a page frame for an already encoded batch (complete frame).
pub fn encode_page_frame(pass: u32, space: PageSpace, batch: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut prefix = [0u8; PAGE_PREFIX_LEN];
    prefix[..4].copy_from_slice(&pass.to_le_bytes());
    prefix[4..].copy_from_slice(&encode_space(space).to_le_bytes());
    encode_prefixed_frame(MsgKind::Pages, &prefix, batch)
}

/// A complete page frame of `kind`: `prefix`, then `batch`.
fn encode_prefixed_frame(kind: MsgKind, prefix: &[u8], batch: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = prefix.len() + batch.len();
    if len > MAX_PAGE_FRAME as usize {
        return Err(WireError::TooLarge {
            kind,
            len: len as u64,
            max: u64::from(MAX_PAGE_FRAME),
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(prefix);
    out.extend_from_slice(batch);
    let h = FrameHeader::for_payload(kind, &out[HEADER_LEN..])?;
    out[..HEADER_LEN].copy_from_slice(&h.to_bytes());
    Ok(out)
}

impl PageFrame {
    /// Encodes this page frame (complete frame).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        encode_page_frame(self.pass, self.space, &self.batch)
    }

    /// Splits a checked frame into pass number, page space and batch bytes.
    /// The batch itself is checked by [`PageFrame::decode_batch`].
    pub fn from_frame(frame: Frame) -> Result<Self, WireError> {
        if frame.kind != MsgKind::Pages {
            return Err(WireError::WrongStream { kind: frame.kind });
        }
        let mut p = frame.payload;
        if p.len() < PAGE_PREFIX_LEN {
            return Err(invalid(format!(
                "page frame of {} bytes has no pass number and page space",
                p.len()
            )));
        }
        let pass = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        if pass >= MAX_PASSES {
            return Err(invalid(format!(
                "page frame for pass {pass}, beyond the limit of {MAX_PASSES} passes"
            )));
        }
        let space = decode_space(u32::from_le_bytes([p[4], p[5], p[6], p[7]]))?;
        p.drain(..PAGE_PREFIX_LEN);
        Ok(Self {
            pass,
            space,
            batch: p,
        })
    }

    /// Decodes the batch with `decoder` (make it with [`page_decoder`]) into
    /// `out` and checks that every run lies inside `vmas`, the areas of this
    /// frame's space in its pass ([`space_areas`]).
    pub fn decode_batch(
        &self,
        decoder: &mut BatchDecoder,
        vmas: &[Vma],
        out: &mut PageBatch,
    ) -> Result<(), WireError> {
        decode_checked(decoder, &self.batch, out, |b| check_runs_within(b, vmas))
    }
}

/// A batch decoder with the wire's limits ([`PAGE_BATCH_LIMITS`]).
pub fn page_decoder() -> BatchDecoder {
    BatchDecoder::new(PAGE_BATCH_LIMITS)
}

/// Reads one frame from a page stream and splits it ([`PageFrame::from_frame`]).
pub fn read_page_frame(r: &mut impl Read) -> Result<PageFrame, WireError> {
    PageFrame::from_frame(read_frame(r, MAX_PAGE_FRAME)?)
}

/// A lazy page frame: one encoded batch of owed pages, sent after `Running`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyFrame {
    /// Why the source sent it.
    pub origin: LazyOrigin,
    /// The batch, in the page batch codec ([`crate::pages::encode_batch`]).
    pub batch: Vec<u8>,
}

/// Encodes a lazy page frame for an already encoded batch (complete frame).
pub fn encode_lazy_frame(origin: LazyOrigin, batch: &[u8]) -> Result<Vec<u8>, WireError> {
    encode_prefixed_frame(MsgKind::LazyPages, &(origin as u32).to_le_bytes(), batch)
}

impl LazyFrame {
    /// Encodes this lazy page frame (complete frame).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        encode_lazy_frame(self.origin, &self.batch)
    }

    /// Splits a checked frame into origin and batch bytes. The batch itself
    /// is checked by [`LazyFrame::decode_batch`].
    pub fn from_frame(frame: Frame) -> Result<Self, WireError> {
        if frame.kind != MsgKind::LazyPages {
            return Err(WireError::WrongStream { kind: frame.kind });
        }
        let mut p = frame.payload;
        if p.len() < LAZY_PREFIX_LEN {
            return Err(invalid(format!(
                "lazy page frame of {} bytes has no origin",
                p.len()
            )));
        }
        let raw = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let origin = LazyOrigin::from_u32(raw)
            .ok_or_else(|| invalid(format!("lazy page frame with unknown origin {raw}")))?;
        p.drain(..LAZY_PREFIX_LEN);
        Ok(Self { origin, batch: p })
    }

    /// Decodes the batch with `decoder` (make it with [`page_decoder`]) into
    /// `out` and checks that every run lies inside one span of `owed`, the
    /// migration's `LazyPlan` ([`check_runs_owed`]).
    pub fn decode_batch(
        &self,
        decoder: &mut BatchDecoder,
        owed: &[PageSpan],
        out: &mut PageBatch,
    ) -> Result<(), WireError> {
        decode_checked(decoder, &self.batch, out, |b| check_runs_owed(b, owed))
    }
}

/// A frame of a page stream: a pre-copy page frame or a lazy one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrame {
    /// A `Pages` frame.
    Pages(PageFrame),
    /// A `LazyPages` frame.
    Lazy(LazyFrame),
}

impl StreamFrame {
    /// Splits a checked frame of a page stream by its kind
    /// ([`PageFrame::from_frame`], [`LazyFrame::from_frame`]); a control
    /// kind is [`WireError::WrongStream`].
    pub fn from_frame(frame: Frame) -> Result<Self, WireError> {
        match frame.kind {
            MsgKind::Pages => PageFrame::from_frame(frame).map(StreamFrame::Pages),
            MsgKind::LazyPages => LazyFrame::from_frame(frame).map(StreamFrame::Lazy),
            kind => Err(WireError::WrongStream { kind }),
        }
    }
}

/// Reads one frame from a page stream and splits it, whichever of the two
/// page kinds it is ([`StreamFrame::from_frame`]).
pub fn read_stream_frame(r: &mut impl Read) -> Result<StreamFrame, WireError> {
    StreamFrame::from_frame(read_frame(r, MAX_PAGE_FRAME)?)
}

/// The span of `owed` (sorted, non-overlapping, as `LazyPlan` requires) that
/// contains all of `[addr, addr+len)`, if one does. The source uses it to
/// check a `PageRequest`, the destination (through [`check_runs_owed`]) a
/// lazy batch.
pub fn find_owed_span(owed: &[PageSpan], addr: u64, len: u64) -> Option<&PageSpan> {
    let idx = owed.partition_point(|s| s.addr <= addr);
    idx.checked_sub(1)
        .and_then(|j| owed.get(j))
        .filter(|s| s.contains(addr, len))
}

/// Checks that every run of `batch` (data or zero) lies entirely inside one
/// span of `owed` (sorted, as `LazyPlan` requires). A run that crosses from
/// one span into the next, even a touching one, is refused: senders split
/// runs at span boundaries.
pub fn check_runs_owed(batch: &PageBatch, owed: &[PageSpan]) -> Result<(), WireError> {
    for (i, r) in batch.runs.iter().enumerate() {
        if find_owed_span(owed, r.addr, r.len_bytes()).is_none() {
            return Err(invalid(format!(
                "lazy page run #{i} at {:#x} ({} pages) is not inside an owed span",
                r.addr, r.pages
            )));
        }
    }
    Ok(())
}

/// Checks that every span of a `LazyPlan` lies entirely inside one VMA of
/// `vmas` (the last pass's layout: sorted, non-overlapping, as
/// [`validate_vmas`] requires) whose kind is [`VmaKind::Anonymous`]: only
/// private anonymous memory is restored lazily. A span that crosses from one
/// VMA into the next is refused too: senders split spans at VMA boundaries.
pub fn check_spans_in_anonymous(spans: &[PageSpan], vmas: &[Vma]) -> Result<(), WireError> {
    for (i, s) in spans.iter().enumerate() {
        let Some(len) = s.pages.checked_mul(PAGE_SIZE) else {
            return Err(invalid(format!(
                "lazy span #{i} at {:#x} ({} pages) runs past the end of the address space",
                s.addr, s.pages
            )));
        };
        let idx = vmas.partition_point(|v| v.start <= s.addr);
        let vma = idx.checked_sub(1).and_then(|j| vmas.get(j));
        let Some(v) = vma.filter(|v| s.addr < v.end) else {
            return Err(invalid(format!(
                "lazy span #{i} at {:#x} ({} pages) is not inside a declared VMA",
                s.addr, s.pages
            )));
        };
        if !v.contains(s.addr, len) {
            return Err(invalid(format!(
                "lazy span #{i} at {:#x} ({} pages) runs past the end of VMA {:#x}-{:#x}",
                s.addr, s.pages, v.start, v.end
            )));
        }
        let what = match &v.kind {
            VmaKind::Anonymous => continue,
            VmaKind::File(m) => format!("a private mapping of {}", m.path),
            VmaKind::SharedFile(m) => format!("a shared mapping of {}", m.path),
            VmaKind::Special { name } => format!("the special area {name}"),
            VmaKind::Shmem { id, .. } => format!("shared memory object {id}"),
        };
        return Err(invalid(format!(
            "lazy span #{i} at {:#x} ({} pages) lies in VMA {:#x}-{:#x}, {what}: only anonymous memory is restored lazily",
            s.addr, s.pages, v.start, v.end
        )));
    }
    Ok(())
}

/// Checks that every run of `batch` lies entirely inside one VMA of `vmas`
/// (sorted by start, as [`validate_vmas`] requires) that is not a kernel
/// special area (`[vdso]`, `[vvar]`, ...: never written). A run that crosses
/// from one VMA into the next is refused too: senders split runs at VMA
/// boundaries.
pub fn check_runs_within(batch: &PageBatch, vmas: &[Vma]) -> Result<(), WireError> {
    for (i, r) in batch.runs.iter().enumerate() {
        let len = r.len_bytes();
        let idx = vmas.partition_point(|v| v.start <= r.addr);
        let vma = idx.checked_sub(1).and_then(|j| vmas.get(j));
        match vma {
            Some(v) if v.contains(r.addr, len) => {
                if let VmaKind::Special { name } = &v.kind {
                    return Err(invalid(format!(
                        "page run #{i} at {:#x} ({} pages) lies in special area {name}",
                        r.addr, r.pages
                    )));
                }
                if let VmaKind::Shmem { id, .. } = &v.kind {
                    return Err(invalid(format!(
                        "page run #{i} at {:#x} ({} pages) lies in shared memory object {id}: \
                         its pages are not part of a process's memory",
                        r.addr, r.pages
                    )));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "page run #{i} at {:#x} ({} pages) is not inside a declared VMA",
                    r.addr, r.pages
                )))
            }
        }
    }
    Ok(())
}

/// The areas the runs of a page frame of `space` must lie in, in `layout`:
/// a process's areas, or a shared memory object as one area from offset 0
/// to its size. `None` if the layout has no such space.
pub fn space_areas(layout: &TreeLayout, space: PageSpace) -> Option<Vec<Vma>> {
    match space {
        PageSpace::Task(pid) => layout.task(pid).map(|t| t.vmas.clone()),
        PageSpace::Shmem(id) => layout.shmem.iter().find(|s| s.id == id).map(|s| {
            vec![Vma {
                start: 0,
                end: s.size.next_multiple_of(PAGE_SIZE).max(PAGE_SIZE),
                prot: 3,
                flags: 1,
                kind: VmaKind::Anonymous,
                name: None,
            }]
        }),
    }
}

#[cfg(test)]
mod tests;
