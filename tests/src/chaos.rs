//! A TCP proxy that breaks connections on demand, for fault tests.
//!
//! [`ChaosProxy`] listens on a free port of 127.0.0.1 and forwards every connection to its
//! target (or, with several targets, to the next one that accepts: a small load balancer, so a
//! killed replica behind it is skipped). The test points a client at the proxy instead of the
//! server and then:
//!
//! - [`ChaosProxy::cut`]: every open connection is reset (RST) and new ones are reset as soon as
//!   they are accepted — a crashed peer, or a firewall answering with resets;
//! - [`ChaosProxy::blackhole`]: open connections stop carrying data in both directions and new
//!   ones are accepted but never forwarded — a partition that drops packets, noticed only by
//!   timeouts;
//! - [`ChaosProxy::restore`]: new connections are forwarded again; connections that were
//!   blackholed are reset (their peers' state is long gone), as are ones that were cut.
//!
//! Counters ([`ChaosProxy::stats`]) tell a test what the proxy actually did.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Open,
    /// Reset every connection, open or new.
    Cut,
    /// Carry no data; keep connections open.
    Blackhole,
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections forwarded to a target.
    pub forwarded: u64,
    /// Connections reset at accept time because the proxy was cut.
    pub refused: u64,
    /// Forwarded connections reset by [`ChaosProxy::cut`] (or by a restore after a blackhole).
    pub reset: u64,
    /// Connections that were (or still are) blackholed.
    pub blackholed: u64,
    /// Connections dropped because no target accepted them.
    pub unreachable: u64,
    /// Times [`ChaosProxy::cut`] or [`ChaosProxy::blackhole`] was called.
    pub faults: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    blackholed: AtomicU64,
    unreachable: AtomicU64,
    faults: AtomicU64,
}

struct Shared {
    targets: std::sync::RwLock<Vec<SocketAddr>>,
    /// Round-robin position among `targets`.
    next: AtomicUsize,
    /// The mode, with an epoch bumped on every change so connections notice each one.
    mode: watch::Sender<(Mode, u64)>,
    counters: Counters,
}

/// A TCP proxy in front of one server or a set of replicas; stops listening when dropped.
pub struct ChaosProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// How long the proxy tries to reach one target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl ChaosProxy {
    /// A proxy in front of `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::balanced(vec![target]).await
    }

    /// A proxy in front of several replicas: each new connection goes to the next target in
    /// turn, skipping targets that refuse it.
    pub async fn balanced(targets: Vec<SocketAddr>) -> std::io::Result<Self> {
        if targets.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a proxy needs at least one target",
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel((Mode::Open, 0));
        let shared = Arc::new(Shared {
            targets: std::sync::RwLock::new(targets),
            next: AtomicUsize::new(0),
            mode,
            counters: Counters::default(),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { addr, shared, task })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://` URL of the proxy (for a proxy in front of Redis).
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// `http://` URL of the proxy (for a proxy in front of an HTTP server).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.borrow().0
    }

    /// Resets every open connection and every new one until [`ChaosProxy::restore`].
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// Stops carrying data on every connection, open or new, until [`ChaosProxy::restore`].
    pub fn blackhole(&self) {
        self.set(Mode::Blackhole);
    }

    /// Sends new connections to `target` from now on; open ones stay where they are, as after
    /// a DNS change (ElastiCache's primary endpoint moving to a promoted replica).
    pub fn point_at(&self, target: SocketAddr) {
        *self.shared.targets.write().expect("targets") = vec![target];
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.set(Mode::Open);
    }

    fn set(&self, mode: Mode) {
        if mode != Mode::Open {
            self.shared.counters.faults.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.mode.send_modify(|(m, epoch)| {
            *m = mode;
            *epoch += 1;
        });
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            accepted: get(&c.accepted),
            forwarded: get(&c.forwarded),
            refused: get(&c.refused),
            reset: get(&c.reset),
            blackholed: get(&c.blackholed),
            unreachable: get(&c.unreachable),
            faults: get(&c.faults),
        }
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end too: they see the proxy cut.
        self.shared.mode.send_modify(|(m, epoch)| {
            *m = Mode::Cut;
            *epoch += 1;
        });
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of descriptors or similar: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(inbound, Arc::clone(&shared)));
    }
}

/// Closes a socket with a reset rather than an orderly FIN, as a crash or a firewall would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(inbound: TcpStream, shared: Arc<Shared>) {
    let _ = inbound.set_nodelay(true);
    let mut mode = shared.mode.subscribe();
    let (current, _) = *mode.borrow_and_update();
    match current {
        Mode::Cut => {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            reset(inbound);
        }
        Mode::Blackhole => {
            shared.counters.blackholed.fetch_add(1, Ordering::Relaxed);
            stall(inbound, None, &mut mode).await;
        }
        Mode::Open => {
            let Some(outbound) = connect(&shared).await else {
                shared.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                reset(inbound);
                return;
            };
            shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            forward(inbound, outbound, &shared, &mut mode).await;
        }
    }
}

