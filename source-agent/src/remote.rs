//! `migrate --to HOST[:PORT] PID`: migration to a dest-agent over the wire
//! protocol of [`ferry_protocol::wire`] (stop-and-copy: one pass, sent
//! after the freeze).
//!
//! connect (mutual TLS) → Hello → HelloAck → Prepare (facts from /proc,
//! nothing frozen) → Ready → on the ptrace thread: freeze and capture →
//! PassStart{0, vmas} → the ptrace thread dumps the pages into a
//! [`PagePacker`], whose encoded batches go round-robin over
//! [`PAGE_STREAMS`] unidirectional page streams → PassEnd → Switchover →
//! Running → kill the source copy → Done. Any failure before Running thaws
//! the process, which continues untouched.

use anyhow::{anyhow, bail, Context, Result};
use ferry_engine::dump::{Captured, PageSink};
use ferry_protocol::model::ProcessImage;
use ferry_protocol::packer::{PackStats, PagePacker};
use ferry_protocol::pages::PageWriterOptions;
use ferry_protocol::wire::{ControlMsg, FileFacts, ProtocolVersion};
use ferry_transport::frames::{recv_control, send_control, send_page};
use ferry_transport::{Identity, TrustStore, DEFAULT_PORT};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Unidirectional page streams used in parallel.
const PAGE_STREAMS: usize = 4;
/// Encoded batches queued between the ptrace thread and the network.
const BATCH_QUEUE: usize = 8;

/// How long to wait for the destination's answer to each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to restore once the image is sent.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// HOST, HOST:PORT, IP, IP:PORT or [IPv6]:PORT; the port defaults to 7420.
pub fn resolve(to: &str) -> Result<SocketAddr> {
    if let Ok(a) = to.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = to.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let (host, port) = match to.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| anyhow!("invalid port {p:?} in {to:?}"))?,
        ),
        None => (to, DEFAULT_PORT),
    };
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host:?}"))?
        .next()
        .ok_or_else(|| anyhow!("{host:?} has no address"))
}

/// What the report shows.
struct Report {
    pid: i32,
    to: SocketAddr,
    downtime: Duration,
    total: Duration,
    restore_ms: f64,
    bytes_on_wire: u64,
    pages: PackStats,
    /// Sum of the encoded page batches sent.
    batch_bytes: u64,
    batches: u64,
    /// Bytes of the serialized process image (Switchover).
    image_bytes: u64,
}

/// Run `migrate --to`; prints the report. Errors name the reason.
pub fn run(config_dir: &Path, to: &str, pid: i32, json: bool) -> Result<()> {
    let t0 = Instant::now();
    let addr = resolve(to)?;
    if pid <= 0 || !ferry_engine::procfs::exists(pid) {
        bail!("no process with PID {pid}");
    }
    let id = Identity::load_or_create(config_dir)?;
    let trust = TrustStore::load(config_dir)?;
    let progress = !json && std::io::stderr().is_terminal();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(migrate(id, trust, addr, pid, t0, progress))?;
    let raw_bytes = r.pages.pages * ferry_protocol::model::PAGE_SIZE;
    let ratio = if r.batch_bytes > 0 {
        raw_bytes as f64 / r.batch_bytes as f64
    } else {
        0.0
    };
    if json {
        let v = serde_json::json!({
            "pid": r.pid,
            "to": r.to.to_string(),
            "downtime_ms": r.downtime.as_secs_f64() * 1e3,
            "total_ms": r.total.as_secs_f64() * 1e3,
            "restore_ms": r.restore_ms,
            "bytes_on_wire": r.bytes_on_wire,
            "pages_sent": r.pages.pages,
            "zero_pages": r.pages.zero_pages,
            "raw_bytes": raw_bytes,
            "batches": r.batches,
            "batch_bytes": r.batch_bytes,
            "image_bytes": r.image_bytes,
            "compression_ratio": ratio,
        });
        println!("{v}");
    } else {
        println!("migrated process {} to {}", r.pid, r.to);
        println!(
            "  downtime       {:9.1} ms  (frozen until running on the destination)",
            r.downtime.as_secs_f64() * 1e3
        );
        println!(
            "  restore        {:9.1} ms  (on the destination)",
            r.restore_ms
        );
        println!("  total          {:9.1} ms", r.total.as_secs_f64() * 1e3);
        println!("  bytes on wire  {:>12}", r.bytes_on_wire);
        println!(
            "  pages          {:>12}  ({} zero, {} MiB of memory, {} batches)",
            r.pages.pages,
            r.pages.zero_pages,
            raw_bytes >> 20,
            r.batches
        );
        println!("  compression    {ratio:>11.2}x");
    }
    Ok(())
}

