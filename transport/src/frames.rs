//! Async framing of the wire protocol ([`ferry_protocol::wire`]) over any
//! async byte stream: quinn's `SendStream`/`RecvStream` in the agents, an
//! in-memory duplex in tests.
//!
//! A receiver reads the fixed 16-byte header, checks it with
//! [`FrameHeader::parse`] under the stream's bound (so a hostile length is
//! refused before anything is allocated), reads the payload, verifies its
//! checksum ([`Frame::from_parts`]) and decodes it. A sender validates what
//! it sends with the same rules ([`encode_control`]).

use ferry_protocol::wire::{
    decode_control, encode_control, encode_lazy_frame, encode_page_frame, ControlMsg, Frame,
    FrameHeader, LazyOrigin, PageFrame, StreamFrame, WireError, HEADER_LEN, MAX_CONTROL_FRAME,
    MAX_PAGE_FRAME,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Validates `msg` and writes it as one frame.
pub async fn send_control<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    msg: &ControlMsg,
) -> Result<(), WireError> {
    let frame = encode_control(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Writes one page frame of pass `pass` carrying `batch` (an encoded page
/// batch of `space`, as [`ferry_protocol::packer::PagePacker`] produces);
/// returns the bytes written.
pub async fn send_page<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    pass: u32,
    space: ferry_protocol::pages::PageSpace,
    batch: &[u8],
) -> Result<usize, WireError> {
    let frame = encode_page_frame(pass, space, batch)?;
    w.write_all(&frame).await?;
    Ok(frame.len())
}

/// Writes one lazy page frame (`LazyPages`, after `Running` in a lazy
/// migration) of origin `origin` carrying `batch` (an encoded page batch of
/// owed pages); returns the bytes written.
pub async fn send_lazy_page<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    origin: LazyOrigin,
    batch: &[u8],
) -> Result<usize, WireError> {
    let frame = encode_lazy_frame(origin, batch)?;
    w.write_all(&frame).await?;
    Ok(frame.len())
}

/// The payload buffer of [`recv_frame`] starts at most this large.
const PAYLOAD_CHUNK: usize = 64 << 10;

/// Reads one frame with payloads bounded by `max`; `None` if the stream
/// ended cleanly before the first header byte.
pub async fn recv_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: u32,
) -> Result<Option<Frame>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated {
                found: got as u64,
                expected: HEADER_LEN as u64,
            });
        }
        got += n;
    }
    // The length is bounded here, before any allocation.
    let header = FrameHeader::parse(&h, max)?;
    // The buffer grows as the payload arrives: a header that declares a
    // large payload costs nothing until the bytes are really there.
    let len = header.len as usize;
    let mut payload = Vec::with_capacity(len.min(PAYLOAD_CHUNK));
    let got = r
        .take(u64::from(header.len))
        .read_to_end(&mut payload)
        .await?;
    if got < len {
        return Err(WireError::Truncated {
            found: (HEADER_LEN + got) as u64,
            expected: (HEADER_LEN + len) as u64,
        });
    }
    Frame::from_parts(header, payload).map(Some)
}

/// Reads, checks, decodes and validates one control message. A stream that
/// ends between frames is [`WireError::EndOfStream`].
pub async fn recv_control<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<ControlMsg, WireError> {
    match recv_frame(r, MAX_CONTROL_FRAME).await? {
        Some(frame) => decode_control(&frame),
        None => Err(WireError::EndOfStream),
    }
}

