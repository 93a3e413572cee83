//! `migrate --to HOST[:PORT] PID`: stop-and-copy migration to a dest-agent.
//!
//! connect (mutual TLS) → Hello → Prepare (facts from /proc, nothing frozen)
//! → on Ready: freeze and capture on a dedicated ptrace thread → send the
//! image files → wait for Running → kill the source copy → Done. Any failure
//! before Running thaws the process, which continues untouched.

use anyhow::{anyhow, bail, Context, Result};
use ferry_dest_agent::link::{self, FileFact, Msg};
use ferry_engine::dump::Captured;
use ferry_protocol::pages::PageStats;
use ferry_transport::{Identity, TrustStore, DEFAULT_PORT};
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    pages: PageStats,
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
    if json {
        let ratio = if r.pages.bytes_written > 0 {
            r.pages.raw_bytes as f64 / r.pages.bytes_written as f64
        } else {
            0.0
        };
        let v = serde_json::json!({
            "pid": r.pid,
            "to": r.to.to_string(),
            "downtime_ms": r.downtime.as_secs_f64() * 1e3,
            "total_ms": r.total.as_secs_f64() * 1e3,
            "restore_ms": r.restore_ms,
            "bytes_on_wire": r.bytes_on_wire,
            "pages_sent": r.pages.pages,
            "zero_pages": r.pages.zero_pages,
            "raw_bytes": r.pages.raw_bytes,
            "image_bytes": r.image_bytes + r.pages.bytes_written,
            "compression_ratio": ratio,
        });
        println!("{v}");
    } else {
        let ratio = if r.pages.bytes_written > 0 {
            r.pages.raw_bytes as f64 / r.pages.bytes_written as f64
        } else {
            0.0
        };
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
            "  pages          {:>12}  ({} zero, {} MiB of memory)",
            r.pages.pages,
            r.pages.zero_pages,
            r.pages.raw_bytes >> 20
        );
        println!("  compression    {ratio:>11.2}x");
    }
    Ok(())
}

