//! The accept loop: hyper on each socket, with a header deadline and a cap on sockets not yet upgraded.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

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
        tokio::spawn(connection(socket, peer, app.clone(), http.clone(), permit, stopping.clone()));
    }

    stop.send_replace(true);
    drop(stopping);
    stop.closed().await;
    Ok(())
}

/// One socket's HTTP phase: it ends when the socket closes, when its headers
/// are late, or when it is upgraded (the WebSocket then runs on its own).
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    app: Router,
    http: Arc<http1::Builder>,
    _pending: OwnedSemaphorePermit,
    mut stopping: watch::Receiver<bool>,
) {
    let app = TowerToHyperService::new(app);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.call(request)
    });
    let mut served = std::pin::pin!(http.serve_connection(TokioIo::new(socket), service).with_upgrades());
    let result = tokio::select! {
        result = served.as_mut() => result,
        _ = stopping.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended");
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
