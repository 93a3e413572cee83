//! A malformed or hostile message closes that connection with a logged
//! error; the agent never panics and keeps serving others.
//!
//! `dest-agent` runs on 127.0.0.1 (root namespaces, config in a temp dir);
//! the test is a paired QUIC client built from `ferry_transport` that speaks
//! `ferry_protocol::wire` on the control stream: garbage, a huge declared
//! length, a bad checksum, and a message out of order each get their
//! connection closed within a bounded time, while a well-behaved connection
//! opened before stays open and a new one is still served. An untrusted
//! client is refused, and the agent keeps running.
mod common;

use common::hosts::{dest_agent_bin, run};
use common::{Procs, Workload};
use ferry_protocol::model::HostInfo;
use ferry_protocol::wire::{
    self, ControlMsg, Frame, FrameHeader, MsgKind, ProtocolVersion, HEADER_LEN, MAX_CONTROL_FRAME,
    WIRE_MAJOR,
};
use ferry_transport::{Identity, TrustStore};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the agent may take to close a connection after a bad message
/// (well below its own 10 s timeouts, so a close is a reaction, not a
/// timeout).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer (HelloAck) may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A `dest-agent` on 127.0.0.1 with its log in a file.
struct Agent {
    w: Workload,
    addr: SocketAddr,
}

