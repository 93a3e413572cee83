//! `scripts/hosts`: three hosts on one machine. Host A (a network namespace,
//! root pid and IPC namespaces, the host's /dev/shm), host B (a network
//! namespace plus its own pid namespace with its own /proc, its own IPC
//! namespace and its own /dev/shm) and client C (a network namespace) are
//! on one L2 segment (a bridge in a namespace of its own) in 198.18.0.0/15
//! and 2001:2::/48, with a service address that starts on A as a secondary
//! address; `down` removes everything, also what a failed `up` left, and
//! may be run any number of times.
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
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

    fn netns_c(&self) -> String {
        format!("{}-c", self.prefix)
    }

    fn netns_sw(&self) -> String {
        format!("{}-sw", self.prefix)
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
            "FERRY_HOSTS_ADDR_C",
            "FERRY_HOSTS_SERVICE",
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
    addr: impl Into<IpAddr>,
) -> (u16, std::thread::JoinHandle<Result<SocketAddr, String>>) {
    let addr = addr.into();
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
fn tcp_client(addr: impl Into<IpAddr>, port: u16, msg: &str) -> String {
    let addr = addr.into();
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
    assert_eq!(
        listed,
        vec![
            hosts.netns_a(),
            hosts.netns_b(),
            hosts.netns_c(),
            hosts.netns_sw()
        ]
    );
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

/// The IPv4/IPv6 address lines of `ip -o addr show dev DEV` in `netns`:
/// "ADDR/PLEN FLAGS..." each (the words after the address).
fn addr_lines(netns: &str, dev: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "addr", "show", "dev", dev])
        .output()
        .expect("run ip addr show");
    assert!(
        out.status.success(),
        "ip -n {netns} addr show dev {dev} failed"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "inet" || *w == "inet6")?;
            Some(words[at + 1..].join(" "))
        })
        .collect()
}

