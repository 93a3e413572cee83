//! `dest-agent`: the destination side of a migration. It listens for QUIC
//! connections from trusted `migrate --to` sources (mutual TLS with pinned
//! fingerprints), checks that a process can run here, receives its image and
//! restores it with the same PID.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_dest_agent::link::{self, Msg};
use ferry_transport::{Fingerprint, Identity, TrustStore, DEFAULT_PORT};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// ferry's destination agent: receives migrated processes.
#[derive(Parser)]
#[command(name = "dest-agent", version, about, long_about = None)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Configuration directory (identity and trusted peers); default
    /// $FERRY_CONFIG_DIR or /etc/ferry.
    #[arg(long, global = true, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Address to listen on, ADDR[:PORT] (default 0.0.0.0:7420); the same
    /// as `listen --listen`.
    #[arg(long, value_name = "ADDR[:PORT]")]
    listen: Option<String>,
    /// Directory for received images (default: the temp dir).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (the default command).
    Listen {
        /// Address to listen on, ADDR[:PORT] (default 0.0.0.0:7420).
        #[arg(long, value_name = "ADDR[:PORT]")]
        listen: Option<String>,
        /// Directory for received images (default: the temp dir).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
    /// Print this agent's fingerprint (creating its identity if needed).
    Identity,
    /// Trust a source agent, given its fingerprint (`migrate identity`).
    Trust {
        /// `sha256:` followed by 64 hex digits.
        fingerprint: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let config_dir = cli
        .config_dir
        .clone()
        .unwrap_or_else(ferry_transport::default_config_dir);
    match cli.cmd {
        Some(Command::Identity) => {
            let id = Identity::load_or_create(&config_dir)?;
            println!("{}", id.fingerprint());
            Ok(())
        }
        Some(Command::Trust { fingerprint }) => trust(&config_dir, &fingerprint),
        Some(Command::Listen { listen, work_dir }) => listen_cmd(
            &config_dir,
            listen.or(cli.listen),
            work_dir.or(cli.work_dir),
        ),
        None => listen_cmd(&config_dir, cli.listen, cli.work_dir),
    }
}

fn trust(config_dir: &Path, fingerprint: &str) -> Result<()> {
    let fp: Fingerprint = fingerprint.trim().parse()?;
    std::fs::create_dir_all(config_dir)
        .with_context(|| format!("creating {}", config_dir.display()))?;
    let store = TrustStore::load(config_dir)?;
    if store.add(fp.as_str())? {
        eprintln!("trusted {fp}");
    } else {
        eprintln!("{fp} was already trusted");
    }
    Ok(())
}

/// ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT); the port defaults to 7420.
fn parse_listen(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    bail!("invalid listen address {s:?}: expected ADDR[:PORT], e.g. 0.0.0.0:{DEFAULT_PORT}")
}

/// Shared state of the daemon.
struct Daemon {
    work_dir: PathBuf,
    restorer: std::sync::mpsc::Sender<RestoreJob>,
    /// PIDs of restored processes (our children), reaped periodically.
    children: Mutex<Vec<i32>>,
}

struct RestoreJob {
    dir: PathBuf,
    reply: oneshot::Sender<Result<ferry_engine::restore::RestoreSummary, String>>,
}

fn listen_cmd(config_dir: &Path, listen: Option<String>, work_dir: Option<PathBuf>) -> Result<()> {
    let addr = match listen {
        Some(s) => parse_listen(&s)?,
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
    };
    let work_dir = work_dir.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let id = Identity::load_or_create(config_dir)?;
    let trust = TrustStore::load(config_dir)?;
    // Restores run one at a time on one dedicated OS thread: the restored
    // process is created (and ptrace-detached) by that thread.
    let (tx, rx) = std::sync::mpsc::channel::<RestoreJob>();
    std::thread::Builder::new()
        .name("restorer".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let r = ferry_engine::restore::restore(&job.dir).map_err(|e| format!("{e}"));
                let _ = job.reply.send(r);
            }
        })
        .context("starting the restore thread")?;
    let daemon = Arc::new(Daemon {
        work_dir,
        restorer: tx,
        children: Mutex::new(Vec::new()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(daemon, addr, id, trust))
}

async fn serve(
    daemon: Arc<Daemon>,
    addr: SocketAddr,
    id: Identity,
    trust: TrustStore,
) -> Result<()> {
    let ep = ferry_transport::server_endpoint(addr, &id, trust)?;
    tracing::info!(
        "listening on {} as {}",
        ep.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        id.fingerprint()
    );
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                reap(&daemon);
            }
        });
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        let next = tokio::select! {
            c = ferry_transport::accept(&ep) => c,
            _ = tokio::signal::ctrl_c() => None,
            _ = sigterm.recv() => None,
        };
        let Some(conn) = next else {
            tracing::info!("shutting down");
            ep.close(0u32.into(), b"dest-agent shutting down");
            break;
        };
        match conn {
            Ok(conn) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    let peer = conn.remote_address();
                    let fp = ferry_transport::peer_fingerprint(&conn)
                        .map(|f| f.to_string())
                        .unwrap_or_default();
                    tracing::info!(%peer, %fp, "connection");
                    match handle(&daemon, &conn).await {
                        Ok(()) => tracing::info!(%peer, "connection finished"),
                        Err(e) => {
                            let e = match ferry_transport::close_error(&conn) {
                                Some(ce) => format!("{e:#} ({ce})"),
                                None => format!("{e:#}"),
                            };
                            tracing::warn!(%peer, "connection failed: {e}");
                        }
                    }
                    conn.close(0u32.into(), b"");
                });
            }
            Err(e) => tracing::warn!("refused or failed connection: {e}"),
        }
    }
    Ok(())
}