/// Reads one page frame (its batch is checked later, against the pass's
/// layout: [`PageFrame::decode_batch`]); `None` at the clean end of the
/// stream.
pub async fn recv_page<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<PageFrame>, WireError> {
    match recv_frame(r, MAX_PAGE_FRAME).await? {
        Some(frame) => PageFrame::from_frame(frame).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame of a page stream, pre-copy (`Pages`) or lazy
/// (`LazyPages`) (its batch is checked later: [`PageFrame::decode_batch`]
/// against the pass's layout, [`ferry_protocol::wire::LazyFrame::decode_batch`]
/// against the owed spans); `None` at the clean end of the stream. A control
/// frame is [`WireError::WrongStream`].
pub async fn recv_stream_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<StreamFrame>, WireError> {
    match recv_frame(r, MAX_PAGE_FRAME).await? {
        Some(frame) => StreamFrame::from_frame(frame).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::pages::PageSpace;
    use ferry_protocol::wire::{LazyFrame, MsgKind, RefuseCode, WIRE_MAGIC, WIRE_MAJOR};

    #[tokio::test]
    async fn control_and_pages_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs = vec![
            ControlMsg::Ready,
            ControlMsg::Refuse {
                code: RefuseCode::PidTaken,
                reason: "PID 10 is in use".into(),
            },
            ControlMsg::PassEnd {
                pass: 0,
                batches: 1,
                pages: 3,
                bytes: 100,
            },
            ControlMsg::Done,
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                send_control(&mut a, m).await.unwrap();
            }
            send_page(&mut a, 2, PageSpace::Task(7), b"not really a batch")
                .await
                .unwrap();
        });
        for m in &msgs {
            assert_eq!(&recv_control(&mut b).await.unwrap(), m);
        }
        // A page frame on what is read as a control stream is refused.
        assert!(matches!(
            recv_control(&mut b).await,
            Err(WireError::WrongStream { .. })
        ));
        writer.await.unwrap();
        assert!(matches!(
            recv_control(&mut b).await,
            Err(WireError::EndOfStream)
        ));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        send_page(&mut a, 1, PageSpace::Shmem(3), b"batch bytes")
            .await
            .unwrap();
        drop(a);
        let f = recv_page(&mut b).await.unwrap().unwrap();
        assert_eq!(
            (f.pass, f.space, &f.batch[..]),
            (1, PageSpace::Shmem(3), &b"batch bytes"[..])
        );
        assert!(recv_page(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn lazy_and_page_frames_share_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let n = send_lazy_page(&mut a, LazyOrigin::Requested, b"requested")
                .await
                .unwrap();
            assert_eq!(n, HEADER_LEN + 4 + 9);
            send_lazy_page(&mut a, LazyOrigin::Pushed, b"pushed")
                .await
                .unwrap();
            send_page(&mut a, 3, PageSpace::Task(42), b"pre-copy")
                .await
                .unwrap();
            send_control(&mut a, &ControlMsg::Done).await.unwrap();
        });
        let f = recv_stream_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(
            f,
            StreamFrame::Lazy(LazyFrame {
                origin: LazyOrigin::Requested,
                batch: b"requested".to_vec(),
            })
        );
        let f = recv_stream_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(
            f,
            StreamFrame::Lazy(LazyFrame {
                origin: LazyOrigin::Pushed,
                batch: b"pushed".to_vec(),
            })
        );
        let f = recv_stream_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(
            f,
            StreamFrame::Pages(PageFrame {
                pass: 3,
                space: PageSpace::Task(42),
                batch: b"pre-copy".to_vec(),
            })
        );
        // A control frame on a page stream is refused.
        assert!(matches!(
            recv_stream_frame(&mut b).await,
            Err(WireError::WrongStream {
                kind: MsgKind::Done
            })
        ));
        writer.await.unwrap();
        assert!(recv_stream_frame(&mut b).await.unwrap().is_none());

        // recv_page keeps refusing lazy frames; control refuses them too.
        let mut f = Vec::new();
        send_lazy_page(&mut f, LazyOrigin::Pushed, b"x")
            .await
            .unwrap();
        assert!(matches!(
            recv_page(&mut &f[..]).await,
            Err(WireError::WrongStream {
                kind: MsgKind::LazyPages
            })
        ));
        assert!(matches!(
            recv_control(&mut &f[..]).await,
            Err(WireError::WrongStream {
                kind: MsgKind::LazyPages
            })
        ));
        let h = header(MsgKind::LazyPages as u8, MAX_PAGE_FRAME + 1);
        assert!(matches!(
            recv_stream_frame(&mut &h[..]).await,
            Err(WireError::TooLarge { .. })
        ));
    }

    fn header(kind: u8, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&WIRE_MAGIC.to_le_bytes());
        h.push(WIRE_MAJOR);
        h.push(kind);
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        h
    }

    #[tokio::test]
    async fn hostile_input_is_refused() {
        // A huge length is refused from the header alone.
        let h = header(MsgKind::Hello as u8, u32::MAX);
        assert!(matches!(
            recv_control(&mut &h[..]).await,
            Err(WireError::TooLarge { .. })
        ));
        let h = header(MsgKind::Pages as u8, MAX_PAGE_FRAME + 1);
        assert!(matches!(
            recv_page(&mut &h[..]).await,
            Err(WireError::TooLarge { .. })
        ));
        // Bad magic, unknown kind.
        let mut h = header(MsgKind::Done as u8, 0);
        h[0] ^= 1;
        assert!(matches!(
            recv_control(&mut &h[..]).await,
            Err(WireError::BadMagic(_))
        ));
        let h = header(200, 0);
        assert!(matches!(
            recv_control(&mut &h[..]).await,
            Err(WireError::UnknownKind(200))
        ));
        // Truncated header and payload.
        let h = header(MsgKind::Done as u8, 0);
        assert!(matches!(
            recv_control(&mut &h[..5]).await,
            Err(WireError::Truncated { .. })
        ));
        let mut frame = Vec::new();
        send_control(&mut frame, &ControlMsg::Failed { reason: "x".into() })
            .await
            .unwrap();
        assert!(matches!(
            recv_control(&mut &frame[..frame.len() - 1]).await,
            Err(WireError::Truncated { .. })
        ));
        // Corrupted payload.
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        assert!(matches!(
            recv_control(&mut &frame[..]).await,
            Err(WireError::Checksum { .. })
        ));
        // A message that would be refused is not sent.
        let mut out = Vec::new();
        let bad = ControlMsg::Failed {
            reason: "x".repeat(1 << 20),
        };
        assert!(send_control(&mut out, &bad).await.is_err());
        assert!(out.is_empty());
    }

    /// A header that declares a large payload followed by a few bytes is
    /// truncated, counting the bytes that came (found by the `frame` fuzz
    /// target: the payload buffer used to be allocated whole, from the
    /// header alone, before any of it arrived; the allocation itself is
    /// checked in ferry-fuzz-props' regression tests).
    #[tokio::test]
    async fn large_declared_payload_that_never_comes() {
        let mut bytes = header(MsgKind::Switchover as u8, 48 << 20);
        bytes.extend_from_slice(b"0123456789");
        match recv_frame(&mut &bytes[..], MAX_CONTROL_FRAME).await {
            Err(WireError::Truncated { found, expected }) => {
                assert_eq!(found, HEADER_LEN as u64 + 10);
                assert_eq!(expected, HEADER_LEN as u64 + (48 << 20));
            }
            other => panic!("{other:?}"),
        }
    }
}