fn step(progress: bool, msg: &str) {
    if progress {
        eprintln!("migrate: {msg}");
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

async fn recv_msg(conn: &quinn::Connection, r: &mut quinn::RecvStream, t: Duration) -> Result<Msg> {
    match tokio::time::timeout(t, link::recv(r)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => {
            // Give the close frame a moment to arrive so its reason is known.
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            Err(explain(
                conn,
                e.context("connection to the destination lost"),
            ))
        }
        Err(_) => bail!("the destination did not answer within {t:?}"),
    }
}

/// Facts about the process's executable and mapped files, read through its
/// own mappings (/proc/PID/exe, /proc/PID/map_files), without freezing it.
fn gather(pid: i32) -> Result<(Vec<i32>, FileFact, Vec<FileFact>)> {
    let tids = ferry_engine::procfs::tasks(pid)?;
    let exe_path = ferry_engine::procfs::link(pid, "exe")?;
    let exe_path = undeleted(&exe_path).to_string();
    let exe = link::file_fact(Path::new(&format!("/proc/{pid}/exe")), &exe_path)
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
        let fact = link::file_fact(&open, &path)
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

struct CaptureInfo {
    pages: PageStats,
    image_bytes: u64,
}

/// The ptrace thread: capture, then wait for the decision, on one OS thread.
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

async fn capture(pid: i32, dir: PathBuf) -> Result<(PtraceThread, CaptureInfo)> {
    let (cap_tx, cap_rx) = oneshot::channel::<Result<CaptureInfo, String>>();
    let (dec_tx, dec_rx) = oneshot::channel::<Decision>();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ptrace".into())
        .spawn(move || match Captured::capture(pid, &dir) {
            Err(e) => {
                let _ = cap_tx.send(Err(format!("{e}")));
            }
            Ok(c) => {
                let info = CaptureInfo {
                    pages: c.pages,
                    image_bytes: c.image_bytes,
                };
                if cap_tx.send(Ok(info)).is_err() {
                    let _ = c.thaw();
                    return;
                }
                let r = match dec_rx.blocking_recv() {
                    Ok(Decision::Kill) => c.kill(),
                    Ok(Decision::Thaw) | Err(_) => c.thaw(),
                };
                let _ = done_tx.send(r.map_err(|e| format!("{e}")));
            }
        })
        .context("starting the ptrace thread")?;
    let info = cap_rx
        .await
        .map_err(|_| anyhow!("the ptrace thread died"))?
        .map_err(|e| anyhow!("checkpoint of process {pid} failed: {e}"))?;
    Ok((
        PtraceThread {
            decision: dec_tx,
            done: done_rx,
        },
        info,
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
    step(progress, &format!("connecting to {addr}"));
    let conn = tokio::time::timeout(STEP_TIMEOUT, ferry_transport::connect(&ep, addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        // The transport error's text already carries its source.
        .map_err(|e| anyhow!("{e}"))?;
    let result = migrate_on(&conn, pid, t0, progress).await;
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

async fn migrate_on(
    conn: &quinn::Connection,
    pid: i32,
    t0: Instant,
    progress: bool,
) -> Result<Report> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| explain(conn, anyhow!(e).context("opening the control stream")))?;
    let here = ferry_engine::host::host_info();
    link::send(
        &mut send,
        &Msg::Hello {
            version: link::VERSION,
            host: here,
        },
    )
    .await
    .map_err(|e| explain(conn, e))?;
    match recv_msg(conn, &mut recv, STEP_TIMEOUT).await? {
        Msg::HelloAck { .. } => {}
        Msg::Refuse { reason } => bail!("the destination refused: {reason}"),
        m => bail!("protocol error: expected HelloAck, got {}", m.name()),
    }

    let (tids, exe, files) = tokio::task::spawn_blocking(move || gather(pid))
        .await
        .context("gathering facts")??;
    step(
        progress,
        &format!(
            "checking process {pid} ({} threads, {} files) on the destination",
            tids.len(),
            files.len() + 1
        ),
    );
    link::send(
        &mut send,
        &Msg::Prepare {
            pid,
            tids,
            exe,
            files,
        },
    )
    .await
    .map_err(|e| explain(conn, e))?;
    match recv_msg(conn, &mut recv, STEP_TIMEOUT).await? {
        Msg::Ready => {}
        Msg::Refuse { reason } => bail!("the destination refused: {reason}"),
        m => bail!("protocol error: expected Ready, got {}", m.name()),
    }

    let tmp = tempfile::Builder::new()
        .prefix("ferry-migrate-")
        .tempdir()
        .context("creating a temp dir")?;
    step(progress, &format!("freezing process {pid}"));
    let t_freeze = Instant::now();
    let (thread, info) = match capture(pid, tmp.path().to_path_buf()).await {
        Ok(c) => c,
        Err(e) => {
            let _ = link::send(
                &mut send,
                &Msg::Abort {
                    reason: format!("{e:#}"),
                },
            )
            .await;
            let _ = send.finish();
            return Err(e);
        }
    };
    let transfer = async {
        let pfile = tmp.path().join(ferry_protocol::image::PROCESS_FILE);
        let gfile = tmp.path().join(ferry_protocol::pages::PAGES_FILE);
        let plen = std::fs::metadata(&pfile).context("image file")?.len();
        let glen = std::fs::metadata(&gfile).context("page store")?.len();
        step(
            progress,
            &format!("sending {} MiB of image", (plen + glen) >> 20),
        );
        link::send(
            &mut send,
            &Msg::Image {
                process_len: plen,
                pages_len: glen,
            },
        )
        .await?;
        for f in [&pfile, &gfile] {
            let mut file = tokio::fs::File::open(f)
                .await
                .with_context(|| format!("opening {}", f.display()))?;
            tokio::io::copy(&mut file, &mut send)
                .await
                .context("sending the image")?;
        }
        step(
            progress,
            "waiting for the process to run on the destination",
        );
        match recv_msg(conn, &mut recv, RUNNING_TIMEOUT).await? {
            Msg::Running {
                pid: rpid,
                restore_ms,
            } if rpid == pid => Ok(restore_ms),
            Msg::Running { pid: rpid, .. } => {
                bail!("the destination restored PID {rpid} instead of {pid}")
            }
            Msg::Failed { reason } => bail!("restore on the destination failed: {reason}"),
            m => bail!("protocol error: expected Running, got {}", m.name()),
        }
    };
    let restore_ms = match transfer.await {
        Ok(ms) => ms,
        Err(e) => {
            let e = explain(conn, e);
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
    let _ = link::send(&mut send, &Msg::Done).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(Report {
        pid,
        to: conn.remote_address(),
        downtime,
        total: t0.elapsed(),
        restore_ms,
        bytes_on_wire,
        pages: info.pages,
        image_bytes: info.image_bytes,
    })
}
