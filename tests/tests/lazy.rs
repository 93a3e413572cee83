//! Lazy pages (post-copy) between the two hosts of `scripts/hosts`:
//! `migrate --to B PID --lazy` switches over early, the process resumes on
//! B with most of its private memory still on A, B's userfaultfd fetches
//! the pages it touches from A while the rest is pushed in the background,
//! and `migrate` returns once every page has arrived. Afterwards every page
//! holds what it held at the freeze, also for pages touched by many threads
//! at once, by forked children, and in regions moved, unmapped or dropped
//! during the lazy phase. If the source is lost during the lazy phase, the
//! destination gives up after `--lazy-timeout`, stops the process and goes
//! on serving.
mod common;

use common::hosts::{
    alive, pair, verify, verify_line, verify_wl_lazy, Background, DestAgent, Hosts, ADDR_B,
};
use common::{num, Procs, Run, Workload, MIGRATE_TIMEOUT};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// `exec-a migrate --config-dir A ARGS`, waited for up to MIGRATE_TIMEOUT
/// (the lazy phase of a large process may take longer than CMD_TIMEOUT).
fn migrate_slow(h: &Hosts, args: &[&str], name: &str) -> Run {
    h.migrate_bg("a", args, name).wait(MIGRATE_TIMEOUT)
}

/// `migrate` succeeded and printed exactly one JSON object (nothing else on
/// stdout, also not during the lazy phase) with a complete `lazy` section;
/// returns it.
fn lazy_report(r: &Run, pid: i32) -> serde_json::Value {
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["pid"].as_i64(), Some(i64::from(pid)), "{v}");
    assert!(v["lazy"].is_object(), "no lazy section: {v}");
    let lazy = &v["lazy"];
    for key in ["owed_pages", "pushed_pages", "requested_pages", "faults"] {
        assert!(lazy[key].is_u64(), "lazy.{key} is not a count: {v}");
    }
    for key in ["max_fault_wait_ms", "last_page_ms", "pull_rate_mb_s"] {
        assert!(lazy[key].is_number(), "lazy.{key} is not a number: {v}");
    }
    v
}

/// Every page owed at the switchover arrived, pushed or requested. Only
/// for a process that does not change its memory layout during the lazy
/// phase: pages owed in a region it unmaps, moves or drops meanwhile may
/// legitimately never be sent (what matters there is its own verify).
fn assert_all_owed_arrived(v: &serde_json::Value) {
    let owed = lazy_u64(v, "owed_pages");
    let pushed = lazy_u64(v, "pushed_pages");
    let requested = lazy_u64(v, "requested_pages");
    assert!(
        pushed + requested >= owed,
        "every owed page arrived, pushed or requested: {v}"
    );
}

fn lazy_u64(v: &serde_json::Value, key: &str) -> u64 {
    v["lazy"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("lazy.{key}: {v}"))
}

