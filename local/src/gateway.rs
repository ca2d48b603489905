//! The WebSocket API, as API Gateway runs it: authorizer and $connect on the
//! upgrade, route selection on `action`, frame and rate limits, idle and
//! lifetime limits, $disconnect; and the connection map that pushes go to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use courier_core::auth::Verifier;
use courier_core::dispatch::{dispatch, refusal};
use courier_core::domain::Caller;
use courier_core::ids::{ConnectionId, DeviceId};
use courier_core::ports::{Clock, Posted, Push, SystemClock};
use courier_core::protocol::ErrorCode;
use courier_core::ratelimit::TokenBucket;
use courier_core::{Courier, Error, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use crate::Config;

/// Frames waiting for a slow client before it is cut off (it can sync later).
const OUTBOX: usize = 1024;
/// tungstenite allocates its 128 KiB default read buffer per socket up front:
/// most of an idle connection's memory. Frames are at most 32 KiB anyway.
const READ_BUFFER: usize = 4 * 1024;
/// Writes are flushed once per batch (see `run`), so tungstenite need not
/// hold more than a frame before writing through.
const WRITE_BUFFER: usize = 8 * 1024;

/// What a socket task is told to send.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, &'static str),
}

/// One live connection, as the management API sees it.
pub struct Connection {
    pub user: String,
    pub device: String,
    outbox: mpsc::Sender<Outbound>,
    /// Wakes the socket task when the connection must end at once.
    kill: Arc<Notify>,
    pub connected_at: i64,
    pub last_active_at: AtomicI64,
    pub source_ip: String,
    pub user_agent: String,
}