#[test]
fn client_c_reaches_a_and_b_and_the_service_address_answers_on_a() {
    let _serial = common::setup();
    let hosts = Hosts::new("c");
    hosts.up();
    let env = hosts.run(&["env"], &[]).ok("env").stdout;
    for want in [
        "FERRY_HOST_C_ADDR=198.18.0.3",
        "FERRY_SERVICE_ADDR=198.18.0.100",
        "FERRY_SERVICE_ADDR6=2001:2:0:1::100",
        &format!("FERRY_HOST_C_NETNS={}", hosts.netns_c()),
        &format!("FERRY_HOSTS_SWITCH_NETNS={}", hosts.netns_sw()),
    ] {
        assert!(env.lines().any(|l| l == want), "`env` lacks {want}:\n{env}");
    }

    let a = Ipv4Addr::new(198, 18, 0, 1);
    let b = Ipv4Addr::new(198, 18, 0, 2);
    let c = Ipv4Addr::new(198, 18, 0, 3);
    let service = Ipv4Addr::new(198, 18, 0, 100);
    let c6: Ipv6Addr = "2001:2:0:1::3".parse().unwrap();
    let service6: Ipv6Addr = "2001:2:0:1::100".parse().unwrap();

    // The service address is on A only, and a secondary address there (A's
    // own stays primary); the switch has the bridge and no address.
    let on_a = addr_lines(&hosts.netns_a(), "veth-a");
    assert!(
        on_a.iter()
            .any(|l| l.starts_with("198.18.0.1/24 ") && !l.contains("secondary")),
        "A's own address is not primary on veth-a: {on_a:?}"
    );
    assert!(
        on_a.iter()
            .any(|l| l.starts_with("198.18.0.100/24 ") && l.contains("secondary")),
        "the service address is not a secondary address on veth-a: {on_a:?}"
    );
    assert!(
        on_a.iter().any(|l| l.starts_with("2001:2:0:1::100/64 ")),
        "the IPv6 service address is not on veth-a: {on_a:?}"
    );
    for (ns, dev) in [(hosts.netns_b(), "veth-b"), (hosts.netns_c(), "veth-c")] {
        let addrs = addr_lines(&ns, dev);
        assert!(
            !addrs
                .iter()
                .any(|l| l.starts_with("198.18.0.100/") || l.starts_with("2001:2:0:1::100/")),
            "the service address is on {ns}: {addrs:?}"
        );
    }
    let sw = addr_lines(&hosts.netns_sw(), "br0");
    assert!(
        !sw.iter()
            .any(|l| l.starts_with("198.18.") || l.starts_with("2001:2:")),
        "the switch has an address of the segment: {sw:?}"
    );

    // C connects to listeners on A, on B and on A's service address (both
    // families); each listener sees C's address.
    for (netns, addr, from) in [
        (hosts.netns_a(), IpAddr::from(a), IpAddr::from(c)),
        (hosts.netns_b(), IpAddr::from(b), IpAddr::from(c)),
        (hosts.netns_a(), IpAddr::from(service), IpAddr::from(c)),
        (hosts.netns_a(), IpAddr::from(service6), IpAddr::from(c6)),
    ] {
        let (port, server) = serve_once(&netns, addr);
        let answer = hosts.exec("exec-c", &["bash", "-c", &tcp_client(addr, port, "from-c")]);
        assert_eq!(
            answer.trim(),
            format!("pong from-c from {from}"),
            "{addr} on {netns}"
        );
        let peer = server
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("listener on {addr} in {netns}: {e}"));
        assert_eq!(peer.ip(), from);
    }

    // exec-c is in C's network namespace.
    let ns_c = ns_id_of_file(
        "net",
        &PathBuf::from(format!("/run/netns/{}", hosts.netns_c())),
    );
    let out = hosts.exec("exec-c", &["readlink", "/proc/self/ns/net"]);
    assert_eq!(out.trim(), ns_c, "exec-c");

    hosts.down();
    reap_zombie_children();
    hosts.assert_gone();
    let out = hosts.run(&["exec-c", "true"], &[]);
    assert!(
        !out.status.success() && out.stderr.contains("does not exist"),
        "exec-c after down: {}",
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
    for step in ["netns", "veth", "bridge", "addr", "holder", "check"] {
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

/// The host's mounts (this test process's mount namespace, as `findmnt`
/// shows it) on /dev/shm or below: "ID PARENT FSTYPE SOURCE TARGET" each.
fn host_shm_mounts() -> Vec<String> {
    let out = Command::new("findmnt")
        .args([
            "--noheadings",
            "--raw",
            "--output",
            "ID,PARENT,FSTYPE,SOURCE,TARGET",
        ])
        .output()
        .expect("run findmnt");
    assert!(
        out.status.success(),
        "findmnt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let target = l.split_whitespace().nth(4).unwrap_or("");
            target == "/dev/shm" || target.starts_with("/dev/shm/")
        })
        .map(str::to_string)
        .collect()
}

/// Every PID in /proc (of our pid namespace).
fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Processes that have mount source `source` in their mount namespace.
fn pids_seeing_mount(source: &str) -> Vec<i32> {
    let needle = format!(" - tmpfs {source} ");
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .is_ok_and(|m| m.contains(&needle))
        })
        .collect()
}

/// Processes that are in namespace `id` ("ipc:[INODE]") or hold an fd on it.
fn pids_holding_ns(kind: &str, id: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            let own = std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
                .is_ok_and(|l| l.as_os_str() == id);
            own || std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
                rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .any(|l| l.as_os_str() == id)
            })
        })
        .collect()
}

/// (key, shmid) of every SysV segment `ipcs -m` printed.
fn parse_ipcs_m(out: &str) -> Vec<(u32, i32)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let key = u32::from_str_radix(it.next()?.strip_prefix("0x")?, 16).ok()?;
            Some((key, it.next()?.parse().ok()?))
        })
        .collect()
}

