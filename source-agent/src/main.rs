//! `migrate`: checkpoint, restore and (later) live-migrate Linux processes.

mod check;
mod lazy;
mod netmove;
mod passes;
mod precopy;
mod remote;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_engine::dump::{checkpoint, CheckpointOptions};
use ferry_engine::files::StdioPolicy;
use ferry_engine::restore::{restore, RestoreOptions};
use std::path::PathBuf;

/// ferry: move running Linux processes between hosts, or to disk and back.
///
/// `migrate --to HOST[:PORT] PID` moves a process to the host where a
/// trusted `dest-agent` listens (default port 7420). Memory is copied while
/// the process runs (pre-copy: pass 0 sends everything, each next pass what
/// was written meanwhile), then it is frozen for the last small part and
/// resumes on the destination. Until the destination confirms that it runs,
/// any failure leaves the process running here, untouched.
///
/// With --lazy the process resumes on the destination before all of its
/// memory has arrived: missing pages are fetched when it touches them and
/// the rest is pushed in the background; `migrate` returns once every page
/// has arrived. This bounds the freeze for processes that write faster
/// than the link, at a price: until the last page arrives the process
/// depends on both hosts, and if this host or the link fails for longer
/// than the destination waits (dest-agent --lazy-timeout), the process is
/// lost. A lost connection is re-established (migrate --lazy-timeout) and
/// the lazy phase resumes where it was. Pre-copy alone (without --lazy)
/// never has this risk.
#[derive(Parser)]
#[command(name = "migrate", version, about)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Configuration directory (identity and trusted peers); default
    /// $FERRY_CONFIG_DIR or /etc/ferry.
    #[arg(long, global = true, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Migrate PID to the dest-agent at HOST[:PORT].
    #[arg(long, value_name = "HOST[:PORT]", requires = "pid")]
    to: Option<String>,
    /// With --to: print the report as one JSON object.
    #[arg(long, requires = "to")]
    json: bool,
    /// With --to: freeze once the rest of memory is expected to move within
    /// this many milliseconds (pre-copy's downtime target).
    #[arg(long, value_name = "MS", default_value_t = 10, requires = "to")]
    max_downtime: u64,
    /// With --to: passes while the process runs before it is frozen; 0 is
    /// plain stop-and-copy (freeze first, then move everything).
    #[arg(long, value_name = "N", default_value_t = 8, requires = "to")]
    max_passes: u32,
    /// With --to: switch over early and serve the rest of the memory on
    /// demand (post-copy); after the pre-copy passes, if any
    /// (`--max-passes 0 --lazy` switches over at once). See the risk above.
    #[arg(long, requires = "to")]
    lazy: bool,
    /// With --lazy: cap the background push at this many MB/s of memory
    /// (0: as fast as the link goes); pages asked for by faults are never
    /// held back.
    #[arg(long, value_name = "MBPS", default_value_t = 0.0, requires = "lazy")]
    lazy_rate: f64,
    /// With --lazy: if the connection is lost during the lazy phase (the
    /// link down longer than the 10 s idle timeout), keep the frozen copy
    /// and try to reconnect for this many seconds (at least 1) before
    /// giving up; the process is lost if it fails. The destination waits
    /// for its pages no longer than its own `dest-agent --lazy-timeout`.
    #[arg(long, value_name = "SECS", default_value_t = lazy::DEFAULT_RECONNECT_SECS, requires = "lazy")]
    lazy_timeout: u64,
    /// With --to: the process to migrate.
    #[arg(requires = "to")]
    pid: Option<i32>,
    #[command(subcommand)]
    cmd: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Freeze a process and all its descendants, write their image to a
    /// directory, then kill them (or let them continue with --leave-running).
    ///
    /// The tree comes back as it was: every process with its PID, parent,
    /// process group and session, zombies included; fds shared across fork
    /// and dup stay shared; pipes between the processes keep their unread
    /// data; shared memory (shared anonymous, memfd, /dev/shm, SysV) stays
    /// shared; eventfds, timerfds, signalfds, epoll instances, pidfds,
    /// FIFOs, inotify instances, file locks and TCP (listening and
    /// established, through TCP_REPAIR), UDP and unix sockets (pairs and
    /// connections inside the tree, bound, listening, with their queued
    /// messages) come back as the kernel held them; so do the credentials,
    /// securebits, no_new_privs and dumpable flag. A pipe whose other end
    /// nobody holds any more comes back with that end closed. Stdin, stdout
    /// and stderr that reach outside the tree (a shell's pipe, a terminal,
    /// journald's socket) cannot come along: on restore stdin reads end of
    /// file and output goes to a log file (see `restore --stdio-log`). Not
    /// supported yet (the checkpoint fails, names the reason, and every
    /// process keeps running): seccomp filters (a sandboxed process is
    /// never restored unsandboxed), unix sockets connected outside the
    /// tree, with fds in flight or with connections waiting to be accepted,
    /// netlink, raw and packet sockets, half-closed TCP connections,
    /// terminals inside the tree, io_uring, perf and BPF fds, deleted
    /// mapped files, and processes sharing an fd table or address space
    /// (vfork, CLONE_FILES).
    Checkpoint {
        /// PID of the process to checkpoint.
        pid: i32,
        /// Directory for the image (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Let the process continue after the checkpoint instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// Files deleted while open travel in the image with their contents,
        /// up to this many MiB for the whole tree; above, the checkpoint is
        /// refused, naming the file.
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        max_deleted_mib: u64,
    },
    /// Recreate a process tree from an image directory, every process with
    /// the same PID and thread ids, and let it run. Prints the root's PID on
    /// stdout.
    ///
    /// The PIDs and TIDs must be free on this host, and the executables and
    /// mapped files must be the same as at checkpoint time.
    Restore {
        /// Directory holding the image written by `migrate checkpoint`.
        #[arg(long)]
        dir: PathBuf,
        /// Where output that went outside the tree (a shell's pipe, a
        /// terminal, a socket) is appended after the restore; stdin that
        /// came from outside reads end of file. Default: DIR/stdio.log.
        #[arg(long, value_name = "PATH")]
        stdio_log: Option<PathBuf>,
    },
    /// Show what this kernel offers ferry; exits non-zero if something
    /// required is missing.
    Check {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print this side's fingerprint (creating its identity if needed).
    Identity,
    /// Trust a destination agent, given its fingerprint (`dest-agent identity`).
    Trust {
        /// `sha256:` followed by 64 hex digits.
        fingerprint: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        // A refused TLS peer is reported by the error message itself.
        0 => "warn,ferry_transport::tls=error",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let config_dir = cli
        .config_dir
        .clone()
        .unwrap_or_else(ferry_transport::default_config_dir);
    let result = match (cli.cmd, cli.to, cli.pid) {
        (Some(cmd), _, _) => run(cmd, &config_dir),
        (None, Some(to), Some(pid)) => {
            let policy = precopy::Policy {
                max_downtime: std::time::Duration::from_millis(cli.max_downtime),
                max_passes: cli.max_passes,
            };
            let lazy = cli.lazy.then(|| lazy::LazyOptions {
                push_rate: (cli.lazy_rate > 0.0).then_some(cli.lazy_rate * 1e6),
                reconnect_timeout: std::time::Duration::from_secs(cli.lazy_timeout),
            });
            if cli.lazy && cli.lazy_timeout == 0 {
                Err(anyhow::anyhow!("--lazy-timeout must be at least 1 second"))
            } else {
                remote::run(&config_dir, &to, pid, policy, lazy, cli.json).map(|()| 0)
            }
        }
        _ => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            std::process::exit(2);
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cmd: Command, config_dir: &std::path::Path) -> Result<i32> {
    match cmd {
        Command::Checkpoint {
            pid,
            dir,
            leave_running,
            max_deleted_mib,
        } => {
            let opts = CheckpointOptions {
                leave_running,
                max_deleted_bytes: max_deleted_mib.saturating_mul(1 << 20),
            };
            let s = checkpoint(pid, &dir, &opts)
                .with_context(|| format!("checkpoint of process {pid} failed"))?;
            println!(
                "checkpoint pid={} processes={} threads={} pages={} zero_pages={} bytes={} frozen_ms={:.2} total_ms={:.2} dir={} {}",
                s.pid,
                s.processes,
                s.threads,
                s.pages.pages,
                s.pages.zero_pages,
                s.pages.bytes_written + s.image_bytes,
                s.frozen.as_secs_f64() * 1e3,
                s.total.as_secs_f64() * 1e3,
                dir.display(),
                if leave_running { "left running" } else { "killed" },
            );
            Ok(0)
        }
        Command::Restore { dir, stdio_log } => {
            let opts = RestoreOptions {
                stdio: StdioPolicy {
                    log: stdio_log.unwrap_or_else(|| dir.join("stdio.log")),
                },
            };
            let s = restore(&dir, &opts)
                .with_context(|| format!("restore from {} failed", dir.display()))?;
            eprintln!(
                "restored pid={} processes={} threads={} pages={} restore_ms={:.2}",
                s.pid,
                s.processes,
                s.threads,
                s.pages,
                s.duration.as_secs_f64() * 1e3
            );
            if let Some(log) = &s.stdio_log {
                eprintln!(
                    "output that went outside the tree now goes to {}",
                    log.display()
                );
            }
            println!("{}", s.pid);
            Ok(0)
        }
        Command::Check { json } => Ok(if check::run(json)? { 0 } else { 1 }),
        Command::Identity => {
            let id = ferry_transport::Identity::load_or_create(config_dir)?;
            println!("{}", id.fingerprint());
            Ok(0)
        }
        Command::Trust { fingerprint } => {
            let fp: ferry_transport::Fingerprint = fingerprint.trim().parse()?;
            std::fs::create_dir_all(config_dir)
                .with_context(|| format!("creating {}", config_dir.display()))?;
            let store = ferry_transport::TrustStore::load(config_dir)?;
            if store.add(fp.as_str())? {
                eprintln!("trusted {fp}");
            } else {
                eprintln!("{fp} was already trusted");
            }
            Ok(0)
        }
    }
}
