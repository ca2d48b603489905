//! courier-relay: the bench's ceiling, a bare WebSocket relay on Courier's stack with no storage and no auth.
//!
//! Protocol: connect to `ws://ADDR/?id=X`; send `{"to":"Y","body":"..."}` (or
//! `"to":["Y","Z",...]` to fan out) and the relay pushes `body` as a text frame
//! to each named connection that is open. Nothing is answered, stored or
//! retried: a frame to an unknown id is dropped.
//!
//! It is built the way courier-local's gateway is (axum 0.8 WebSocket, one
//! reader loop and one writer task per socket, a bounded outbox, a mutexed
//! map of connections, default socket options) so that the gap between the
//! two is what Courier does on top: auth, JSON envelopes, storage, fan-out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

// The allocator courier-local runs on: the same stack, allocator included.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The same outbox bound as courier-local: a slow client is cut off, not buffered.
const OUTBOX: usize = 1024;

#[derive(Parser)]
#[command(about = "A bare WebSocket relay: no storage, no auth (the ceiling courier-bench compares against)")]
struct Cli {
    #[arg(long, env = "RELAY_ADDR", default_value = "127.0.0.1:3002")]
    addr: SocketAddr,
    /// WebSocket read buffer per connection, in bytes (default: axum's,
    /// 128 KiB, as courier-local uses). tungstenite zero-fills it on the first
    /// read, so it is resident memory for every open connection.
    #[arg(long, env = "RELAY_READ_BUFFER")]
    read_buffer: Option<usize>,
}

#[derive(Clone)]
struct Relay {
    peers: Peers,
    read_buffer: Option<usize>,
}

type Peers = Arc<Mutex<HashMap<String, mpsc::Sender<String>>>>;

#[derive(Deserialize)]
struct Frame {
    to: To,
    body: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum To {
    One(String),
    Many(Vec<String>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let relay = Relay { peers: Arc::default(), read_buffer: cli.read_buffer };
    let app = Router::new().route("/", get(upgrade)).with_state(relay);
    let listener = tokio::net::TcpListener::bind(cli.addr).await?;
    eprintln!("courier-relay listening on {}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(terminated()).await?;
    Ok(())
}

async fn upgrade(
    State(relay): State<Relay>,
    Query(query): Query<HashMap<String, String>>,
    mut ws: WebSocketUpgrade,
) -> Response {
    let id = query.get("id").cloned().unwrap_or_default();
    if let Some(size) = relay.read_buffer {
        ws = ws.read_buffer_size(size);
    }
    ws.on_upgrade(move |socket| run(relay.peers, socket, id))
}

async fn run(peers: Peers, socket: WebSocket, id: String) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut queued) = mpsc::channel::<String>(OUTBOX);
    peers.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), outbox.clone());
    let writer = tokio::spawn(async move {
        while let Some(text) = queued.recv().await {
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else { continue };
        let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else { continue };
        let targets = match frame.to {
            To::One(one) => vec![one],
            To::Many(many) => many,
        };
        // Look every peer up under one lock, then push outside it.
        let outboxes: Vec<_> = {
            let map = peers.lock().unwrap_or_else(|e| e.into_inner());
            targets.iter().filter_map(|t| map.get(t).cloned()).collect()
        };
        for peer in outboxes {
            let _ = peer.try_send(frame.body.clone());
        }
    }
    {
        let mut map = peers.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&id).is_some_and(|o| o.same_channel(&outbox)) {
            map.remove(&id);
        }
    }
    drop(outbox);
    writer.abort();
}

/// Resolves on SIGTERM or Ctrl-C, so the bench can stop it cleanly.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
