//! `migrate --to HOST[:PORT] PID`: live migration to a dest-agent over the
//! wire protocol of [`ferry_protocol::wire`].
//!
//! connect (mutual TLS) → Hello → HelloAck → Prepare (facts from /proc,
//! nothing frozen) → Ready → the ptrace thread ([`passes`]) runs pre-copy
//! passes while the process runs, then freezes it for the final pass; each
//! pass is PassStart{n, vmas}, encoded batches round-robin over
//! [`PAGE_STREAMS`] unidirectional page streams, PassEnd → Switchover →
//! Running → kill the source copy → Done. Any failure before Running thaws
//! the process, which continues untouched.

use crate::lazy::{self, LazyOptions, LazyReport, OwedPages};
use crate::netmove::SourceNet;
use crate::passes::{self, Decision, Event, PassEnd, SpaceSent};
use crate::precopy::{Policy, SwitchReason};
use anyhow::{anyhow, bail, Context, Result};
use ferry_protocol::model::TreeImage;
use ferry_protocol::pages::PageSpace;
use ferry_protocol::wire::{
    ControlMsg, FileFacts, PageSpan, ProtocolVersion, LAZY_MINOR, NET_MINOR,
};
use ferry_transport::frames::{recv_control, send_control, send_page};
use ferry_transport::{Identity, TrustStore, DEFAULT_PORT};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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
    /// Freeze until the destination said Running.
    downtime: Duration,
    total: Duration,
    /// The destination's time from Switchover to running.
    restore_ms: f64,
    bytes_on_wire: u64,
    /// Bytes of the serialized process image (Switchover).
    image_bytes: u64,
    passes: Vec<PassEnd>,
    /// Pages and encoded bytes sent of each page space (each process of the
    /// tree, each shared memory object), over all passes.
    spaces: Vec<SpaceSent>,
    tracker: Option<&'static str>,
    reason: SwitchReason,
    /// Resident memory of the tree when the migration began (shared pages
    /// counted in every process that maps them).
    resident_bytes: u64,
    /// The lazy phase, for `--lazy`.
    lazy: Option<LazyReport>,
    /// The service addresses that moved with the process.
    moved: Vec<String>,
}