/// Progress on a terminal: steps as lines, bytes sent as a bar.
struct Progress {
    bar: ProgressBar,
    on: bool,
}

impl Progress {
    fn new(on: bool) -> Self {
        let bar = if on {
            let b = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template(
                "migrate: {spinner} {msg} {bytes} sent ({binary_bytes_per_sec}, {elapsed})",
            ) {
                b.set_style(style);
            }
            b
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, on }
    }

    fn step(&self, msg: &str) {
        if self.on {
            self.bar.println(format!("migrate: {msg}"));
        }
    }
}

/// A stream error explained by the connection's close reason, if any (a
/// peer that refuses us says why only there).
fn explain(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match ferry_transport::close_error(conn) {
        Some(ce) => anyhow!("{ce}"),
        None => e,
    }
}

async fn send_msg(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &ControlMsg,
) -> Result<()> {
    send_control(send, msg)
        .await
        .map_err(|e| explain(conn, anyhow!(e).context(format!("sending {}", msg.kind()))))
}

async fn recv_msg(
    conn: &quinn::Connection,
    r: &mut quinn::RecvStream,
    t: Duration,
) -> Result<ControlMsg> {
    match tokio::time::timeout(t, recv_control(r)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => {
            // Give the close frame a moment to arrive so its reason is known.
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            Err(explain(
                conn,
                anyhow!(e).context("connection to the destination lost"),
            ))
        }
        Err(_) => bail!("the destination did not answer within {t:?}"),
    }
}

/// Facts about the process's executable and mapped files, read through its
/// own mappings (/proc/PID/exe, /proc/PID/map_files), without freezing it.
fn gather(pid: i32) -> Result<(Vec<i32>, FileFacts, Vec<FileFacts>)> {
    let mut tids = ferry_engine::procfs::tasks(pid)?;
    // tids[0] must be the PID.
    tids.sort_by_key(|&t| (t != pid, t));
    let exe_path = ferry_engine::procfs::link(pid, "exe")?;
    let exe_path = undeleted(&exe_path).to_string();
    let exe = ferry_engine::facts::file_facts(Path::new(&format!("/proc/{pid}/exe")), &exe_path)
        .with_context(|| format!("reading the executable {exe_path}"))?;
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in ferry_engine::procfs::maps(pid)? {
        let Some(path) = m.path else { continue };
        // A file deleted or replaced since it was mapped: name the path, so
        // the destination compares its file there with the mapped one.
        let path = undeleted(&path).to_string();
        if !path.starts_with('/') || !seen.insert(path.clone()) {
            continue;
        }
        let open = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        let fact = ferry_engine::facts::file_facts(&open, &path)
            .with_context(|| format!("reading the mapped file {path}"))?;
        files.push(fact);
    }
    Ok((tids, exe, files))
}

fn undeleted(path: &str) -> &str {
    path.strip_suffix(" (deleted)").unwrap_or(path)
}

enum Decision {
    Kill,
    Thaw,
}

/// What the ptrace thread reports once every page was packed.
struct Dumped {
    pages: PackStats,
}

/// The ptrace thread: freeze, dump the pages, then wait for the decision,
/// all on one OS thread (ptrace binds the tracee to it).
struct PtraceThread {
    decision: oneshot::Sender<Decision>,
    done: oneshot::Receiver<Result<Duration, String>>,
}

impl PtraceThread {
    async fn finish(self, d: Decision) -> Result<Duration> {
        let _ = self.decision.send(d);
        self.done
            .await
            .map_err(|_| anyhow!("the ptrace thread died"))?
            .map_err(|e| anyhow!(e))
    }
}

