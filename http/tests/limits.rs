//! The two bounds against real TCP clients on loopback: a client that sends half a header is
//! disconnected after the header-read timeout, and connections past the cap wait until one
//! is let go — while a well-behaved client is answered as usual.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use sd_http::{Limits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn start(
    limits: Limits,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    start_tls(limits, None).await
}

async fn start_tls(
    limits: Limits,
    tls: Option<std::sync::Arc<sd_http::ServerTls>>,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let task = tokio::spawn(serve(listener, app, limits, tls, stop.clone()));
    (addr, stop, task)
}

/// A whole request and its answer's status line.
async fn get_root(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer.lines().next().unwrap_or_default().to_owned()
}

/// Half a request header, then silence.
async fn slow_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    s
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => true, // an error answer (408) then close also lets go of the client
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_header_is_let_go() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 16,
    };
    let (addr, stop, task) = start(limits).await;
    let mut slow = slow_client(addr).await;
    let started = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a half-sent header must not hold the connection"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    assert!(get_root(addr).await.contains("200"), "others are served");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_one_to_go() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(400),
        max_connections: 2,
    };
    let (addr, stop, task) = start(limits).await;
    let _a = slow_client(addr).await;
    let _b = slow_client(addr).await;
    // Both slots are held: a good request waits until the slow clients are let go.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let status = get_root(addr).await;
    assert!(status.contains("200"), "{status}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "served while both slots were held ({:?})",
        started.elapsed()
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let (addr, stop, task) = start(Limits::default()).await;
    assert!(get_root(addr).await.contains("200"));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the port is closed"
    );
}

/// Over TLS, a client that connects and never completes the handshake is let go after the
/// same timeout; one that does is served.
#[tokio::test]
async fn a_client_that_never_finishes_its_tls_handshake_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let ca = sd_testkit::TestCa::new(dir.path(), "ca");
    let server = ca.server("server");
    let tls = sd_http::ServerTls::load(sd_http::TlsFiles {
        cert_file: server.cert,
        key_file: server.key,
        client_ca_file: None,
    })
    .unwrap();
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 16,
    };
    let (addr, stop, task) = start_tls(limits, Some(tls)).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a silent client must not hold the connection"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca.ca_file()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let answer = client
        .get(format!("https://localhost:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    stop.cancel();
    task.await.unwrap();
}

/// A renewed certificate is picked up when its files change (the scheduler checks every 10 s
/// and on SIGHUP); unchanged files are not re-read, and a broken file keeps the old one.
#[test]
fn changed_certificate_files_are_reloaded_and_broken_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = sd_testkit::TestCa::new(dir.path(), "ca");
    let first = ca.server("first");
    let tls = sd_http::ServerTls::load(sd_http::TlsFiles {
        cert_file: first.cert.clone(),
        key_file: first.key.clone(),
        client_ca_file: None,
    })
    .unwrap();
    let before = tls.config();
    assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
    assert!(std::sync::Arc::ptr_eq(&before, &tls.config()));

    let renewed = ca.server("renewed");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(&renewed.cert, &first.cert).unwrap();
    std::fs::copy(&renewed.key, &first.key).unwrap();
    assert!(
        tls.reload_if_changed().unwrap(),
        "the renewed files were not re-read"
    );
    assert!(!std::sync::Arc::ptr_eq(&before, &tls.config()));

    let serving = tls.config();
    std::fs::write(&first.key, "not a key").unwrap();
    let e = tls.reload_if_changed().unwrap_err();
    assert!(
        e.to_string().contains(&first.key.display().to_string()),
        "{e}"
    );
    assert!(
        std::sync::Arc::ptr_eq(&serving, &tls.config()),
        "a broken file replaced the certificate"
    );
}