/// Run `migrate --to`; prints the report. Errors name the reason.
pub fn run(
    config_dir: &Path,
    to: &str,
    pid: i32,
    policy: Policy,
    lazy: Option<LazyOptions>,
    json: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let addr = resolve(to)?;
    if pid <= 0 || !ferry_engine::procfs::exists(pid) {
        bail!("no process with PID {pid}");
    }
    if lazy.is_some() {
        let shmem = ferry_engine::procfs::maps(pid)?
            .iter()
            .any(ferry_engine::shmem::is_shmem_mapping);
        if shmem {
            bail!(
                "process {pid} maps shared memory: lazy pages move a single process without \
                 shared memory; migrate it without --lazy (process {pid} was not touched)"
            );
        }
        let kids = ferry_engine::dump::tree::children(pid)?;
        if !kids.is_empty() {
            eprintln!(
                "warning: lazy pages move process {pid} alone: its children ({}) stay on this \
                 host; migrate without --lazy to move the whole tree",
                kids.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let id = Identity::load_or_create(config_dir)?;
    let trust = TrustStore::load(config_dir)?;
    let progress = !json && std::io::stderr().is_terminal();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(migrate(id, trust, addr, pid, policy, lazy, t0, progress))?;
    if json {
        println!("{}", report_json(&r));
    } else {
        print_report(&r);
    }
    Ok(())
}

/// Totals over all passes: (pages, zero pages, batches, batch bytes).
fn totals(r: &Report) -> (u64, u64, u64, u64) {
    r.passes.iter().fold((0, 0, 0, 0), |t, p| {
        (
            t.0 + p.pages,
            t.1 + p.zero_pages,
            t.2 + p.batches,
            t.3 + p.bytes,
        )
    })
}

/// Pages per second written by the process during pass `i` (seen as the
/// next pass's dirty set).
fn dirty_rate(r: &Report, i: usize) -> Option<f64> {
    let next = r.passes.get(i + 1)?;
    Some(next.dirty_pages as f64 / r.passes[i].duration.as_secs_f64().max(1e-6))
}

fn report_json(r: &Report) -> serde_json::Value {
    let (pages, zero, batches, batch_bytes) = totals(r);
    let raw_bytes = pages * ferry_protocol::model::PAGE_SIZE;
    let passes: Vec<serde_json::Value> = r
        .passes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "pass": p.pass,
                "dirty_pages": p.dirty_pages,
                "pages": p.pages,
                "unchanged_pages": p.unchanged,
                "zero_pages": p.zero_pages,
                "bytes": p.bytes,
                "duration_ms": p.duration.as_secs_f64() * 1e3,
                "dirty_rate_pages_per_s": dirty_rate(r, i),
                "frozen": p.frozen,
            })
        })
        .collect();
    serde_json::json!({
        "pid": r.pid,
        "to": r.to.to_string(),
        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
        "total_ms": r.total.as_secs_f64() * 1e3,
        "restore_ms": r.restore_ms,
        "bytes_on_wire": r.bytes_on_wire,
        "resident_bytes": r.resident_bytes,
        "pages_sent": pages,
        "zero_pages": zero,
        "raw_bytes": raw_bytes,
        "batches": batches,
        "batch_bytes": batch_bytes,
        "image_bytes": r.image_bytes,
        "compression_ratio": if batch_bytes > 0 { raw_bytes as f64 / batch_bytes as f64 } else { 0.0 },
        "tracker": r.tracker,
        "switch_reason": r.reason.as_str(),
        "passes": passes,
        "processes": r.spaces.iter().filter_map(|s| match s.space {
            PageSpace::Task(pid) => Some(serde_json::json!({"pid": pid, "pages": s.pages, "bytes": s.bytes})),
            PageSpace::Shmem(_) => None,
        }).collect::<Vec<_>>(),
        "shared_memory": r.spaces.iter().filter_map(|s| match s.space {
            PageSpace::Shmem(id) => Some(serde_json::json!({"id": id, "pages": s.pages, "bytes": s.bytes})),
            PageSpace::Task(_) => None,
        }).collect::<Vec<_>>(),
        "lazy": r.lazy.as_ref().map(lazy_json),
        "addresses_moved": r.moved,
    })
}

fn lazy_json(l: &LazyReport) -> serde_json::Value {
    let last_ms = l.stats.last_page_us as f64 / 1e3;
    serde_json::json!({
        "owed_pages": l.owed_pages,
        "pushed_pages": l.stats.pages_pushed,
        "requested_pages": l.stats.pages_requested,
        "faults": l.stats.faults,
        "requests": l.requests,
        "max_fault_wait_ms": l.stats.max_fault_wait_us as f64 / 1e3,
        "last_page_ms": last_ms,
        "pull_rate_mb_s": pull_rate(l),
        "duration_ms": l.duration.as_secs_f64() * 1e3,
        "reconnects": l.reconnects,
    })
}

/// MB/s at which the owed memory reached the destination.
fn pull_rate(l: &LazyReport) -> f64 {
    let secs = l.stats.last_page_us as f64 / 1e6;
    if secs > 0.0 {
        (l.owed_pages * ferry_protocol::model::PAGE_SIZE) as f64 / 1e6 / secs
    } else {
        0.0
    }
}

