//! The HTTP listener: the hyper accept loop with header, idle and
//! shutdown limits, a share of request slots per HTTP/2 connection and per
//! client address.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// The address a request's connection comes from (set per connection by
/// [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// Requests in progress per client address, capped.
#[derive(Debug, Default)]
pub struct ClientSlots {
    max: usize,
    used: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One request's slot of its client; given back on drop.
#[derive(Debug)]
pub struct ClientSlot<'a> {
    slots: &'a ClientSlots,
    /// `None` when there is no limit (nothing to give back).
    addr: Option<std::net::IpAddr>,
}

impl ClientSlots {
    /// At most `max` requests per address (0: no limit).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: Default::default(),
        }
    }

    /// A slot for `addr`, unless it holds `max` already (`None`).
    pub fn take(&self, addr: std::net::IpAddr) -> Option<ClientSlot<'_>> {
        if self.max == 0 {
            return Some(ClientSlot {
                slots: self,
                addr: None,
            });
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let n = used.entry(addr).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self,
            addr: Some(addr),
        })
    }

    /// Addresses holding slots now.
    pub fn clients(&self) -> usize {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let Some(addr) = self.addr else { return };
        let mut used = self.slots.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = used.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                used.remove(&addr);
            }
        }
    }
}

/// Connection-level limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time allowed to send the request head.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// A connection that sends nothing for this long is closed (after any
    /// request in progress is answered).
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(25),
            max_streams_per_connection: 64,
        }
    }
}

/// A TCP stream that remembers when it last received bytes.
struct Tracked {
    inner: tokio::net::TcpStream,
    epoch: Instant,
    last_read_ms: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_read_ms.store(now, AtomicOrdering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections the kernel may queue for `accept` (capped by
/// `net.core.somaxconn`, 4096 on current kernels). `TcpListener::bind`
/// asks for 128: a burst of new connections (providers open many at once
/// after a stall) overflowed that queue, the kernel dropped the SYNs and
/// those clients waited a whole SYN retransmit (1 s) before being served
/// (docs/benchmarks/gateway-profile.md, sixth session). Go's net package and
/// nginx ask for the system's limit too.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] (address reuse on, as
/// `TcpListener::bind` sets it).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serve `router` on `listener` until `shutdown` resolves, then stop
/// accepting and wait (up to the grace period) for in-flight requests, and so
/// their publishes, to finish. Idle connections are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(opts.max_streams_per_connection.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let epoch = Instant::now();
        let last_read_ms = Arc::new(AtomicU64::new(0));
        let io = Tracked {
            inner: stream,
            epoch,
            last_read_ms: last_read_ms.clone(),
        };
        // The client's address on each request. A wrapper, not
        // `Router::layer`, which rebuilds the router for every connection
        // (what a burst of new connections pays for most).
        let client = ClientAddr(peer.ip());
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(client);
                req
            },
        ));
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let mut stop = stop_rx.clone();
        let idle = opts.idle_timeout;
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            let check = (idle / 2).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    _ = stop.wait_for(|v| *v), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    () = tokio::time::sleep(check), if !closing => {
                        let last = Duration::from_millis(last_read_ms.load(AtomicOrdering::Relaxed));
                        if epoch.elapsed().saturating_sub(last) >= idle {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(opts.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("grace period over with requests still in flight");
        conns.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 500 clients connect at once to a listener that accepts none of
    /// them yet: every connect completes at once (the kernel queues them),
    /// where `TcpListener::bind`'s queue of 128 drops the rest's SYNs and
    /// they wait a second for the retransmit.
    #[tokio::test]
    async fn a_burst_of_new_connections_is_queued_not_dropped() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < 1024 {
            eprintln!(
                "net.core.somaxconn is {somaxconn}: the kernel caps the queue, nothing to check"
            );
            return;
        }
        let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("address");
        let connects = (0..500).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures::future::join_all(connects).await;
        let queued = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(queued, 500, "connections queued within 800 ms");
        drop(listener);
    }

    #[test]
    fn each_client_address_gets_its_share() {
        let slots = ClientSlots::new(2);
        let a = std::net::Ipv4Addr::new(10, 0, 0, 1).into();
        let b = std::net::Ipv4Addr::new(10, 0, 0, 2).into();
        let a1 = slots.take(a).expect("first");
        let a2 = slots.take(a).expect("second");
        assert!(slots.take(a).is_none(), "a third is refused");
        let _b1 = slots.take(b).expect("another address is not affected");
        drop(a1);
        let _a3 = slots.take(a).expect("a slot given back is free again");
        drop(a2);
        assert_eq!(slots.clients(), 2);
        let none = ClientSlots::new(0);
        let held: Vec<_> = (0..1000).map(|_| none.take(a)).collect();
        assert!(held.iter().all(Option::is_some), "0: no limit");
        assert_eq!(none.clients(), 0);
    }
}
