use super::*;
use crate::model::PAGE_SIZE;
use crate::pages::{encode_batch, PageRun};
use crate::validate::tests::sample_image;

fn host() -> HostInfo {
    sample_image().host
}

fn facts(path: &str) -> FileFacts {
    FileFacts {
        path: path.into(),
        size: 40_000,
        mtime_ns: 1_700_000_000_000_000_000,
        hash: ContentHash::Sha256([7; 32]),
    }
}

fn hello() -> ControlMsg {
    ControlMsg::Hello {
        version: ProtocolVersion::CURRENT,
        host: host(),
        agent: "ferry test".into(),
    }
}

fn prepare() -> ControlMsg {
    ControlMsg::Prepare {
        pid: 4242,
        tids: vec![4242, 4243],
        exe: facts("/usr/bin/sleep"),
        files: vec![FileFacts {
            hash: ContentHash::Xxh3_128(0x1234_5678_9abc_def0_1122_3344_5566_7788),
            ..facts("/usr/lib/libc.so.6")
        }],
    }
}

fn layout_of(vmas: Vec<Vma>) -> Box<TreeLayout> {
    let mut l = sample_image().layout();
    l.tasks[0].vmas = vmas;
    Box::new(l)
}

fn pass_start(pass: u32) -> ControlMsg {
    ControlMsg::PassStart {
        pass,
        layout: Box::new(sample_image().layout()),
    }
}

fn every_message() -> Vec<ControlMsg> {
    vec![
        hello(),
        ControlMsg::HelloAck {
            version: ProtocolVersion::CURRENT,
            host: host(),
            agent: "ferry dest".into(),
        },
        prepare(),
        ControlMsg::Ready,
        ControlMsg::Refuse {
            code: RefuseCode::PidTaken,
            reason: "pid 4242 is in use".into(),
        },
        pass_start(0),
        ControlMsg::PassEnd {
            pass: 0,
            batches: 2,
            pages: 10,
            bytes: 9000,
        },
        ControlMsg::Switchover {
            image: Box::new(sample_image()),
        },
        ControlMsg::Running {
            pid: 4242,
            restore_us: 3500,
        },
        ControlMsg::Failed {
            reason: "clone3 failed".into(),
        },
        ControlMsg::Done,
        ControlMsg::Abort {
            reason: "user pressed ^C".into(),
        },
        lazy_plan(),
        page_request(),
        lazy_complete(),
        lazy_resume(),
        lazy_resumed(),
        net_move(),
    ]
}

fn net_move() -> ControlMsg {
    ControlMsg::NetMove {
        addrs: vec![
            MovedAddr {
                addr: "198.18.0.100".parse().unwrap(),
                prefix_len: 24,
            },
            MovedAddr {
                addr: "2001:2:0:1::100".parse().unwrap(),
                prefix_len: 64,
            },
        ],
    }
}

fn span(addr: u64, pages: u64) -> PageSpan {
    PageSpan { addr, pages }
}

/// Owed spans inside the sample image's anonymous heap (0x600000-0x621000).
fn owed() -> Vec<PageSpan> {
    vec![
        span(0x60_0000, 4),
        span(0x60_4000, 2), // touches the previous one
        span(0x61_0000, 0x11),
    ]
}

fn lazy_plan() -> ControlMsg {
    ControlMsg::LazyPlan { owed: owed() }
}

fn page_request() -> ControlMsg {
    ControlMsg::PageRequest {
        addr: 0x61_1000,
        pages: 16,
    }
}

fn lazy_complete() -> ControlMsg {
    ControlMsg::LazyComplete {
        stats: LazyStats {
            faults: 3,
            pages_requested: 48,
            pages_pushed: 0x17 + 6 - 16,
            max_fault_wait_us: 1800,
            last_page_us: 250_000,
        },
    }
}

fn lazy_resume() -> ControlMsg {
    ControlMsg::LazyResume { pid: 4242 }
}

fn lazy_resumed() -> ControlMsg {
    ControlMsg::LazyResumed {
        owed: vec![span(0x60_1000, 3), span(0x61_0000, 2)],
    }
}

fn frame_of(bytes: &[u8]) -> Result<Frame, WireError> {
    let (f, rest) = decode_frame(bytes, MAX_CONTROL_FRAME)?;
    assert!(rest.is_empty());
    Ok(f)
}

fn decode_bytes(bytes: &[u8]) -> Result<ControlMsg, WireError> {
    decode_control(&frame_of(bytes)?)
}

/// Rewrites the header checksum so that a mutated payload reaches decoding.
fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() >= HEADER_LEN {
        let c = xxh3_64(&bytes[HEADER_LEN..]);
        bytes[8..16].copy_from_slice(&c.to_le_bytes());
    }
}

#[test]
fn every_message_round_trips() {
    let kinds: HashSet<MsgKind> = every_message().iter().map(ControlMsg::kind).collect();
    assert_eq!(kinds.len(), 18, "one sample per control kind");
    assert_eq!(
        kinds.len(),
        MsgKind::ALL.iter().filter(|k| k.is_control()).count()
    );
    for msg in every_message() {
        let bytes = encode_control(&msg).unwrap();
        assert_eq!(bytes[3], msg.kind() as u8);
        assert_eq!(decode_bytes(&bytes).unwrap(), msg, "{}", msg.kind());
        // Through std::io as well.
        let mut buf = Vec::new();
        write_control(&mut buf, &msg).unwrap();
        assert_eq!(buf, bytes);
        assert_eq!(read_control(&mut &buf[..]).unwrap(), msg);
    }
}

#[test]
fn kind_bytes_are_stable_and_zero_is_invalid() {
    assert_eq!(MsgKind::from_u8(0), None);
    for k in MsgKind::ALL {
        assert_eq!(MsgKind::from_u8(k as u8), Some(k));
    }
    assert_eq!(MsgKind::Hello as u8, 1);
    assert_eq!(MsgKind::Abort as u8, 12);
    assert_eq!(MsgKind::LazyPlan as u8, 13);
    assert_eq!(MsgKind::PageRequest as u8, 14);
    assert_eq!(MsgKind::LazyComplete as u8, 15);
    assert_eq!(MsgKind::LazyResume as u8, 16);
    assert_eq!(MsgKind::LazyResumed as u8, 17);
    assert_eq!(MsgKind::Pages as u8, 32);
    assert_eq!(MsgKind::LazyPages as u8, 33);
    assert!(MsgKind::ALL.windows(2).all(|w| (w[0] as u8) < (w[1] as u8)));
    let pages: Vec<MsgKind> = MsgKind::ALL
        .into_iter()
        .filter(|k| !k.is_control())
        .collect();
    assert_eq!(pages, [MsgKind::Pages, MsgKind::LazyPages]);
    assert_eq!(MsgKind::LazyPages.max_payload(), MAX_PAGE_FRAME);
}

#[test]
fn header_layout() {
    let bytes = encode_control(&ControlMsg::Done).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN);
    assert_eq!(&bytes[0..2], &[0x77, 0xFE]);
    assert_eq!(bytes[2], WIRE_MAJOR);
    assert_eq!(bytes[3], MsgKind::Done as u8);
    assert_eq!(&bytes[4..8], &[0, 0, 0, 0]);
    assert_eq!(&bytes[8..16], &xxh3_64(&[]).to_le_bytes());
    // An all-zero header means nothing.
    assert!(matches!(
        decode_bytes(&[0u8; HEADER_LEN]),
        Err(WireError::BadMagic(0))
    ));
}

#[test]
fn page_frame_limit_matches_zstd() {
    let bound = zstd::zstd_safe::compress_bound(PAGE_BATCH_LIMITS.max_raw);
    assert_eq!(zstd_compress_bound(PAGE_BATCH_LIMITS.max_raw), bound);
    assert_eq!(
        zstd_compress_bound(1000),
        zstd::zstd_safe::compress_bound(1000)
    );
    let expected =
        PAGE_PREFIX_LEN + BATCH_HEADER_LEN + PAGE_BATCH_LIMITS.max_runs as usize * RUN_LEN + bound;
    assert_eq!(MAX_PAGE_FRAME as usize, expected);
}

#[test]
fn flipped_payload_byte_is_a_checksum_error() {
    let mut bytes = encode_control(&prepare()).unwrap();
    bytes[HEADER_LEN + 3] ^= 0x40;
    assert!(matches!(
        decode_bytes(&bytes),
        Err(WireError::Checksum {
            kind: MsgKind::Prepare,
            ..
        })
    ));
    let mut bytes = encode_control(&prepare()).unwrap();
    bytes[9] ^= 1; // the checksum itself
    assert!(matches!(
        read_control(&mut &bytes[..]),
        Err(WireError::Checksum { .. })
    ));
}

