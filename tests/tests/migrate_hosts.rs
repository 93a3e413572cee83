//! `migrate --to` and `dest-agent` between the two hosts of `scripts/hosts`:
//! host A (network namespace, root pid namespace) runs the workload and
//! `migrate`; host B (network namespace plus its own pid namespace) runs
//! `dest-agent`. The hosts share the filesystem, so a workload's output file
//! can be read from the test whichever host it runs on.
mod common;

use common::{field, Procs, Run, Workload};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take (`scripts/hosts`, `migrate`, ...).
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hosts")
}

/// `dest-agent`, next to `migrate` in target/<profile>/.
fn dest_agent_bin() -> PathBuf {
    let p = common::migrate_bin().with_file_name("dest-agent");
    assert!(
        p.is_file(),
        "{} not found: build it first with `cargo build --workspace`",
        p.display()
    );
    p
}

/// Run `cmd` with output to files and a timeout (SIGKILL by PID).
fn run(mut cmd: Command, tmp: &Path, name: &str) -> Run {
    let out_path = tmp.join(format!("{name}.out"));
    let err_path = tmp.join(format!("{name}.err"));
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"));
    // SAFETY: close_range is a single async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = Instant::now();
    let status: ExitStatus = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > CMD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {CMD_TIMEOUT:?}; stderr: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        args,
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Two hosts under a unique prefix and a private state directory, plus a
/// scratch directory with one config directory per side. Drop runs `down`
/// (which ends every process in B), also when the test panics, and reaps the
/// zombies re-parented to this test process.
struct Hosts {
    prefix: String,
    state: tempfile::TempDir,
    tmp: tempfile::TempDir,
    n: std::cell::Cell<u32>,
}

impl Hosts {
    fn up(tag: &str) -> Hosts {
        let h = Hosts {
            prefix: format!("fmh{}{tag}", std::process::id()),
            state: tempfile::tempdir().expect("tempdir"),
            tmp: tempfile::tempdir().expect("tempdir"),
            n: std::cell::Cell::new(0),
        };
        let _ = h.run(&["down"]);
        h.run(&["up"]).assert_ok();
        h
    }

    fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    fn config(&self, side: &str) -> PathBuf {
        self.tmp().join(format!("config-{side}"))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(script());
        cmd.args(args)
            .env("FERRY_HOSTS_PREFIX", &self.prefix)
            .env("FERRY_HOSTS_STATE", self.state.path())
            .env_remove("FERRY_CONFIG_DIR");
        for var in [
            "FERRY_HOSTS_ADDR_A",
            "FERRY_HOSTS_ADDR_B",
            "FERRY_HOSTS_PLEN",
            "FERRY_HOSTS_FAIL_AFTER",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        let n = self.n.get();
        self.n.set(n + 1);
        run(self.command(args), self.state.path(), &format!("cmd{n}"))
    }

    /// `exec-a migrate --config-dir A ARGS`.
    fn migrate(&self, config: &str, args: &[&str]) -> Run {
        let bin = common::migrate_bin();
        let dir = self.config(config);
        let mut all = vec![
            "exec-a",
            bin.to_str().unwrap(),
            "--config-dir",
            dir.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// This side's fingerprint (`migrate identity` or `dest-agent identity`).
    fn identity(&self, bin: &Path, side: &str) -> String {
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(self.config(side))
            .arg("identity");
        let r = run(cmd, self.tmp(), &format!("identity-{side}"));
        r.assert_ok();
        let fp = r.stdout.trim().to_string();
        assert!(
            fp.starts_with("sha256:") && !fp.contains('\n'),
            "identity printed {:?}",
            r.stdout
        );
        fp
    }

    fn trust(&self, bin: &Path, side: &str, fp: &str) {
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(self.config(side))
            .args(["trust", fp]);
        run(cmd, self.tmp(), &format!("trust-{side}")).assert_ok();
    }

    /// Start `dest-agent listen` on B with config dir `side`; waits until it
    /// listens.
    fn start_dest(&self, procs: &mut Procs, side: &str) -> Workload {
        let bin = dest_agent_bin();
        let cmd = self.command(&[
            "exec-b",
            bin.to_str().unwrap(),
            "--config-dir",
            self.config(side).to_str().unwrap(),
            "listen",
            "--listen",
            "198.18.0.2:7420",
        ]);
        let w = procs.spawn(cmd, self.tmp(), &format!("dest-{side}"));
        common::wait_until(Duration::from_secs(10), "dest-agent listening", || {
            std::fs::read_to_string(&w.out.err_path)
                .ok()?
                .contains("listening on")
                .then_some(())
        });
        w
    }

    /// Start `wl-memory MIB DIR` on A. `exec-a` execs `ip netns exec`, which
    /// execs the workload: the PID we spawned is the workload's.
    fn start_workload(&self, procs: &mut Procs, mib: &str, name: &str) -> (Workload, String) {
        let dir = self.tmp().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cmd = self.command(&[
            "exec-a",
            env!("CARGO_BIN_EXE_wl-memory"),
            mib,
            dir.to_str().unwrap(),
        ]);
        let w = procs.spawn(cmd, self.tmp(), name);
        let (_, ready) = w.out.wait_line(0, "ready ");
        assert_eq!(
            field(&ready, "pid"),
            Some(w.pid.to_string().as_str()),
            "the spawned PID is not the workload's"
        );
        w.out.wait_tick_above(1);
        (w, ready)
    }

    /// Run a command on B; returns its outcome.
    fn exec_b(&self, args: &[&str]) -> Run {
        let mut all = vec!["exec-b"];
        all.extend_from_slice(args);
        self.run(&all)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        reap_zombie_children();
    }
}

/// Reap zombie children of this test process (B's holder is re-parented to
/// it, a subreaper, when `up` exits).
fn reap_zombie_children() {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (state, ppid) = (it.next(), it.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(me) {
            let mut status = 0;
            // SAFETY: waitpid on one zombie child with a local status.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

/// Pair A (migrate) and B (dest-agent) both ways.
fn pair(h: &Hosts) {
    let (m, d) = (common::migrate_bin(), dest_agent_bin());
    let fa = h.identity(&m, "a");
    let fb = h.identity(&d, "b");
    assert_ne!(fa, fb);
    // Identity is stable.
    assert_eq!(h.identity(&m, "a"), fa);
    h.trust(&m, "a", &fb);
    h.trust(&d, "b", &fa);
}

/// SIGUSR1 `pid` (on host A with `on_b == false`, else on B) and check the
/// workload's `verify ok` line carries the checksums of its `ready` line.
fn verify(h: &Hosts, w: &Workload, ready: &str, on_b: bool) {
    let from = w.out.lines().len();
    if on_b {
        h.exec_b(&["kill", "-USR1", &w.pid.to_string()]).assert_ok();
    } else {
        common::signal(w.pid, libc::SIGUSR1);
    }
    let (_, line) = w.out.wait_line(from, "verify ");
    assert!(line.starts_with("verify ok"), "workload says: {line}");
    for key in ["checksum", "heap_checksum"] {
        assert_eq!(field(&line, key), field(ready, key), "{key}: {line}");
    }
}

#[test]
fn migrate_to_host_b() {
    let _serial = common::setup();
    let h = Hosts::up("m");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "32", "wl");
    let pid = w.pid.to_string();

    let r = h.migrate("a", &["--to", "198.18.0.2", &pid, "--json"]);
    r.assert_ok();
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
    assert_eq!(v["pid"].as_i64(), Some(w.pid as i64), "{v}");
    let downtime = v["downtime_ms"].as_f64().expect("downtime_ms");
    let total = v["total_ms"].as_f64().expect("total_ms");
    assert!(downtime > 0.0 && total >= downtime, "{v}");
    assert!(
        v["bytes_on_wire"].as_u64().expect("bytes_on_wire") > 1 << 20,
        "{v}"
    );
    // 32 MiB, of which at most 1/8 of the anonymous half is never touched.
    assert!(v["pages_sent"].as_u64().expect("pages_sent") > 6000, "{v}");

    // Gone from A: killed by migrate after B confirmed.
    let status = procs.reap(w.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    // Running on B, same PID, memory intact, still ticking.
    let comm = h.exec_b(&["cat", &format!("/proc/{pid}/comm")]);
    comm.assert_ok();
    assert_eq!(comm.stdout.trim(), "wl-memory");
    let state = h.exec_b(&["cat", &format!("/proc/{pid}/stat")]);
    state.assert_ok();
    let st = state.stdout.rsplit_once(") ").expect("stat").1;
    assert!(matches!(st.chars().next(), Some('R' | 'S')), "stat: {st}");
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, true);
}

#[test]
fn untrusted_peers_are_refused() {
    let _serial = common::setup();
    let h = Hosts::up("u");
    let mut procs = Procs::new();
    let (m, d) = (common::migrate_bin(), dest_agent_bin());
    // A trusts B, B trusts nobody.
    let fb = h.identity(&d, "b");
    h.trust(&m, "a", &fb);
    // C trusts nobody; B will trust C.
    let fc = h.identity(&m, "c");
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "8", "wl");
    let pid = w.pid.to_string();

    // The destination does not trust the source.
    let r = h.migrate("a", &["--to", "198.18.0.2:7420", &pid]);
    r.assert_error(&["not a trusted peer", "dest-agent trust"]);
    common::assert_running_untraced(w.pid);

    // The source does not trust the destination (B now trusts C).
    h.trust(&d, "b", &fc);
    let r = h.migrate("c", &["--to", "198.18.0.2", &pid, "--json"]);
    r.assert_error(&["not a trusted peer", "migrate trust"]);
    assert_eq!(r.stdout, "", "no report on failure");

    common::assert_running_untraced(w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, false);

    // The running dest-agent picks up a new trust without a restart, and
    // still serves after the refused connections.
    let fa = h.identity(&m, "a");
    h.trust(&d, "b", &fa);
    let r = h.migrate("a", &["--to", "198.18.0.2", &pid]);
    r.assert_ok();
    for k in ["downtime", "total", "bytes on wire", "pages", "compression"] {
        assert!(r.stdout.contains(k), "report without {k:?}: {}", r.stdout);
    }
    let status = procs.reap(w.pid).expect("reap the source copy");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "source copy: {status}"
    );
    verify(&h, &w, &ready, true);
}

/// The workload maps a file it created; replacing that file (new content,
/// renamed over the old path) makes the destination's file differ from the
/// one the process maps, which the destination must refuse before the
/// source freezes anything.
#[test]
fn mismatch_is_refused_before_freezing() {
    let _serial = common::setup();
    let h = Hosts::up("x");
    let mut procs = Procs::new();
    pair(&h);
    h.start_dest(&mut procs, "b");
    let (w, ready) = h.start_workload(&mut procs, "8", "wl");
    let pid = w.pid.to_string();

    let mapped = h.tmp().join("wl").join(format!("wl-memory-{pid}.dat"));
    let mut content = std::fs::read(&mapped).expect("read the mapped file");
    content[0] ^= 0xff;
    let new = mapped.with_extension("new");
    std::fs::write(&new, &content).unwrap();
    std::fs::rename(&new, &mapped).unwrap();

    let r = h.migrate("a", &["--to", "198.18.0.2", &pid]);
    r.assert_error(&["refused", "differs", mapped.to_str().unwrap()]);
    let log = std::fs::read_to_string(h.tmp().join("dest-b.err")).unwrap_or_default();
    assert!(
        !log.contains("image received"),
        "the destination received an image: {log}"
    );

    common::assert_running_untraced(w.pid);
    let tick = w.out.last_tick().expect("ticks");
    w.out.wait_tick_above(tick);
    verify(&h, &w, &ready, false);
}