/// The next target that accepts a connection, round-robin.
async fn connect(shared: &Shared) -> Option<TcpStream> {
    let targets = shared.targets.read().expect("targets").clone();
    let n = targets.len();
    let first = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..n {
        let target = targets[(first + i) % n];
        if let Ok(Ok(stream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
        {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
    }
    None
}

/// Copies both ways until either side closes or the mode changes.
async fn forward(
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    shared: &Shared,
    mode: &mut watch::Receiver<(Mode, u64)>,
) {
    let changed = async {
        loop {
            if mode.changed().await.is_err() {
                return Mode::Cut;
            }
            let (m, _) = *mode.borrow_and_update();
            if m != Mode::Open {
                return m;
            }
        }
    };
    let fault = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => None,
        m = changed => Some(m),
    };
    match fault {
        None => {}
        Some(Mode::Blackhole) => {
            shared.counters.blackholed.fetch_add(1, Ordering::Relaxed);
            stall(inbound, Some(outbound), mode).await;
        }
        Some(_) => {
            shared.counters.reset.fetch_add(1, Ordering::Relaxed);
            reset(inbound);
            reset(outbound);
        }
    }
}

/// Holds the connection open carrying nothing (data read is discarded) until the mode changes
/// again, then resets it.
async fn stall(
    mut inbound: TcpStream,
    mut outbound: Option<TcpStream>,
    mode: &mut watch::Receiver<(Mode, u64)>,
) {
    async fn sink(stream: Option<&mut TcpStream>) {
        let Some(stream) = stream else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return std::future::pending().await,
                Ok(_) => {}
            }
        }
    }
    tokio::select! {
        _ = mode.changed() => {}
        () = sink(Some(&mut inbound)) => {}
        () = sink(outbound.as_mut()) => {}
    }
    reset(inbound);
    if let Some(outbound) = outbound {
        reset(outbound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A server answering every connection with its own tag, then closing.
    async fn tagged(tag: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(tag).await;
            }
        });
        addr
    }

    async fn roundtrip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut buf = vec![0u8; text.len()];
        tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        Ok(buf)
    }

    /// The connection is dead: a read ends (EOF or reset) instead of waiting.
    async fn dead(stream: &mut TcpStream) -> bool {
        let _ = stream.write_all(b"x").await;
        let mut buf = [0u8; 8];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_cuts_and_restores() {
        let proxy = ChaosProxy::start(echo().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"hello").await.unwrap(), b"hello");

        proxy.cut();
        assert_eq!(proxy.mode(), Mode::Cut);
        assert!(dead(&mut a).await, "an open connection is reset by a cut");
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(dead(&mut b).await, "a new connection is reset while cut");

        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"again").await.unwrap(), b"again");

        let stats = proxy.stats();
        assert_eq!(stats.accepted, 3, "{stats:?}");
        assert_eq!(stats.forwarded, 2, "{stats:?}");
        assert_eq!(stats.refused, 1, "{stats:?}");
        assert_eq!(stats.reset, 1, "{stats:?}");
        assert_eq!(stats.faults, 1, "{stats:?}");
    }

    #[tokio::test]
    async fn blackhole_stalls_until_restore_resets() {
        let proxy = ChaosProxy::start(echo().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a, b"hi").await.unwrap(), b"hi");

        proxy.blackhole();
        // Let the connection's task see the change before writing.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = roundtrip(&mut a, b"lost").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        let err = roundtrip(&mut b, b"lost").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

        proxy.restore();
        assert!(
            dead(&mut a).await,
            "a stalled connection is reset on restore"
        );
        assert!(
            dead(&mut b).await,
            "a stalled connection is reset on restore"
        );
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"back").await.unwrap(), b"back");
        assert_eq!(proxy.stats().blackholed, 2, "{:?}", proxy.stats());
    }

    #[tokio::test]
    async fn balances_and_skips_targets_that_are_down() {
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (one, two) = (tagged(b"one").await, tagged(b"two").await);
        let proxy = ChaosProxy::balanced(vec![one, down, two]).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            let mut buf = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            seen.push(buf);
        }
        assert!(seen.contains(b"one") && seen.contains(b"two"), "{seen:?}");
        assert_eq!(proxy.stats().unreachable, 0);

        let lonely = ChaosProxy::start(down).await.unwrap();
        let mut s = TcpStream::connect(lonely.addr()).await.unwrap();
        assert!(dead(&mut s).await);
        assert_eq!(lonely.stats().unreachable, 1);
    }
}