/// The source copy was killed by `migrate` (after the last page arrived,
/// or with `migrate` itself); reap it.
fn reap_source(procs: &mut Procs, pid: i32) {
    let status = procs.reap(pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
}

/// /proc/PID/comm on B (None if there is no such process).
fn comm_on_b(h: &Hosts, pid: i32) -> Option<String> {
    let r = h.exec_b(&[
        "sh",
        "-c",
        &format!("cat /proc/{pid}/comm 2>/dev/null || true"),
    ]);
    r.assert_ok();
    let c = r.stdout.trim();
    (!c.is_empty()).then(|| c.to_string())
}

/// What tells why the process is not on B: its last output lines and the
/// dest-agent's log (which says how a restored process ended).
fn gone_from_b(w: &Workload, agent: &Workload) -> String {
    let lines = w.out.lines();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    let log = std::fs::read_to_string(&agent.out.err_path).unwrap_or_default();
    format!("its last output:\n{tail}\ndest-agent log:\n{log}")
}

/// Wait until `pid` is wl-lazy on B while A's copy is frozen, then until
/// it ticks (A's copy being frozen, a new tick comes from B). Fails early
/// if `migrate` exits.
fn wait_running_on_b(h: &Hosts, w: &Workload, mig: &mut Background, agent: &DestAgent) {
    let start = Instant::now();
    loop {
        assert!(
            mig.running(),
            "`migrate` exited before the process ran on B; stderr:\n{}\ndest-agent log:\n{}",
            mig.stderr(),
            agent.log()
        );
        let frozen_on_a = matches!(common::state(w.pid), 't' | 'T');
        if frozen_on_a && comm_on_b(h, w.pid).as_deref() == Some("wl-lazy") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "process {} does not run on B after 60 s; migrate stderr:\n{}\ndest-agent log:\n{}",
            w.pid,
            mig.stderr(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tick = w.out.last_tick().expect("ticks");
    let start = Instant::now();
    while w.out.last_tick().expect("ticks") <= tick {
        assert!(
            mig.running(),
            "`migrate` exited before the process ticked on B; stderr:\n{}\ndest-agent log:\n{}",
            mig.stderr(),
            agent.log()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "process {} does not tick on B (last tick {tick}) after 30 s; \
             migrate stderr:\n{}\ndest-agent log:\n{}",
            w.pid,
            mig.stderr(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lazy migration (`--max-passes 0 --lazy`) of `wl-lazy MIB 2` running
/// in the background, the process already running on B.
struct LazyRun {
    agent: DestAgent,
    w: Workload,
    ready: String,
    mig: Background,
}

/// Start a dest-agent on B with `listen` arguments `agent_args`, wl-lazy
/// MIB with two threads on A, and `migrate --to B PID --max-passes 0 --lazy
/// MIGRATE_ARGS... --json` in the background; returns once the process runs
/// on B.
fn start_lazy_run(
    h: &Hosts,
    procs: &mut Procs,
    mib: &str,
    agent_args: &[&str],
    migrate_args: &[&str],
) -> LazyRun {
    let agent = h.start_agent_args(procs, "b", 7420, &[], agent_args, "dest-b");
    let (w, ready) = h.start_wl_lazy(procs, mib, "2", "wl");
    let pid = w.pid.to_string();
    let mut args = vec!["--to", ADDR_B, &pid, "--max-passes", "0", "--lazy"];
    args.extend_from_slice(migrate_args);
    args.push("--json");
    let mut mig = h.migrate_bg("a", &args, "mig");
    wait_running_on_b(h, &w, &mut mig, &agent);
    LazyRun {
        agent,
        w,
        ready,
        mig,
    }
}

/// Take the link between A and B down for `d`, then up again.
fn link_outage(h: &Hosts, d: Duration) {
    h.run(&["exec-a", "ip", "link", "set", "veth-a", "down"])
        .assert_ok();
    std::thread::sleep(d);
    h.run(&["exec-a", "ip", "link", "set", "veth-a", "up"])
        .assert_ok();
}

#[test]
fn lazy_moves_a_gib_at_once() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "a");
    let mut procs = Procs::new();
    pair(&h);
    let dest = h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "1024", "wl");
    let pid = w.pid.to_string();

    let r = migrate_slow(
        &h,
        &[
            "--to",
            ADDR_B,
            &pid,
            "--max-passes",
            "0",
            "--lazy",
            "--json",
        ],
        "mig",
    );
    let v = lazy_report(&r, w.pid);
    // Switched over at once: a pass with the layout only while the process
    // ran (the destination builds it meanwhile), then the frozen one.
    let passes = v["passes"].as_array().expect("passes");
    assert_eq!(passes.len(), 2, "two passes: {v}");
    assert_eq!(passes[0]["frozen"], false, "{v}");
    assert_eq!(passes[0]["pages"], 0, "no page before the freeze: {v}");
    assert_eq!(passes[1]["frozen"], true, "{v}");
    // 1 GiB is 262144 pages, of which 1/16 are never touched.
    assert!(lazy_u64(&v, "owed_pages") > 200_000, "most pages owed: {v}");
    assert_all_owed_arrived(&v);
    let last = v["lazy"]["last_page_ms"].as_f64().expect("last_page_ms");
    assert!(last > 0.0, "{v}");

    // Gone from A, running on B with the same PID, all memory as at the
    // freeze (wl-memory does not write after start), still ticking.
    reap_source(&mut procs, w.pid);
    assert_eq!(
        comm_on_b(&h, w.pid).as_deref(),
        Some("wl-memory"),
        "the process is not running on B; {}",
        gone_from_b(&w, &dest)
    );
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, true);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 2);
    assert!(h.exists_on_b(w.pid), "the process left B");
}

#[test]
fn lazy_faults_from_all_threads_at_once() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "b");
    let mut procs = Procs::new();
    pair(&h);
    let dest = h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_wl_lazy(&mut procs, "256", "8", "wl");
    let pid = w.pid.to_string();

    // 256 MiB pushed at 100 MB/s: a lazy phase of ~2.7 s during which the
    // 8 reader threads fault on pages not yet pushed.
    let r = migrate_slow(
        &h,
        &[
            "--to",
            ADDR_B,
            &pid,
            "--max-passes",
            "0",
            "--lazy",
            "--lazy-rate",
            "100",
            "--json",
        ],
        "mig",
    );
    let v = lazy_report(&r, w.pid);
    assert!(lazy_u64(&v, "owed_pages") > 50_000, "most pages owed: {v}");
    assert!(lazy_u64(&v, "faults") > 0, "the threads faulted: {v}");
    assert!(
        lazy_u64(&v, "requested_pages") > 0,
        "faults fetched pages: {v}"
    );

    reap_source(&mut procs, w.pid);
    assert_eq!(
        comm_on_b(&h, w.pid).as_deref(),
        Some("wl-lazy"),
        "the process is not running on B; {}",
        gone_from_b(&w, &dest)
    );
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 2);
    let line = verify_wl_lazy(&h, &w, &ready, true);
    assert!(num(&line, "checks") > 0, "{line}");
}