/// Every live connection by id: the local stand-in for API Gateway's
/// connection registry, and the `Push` adapter of the local shape.
#[derive(Default)]
pub struct Connections {
    map: Mutex<HashMap<ConnectionId, Arc<Connection>>>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Arc<Connection>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &ConnectionId) -> Option<Arc<Connection>> {
        self.lock().get(id).cloned()
    }

    fn insert(&self, id: ConnectionId, connection: Arc<Connection>) {
        self.lock().insert(id, connection);
    }

    /// Forgets the connection if `id` still maps to this very one.
    fn remove_if(&self, id: &ConnectionId, connection: &Arc<Connection>) {
        let mut map = self.lock();
        if map.get(id).is_some_and(|c| Arc::ptr_eq(c, connection)) {
            map.remove(id);
        }
    }

    /// Queues a frame; `false` when the connection is gone. A client whose
    /// outbox is full is cut off rather than allowed to hold memory.
    pub fn send(&self, id: &ConnectionId, frame: Outbound) -> bool {
        let Some(connection) = self.get(id) else {
            return false;
        };
        match connection.outbox.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%id, "client too slow; closing its connection");
                self.lock().remove(id);
                connection.kill.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the connection with `code`; `false` when it was already gone.
    pub fn close(&self, id: &ConnectionId, code: u16, reason: &'static str) -> bool {
        let Some(connection) = self.lock().remove(id) else {
            return false;
        };
        // The writer sends the close frame; the reader stops waiting for the client.
        let _ = connection.outbox.try_send(Outbound::Close(code, reason));
        connection.kill.notify_one();
        true
    }

    pub fn close_all(&self, code: u16, reason: &'static str) {
        let ids: Vec<ConnectionId> = self.lock().keys().cloned().collect();
        for id in ids {
            self.close(&id, code, reason);
        }
    }

    /// The live connection of one device, if any.
    pub fn of_device(&self, user: &str, device: &str) -> Option<ConnectionId> {
        self.lock().iter().find(|(_, c)| c.user == user && c.device == device).map(|(id, _)| id.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Push for Connections {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> Result<Posted> {
        Ok(if self.send(connection, Outbound::Text(frame.to_owned())) { Posted::Sent } else { Posted::Gone })
    }

    async fn close(&self, connection: &ConnectionId) -> Result<()> {
        Connections::close(self, connection, 1000, "closed by the server");
        Ok(())
    }
}

/// What the socket tasks share.
pub struct Gateway {
    courier: Arc<Courier>,
    verifier: Verifier,
    connections: Arc<Connections>,
    config: Config,
    clock: SystemClock,
}

impl Gateway {
    pub fn new(
        courier: Arc<Courier>,
        verifier: Verifier,
        connections: Arc<Connections>,
        config: Config,
    ) -> Self {
        Self { courier, verifier, connections, config, clock: SystemClock }
    }
}

/// An id shaped like API Gateway's: 16 characters of base64 ending in `=`.
fn new_connection_id() -> ConnectionId {
    let bytes: [u8; 11] = rand::random();
    let id = base64::engine::general_purpose::URL_SAFE.encode(bytes);
    ConnectionId::try_from(id).expect("base64 is printable")
}

/// `GET /`: the $connect route. Refusals are plain HTTP answers; nothing is upgraded.
pub async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "courier-local speaks WebSocket here: ws://HOST/?token=JWT&deviceId=DEVICE\n",
        )
            .into_response();
    };

    // The authorizer's part: a valid token names the user (401 otherwise).
    let token = query.get("token").map(String::as_str).unwrap_or_default();
    let user = match gateway.verifier.verify(token) {
        Ok(user) => user,
        Err(e) => {
            tracing::debug!(reason = %e, "connection refused");
            return refuse(StatusCode::UNAUTHORIZED);
        }
    };
    // $connect's part: a well-formed deviceId (400), a free device slot (403).
    let Ok(device) = DeviceId::try_from(query.get("deviceId").map(String::as_str).unwrap_or_default()) else {
        return refuse(StatusCode::BAD_REQUEST);
    };

    let id = new_connection_id();
    let now = gateway.clock.now();
    let (outbox, inbox) = mpsc::channel(OUTBOX);
    let connection = Arc::new(Connection {
        user: user.to_string(),
        device: device.to_string(),
        outbox,
        kill: Arc::new(Notify::new()),
        connected_at: now,
        last_active_at: AtomicI64::new(now),
        source_ip: peer.ip().to_string(),
        user_agent: headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned(),
    });
    // Registered before $connect runs so that no push in between is lost;
    // until the upgrade completes, frames wait in the outbox.
    gateway.connections.insert(id.clone(), connection.clone());
    if let Err(e) = gateway.courier.connect(&user, &device, &id).await {
        gateway.connections.remove_if(&id, &connection);
        return refuse(match e {
            Error::LimitExceeded(_) => StatusCode::FORBIDDEN,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            e => {
                tracing::error!(error = %e, "connect failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        });
    }
    // From here on the connection speaks as this caller, fixed at $connect.
    let caller = Caller { user, device, connection: id };

    let limit = gateway.config.hard_frame_bytes;
    // Weak: axum keeps this callback until the socket ends, and a strong
    // handle would keep the outbox open so the writer never finished.
    let failed = (gateway.clone(), caller.connection.clone(), Arc::downgrade(&connection));
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_failed_upgrade(move |_| {
            let (gateway, id, connection) = failed;
            if let Some(connection) = connection.upgrade() {
                tokio::spawn(async move { hang_up(&gateway, &id, &connection).await });
            }
        })
        .on_upgrade(move |socket| run(gateway, socket, caller, connection, inbox))
}

/// A refused upgrade, with API Gateway's body.
fn refuse(status: StatusCode) -> Response {
    (status, axum::Json(serde_json::json!({ "message": status.canonical_reason() }))).into_response()
}

/// Ends a connection: forget it, then run $disconnect.
async fn hang_up(gateway: &Gateway, id: &ConnectionId, connection: &Arc<Connection>) {
    gateway.connections.remove_if(id, connection);
    if let Err(e) = gateway.courier.disconnect(id).await {
        tracing::error!(error = %e, "disconnect failed");
    }
}

/// One socket's life: frames in go to their route's handler; answers and
/// pushes go out through the outbox, in the order they were queued.
async fn run(
    gateway: Arc<Gateway>,
    socket: WebSocket,
    caller: Caller,
    connection: Arc<Connection>,
    mut outbox: mpsc::Receiver<Outbound>,
) {
    let (mut sink, mut stream) = socket.split();
    // Whatever is queued when the writer wakes goes out in one flush: under
    // load, one write(2) carries many frames.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        'frames: while outbox.recv_many(&mut batch, OUTBOX).await > 0 {
            for frame in batch.drain(..) {
                let (message, last) = match frame {
                    Outbound::Text(text) => (Message::Text(text.into()), false),
                    Outbound::Binary(bytes) => (Message::Binary(bytes.into()), false),
                    Outbound::Close(code, reason) => {
                        (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true)
                    }
                };
                if sink.feed(message).await.is_err() {
                    break 'frames;
                }
                if last {
                    let _ = sink.flush().await;
                    break 'frames;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let config = &gateway.config;
    let deadline = tokio::time::Instant::now() + config.max_connection;
    let mut bucket = TokenBucket::new(config.rate_limit);
    let close = |code, reason| {
        let _ = connection.outbox.try_send(Outbound::Close(code, reason));
    };
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.idle_timeout, stream.next()) => next,
            () = tokio::time::sleep_until(deadline) => { close(1001, "connection lifetime reached"); break }
            () = connection.kill.notified() => break,
        };
        let frame = match next {
            Err(_) => {
                close(1001, "idle timeout");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let inner = e.into_inner();
                if matches!(inner.downcast_ref::<tungstenite::Error>(), Some(tungstenite::Error::Capacity(_)))
                {
                    close(1009, "frame too large");
                }
                break;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        connection.last_active_at.store(gateway.clock.now(), Ordering::Relaxed);
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(_) => {
                let refused = refusal("", ErrorCode::BadRequest, "frames are JSON text, not binary");
                let _ = connection.outbox.try_send(Outbound::Text(refused));
                continue;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let started = Instant::now();
        let reply = if !bucket.take() {
            Some(refusal(&text, ErrorCode::RateLimited, "rate limit reached: slow down"))
        } else if text.len() > config.max_frame_bytes {
            let message = format!("a frame is at most {} bytes", config.max_frame_bytes);
            Some(refusal(&text, ErrorCode::LimitExceeded, &message))
        } else {
            // Boxed: inline, the largest command's state would sit in every
            // idle connection's task for its whole life.
            Box::pin(dispatch(&gateway.courier, &caller, &text)).await
        };
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "frame handled");
        if let Some(reply) = reply
            && connection.outbox.try_send(Outbound::Text(reply)).is_err()
        {
            break;
        }
    }
    Box::pin(hang_up(&gateway, &caller.connection, &connection)).await;
    // Let the writer flush what is queued (a close frame, a last answer).
    drop(connection);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}
