//! The lazy phase of a session: registering as resumable, parking when
//! the link is lost, taking over a resumed connection (`LazyResume` →
//! `LazyResumed`, pending requests asked again), lazy page frames, and what
//! the lazy thread reports.

use super::*;

/// A session in the lazy phase, ready to take over a new connection from
/// its source.
pub struct LazyWaiter {
    /// The source's TLS fingerprint: only it may resume.
    pub(super) fingerprint: Option<String>,
    pub(super) tx: mpsc::Sender<Resumed>,
}

/// A new connection that resumes a lazy phase, after `LazyResume`.
pub(super) struct Resumed {
    pub(super) conn: quinn::Connection,
    pub(super) ctl: Control,
    pub(super) recv: quinn::RecvStream,
}

/// True if `conn` died of silence (the link went away), as opposed to
/// being closed by either side on purpose.
fn link_lost(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
    )
}

/// Owed source pages requested and not answered, `(addr, pages)` runs of
/// at most [`MAX_REQUEST_PAGES`], each inside one span of `spans` (the
/// `LazyPlan`), as `PageRequest`s.
pub(super) fn request_runs(pages: &[u64], spans: &[PageSpan]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &p in pages {
        if let Some(last) = out.last_mut() {
            let n = u64::from(last.1);
            if last.0 + n * PAGE_SIZE == p
                && last.1 < MAX_REQUEST_PAGES
                && find_owed_span(spans, last.0, (n + 1) * PAGE_SIZE).is_some()
            {
                last.1 += 1;
                continue;
            }
        }
        if find_owed_span(spans, p, PAGE_SIZE).is_some() {
            out.push((p, 1));
        }
    }
    out
}

/// A new connection asks to resume the lazy phase of `pid`: hand it over
/// to that session if it is from the same source, else refuse.
pub(super) async fn resume(
    shared: &Shared,
    conn: &quinn::Connection,
    mut ctl: Control,
    recv: quinn::RecvStream,
    pid: i32,
) -> Result<Outcome> {
    let fp = ferry_transport::peer_fingerprint(conn).map(|f| f.to_string());
    tracing::info!(pid, "lazy resume");
    let tx = {
        let sessions = lock(&shared.lazy_sessions);
        match sessions.get(&pid) {
            None => Err(format!(
                "no lazy migration of process {pid} is going on here \
                 (it completed, was given up, or never came here)"
            )),
            // Mutual TLS always names the peer; without a name, no resume.
            Some(w) if w.fingerprint.is_none() || w.fingerprint != fp => Err(format!(
                "the lazy migration of process {pid} was started by another source ({}); \
                 this one is {}",
                w.fingerprint.as_deref().unwrap_or("unknown"),
                fp.as_deref().unwrap_or("unknown")
            )),
            Some(w) => Ok(w.tx.clone()),
        }
    };
    let tx = match tx {
        Ok(tx) => tx,
        Err(reason) => {
            ctl.refuse(conn, RefuseCode::Other, reason).await;
            return Ok(Outcome::Finished);
        }
    };
    let r = Resumed {
        conn: conn.clone(),
        ctl,
        recv,
    };
    match tx.try_send(r) {
        Ok(()) => Ok(Outcome::HandedOver),
        Err(e) => {
            let full = matches!(e, mpsc::error::TrySendError::Full(_));
            let mut r = e.into_inner();
            let reason = if full {
                format!(
                    "another connection is already resuming the lazy migration of process {pid}"
                )
            } else {
                format!("the lazy migration of process {pid} has just ended here")
            };
            r.ctl.refuse(conn, RefuseCode::Other, reason).await;
            Ok(Outcome::Finished)
        }
    }
}

/// Decode a lazy page frame, checking every run against the owed spans.
pub(super) fn decode_lazy(
    decoder: &mut BatchDecoder,
    owed: &RwLock<Option<Arc<Vec<PageSpan>>>>,
    f: LazyFrame,
) -> Result<(Origin, PageBatch)> {
    let spans = owed
        .read()
        .ok()
        .and_then(|o| o.clone())
        .ok_or_else(|| anyhow!("lazy page frame in a migration without LazyPlan"))?;
    let mut batch = PageBatch::default();
    f.decode_batch(decoder, &spans, &mut batch)
        .context("lazy page frame")?;
    let origin = match f.origin {
        LazyOrigin::Pushed => Origin::Pushed,
        LazyOrigin::Requested => Origin::Requested,
    };
    Ok((origin, batch))
}