/// What the IPC test made on A and on B. Drop removes all of it, also
/// when the test fails half-way: A's from this process (which is in A's IPC
/// namespace and sees A's /dev/shm), B's through exec-b while B is up.
struct IpcMade<'a> {
    hosts: &'a Hosts,
    /// SysV shmids in A's (the host's) IPC namespace.
    a_shm: Vec<i32>,
    /// Files in the host's /dev/shm.
    a_files: Vec<PathBuf>,
    /// (key, shmid) of SysV segments made on B.
    b_shm: Vec<(u32, i32)>,
    /// Paths (in B's /dev/shm) of files made on B.
    b_files: Vec<String>,
}

impl IpcMade<'_> {
    /// Remove everything recorded; returns what could not be removed.
    fn clean(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for id in self.a_shm.drain(..) {
            // SAFETY: IPC_RMID on a segment id this test created; no buffer.
            if unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
                errors.push(format!(
                    "shmctl({id}, IPC_RMID) on A: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        for f in self.a_files.drain(..) {
            if let Err(e) = std::fs::remove_file(&f) {
                errors.push(format!("remove {} on A: {e}", f.display()));
            }
        }
        let b_up = self.hosts.run(&["exec-b", "true"], &[]).status.success();
        for (key, id) in self.b_shm.drain(..) {
            if b_up {
                let out = self
                    .hosts
                    .run(&["exec-b", "ipcrm", "-m", &id.to_string()], &[]);
                if !out.status.success() {
                    errors.push(format!("ipcrm -m {id} on B: {}", out.stderr.trim()));
                }
            } else {
                // B is gone and its segments with it, unless it shared our
                // IPC namespace after all: then remove it here, if both its
                // key and its id are still the ones B reported.
                let seen = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
                let ours = seen.lines().skip(1).any(|l| {
                    let mut it = l.split_whitespace();
                    it.next().and_then(|k| k.parse::<i64>().ok()) == Some(key as i32 as i64)
                        && it.next().and_then(|i| i.parse::<i32>().ok()) == Some(id)
                });
                // SAFETY: IPC_RMID on the segment B made; no buffer.
                if ours && unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
                    errors.push(format!("shmctl({id}, IPC_RMID) of B's segment on the host"));
                }
            }
        }
        for f in self.b_files.drain(..) {
            if b_up {
                let out = self.hosts.run(&["exec-b", "rm", "--", &f], &[]);
                if !out.status.success() {
                    errors.push(format!("rm {f} on B: {}", out.stderr.trim()));
                }
            } else {
                // Only there if B's /dev/shm was the host's; the name is ours.
                let _ = std::fs::remove_file(&f);
            }
        }
        errors
    }
}

impl Drop for IpcMade<'_> {
    fn drop(&mut self) {
        let _ = self.clean();
    }
}

/// A new SysV segment of `size` bytes in this process's IPC namespace,
/// under a key of its own; returns (key, shmid).
fn shm_create_here(size: usize) -> (u32, i32) {
    for i in 0..256u32 {
        let key = 0x4600_0000 | ((std::process::id() & 0xffff) << 8) | i;
        // SAFETY: shmget with integer arguments.
        let id = unsafe {
            libc::shmget(
                key as libc::key_t,
                size,
                libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
            )
        };
        if id >= 0 {
            return (key, id);
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "shmget: {e}");
    }
    panic!("no free SysV key for this test");
}

/// "present" or "absent": whether `path` exists where `cmd` (exec-a or
/// exec-b) runs.
fn exists_on(hosts: &Hosts, cmd: &str, path: &str) -> bool {
    let out = hosts.exec(
        cmd,
        &[
            "sh",
            "-c",
            "if [ -e \"$1\" ]; then echo present; else echo absent; fi",
            "sh",
            path,
        ],
    );
    match out.trim() {
        "present" => true,
        "absent" => false,
        o => panic!("{cmd} printed {o:?} for the existence of {path}"),
    }
}

