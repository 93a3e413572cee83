//! The two hosts of `scripts/hosts` for end-to-end tests: host A (network
//! namespace, root pid namespace) runs the workload and `migrate`; host B
//! (network namespace plus its own pid namespace) runs `dest-agent`. The
//! hosts share the filesystem, so a workload's output file can be read from
//! the test whichever host it runs on.

use super::{field, only_std_fds, Procs, Run, Workload};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take (`scripts/hosts`, `migrate`, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Host B's address.
pub const ADDR_B: &str = "198.18.0.2";

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hosts")
}

/// `dest-agent`, next to `migrate` in target/<profile>/.
pub fn dest_agent_bin() -> PathBuf {
    let p = super::migrate_bin().with_file_name("dest-agent");
    assert!(
        p.is_file(),
        "{} not found: build it first with `cargo build --workspace`",
        p.display()
    );
    p
}

/// Run `cmd` with output to files and a timeout (SIGKILL by PID).
pub fn run(cmd: Command, tmp: &Path, name: &str) -> Run {
    Background::spawn(cmd, tmp, name).wait(CMD_TIMEOUT)
}

/// A command running in the background with its output in files. Drop
/// SIGKILLs and reaps it (by PID) unless it was waited for.
pub struct Background {
    pub pid: i32,
    child: Option<Child>,
    args: Vec<String>,
    out_path: PathBuf,
    err_path: PathBuf,
}