/// Packs the pages of the frozen process and hands each encoded batch to
/// the network (blocking while the queue is full).
struct NetSink {
    packer: PagePacker,
    tx: mpsc::Sender<Vec<u8>>,
}

impl NetSink {
    fn drain(&mut self) -> ferry_engine::Result<()> {
        while let Some(mut e) = self.packer.pop() {
            let bytes = std::mem::take(&mut e.bytes);
            self.packer.recycle(e);
            self.tx.blocking_send(bytes).map_err(|_| {
                ferry_engine::Error::io(
                    "sending pages",
                    std::io::Error::other("the page streams are gone"),
                )
            })?;
        }
        Ok(())
    }

    fn finish(mut self) -> ferry_engine::Result<PackStats> {
        self.packer.finish().map_err(pack_err)?;
        self.drain()?;
        Ok(self.packer.stats())
    }
}

fn pack_err(e: ferry_protocol::packer::PackError) -> ferry_engine::Error {
    ferry_engine::Error::io("packing pages", std::io::Error::other(e.to_string()))
}

impl PageSink for NetSink {
    fn add(&mut self, addr: u64, data: &[u8]) -> ferry_engine::Result<()> {
        self.packer.add(addr, data).map_err(pack_err)?;
        self.drain()
    }
}

/// Start the ptrace thread: it freezes `pid` and reports the image, then
/// dumps the pages into `batches` and reports their totals, then waits for
/// the decision. If the decision sender is dropped, the process is thawed.
#[allow(clippy::type_complexity)]
fn start_ptrace(
    pid: i32,
    batches: mpsc::Sender<Vec<u8>>,
) -> Result<(
    PtraceThread,
    oneshot::Receiver<Result<Box<ProcessImage>, String>>,
    oneshot::Receiver<Result<Dumped, String>>,
)> {
    let (img_tx, img_rx) = oneshot::channel();
    let (dump_tx, dump_rx) = oneshot::channel();
    let (dec_tx, dec_rx) = oneshot::channel::<Decision>();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ptrace".into())
        .spawn(move || {
            let c = match Captured::freeze(pid) {
                Ok(c) => c,
                Err(e) => {
                    let _ = img_tx.send(Err(format!("{e}")));
                    return;
                }
            };
            if img_tx.send(Ok(Box::new(c.image.clone()))).is_err() {
                let _ = c.thaw();
                return;
            }
            let mut sink = NetSink {
                packer: PagePacker::new(PageWriterOptions::default()),
                tx: batches,
            };
            let r = c
                .dump_pages(&mut sink)
                .and_then(|()| sink.finish())
                .map(|pages| Dumped { pages })
                .map_err(|e| format!("{e}"));
            let _ = dump_tx.send(r);
            let r = match dec_rx.blocking_recv() {
                Ok(Decision::Kill) => c.kill(),
                Ok(Decision::Thaw) | Err(_) => c.thaw(),
            };
            let _ = done_tx.send(r.map_err(|e| format!("{e}")));
        })
        .context("starting the ptrace thread")?;
    Ok((
        PtraceThread {
            decision: dec_tx,
            done: done_rx,
        },
        img_rx,
        dump_rx,
    ))
}

