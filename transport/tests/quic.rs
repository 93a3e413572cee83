//! Real QUIC over 127.0.0.1 between two identities in temporary directories.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferry_transport::{
    accept, client_endpoint, close_error, connect, peer_fingerprint, server_endpoint, Identity,
    TrustStore,
};
use tempfile::TempDir;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

struct Side {
    _dir: TempDir,
    id: Identity,
    trust: TrustStore,
}

fn side() -> Side {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = Identity::load_or_create(dir.path()).expect("identity");
    let trust = TrustStore::load(dir.path()).expect("trust store");
    Side {
        _dir: dir,
        id,
        trust,
    }
}

fn localhost() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

/// Server side: accept one connection, echo one bidirectional stream.
/// Returns the server's error text, if any.
async fn serve_echo(server: quinn::Endpoint) -> Result<String, String> {
    let conn = accept(&server)
        .await
        .ok_or("endpoint closed")?
        .map_err(|e| e.to_string())?;
    let fp = peer_fingerprint(&conn).ok_or("no peer fingerprint")?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let data = recv.read_to_end(1 << 24).await.map_err(|e| e.to_string())?;
    send.write_all(&data).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    // Wait until the client has read everything and closed.
    conn.closed().await;
    Ok(fp.to_string())
}

/// Client side: connect, send `data` on one stream, read the echo.
async fn echo(client: &quinn::Endpoint, addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>, String> {
    let conn = connect(client, addr).await.map_err(|e| e.to_string())?;
    // Stream errors say only "connection lost"; the close reason says why.
    let why = |e: &dyn std::fmt::Display| match close_error(&conn) {
        Some(reason) => format!("{e}: {reason}"),
        None => e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| why(&e))?;
    send.write_all(data).await.map_err(|e| why(&e))?;
    send.finish().map_err(|e| why(&e))?;
    let back = recv.read_to_end(1 << 24).await.map_err(|e| why(&e))?;
    conn.close(0u32.into(), b"done");
    Ok(back)
}

fn payload() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

#[tokio::test]
async fn mutual_trust_connects_and_echoes() {
    let (a, b) = (side(), side());
    a.trust
        .add(b.id.fingerprint().as_str())
        .expect("a trusts b");
    b.trust
        .add(a.id.fingerprint().as_str())
        .expect("b trusts a");

    let server = server_endpoint(localhost(), &b.id, b.trust.clone()).expect("server");
    let addr = server.local_addr().expect("addr");
    let served = tokio::spawn(serve_echo(server.clone()));
    let client = client_endpoint(&a.id, a.trust.clone()).expect("client");

    let data = payload();
    let back = timeout(LIMIT, echo(&client, addr, &data))
        .await
        .expect("echo timed out")
        .expect("echo failed");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    let seen = timeout(LIMIT, served)
        .await
        .expect("server timed out")
        .expect("server task")
        .expect("server failed");
    assert_eq!(
        seen,
        a.id.fingerprint().to_string(),
        "server saw another client"
    );
}

#[tokio::test]
async fn server_refuses_untrusted_client() {
    let (a, b) = (side(), side());
    a.trust
        .add(b.id.fingerprint().as_str())
        .expect("a trusts b");
    // b does not trust a.

    let server = server_endpoint(localhost(), &b.id, b.trust.clone()).expect("server");
    let addr = server.local_addr().expect("addr");
    let served = tokio::spawn(serve_echo(server.clone()));
    let client = client_endpoint(&a.id, a.trust.clone()).expect("client");

    let client_err = timeout(LIMIT, echo(&client, addr, b"hello"))
        .await
        .expect("client timed out")
        .expect_err("untrusted client got through");
    let server_err = timeout(LIMIT, served)
        .await
        .expect("server timed out")
        .expect("server task")
        .expect_err("server accepted an untrusted client");

    let fp = a.id.fingerprint().to_string();
    for (side, err) in [("client", &client_err), ("server", &server_err)] {
        eprintln!("{side}: {err}");
        assert!(err.contains(&fp), "{side} error does not name {fp}: {err}");
        assert!(
            err.contains(&format!("dest-agent trust {fp}")),
            "{side} error lacks the hint: {err}"
        );
    }
}

#[tokio::test]
async fn client_refuses_untrusted_server() {
    let (a, b) = (side(), side());
    b.trust
        .add(a.id.fingerprint().as_str())
        .expect("b trusts a");
    // a does not trust b.

    let server = server_endpoint(localhost(), &b.id, b.trust.clone()).expect("server");
    let addr = server.local_addr().expect("addr");
    let served = tokio::spawn(serve_echo(server.clone()));
    let client = client_endpoint(&a.id, a.trust.clone()).expect("client");

    let client_err = timeout(LIMIT, connect(&client, addr))
        .await
        .expect("client timed out")
        .map(|_| ())
        .expect_err("client accepted an untrusted server")
        .to_string();
    let server_err = timeout(LIMIT, served)
        .await
        .expect("server timed out")
        .expect("server task")
        .expect_err("server saw a successful connection");

    let fp = b.id.fingerprint().to_string();
    for (side, err) in [("client", &client_err), ("server", &server_err)] {
        eprintln!("{side}: {err}");
        assert!(err.contains(&fp), "{side} error does not name {fp}: {err}");
        assert!(
            err.contains(&format!("migrate trust {fp}")),
            "{side} error lacks the hint: {err}"
        );
    }
}

#[tokio::test]
async fn trust_added_later_takes_effect_without_restart() {
    let (a, b) = (side(), side());
    a.trust
        .add(b.id.fingerprint().as_str())
        .expect("a trusts b");

    let server = server_endpoint(localhost(), &b.id, b.trust.clone()).expect("server");
    let addr = server.local_addr().expect("addr");
    let client = client_endpoint(&a.id, a.trust.clone()).expect("client");

    let served = tokio::spawn(serve_echo(server.clone()));
    let refused = timeout(LIMIT, echo(&client, addr, b"x"))
        .await
        .expect("timed out");
    assert!(refused.is_err(), "untrusted client got through");
    let _ = timeout(LIMIT, served).await.expect("server timed out");

    // Another process (`dest-agent trust …`) writes the server's trust file.
    let other = TrustStore::load(b.id.config_dir()).expect("load");
    other.add(a.id.fingerprint().as_str()).expect("trust a");

    let served = tokio::spawn(serve_echo(server.clone()));
    let back = timeout(LIMIT, echo(&client, addr, b"now trusted"))
        .await
        .expect("timed out")
        .expect("still refused after trusting");
    assert_eq!(back, b"now trusted");
    timeout(LIMIT, served)
        .await
        .expect("server timed out")
        .expect("server task")
        .expect("server failed");
}

#[test]
fn endpoint_outside_runtime_is_an_error() {
    let a = side();
    let err = client_endpoint(&a.id, a.trust.clone()).expect_err("no runtime, no error");
    assert!(matches!(err, ferry_transport::Error::NoRuntime), "{err}");
}
