//! `scripts/hosts`: two hosts on one machine. Host A (a network namespace,
//! root pid namespace) and host B (a network namespace plus its own pid
//! namespace with its own /proc) are joined by a veth pair in 198.18.0.0/15;
//! `down` removes everything, also what a failed `up` left, and may be run
//! any number of times.
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one `scripts/hosts` command may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/hosts")
}

struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self, what: &str) -> Out {
        assert!(
            self.status.success(),
            "`scripts/hosts {what}` failed ({}); stdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// One topology under a unique prefix and a private state directory. Drop
/// runs `down` (also when the test panics) and reaps the holder processes
/// that were re-parented to this test process (a child subreaper).
struct Hosts {
    prefix: String,
    state: tempfile::TempDir,
    n: std::cell::Cell<u32>,
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let h = Hosts {
            prefix: format!("fht{}{tag}", std::process::id()),
            state: tempfile::tempdir().expect("tempdir"),
            n: std::cell::Cell::new(0),
        };
        // A run killed earlier with the same PID may have left these.
        h.run(&["down"], &[]);
        h
    }

    fn netns_a(&self) -> String {
        format!("{}-a", self.prefix)
    }

    fn netns_b(&self) -> String {
        format!("{}-b", self.prefix)
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join(&self.prefix)
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(script());
        cmd.args(args)
            .env("FERRY_HOSTS_PREFIX", &self.prefix)
            .env("FERRY_HOSTS_STATE", self.state.path());
        for var in [
            "FERRY_HOSTS_ADDR_A",
            "FERRY_HOSTS_ADDR_B",
            "FERRY_HOSTS_PLEN",
            "FERRY_HOSTS_FAIL_AFTER",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Run `scripts/hosts ARGS` with its output in files (so a process that
    /// wrongly keeps our pipes cannot hang the test), with a timeout.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let n = self.n.get();
        self.n.set(n + 1);
        let cmd = self.command(args, env);
        let r = common::hosts::Background::spawn(cmd, self.state.path(), &format!("cmd{n}"))
            .wait(CMD_TIMEOUT);
        Out {
            status: r.status,
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }

    fn up(&self) {
        self.run(&["up"], &[]).ok("up");
    }

    /// `down`, which must succeed. Zombies it leaves among our children are
    /// reaped by `reap_zombie_children` (or Drop), not here: the caller may
    /// still hold `Child` handles.
    fn down(&self) {
        self.run(&["down"], &[]).ok("down");
    }

    /// `exec-a`/`exec-b` that must succeed; returns stdout.
    fn exec(&self, which: &str, args: &[&str]) -> String {
        let mut all = vec![which];
        all.extend_from_slice(args);
        self.run(&all, &[]).ok(&all.join(" ")).stdout
    }

    /// The names of `ip netns list` that belong to this topology.
    fn listed(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("run ip netns list");
        assert!(out.status.success(), "ip netns list failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| name.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect()
    }

    fn assert_gone(&self) {
        assert_eq!(
            self.listed(),
            Vec::<String>::new(),
            "`ip netns list` still lists namespaces of {}",
            self.prefix
        );
        assert!(
            !self.state_dir().exists(),
            "state dir {} is still there",
            self.state_dir().display()
        );
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = self.run(&["down"], &[]);
        reap_zombie_children();
    }
}

/// The parent PID and state letter of `pid` (None once it is gone).
fn ppid_state(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut it = stat.rsplit_once(") ")?.1.split_whitespace();
    let state = it.next()?.chars().next()?;
    Some((it.next()?.parse().ok()?, state))
}

/// Children of this test process that are alive (not zombies).
fn living_children() -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(ppid_state(pid), Some((pp, s)) if pp == me && s != 'Z' && s != 'X'))
        .collect()
}

/// Reap the zombies among our children: the holder of host B is
/// re-parented to this test process (a subreaper) when `up` exits.
fn reap_zombie_children() {
    let me = std::process::id() as i32;
    for pid in std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
    {
        if matches!(ppid_state(pid), Some((pp, 'Z')) if pp == me) {
            let mut status = 0;
            // SAFETY: waitpid on one zombie child with a local status.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

/// "net:[INODE]" of a namespace file, as readlink(/proc/PID/ns/net) shows it.
fn ns_id_of_file(kind: &str, path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino();
    format!("{kind}:[{ino}]")
}

fn own_ns(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .expect("readlink /proc/self/ns")
        .to_string_lossy()
        .into_owned()
}

/// Mounts on /proc in this process's mount namespace.
fn proc_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/proc"))
        .count()
}

/// On a thread that enters network namespace `netns`, listen on `addr`:0,
/// accept one connection, read one line and answer "pong LINE from PEER".
/// Returns the port and the thread (which yields the peer's address).
fn serve_once(
    netns: &str,
    addr: Ipv4Addr,
) -> (u16, std::thread::JoinHandle<Result<SocketAddr, String>>) {
    let path = format!("/run/netns/{netns}");
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || -> Result<SocketAddr, String> {
        let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: setns with an open namespace fd; it changes only the
        // network namespace of this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = format!("setns {path}: {}", std::io::Error::last_os_error());
            let _ = tx.send(Err(e.clone()));
            return Err(e);
        }
        let listener = match TcpListener::bind((addr, 0)) {
            Ok(l) => l,
            Err(e) => {
                let e = format!("bind {addr} in {path}: {e}");
                let _ = tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let _ = tx.send(Ok(port));
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let (conn, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > Duration::from_secs(10) {
                        return Err(format!("no connection to {addr}:{port} within 10 s"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        writeln!(&conn, "pong {} from {}", line.trim(), peer.ip()).map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("listener thread did not start")
        .unwrap_or_else(|e| panic!("listener in {netns}: {e}"));
    (port, thread)
}

/// bash one-liner: connect to ADDR:PORT, send a line, print the answer.
fn tcp_client(addr: Ipv4Addr, port: u16, msg: &str) -> String {
    format!(
        "exec 3<>/dev/tcp/{addr}/{port} && echo {msg} >&3 && read -r -t 10 answer <&3 && echo \"$answer\""
    )
}

/// Wait (up to 5 s) for a child to exit.
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still runs 5 s after `down`");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn up_makes_two_connected_hosts_and_b_has_its_own_pid_namespace() {
    let _serial = common::setup();
    let hosts = Hosts::new("u");
    let my_pid = std::process::id();
    let mounts_before = proc_mounts();

    hosts.up();
    let mut listed = hosts.listed();
    listed.sort();
    assert_eq!(listed, vec![hosts.netns_a(), hosts.netns_b()]);
    let status = hosts.run(&["status"], &[]).ok("status");
    assert!(
        status.stdout.contains("status: up"),
        "status: {}",
        status.stdout
    );
    let env = hosts.run(&["env"], &[]).ok("env").stdout;
    for want in [
        "FERRY_HOST_A_ADDR=198.18.0.1",
        "FERRY_HOST_B_ADDR=198.18.0.2",
        &format!("FERRY_HOST_A_NETNS={}", hosts.netns_a()),
        &format!("FERRY_HOST_B_NETNS={}", hosts.netns_b()),
    ] {
        assert!(env.lines().any(|l| l == want), "`env` lacks {want}:\n{env}");
    }

    // The mount namespace of B is its own: our /proc is untouched.
    assert_eq!(
        proc_mounts(),
        mounts_before,
        "up changed the host's /proc mounts"
    );
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    assert!(
        stat.starts_with(&format!("{my_pid} ")),
        "our /proc is not ours any more"
    );

    let a = Ipv4Addr::new(198, 18, 0, 1);
    let b = Ipv4Addr::new(198, 18, 0, 2);
    let ns_a = ns_id_of_file(
        "net",
        &PathBuf::from(format!("/run/netns/{}", hosts.netns_a())),
    );
    let ns_b = ns_id_of_file(
        "net",
        &PathBuf::from(format!("/run/netns/{}", hosts.netns_b())),
    );

    // TCP from A to a listener in B, and from B to a listener in A, over the
    // veth pair: each side sees the other's address.
    let (port, server) = serve_once(&hosts.netns_b(), b);
    let answer = hosts.exec("exec-a", &["bash", "-c", &tcp_client(b, port, "from-a")]);
    assert_eq!(answer.trim(), "pong from-a from 198.18.0.1");
    let peer = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("B's listener: {e}"));
    assert_eq!(peer.ip(), a);

    let (port, server) = serve_once(&hosts.netns_a(), a);
    let answer = hosts.exec("exec-b", &["bash", "-c", &tcp_client(a, port, "from-b")]);
    assert_eq!(answer.trim(), "pong from-b from 198.18.0.2");
    let peer = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("A's listener: {e}"));
    assert_eq!(peer.ip(), b);

    // exec-a: network namespace A, our pid namespace.
    let out = hosts.exec(
        "exec-a",
        &["sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/pid"],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, vec![ns_a.as_str(), own_ns("pid").as_str()], "exec-a");

    // exec-b: network namespace B, a pid namespace of its own with its own
    // /proc, the same for every exec-b; our PID is free there.
    let probe = format!(
        "echo $$; read -r self _ < /proc/self/stat; echo $self; \
         readlink /proc/self/ns/net /proc/self/ns/pid /proc/1/ns/pid; \
         if [ -e /proc/{my_pid} ]; then echo taken; else echo free; fi"
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        let out = hosts.exec("exec-b", &["sh", "-c", &probe]);
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l.len(), 6, "exec-b probe printed {out:?}");
        let pid: u32 = l[0].parse().unwrap_or_else(|_| panic!("bad $$ {:?}", l[0]));
        assert_eq!(
            l[0], l[1],
            "B's /proc/self is not the shell itself: /proc is not B's"
        );
        assert!(
            pid > 1 && pid < 1000,
            "pid {pid} in B is not from a fresh pid namespace"
        );
        assert_eq!(l[2], ns_b, "exec-b is not in network namespace B");
        assert_ne!(l[3], own_ns("pid"), "exec-b runs in our pid namespace");
        assert_eq!(l[3], l[4], "PID 1 of B's /proc is not in B's pid namespace");
        assert_eq!(l[5], "free", "our pid {my_pid} exists in B");
        seen.push((pid, l[3].to_string()));
    }
    assert_eq!(
        seen[0].1, seen[1].1,
        "two exec-b got different pid namespaces"
    );
    assert!(seen[1].0 > seen[0].0, "PIDs in B did not advance: {seen:?}");

    // Whatever still runs on either host when `down` comes is killed.
    let mut on_b = hosts
        .command(&["exec-b", "sleep", "1000"], &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn exec-b sleep");
    let mut on_a = hosts
        .command(&["exec-a", "sleep", "1000"], &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn exec-a sleep");
    let holder = std::fs::read_to_string(hosts.state_dir().join("holder")).expect("holder file");
    let holder_pids: Vec<i32> = holder
        .split_whitespace()
        .step_by(2)
        .map(|p| p.parse().expect("holder pid"))
        .collect();
    assert_eq!(holder_pids.len(), 2, "holder file: {holder:?}");
    std::thread::sleep(Duration::from_millis(200));

    hosts.down();
    assert!(!wait_exit(&mut on_b, "exec-b sleep").success());
    assert!(!wait_exit(&mut on_a, "exec-a sleep").success());
    reap_zombie_children();
    hosts.assert_gone();
    for pid in holder_pids {
        assert!(
            !matches!(ppid_state(pid), Some((_, s)) if s != 'Z'),
            "holder process {pid} still runs after down"
        );
    }
    let status = hosts.run(&["status"], &[]);
    assert!(
        !status.status.success(),
        "status after down: {}",
        status.stdout
    );
    let out = hosts.run(&["exec-b", "true"], &[]);
    assert!(
        !out.status.success() && out.stderr.contains("not up"),
        "{}",
        out.stderr
    );
}

#[test]
fn down_is_idempotent_and_up_cleans_up_after_a_failure() {
    let _serial = common::setup();
    let hosts = Hosts::new("d");

    // Nothing there: down succeeds, twice.
    hosts.down();
    hosts.down();
    hosts.assert_gone();

    // up, down, down.
    hosts.up();
    let again = hosts.run(&["up"], &[]);
    assert!(!again.status.success(), "a second up succeeded");
    assert!(again.stderr.contains("already exist"), "{}", again.stderr);
    hosts
        .run(&["status"], &[])
        .ok("status after a refused second up");
    hosts.down();
    hosts.assert_gone();
    hosts.down();
    hosts.assert_gone();

    // Half made by hand (no state dir): down removes it.
    let st = Command::new("ip")
        .args(["netns", "add", &hosts.netns_a()])
        .status()
        .expect("ip netns add");
    assert!(st.success());
    assert_eq!(hosts.listed(), vec![hosts.netns_a()]);
    hosts.down();
    hosts.assert_gone();

    // up fails at each step: it removes what it made, holder included.
    let before = living_children();
    for step in ["netns", "veth", "addr", "holder", "check"] {
        let out = hosts.run(&["up"], &[("FERRY_HOSTS_FAIL_AFTER", step)]);
        assert!(
            !out.status.success(),
            "up with FERRY_HOSTS_FAIL_AFTER={step} succeeded"
        );
        assert!(
            out.stderr.contains("cleaning up"),
            "step {step}: {}",
            out.stderr
        );
        hosts.assert_gone();
        assert_eq!(
            living_children(),
            before,
            "step {step} left a process behind"
        );
        reap_zombie_children();
    }

    // Addresses outside 198.18.0.0/15 are refused before anything is made.
    let out = hosts.run(&["up"], &[("FERRY_HOSTS_ADDR_B", "10.1.2.3")]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("198.18.0.0/15"), "{}", out.stderr);
    hosts.assert_gone();

    // After all that, a normal up works, and down removes it.
    hosts.up();
    hosts.exec("exec-a", &["true"]);
    hosts.exec("exec-b", &["true"]);
    hosts.down();
    hosts.assert_gone();
}