/// Reap restored processes that exited (by PID, never waitpid(-1)).
fn reap(daemon: &Daemon) {
    let mut children = daemon.children.lock().unwrap_or_else(|p| p.into_inner());
    children.retain(|&pid| {
        let mut status = 0;
        // SAFETY: waitpid on one PID with a local status.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            tracing::info!(pid, status, "restored process exited");
            false
        } else {
            r == 0
        }
    });
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

async fn recv_within(r: &mut quinn::RecvStream, t: Duration, what: &str) -> Result<Msg> {
    tokio::time::timeout(t, link::recv(r))
        .await
        .map_err(|_| anyhow::anyhow!("no {what} within {t:?}"))?
}

/// Send a final message, let the peer read it, then return.
async fn finish_with(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &Msg,
) -> Result<()> {
    link::send(send, msg).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

/// One migration, on the connection's first bidirectional stream.
async fn handle(daemon: &Daemon, conn: &quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| anyhow::anyhow!("no control stream within {HELLO_TIMEOUT:?}"))?
        .context("accepting the control stream")?;
    let here = ferry_engine::host::host_info();

    let Msg::Hello { version, host } = recv_within(&mut recv, HELLO_TIMEOUT, "Hello").await? else {
        bail!("expected Hello");
    };
    let refusal = if version != link::VERSION {
        Some(format!(
            "protocol version {version} is not supported (the destination speaks {})",
            link::VERSION
        ))
    } else {
        ferry_engine::host::incompatibility(&host, &here)
            .map(|why| format!("incompatible hosts: {why}"))
    };
    if let Some(reason) = refusal {
        tracing::warn!("refusing: {reason}");
        return finish_with(conn, &mut send, &Msg::Refuse { reason }).await;
    }
    link::send(
        &mut send,
        &Msg::HelloAck {
            version: link::VERSION,
            host: here,
        },
    )
    .await?;

    let Msg::Prepare {
        pid,
        tids,
        exe,
        files,
    } = recv_within(&mut recv, STEP_TIMEOUT, "Prepare").await?
    else {
        bail!("expected Prepare");
    };
    tracing::info!(
        pid,
        threads = tids.len(),
        files = files.len() + 1,
        "prepare"
    );
    let checks = {
        let (tids, exe, files) = (tids.clone(), exe.clone(), files.clone());
        tokio::task::spawn_blocking(move || prepare_check(&tids, &exe, &files))
            .await
            .context("checking the process's needs")?
    };
    if let Some(reason) = checks {
        tracing::warn!(pid, "refusing: {reason}");
        return finish_with(conn, &mut send, &Msg::Refuse { reason }).await;
    }
    link::send(&mut send, &Msg::Ready).await?;

    let (process_len, pages_len) = match recv_within(&mut recv, STEP_TIMEOUT, "Image").await? {
        Msg::Image {
            process_len,
            pages_len,
        } => (process_len, pages_len),
        Msg::Abort { reason } => {
            tracing::warn!(pid, "source aborted: {reason}");
            return Ok(());
        }
        m => bail!("expected Image, got {}", m.name()),
    };
    let dir = tempfile::Builder::new()
        .prefix("ferry-dest-")
        .tempdir_in(&daemon.work_dir)
        .with_context(|| format!("creating a directory in {}", daemon.work_dir.display()))?;
    let t_recv = Instant::now();
    receive_file(
        &mut recv,
        &dir.path().join(ferry_protocol::image::PROCESS_FILE),
        process_len,
    )
    .await?;
    receive_file(
        &mut recv,
        &dir.path().join(ferry_protocol::pages::PAGES_FILE),
        pages_len,
    )
    .await?;
    tracing::info!(
        pid,
        bytes = process_len + pages_len,
        ms = t_recv.elapsed().as_secs_f64() * 1e3,
        "image received"
    );

    let outcome = restore_checked(daemon, dir.path(), pid).await;
    match outcome {
        Ok(s) => {
            daemon
                .children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s.pid);
            let restore_ms = s.duration.as_secs_f64() * 1e3;
            tracing::info!(
                pid,
                threads = s.threads,
                pages = s.pages,
                restore_ms,
                "running"
            );
            let sent = match ferry_transport::close_error(conn) {
                Some(e) => Err(anyhow::anyhow!("{e}")),
                None => link::send(&mut send, &Msg::Running { pid, restore_ms }).await,
            };
            if let Err(e) = sent {
                // The source cannot have seen Running: it resumes its copy,
                // so this one must go.
                tracing::warn!(
                    pid,
                    "the source is gone before Running; killing the restored copy: {e:#}"
                );
                // SAFETY: kill of the process we just restored (our child,
                // not reaped yet, so the PID cannot have been reused).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(e);
            }
            match recv_within(&mut recv, STEP_TIMEOUT, "Done").await {
                Ok(Msg::Done) => tracing::info!(pid, "source confirmed"),
                Ok(m) => tracing::warn!(pid, "expected Done, got {}", m.name()),
                Err(e) => tracing::warn!(
                    pid,
                    "no Done from the source (the process keeps running here): {e:#}"
                ),
            }
            let _ = send.finish();
            Ok(())
        }
        Err(reason) => {
            tracing::warn!(pid, "restore failed: {reason}");
            finish_with(conn, &mut send, &Msg::Failed { reason }).await
        }
    }
}

