//! Accepting connections: TLS when configured, and limits that keep a flood
//! of idle or unauthenticated connections from starving real clients.
//!
//! - At most `max` connections are open; past that a new one is closed at once.
//! - A connection is *unproven* until one of its requests carries a valid
//!   token. At most `max_unproven` are open: a new one evicts the oldest
//!   unproven connection (a real client proves itself within milliseconds of
//!   connecting, an idle attacker never does).
//! - A TLS handshake and each request head must arrive within a deadline; an
//!   idle keep-alive connection is closed after the same deadline.
//! - A write that the client does not take for `write_timeout` (a reader
//!   that stopped reading) closes the connection, and what it buffered.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::Body;

/// Connection limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max: usize,
    pub max_unproven: usize,
    /// For a TLS handshake, and for each request head (idle keep-alive too).
    pub head_timeout: Duration,
    /// How long one write may wait for the client to take data.
    pub write_timeout: Duration,
}

impl Limits {
    /// Limits for `max` connections, kept under half of `fd_limit` (the rest
    /// is for files, peers and plugins).
    pub fn new(max: usize, fd_limit: u64, write_timeout: Duration) -> Limits {
        let max = max.min((fd_limit / 2).max(16) as usize);
        Limits { max, max_unproven: (max / 4).max(8), head_timeout: Duration::from_secs(10), write_timeout }
    }
}

/// What the server knows about a request's connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client presented a certificate that chains to the cluster CA.
    pub verified_client: bool,
    id: u64,
    tracker: Arc<Tracker>,
}

impl ConnInfo {
    /// A request on this connection carried a valid token: it is no longer
    /// a candidate for eviction.
    pub fn proven(&self) {
        self.tracker.unproven.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Unproven connections by age, each with what closes it.
    unproven: Mutex<BTreeMap<u64, CancellationToken>>,
}

/// Counts one open connection until dropped.
struct Open(Arc<Tracker>, u64);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.unproven.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

/// Accepts connections until `shutdown`, serving each request with `handle`.
/// Returns the watcher of open connections for a graceful stop.
pub async fn accept<H, F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
    handle: H,
) -> GracefulShutdown
where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let tracker = Arc::new(Tracker::default());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and the like: wait for connections to close.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        if tracker.open.load(Ordering::Relaxed) >= limits.max {
            tracing::debug!(%peer, "connection limit of {} reached; closing", limits.max);
            continue;
        }
        let _ = stream.set_nodelay(true);
        tracker.open.fetch_add(1, Ordering::Relaxed);
        let id = tracker.next_id.fetch_add(1, Ordering::Relaxed);
        let open = Open(tracker.clone(), id);
        let evict = CancellationToken::new();
        {
            let mut unproven = tracker.unproven.lock().unwrap_or_else(|e| e.into_inner());
            unproven.insert(id, evict.clone());
            while unproven.len() > limits.max_unproven {
                let (_, oldest) = unproven.pop_first().expect("not empty");
                oldest.cancel();
            }
        }
        let (acceptor, handle, graceful_watch, tracker) =
            (acceptor.clone(), handle.clone(), graceful.watcher(), tracker.clone());
        tokio::spawn(async move {
            let _open = open;
            let info = |verified_client| Arc::new(ConnInfo { peer, verified_client, id, tracker });
            match acceptor {
                None => {
                    let (info, io) = (info(false), WriteDeadline::new(stream, limits.write_timeout));
                    serve(TokioIo::new(io), info, limits, evict, graceful_watch, handle).await
                }
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(limits.head_timeout, acceptor.accept(stream)) => r,
                        _ = evict.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(tls)) => {
                            let info = info(tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()));
                            let io = WriteDeadline::new(tls, limits.write_timeout);
                            serve(TokioIo::new(io), info, limits, evict, graceful_watch, handle).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    graceful
}

async fn serve<I, H, F>(
    io: TokioIo<I>,
    info: Arc<ConnInfo>,
    limits: Limits,
    evict: CancellationToken,
    graceful: hyper_util::server::graceful::Watcher,
    handle: H,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let peer = info.peer;
    let service = service_fn(move |req| {
        let (handle, info) = (handle.clone(), info.clone());
        async move { Ok::<_, Infallible>(handle(req, info).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(64 << 10)
        .serve_connection(io, service);
    tokio::select! {
        result = graceful.watch(conn) => {
            if let Err(e) = result {
                tracing::debug!(%peer, "connection: {e}");
            }
        }
        _ = evict.cancelled() => tracing::debug!(%peer, "unauthenticated connection evicted"),
    }
}

/// Fails a write (or flush) that has waited `timeout` for the client to take
/// data: hyper then drops the connection.
struct WriteDeadline<I> {
    inner: I,
    timeout: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(inner: I, timeout: Duration) -> Self {
        WriteDeadline { inner, timeout, waiting: None }
    }

    /// After the inner write said `Pending`: the error once the wait is too long.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.timeout;
        let sleep = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, format!("the client took no data for {timeout:?}")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.poll_deadline(cx).map(Err),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.poll_deadline(cx).map(Err),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.poll_deadline(cx).map(Err),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Raises the soft limit of open files to the hard limit; returns the limit
/// in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max.min(1 << 20), rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}