#[test]
fn b_has_its_own_ipc_namespace_and_dev_shm() {
    use std::os::unix::fs::MetadataExt;
    let _serial = common::setup();
    let hosts = Hosts::new("i");
    let shm_mounts = host_shm_mounts();
    let host_shm_dev = std::fs::metadata("/dev/shm").expect("stat /dev/shm").dev();
    let source = format!("shm-{}", hosts.netns_b());

    hosts.up();
    assert_eq!(
        host_shm_mounts(),
        shm_mounts,
        "up changed the host's mounts on /dev/shm"
    );
    let env = hosts.run(&["env"], &[]).ok("env").stdout;
    let b_init: i32 = env
        .lines()
        .find_map(|l| l.strip_prefix("FERRY_HOST_B_INIT_PID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no FERRY_HOST_B_INIT_PID in `env`:\n{env}"));
    let mut made = IpcMade {
        hosts: &hosts,
        a_shm: Vec::new(),
        a_files: Vec::new(),
        b_shm: Vec::new(),
        b_files: Vec::new(),
    };

    // exec-a is in our IPC namespace; every exec-b in B's, not ours.
    let ipc_a = hosts.exec("exec-a", &["readlink", "/proc/self/ns/ipc"]);
    assert_eq!(
        ipc_a.trim(),
        own_ns("ipc"),
        "exec-a is not in the host's IPC namespace"
    );
    let ipc_b = std::fs::read_link(format!("/proc/{b_init}/ns/ipc"))
        .expect("readlink B's init ipc ns")
        .to_string_lossy()
        .into_owned();
    assert_ne!(
        ipc_b,
        own_ns("ipc"),
        "B's init is in the host's IPC namespace"
    );
    for _ in 0..2 {
        let ipc = hosts.exec("exec-b", &["readlink", "/proc/self/ns/ipc"]);
        assert_eq!(ipc.trim(), ipc_b, "exec-b is not in B's IPC namespace");
    }
    let mnt_b = std::fs::read_link(format!("/proc/{b_init}/ns/mnt"))
        .expect("readlink B's init mnt ns")
        .to_string_lossy()
        .into_owned();

    // B's /dev/shm: a tmpfs of its own, mode 1777, seen by B only; A's is
    // the host's.
    let st = hosts.exec("exec-b", &["stat", "-f", "-c", "%T", "/dev/shm"]);
    assert_eq!(st.trim(), "tmpfs", "B's /dev/shm");
    let st = hosts.exec("exec-b", &["stat", "-c", "%a %d", "/dev/shm"]);
    assert_eq!(
        st.split_whitespace().next(),
        Some("1777"),
        "mode of B's /dev/shm: {st}"
    );
    assert_ne!(
        st.split_whitespace().nth(1),
        Some(host_shm_dev.to_string().as_str()),
        "B's /dev/shm is the host's"
    );
    let st = hosts.exec("exec-a", &["stat", "-c", "%d", "/dev/shm"]);
    assert_eq!(
        st.trim(),
        host_shm_dev.to_string(),
        "A's /dev/shm is not the host's"
    );
    assert!(
        pids_seeing_mount(&source).contains(&b_init),
        "B's init does not see its {source} mount"
    );
    let me = std::process::id() as i32;
    assert!(
        !pids_seeing_mount(&source).contains(&me),
        "B's {source} mount is visible on the host"
    );

    // B's IPC namespace starts empty: none of the host's segments is there.
    let on_b = parse_ipcs_m(&hosts.exec("exec-b", &["ipcs", "-m"]));
    assert_eq!(on_b, vec![], "B's ipcs -m lists segments it did not make");

    // A SysV segment made on A is on A only.
    let (key_a, id_a) = shm_create_here(4096);
    made.a_shm.push(id_a);
    let on_a = parse_ipcs_m(&hosts.exec("exec-a", &["ipcs", "-m"]));
    assert!(
        on_a.contains(&(key_a, id_a)),
        "A's ipcs -m lacks the segment made on A ({key_a:#x}, {id_a}): {on_a:?}"
    );
    let on_b = parse_ipcs_m(&hosts.exec("exec-b", &["ipcs", "-m"]));
    assert_eq!(on_b, vec![], "B's ipcs -m lists A's segment {key_a:#x}");

    // A SysV segment made on B is on B only.
    let out = hosts.exec("exec-b", &["ipcmk", "-M", "4096"]);
    let id_b: i32 = out
        .trim()
        .strip_prefix("Shared memory id: ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("ipcmk on B printed {out:?}"));
    let on_b = parse_ipcs_m(&hosts.exec("exec-b", &["ipcs", "-m"]));
    let key_b = on_b
        .iter()
        .find(|&&(_, id)| id == id_b)
        .map(|&(k, _)| k)
        .unwrap_or_else(|| panic!("B's ipcs -m lacks its segment {id_b}: {on_b:?}"));
    made.b_shm.push((key_b, id_b));
    assert_eq!(on_b, vec![(key_b, id_b)], "B's segments");
    let on_a = parse_ipcs_m(&hosts.exec("exec-a", &["ipcs", "-m"]));
    assert!(
        !on_a.iter().any(|&(k, _)| k == key_b),
        "A's ipcs -m lists B's segment {key_b:#x}: {on_a:?}"
    );
    assert!(
        on_a.contains(&(key_a, id_a)),
        "A's segment is gone: {on_a:?}"
    );

    // A file in /dev/shm made on A is on A only, one made on B on B only.
    let tag = format!("ferry-hosts-test-{me}");
    let file_a = PathBuf::from(format!("/dev/shm/{tag}-a"));
    made.a_files.push(file_a.clone());
    std::fs::write(&file_a, "from A\n").expect("write a file in /dev/shm on A");
    let file_a = file_a.to_str().unwrap();
    assert!(
        exists_on(&hosts, "exec-a", file_a),
        "A does not see {file_a}"
    );
    assert!(!exists_on(&hosts, "exec-b", file_a), "B sees A's {file_a}");
    let file_b = format!("/dev/shm/{tag}-b");
    made.b_files.push(file_b.clone());
    hosts.exec(
        "exec-b",
        &["sh", "-c", "echo from B > \"$1\"", "sh", &file_b],
    );
    assert_eq!(hosts.exec("exec-b", &["cat", &file_b]), "from B\n");
    assert!(!Path::new(&file_b).exists(), "B's {file_b} is on the host");
    assert!(!exists_on(&hosts, "exec-a", &file_b), "A sees B's {file_b}");

    // Everything made is removed, on both sides.
    let errors = made.clean();
    assert!(errors.is_empty(), "clean-up failed: {errors:?}");
    assert!(!Path::new(file_a).exists(), "{file_a} is still there");
    assert!(
        !exists_on(&hosts, "exec-b", &file_b),
        "{file_b} is still on B"
    );
    let on_a = parse_ipcs_m(&hosts.exec("exec-a", &["ipcs", "-m"]));
    assert!(!on_a.contains(&(key_a, id_a)), "A's segment is still there");
    let on_b = parse_ipcs_m(&hosts.exec("exec-b", &["ipcs", "-m"]));
    assert_eq!(on_b, vec![], "B's segment is still there");

    // down leaves nothing of B: no namespace, no mount of its /dev/shm.
    hosts.down();
    reap_zombie_children();
    hosts.assert_gone();
    assert_eq!(
        host_shm_mounts(),
        shm_mounts,
        "the host's mounts on /dev/shm after down"
    );
    assert_eq!(
        pids_seeing_mount(&source),
        Vec::<i32>::new(),
        "processes still see B's {source} mount after down"
    );
    assert_eq!(
        pids_holding_ns("ipc", &ipc_b),
        Vec::<i32>::new(),
        "processes still hold B's IPC namespace {ipc_b} after down"
    );
    assert_eq!(
        pids_holding_ns("mnt", &mnt_b),
        Vec::<i32>::new(),
        "processes still hold B's mount namespace {mnt_b} after down"
    );
}
