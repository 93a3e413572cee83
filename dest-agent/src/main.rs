//! `dest-agent`: the destination side of a migration. It listens for QUIC
//! connections from trusted `migrate --to` sources (mutual TLS with pinned
//! fingerprints), checks that a process can run here, receives its pages
//! and state and restores it with the same PID ([`ferry_dest_agent::session`]).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_dest_agent::session::{self, PausePoint, Shared, DEFAULT_STDIO_DIR, PAUSE_ENV};
use ferry_transport::{Fingerprint, Identity, TrustStore, DEFAULT_PORT};
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const AFTER_LONG_HELP: &str = "\
Testing aid:
  FERRY_DEST_PAUSE_AT=POINT  stop every migration at POINT: the agent logs
                             `pausing at POINT` (WARN, on stderr) and waits
                             forever there (failure tests then kill it).
                             POINT is one of: hello (after Hello was
                             received), prepare (after Prepare was received),
                             pages (after the first page batch of pass 0 was
                             written), switchover (after Switchover was
                             received, before the restore is finished),
                             restored (after the restore finished, before
                             Running is sent). Not for production use.";

/// ferry's destination agent: receives migrated processes.
#[derive(Parser)]
#[command(name = "dest-agent", version, about, long_about = None, after_long_help = AFTER_LONG_HELP)]
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
    /// Scratch directory (default: the temp dir); images are streamed into
    /// the restored process, nothing is written there today.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// The same as `listen --lazy-timeout`.
    #[arg(long, value_name = "SECS")]
    lazy_timeout: Option<u64>,
    /// The same as `listen --stdio-dir`.
    #[arg(long, value_name = "DIR")]
    stdio_dir: Option<PathBuf>,
    /// The interface that takes the service addresses moving here with a
    /// process (default: the interface whose subnet contains each).
    #[arg(long, global = true, value_name = "DEV")]
    addr_dev: Option<String>,
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
        /// Scratch directory (default: the temp dir); images are streamed into
        /// the restored process, nothing is written there today.
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Lazy migrations (`migrate --lazy`): how long a restored process
        /// may wait for a page from its source before it is stopped, in
        /// seconds (default 30). Part of its memory is only on the source
        /// until the last page arrives; if the source or the link is gone
        /// for longer than this, the process cannot continue and is killed
        /// here, with an error in the log. A lost connection is waited for
        /// as long: the source reconnects and the lazy phase resumes.
        #[arg(long, value_name = "SECS")]
        lazy_timeout: Option<u64>,
        /// Where the output of a migrated tree goes when its stdout or
        /// stderr reached outside it on the source (a shell's pipe, a
        /// terminal, journald's socket): appended to DIR/ferry-PID.log
        /// (PID: the tree's root), whose path is logged. Stdin that came
        /// from outside reads end of file. Default: /var/log/ferry.
        #[arg(long, value_name = "DIR")]
        stdio_dir: Option<PathBuf>,
    },
    /// Print this agent's fingerprint (creating its identity if needed).
    Identity,
    /// Trust a source agent, given its fingerprint (`migrate identity`).
    Trust {
        /// `sha256:` followed by 64 hex digits.
        fingerprint: String,
    },
    /// Internal: started by the agent for each lazy migration; kills PID if
    /// the agent dies before every page of it arrived.
    #[command(hide = true)]
    LazyGuard {
        /// The lazily restored process.
        pid: i32,
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
        .with_ansi(std::io::stderr().is_terminal())
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
        Some(Command::LazyGuard { pid }) => std::process::exit(ferry_dest_agent::guard::run(pid)),
        Some(Command::Listen {
            listen,
            work_dir,
            lazy_timeout,
            stdio_dir,
        }) => listen_cmd(
            &config_dir,
            listen.or(cli.listen),
            work_dir.or(cli.work_dir),
            lazy_timeout.or(cli.lazy_timeout),
            stdio_dir.or(cli.stdio_dir),
            cli.addr_dev,
        ),
        None => listen_cmd(
            &config_dir,
            cli.listen,
            cli.work_dir,
            cli.lazy_timeout,
            cli.stdio_dir,
            cli.addr_dev,
        ),
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

fn listen_cmd(
    config_dir: &Path,
    listen: Option<String>,
    work_dir: Option<PathBuf>,
    lazy_timeout: Option<u64>,
    stdio_dir: Option<PathBuf>,
    addr_dev: Option<String>,
) -> Result<()> {
    if lazy_timeout == Some(0) {
        bail!("--lazy-timeout must be at least 1 second");
    }
    let addr = match listen {
        Some(s) => parse_listen(&s)?,
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
    };
    if let Some(dir) = work_dir {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let pause_at = match std::env::var(PAUSE_ENV) {
        Ok(v) if !v.is_empty() => Some(PausePoint::parse(&v).with_context(|| {
            let names: Vec<&str> = PausePoint::ALL.iter().map(|(_, n)| *n).collect();
            format!("{PAUSE_ENV}={v:?}: expected one of {}", names.join(", "))
        })?),
        _ => None,
    };
    if let Some(p) = pause_at {
        tracing::warn!("testing aid: every migration stops at {}", p.name());
    }
    let id = Identity::load_or_create(config_dir)?;
    let trust = TrustStore::load(config_dir)?;
    // No migration runs yet: a table of ours is a crashed agent's.
    match ferry_engine::net::block::cleanup() {
        Ok(_) | Err(ferry_engine::net::NetError::NftMissing) => {}
        Err(e) => tracing::warn!("removing stale tables of an earlier migration: {e}"),
    }
    let shared = Arc::new(Shared {
        pause_at,
        lazy_timeout: lazy_timeout.map(Duration::from_secs),
        stdio_dir: stdio_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STDIO_DIR)),
        addr_dev,
        ..Shared::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(shared, addr, id, trust))
}

async fn serve(
    shared: Arc<Shared>,
    addr: SocketAddr,
    id: Identity,
    trust: TrustStore,
) -> Result<()> {
    // Small receive windows: what the network holds unread is restore work
    // still to do after the source freezes, so keep it to ~16 MiB (enough
    // for full speed on a LAN; the source's passes overlap the rest).
    let opts = ferry_transport::EndpointOptions {
        stream_window: 4 << 20,
        connection_window: 16 << 20,
        ..Default::default()
    };
    let ep = ferry_transport::server_endpoint_with(addr, &id, trust, &opts)?;
    tracing::info!(
        "listening on {} as {}",
        ep.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        id.fingerprint()
    );
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                reap(&shared);
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
                let shared = shared.clone();
                tokio::spawn(async move {
                    let peer = conn.remote_address();
                    let fp = ferry_transport::peer_fingerprint(&conn)
                        .map(|f| f.to_string())
                        .unwrap_or_default();
                    tracing::info!(%peer, %fp, "connection");
                    match session::handle(&shared, &conn).await {
                        Ok(session::Outcome::Finished) => {
                            tracing::info!(%peer, "connection finished");
                            session::close_with(&conn, &Ok(()));
                        }
                        Ok(session::Outcome::HandedOver) => {
                            // The session of the lazy phase it resumes owns
                            // it now.
                            tracing::info!(%peer, "connection handed over to the lazy phase it resumes");
                        }
                        Err(e) => {
                            let e = match ferry_transport::close_error(&conn) {
                                Some(ce) => format!("{e:#} ({ce})"),
                                None => format!("{e:#}"),
                            };
                            tracing::error!(%peer, "connection failed: {e}");
                            session::close_with(&conn, &Err(anyhow::anyhow!(e)));
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("refused or failed connection: {e}"),
        }
    }
    Ok(())
}

/// Reap restored processes that exited (by PID, never waitpid(-1)).
fn reap(shared: &Shared) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut children = shared.children.lock().unwrap_or_else(|p| p.into_inner());
    children.retain(|&pid| {
        match waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::StillAlive) => true,
            Ok(WaitStatus::Exited(_, code)) => {
                tracing::info!(pid, code, "restored process exited");
                false
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                tracing::info!(pid, signal = %sig, "restored process was killed");
                false
            }
            // Stopped or continued: still ours.
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(pid, "waitpid: {e}");
                false
            }
        }
    });
}
