//! The per-migration restorer thread. ptrace binds the stub being built to
//! the OS thread that created it, so every [`Restorer`] and [`Ready`] call
//! of one migration runs on one dedicated thread, driven by commands; its
//! answers come back as [`Event`]s. Dropping the [`RestorerThread`] (or the
//! agent dying) before [`Command::Resume`] kills what was built (the
//! restorer and the ready process are dropped with the thread's state).

use ferry_engine::restore::{Ready, RestoreSummary, Restorer};
use ferry_protocol::model::{HostInfo, ProcessImage, Vma};
use ferry_protocol::pages::PageBatch;
use ferry_protocol::wire::{page_decoder, PageFrame};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the restorer thread is asked to do, in order.
pub enum Command {
    /// Create the stub with `pid` and map `vmas` (pass 0's layout).
    Begin {
        pid: i32,
        tids: Vec<i32>,
        host: HostInfo,
        vmas: Arc<Vec<Vma>>,
    },
    /// Apply the layout of a later pass.
    Relayout { vmas: Arc<Vec<Vma>> },
    /// Decode a page frame (checked against `vmas`, the layout of its pass)
    /// and write its pages.
    Pages {
        frame: PageFrame,
        vmas: Arc<Vec<Vma>>,
    },
    /// Apply the rest of the state; the threads stay stopped.
    Finish { image: Box<ProcessImage> },
    /// Let the restored process run.
    Resume,
}

/// What the restorer thread answers.
#[derive(Debug)]
pub enum Event {
    /// `Begin` or `Relayout` done (or failed).
    Layout(Result<(), String>),
    /// A page frame of `pass` was written: its pages and encoded bytes; or
    /// why it was refused.
    Batch(Result<(u32, u64, u64), String>),
    /// `Finish` done: the process is ready, stopped.
    Finished(Result<RestoreSummary, String>),
    /// `Resume` done: the process runs.
    Resumed(Result<RestoreSummary, String>),
}

/// Handle on a restorer thread.
pub struct RestorerThread {
    tx: std::sync::mpsc::Sender<Command>,
}

impl RestorerThread {
    /// Start a restorer thread; its events go to `events`.
    pub fn start(name: String, events: mpsc::UnboundedSender<Event>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(rx, events))?;
        Ok(Self { tx })
    }

    /// Queue a command; false if the thread is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

enum State {
    Empty,
    Building(Restorer),
    Ready(Ready),
    Gone,
}

fn run(rx: std::sync::mpsc::Receiver<Command>, events: mpsc::UnboundedSender<Event>) {
    let mut state = State::Empty;
    let mut decoder = page_decoder();
    let mut batch = PageBatch::default();
    // Ends when the handle is dropped: whatever was built is dropped here,
    // which kills it.
    while let Ok(cmd) = rx.recv() {
        let ev = match cmd {
            Command::Begin {
                pid,
                tids,
                host,
                vmas,
            } => {
                let r = match state {
                    State::Empty => Restorer::begin(pid, &tids, &host, &vmas)
                        .map(|r| state = State::Building(r))
                        .map_err(|e| format!("preparing the restore: {e}")),
                    _ => Err("Begin twice".to_string()),
                };
                Event::Layout(r)
            }
            Command::Relayout { vmas } => Event::Layout(match &mut state {
                State::Building(r) => r
                    .relayout(&vmas)
                    .map_err(|e| format!("applying a new layout: {e}")),
                _ => Err("no restore in progress".to_string()),
            }),
            Command::Pages { frame, vmas } => Event::Batch(match &mut state {
                State::Building(r) => frame
                    .decode_batch(&mut decoder, &vmas, &mut batch)
                    .map_err(|e| format!("page frame of pass {}: {e}", frame.pass))
                    .and_then(|()| {
                        r.write_batch(&batch)
                            .map_err(|e| format!("writing pages: {e}"))
                    })
                    .map(|()| {
                        let pages = batch.runs.iter().map(|r| u64::from(r.pages)).sum();
                        (frame.pass, pages, frame.batch.len() as u64)
                    }),
                _ => Err("pages with no restore in progress".to_string()),
            }),
            Command::Finish { image } => match std::mem::replace(&mut state, State::Gone) {
                State::Building(r) => Event::Finished(match r.finish(&image) {
                    Ok(ready) => {
                        let s = ready.summary.clone();
                        state = State::Ready(ready);
                        Ok(s)
                    }
                    Err(e) => Err(format!("{e}")),
                }),
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
