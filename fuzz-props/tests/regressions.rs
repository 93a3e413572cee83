//! What the fuzzers found, each with the input (minimized) that showed it,
//! under the counting allocator that made the allocation bounds visible.

use ferry_fuzz_props::alloc::{self, CountingAlloc};
use ferry_protocol::wire::{FrameHeader, MsgKind, MAX_CONTROL_FRAME};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn header(kind: MsgKind, len: u32) -> Vec<u8> {
    let mut h = FrameHeader::for_payload(kind, b"")
        .expect("header")
        .to_bytes();
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h.to_vec()
}

/// `frame`: the transport's `recv_frame` allocated the whole payload a
/// header declared (up to 64 MiB on the control stream) before a byte of it
/// had arrived; a peer could make it allocate that much per stream with 16
/// bytes. It now grows the buffer as the payload comes.
#[test]
fn recv_frame_allocates_only_what_arrives() {
    assert!(alloc::installed());
    let mut bytes = header(MsgKind::Switchover, 48 << 20);
    bytes.extend_from_slice(b"0123456789");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (r, peak) = alloc::measure(|| {
        rt.block_on(ferry_transport::frames::recv_frame(
            &mut &bytes[..],
            MAX_CONTROL_FRAME,
        ))
    });
    assert!(r.is_err());
    assert!(peak <= 128 << 10, "recv_frame allocated {peak} bytes");
    // And the property that caught it.
    ferry_fuzz_props::frame(&bytes);
}

/// `page_store`: the page store reader sized (and zero-filled) its buffer
/// for the whole batch body a batch header declared (up to 65 MiB with the
/// default limits) before reading it, so a 96-byte file cost 65 MiB. It now
/// reads the body as it comes.
#[test]
fn page_store_allocates_only_what_the_file_holds() {
    assert!(alloc::installed());
    let mut file = b"FERRYPGS".to_vec();
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    // A zstd batch of 65536 runs and 64 MiB of raw data, stored in 64 MiB.
    file.extend_from_slice(b"FPGB");
    for v in [1u32, 1 << 16, 0] {
        file.extend_from_slice(&v.to_le_bytes());
    }
    for v in [64u64 << 20, 64 << 20, 0] {
        file.extend_from_slice(&v.to_le_bytes());
    }
    file.extend_from_slice(&[0; 16]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(ferry_protocol::pages::PAGES_FILE), &file).expect("write");
    let (r, peak) = alloc::measure(|| {
        let mut reader = ferry_protocol::PageReader::open(dir.path())?;
        reader.next_batch()
    });
    assert!(
        matches!(r, Err(ferry_protocol::PageError::Truncated { .. })),
        "{r:?}"
    );
    assert!(
        peak <= 1 << 20,
        "the page store reader allocated {peak} bytes"
    );
    ferry_fuzz_props::page_store(&file);
}