impl Background {
    pub fn spawn(mut cmd: Command, tmp: &Path, name: &str) -> Background {
        let out_path = tmp.join(format!("{name}.out"));
        let err_path = tmp.join(format!("{name}.err"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("create stdout file"))
            .stderr(File::create(&err_path).expect("create stderr file"));
        only_std_fds(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Background {
            pid: child.id() as i32,
            child: Some(child),
            args,
            out_path,
            err_path,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    /// Still running (not exited, not yet waited for)?
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Wait up to `timeout` for it to exit; its outcome. Panics (after
    /// killing it) on timeout.
    pub fn wait(mut self, timeout: Duration) -> Run {
        let mut child = self.child.take().expect("waited twice");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{:?} did not finish within {timeout:?}; stderr: {}",
                    self.args,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Run {
            args: self.args.clone(),
            status,
            stdout: std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `dest-agent` started on B through `scripts/hosts exec-b` (nsenter,
/// then `setpriv --pdeathsig KILL`). `pid` is the nsenter process we
/// spawned (tracked by the `Procs` it was started with); `agent` is the
/// dest-agent process itself, as seen from the root pid namespace.
pub struct DestAgent {
    pub w: Workload,
    pub agent: i32,
}

impl DestAgent {
    /// The agent's log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.w.out.err_path).unwrap_or_default()
    }

    /// Wait until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                super::pid_exists(self.agent),
                "dest-agent (pid {}) died while we waited for {needle:?}; log:\n{}",
                self.agent,
                self.log()
            );
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} in the dest-agent's log within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the nsenter we spawned (reaping it) and check that the
    /// parent-death signal took the dest-agent with it.
    pub fn kill(&self, procs: &mut Procs) {
        let _ = procs.kill(self.w.pid);
        super::wait_until(
            Duration::from_secs(10),
            "the dest-agent to die with its nsenter",
            || (!alive(self.agent)).then_some(()),
        );
    }
}

/// The process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
            Some('Z' | 'X') | None
        ),
        Err(_) => false,
    }
}

/// Two hosts under a unique prefix and a private state directory, plus a
/// scratch directory with one config directory per side. Drop runs `down`
/// (which ends every process in B), also when the test panics, and reaps the
/// zombies re-parented to this test process.
pub struct Hosts {
    pub prefix: String,
    state: tempfile::TempDir,
    tmp: tempfile::TempDir,
    n: std::cell::Cell<u32>,
}

impl Hosts {
    /// Bring up two hosts; `tag` makes the prefix unique among the tests
    /// of one binary (`code` names the test file).
    pub fn up_as(code: &str, tag: &str) -> Hosts {
        let h = Hosts {
            prefix: format!("{code}{}{tag}", std::process::id()),
            state: tempfile::tempdir().expect("tempdir"),
            tmp: tempfile::tempdir().expect("tempdir"),
            n: std::cell::Cell::new(0),
        };
        let _ = h.run(&["down"]);
        h.run(&["up"]).assert_ok();
        h
    }

    pub fn up(tag: &str) -> Hosts {
        Hosts::up_as("fmh", tag)
    }

    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    pub fn config(&self, side: &str) -> PathBuf {
        self.tmp().join(format!("config-{side}"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(script());
        cmd.args(args)
            .env("FERRY_HOSTS_PREFIX", &self.prefix)
            .env("FERRY_HOSTS_STATE", self.state.path())
            .env_remove("FERRY_CONFIG_DIR")
            .env_remove("FERRY_DEST_PAUSE_AT");
        for var in [
            "FERRY_HOSTS_ADDR_A",
            "FERRY_HOSTS_ADDR_B",
            "FERRY_HOSTS_ADDR_C",
            "FERRY_HOSTS_SERVICE",
            "FERRY_HOSTS_PLEN",
            "FERRY_HOSTS_FAIL_AFTER",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let n = self.n.get();
        self.n.set(n + 1);
        run(self.command(args), self.state.path(), &format!("cmd{n}"))
    }

    /// The arguments of `exec-a migrate --config-dir A ARGS`.
    fn migrate_args(&self, config: &str, args: &[&str]) -> Vec<String> {
        let bin = super::migrate_bin();
        let dir = self.config(config);
        let mut all = vec![
            "exec-a".to_string(),
            bin.to_str().unwrap().to_string(),
            "--config-dir".to_string(),
            dir.to_str().unwrap().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    /// `exec-a migrate --config-dir A ARGS`.
    pub fn migrate(&self, config: &str, args: &[&str]) -> Run {
        let all = self.migrate_args(config, args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run(&all)
    }

    /// `exec-a migrate --config-dir A ARGS` in the background (`exec-a`
    /// execs, so the PID is `migrate`'s).
    pub fn migrate_bg(&self, config: &str, args: &[&str], name: &str) -> Background {
        let all = self.migrate_args(config, args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Background::spawn(self.command(&all), self.tmp(), name)
    }

    /// This side's fingerprint (`migrate identity` or `dest-agent identity`).
    pub fn identity(&self, bin: &Path, side: &str) -> String {
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

    pub fn trust(&self, bin: &Path, side: &str, fp: &str) {
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(self.config(side))
            .args(["trust", fp]);
        run(cmd, self.tmp(), &format!("trust-{side}")).assert_ok();
    }

    /// Start `dest-agent listen` on B with config dir `side`; waits until it
    /// listens.
    pub fn start_dest(&self, procs: &mut Procs, side: &str) -> Workload {
        self.start_agent(procs, side, 7420, &[], &format!("dest-{side}"))
            .w
    }

    /// Start `dest-agent listen --listen 198.18.0.2:PORT` on B with config
    /// dir `side` and extra environment `env`, output in NAME.out/.err of
    /// the scratch directory; waits until it listens.
    pub fn start_agent(
        &self,
        procs: &mut Procs,
        side: &str,
        port: u16,
        env: &[(&str, &str)],
        name: &str,
    ) -> DestAgent {
        self.start_agent_args(procs, side, port, env, &[], name)
    }

    /// Start `wl-memory MIB DIR` on A. `exec-a` execs `ip netns exec`, which
    /// execs the workload: the PID we spawned is the workload's.
    pub fn start_workload(&self, procs: &mut Procs, mib: &str, name: &str) -> (Workload, String) {
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
    pub fn exec_b(&self, args: &[&str]) -> Run {
        let mut all = vec!["exec-b"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `migrate --to B PID --json` of a server on the service address:
    /// requires success, exactly one address moved, the source copy ended
    /// by SIGKILL (reaped from `procs`) and PID present on B; returns the
    /// report.
    pub fn migrate_with_address(&self, procs: &mut Procs, pid: i32) -> serde_json::Value {
        use std::os::unix::process::ExitStatusExt;
        let r = self.migrate("a", &["--to", ADDR_B, &pid.to_string(), "--json"]);
        r.assert_ok();
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", r.stdout));
        assert_eq!(
            v["addresses_moved"].as_array().map(Vec::len),
            Some(1),
            "{v}"
        );
        let status = procs.reap(pid).expect("reap the source copy");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "source copy: {status}"
        );
        assert!(self.exists_on_b(pid), "process {pid} is not on B");
        v
    }

    /// Run a command on client C; returns its outcome.
    pub fn exec_c(&self, args: &[&str]) -> Run {
        let mut all = vec!["exec-c"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Whether /proc/PID exists in B's pid namespace.
    pub fn exists_on_b(&self, pid: i32) -> bool {
        let r = self.exec_b(&[
            "sh",
            "-c",
            &format!("if test -e /proc/{pid}; then echo present; else echo absent; fi"),
        ]);
        r.assert_ok();
        match r.stdout.trim() {
            "present" => true,
            "absent" => false,
            o => panic!("unexpected output of the /proc check on B: {o:?}"),
        }
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
pub fn reap_zombie_children() {
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

/// Pair A (migrate, config `a`) and B (dest-agent, config `b`) both ways.
pub fn pair(h: &Hosts) {
    let (m, d) = (super::migrate_bin(), dest_agent_bin());
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
pub fn verify(h: &Hosts, w: &Workload, ready: &str, on_b: bool) {
    let line = verify_line(h, w, on_b);
    for key in ["checksum", "heap_checksum"] {
        assert_eq!(field(&line, key), field(ready, key), "{key}: {line}");
    }
}

impl Hosts {
    /// Start `dest-agent --config-dir SIDE listen --listen 198.18.0.2:PORT
    /// ARGS...` on B with extra environment `env`, output in NAME.out/.err
    /// of the scratch directory; waits until it listens.
    pub fn start_agent_args(
        &self,
        procs: &mut Procs,
        side: &str,
        port: u16,
        env: &[(&str, &str)],
        args: &[&str],
        name: &str,
    ) -> DestAgent {
        let bin = dest_agent_bin();
        let listen = format!("{ADDR_B}:{port}");
        let config = self.config(side);
        let mut all = vec![
            "exec-b",
            bin.to_str().unwrap(),
            "--config-dir",
            config.to_str().unwrap(),
            "listen",
            "--listen",
            &listen,
        ];
        all.extend_from_slice(args);
        let mut cmd = self.command(&all);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let w = procs.spawn(cmd, self.tmp(), name);
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&w.out.err_path).unwrap_or_default();
            if log.contains("listening on") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dest-agent {args:?} does not listen after 10 s; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // nsenter (w.pid) forked setpriv, which exec'd dest-agent.
        let agent = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", w.pid))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("nsenter {} has no child", w.pid));
        let exe = std::fs::read_link(format!("/proc/{agent}/exe")).unwrap_or_default();
        assert!(
            exe.ends_with("dest-agent"),
            "the child of nsenter {} is {} (pid {agent}), not dest-agent",
            w.pid,
            exe.display()
        );
        DestAgent { w, agent }
    }
}

/// SIGUSR1 the workload (on host A with `on_b == false`, else on B) and
/// require its `verify ok` line; returns the line.
pub fn verify_line(h: &Hosts, w: &Workload, on_b: bool) -> String {
    let from = w.out.lines().len();
    if on_b {
        h.exec_b(&["kill", "-USR1", &w.pid.to_string()]).assert_ok();
    } else {
        super::signal(w.pid, libc::SIGUSR1);
    }
    let (_, line) = w.out.wait_line(from, "verify ");
    assert!(line.starts_with("verify ok"), "workload says: {line}");
    line
}

impl Hosts {
    /// Start `wl-dirty MIB RATE` on A; returns it once it ticks.
    pub fn start_dirty(&self, procs: &mut Procs, mib: &str, rate: &str, name: &str) -> Workload {
        let cmd = self.command(&["exec-a", env!("CARGO_BIN_EXE_wl-dirty"), mib, rate]);
        let w = procs.spawn(cmd, self.tmp(), name);
        let (_, ready) = w.out.wait_line(0, "ready ");
        assert_eq!(field(&ready, "pid"), Some(w.pid.to_string().as_str()));
        w.out.wait_tick_above(2);
        w
    }

    /// Start `wl-lazy MIB THREADS` on A; returns it and its ready line once
    /// it ticks.
    pub fn start_wl_lazy(
        &self,
        procs: &mut Procs,
        mib: &str,
        threads: &str,
        name: &str,
    ) -> (Workload, String) {
        let cmd = self.command(&["exec-a", env!("CARGO_BIN_EXE_wl-lazy"), mib, threads]);
        let w = procs.spawn(cmd, self.tmp(), name);
        let (_, ready) = w.out.wait_line(0, "ready ");
        assert_eq!(field(&ready, "pid"), Some(w.pid.to_string().as_str()));
        assert_eq!(field(&ready, "threads"), Some(threads), "{ready}");
        assert!(field(&ready, "checksum").is_some(), "{ready}");
        w.out.wait_tick_above(2);
        (w, ready)
    }
}

/// SIGUSR1 wl-lazy (on A or B) and require `verify ok` with no mismatch,
/// no failed child and the checksum of the ready line; returns the line.
/// (`fork_lost`, a child forked just before the freeze that stayed on A,
/// is not a failure.)
pub fn verify_wl_lazy(h: &Hosts, w: &Workload, ready: &str, on_b: bool) -> String {
    let line = verify_line(h, w, on_b);
    assert_eq!(super::num(&line, "bad"), 0, "{line}");
    assert_eq!(super::num(&line, "fork_bad"), 0, "{line}");
    assert_eq!(
        field(&line, "checksum"),
        field(ready, "checksum"),
        "checksum at the end against the one at start: {line} / {ready}"
    );
    line
}