fn print_report(r: &Report) {
    let (pages, zero, batches, batch_bytes) = totals(r);
    let raw_bytes = pages * ferry_protocol::model::PAGE_SIZE;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let procs = r
        .spaces
        .iter()
        .filter(|s| matches!(s.space, PageSpace::Task(_)))
        .count();
    if procs > 1 {
        println!(
            "migrated process {} and its {} descendant(s) to {}",
            r.pid,
            procs - 1,
            r.to
        );
    } else {
        println!("migrated process {} to {}", r.pid, r.to);
    }
    println!(
        "  downtime       {:9.1} ms  (frozen until running on the destination)",
        ms(r.downtime)
    );
    println!(
        "  restore        {:9.1} ms  (on the destination, after the freeze)",
        r.restore_ms
    );
    println!("  total          {:9.1} ms", ms(r.total));
    println!(
        "  bytes on wire  {:>12}  (resident memory {} MiB)",
        r.bytes_on_wire,
        r.resident_bytes >> 20
    );
    println!(
        "  pages          {:>12}  ({zero} zero, {} MiB of memory, {batches} batches)",
        pages,
        raw_bytes >> 20
    );
    if batch_bytes > 0 {
        println!(
            "  compression    {:>11.2}x",
            raw_bytes as f64 / batch_bytes as f64
        );
    }
    println!(
        "  tracker        {:>12}",
        r.tracker.unwrap_or("none (stop-and-copy)")
    );
    println!(
        "  passes         {:>12}  (switched over: {})",
        r.passes.len(),
        r.reason.as_str()
    );
    for (i, p) in r.passes.iter().enumerate() {
        let rate = dirty_rate(r, i)
            .map(|v| format!(", dirtied {:.1} MB/s meanwhile", v * 4096.0 / 1e6))
            .unwrap_or_default();
        println!(
            "    pass {:>2}{} {:>9} pages {:>8} KiB {:>8.1} ms{rate}",
            p.pass,
            if p.frozen { "*" } else { " " },
            p.pages,
            p.bytes >> 10,
            ms(p.duration)
        );
    }
    for a in &r.moved {
        println!("  address moved  {a}");
    }
    if let Some(l) = &r.lazy {
        println!(
            "  lazy           {:>12}  pages owed at the switchover ({} MiB)",
            l.owed_pages,
            (l.owed_pages * ferry_protocol::model::PAGE_SIZE) >> 20
        );
        println!(
            "    last page    {:9.1} ms  after the process ran again ({:.0} MB/s)",
            l.stats.last_page_us as f64 / 1e3,
            pull_rate(l)
        );
        println!(
            "    pushed       {:>12}  pages in the background",
            l.stats.pages_pushed
        );
        println!(
            "    on fault     {:>12}  pages ({} faults waited, longest {:.2} ms)",
            l.stats.pages_requested,
            l.stats.faults,
            l.stats.max_fault_wait_us as f64 / 1e3
        );
    }
    if r.reason == SwitchReason::NotConverging && r.lazy.is_none() {
        println!(
            "  note: the process writes memory about as fast as the link carries it; \
             pre-copy stopped at its best pass (try --lazy pages when available)"
        );
    }
    if r.spaces.len() > 1 {
        for sp in &r.spaces {
            println!(
                "  {:<26} {:>9} pages, {:>6} KiB on the wire",
                sp.space.to_string(),
                sp.pages,
                sp.bytes >> 10
            );
        }
    }
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
/// What Prepare says of the tree of `pid`: every PID and TID (the root's
/// first), the root's executable, and every other executable and mapped
/// file of its processes (shared memory travels with the tree: not a file).
fn gather(
    pid: i32,
    scope: ferry_engine::dump::tree::Scope,
) -> Result<(Vec<i32>, FileFacts, Vec<FileFacts>)> {
    let (tasks, zombies) = match scope {
        ferry_engine::dump::tree::Scope::Tree => ferry_engine::dump::tree::live_members(pid)?,
        ferry_engine::dump::tree::Scope::Process => {
            (vec![ferry_engine::dump::tree::identity(pid)?], Vec::new())
        }
    };
    let ids = ferry_engine::dump::tree::live_ids(&tasks, &zombies)?;
    let exe_path = ferry_engine::procfs::link(pid, "exe")?;
    let exe_path = undeleted(&exe_path).to_string();
    let exe = ferry_engine::facts::file_facts(Path::new(&format!("/proc/{pid}/exe")), &exe_path)
        .with_context(|| format!("reading the executable {exe_path}"))?;
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::from([exe_path]);
    for t in &tasks {
        let tpid = t.pid;
        // A child that exits meanwhile has nothing to check; the passes
        // follow the tree as it changes.
        let Ok(texe) = ferry_engine::procfs::link(tpid, "exe") else {
            continue;
        };
        let texe = undeleted(&texe).to_string();
        if seen.insert(texe.clone()) {
            let open = PathBuf::from(format!("/proc/{tpid}/exe"));
            files.push(
                ferry_engine::facts::file_facts(&open, &texe)
                    .with_context(|| format!("reading the executable {texe} of {tpid}"))?,
            );
        }
        let Ok(maps) = ferry_engine::procfs::maps(tpid) else {
            continue;
        };
        for m in maps {
            if ferry_engine::shmem::is_shmem_mapping(&m) {
                continue;
            }
            let Some(path) = m.path else { continue };
            // A file deleted or replaced since it was mapped: name the path,
            // so the destination compares its file there with the mapped one.
            let path = undeleted(&path).to_string();
            if !path.starts_with('/') || !seen.insert(path.clone()) {
                continue;
            }
            let open = PathBuf::from(format!("/proc/{tpid}/map_files/{:x}-{:x}", m.start, m.end));
            let fact = ferry_engine::facts::file_facts(&open, &path)
                .with_context(|| format!("reading the mapped file {path}"))?;
            files.push(fact);
        }
    }
    Ok((ids, exe, files))
}

fn undeleted(path: &str) -> &str {
    path.strip_suffix(" (deleted)").unwrap_or(path)
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    id: Identity,
    trust: TrustStore,
    addr: SocketAddr,
    pid: i32,
    policy: Policy,
    lazy: Option<LazyOptions>,
    t0: Instant,
    progress: bool,
) -> Result<Report> {
    let ep = ferry_transport::client_endpoint(&id, trust)?;
    let p = Progress::new(progress);
    p.step(&format!("connecting to {addr}"));
    let mut conn = tokio::time::timeout(STEP_TIMEOUT, ferry_transport::connect(&ep, addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        // The transport error's text already carries its source.
        .map_err(|e| anyhow!("{e}"))?;
    let peer = lazy::Peer { ep: &ep, addr };
    // A lazy phase that reconnects replaces `conn`.
    let result = migrate_on(&mut conn, &peer, pid, policy, lazy, t0, &p).await;
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

pub(crate) fn agent() -> String {
    format!("ferry migrate {}", env!("CARGO_PKG_VERSION"))
}

async fn migrate_on(
    conn: &mut quinn::Connection,
    peer: &lazy::Peer<'_>,
    pid: i32,
    policy: Policy,
    lazy: Option<LazyOptions>,
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
    let minor = match recv_msg(conn, &mut recv, STEP_TIMEOUT).await? {
        ControlMsg::HelloAck { version, agent, .. } => {
            let Some(v) = ProtocolVersion::CURRENT.negotiate(version) else {
                bail!(
                    "the destination speaks protocol {}.{}, this side {}.{}: upgrade the older side",
                    version.major,
                    version.minor,
                    ProtocolVersion::CURRENT.major,
                    ProtocolVersion::CURRENT.minor
                );
            };
            if lazy.is_some() && v.minor < LAZY_MINOR {
                bail!(
                    "the destination ({agent}, protocol {}.{}) does not support lazy pages: \
                     upgrade it, or migrate without --lazy",
                    version.major,
                    version.minor
                );
            }
            tracing::info!("destination: {agent}");
            v.minor
        }
        ControlMsg::Refuse { reason, .. } => bail!("the destination refused: {reason}"),
        m => bail!("protocol error: expected HelloAck, got {}", m.kind()),
    };

    let scope = if lazy.is_some() {
        ferry_engine::dump::tree::Scope::Process
    } else {
        ferry_engine::dump::tree::Scope::Tree
    };
    let (tids, exe, files) = tokio::task::spawn_blocking(move || gather(pid, scope))
        .await
        .context("gathering facts")??;
    let mut net = tokio::task::spawn_blocking(move || {
        let pids = match scope {
            ferry_engine::dump::tree::Scope::Tree => ferry_engine::dump::tree::live_members(pid)?
                .0
                .iter()
                .map(|t| t.pid)
                .collect(),
            ferry_engine::dump::tree::Scope::Process => vec![pid],
        };
        SourceNet::plan(&pids)
    })
    .await
    .context("finding the process's addresses")??;
    if !net.is_empty() && minor < NET_MINOR {
        bail!(
            "the process's connections use {} which must move with it, and the destination \
             (protocol minor {minor}) cannot take addresses over: upgrade it (process {pid} \
             was not touched)",
            net.moved().join(", ")
        );
    }
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

    let resident_bytes = ferry_engine::dump::tree::live_members(pid)
        .map(|(tasks, _)| tasks.iter().map(|t| resident_bytes(t.pid)).sum())
        .unwrap_or_else(|_| resident_bytes(pid));
    p.step(&format!(
        "copying the memory of process {pid} while it runs (at most {} passes, then a freeze of about {} ms)",
        policy.max_passes,
        policy.max_downtime.as_millis()
    ));
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(BATCH_QUEUE);
    let (dec_tx, dec_rx) = std::sync::mpsc::channel::<Decision>();
    let before_freeze = net.before_freeze();
    let thread = std::thread::Builder::new()
        .name("ptrace".into())
        .spawn(move || passes::run(pid, policy, lazy.is_some(), ev_tx, dec_rx, before_freeze))
        .context("starting the ptrace thread")?;
    let streamed = stream(conn, &mut send, &mut recv, pid, &mut ev_rx, p, &mut net).await;
    // After Running the destination runs the process; with lazy pages part
    // of its memory is still here: serve it before the copy here goes.
    let lazy_result = match (&streamed, lazy) {
        (Ok(s), Some(opts)) => match &s.owed {
            Some(owed) => {
                Some(serve_lazy(conn, &mut send, recv, peer, pid, owed.clone(), opts, p).await)
            }
            None => None,
        },
        _ => None,
    };
    let decision = if streamed.is_ok() {
        Decision::Kill
    } else {
        // The address is back before the connections go on.
        net.give_back();
        Decision::Thaw
    };
    let _ = dec_tx.send(decision);
    drop(ev_rx);
    let outcome = join_thread(thread, "the ptrace thread").await;
    // Thawed (out of repair mode) or killed (closed in repair mode): the
    // peers may get through again.
    net.unblock();
    if streamed.is_ok() {
        net.commit();
    }
    let outcome = outcome?;
    let s = match (streamed, outcome) {
        (Ok(s), Ok(frozen)) => {
            tracing::info!("process {pid} was frozen for {frozen:?} here");
            s
        }
        (Ok(s), Err(e)) => {
            // The destination runs the process; only our kill failed.
            tracing::error!("killing the source copy of {pid}: {e}");
            s
        }
        (Err(e), thread_result) => {
            // The ptrace thread's own failure is the real reason when it
            // stopped first; otherwise it only saw the network side go.
            let e = match thread_result {
                Err(te) if e.is::<ThreadStopped>() => anyhow!(te),
                Err(te) => {
                    tracing::debug!("ptrace thread after the failure: {te}");
                    e
                }
                Ok(_) => e,
            };
            let e = e.context(format!(
                "migration aborted; process {pid} resumed on this host, untouched"
            ));
            abort(&mut send, &e).await;
            return Err(e);
        }
    };
    let lazy_report = match lazy_result {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            abort(&mut send, &e).await;
            return Err(e.context(format!(
                "the lazy phase failed after process {pid} had resumed on the destination; \
                 part of its memory was only here, so it is lost on both hosts \
                 (a migration without --lazy never has this risk)"
            )));
        }
        None => None,
    };
    let downtime = s.freeze_at.map_or(Duration::ZERO, |t| s.running_at - t);
    let earlier_bytes = lazy_report.as_ref().map_or(0, |l| l.earlier_bytes);
    let bytes_on_wire = conn.stats().udp_tx.bytes + earlier_bytes;
    let _ = send_control(&mut send, &ControlMsg::Done).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(Report {
        pid,
        to: conn.remote_address(),
        downtime,
        total: t0.elapsed(),
        restore_ms: s.restore_us as f64 / 1e3,
        bytes_on_wire,
        image_bytes: s.image_bytes,
        passes: s.passes,
        spaces: s.spaces,
        tracker: s.tracker,
        reason: s.reason,
        resident_bytes,
        lazy: lazy_report,
        moved: net.moved(),
    })
}

/// The lazy phase with progress: pages still owed.
#[allow(clippy::too_many_arguments)]
async fn serve_lazy(
    conn: &mut quinn::Connection,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    peer: &lazy::Peer<'_>,
    pid: i32,
    owed: Vec<(u64, u64)>,
    opts: LazyOptions,
    p: &Progress,
) -> Result<LazyReport> {
    let owed = OwedPages::new(owed);
    let unsent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(owed.unsent()));
    p.step(&format!(
        "process {pid} runs on the destination; serving its {} missing pages",
        owed.total()
    ));
    p.bar.enable_steady_tick(Duration::from_millis(120));
    let ticker = {
        let (bar, unsent) = (p.bar.clone(), unsent.clone());
        tokio::spawn(async move {
            loop {
                let n = unsent.load(std::sync::atomic::Ordering::Relaxed);
                bar.set_message(format!("lazy: {n} pages still owed,"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Reconnecting is shown on a terminal and always logged.
    let notify = |msg: &str| {
        p.step(msg);
        tracing::info!("{msg}");
    };
    let r = lazy::serve(conn, send, recv, peer, pid, owed, opts, unsent, &notify).await;
    ticker.abort();
    p.bar.disable_steady_tick();
    r
}

/// Wait for an OS thread without blocking the runtime; its result, or an
/// error naming `what` if it panicked.
pub(crate) async fn join_thread<T: Send + 'static>(
    handle: std::thread::JoinHandle<T>,
    what: &str,
) -> Result<T> {
    tokio::task::spawn_blocking(move || handle.join())
        .await
        .with_context(|| format!("joining {what}"))?
        .map_err(|_| anyhow!("{what} panicked"))
}

/// Resident memory of `pid` (VmRSS), 0 if unknown.
fn resident_bytes(pid: i32) -> u64 {
    ferry_engine::procfs::read(pid, "status")
        .ok()
        .and_then(|s| ferry_engine::procfs::status_field(&s, "VmRSS"))
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
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

/// The ptrace thread ended before the process was captured; its own
/// result says why.
#[derive(Debug)]
struct ThreadStopped(i32);

impl std::fmt::Display for ThreadStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the ptrace thread stopped before process {} was captured",
            self.0
        )
    }
}

impl std::error::Error for ThreadStopped {}

/// What the transfer did and what the destination answered.
struct Streamed {
    passes: Vec<PassEnd>,
    spaces: Vec<SpaceSent>,
    tracker: Option<&'static str>,
    reason: SwitchReason,
    freeze_at: Option<Instant>,
    running_at: Instant,
    image_bytes: u64,
    restore_us: u64,
    /// Lazy switchover: the spans still owed.
    owed: Option<Vec<(u64, u64)>>,
}

/// Forward the ptrace thread's events: control messages on the control
/// stream, page batches round-robin over the page streams; then
/// Switchover and the wait for Running.
async fn stream(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    pid: i32,
    events: &mut mpsc::Receiver<Event>,
    p: &Progress,
    net: &mut SourceNet,
) -> Result<Streamed> {
    p.bar.enable_steady_tick(Duration::from_millis(120));
    // One writer task per page stream, fed round-robin.
    let mut feeds = Vec::with_capacity(PAGE_STREAMS);
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..PAGE_STREAMS {
        let mut stream = conn
            .open_uni()
            .await
            .map_err(|e| explain(conn, anyhow!(e).context("opening a page stream")))?;
        let (tx, mut rx) = mpsc::channel::<(u32, PageSpace, Vec<u8>)>(2);
        feeds.push(tx);
        let bar = p.bar.clone();
        writers.spawn(async move {
            while let Some((pass, space, batch)) = rx.recv().await {
                // A destination that stops reading (flow control) but keeps
                // the connection alive must not hold the process frozen.
                let n =
                    tokio::time::timeout(STEP_TIMEOUT, send_page(&mut stream, pass, space, &batch))
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
    let mut passes = Vec::new();
    let mut spaces: Vec<SpaceSent> = Vec::new();
    let mut tracker = None;
    let mut freeze_at = None;
    let mut next = 0usize;
    let mut owed = None;
    let fed: Result<Option<(Box<TreeImage>, SwitchReason)>> = async {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Tracker(name) => {
                    tracker = Some(name);
                    tracing::info!("dirty-page tracking: {name}");
                }
                Event::PassStart { pass, layout } => {
                    p.bar.set_message(format!("pass {pass}:"));
                    send_msg(conn, send, &ControlMsg::PassStart { pass, layout }).await?;
                }
                Event::Batch { pass, space, bytes } => {
                    if feeds[next].send((pass, space, bytes)).await.is_err() {
                        // The writer failed: its error is reported below.
                        return Ok(None);
                    }
                    next = (next + 1) % feeds.len();
                }
                Event::Spaces { sent } => {
                    for x in sent {
                        match spaces
                            .iter_mut()
                            .find(|s: &&mut SpaceSent| s.space == x.space)
                        {
                            Some(s) => {
                                s.pages += x.pages;
                                s.bytes += x.bytes;
                            }
                            None => spaces.push(x),
                        }
                    }
                }
                Event::PassEnd { stats } => {
                    send_msg(
                        conn,
                        send,
                        &ControlMsg::PassEnd {
                            pass: stats.pass,
                            batches: stats.batches,
                            pages: stats.pages,
                            bytes: stats.bytes,
                        },
                    )
                    .await?;
                    p.step(&format!(
                        "pass {}: {} pages ({} unchanged skipped) in {:.0} ms{}",
                        stats.pass,
                        stats.pages,
                        stats.unchanged,
                        stats.duration.as_secs_f64() * 1e3,
                        if stats.frozen { ", frozen" } else { "" }
                    ));
                    passes.push(stats);
                }
                Event::FreezeStarted => freeze_at = Some(Instant::now()),
                Event::LazyPlan { owed: spans } => {
                    let msg = ControlMsg::LazyPlan {
                        owed: spans
                            .iter()
                            .map(|&(addr, pages)| PageSpan { addr, pages })
                            .collect(),
                    };
                    send_msg(conn, send, &msg).await?;
                    owed = Some(spans);
                }
                Event::Frozen { image, reason } => return Ok(Some((image, reason))),
            }
        }
        Ok(None)
    }
    .await;
    drop(feeds);
    while let Some(r) = writers.join_next().await {
        r.context("a page stream writer died")?
            .map_err(|e| explain(conn, e))?;
    }
    let Some((image, reason)) = fed? else {
        return Err(anyhow!(ThreadStopped(pid)));
    };
    p.bar.disable_steady_tick();
    let image_bytes = postcard::to_stdvec(image.as_ref()).map_or(0, |v| v.len() as u64);
    if !net.is_empty() {
        let addrs = net.take_off()?;
        send_msg(conn, send, &ControlMsg::NetMove { addrs }).await?;
    }
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
    Ok(Streamed {
        passes,
        spaces,
        tracker,
        reason,
        freeze_at,
        running_at: Instant::now(),
        image_bytes,
        restore_us,
        owed,
    })
}