#[test]
fn lazy_survives_fork_mremap_munmap() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "c");
    let mut procs = Procs::new();
    pair(&h);
    let dest = h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_wl_lazy(&mut procs, "128", "2", "wl");
    let pid = w.pid.to_string();
    let before = verify_wl_lazy(&h, &w, &ready, false);

    // Switch over at once and push at 50 MB/s: a lazy phase of ~2.7 s in
    // which the workload forks, moves, unmaps and drops memory that is
    // still partly on A.
    let r = migrate_slow(
        &h,
        &[
            "--to",
            ADDR_B,
            &pid,
            "--lazy",
            "--max-passes",
            "0",
            "--lazy-rate",
            "50",
            "--json",
        ],
        "mig",
    );
    let v = lazy_report(&r, w.pid);
    assert!(lazy_u64(&v, "owed_pages") > 20_000, "most pages owed: {v}");
    let ms = v["lazy"]["last_page_ms"].as_f64().expect("last_page_ms");
    assert!(ms > 500.0, "a lazy phase long enough for events: {v}");

    reap_source(&mut procs, w.pid);
    assert_eq!(
        comm_on_b(&h, w.pid).as_deref(),
        Some("wl-lazy"),
        "the process is not running on B; {}",
        gone_from_b(&w, &dest)
    );
    // A few more ticks: every kind of event happens again on B.
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 8);
    let after = verify_wl_lazy(&h, &w, &ready, true);
    for key in ["forks", "remaps", "unmaps", "drops", "checks"] {
        assert!(
            num(&after, key) > num(&before, key),
            "{key} went on across the migration: {before} / {after}"
        );
    }
}

#[test]
fn lazy_source_killed_stops_the_process_on_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "d");
    let mut procs = Procs::new();
    pair(&h);
    // 5 MB/s: the lazy phase would last ~50 s; kill `migrate` (and with it
    // the source of the pages) once the process runs on B.
    let LazyRun {
        agent,
        w,
        ready: _,
        mut mig,
    } = start_lazy_run(
        &h,
        &mut procs,
        "256",
        &["--lazy-timeout", "3"],
        &["--lazy-rate", "5"],
    );
    assert!(
        mig.running(),
        "`migrate` finished the lazy phase too early: {}",
        mig.stderr()
    );
    common::signal(mig.pid, libc::SIGKILL);
    let r = mig.wait(Duration::from_secs(10));
    assert_eq!(r.status.signal(), Some(libc::SIGKILL), "migrate: {r:?}");
    // The frozen source copy dies with its tracer (exit-kill).
    reap_source(&mut procs, w.pid);

    // B gives up on the lost source and stops the process.
    let start = Instant::now();
    while h.exists_on_b(w.pid) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "process {} still exists on B 30 s after the source was lost: {}\ndest-agent log:\n{}",
            w.pid,
            h.exec_b(&["cat", &format!("/proc/{}/status", w.pid)])
                .stdout,
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.wait_log(
        &format!("lazy phase of process {} failed", w.pid),
        Duration::from_secs(10),
    );
    let log = agent.log();
    assert!(
        log.contains(&format!("stopped process {}", w.pid)),
        "dest-agent log:\n{log}"
    );

    // The agent is still there and serves the next migration.
    assert!(alive(agent.agent), "the dest-agent died; log:\n{log}");
    let (w2, ready2) = h.start_workload(&mut procs, "8", "wl2");
    let pid2 = w2.pid.to_string();
    let r = migrate_slow(&h, &["--to", ADDR_B, &pid2, "--json"], "mig2");
    r.assert_ok();
    reap_source(&mut procs, w2.pid);
    assert_eq!(comm_on_b(&h, w2.pid).as_deref(), Some("wl-memory"));
    let tick = w2.out.last_tick().expect("ticks");
    w2.out.wait_tick_above(tick);
    verify(&h, &w2, &ready2, true);
    assert!(
        alive(agent.agent),
        "the dest-agent died; log:\n{}",
        agent.log()
    );
}