/// Hand a lazy page frame to the lazy thread (frames go there directly,
/// not through the session: a requested page must not wait behind others).
pub(super) async fn deliver_lazy(
    decoder: &mut BatchDecoder,
    owed: &RwLock<Option<Arc<Vec<PageSpan>>>>,
    inbox: &OnceLock<LazyInbox>,
    f: LazyFrame,
) -> Result<()> {
    let (origin, batch) = decode_lazy(decoder, owed, f)?;
    let inbox = inbox
        .get()
        .ok_or_else(|| anyhow!("lazy page frame before the process runs"))?;
    // False after the lazy phase: a late duplicate, dropped.
    inbox.deliver(origin, batch).await;
    Ok(())
}

/// The next resumed connection; never, without a receiver.
pub(super) async fn next_resume(rx: &mut Option<mpsc::Receiver<Resumed>>) -> Option<Resumed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Migration<'_> {
    /// The lazy phase began (`Running` sent): a lost connection may be
    /// resumed from now on.
    pub(super) fn register(&mut self) {
        let (tx, rx) = mpsc::channel(1);
        lock(&self.shared.lazy_sessions).insert(
            self.pid,
            LazyWaiter {
                fingerprint: self.fingerprint.clone(),
                tx,
            },
        );
        self.resume_rx = Some(rx);
        self.lazy_active = true;
    }

    /// No more resumes (the lazy phase is over, given up or failed).
    pub(super) fn unregister(&mut self) {
        if self.lazy_active {
            self.lazy_active = false;
            lock(&self.shared.lazy_sessions).remove(&self.pid);
        }
    }

    /// An error ended the conversation on this connection: may a new one
    /// take over? Only in the lazy phase, and only if the link died (a
    /// close by the source, an Abort or a protocol error are final).
    pub(super) fn may_resume(&self) -> bool {
        self.lazy_active && link_lost(&self.conn)
    }

    pub(super) fn lazy_timeout(&self) -> Duration {
        self.shared.lazy_timeout.unwrap_or(DEFAULT_LAZY_TIMEOUT)
    }

    /// Go on with the lazy phase on `res`; if that connection is lost as
    /// well, park again (`None`: the session ends well, as for
    /// [`Migration::park`]).
    pub(super) async fn resume_with(&mut self, mut res: Resumed) -> Result<Option<Readers>> {
        loop {
            match self.adopt(res).await {
                Ok(rd) => return Ok(Some(rd)),
                Err(e) if self.may_resume() => match self.park(e).await? {
                    Some(next) => res = next,
                    None => return Ok(None),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// The connection of the lazy phase is lost: wait for the source to
    /// resume it on a new one, at most the lazy timeout, while the lazy
    /// thread keeps serving faults (its own bound on a waiting fault still
    /// applies). `None`: every page had arrived and the source did not come
    /// back to hear it; the process runs here.
    pub(super) async fn park(&mut self, e: anyhow::Error) -> Result<Option<Resumed>> {
        let pid = self.pid;
        let timeout = self.lazy_timeout();
        let e = match ferry_transport::close_error(&self.conn) {
            Some(ce) => format!("{e:#} ({ce})"),
            None => format!("{e:#}"),
        };
        tracing::warn!(
            pid,
            "lazy phase of process {pid}: connection to the source lost ({e}); \
             waiting up to {} s for it to reconnect",
            timeout.as_secs()
        );
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                res = next_resume(&mut self.resume_rx) => {
                    if let Some(res) = res {
                        return Ok(Some(res));
                    }
                }
                ev = self.lazy_events.1.recv() => match ev {
                    // Already recorded as requested: asked again on resume.
                    Some(LazyEvent::Requests(_)) | None => {}
                    Some(LazyEvent::Complete(stats)) => {
                        self.lazy = None;
                        self.pending_complete = Some(wire_stats(&stats));
                        tracing::info!(pid, "every page of process {pid} arrived while the source was away");
                    }
                    Some(LazyEvent::Failed(reason)) => {
                        self.lazy = None;
                        self.unregister();
                        bail!("lazy phase of process {pid} failed: {reason}");
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.unregister();
                    if self.pending_complete.is_some() {
                        tracing::warn!(
                            pid,
                            "the source did not reconnect within {} s to hear that every page \
                             of process {pid} arrived; the process runs here",
                            timeout.as_secs()
                        );
                        return Ok(None);
                    }
                    let why = format!(
                        "the connection to the source was lost and it did not reconnect within {} s",
                        timeout.as_secs()
                    );
                    if let Some(t) = self.lazy.take() {
                        t.abandon(why.clone());
                    }
                    bail!("lazy phase of process {pid} failed: {why}");
                }
            }
        }
    }

    /// Go on with the lazy phase on a resumed connection: tell the source
    /// what is still missing, ask again for what was asked and not
    /// answered.
    pub(super) async fn adopt(&mut self, res: Resumed) -> Result<Readers> {
        let pid = self.pid;
        self.conn = res.conn;
        self.ctl = res.ctl;
        self.switched = true;
        let snap = match &self.lazy {
            Some(t) => t.snapshot().await.unwrap_or_default(),
            None => Snapshot::default(),
        };
        let rd = self.readers(res.recv);
        let owed: Vec<PageSpan> = snap
            .owed
            .iter()
            .map(|&(addr, pages)| PageSpan { addr, pages })
            .collect();
        let owed_pages: u64 = owed.iter().map(|s| s.pages).sum();
        self.ctl.send(&ControlMsg::LazyResumed { owed }).await?;
        let spans = self
            .shared_owed
            .read()
            .ok()
            .and_then(|o| o.clone())
            .unwrap_or_default();
        let reqs = request_runs(&snap.requested, &spans);
        tracing::info!(
            pid,
            owed_pages,
            requests = reqs.len(),
            "lazy phase of process {pid} resumed on a new connection"
        );
        for (addr, pages) in reqs {
            self.ctl
                .send(&ControlMsg::PageRequest { addr, pages })
                .await?;
        }
        if let Some(stats) = self.pending_complete {
            // Every page arrived while the link was down (or LazyComplete
            // was lost with it): say it again; Done follows.
            self.ctl.send(&ControlMsg::LazyComplete { stats }).await?;
        }
        Ok(rd)
    }

    /// What the lazy thread reports; true when the session is over.
    pub(super) async fn on_lazy_event(
        &mut self,
        ev: LazyEvent,
        ctl_rx: &mut mpsc::Receiver<Result<ControlMsg, WireError>>,
    ) -> Result<bool> {
        match ev {
            LazyEvent::Requests(reqs) => {
                for (addr, pages) in reqs {
                    self.ctl
                        .send(&ControlMsg::PageRequest { addr, pages })
                        .await?;
                }
                Ok(false)
            }
            LazyEvent::Complete(stats) => {
                self.lazy = None;
                // Until Done, a lost connection may still be resumed to
                // say it again.
                self.pending_complete = Some(wire_stats(&stats));
                tracing::info!(
                    pid = self.pid,
                    faults = stats.faults,
                    pushed = stats.pages_pushed,
                    requested = stats.pages_requested,
                    forks = stats.forks,
                    max_fault_wait_ms = stats.max_fault_wait.as_secs_f64() * 1e3,
                    last_page_ms = stats.last_page.map_or(0.0, |d| d.as_secs_f64() * 1e3),
                    "lazy phase complete"
                );
                self.ctl
                    .send(&ControlMsg::LazyComplete {
                        stats: wire_stats(&stats),
                    })
                    .await?;
                self.wait_done(ctl_rx).await.map(|()| true)
            }
            LazyEvent::Failed(reason) => {
                self.lazy = None;
                self.unregister();
                let _ = self
                    .ctl
                    .send(&ControlMsg::Abort {
                        reason: cut(format!("lazy phase failed: {reason}")),
                    })
                    .await;
                let _ = self.ctl.send.finish();
                Err(anyhow!(
                    "lazy phase of process {} failed: {reason}",
                    self.pid
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outstanding_requests_are_asked_again_in_runs_inside_one_span() {
        const P: u64 = PAGE_SIZE;
        let spans = [
            PageSpan {
                addr: 0x10000,
                pages: 4,
            },
            // Touches the first one: a run must not cross into it.
            PageSpan {
                addr: 0x14000,
                pages: 1000,
            },
        ];
        let mut pages = vec![0x10000, 0x11000, 0x13000, 0x14000, 0x15000];
        pages.extend((0..600).map(|i| 0x20000 + i * P));
        pages.push(0x50_0000);
        let runs = request_runs(&pages, &spans);
        assert_eq!(
            runs,
            vec![
                (0x10000, 2),
                (0x13000, 1),
                (0x14000, 2),
                (0x20000, MAX_REQUEST_PAGES),
                (
                    0x20000 + u64::from(MAX_REQUEST_PAGES) * P,
                    600 - MAX_REQUEST_PAGES
                ),
            ],
            "0x500000 is not owed and is dropped"
        );
        assert!(request_runs(&[], &spans).is_empty());
    }
}
