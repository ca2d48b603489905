//! The WebSocket API, as API Gateway runs it: authorizer and $connect on the
//! upgrade, route selection on `action`, frame and rate limits, idle and
//! lifetime limits, $disconnect; and the connection map that pushes go to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::Config;

/// Frames the writer takes from the outbox for one flush.
const BATCH: usize = 1024;
/// How long a closing connection's writer may take to send what is queued
/// (a last answer, the close frame) before it is stopped.
const LAST_WRITES: Duration = Duration::from_secs(5);
/// tungstenite allocates its 128 KiB default read buffer per socket up front:
/// most of an idle connection's memory. Frames are at most 32 KiB anyway, and
/// a larger one is read in several calls. 10,000 idle connections: 113.6 MB
/// RSS at 2 KiB, 136.4 MB at 4 KiB; the 1:1 closed loop runs the same within
/// its run-to-run spread (17-22k msgs/s at either).
const READ_BUFFER: usize = 2 * 1024;
/// Writes are flushed once per batch (see `write`), so tungstenite need not
/// hold more than a frame before writing through.
const WRITE_BUFFER: usize = 8 * 1024;

/// What a socket task is told to send.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, &'static str),
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Text(text) => text.len(),
            Outbound::Binary(bytes) => bytes.len(),
            Outbound::Close(_, reason) => 2 + reason.len(),
        }
    }
}

/// What a connection's senders and its writer share: the bytes queued and
/// whether the connection has been cut off.
struct Queue {
    id: ConnectionId,
    bytes: AtomicUsize,
    max_bytes: usize,
    cut_off: AtomicBool,
    /// Wakes the socket task when the connection must end at once.
    kill: Notify,
}

impl Queue {
    /// Ends a client that cannot keep up. It loses nothing: what it was not
    /// sent waits in its inbox for `sync`.
    fn cut_off(&self, why: &'static str) {
        if !self.cut_off.swap(true, Ordering::SeqCst) {
            tracing::warn!(connection = %self.id, why, "client cut off");
            self.kill.notify_one();
        }
    }
}

/// A frame's bytes, counted against its connection until the frame is
/// written or dropped, whichever comes first.
struct Held {
    bytes: usize,
    queue: Arc<Queue>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.queue.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A frame in an outbox.
struct Queued {
    frame: Outbound,
    held: Held,
}

/// One live connection, as the management API sees it.
pub struct Connection {
    pub user: String,
    pub device: String,
    /// Unbounded: the queue's byte count is the bound, for pushes and answers alike.
    outbox: mpsc::UnboundedSender<Queued>,
    queue: Arc<Queue>,
    pub connected_at: i64,
    pub last_active_at: AtomicI64,
    pub source_ip: String,
    pub user_agent: String,
}

impl Connection {
    /// Queues a frame for the writer; `false` when the connection is gone or
    /// this frame took it past its byte cap, which cuts it off.
    fn enqueue(&self, frame: Outbound) -> bool {
        if self.queue.cut_off.load(Ordering::SeqCst) {
            return false;
        }
        let bytes = frame.len();
        let queued = self.queue.bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        // From here on, dropping the frame anywhere gives its bytes back.
        let held = Held { bytes, queue: self.queue.clone() };
        if queued > self.queue.max_bytes {
            self.queue.cut_off("queued frames past the byte cap");
            return false;
        }
        self.outbox.send(Queued { frame, held }).is_ok()
    }

    fn is_cut_off(&self) -> bool {
        self.queue.cut_off.load(Ordering::SeqCst)
    }

    /// Bytes of frames queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::SeqCst)
    }
}

/// Every live connection by id: the local stand-in for API Gateway's
/// connection registry, and the `Push` adapter of the local shape.
#[derive(Default)]
pub struct Connections {
    map: Mutex<HashMap<ConnectionId, Arc<Connection>>>,
    writers: AtomicUsize,
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

    /// Queues a frame; `false` when the connection is gone. A client with
    /// too much queued is cut off rather than allowed to hold memory.
    pub fn send(&self, id: &ConnectionId, frame: Outbound) -> bool {
        let Some(connection) = self.get(id) else {
            return false;
        };
        if connection.enqueue(frame) {
            return true;
        }
        if connection.is_cut_off() {
            self.remove_if(id, &connection);
        }
        false
    }