/// The link goes down for 3 s in the middle of the lazy phase (faults wait
/// meanwhile): within the destination's bounded wait, the migration goes on
/// once the link is back, and every page is intact.
#[test]
fn lazy_survives_a_short_link_outage() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "e");
    let mut procs = Procs::new();
    pair(&h);
    // 128 MiB at 20 MB/s: a lazy phase of ~6.7 s.
    let LazyRun {
        agent,
        w,
        ready,
        mut mig,
    } = start_lazy_run(
        &h,
        &mut procs,
        "128",
        &["--lazy-timeout", "20"],
        &["--lazy-rate", "20"],
    );
    link_outage(&h, Duration::from_secs(3));
    assert!(
        mig.running(),
        "`migrate` gave up during a 3 s outage: {}\ndest-agent log:\n{}",
        mig.stderr(),
        agent.log()
    );
    let r = mig.wait(MIGRATE_TIMEOUT);
    assert!(
        r.status.success(),
        "migrate failed: {}\ndest-agent log:\n{}",
        r.stderr,
        agent.log()
    );
    let v = lazy_report(&r, w.pid);
    assert!(lazy_u64(&v, "owed_pages") > 20_000, "most pages owed: {v}");
    reap_source(&mut procs, w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 2);
    verify_wl_lazy(&h, &w, &ready, true);
    assert!(
        !agent.log().contains("lazy phase of process"),
        "the destination gave up: {}",
        agent.log()
    );
}

/// The link goes down for 14 s in the middle of the lazy phase, longer than
/// QUIC's 10 s idle timeout: the connection dies on both sides. The source
/// keeps its frozen copy and reconnects, the destination keeps the process
/// (its faults wait) and takes the new connection; the lazy phase resumes
/// and completes, and every page is intact.
#[test]
fn lazy_reconnects_after_a_long_outage() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "f");
    let mut procs = Procs::new();
    pair(&h);
    // 128 MiB at 20 MB/s: a lazy phase of ~6.7 s, interrupted for 14 s.
    let LazyRun {
        agent,
        w,
        ready,
        mut mig,
    } = start_lazy_run(
        &h,
        &mut procs,
        "128",
        &["--lazy-timeout", "40"],
        &["--lazy-rate", "20", "--lazy-timeout", "40"],
    );
    link_outage(&h, Duration::from_secs(14));
    assert!(
        mig.running(),
        "`migrate` gave up during a 14 s outage: {}\ndest-agent log:\n{}",
        mig.stderr(),
        agent.log()
    );
    let r = mig.wait(MIGRATE_TIMEOUT);
    assert!(
        r.status.success(),
        "migrate failed: {}\ndest-agent log:\n{}",
        r.stderr,
        agent.log()
    );
    let v = lazy_report(&r, w.pid);
    assert!(lazy_u64(&v, "owed_pages") > 20_000, "most pages owed: {v}");
    assert!(lazy_u64(&v, "reconnects") >= 1, "reconnected: {v}");
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "lazy phase of process {} resumed on a new connection",
            w.pid
        )),
        "dest-agent log:\n{log}"
    );
    assert!(
        !log.contains(&format!("lazy phase of process {} failed", w.pid)),
        "the destination gave up: {log}"
    );
    reap_source(&mut procs, w.pid);
    assert_eq!(
        comm_on_b(&h, w.pid).as_deref(),
        Some("wl-lazy"),
        "the process is not running on B; {}",
        gone_from_b(&w, &agent.w)
    );
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 2);
    verify_wl_lazy(&h, &w, &ready, true);
    assert!(
        alive(agent.agent),
        "the dest-agent died; log:\n{}",
        agent.log()
    );
}

