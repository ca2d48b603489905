//! The accept loop: hyper on each socket, with a header deadline, an idle
//! deadline and a cap on sockets not yet upgraded.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::Config;

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in flight finish. Upgraded sockets are no longer counted here:
/// the gateway caps and closes those.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Without a timer hyper has no header deadline, and half-sent requests
    // used to hold their sockets until file descriptors ran out.
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.header_read_timeout);
    let http = Arc::new(http);
    let pending = Arc::new(Semaphore::new(config.max_pending_connections.min(Semaphore::MAX_PERMITS)));
    // Each connection task holds a receiver: `closed()` below waits for them all.
    let (stop, stopping) = watch::channel(false);

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Closed at once rather than queued: a flood of slow sockets must not
        // keep a real client waiting behind it for a slot.
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many connections not yet upgraded; closing a new one");
            continue;
        };
        // Frames are small and latency-bound: no Nagle delay on any socket.
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let idle = config.stall_timeout;
        tokio::spawn(connection(socket, peer, app.clone(), http.clone(), idle, permit, stopping.clone()));
    }

    stop.send_replace(true);
    drop(stopping);
    stop.closed().await;
    Ok(())
}

/// One socket's HTTP phase: it ends when the socket closes, when its headers
/// are late, when no byte has moved either way for `idle`, or when it is
/// upgraded (the WebSocket then runs on its own, with its own deadlines).
///
/// The idle deadline is what frees a request whose body never comes or a
/// response that is never read (a blob transfer, say): hyper has no
/// deadline past the headers, and each such socket holds a pending permit.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    app: Router,
    http: Arc<http1::Builder>,
    idle: Duration,
    _pending: OwnedSemaphorePermit,
    mut stopping: watch::Receiver<bool>,
) {
    let app = TowerToHyperService::new(app);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.call(request)
    });
    let socket = Watched::new(socket);
    let moved = socket.moved.clone();
    let mut served = std::pin::pin!(http.serve_connection(TokioIo::new(socket), service).with_upgrades());
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = moved.idle_for(idle) => {
            tracing::debug!(%peer, "nothing moved in the HTTP phase; dropping the socket");
            return;
        }
        _ = stopping.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

/// When a socket last moved a byte, in milliseconds since it was accepted.
struct Moved {
    since: Instant,
    at_ms: AtomicU64,
}

impl Moved {
    fn stamp(&self) {
        self.at_ms.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.since + Duration::from_millis(self.at_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A socket that notes each read or write that moves bytes.
struct Watched {
    socket: TcpStream,
    moved: Arc<Moved>,
}

impl Watched {
    fn new(socket: TcpStream) -> Self {
        Self { socket, moved: Arc::new(Moved { since: Instant::now(), at_ms: AtomicU64::new(0) }) }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.socket).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.stamp();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write(cx, buf);
        if let Poll::Ready(Ok(1..)) = polled {
            self.moved.stamp();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(1..)) = polled {
            self.moved.stamp();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// Waits out a failed accept. Out of file descriptors, accepting again at
/// once would spin; an error of that one socket needs no pause.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Raises the soft limit on open files to the hard limit: every socket is
/// one, and services are often started with a soft limit of 1024.
pub fn raise_fd_limit(config: &Config) {
    let sockets = config.max_connections.saturating_add(config.max_pending_connections) as u64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < sockets => tracing::warn!(
            limit,
            sockets,
            "open file limit below the connection caps: raise the hard limit (ulimit -Hn) or lower the caps"
        ),
        Ok(limit) => tracing::info!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "open file limit not raised"),
    }
}
