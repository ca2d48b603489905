//! The WebSocket API, as API Gateway runs it: authorizer and $connect on the
//! upgrade, route selection on `action`, frame and rate limits, idle and
//! lifetime limits, $disconnect; and the connection map that pushes go to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use courier_shared::auth::Verifier;
use courier_shared::handlers::{self, WsResponse};
use courier_shared::ids::ConnectionId;
use courier_shared::ports::{Clock, Posted, Push, SystemClock};
use courier_shared::protocol::ErrorCode;
use courier_shared::ratelimit::TokenBucket;
use courier_shared::{Courier, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
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

    let mut request = ApiGatewayCustomAuthorizerRequestTypeRequest::default();
    request.type_ = Some("REQUEST".to_owned());
    request.method_arn = Some("arn:aws:execute-api:local:000000000000:courier/local/$connect".to_owned());
    request.query_string_parameters = query.clone().into();
    let authorized = match handlers::authorizer(&gateway.verifier, &request) {
        Ok(authorized) => authorized,
        Err(e) => {
            tracing::debug!(reason = %e, "connection refused");
            return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({ "message": "Unauthorized" })))
                .into_response();
        }
    };
    let context: HashMap<String, Value> = handlers::authorizer_context(&authorized);

    let id = new_connection_id();
    let now = gateway.clock.now();
    let (outbox, inbox) = mpsc::channel(OUTBOX);
    let field = |name: &str| context.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let connection = Arc::new(Connection {
        user: field(handlers::AUTHORIZER_USER),
        device: field(handlers::AUTHORIZER_DEVICE),
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

    let event = handlers::ws_event(handlers::CONNECT, &id, &context, None, now);
    let answer = handlers::connect(&gateway.courier, event).await;
    if answer.status_code != 200 {
        gateway.connections.remove_if(&id, &connection);
        let status =
            StatusCode::from_u16(answer.status_code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, axum::Json(serde_json::json!({ "message": status.canonical_reason() })))
            .into_response();
    }

    let limit = gateway.config.hard_frame_bytes;
    // Weak: axum keeps this callback until the socket ends, and a strong
    // handle would keep the outbox open so the writer never finished.
    let failed = (gateway.clone(), id.clone(), Arc::downgrade(&connection), context.clone());
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_failed_upgrade(move |_| {
            let (gateway, id, connection, context) = failed;
            if let Some(connection) = connection.upgrade() {
                tokio::spawn(async move { hang_up(&gateway, &id, &connection, &context).await });
            }
        })
        .on_upgrade(move |socket| run(gateway, socket, id, connection, inbox, context))
}

/// Ends a connection: forget it, then run $disconnect.
async fn hang_up(
    gateway: &Gateway,
    id: &ConnectionId,
    connection: &Arc<Connection>,
    context: &HashMap<String, Value>,
) {
    gateway.connections.remove_if(id, connection);
    let event = handlers::ws_event(handlers::DISCONNECT, id, context, None, gateway.clock.now());
    handlers::disconnect(&gateway.courier, event).await;
}

/// One socket's life: frames in go to their route's handler; answers and
/// pushes go out through the outbox, in the order they were queued.
async fn run(
    gateway: Arc<Gateway>,
    socket: WebSocket,
    id: ConnectionId,
    connection: Arc<Connection>,
    mut outbox: mpsc::Receiver<Outbound>,
    context: HashMap<String, Value>,
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
                let refusal =
                    handlers::refusal("", ErrorCode::BadRequest, "frames are JSON text, not binary");
                let _ = connection.outbox.try_send(Outbound::Text(refusal));
                continue;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let started = Instant::now();
        let reply = if !bucket.take() {
            Some(handlers::refusal(&text, ErrorCode::RateLimited, "rate limit reached: slow down"))
        } else if text.len() > config.max_frame_bytes {
            let message = format!("a frame is at most {} bytes", config.max_frame_bytes);
            Some(handlers::refusal(&text, ErrorCode::LimitExceeded, &message))
        } else {
            let route = handlers::select_route(&text);
            let event = handlers::ws_event(route, &id, &context, Some(text.to_string()), gateway.clock.now());
            // Boxed: inline, the largest handler's state would sit in every
            // idle connection's task for its whole life.
            body(Box::pin(handlers::route(&gateway.courier, event)).await)
        };
        tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "frame handled");
        if let Some(reply) = reply
            && connection.outbox.try_send(Outbound::Text(reply)).is_err()
        {
            break;
        }
    }
    Box::pin(hang_up(&gateway, &id, &connection, &context)).await;
    // Let the writer flush what is queued (a close frame, a last answer).
    drop(connection);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

fn body(response: WsResponse) -> Option<String> {
    match response.body? {
        aws_lambda_events::encodings::Body::Text(text) => Some(text),
        aws_lambda_events::encodings::Body::Binary(bytes) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}