/// The link stays down longer than the destination waits for a page
/// (`--lazy-timeout 4`, an outage of 14 s): the destination stops the
/// process; `migrate` reconnects once the link is back, is refused (no lazy
/// phase of that process is going on there any more) and fails at once,
/// saying the process is lost.
#[test]
fn lazy_resume_is_refused_once_the_destination_gave_up() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "g");
    let mut procs = Procs::new();
    pair(&h);
    let LazyRun {
        agent,
        w,
        ready: _,
        mig,
    } = start_lazy_run(
        &h,
        &mut procs,
        "128",
        &["--lazy-timeout", "4"],
        &["--lazy-rate", "10", "--lazy-timeout", "60"],
    );
    link_outage(&h, Duration::from_secs(14));
    // Refused at the first attempt after the link is back, well before
    // its own 60 s.
    let r = mig.wait(Duration::from_secs(30));
    assert!(!r.status.success(), "migrate succeeded: {r:?}");
    assert!(
        r.stderr.contains("refused to resume")
            && r.stderr.contains(&format!(
                "no lazy migration of process {} is going on here",
                w.pid
            ))
            && r.stderr.contains("lost on both hosts"),
        "migrate stderr:\n{}\ndest-agent log:\n{}",
        r.stderr,
        agent.log()
    );
    reap_source(&mut procs, w.pid);
    assert!(!h.exists_on_b(w.pid), "the process still runs on B");
    let log = agent.log();
    assert!(
        log.contains(&format!("stopped process {}", w.pid)),
        "dest-agent log:\n{log}"
    );
    assert!(alive(agent.agent), "the dest-agent died; log:\n{log}");
}

/// The dest-agent dies in the middle of the lazy phase: its userfaultfds
/// close with it, so the process would run on with zero pages where its
/// memory should be. The lazy guard stops it instead; `migrate` fails
/// saying the process is lost, and the frozen source copy is gone too.
#[test]
fn lazy_agent_killed_stops_the_process_on_b() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "i");
    let mut procs = Procs::new();
    pair(&h);
    let LazyRun {
        agent,
        w,
        ready: _,
        mig,
    } = start_lazy_run(
        &h,
        &mut procs,
        "256",
        &[],
        &["--lazy-rate", "5", "--lazy-timeout", "3"],
    );
    agent.kill(&mut procs);
    let start = Instant::now();
    while h.exists_on_b(w.pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {} still runs on B 10 s after its agent died",
            w.pid
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = mig.wait(MIGRATE_TIMEOUT);
    assert!(!r.status.success(), "migrate succeeded: {r:?}");
    assert!(
        r.stderr.contains("error: the lazy phase failed")
            && r.stderr.contains("lost on both hosts"),
        "migrate's error: {}",
        r.stderr
    );
    reap_source(&mut procs, w.pid);
}

/// Pre-copy passes first, then lazy pages: the pages written after the
/// last live pass are dropped on the destination and fetched fresh, never
/// served stale. wl-dirty keeps writing at 20 MB/s and checks that every
/// page holds exactly the last stamp it wrote there.
#[test]
fn lazy_after_precopy_never_serves_a_stale_page() {
    let _serial = common::setup();
    let h = Hosts::up_as("fml", "h");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let w = h.start_dirty(&mut procs, "64", "20", "wl");
    let pid = w.pid.to_string();
    let r = migrate_slow(
        &h,
        &[
            "--to",
            ADDR_B,
            &pid,
            "--lazy",
            "--max-downtime",
            "1",
            "--json",
        ],
        "mig",
    );
    let v = lazy_report(&r, w.pid);
    let passes = v["passes"].as_array().expect("passes");
    assert!(passes.len() >= 2, "live passes, then the frozen one: {v}");
    assert_eq!(passes[0]["frozen"], false, "{v}");
    assert_eq!(
        passes.last().map(|p| p["frozen"] == true),
        Some(true),
        "{v}"
    );
    assert!(
        lazy_u64(&v, "owed_pages") > 0,
        "pages written after the last pass are owed: {v}"
    );
    reap_source(&mut procs, w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick + 2);
    verify_line(&h, &w, true);
}