#[test]
fn other_version_is_refused() {
    let mut bytes = encode_control(&hello()).unwrap();
    bytes[2] = WIRE_MAJOR + 1;
    match decode_bytes(&bytes) {
        Err(WireError::UnsupportedVersion { found, supported }) => {
            assert_eq!((found, supported), (WIRE_MAJOR + 1, WIRE_MAJOR));
        }
        other => panic!("{other:?}"),
    }
    // A Hello announcing another major inside a well-formed frame.
    let mut st = DestState::new();
    let h = ControlMsg::Hello {
        version: ProtocolVersion {
            major: WIRE_MAJOR + 1,
            minor: 0,
        },
        host: host(),
        agent: "future".into(),
    };
    assert!(matches!(
        st.accept(&h),
        Err(WireError::UnsupportedVersion { .. })
    ));
}

#[test]
fn newer_minor_is_negotiated_down() {
    let mut st = DestState::new();
    let h = ControlMsg::Hello {
        version: ProtocolVersion {
            major: WIRE_MAJOR,
            minor: WIRE_MINOR + 5,
        },
        host: host(),
        agent: "newer".into(),
    };
    st.accept(&h).unwrap();
    assert_eq!(st.version(), Some(ProtocolVersion::CURRENT));
}

#[test]
fn unknown_kind_is_refused() {
    for k in [0u8, 19, 31, 34, 255] {
        let mut bytes = encode_control(&ControlMsg::Done).unwrap();
        bytes[3] = k;
        assert!(
            matches!(decode_bytes(&bytes), Err(WireError::UnknownKind(x)) if x == k),
            "kind {k}"
        );
    }
}

#[test]
fn bad_magic_is_refused() {
    let mut bytes = encode_control(&ControlMsg::Ready).unwrap();
    bytes[0] = b'G';
    assert!(matches!(decode_bytes(&bytes), Err(WireError::BadMagic(_))));
}

/// A reader that serves a header and then endless bytes, counting what was
/// read.
struct Endless {
    header: [u8; HEADER_LEN],
    pos: u64,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.header.get(self.pos as usize).copied().unwrap_or(0xAB);
            self.pos += 1;
        }
        Ok(buf.len())
    }
}

fn header_with_len(kind: MsgKind, len: u32) -> [u8; HEADER_LEN] {
    FrameHeader {
        kind,
        len,
        checksum: 0,
    }
    .to_bytes()
}

