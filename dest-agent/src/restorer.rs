//! The per-migration restorer thread. ptrace binds the stubs being built to
//! the OS thread that created them, so every [`TreeRestorer`] and [`Ready`] call
//! of one migration runs on one dedicated thread, driven by commands; its
//! answers come back as [`Event`]s. Dropping the [`RestorerThread`] (or the
//! agent dying) before [`Command::Resume`] kills what was built (the
//! restorer and the ready process are dropped with the thread's state).

use ferry_engine::files::StdioPolicy;
use ferry_engine::restore::{Ready, RestoreSummary, TreeRestorer};
use ferry_protocol::model::{HostInfo, TreeImage, TreeLayout};
use ferry_protocol::pages::{PageBatch, PageSpace};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the restorer thread is asked to do, in order.
pub enum Command {
    /// Create the tree's stubs and map their areas (pass 0's layout);
    /// stdio that reached outside the tree goes by `stdio`.
    Begin {
        host: HostInfo,
        layout: Arc<TreeLayout>,
        stdio: StdioPolicy,
    },
    /// Apply the layout of a later pass.
    Relayout { layout: Arc<TreeLayout> },
    /// Write the pages of a decoded (and validated) page frame.
    Pages(Decoded),
    /// Apply the rest of the state; the threads stay stopped. With `owed`
    /// (a lazy switchover) those pages are left to a userfaultfd.
    Finish {
        image: Box<TreeImage>,
        owed: Option<Arc<Vec<(u64, u64)>>>,
    },
    /// Let the restored process run.
    Resume,
}

/// A page frame decoded and checked against the layout of its pass (by
/// the stream reader that received it, so frames decode in parallel).
#[derive(Debug)]
pub struct Decoded {
    /// Its pass.
    pub pass: u32,
    /// Whose pages.
    pub space: PageSpace,
    /// Its pages.
    pub batch: PageBatch,
    /// Length of the encoded batch.
    pub bytes: u64,
}

/// Commands queued before `send` waits: bounds what the destination holds
/// decoded but not written, so the network slows to the restore's pace.
const COMMAND_QUEUE: usize = 32;

/// What the restorer thread answers.
#[derive(Debug)]
pub enum Event {
    /// `Begin` or `Relayout` done (or failed).
    Layout(Result<(), String>),
    /// A page frame of `pass` was written: its pages and encoded bytes; or
    /// why it was refused.
    Batch(Result<(u32, u64, u64), String>),
    /// `Finish` done: the process is ready, stopped (and, for a lazy
    /// switchover, its armed userfaultfd).
    Finished(Result<(RestoreSummary, Option<LazyUffd>), String>),
    /// `Resume` done: the process runs.
    Resumed(Result<RestoreSummary, String>),
}

/// The userfaultfd of a lazily restored process, to be served from before
/// it resumes.
pub struct LazyUffd(pub userfaultfd::Uffd);

impl std::fmt::Debug for LazyUffd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyUffd")
    }
}

/// Handle on a restorer thread.
pub struct RestorerThread {
    tx: std::sync::mpsc::SyncSender<Command>,
}

impl RestorerThread {
    /// Start a restorer thread; its events go to `events`.
    pub fn start(name: String, events: mpsc::UnboundedSender<Event>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Command>(COMMAND_QUEUE);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(rx, events))?;
        Ok(Self { tx })
    }

    /// Queue a command, waiting while the queue is full; false if the
    /// thread is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

enum State {
    Empty,
    Building(TreeRestorer),
    Ready(Ready),
    Gone,
}

fn run(rx: std::sync::mpsc::Receiver<Command>, events: mpsc::UnboundedSender<Event>) {
    let mut state = State::Empty;
    // Ends when the handle is dropped: whatever was built is dropped here,
    // which kills it.
    while let Ok(cmd) = rx.recv() {
        let ev = match cmd {
            Command::Begin {
                host,
                layout,
                stdio,
            } => {
                let r = match state {
                    State::Empty => TreeRestorer::begin(&layout, &host)
                        .map(|mut r| {
                            r.set_stdio(stdio);
                            state = State::Building(r)
                        })
                        .map_err(|e| format!("preparing the restore: {e}")),
                    _ => Err("Begin twice".to_string()),
                };
                Event::Layout(r)
            }
            Command::Relayout { layout } => Event::Layout(match &mut state {
                State::Building(r) => r
                    .relayout(&layout)
                    .map_err(|e| format!("applying a new layout: {e}")),
                _ => Err("no restore in progress".to_string()),
            }),
            Command::Pages(d) => Event::Batch(match &mut state {
                State::Building(r) => r
                    .write_batch(d.space, &d.batch)
                    .map_err(|e| format!("writing pages: {e}"))
                    .map(|()| (d.pass, d.batch.total_pages(), d.bytes)),
                _ => Err("pages with no restore in progress".to_string()),
            }),
            Command::Finish { image, owed } => match std::mem::replace(&mut state, State::Gone) {
                State::Building(r) => {
                    let done = match &owed {
                        Some(o) => r.finish_lazy(&image, o),
                        None => r.finish(&image),
                    };
                    Event::Finished(match done {
                        Ok(mut ready) => {
                            let s = ready.summary.clone();
                            let uffd = ready.take_uffd().map(LazyUffd);
                            state = State::Ready(ready);
                            Ok((s, uffd))
                        }
                        Err(e) => Err(format!("{e}")),
                    })
                }
                _ => Event::Finished(Err("no restore in progress".to_string())),
            },
            Command::Resume => match std::mem::replace(&mut state, State::Gone) {
                State::Ready(ready) => Event::Resumed(ready.resume().map_err(|e| format!("{e}"))),
                _ => Event::Resumed(Err("nothing to resume".to_string())),
            },
        };
        if events.send(ev).is_err() {
            break;
        }
    }
}