    /// Closes the connection with `code`; `false` when it was already gone.
    pub fn close(&self, id: &ConnectionId, code: u16, reason: &'static str) -> bool {
        let Some(connection) = self.lock().remove(id) else {
            return false;
        };
        // The writer sends the close frame; the reader stops waiting for the client.
        connection.enqueue(Outbound::Close(code, reason));
        connection.queue.kill.notify_one();
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

    /// Socket writer tasks still running. A connection's frames live as long
    /// as its writer, so tests read this to see that one cut off was freed.
    pub fn writers(&self) -> usize {
        self.writers.load(Ordering::SeqCst)
    }
}

/// Counts a writer task in [`Connections::writers`] until it ends, aborted or not.
struct Writing(Arc<Connections>);

impl Writing {
    fn new(connections: Arc<Connections>) -> Self {
        connections.writers.fetch_add(1, Ordering::SeqCst);
        Self(connections)
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::SeqCst);
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
    /// One permit per live WebSocket, held by its socket task.
    live: Arc<Semaphore>,
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
        let live = Arc::new(Semaphore::new(config.max_connections.min(Semaphore::MAX_PERMITS)));
        Self { courier, verifier, connections, live, config, clock: SystemClock }
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
    // Shed load before doing any work for it: past the cap, clients retry later.
    let Ok(live) = gateway.live.clone().try_acquire_owned() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE);
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
    let (outbox, frames) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        id: id.clone(),
        bytes: AtomicUsize::new(0),
        max_bytes: gateway.config.max_queued_bytes,
        cut_off: AtomicBool::new(false),
        kill: Notify::new(),
    });
    let connection = Arc::new(Connection {
        user: user.to_string(),
        device: device.to_string(),
        outbox,
        queue,
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
        .on_upgrade(move |socket| run(gateway, socket, caller, connection, frames, live))
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
    frames: mpsc::UnboundedReceiver<Queued>,
    _live: OwnedSemaphorePermit,
) {
    let (sink, mut stream) = socket.split();
    let writing = Writing::new(gateway.connections.clone());
    let mut writer =
        tokio::spawn(write(sink, frames, connection.queue.clone(), gateway.config.stall_timeout, writing));

    let config = &gateway.config;
    let deadline = tokio::time::Instant::now() + config.max_connection;
    let mut bucket = TokenBucket::new(config.rate_limit);
    let close = |code, reason| {
        connection.enqueue(Outbound::Close(code, reason));
    };
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.idle_timeout, stream.next()) => next,
            () = tokio::time::sleep_until(deadline) => { close(1001, "connection lifetime reached"); break }
            () = connection.queue.kill.notified() => break,
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
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let started = Instant::now();
        // Every frame takes a token, binary ones too: else they would be a
        // free way to keep the server answering.
        let reply = match text {
            text if !bucket.take() => {
                let text = text.as_deref().unwrap_or_default();
                Some(refusal(text, ErrorCode::RateLimited, "rate limit reached: slow down"))
            }
            None => Some(refusal("", ErrorCode::BadRequest, "frames are JSON text, not binary")),
            Some(text) if text.len() > config.max_frame_bytes => {
                let message = format!("a frame is at most {} bytes", config.max_frame_bytes);
                Some(refusal(&text, ErrorCode::LimitExceeded, &message))
            }
            // Boxed: inline, the largest command's state would sit in every
            // idle connection's task for its whole life.
            Some(text) => Box::pin(dispatch(&gateway.courier, &caller, &text)).await,
        };
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "frame handled");
        if let Some(reply) = reply
            && !connection.enqueue(Outbound::Text(reply))
        {
            break;
        }
    }
    // A client cut off loses its queued frames now, not when its socket
    // unblocks: they are what it was cut off for.
    if connection.is_cut_off() {
        writer.abort();
    }
    Box::pin(hang_up(&gateway, &caller.connection, &connection)).await;
    // Let the writer flush what is queued (a close frame, a last answer).
    drop(connection);
    if tokio::time::timeout(LAST_WRITES, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// The writer of one socket. Whatever is queued when it wakes goes out in one
/// flush: under load, one write(2) carries many frames. A write that makes no
/// progress for `stall` cuts the client off.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut frames: mpsc::UnboundedReceiver<Queued>,
    queue: Arc<Queue>,
    stall: Duration,
    _writing: Writing,
) {
    let mut batch = Vec::new();
    'frames: while frames.recv_many(&mut batch, BATCH).await > 0 {
        for Queued { frame, held } in batch.drain(..) {
            let (message, last) = match frame {
                Outbound::Text(text) => (Message::Text(text.into()), false),
                Outbound::Binary(bytes) => (Message::Binary(bytes.into()), false),
                Outbound::Close(code, reason) => {
                    (Message::Close(Some(CloseFrame { code, reason: reason.into() })), true)
                }
            };
            match tokio::time::timeout(stall, sink.feed(message)).await {
                Ok(Ok(())) => drop(held),
                Ok(Err(_)) => return,
                Err(_) => {
                    queue.cut_off("stalled: no write progress");
                    return;
                }
            }
            if last {
                break 'frames;
            }
        }
        match tokio::time::timeout(stall, sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                queue.cut_off("stalled: no write progress");
                return;
            }
        }
    }
    // Flushes what is left, the close frame included.
    let _ = tokio::time::timeout(stall, sink.close()).await;
}