#[test]
fn oversized_length_is_refused_before_reading_the_payload() {
    let mut r = Endless {
        header: header_with_len(MsgKind::Switchover, MAX_CONTROL_FRAME + 1),
        pos: 0,
    };
    match read_frame(&mut r, MAX_CONTROL_FRAME) {
        Err(WireError::TooLarge { kind, len, max }) => {
            assert_eq!(kind, MsgKind::Switchover);
            assert_eq!(len, u64::from(MAX_CONTROL_FRAME) + 1);
            assert_eq!(max, u64::from(MAX_CONTROL_FRAME));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.pos, HEADER_LEN as u64, "nothing read past the header");

    // u32::MAX as well, and the per-kind limits: a unit message has none.
    let mut r = Endless {
        header: header_with_len(MsgKind::Pages, u32::MAX),
        pos: 0,
    };
    assert!(matches!(
        read_frame(&mut r, u32::MAX),
        Err(WireError::TooLarge { .. })
    ));
    let mut r = Endless {
        header: header_with_len(MsgKind::Ready, 1),
        pos: 0,
    };
    assert!(matches!(
        read_frame(&mut r, MAX_CONTROL_FRAME),
        Err(WireError::TooLarge { max: 0, .. })
    ));
    // The caller's limit applies too (a page frame is bigger than this).
    let mut r = Endless {
        header: header_with_len(MsgKind::Pages, 1 << 20),
        pos: 0,
    };
    assert!(matches!(
        read_frame(&mut r, 1 << 10),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn truncated_streams() {
    let bytes = encode_control(&prepare()).unwrap();
    assert!(matches!(
        read_frame(&mut &bytes[..0], MAX_CONTROL_FRAME),
        Err(WireError::EndOfStream)
    ));
    for cut in [1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
        assert!(
            matches!(
                read_frame(&mut &bytes[..cut], MAX_CONTROL_FRAME),
                Err(WireError::Truncated { .. })
            ),
            "cut at {cut}"
        );
        assert!(
            matches!(
                decode_frame(&bytes[..cut], MAX_CONTROL_FRAME),
                Err(WireError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    // A huge declared length with a short stream: truncated, not a huge
    // allocation.
    let mut s = header_with_len(MsgKind::Switchover, MAX_CONTROL_FRAME).to_vec();
    s.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        read_frame(&mut &s[..], MAX_CONTROL_FRAME),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn frames_back_to_back() {
    let mut buf = Vec::new();
    for m in every_message() {
        write_control(&mut buf, &m).unwrap();
    }
    let mut r = &buf[..];
    for m in every_message() {
        assert_eq!(read_control(&mut r).unwrap(), m);
    }
    assert!(matches!(read_control(&mut r), Err(WireError::EndOfStream)));
    let mut rest = &buf[..];
    let mut n = 0;
    while !rest.is_empty() {
        let (f, r) = decode_frame(rest, MAX_CONTROL_FRAME).unwrap();
        decode_control(&f).unwrap();
        rest = r;
        n += 1;
    }
    assert_eq!(n, every_message().len());
}

#[test]
fn trailing_bytes_are_refused() {
    let mut payload = ControlMsg::Running {
        pid: 5,
        restore_us: 1,
    }
    .payload()
    .unwrap();
    payload.push(0);
    let bytes = encode_frame(MsgKind::Running, &payload).unwrap();
    assert!(matches!(
        decode_bytes(&bytes),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
    let bytes = encode_frame(MsgKind::Done, &[]).unwrap();
    assert_eq!(decode_bytes(&bytes).unwrap(), ControlMsg::Done);
}

#[test]
fn garbage_payload_is_a_decode_error() {
    let bytes = encode_frame(MsgKind::Prepare, &[0xff; 3]).unwrap();
    assert!(matches!(
        decode_bytes(&bytes),
        Err(WireError::Decode {
            kind: MsgKind::Prepare,
            ..
        })
    ));
}

type PrepEdit = dyn Fn(&mut i32, &mut Vec<i32>, &mut FileFacts, &mut Vec<FileFacts>);

#[test]
fn semantic_checks() {
    let bad = |m: ControlMsg| {
        let e = encode_control(&m).expect_err("the sender refuses it too");
        // Encoded without the sender's check, the receiver refuses it.
        let bytes = encode_frame(m.kind(), &m.payload().unwrap()).unwrap();
        let d = decode_bytes(&bytes).expect_err("receiver refuses");
        assert_eq!(e.to_string(), d.to_string());
        d
    };
    let prep = |f: &PrepEdit| {
        let ControlMsg::Prepare {
            mut pid,
            mut tids,
            mut exe,
            mut files,
        } = prepare()
        else {
            unreachable!()
        };
        f(&mut pid, &mut tids, &mut exe, &mut files);
        ControlMsg::Prepare {
            pid,
            tids,
            exe,
            files,
        }
    };
    for m in [
        prep(&|p, _, _, _| *p = 0),
        prep(&|_, t, _, _| t.clear()),
        prep(&|_, t, _, _| t[0] = 4243),
        prep(&|_, t, _, _| t.push(4243)),
        prep(&|_, t, _, _| t.push(-1)),
        prep(&|_, _, e, _| e.path = "relative/path".into()),
        prep(&|_, _, e, _| e.path = format!("/{}", "a".repeat(MAX_PATH_LEN))),
        prep(&|_, _, _, f| f.push(f[0].clone())),
        prep(&|_, _, _, f| f[0].path = "/nul\0".into()),
    ] {
        assert!(matches!(bad(m), WireError::Invalid(_)));
    }
    let long = "x".repeat(MAX_REASON_LEN + 1);
    for m in [
        ControlMsg::Refuse {
            code: RefuseCode::Other,
            reason: long.clone(),
        },
        ControlMsg::Failed {
            reason: long.clone(),
        },
        ControlMsg::Abort { reason: long },
        ControlMsg::Hello {
            version: ProtocolVersion::CURRENT,
            host: host(),
            agent: "a".repeat(MAX_NAME_LEN + 1),
        },
        ControlMsg::Hello {
            version: ProtocolVersion::CURRENT,
            host: HostInfo {
                xstate_size: MAX_XSTATE_SIZE + 1,
                ..host()
            },
            agent: String::new(),
        },
        ControlMsg::PassStart {
            pass: MAX_PASSES,
            layout: layout_of(vec![]),
        },
        ControlMsg::PassEnd {
            pass: 0,
            batches: 0,
            pages: 3,
            bytes: 0,
        },
        ControlMsg::PassEnd {
            pass: 0,
            batches: 2,
            pages: 3,
            bytes: 10,
        },
        ControlMsg::PassEnd {
            pass: 0,
            batches: u64::MAX,
            pages: 3,
            bytes: u64::MAX,
        },
        ControlMsg::Running {
            pid: -4,
            restore_us: 0,
        },
    ] {
        assert!(matches!(bad(m), WireError::Invalid(_)));
    }
    // Layouts: unsorted, unaligned.
    let mut vmas = sample_image().tasks[0].vmas.clone();
    vmas.swap(0, 1);
    assert!(matches!(
        bad(ControlMsg::PassStart {
            pass: 0,
            layout: layout_of(vmas)
        }),
        WireError::Invalid(_)
    ));
    let mut vmas = sample_image().tasks[0].vmas.clone();
    vmas[1].end += 1;
    assert!(matches!(
        bad(ControlMsg::PassStart {
            pass: 0,
            layout: layout_of(vmas)
        }),
        WireError::Invalid(_)
    ));
    // The image goes through ProcessImage::validate.
    let mut img = sample_image();
    img.tasks[0].threads[1].tid = img.tasks[0].pid;
    assert!(matches!(
        bad(ControlMsg::Switchover {
            image: Box::new(img)
        }),
        WireError::InvalidImage(ValidationError::DuplicateTid { .. })
    ));
}

#[test]
fn validate_vmas_agrees_with_image_validation() {
    let mut img = sample_image();
    assert_eq!(validate_vmas(&img.tasks[0].vmas), Ok(()));
    img.tasks[0].vmas[2].start = img.tasks[0].vmas[1].start;
    assert_eq!(
        validate_vmas(&img.tasks[0].vmas).err(),
        img.validate().err(),
        "same error as ProcessImage::validate"
    );
}

fn batch(runs: &[(u64, u32, bool)]) -> PageBatch {
    let mut b = PageBatch::default();
    for &(addr, pages, zero) in runs {
        b.runs.push(PageRun { addr, pages, zero });
        if !zero {
            b.data
                .extend((0..pages as u64 * PAGE_SIZE).map(|i| (i % 251) as u8));
        }
    }
    b
}

#[test]
fn page_frames_round_trip_and_stay_inside_the_vmas() {
    let vmas = sample_image().tasks[0].vmas.clone(); // file 0x400000-0x405000, heap 0x600000-0x621000, vdso
    let b = batch(&[
        (0x40_0000, 2, false),
        (0x60_0000, 0x21, true),
        (0x40_4000, 1, false),
    ]);
    let enc = encode_batch(&b, 1);
    let frame = encode_page_frame(7, PageSpace::Task(4242), &enc).unwrap();
    assert_eq!(frame[3], MsgKind::Pages as u8);
    let pf = read_page_frame(&mut &frame[..]).unwrap();
    assert_eq!(pf.pass, 7);
    assert_eq!(pf.space, PageSpace::Task(4242));
    assert_eq!(pf.batch, enc);
    assert_eq!(pf.encode().unwrap(), frame);
    let mut dec = page_decoder();
    let mut out = PageBatch::default();
    pf.decode_batch(&mut dec, &vmas, &mut out).unwrap();
    assert_eq!(out, b);

    let outside = [
        (0x40_5000, 1, false),        // just past the file mapping
        (0x3f_f000, 2, true),         // starts before it
        (0x40_4000, 2, false),        // runs off its end
        (0x62_0000, 2, true),         // off the heap's end
        (0x10_0000, 1, true),         // nowhere
        (0x7fff_f7fc_0000, 1, false), // the vdso: never written
    ];
    for run in outside {
        let bad = batch(&[(0x60_0000, 1, false), run]);
        assert!(
            matches!(check_runs_within(&bad, &vmas), Err(WireError::Invalid(_))),
            "{run:x?}"
        );
        let pf = PageFrame {
            pass: 0,
            space: PageSpace::Task(4242),
            batch: encode_batch(&bad, 1),
        };
        assert!(matches!(
            pf.decode_batch(&mut dec, &vmas, &mut out),
            Err(WireError::Invalid(_))
        ));
        assert!(out.runs.is_empty(), "nothing handed out on error");
    }
    // No layout: nothing fits.
    assert!(check_runs_within(&b, &[]).is_err());
    // Adjacent VMAs: a run must not cross the boundary.
    let mut two = vmas[1..2].to_vec();
    let mut next = two[0].clone();
    next.start = two[0].end;
    next.end = next.start + 0x1000;
    two.push(next);
    assert!(
        check_runs_within(&batch(&[(0x62_0000, 1, true), (0x62_1000, 1, false)]), &two).is_ok()
    );
    assert!(check_runs_within(&batch(&[(0x62_0000, 2, true)]), &two).is_err());
}

#[test]
fn page_frame_rejections() {
    // A corrupt batch with a good frame checksum goes to the batch codec.
    let mut enc = encode_batch(&batch(&[(0x60_0000, 1, false)]), 1);
    enc[0] = b'X';
    let pf = read_page_frame(&mut &encode_page_frame(0, PageSpace::Task(4242), &enc).unwrap()[..])
        .unwrap();
    assert!(matches!(
        pf.decode_batch(
            &mut page_decoder(),
            &sample_image().tasks[0].vmas.clone(),
            &mut PageBatch::default()
        ),
        Err(WireError::Batch(_))
    ));
    // Too short for a pass number.
    let f = encode_frame(MsgKind::Pages, &[1, 2]).unwrap();
    assert!(matches!(
        read_page_frame(&mut &f[..]),
        Err(WireError::Invalid(_))
    ));
    // Wrong streams.
    let f = encode_control(&ControlMsg::Done).unwrap();
    assert!(matches!(
        read_page_frame(&mut &f[..]),
        Err(WireError::WrongStream {
            kind: MsgKind::Done
        })
    ));
    let f = encode_page_frame(0, PageSpace::Task(4242), &enc).unwrap();
    assert!(matches!(
        read_control(&mut &f[..]),
        Err(WireError::WrongStream {
            kind: MsgKind::Pages
        })
    ));
    // Larger than a page frame may be.
    let big = vec![0u8; MAX_PAGE_FRAME as usize];
    assert!(matches!(
        encode_page_frame(0, PageSpace::Task(4242), &big),
        Err(WireError::TooLarge { .. })
    ));
}

fn running() -> ControlMsg {
    ControlMsg::Running {
        pid: 4242,
        restore_us: 1,
    }
}

fn pass_end(pass: u32, batches: u64, pages: u64, bytes: u64) -> ControlMsg {
    ControlMsg::PassEnd {
        pass,
        batches,
        pages,
        bytes,
    }
}

fn switchover() -> ControlMsg {
    ControlMsg::Switchover {
        image: Box::new(sample_image()),
    }
}

fn ack() -> ControlMsg {
    ControlMsg::HelloAck {
        version: ProtocolVersion::CURRENT,
        host: host(),
        agent: "dest".into(),
    }
}

/// A destination state after the handshake.
fn ready_state() -> DestState {
    let mut st = DestState::new();
    st.accept(&hello()).unwrap();
    st.sent(&ack()).unwrap();
    st.accept(&prepare()).unwrap();
    st.sent(&ControlMsg::Ready).unwrap();
    assert_eq!(st.phase(), Phase::PreCopy);
    st
}

#[test]
fn a_whole_migration_is_legal() {
    let mut st = ready_state();
    assert_eq!(st.pid(), Some(4242));
    for pass in 0..3u32 {
        // A batch of a pass may overtake its PassStart.
        assert_eq!(st.page_batch(pass, 1, 100).unwrap(), PageAdmit::Wait);
        st.accept(&pass_start(pass)).unwrap();
        assert_eq!(st.phase(), Phase::InPass(pass));
        assert_eq!(st.page_batch(pass, 1, 100).unwrap(), PageAdmit::Accept);
        st.accept(&pass_end(pass, 2, 3, 300)).unwrap();
        assert!(!st.pass_complete(pass));
        // The rest of the pass arrives after its PassEnd.
        assert_eq!(st.page_batch(pass, 2, 200).unwrap(), PageAdmit::Accept);
        assert!(st.pass_complete(pass));
    }
    // Last pass: PassEnd first, then Switchover, then straggling pages.
    st.accept(&pass_start(3)).unwrap();
    st.accept(&pass_end(3, 1, 5, 1000)).unwrap();
    st.accept(&switchover()).unwrap();
    assert_eq!(st.phase(), Phase::Restoring);
    assert!(!st.all_passes_complete());
    assert!(
        matches!(st.clone().sent(&running()), Err(WireError::Invalid(_))),
        "no Running before all pages are in"
    );
    assert_eq!(st.page_batch(3, 5, 1000).unwrap(), PageAdmit::Accept);
    assert!(st.all_passes_complete());
    st.sent(&running()).unwrap();
    st.accept(&ControlMsg::Done).unwrap();
    assert_eq!(st.phase(), Phase::Closed);
    assert_eq!(st.passes_started(), 4);
}

fn unexpected(r: Result<(), WireError>) -> bool {
    matches!(r, Err(WireError::UnexpectedMessage { .. }))
}

#[test]
fn out_of_order_messages_are_refused() {
    // Anything but Hello first.
    for m in every_message() {
        let mut st = DestState::new();
        if m.kind() == MsgKind::Hello {
            continue;
        }
        let r = st.accept(&m);
        if m.kind() == MsgKind::Abort {
            assert!(r.is_ok());
        } else {
            assert!(unexpected(r), "{} first", m.kind());
        }
    }
    let mut st = DestState::new();
    st.accept(&hello()).unwrap();
    assert!(
        unexpected(st.clone().accept(&prepare())),
        "Prepare before HelloAck"
    );
    assert!(unexpected(st.clone().accept(&hello())), "Hello twice");
    st.sent(&ack()).unwrap();
    assert!(
        unexpected(st.clone().accept(&pass_start(0))),
        "pages before Prepare"
    );
    st.accept(&prepare()).unwrap();
    assert!(
        unexpected(st.clone().accept(&pass_start(0))),
        "before Ready"
    );
    assert!(matches!(
        st.clone().page_batch(0, 1, 1),
        Err(WireError::UnexpectedMessage {
            state: Phase::Checking,
            got: MsgKind::Pages
        })
    ));

    let mut st = ready_state();
    assert!(
        matches!(st.clone().accept(&switchover()), Err(WireError::Invalid(_))),
        "Switchover without a pass"
    );
    assert!(
        unexpected(st.clone().accept(&pass_end(0, 0, 0, 0))),
        "PassEnd outside a pass"
    );
    assert!(
        matches!(
            st.clone().accept(&pass_start(1)),
            Err(WireError::Invalid(_))
        ),
        "pass numbers have no gaps"
    );
    st.accept(&pass_start(0)).unwrap();
    assert!(unexpected(st.clone().accept(&pass_start(1))), "nested pass");
    assert!(
        unexpected(st.clone().accept(&switchover())),
        "Switchover inside a pass"
    );
    assert!(
        matches!(
            st.clone().accept(&pass_end(1, 0, 0, 0)),
            Err(WireError::Invalid(_))
        ),
        "PassEnd of another pass"
    );
    assert!(
        matches!(st.clone().page_batch(2, 1, 1), Err(WireError::Invalid(_))),
        "pages two passes ahead"
    );
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    assert!(st.pass_complete(0));
    assert!(
        matches!(st.clone().page_batch(0, 1, 1), Err(WireError::Invalid(_))),
        "pages beyond what PassEnd declared"
    );
    assert!(
        unexpected(st.clone().accept(&ControlMsg::Done)),
        "Done before Running"
    );
    st.accept(&switchover()).unwrap();
    assert!(
        matches!(st.clone().page_batch(1, 1, 1), Err(WireError::Invalid(_))),
        "no new pass after Switchover"
    );
    assert!(
        unexpected(st.clone().accept(&pass_start(1))),
        "PassStart after Switchover"
    );
    st.sent(&running()).unwrap();
    assert!(unexpected(
        st.clone().accept(&ControlMsg::Abort { reason: "x".into() })
    ));
    assert!(unexpected(st.clone().page_batch(0, 1, 1).map(|_| ())));
    st.accept(&ControlMsg::Done).unwrap();
    for m in every_message() {
        assert!(
            unexpected(st.clone().accept(&m)),
            "{} after Closed",
            m.kind()
        );
        assert!(
            unexpected(st.clone().sent(&m)),
            "sending {} after Closed",
            m.kind()
        );
    }
}

#[test]
fn destination_cannot_send_out_of_turn() {
    let mut st = DestState::new();
    assert!(unexpected(st.clone().sent(&ack())), "HelloAck before Hello");
    st.accept(&hello()).unwrap();
    assert!(unexpected(st.clone().sent(&ControlMsg::Ready)));
    assert!(
        unexpected(st.clone().accept(&ack())),
        "source messages only"
    );
    let mut refused = st.clone();
    refused
        .sent(&ControlMsg::Refuse {
            code: RefuseCode::Arch,
            reason: "aarch64".into(),
        })
        .unwrap();
    assert_eq!(refused.phase(), Phase::Closed);
    let mut st = ready_state();
    assert!(
        unexpected(st.clone().sent(&running())),
        "Running before Switchover"
    );
    st.sent(&ControlMsg::Abort {
        reason: "disk full".into(),
    })
    .unwrap();
    assert_eq!(st.phase(), Phase::Closed);
}

#[test]
fn pass_tallies_must_match() {
    let mut st = ready_state();
    st.accept(&pass_start(0)).unwrap();
    st.page_batch(0, 4, 100).unwrap();
    // Declared fewer pages than already arrived.
    assert!(matches!(
        st.clone().accept(&pass_end(0, 1, 3, 100)),
        Err(WireError::Invalid(_))
    ));
    // Declared two batches; the second brings the wrong byte count.
    st.accept(&pass_end(0, 2, 8, 200)).unwrap();
    assert!(matches!(
        st.clone().page_batch(0, 4, 99),
        Err(WireError::Invalid(_))
    ));
    st.page_batch(0, 4, 100).unwrap();
    assert!(st.pass_complete(0));
}

#[test]
fn switchover_must_match_the_handshake() {
    let mut st = ready_state();
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    let mut img = sample_image();
    img.tasks[0].pid = 4243;
    img.tasks[0].threads.swap(0, 1);
    assert!(matches!(
        st.clone().accept(&ControlMsg::Switchover {
            image: Box::new(img)
        }),
        Err(WireError::Invalid(_))
    ));
    let mut img = sample_image();
    img.host.xfeatures = 7;
    assert!(matches!(
        st.clone().accept(&ControlMsg::Switchover {
            image: Box::new(img)
        }),
        Err(WireError::Invalid(_))
    ));
}

/// xorshift64*, enough for mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_mutations_never_panic() {
    let mut samples: Vec<Vec<u8>> = every_message()
        .iter()
        .map(|m| encode_control(m).unwrap())
        .collect();
    let b = batch(&[(0x40_0000, 2, false), (0x60_0000, 3, true)]);
    samples.push(encode_page_frame(0, PageSpace::Task(4242), &encode_batch(&b, 1)).unwrap());
    samples.push(encode_page_frame(1, PageSpace::Task(4242), &encode_batch(&b, 0)).unwrap());
    let lb = batch(&[(0x60_0000, 2, false), (0x61_0000, 3, true)]);
    samples.push(encode_lazy_frame(LazyOrigin::Requested, &encode_batch(&lb, 1)).unwrap());
    samples.push(encode_lazy_frame(LazyOrigin::Pushed, &encode_batch(&lb, 0)).unwrap());
    let owed = owed();
    let vmas = sample_image().tasks[0].vmas.clone();
    let mut dec = page_decoder();
    let mut out = PageBatch::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut refused = 0;
    for i in 0..500 {
        let mut bytes = samples[i % samples.len()].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes.truncate(at.max(1)),
                _ => bytes.insert(at, rng.next() as u8),
            }
        }
        // Half the time, make the checksum right so decoding is reached.
        if i % 2 == 0 {
            fix_checksum(&mut bytes);
        }
        let ctl = read_control(&mut &bytes[..]);
        let pages = read_stream_frame(&mut &bytes[..]).and_then(|f| match f {
            StreamFrame::Pages(pf) => pf.decode_batch(&mut dec, &vmas, &mut out),
            StreamFrame::Lazy(lf) => lf.decode_batch(&mut dec, &owed, &mut out),
        });
        if ctl.is_err() && pages.is_err() {
            refused += 1;
        }
        // Whatever decoded must be valid and feedable to the state machine.
        if let Ok(m) = ctl {
            m.validate().unwrap();
            let _ = DestState::new().accept(&m);
            let _ = ready_state().accept(&m);
        }
    }
    assert!(refused > 250, "most mutations are caught ({refused})");
}

// ---- lazy pages (minor 1) ----

#[test]
fn lazy_versions() {
    assert_eq!(WIRE_MINOR, 2);
    assert_eq!(LAZY_MINOR, 1);
    const { assert!(WIRE_MINOR >= LAZY_MINOR) };
    let old = ProtocolVersion {
        major: WIRE_MAJOR,
        minor: 0,
    };
    assert!(ProtocolVersion::CURRENT.negotiate(old).unwrap().minor < LAZY_MINOR);
}

#[test]
fn page_span_helpers() {
    let s = span(0x60_0000, 4);
    assert_eq!(s.end(), Some(0x60_4000));
    assert!(s.contains(0x60_0000, 4 * PAGE_SIZE));
    assert!(s.contains(0x60_3000, PAGE_SIZE));
    assert!(!s.contains(0x60_3000, 2 * PAGE_SIZE));
    assert!(!s.contains(0x5f_f000, PAGE_SIZE));
    assert!(!s.contains(0x60_4000, PAGE_SIZE));
    assert!(!s.contains(u64::MAX, 2));
    assert_eq!(span(!0xfff, 1).end(), None);
    assert_eq!(span(0, u64::MAX).end(), None);
    assert!(!span(0, u64::MAX).contains(0, 1));
    assert_eq!(LazyOrigin::from_u32(0), Some(LazyOrigin::Pushed));
    assert_eq!(LazyOrigin::from_u32(1), Some(LazyOrigin::Requested));
    assert_eq!(LazyOrigin::from_u32(2), None);
    assert_eq!(LazyOrigin::Requested as u32, 1);
}

#[test]
fn lazy_messages_round_trip() {
    for msg in [
        lazy_plan(),
        ControlMsg::LazyPlan { owed: vec![] },
        page_request(),
        ControlMsg::PageRequest {
            addr: 0x7fff_ffff_f000,
            pages: MAX_REQUEST_PAGES,
        },
        lazy_complete(),
        ControlMsg::LazyComplete {
            stats: LazyStats {
                faults: u64::MAX,
                pages_requested: u64::MAX,
                pages_pushed: u64::MAX,
                max_fault_wait_us: u64::MAX,
                last_page_us: u64::MAX,
            },
        },
    ] {
        let bytes = encode_control(&msg).unwrap();
        assert_eq!(bytes[3], msg.kind() as u8);
        assert!(bytes.len() - HEADER_LEN <= msg.kind().max_payload() as usize);
        assert_eq!(decode_bytes(&bytes).unwrap(), msg);
        assert_eq!(read_control(&mut &bytes[..]).unwrap(), msg);
    }
    // The payload is the fields in declaration order, nothing else.
    let ControlMsg::LazyPlan { owed: o } = lazy_plan() else {
        unreachable!()
    };
    assert_eq!(
        lazy_plan().payload().unwrap(),
        postcard::to_stdvec(&o).unwrap()
    );
    assert_eq!(
        page_request().payload().unwrap(),
        postcard::to_stdvec(&(0x61_1000u64, 16u32)).unwrap()
    );
    // A PageRequest or LazyComplete too long for its kind is refused from
    // the header.
    for (kind, max) in [(MsgKind::PageRequest, 32), (MsgKind::LazyComplete, 64)] {
        assert_eq!(kind.max_payload(), max);
        let mut r = Endless {
            header: header_with_len(kind, max + 1),
            pos: 0,
        };
        assert!(matches!(
            read_frame(&mut r, MAX_CONTROL_FRAME),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(r.pos, HEADER_LEN as u64);
    }
}

fn refused(m: ControlMsg) -> String {
    let e = encode_control(&m).expect_err("the sender refuses it too");
    let bytes = encode_frame(m.kind(), &m.payload().unwrap()).unwrap();
    let d = decode_bytes(&bytes).expect_err("receiver refuses");
    assert_eq!(e.to_string(), d.to_string());
    assert!(matches!(d, WireError::Invalid(_)), "{d}");
    d.to_string()
}

#[test]
fn lazy_plan_rules() {
    let plan = |owed: Vec<PageSpan>| ControlMsg::LazyPlan { owed };
    let e = refused(plan(vec![span(0x60_0000, 1), span(0x60_0800, 1)]));
    assert!(e.contains("span #1") && e.contains("page aligned"), "{e}");
    let e = refused(plan(vec![span(0x60_0000, 0)]));
    assert!(e.contains("no pages"), "{e}");
    let e = refused(plan(vec![span(0x60_4000, 1), span(0x60_0000, 1)]));
    assert!(e.contains("sorted"), "unsorted: {e}");
    let e = refused(plan(vec![span(0x60_0000, 4), span(0x60_3000, 1)]));
    assert!(e.contains("overlap"), "overlapping: {e}");
    let e = refused(plan(vec![span(0x60_0000, 1), span(0x60_0000, 1)]));
    assert!(e.contains("span #1"), "duplicate: {e}");
    let e = refused(plan(vec![span(0xffff_ffff_ffff_f000, 2)]));
    assert!(e.contains("end of the address space"), "{e}");
    refused(plan(vec![span(0x1000, u64::MAX / PAGE_SIZE)]));
    // Touching spans are fine.
    plan(vec![span(0x60_0000, 1), span(0x60_1000, 1)])
        .validate()
        .unwrap();
    // Too many spans (checked on the count, before looking at them).
    let many = plan(vec![span(0x60_0000, 1); MAX_LAZY_SPANS + 1]);
    match many.validate() {
        Err(WireError::Invalid(e)) => assert!(e.contains("spans, at most"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(encode_control(&many).is_err());
}

#[test]
fn page_request_rules() {
    let req = |addr, pages| ControlMsg::PageRequest { addr, pages };
    let e = refused(req(0x60_0000, 0));
    assert!(e.contains("0 pages"), "{e}");
    let e = refused(req(0x60_0000, MAX_REQUEST_PAGES + 1));
    assert!(e.contains("513 pages"), "{e}");
    let e = refused(req(0x60_0010, 1));
    assert!(e.contains("page aligned"), "{e}");
    let e = refused(req(0xffff_ffff_ffff_f000, 2));
    assert!(e.contains("end of the address space"), "{e}");
    req(0x60_0000, 1).validate().unwrap();
    req(0xffff_ffff_fffe_0000, MAX_REQUEST_PAGES)
        .validate()
        .unwrap_err();
    req(0xffff_ffff_fffe_0000, 0x1f).validate().unwrap();
}

#[test]
fn spans_must_lie_in_anonymous_vmas() {
    let vmas = sample_image().tasks[0].vmas.clone(); // file 0x400000-0x405000, anon heap 0x600000-0x621000, vdso
    check_spans_in_anonymous(&owed(), &vmas).unwrap();
    check_spans_in_anonymous(&[span(0x60_0000, 0x21)], &vmas).unwrap();
    check_spans_in_anonymous(&[], &vmas).unwrap();
    let cases = [
        (span(0x40_0000, 1), "private mapping of"), // file mapping
        (span(0x5f_f000, 2), "not inside a declared VMA"), // starts before the heap
        (
            span(0x62_0000, 2),
            "runs past the end of VMA 0x600000-0x621000",
        ),
        (span(0x62_1000, 1), "not inside a declared VMA"), // just past the heap
        (span(0x10_0000, 1), "not inside a declared VMA"),
        (span(0x7fff_f7fc_0000, 1), "special area"),
        (span(0x60_0000, u64::MAX), "end of the address space"),
    ];
    for (s, what) in cases {
        match check_spans_in_anonymous(&[span(0x60_0000, 1), s], &vmas) {
            Err(WireError::Invalid(e)) => {
                assert!(e.contains("span #1") && e.contains(what), "{s:x?}: {e}")
            }
            other => panic!("{s:x?}: {other:?}"),
        }
    }
    // Adjacent anonymous VMAs: a span must not cross the boundary.
    let mut two = vmas[1..2].to_vec();
    let mut next = two[0].clone();
    next.start = two[0].end;
    next.end = next.start + 0x1000;
    two.push(next);
    check_spans_in_anonymous(&[span(0x62_0000, 1), span(0x62_1000, 1)], &two).unwrap();
    assert!(check_spans_in_anonymous(&[span(0x62_0000, 2)], &two).is_err());
    // A shared file mapping is refused too.
    let mut shared = vmas.clone();
    let VmaKind::File(m) = shared[0].kind.clone() else {
        unreachable!()
    };
    shared[0].kind = VmaKind::SharedFile(m);
    let e = check_spans_in_anonymous(&[span(0x40_0000, 1)], &shared).unwrap_err();
    assert!(e.to_string().contains("shared mapping"), "{e}");
    assert!(check_spans_in_anonymous(&[span(0x60_0000, 1)], &[]).is_err());
}

#[test]
fn lazy_frames_round_trip_and_stay_inside_the_owed_spans() {
    let owed = owed(); // 0x600000+4, 0x604000+2, 0x610000+0x11
    let b = batch(&[
        (0x60_0000, 4, false),
        (0x60_4000, 2, true),
        (0x61_0000, 0x11, false),
    ]);
    let enc = encode_batch(&b, 1);
    for origin in [LazyOrigin::Pushed, LazyOrigin::Requested] {
        let frame = encode_lazy_frame(origin, &enc).unwrap();
        assert_eq!(frame[3], MsgKind::LazyPages as u8);
        assert_eq!(
            &frame[HEADER_LEN..HEADER_LEN + 4],
            &(origin as u32).to_le_bytes()
        );
        let sf = read_stream_frame(&mut &frame[..]).unwrap();
        let StreamFrame::Lazy(lf) = sf else {
            panic!("{sf:?}")
        };
        assert_eq!(lf.origin, origin);
        assert_eq!(lf.batch, enc);
        assert_eq!(lf.encode().unwrap(), frame);
        let mut out = PageBatch::default();
        lf.decode_batch(&mut page_decoder(), &owed, &mut out)
            .unwrap();
        assert_eq!(out, b);
    }
    check_runs_owed(&b, &owed).unwrap();
    assert_eq!(
        find_owed_span(&owed, 0x61_1000, 16 * PAGE_SIZE),
        Some(&owed[2])
    );
    assert_eq!(find_owed_span(&owed, 0x60_3000, 2 * PAGE_SIZE), None);
    assert_eq!(find_owed_span(&[], 0x60_0000, PAGE_SIZE), None);

    let outside = [
        (0x60_3000, 2, false), // crosses from one touching span into the next
        (0x60_6000, 1, true),  // the gap after the second span
        (0x5f_f000, 1, false), // before the first span
        (0x62_0000, 2, true),  // off the last span's end
        (0x62_1000, 1, false), // after everything
        (0x40_0000, 1, false), // a VMA that owes nothing
    ];
    let mut dec = page_decoder();
    let mut out = PageBatch::default();
    for run in outside {
        let bad = batch(&[(0x60_0000, 1, false), run]);
        match check_runs_owed(&bad, &owed) {
            Err(WireError::Invalid(e)) => assert!(e.contains("run #1"), "{e}"),
            other => panic!("{run:x?}: {other:?}"),
        }
        let lf = LazyFrame {
            origin: LazyOrigin::Pushed,
            batch: encode_batch(&bad, 1),
        };
        assert!(matches!(
            lf.decode_batch(&mut dec, &owed, &mut out),
            Err(WireError::Invalid(_))
        ));
        assert!(out.runs.is_empty(), "nothing handed out on error");
    }
    // No plan: nothing fits.
    assert!(check_runs_owed(&b, &[]).is_err());
}

#[test]
fn lazy_frame_rejections() {
    let enc = encode_batch(&batch(&[(0x60_0000, 1, false)]), 1);
    // A corrupt batch goes to the batch codec.
    let mut bad = enc.clone();
    bad[0] = b'X';
    let lf = LazyFrame::from_frame(
        read_frame(
            &mut &encode_lazy_frame(LazyOrigin::Pushed, &bad).unwrap()[..],
            MAX_PAGE_FRAME,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(matches!(
        lf.decode_batch(&mut page_decoder(), &owed(), &mut PageBatch::default()),
        Err(WireError::Batch(_))
    ));
    // Unknown origin, no origin.
    let mut payload = 2u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&enc);
    let f = encode_frame(MsgKind::LazyPages, &payload).unwrap();
    match read_stream_frame(&mut &f[..]) {
        Err(WireError::Invalid(e)) => assert!(e.contains("unknown origin 2"), "{e}"),
        other => panic!("{other:?}"),
    }
    let f = encode_frame(MsgKind::LazyPages, &[1, 0]).unwrap();
    assert!(matches!(
        read_stream_frame(&mut &f[..]),
        Err(WireError::Invalid(_))
    ));
    // Wrong streams: a lazy frame is neither a control frame nor a Pages
    // frame, and control frames are not stream frames.
    let f = encode_lazy_frame(LazyOrigin::Requested, &enc).unwrap();
    assert!(matches!(
        read_control(&mut &f[..]),
        Err(WireError::WrongStream {
            kind: MsgKind::LazyPages
        })
    ));
    assert!(matches!(
        read_page_frame(&mut &f[..]),
        Err(WireError::WrongStream {
            kind: MsgKind::LazyPages
        })
    ));
    let (frame, _) = decode_frame(&f, MAX_PAGE_FRAME).unwrap();
    assert!(matches!(
        PageFrame::from_frame(frame),
        Err(WireError::WrongStream { .. })
    ));
    let pf = encode_page_frame(0, PageSpace::Task(4242), &enc).unwrap();
    let (frame, _) = decode_frame(&pf, MAX_PAGE_FRAME).unwrap();
    assert!(matches!(
        LazyFrame::from_frame(frame.clone()),
        Err(WireError::WrongStream {
            kind: MsgKind::Pages
        })
    ));
    assert!(matches!(
        StreamFrame::from_frame(frame),
        Ok(StreamFrame::Pages(PageFrame { pass: 0, .. }))
    ));
    for m in [lazy_plan(), ControlMsg::Done] {
        let f = encode_control(&m).unwrap();
        assert!(matches!(
            read_stream_frame(&mut &f[..]),
            Err(WireError::WrongStream { kind }) if kind == m.kind()
        ));
    }
    // Larger than a page frame may be.
    let big = vec![0u8; MAX_PAGE_FRAME as usize];
    assert!(matches!(
        encode_lazy_frame(LazyOrigin::Pushed, &big),
        Err(WireError::TooLarge {
            kind: MsgKind::LazyPages,
            ..
        })
    ));
}

fn hello_minor(minor: u16) -> ControlMsg {
    ControlMsg::Hello {
        version: ProtocolVersion {
            major: WIRE_MAJOR,
            minor,
        },
        host: host(),
        agent: "ferry test".into(),
    }
}

/// A destination state after the handshake with a source of `minor`.
fn ready_state_minor(minor: u16) -> DestState {
    let mut st = DestState::new();
    st.accept(&hello_minor(minor)).unwrap();
    st.sent(&ack()).unwrap();
    st.accept(&prepare()).unwrap();
    st.sent(&ControlMsg::Ready).unwrap();
    st
}

/// A lazy destination after the plan: one complete pass, LazyPlan accepted.
fn lazy_precopy() -> DestState {
    let mut st = ready_state_minor(1);
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    st.accept(&lazy_plan()).unwrap();
    st
}

#[test]
fn a_whole_lazy_migration_is_legal() {
    let mut st = ready_state_minor(1);
    assert_eq!(st.version().unwrap().minor, 1);
    assert!(!st.is_lazy());
    st.accept(&pass_start(0)).unwrap();
    assert_eq!(st.page_batch(0, 2, 100).unwrap(), PageAdmit::Accept);
    st.accept(&pass_end(0, 2, 4, 300)).unwrap();
    assert!(unexpected(st.lazy_frame()), "no lazy frames before Running");
    st.accept(&lazy_plan()).unwrap();
    assert!(st.is_lazy());
    assert_eq!(st.phase(), Phase::PreCopy);
    // Pre-copy batches of the last pass may still arrive.
    assert_eq!(st.page_batch(0, 2, 200).unwrap(), PageAdmit::Accept);
    st.accept(&switchover()).unwrap();
    assert_eq!(st.phase(), Phase::Restoring);
    assert!(unexpected(st.lazy_frame()));
    assert!(
        unexpected(st.clone().sent(&page_request())),
        "PageRequest before Running"
    );
    st.sent(&running()).unwrap();
    assert_eq!(st.phase(), Phase::Lazy);
    st.lazy_frame().unwrap();
    st.sent(&page_request()).unwrap();
    assert_eq!(st.phase(), Phase::Lazy);
    st.sent(&page_request()).unwrap();
    st.lazy_frame().unwrap();
    assert!(
        unexpected(st.clone().accept(&ControlMsg::Done)),
        "Done before LazyComplete"
    );
    assert!(unexpected(st.clone().page_batch(0, 1, 1).map(|_| ())));
    st.sent(&lazy_complete()).unwrap();
    assert_eq!(st.phase(), Phase::Running);
    st.lazy_frame().unwrap(); // late duplicates
    assert!(unexpected(st.clone().sent(&page_request())));
    assert!(unexpected(st.clone().sent(&lazy_complete())));
    st.accept(&ControlMsg::Done).unwrap();
    assert_eq!(st.phase(), Phase::Closed);
    assert!(unexpected(st.lazy_frame()));
}

#[test]
fn lazy_plan_is_legal_only_once_between_passes_with_minor_1() {
    // Minor 0 negotiated: refused, naming the version.
    let mut st = ready_state_minor(0);
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    match st.clone().accept(&lazy_plan()) {
        Err(WireError::Invalid(e)) => assert!(e.contains("minor version 1"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A newer source negotiates down to this build's minor, which has it.
    let mut st = ready_state_minor(WIRE_MINOR + 3);
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    st.accept(&lazy_plan()).unwrap();

    // Before any pass.
    let st = ready_state_minor(1);
    assert!(matches!(
        st.clone().accept(&lazy_plan()),
        Err(WireError::Invalid(_))
    ));
    // Inside a pass.
    let mut st = ready_state_minor(1);
    st.accept(&pass_start(0)).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_plan())));
    // Before the handshake is done.
    let mut st = DestState::new();
    st.accept(&hello_minor(1)).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_plan())));
    // Twice.
    let st = lazy_precopy();
    assert!(
        unexpected(st.clone().accept(&lazy_plan())),
        "LazyPlan twice"
    );
    // No pass after it, and no frame of a pass that can no longer start.
    assert!(unexpected(st.clone().accept(&pass_start(1))));
    assert!(matches!(
        st.clone().page_batch(1, 1, 1),
        Err(WireError::Invalid(_))
    ));
    // After Switchover.
    let mut st = ready_state_minor(1);
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    st.accept(&switchover()).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_plan())));
    // Only the source sends it; only the destination sends the others.
    assert!(unexpected(lazy_precopy().sent(&lazy_plan())));
    let mut st = lazy_precopy();
    st.accept(&switchover()).unwrap();
    st.sent(&running()).unwrap();
    assert!(unexpected(st.clone().accept(&page_request())));
    assert!(unexpected(st.clone().accept(&lazy_complete())));
}

#[test]
fn lazy_requests_and_frames_only_in_the_lazy_phase() {
    // A pre-copy migration never sends PageRequest or LazyComplete, and
    // takes no lazy frames.
    let mut st = ready_state();
    assert!(unexpected(st.clone().sent(&page_request())));
    assert!(unexpected(st.lazy_frame()));
    st.accept(&pass_start(0)).unwrap();
    assert!(unexpected(st.clone().sent(&page_request())));
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    assert!(unexpected(st.clone().sent(&lazy_complete())));
    st.accept(&switchover()).unwrap();
    assert!(unexpected(st.clone().sent(&page_request())));
    st.sent(&running()).unwrap();
    assert_eq!(st.phase(), Phase::Running, "not lazy");
    assert!(!st.is_lazy());
    assert!(unexpected(st.clone().sent(&page_request())));
    assert!(unexpected(st.clone().sent(&lazy_complete())));
    assert!(
        matches!(
            st.lazy_frame(),
            Err(WireError::UnexpectedMessage {
                state: Phase::Running,
                got: MsgKind::LazyPages
            })
        ),
        "no lazy frames in a pre-copy migration"
    );
    // A lazy destination in PreCopy or Restoring sends no PageRequest.
    let mut st = lazy_precopy();
    assert!(unexpected(st.clone().sent(&page_request())));
    assert!(unexpected(st.clone().sent(&lazy_complete())));
    assert!(unexpected(st.lazy_frame()));
    st.accept(&switchover()).unwrap();
    assert!(unexpected(st.clone().sent(&page_request())));
    // Running still waits for every pre-copy batch.
    let mut st = ready_state_minor(1);
    st.accept(&pass_start(0)).unwrap();
    st.accept(&pass_end(0, 1, 1, 100)).unwrap();
    st.accept(&lazy_plan()).unwrap();
    st.accept(&switchover()).unwrap();
    assert!(matches!(
        st.clone().sent(&running()),
        Err(WireError::Invalid(_))
    ));
    st.page_batch(0, 1, 100).unwrap();
    st.sent(&running()).unwrap();
    assert_eq!(st.phase(), Phase::Lazy);
}

#[test]
fn either_side_may_abort_the_lazy_phase() {
    let mut st = lazy_precopy();
    st.accept(&switchover()).unwrap();
    st.sent(&running()).unwrap();
    assert_eq!(st.phase(), Phase::Lazy);
    let abort = ControlMsg::Abort {
        reason: "source lost".into(),
    };
    let mut recv = st.clone();
    recv.accept(&abort).unwrap();
    assert_eq!(recv.phase(), Phase::Closed);
    assert!(unexpected(recv.lazy_frame()));
    let mut send = st.clone();
    send.sent(&abort).unwrap();
    assert_eq!(send.phase(), Phase::Closed);
    // Failed is for the restore, not the lazy phase.
    assert!(unexpected(
        st.clone().sent(&ControlMsg::Failed { reason: "x".into() })
    ));
    // After LazyComplete, Running rules apply: no more Abort.
    st.sent(&lazy_complete()).unwrap();
    assert!(unexpected(st.clone().accept(&abort)));
    assert!(unexpected(st.sent(&abort)));
}

// ---- resuming the lazy phase on a new connection ----

/// A destination state of a new connection after Hello/HelloAck.
fn greeted_minor(minor: u16) -> DestState {
    let mut st = DestState::new();
    st.accept(&hello_minor(minor)).unwrap();
    st.sent(&ack()).unwrap();
    st
}

#[test]
fn resume_messages_round_trip() {
    for msg in [
        lazy_resume(),
        ControlMsg::LazyResume { pid: PID_MAX_LIMIT },
        lazy_resumed(),
        ControlMsg::LazyResumed { owed: vec![] },
        ControlMsg::LazyResumed { owed: owed() },
    ] {
        let bytes = encode_control(&msg).unwrap();
        assert_eq!(bytes[3], msg.kind() as u8);
        assert!(bytes.len() - HEADER_LEN <= msg.kind().max_payload() as usize);
        assert_eq!(decode_bytes(&bytes).unwrap(), msg);
        assert_eq!(read_control(&mut &bytes[..]).unwrap(), msg);
    }
    // The payload is the fields in declaration order, nothing else.
    assert_eq!(
        lazy_resume().payload().unwrap(),
        postcard::to_stdvec(&4242i32).unwrap()
    );
    assert_eq!(
        lazy_resumed().payload().unwrap(),
        postcard::to_stdvec(&vec![span(0x60_1000, 3), span(0x61_0000, 2)]).unwrap()
    );
    // A LazyResume too long for its kind is refused from the header.
    assert_eq!(MsgKind::LazyResume.max_payload(), 16);
    let mut r = Endless {
        header: header_with_len(MsgKind::LazyResume, 17),
        pos: 0,
    };
    assert!(matches!(
        read_frame(&mut r, MAX_CONTROL_FRAME),
        Err(WireError::TooLarge { .. })
    ));
    assert_eq!(r.pos, HEADER_LEN as u64);
    assert_eq!(MsgKind::LazyResumed.max_payload(), MAX_CONTROL_FRAME);
}

#[test]
fn resume_rules() {
    for pid in [0, -1, PID_MAX_LIMIT + 1, i32::MIN] {
        let e = refused(ControlMsg::LazyResume { pid });
        assert!(e.contains("LazyResume: pid"), "{e}");
    }
    let resumed = |owed: Vec<PageSpan>| ControlMsg::LazyResumed { owed };
    let e = refused(resumed(vec![span(0x60_0800, 1)]));
    assert!(
        e.contains("LazyResumed: span #0") && e.contains("page aligned"),
        "{e}"
    );
    let e = refused(resumed(vec![span(0x60_0000, 0)]));
    assert!(e.contains("LazyResumed") && e.contains("no pages"), "{e}");
    let e = refused(resumed(vec![span(0x60_4000, 1), span(0x60_0000, 1)]));
    assert!(e.contains("LazyResumed") && e.contains("sorted"), "{e}");
    let e = refused(resumed(vec![span(0x60_0000, 4), span(0x60_3000, 1)]));
    assert!(e.contains("overlap"), "{e}");
    let e = refused(resumed(vec![span(!0xfff, 2)]));
    assert!(e.contains("end of the address space"), "{e}");
    // Touching spans are fine.
    encode_control(&resumed(vec![span(0x60_0000, 4), span(0x60_4000, 1)])).unwrap();
}

#[test]
fn a_resumed_lazy_phase_is_legal() {
    let mut st = greeted_minor(1);
    st.accept(&lazy_resume()).unwrap();
    assert_eq!(st.phase(), Phase::Resuming);
    assert_eq!(st.pid(), Some(4242));
    assert!(st.is_lazy());
    // Nothing else may come or go before the answer.
    assert!(unexpected(st.clone().accept(&pass_start(0))));
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    assert!(unexpected(st.clone().accept(&ControlMsg::Done)));
    assert!(unexpected(st.clone().sent(&page_request())));
    assert!(unexpected(st.clone().sent(&lazy_complete())));
    assert!(unexpected(st.clone().sent(&ControlMsg::Ready)));
    assert!(unexpected(st.clone().sent(&running())));
    assert!(unexpected(st.lazy_frame()));
    // Refused: closed.
    let mut r = st.clone();
    r.sent(&ControlMsg::Refuse {
        code: RefuseCode::Other,
        reason: "no lazy migration of PID 4242 is going on here".into(),
    })
    .unwrap();
    assert_eq!(r.phase(), Phase::Closed);
    // Accepted: the lazy phase, exactly as after Running.
    st.sent(&lazy_resumed()).unwrap();
    assert_eq!(st.phase(), Phase::Lazy);
    st.lazy_frame().unwrap();
    st.sent(&page_request()).unwrap();
    assert!(unexpected(st.clone().sent(&lazy_resumed())), "twice");
    assert!(unexpected(st.clone().accept(&lazy_resume())), "twice");
    assert!(unexpected(st.clone().accept(&ControlMsg::Done)));
    let mut a = st.clone();
    a.accept(&ControlMsg::Abort {
        reason: "source lost".into(),
    })
    .unwrap();
    assert_eq!(a.phase(), Phase::Closed);
    st.sent(&lazy_complete()).unwrap();
    assert_eq!(st.phase(), Phase::Running);
    st.lazy_frame().unwrap(); // late duplicates
    st.accept(&ControlMsg::Done).unwrap();
    assert_eq!(st.phase(), Phase::Closed);
}

#[test]
fn resume_is_legal_only_instead_of_prepare_with_minor_1() {
    // Before HelloAck, or first of all.
    let mut st = DestState::new();
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    st.accept(&hello_minor(1)).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    // Minor 0 negotiated: refused, naming the version.
    match greeted_minor(0).accept(&lazy_resume()) {
        Err(WireError::Invalid(e)) => assert!(e.contains("minor version 1"), "{e}"),
        other => panic!("{other:?}"),
    }
    // After Prepare, in pre-copy, in the lazy phase of the same connection.
    let mut st = ready_state_minor(1);
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    st.accept(&pass_start(0)).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    let mut st = lazy_precopy();
    st.accept(&switchover()).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    st.sent(&running()).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_resume())));
    assert!(
        unexpected(st.clone().sent(&lazy_resumed())),
        "LazyResumed without LazyResume"
    );
    // Only the source sends LazyResume, only the destination LazyResumed.
    let mut st = greeted_minor(1);
    assert!(unexpected(st.clone().sent(&lazy_resume())));
    assert!(unexpected(st.clone().accept(&lazy_resumed())));
    st.accept(&lazy_resume()).unwrap();
    assert!(unexpected(st.clone().accept(&lazy_resumed())));
    // The source may give up while resuming.
    st.accept(&ControlMsg::Abort { reason: "x".into() })
        .unwrap();
    assert_eq!(st.phase(), Phase::Closed);
}

#[test]
fn page_spaces_encode_and_decode() {
    for space in [
        PageSpace::Task(1),
        PageSpace::Task(4242),
        PageSpace::Shmem(0),
        PageSpace::Shmem(77),
    ] {
        assert_eq!(decode_space(encode_space(space)).unwrap(), space);
    }
    assert!(decode_space(0).is_err(), "PID 0");
    assert!(
        decode_space(PID_MAX_LIMIT as u32 + 1).is_err(),
        "PID above the limit"
    );
    // A shared memory object's pages lie within its size.
    let mut layout = sample_image().layout();
    layout.shmem.push(crate::model::ShmemObject {
        id: 3,
        size: 0x3000,
        kind: crate::model::ShmemKind::Anonymous,
    });
    let areas = space_areas(&layout, PageSpace::Shmem(3)).unwrap();
    check_runs_within(&batch(&[(0x2000, 1, false)]), &areas).unwrap();
    assert!(check_runs_within(&batch(&[(0x2000, 2, false)]), &areas).is_err());
    assert!(space_areas(&layout, PageSpace::Shmem(4)).is_none());
    assert!(space_areas(&layout, PageSpace::Task(9)).is_none());
}

#[test]
fn pass_start_layout_is_validated_as_a_tree() {
    let mut l = sample_image().layout();
    let mut child = l.tasks[0].clone();
    child.id.pid = 5000;
    child.id.ppid = 9999;
    l.tasks.push(child);
    let msg = ControlMsg::PassStart {
        pass: 0,
        layout: Box::new(l),
    };
    let e = msg.validate().unwrap_err().to_string();
    assert!(e.contains("5000") && e.contains("9999"), "{e}");
}

// ---- the address moves with the process (minor 2) ----

#[test]
fn net_move_is_validated() {
    let one = |addr: &str, prefix_len| ControlMsg::NetMove {
        addrs: vec![MovedAddr {
            addr: addr.parse().unwrap(),
            prefix_len,
        }],
    };
    assert!(net_move().validate().is_ok());
    assert!(ControlMsg::NetMove { addrs: vec![] }.validate().is_ok());
    for (bad, plen, why) in [
        ("0.0.0.0", 24, "unspecified"),
        ("127.0.0.1", 8, "loopback"),
        ("::1", 128, "loopback"),
        ("224.0.0.1", 24, "multicast"),
        ("fe80::1", 64, "link-local"),
        ("::ffff:198.18.0.1", 96, "IPv4-mapped"),
        ("198.18.0.100", 33, "prefix length"),
        ("198.18.0.100", 0, "prefix length"),
        ("2001:2::1", 129, "prefix length"),
    ] {
        let e = one(bad, plen).validate().unwrap_err().to_string();
        assert!(e.contains(why), "{bad}/{plen}: {e}");
    }
    let twice = ControlMsg::NetMove {
        addrs: vec![
            MovedAddr {
                addr: "198.18.0.100".parse().unwrap(),
                prefix_len: 24,
            };
            2
        ],
    };
    assert!(twice.validate().unwrap_err().to_string().contains("twice"));
    let many = ControlMsg::NetMove {
        addrs: (0..=MAX_MOVED_ADDRS as u8)
            .map(|i| MovedAddr {
                addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 1, i + 1)),
                prefix_len: 24,
            })
            .collect(),
    };
    assert!(many.validate().is_err());
    // Decoding validates too.
    let mut bytes = encode_control(&one("198.18.0.100", 24)).unwrap();
    let n = bytes.len();
    bytes[n - 1] = 40;
    fix_checksum(&mut bytes);
    assert!(decode_bytes(&bytes).is_err());
}

#[test]
fn net_move_only_between_passes_once_and_from_minor_2() {
    let mut st = ready_state_minor(NET_MINOR);
    // Not before a pass.
    assert!(st.clone().accept(&net_move()).is_err());
    st.accept(&pass_start(0)).unwrap();
    // Not inside a pass.
    assert!(st.clone().accept(&net_move()).is_err());
    st.accept(&pass_end(0, 0, 0, 0)).unwrap();
    st.accept(&net_move()).unwrap();
    assert_eq!(st.phase(), Phase::PreCopy);
    // Once.
    assert!(st.clone().accept(&net_move()).is_err());
    // A source of minor 1 may not send it.
    let mut old = ready_state_minor(LAZY_MINOR);
    old.accept(&pass_start(0)).unwrap();
    old.accept(&pass_end(0, 0, 0, 0)).unwrap();
    let e = old.accept(&net_move()).unwrap_err().to_string();
    assert!(e.contains("minor"), "{e}");
}