/// Why the process cannot run here, checked before the source freezes it.
fn prepare_check(tids: &[i32], exe: &link::FileFact, files: &[link::FileFact]) -> Option<String> {
    for (i, &t) in tids.iter().enumerate() {
        if ferry_engine::procfs::exists(t) {
            let what = if i == 0 { "PID" } else { "TID" };
            return Some(format!("{what} {t} is already in use on the destination"));
        }
    }
    if let Some(why) = link::file_mismatch(exe) {
        return Some(format!("executable {why}"));
    }
    for f in files {
        if let Some(why) = link::file_mismatch(f) {
            return Some(format!("mapped file {why}"));
        }
    }
    None
}

/// Copy exactly `len` bytes of the stream into a new file at `path`.
async fn receive_file(recv: &mut quinn::RecvStream, path: &Path, len: u64) -> Result<()> {
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    let mut limited = recv.take(len);
    let n = tokio::time::timeout(STEP_TIMEOUT * 10, tokio::io::copy(&mut limited, &mut file))
        .await
        .map_err(|_| anyhow::anyhow!("receiving {} timed out", path.display()))?
        .with_context(|| format!("receiving {}", path.display()))?;
    if n != len {
        bail!(
            "the stream ended after {n} of {len} bytes of {}",
            path.display()
        );
    }
    file.sync_data().await.ok();
    Ok(())
}

/// Check the received image against what was prepared, then restore it on
/// the restore thread.
async fn restore_checked(
    daemon: &Daemon,
    dir: &Path,
    pid: i32,
) -> Result<ferry_engine::restore::RestoreSummary, String> {
    let img = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || ferry_protocol::read_process_image(&dir))
            .await
            .map_err(|e| format!("reading the image: {e}"))?
            .map_err(|e| format!("invalid process image: {e}"))?
    };
    // The TIDs were checked at Prepare; threads created since then are
    // checked by the restore's own preflight.
    if img.pid != pid {
        return Err(format!(
            "the image is of PID {}, but PID {pid} was prepared",
            img.pid
        ));
    }
    let (tx, rx) = oneshot::channel();
    daemon
        .restorer
        .send(RestoreJob {
            dir: dir.to_path_buf(),
            reply: tx,
        })
        .map_err(|_| "the restore thread is gone".to_string())?;
    rx.await
        .map_err(|_| "the restore thread is gone".to_string())?
}
