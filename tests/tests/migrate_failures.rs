//! Nothing is lost when a migration fails before the destination confirms:
//! the dest-agent is killed at each point of a migration (through its test
//! hook `FERRY_DEST_PAUSE_AT`, which makes it print `pausing at POINT` and
//! sleep), or the link goes down in the middle of the transfer. Each time
//! `migrate` fails with a reason, the source process runs on untraced with
//! its memory intact, nothing of it is left on host B, and a second attempt
//! succeeds.
mod common;

use common::hosts::{pair, verify, Background, DestAgent, Hosts, ADDR_B};
use common::{Procs, Run, Workload};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// The dest-agent's test hook: the points of a migration where it stops.
const PAUSE_ENV: &str = "FERRY_DEST_PAUSE_AT";
const POINTS: [&str; 5] = ["hello", "prepare", "pages", "switchover", "restored"];
/// How long a `migrate` may take to give up on a dead or unreachable
/// destination (the QUIC idle timeout is 10 s) and resume its process.
const FAIL_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the agent may take to reach a pause point.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Workload size: large enough that the transfer takes a moment.
const MIB: &str = "64";

/// Wait until the agent's log says `pausing at POINT`, failing early (with
/// both sides' output) if `migrate` exits first.
fn wait_pause(agent: &DestAgent, mig: &mut Background, point: &str) {
    let needle = format!("pausing at {point}");
    let start = Instant::now();
    while !agent.log().contains(&needle) {
        assert!(
            mig.running(),
            "`migrate` exited before the dest-agent paused at {point:?} \
             (does dest-agent implement {PAUSE_ENV}={point}?); \
             migrate stderr:\n{}\ndest-agent log:\n{}",
            mig.stderr(),
            agent.log()
        );
        assert!(
            common::hosts::alive(agent.agent),
            "the dest-agent died before pausing at {point:?}; log:\n{}",
            agent.log()
        );
        assert!(
            start.elapsed() < PAUSE_TIMEOUT,
            "no {needle:?} in the dest-agent's log within {PAUSE_TIMEOUT:?} \
             (does dest-agent implement {PAUSE_ENV}={point}?); log:\n{}\nmigrate stderr:\n{}",
            agent.log(),
            mig.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `migrate` failed cleanly: status 1, an `error:` line that names a lost
/// or timed-out connection.
fn assert_failed_for_lost_peer(r: &Run, what: &str) {
    assert_eq!(
        r.status.code(),
        Some(1),
        "{what}: `migrate` should fail with status 1 ({}):\nstdout: {}\nstderr: {}",
        r.status,
        r.stdout,
        r.stderr
    );
    let err = r
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{what}: no `error:` line from migrate: {}", r.stderr))
        .to_lowercase();
    assert!(
        [
            "connection",
            "timed out",
            "timeout",
            "lost",
            "closed",
            "reset",
            "unreachable",
            "destination",
        ]
        .iter()
        .any(|w| err.contains(w)),
        "{what}: the error does not name the reason (connection lost or timed out): {err}"
    );
    assert_eq!(r.stdout, "", "{what}: no report on failure");
}

/// The source process runs untraced, keeps ticking and its memory verifies.
fn assert_source_intact(h: &Hosts, w: &Workload, ready: &str, what: &str) {
    assert!(
        common::pid_exists(w.pid),
        "{what}: the source process {} is gone",
        w.pid
    );
    let st = common::state(w.pid);
    assert!(
        !matches!(st, 'T' | 't' | 'Z'),
        "{what}: the source process is in state {st}"
    );
    common::assert_running_untraced(w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(h, w, ready, false);
}

/// Nothing with `pid` exists in B's pid namespace (waiting a little for a
/// killed process to be reaped by B's init).
fn assert_gone_from_b(h: &Hosts, pid: i32, what: &str) {
    let start = Instant::now();
    while h.exists_on_b(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: pid {pid} still exists on host B: {}",
            h.exec_b(&["cat", &format!("/proc/{pid}/status")]).stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The second attempt: `migrate --to B` succeeds, the source copy is killed,
/// the process runs on B with the same PID, ticks and verifies.
fn migrate_for_real(h: &Hosts, procs: &mut Procs, w: &Workload, ready: &str, what: &str) {
    let pid = w.pid.to_string();
    let r = h.migrate("a", &["--to", ADDR_B, &pid]);
    r.assert_ok();
    let status = procs
        .reap(w.pid)
        .unwrap_or_else(|e| panic!("{what}: reap the source copy: {e}"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{what}: source copy: {status}"
    );
    let comm = h.exec_b(&["cat", &format!("/proc/{pid}/comm")]);
    comm.assert_ok();
    assert_eq!(comm.stdout.trim(), "wl-memory", "{what}");
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(h, w, ready, true);
}

struct Attempt {
    point: &'static str,
    w: Workload,
    ready: String,
    mig: Background,
    killed_at: Instant,
}

/// One topology, one paused-and-killed migration per point. The attempts
/// overlap (each `migrate` waits out its timeout while the next one runs),
/// then each is checked, then all are migrated for real to a fresh agent.
#[test]
fn destination_killed_at_each_point_loses_nothing() {
    let _serial = common::setup();
    let t0 = Instant::now();
    let h = Hosts::up_as("fmf", "k");
    let mut procs = Procs::new();
    pair(&h);

    let mut attempts = Vec::new();
    for (i, point) in POINTS.into_iter().enumerate() {
        let port = 7421 + i as u16;
        let agent = h.start_agent(
            &mut procs,
            "b",
            port,
            &[(PAUSE_ENV, point)],
            &format!("dest-{point}"),
        );
        let (w, ready) = h.start_workload(&mut procs, MIB, &format!("wl-{point}"));
        let pid = w.pid.to_string();
        let to = format!("{ADDR_B}:{port}");
        let mut mig = h.migrate_bg("a", &["--to", &to, &pid], &format!("migrate-{point}"));
        wait_pause(&agent, &mut mig, point);
        // Killing the nsenter we spawned kills the agent (parent-death
        // signal); `kill` checks that it did.
        agent.kill(&mut procs);
        eprintln!(
            "[{:.1}s] {point}: dest-agent paused and killed",
            t0.elapsed().as_secs_f64()
        );
        attempts.push(Attempt {
            point,
            w,
            ready,
            mig,
            killed_at: Instant::now(),
        });
    }

    let mut rest = Vec::new();
    for a in attempts {
        let what = format!("dest-agent killed at {}", a.point);
        let r = a.mig.wait(FAIL_TIMEOUT);
        eprintln!(
            "[{:.1}s] {}: migrate failed {:.1}s after the kill: {}",
            t0.elapsed().as_secs_f64(),
            a.point,
            a.killed_at.elapsed().as_secs_f64(),
            r.stderr.lines().last().unwrap_or("")
        );
        assert_failed_for_lost_peer(&r, &what);
        assert_source_intact(&h, &a.w, &a.ready, &what);
        assert_gone_from_b(&h, a.w.pid, &what);
        rest.push((a.point, a.w, a.ready));
    }

    // Second attempts, to a fresh agent without the hook.
    h.start_agent(&mut procs, "b", 7420, &[], "dest-fresh");
    for (point, w, ready) in &rest {
        let what = format!("second attempt after a kill at {point}");
        migrate_for_real(&h, &mut procs, w, ready, &what);
    }
    eprintln!("[{:.1}s] done", t0.elapsed().as_secs_f64());
}

/// The link between the hosts goes down while pages are in flight: the
/// agent stays alive but unreachable; `migrate` gives up by timeout and
/// resumes the process. With the link back and a fresh agent, a second
/// attempt succeeds.
#[test]
fn link_down_mid_transfer_loses_nothing() {
    let _serial = common::setup();
    let t0 = Instant::now();
    let h = Hosts::up_as("fmf", "l");
    let mut procs = Procs::new();
    pair(&h);

    let agent = h.start_agent(
        &mut procs,
        "b",
        7420,
        &[(PAUSE_ENV, "pages")],
        "dest-paused",
    );
    let (w, ready) = h.start_workload(&mut procs, MIB, "wl");
    let pid = w.pid.to_string();
    let mut mig = h.migrate_bg("a", &["--to", ADDR_B, &pid], "migrate-1");
    wait_pause(&agent, &mut mig, "pages");
    h.run(&["exec-a", "ip", "link", "set", "veth-a", "down"])
        .assert_ok();
    let down_at = Instant::now();

    let r = mig.wait(FAIL_TIMEOUT);
    eprintln!(
        "[{:.1}s] migrate failed {:.1}s after the link went down: {}",
        t0.elapsed().as_secs_f64(),
        down_at.elapsed().as_secs_f64(),
        r.stderr.lines().last().unwrap_or("")
    );
    let what = "link down during the transfer";
    assert_failed_for_lost_peer(&r, what);
    assert!(
        common::hosts::alive(agent.agent),
        "the paused dest-agent should still be alive (only the link went down); log:\n{}",
        agent.log()
    );
    assert_source_intact(&h, &w, &ready, what);

    h.run(&["exec-a", "ip", "link", "set", "veth-a", "up"])
        .assert_ok();
    agent.kill(&mut procs);
    assert_gone_from_b(&h, w.pid, what);

    h.start_agent(&mut procs, "b", 7420, &[], "dest-fresh");
    migrate_for_real(
        &h,
        &mut procs,
        &w,
        &ready,
        "second attempt after the link came back",
    );
    eprintln!("[{:.1}s] done", t0.elapsed().as_secs_f64());
}