async fn migrate(
    id: Identity,
    trust: TrustStore,
    addr: SocketAddr,
    pid: i32,
    t0: Instant,
    progress: bool,
) -> Result<Report> {
    let ep = ferry_transport::client_endpoint(&id, trust)?;
    let p = Progress::new(progress);
    p.step(&format!("connecting to {addr}"));
    let conn = tokio::time::timeout(STEP_TIMEOUT, ferry_transport::connect(&ep, addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        // The transport error's text already carries its source.
        .map_err(|e| anyhow!("{e}"))?;
    let result = migrate_on(&conn, pid, t0, &p).await;
    p.bar.finish_and_clear();
    match &result {
        Ok(_) => conn.close(0u32.into(), b"done"),
        Err(_) => conn.close(1u32.into(), b"migration aborted"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    Ok(Report {
        to: addr,
        ..result?
    })
}

fn agent() -> String {
    format!("ferry migrate {}", env!("CARGO_PKG_VERSION"))
}

async fn migrate_on(
    conn: &quinn::Connection,
    pid: i32,
    t0: Instant,
    p: &Progress,
) -> Result<Report> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| explain(conn, anyhow!(e).context("opening the control stream")))?;
    let here = ferry_engine::host::host_info();
    send_msg(
        conn,
        &mut send,
        &ControlMsg::Hello {
            version: ProtocolVersion::CURRENT,
            host: here,
            agent: agent(),
        },
    )
    .await?;
    match recv_msg(conn, &mut recv, STEP_TIMEOUT).await? {
        ControlMsg::HelloAck { version, agent, .. } => {
            if ProtocolVersion::CURRENT.negotiate(version).is_none() {
                bail!(
                    "the destination speaks protocol {}.{}, this side {}.{}: upgrade the older side",
                    version.major,
                    version.minor,
                    ProtocolVersion::CURRENT.major,
                    ProtocolVersion::CURRENT.minor
                );
            }
            tracing::info!("destination: {agent}");
        }
        ControlMsg::Refuse { reason, .. } => bail!("the destination refused: {reason}"),
        m => bail!("protocol error: expected HelloAck, got {}", m.kind()),
    }

    let (tids, exe, files) = tokio::task::spawn_blocking(move || gather(pid))
        .await
        .context("gathering facts")??;
    p.step(&format!(
        "checking process {pid} ({} threads, {} files) on the destination",
        tids.len(),
        files.len() + 1
    ));
    send_msg(
        conn,
        &mut send,
        &ControlMsg::Prepare {
            pid,
            tids,
            exe,
            files,
        },
    )
    .await?;
    match recv_msg(conn, &mut recv, STEP_TIMEOUT).await? {
        ControlMsg::Ready => {}
        ControlMsg::Refuse { reason, .. } => bail!("the destination refused: {reason}"),
        m => bail!("protocol error: expected Ready, got {}", m.kind()),
    }

    p.step(&format!("freezing process {pid}"));
    let t_freeze = Instant::now();
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<u8>>(BATCH_QUEUE);
    let (thread, img_rx, dump_rx) = start_ptrace(pid, batch_tx)?;
    let image = match img_rx.await {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => {
            let e = anyhow!("checkpoint of process {pid} failed: {e}");
            abort(&mut send, &e).await;
            return Err(e);
        }
        Err(_) => {
            let e = anyhow!("the ptrace thread died");
            abort(&mut send, &e).await;
            return Err(e);
        }
    };
    let transfer = transfer(conn, &mut send, &mut recv, pid, image, batch_rx, dump_rx, p);
    let sent = match transfer.await {
        Ok(s) => s,
        Err(e) => {
            let e = explain(conn, e);
            abort(&mut send, &e).await;
            let resumed = thread.finish(Decision::Thaw).await;
            return Err(match resumed {
                Ok(_) => e.context(format!("process {pid} resumed on this host")),
                Err(te) => e.context(format!("and resuming process {pid} failed: {te:#}")),
            });
        }
    };
    let downtime = t_freeze.elapsed();
    if let Err(e) = thread.finish(Decision::Kill).await {
        tracing::error!("killing the source copy of {pid}: {e:#}");
    }
    let bytes_on_wire = conn.stats().udp_tx.bytes;
    let _ = send_control(&mut send, &ControlMsg::Done).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(Report {
        pid,
        to: conn.remote_address(),
        downtime,
        total: t0.elapsed(),
        restore_ms: sent.restore_us as f64 / 1e3,
        bytes_on_wire,
        pages: sent.pages,
        batch_bytes: sent.bytes,
        batches: sent.batches,
        image_bytes: sent.image_bytes,
    })
}

/// Tell the destination we give up (best effort).
async fn abort(send: &mut quinn::SendStream, e: &anyhow::Error) {
    let mut reason = format!("{e:#}");
    if reason.len() > ferry_protocol::wire::MAX_REASON_LEN {
        let mut cut = ferry_protocol::wire::MAX_REASON_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let _ = send_control(send, &ControlMsg::Abort { reason }).await;
    let _ = send.finish();
}

/// What the transfer sent and what the destination answered.
struct Sent {
    pages: PackStats,
    batches: u64,
    bytes: u64,
    image_bytes: u64,
    restore_us: u64,
}

/// Pass 0 over the page streams, Switchover, and the wait for Running.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    pid: i32,
    image: Box<ProcessImage>,
    mut batch_rx: mpsc::Receiver<Vec<u8>>,
    dump_rx: oneshot::Receiver<Result<Dumped, String>>,
    p: &Progress,
) -> Result<Sent> {
    send_msg(
        conn,
        send,
        &ControlMsg::PassStart {
            pass: 0,
            vmas: image.vmas.clone(),
        },
    )
    .await?;
    p.step("sending memory");
    p.bar.set_message("pass 0:");
    p.bar.enable_steady_tick(Duration::from_millis(120));
    // One writer task per page stream, fed round-robin.
    let mut feeds = Vec::with_capacity(PAGE_STREAMS);
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..PAGE_STREAMS {
        let mut stream = conn
            .open_uni()
            .await
            .map_err(|e| explain(conn, anyhow!(e).context("opening a page stream")))?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(2);
        feeds.push(tx);
        let bar = p.bar.clone();
        writers.spawn(async move {
            while let Some(batch) = rx.recv().await {
                // A destination that stops reading (flow control) but keeps
                // the connection alive must not hold the process frozen.
                let n = tokio::time::timeout(STEP_TIMEOUT, send_page(&mut stream, 0, &batch))
                    .await
                    .map_err(|_| {
                        anyhow!("the destination stopped taking pages for {STEP_TIMEOUT:?}")
                    })?
                    .with_context(|| format!("sending pages on stream {i}"))?;
                bar.inc(n as u64);
            }
            stream
                .finish()
                .with_context(|| format!("finishing page stream {i}"))?;
            Ok::<(), anyhow::Error>(())
        });
    }
    let (mut batches, mut bytes) = (0u64, 0u64);
    let mut next = 0usize;
    let fed: Result<()> = async {
        while let Some(batch) = batch_rx.recv().await {
            batches += 1;
            bytes += batch.len() as u64;
            if feeds[next].send(batch).await.is_err() {
                // The writer failed: its error is reported below.
                break;
            }
            next = (next + 1) % feeds.len();
        }
        Ok(())
    }
    .await;
    drop(feeds);
    drop(batch_rx);
    fed?;
    while let Some(r) = writers.join_next().await {
        r.context("a page stream writer died")?
            .map_err(|e| explain(conn, e))?;
    }
    let dumped = dump_rx
        .await
        .map_err(|_| anyhow!("the ptrace thread died"))?
        .map_err(|e| anyhow!("reading the memory of process {pid} failed: {e}"))?;
    p.bar.disable_steady_tick();
    send_msg(
        conn,
        send,
        &ControlMsg::PassEnd {
            pass: 0,
            batches,
            pages: dumped.pages.pages,
            bytes,
        },
    )
    .await?;
    let image_bytes = postcard::to_stdvec(image.as_ref()).map_or(0, |v| v.len() as u64);
    send_msg(conn, send, &ControlMsg::Switchover { image }).await?;
    p.step("waiting for the process to run on the destination");
    let restore_us = match recv_msg(conn, recv, RUNNING_TIMEOUT).await? {
        ControlMsg::Running {
            pid: rpid,
            restore_us,
        } if rpid == pid => restore_us,
        ControlMsg::Running { pid: rpid, .. } => {
            bail!("the destination restored PID {rpid} instead of {pid}")
        }
        ControlMsg::Failed { reason } => bail!("restore on the destination failed: {reason}"),
        ControlMsg::Abort { reason } => bail!("the destination gave up: {reason}"),
        m => bail!("protocol error: expected Running, got {}", m.kind()),
    };
    Ok(Sent {
        pages: dumped.pages,
        batches,
        bytes,
        image_bytes,
        restore_us,
    })
}