impl Agent {
    /// The agent's log without terminal colour codes.
    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.w.out.err_path).unwrap_or_default())
    }

    /// The agent runs and has not panicked.
    fn assert_alive(&self, what: &str) {
        let log = self.log();
        assert!(
            common::hosts::alive(self.w.pid),
            "{what}: the dest-agent (pid {}) is gone; log:\n{log}",
            self.w.pid
        );
        assert!(
            !log.contains("panicked"),
            "{what}: the dest-agent panicked; log:\n{log}"
        );
    }

    /// Wait until the log, past byte `from`, has a WARN or ERROR line that
    /// mentions one of `words` (case-insensitive).
    fn wait_error(&self, from: usize, words: &[&str], what: &str) {
        let start = Instant::now();
        loop {
            let log = self.log();
            let new = log.get(from..).unwrap_or("");
            let hit = new.lines().any(|l| {
                let l = l.to_lowercase();
                (l.contains("warn") || l.contains("error")) && words.iter().any(|w| l.contains(w))
            });
            if hit {
                return;
            }
            assert!(
                start.elapsed() < CLOSE_TIMEOUT,
                "{what}: no logged error mentioning one of {words:?} within {CLOSE_TIMEOUT:?}; \
                 new log lines:\n{new}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a UDP socket on 127.0.0.1")
        .port()
}

/// `dest-agent --config-dir DIR ARGS`, which must succeed; its stdout.
fn agent_cmd(dir: &Path, tmp: &Path, args: &[&str], name: &str) -> String {
    let mut cmd = Command::new(dest_agent_bin());
    cmd.arg("--config-dir").arg(dir).args(args);
    let r = run(cmd, tmp, name);
    r.assert_ok();
    r.stdout
}

/// Start `dest-agent` on 127.0.0.1:PORT with config dir `dir`; waits until
/// it listens.
fn start_agent(procs: &mut Procs, dir: &Path, tmp: &Path) -> Agent {
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new(dest_agent_bin());
    cmd.arg("--config-dir")
        .arg(dir)
        .args(["listen", "--listen", &addr.to_string()])
        .arg("--work-dir")
        .arg(tmp.join("work"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("FERRY_CONFIG_DIR")
        .env_remove("FERRY_DEST_PAUSE_AT");
    let w = procs.spawn(cmd, tmp, "agent");
    common::wait_until(Duration::from_secs(10), "dest-agent listening", || {
        std::fs::read_to_string(&w.out.err_path)
            .ok()?
            .contains("listening on")
            .then_some(())
    });
    Agent { w, addr }
}

/// This host, as a source would describe it in `Hello`.
fn host_info() -> HostInfo {
    HostInfo {
        arch: std::env::consts::ARCH.to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .expect("read /proc/sys/kernel/osrelease")
            .trim()
            .to_string(),
        xstate_size: ferry_parasite::xsave::host_xstate_size() as u32,
        xfeatures: ferry_parasite::xsave::host_xfeatures(),
    }
}

fn hello() -> ControlMsg {
    ControlMsg::Hello {
        version: ProtocolVersion::CURRENT,
        host: host_info(),
        agent: "ferry-e2e hostile_peer".to_string(),
    }
}

/// A new connection and its control stream.
async fn open(ep: &Endpoint, addr: SocketAddr, what: &str) -> (Connection, SendStream, RecvStream) {
    let conn = tokio::time::timeout(REPLY_TIMEOUT, ferry_transport::connect(ep, addr))
        .await
        .unwrap_or_else(|_| panic!("{what}: no handshake within {REPLY_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let (send, recv) = conn
        .open_bi()
        .await
        .unwrap_or_else(|e| panic!("{what}: open the control stream: {e}"));
    (conn, send, recv)
}

async fn send_bytes(send: &mut SendStream, bytes: &[u8], what: &str) {
    send.write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
}

/// Read one control message (header, bounded payload, checksum, decoding).
async fn read_msg(recv: &mut RecvStream, what: &str) -> ControlMsg {
    let fut = async {
        let mut h = [0u8; HEADER_LEN];
        recv.read_exact(&mut h)
            .await
            .map_err(|e| format!("reading a frame header: {e}"))?;
        let header = FrameHeader::parse(&h, MAX_CONTROL_FRAME).map_err(|e| e.to_string())?;
        let mut payload = vec![0u8; header.len as usize];
        recv.read_exact(&mut payload)
            .await
            .map_err(|e| format!("reading a {} payload: {e}", header.kind))?;
        let frame = Frame::from_parts(header, payload).map_err(|e| e.to_string())?;
        wire::decode_control(&frame).map_err(|e| e.to_string())
    };
    tokio::time::timeout(REPLY_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no reply within {REPLY_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Hello, then expect HelloAck.
async fn greet(send: &mut SendStream, recv: &mut RecvStream, what: &str) {
    let bytes = wire::encode_control(&hello()).expect("encode Hello");
    send_bytes(send, &bytes, what).await;
    match read_msg(recv, what).await {
        ControlMsg::HelloAck { version, .. } => {
            assert_eq!(version.major, WIRE_MAJOR, "{what}: HelloAck {version:?}")
        }
        m => panic!("{what}: expected HelloAck, got {m:?}"),
    }
}

/// The agent closes the connection within [`CLOSE_TIMEOUT`]: the control
/// stream ends or fails, and the connection is closed. Returns a
/// description of how.
async fn expect_closed(conn: &Connection, recv: &mut RecvStream, what: &str) -> String {
    let fut = async {
        let mut buf = vec![0u8; 64 << 10];
        let end = loop {
            match recv.read(&mut buf).await {
                Ok(Some(_)) => {} // e.g. an Abort with the reason
                Ok(None) => break "the control stream ended".to_string(),
                Err(e) => break format!("reading failed: {e}"),
            }
        };
        let reason = conn.closed().await;
        format!("{end}; connection closed: {reason}")
    };
    tokio::time::timeout(CLOSE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: the agent did not close the connection within {CLOSE_TIMEOUT:?}")
        })
}

/// Pseudo-random bytes (xorshift) that do not start with the frame magic.
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if v[..2] == wire::WIRE_MAGIC.to_le_bytes() {
        v[0] ^= 0xff;
    }
    v
}

struct Case {
    name: &'static str,
    /// Log words, one of which the agent's error must mention.
    words: &'static [&'static str],
}

#[test]
fn hostile_messages_close_only_their_connection() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tmp = tmp.path();
    let mut procs = Procs::new();

    // Pair the agent and the test's client.
    let agent_dir = tmp.join("agent");
    let client_dir = tmp.join("client");
    let agent_fp = agent_cmd(&agent_dir, tmp, &["identity"], "identity")
        .trim()
        .to_string();
    let client = Identity::load_or_create(&client_dir).expect("client identity");
    let client_trust = TrustStore::load(&client_dir).expect("client trust store");
    client_trust.add(&agent_fp).expect("trust the agent");
    agent_cmd(
        &agent_dir,
        tmp,
        &["trust", client.fingerprint().as_str()],
        "trust",
    );
    let agent = start_agent(&mut procs, &agent_dir, tmp);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let ep = ferry_transport::client_endpoint(&client, client_trust.clone())
            .expect("client endpoint");

        // A well-behaved connection, kept open through the hostile ones.
        let (good, mut good_send, mut good_recv) = open(&ep, agent.addr, "good").await;
        greet(&mut good_send, &mut good_recv, "good connection").await;

        let hello_bytes = wire::encode_control(&hello()).expect("encode Hello");
        let mut bad_checksum = hello_bytes.clone();
        *bad_checksum.last_mut().unwrap() ^= 0x5a;
        let huge = FrameHeader {
            kind: MsgKind::Hello,
            len: u32::MAX,
            checksum: 0,
        }
        .to_bytes();
        let out_of_order = wire::encode_control(&ControlMsg::PassEnd {
            pass: 0,
            batches: 0,
            pages: 0,
            bytes: 0,
        })
        .expect("encode PassEnd");

        let cases = [
            (
                Case {
                    name: "random garbage",
                    words: &["magic", "not a ferry peer"],
                },
                garbage(4096),
                false,
            ),
            (
                Case {
                    name: "a huge declared length",
                    words: &["exceeds", "limit", "too large"],
                },
                huge.to_vec(),
                false,
            ),
            (
                Case {
                    name: "a bad checksum",
                    words: &["checksum"],
                },
                bad_checksum,
                false,
            ),
            (
                Case {
                    name: "PassEnd before Prepare",
                    words: &["unexpected", "expected", "order"],
                },
                out_of_order,
                true,
            ),
        ];
        for (case, bytes, greet_first) in cases {
            let what = case.name;
            let from = agent.log().len();
            let t = Instant::now();
            let (conn, mut send, mut recv) = open(&ep, agent.addr, what).await;
            if greet_first {
                greet(&mut send, &mut recv, what).await;
            }
            send_bytes(&mut send, &bytes, what).await;
            let how = expect_closed(&conn, &mut recv, what).await;
            eprintln!(
                "{what}: closed after {:.0} ms ({how})",
                t.elapsed().as_secs_f64() * 1e3
            );
            agent.wait_error(from, case.words, what);
            agent.assert_alive(what);
            assert!(
                good.close_reason().is_none(),
                "{what}: the well-behaved connection was closed too: {:?}",
                good.close_reason()
            );
        }

        // The agent still serves: a new connection gets its HelloAck.
        let (conn, mut send, mut recv) = open(&ep, agent.addr, "after").await;
        greet(
            &mut send,
            &mut recv,
            "a new connection after the hostile ones",
        )
        .await;
        assert!(
            good.close_reason().is_none(),
            "the well-behaved connection was closed: {:?}",
            good.close_reason()
        );
        conn.close(0u32.into(), b"done");
        good.close(0u32.into(), b"done");
        ep.wait_idle().await;
    });
    agent.assert_alive("at the end");
}

#[test]
fn untrusted_client_is_refused_and_the_agent_keeps_running() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tmp = tmp.path();
    let mut procs = Procs::new();

    let agent_dir = tmp.join("agent");
    let agent_fp = agent_cmd(&agent_dir, tmp, &["identity"], "identity")
        .trim()
        .to_string();
    // The stranger trusts the agent; the agent does not trust it.
    let stranger_dir = tmp.join("stranger");
    let stranger = Identity::load_or_create(&stranger_dir).expect("identity");
    let stranger_trust = TrustStore::load(&stranger_dir).expect("trust store");
    stranger_trust.add(&agent_fp).expect("trust the agent");
    // A paired client, to show the agent still serves afterwards.
    let friend_dir = tmp.join("friend");
    let friend = Identity::load_or_create(&friend_dir).expect("identity");
    let friend_trust = TrustStore::load(&friend_dir).expect("trust store");
    friend_trust.add(&agent_fp).expect("trust the agent");
    agent_cmd(
        &agent_dir,
        tmp,
        &["trust", friend.fingerprint().as_str()],
        "trust",
    );
    let agent = start_agent(&mut procs, &agent_dir, tmp);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let what = "untrusted client";
        let from = agent.log().len();
        let ep = ferry_transport::client_endpoint(&stranger, stranger_trust.clone())
            .expect("client endpoint");
        // TLS 1.3: the client may finish its handshake before the server
        // refuses it; the refusal then shows on the first stream operation.
        let refusal = match ferry_transport::connect(&ep, agent.addr).await {
            Err(e) => e.to_string(),
            Ok(conn) => {
                let r = async {
                    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                    let bytes = wire::encode_control(&hello()).expect("encode Hello");
                    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
                    let mut buf = [0u8; 64];
                    match recv.read(&mut buf).await {
                        Ok(n) => Ok(format!("read {n:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                };
                let r = tokio::time::timeout(CLOSE_TIMEOUT, r)
                    .await
                    .unwrap_or_else(|_| panic!("{what}: not refused within {CLOSE_TIMEOUT:?}"));
                match r {
                    Ok(s) => panic!("{what}: the agent answered an untrusted client ({s})"),
                    Err(e) => match ferry_transport::close_error(&conn) {
                        Some(ce) => format!("{e} ({ce})"),
                        None => e,
                    },
                }
            }
        };
        eprintln!("{what}: refused: {refusal}");
        assert!(
            refusal.contains("not a trusted peer") && refusal.contains("dest-agent trust"),
            "{what}: the refusal should say why and how to trust: {refusal}"
        );
        agent.wait_error(from, &["trusted", "refused"], what);
        agent.assert_alive(what);
        ep.wait_idle().await;

        // A trusted client is still served.
        let ep = ferry_transport::client_endpoint(&friend, friend_trust.clone())
            .expect("client endpoint");
        let (conn, mut send, mut recv) = open(&ep, agent.addr, "trusted client").await;
        greet(&mut send, &mut recv, "trusted client after a refusal").await;
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    });
    agent.assert_alive("at the end");
}
