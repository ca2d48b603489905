//! Hardening: sockets that never finish their request, clients that never
//! read, binary frames against the rate limit, and the dev secret off loopback.

use std::sync::Arc;
use std::time::Duration;

use courier_core::auth::mint;
use courier_core::ids::ConnectionId;
use courier_core::ratelimit::RateLimit;
use courier_local::Config;
use courier_local::gateway::{Connection, Outbound};
use courier_tests::client::{Client, ConnectError};
use courier_tests::{Server, WAIT};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// The start of an upgrade request whose headers never end.
const HALF_A_REQUEST: &[u8] = b"GET /?token=t&deviceId=d HTTP/1.1\r\nHost: courier\r\nUpgrade: websocket\r\n";
/// Under 16 KiB, so that six fill most of a 100 KiB sync page.
const BIG: usize = 15_000;

fn addr(server: &Server) -> &str {
    server.http.trim_start_matches("http://")
}

/// Whether the server closes `socket` within `wait` (anything it sends first is skipped).
async fn dropped_within(socket: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = vec![0; 64 * 1024];
    tokio::time::timeout(wait, async { while let Ok(1..) = socket.read(&mut buf).await {} }).await.is_ok()
}

/// Waits up to `wait` for `done` to hold, or fails the test naming `what`.
async fn eventually(wait: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !done() {
        assert!(Instant::now() < deadline, "not within {wait:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket client on a bare socket, for what the test kit's client never
/// does: send binary frames, and stop reading. Its receive buffer is small,
/// so that when it stops reading the server's writes back up at once.
struct Raw {
    stream: TcpStream,
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;

impl Raw {
    async fn connect(server: &Server, user: &str, device: &str) -> Raw {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr(server).parse().expect("addr")).await.expect("connect");
        let request = format!(
            "GET /?token={}&deviceId={device} HTTP/1.1\r\nHost: courier\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.token(user)
        );
        stream.write_all(request.as_bytes()).await.expect("upgrade request");
        // Byte by byte: the first frames may follow the head in the same segment.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("upgrade response"));
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        Raw { stream }
    }

    /// Sends one masked frame, as clients must.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        frame.extend(mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        self.stream.write_all(&frame).await
    }

    /// The next text frame from the server, as JSON.
    async fn next(&mut self) -> Value {
        let read = async {
            loop {
                let head = self.stream.read_u16().await?;
                let len = match head & 0x7f {
                    126 => u64::from(self.stream.read_u16().await?),
                    127 => self.stream.read_u64().await?,
                    n => u64::from(n),
                };
                let mut payload = vec![0; len as usize];
                self.stream.read_exact(&mut payload).await?;
                if (head >> 8) & 0x0f == u16::from(TEXT) {
                    return std::io::Result::Ok(payload);
                }
            }
        };
        let payload = tokio::time::timeout(WAIT, read).await.expect("a frame in time").expect("a frame");
        serde_json::from_slice(&payload).expect("JSON")
    }
}

/// The server's record of (user, device)'s connection.
fn connection(server: &Server, user: &str, device: &str) -> (ConnectionId, Arc<Connection>) {
    let id = server.connection_id(user, device).expect("connected");
    let id = ConnectionId::try_from(id).expect("id");
    let connection = server.connections().get(&id).expect("live");
    (id, connection)
}

/// Asserts that the server forgot `id` and freed what it held for it: the
/// queued frames, and the writer task that owned them and the socket. At
/// once: a writer blocked on the socket is stopped, not waited for.
async fn freed(server: &Server, id: &ConnectionId, connection: &Connection, writers_left: usize) {
    let at_once = Duration::from_secs(2);
    eventually(WAIT, "the connection leaves the map", || server.connections().get(id).is_none()).await;
    eventually(at_once, "its writer task ends", || server.connections().writers() == writers_left).await;
    assert_eq!(connection.queued_bytes(), 0, "its queued frames are dropped");
}

#[tokio::test]
async fn a_request_whose_headers_never_end_is_dropped_after_the_header_timeout() {
    let server = Server::start_with(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    let mut half = TcpStream::connect(addr(&server)).await.unwrap();
    half.write_all(HALF_A_REQUEST).await.unwrap();
    let mut silent = TcpStream::connect(addr(&server)).await.unwrap();
    let started = Instant::now();

    assert!(dropped_within(&mut half, WAIT).await, "half a request holds its socket");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800), "dropped before the timeout: {waited:?}");
    assert!(dropped_within(&mut silent, WAIT).await, "a socket that says nothing holds it");
    // The server still serves.
    server.connect("alice", "phone").await.list_chats().await.expect("served");
}

#[tokio::test]
async fn past_the_pending_cap_a_new_socket_is_closed_until_the_half_open_ones_go() {
    let server = Server::start_with(|c| {
        c.max_pending_connections = 4;
        c.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    let mut half_open = Vec::new();
    for _ in 0..4 {
        let mut socket = TcpStream::connect(addr(&server)).await.unwrap();
        socket.write_all(HALF_A_REQUEST).await.unwrap();
        half_open.push(socket);
    }
    // Let the server accept them before the next one comes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut fifth = TcpStream::connect(addr(&server)).await.unwrap();
    let started = Instant::now();
    assert!(dropped_within(&mut fifth, Duration::from_secs(1)).await, "the fifth socket is kept");
    assert!(started.elapsed() < Duration::from_millis(500), "closed at once, not on its own timeout");
    assert!(server.try_connect("alice", "phone").await.is_err(), "no room for a client either");

    for socket in &mut half_open {
        assert!(dropped_within(socket, WAIT).await, "a half-open socket outlived its timeout");
    }
    // Upgraded sockets leave the HTTP phase: more clients than the cap connect.
    let mut clients = Vec::new();
    for device in ["a", "b", "c"] {
        for user in ["alice", "bob"] {
            clients.push(server.connect(user, device).await);
        }
    }
    for client in &clients {
        client.list_chats().await.expect("served");
    }
}

#[tokio::test]
async fn past_max_connections_an_upgrade_gets_503_until_one_closes() {
    let server = Server::start_with(|c| c.max_connections = 2).await;
    let alice = server.connect("alice", "phone").await;
    let _bob = server.connect("bob", "phone").await;
    let refused = server.try_connect("carol", "phone").await.err();
    assert!(matches!(refused, Some(ConnectError::Refused(503))), "{refused:?}");

    alice.close();
    let deadline = Instant::now() + WAIT;
    let carol = loop {
        match server.try_connect("carol", "phone").await {
            Ok(carol) => break carol,
            Err(ConnectError::Refused(503)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("carol still refused once alice left: {e}"),
        }
    };
    carol.list_chats().await.expect("served");
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_off_past_the_byte_cap_and_freed() {
    // Only the byte cap (1 MiB by default) may cut it off here.
    let server = Server::start_with(|c| {
        c.rate_limit = RateLimit { capacity: 1000.0, per_second: 0.0 };
        c.stall_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut alice = Raw::connect(&server, "alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();
    for _ in 0..6 {
        bob.send_message(&chat, &"m".repeat(BIG)).await.unwrap();
    }
    let (id, connection) = connection(&server, "alice", "phone");
    assert_eq!(server.connections().writers(), 2);

    // Each answer is a ~90 KB page. The kernel's socket buffers take some
    // megabytes before the server's queue grows at all: keep asking.
    let sync = json!({ "action": "sync", "limit": 100 }).to_string();
    let mut asked = 0;
    while server.connections().get(&id).is_some() {
        assert!(asked < 1000, "still connected after {asked} syncs");
        for _ in 0..10 {
            let _ = alice.send(TEXT, sync.as_bytes()).await;
        }
        asked += 10;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    freed(&server, &id, &connection, 1).await;
    assert!(dropped_within(&mut alice.stream, WAIT).await, "its socket is closed");

    // Nothing is lost: the device syncs it all on its next connection.
    let alice = server.connect("alice", "phone").await;
    assert_eq!(alice.sync_all().await.unwrap().len(), 6);
}

#[tokio::test]
async fn pushes_past_the_byte_cap_cut_off_a_client_that_never_reads() {
    let server = Server::start_with(|c| {
        c.rate_limit = RateLimit { capacity: 10_000.0, per_second: 0.0 };
        c.stall_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut alice = Raw::connect(&server, "alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();
    let (id, connection) = connection(&server, "alice", "phone");

    // 15 KB pushes, until the socket buffers and then the 1 MiB cap are full.
    let mut sent = 0;
    while server.connections().get(&id).is_some() {
        assert!(sent < 2000, "still connected after {sent} pushes");
        bob.send_message(&chat, &"m".repeat(BIG)).await.expect("a send never waits on a slow recipient");
        sent += 1;
    }
    freed(&server, &id, &connection, 1).await;
    assert!(dropped_within(&mut alice.stream, WAIT).await, "its socket is closed");

    let alice = server.connect("alice", "phone").await;
    assert_eq!(alice.sync_all().await.unwrap().len(), sent, "every message waits for sync");
}

#[tokio::test]
async fn a_client_whose_writer_stalls_is_cut_off_after_the_stall_timeout() {
    // A byte cap no test reaches: only the stall deadline can cut it off.
    let stall = Duration::from_millis(500);
    let server = Server::start_with(|c| {
        c.max_queued_bytes = 1 << 30;
        c.stall_timeout = stall;
    })
    .await;
    let mut alice = Raw::connect(&server, "alice", "phone").await;
    let (id, connection) = connection(&server, "alice", "phone");

    // 100 KB pushes until some stay queued: the socket buffers are full and
    // the writer is blocked.
    let started = Instant::now();
    let mut pushed = 0;
    while connection.queued_bytes() < 1_000_000 {
        assert!(pushed < 1000, "the writer still writes after {pushed} pushes");
        for _ in 0..10 {
            server.connections().send(&id, Outbound::Text("p".repeat(100_000)));
        }
        pushed += 10;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    freed(&server, &id, &connection, 0).await;
    let waited = started.elapsed();
    assert!(waited >= stall, "cut off before the writer stalled for {stall:?}: {waited:?}");
    assert!(dropped_within(&mut alice.stream, WAIT).await, "its socket is closed");
}

#[tokio::test]
async fn binary_frames_take_a_token_like_text_frames() {
    // A bucket of 3 that never refills makes the count exact.
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 3.0, per_second: 0.0 }).await;
    let mut alice = Raw::connect(&server, "alice", "phone").await;
    let list = json!({ "action": "listChats", "requestId": "r" }).to_string();
    for _ in 0..5 {
        alice.send(BINARY, list.as_bytes()).await.unwrap();
    }
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(alice.next().await["error"]["code"].clone());
    }
    assert_eq!(codes, ["BAD_REQUEST", "BAD_REQUEST", "BAD_REQUEST", "RATE_LIMITED", "RATE_LIMITED"]);
    // They drained the bucket text frames take from.
    alice.send(TEXT, list.as_bytes()).await.unwrap();
    let answer = alice.next().await;
    assert_eq!(answer["error"]["code"], "RATE_LIMITED", "{answer}");
    assert_eq!(answer["requestId"], "r", "{answer}");
}

#[tokio::test]
async fn the_public_default_secrets_are_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let anywhere = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let config = Config { data_dir: data_dir.clone(), ..Config::default() };
    let served = courier_local::serve(config, anywhere, std::future::pending());
    let refused =
        tokio::time::timeout(WAIT, served).await.expect("refused, not served").expect_err("refused");
    let message = refused.to_string();
    assert!(message.contains("COURIER_JWT_SECRET"), "the error names the fix: {message}");
    assert!(!data_dir.exists(), "refused before touching anything");

    // The default management key is as public as the dev secret.
    let secret = "a secret of our own";
    let anywhere = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let config = Config { data_dir: data_dir.clone(), jwt_secret: secret.into(), ..Config::default() };
    let served = courier_local::serve(config, anywhere, std::future::pending());
    let refused =
        tokio::time::timeout(WAIT, served).await.expect("refused, not served").expect_err("refused");
    assert!(refused.to_string().contains("COURIER_MANAGEMENT_SECRET"), "{refused}");

    // With secrets of its own it serves there (and on loopback every other test uses the defaults).
    let anywhere = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = anywhere.local_addr().unwrap().port();
    let config = Config {
        data_dir,
        jwt_secret: secret.into(),
        management_secret: "another of our own".into(),
        ..Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(courier_local::serve(config, anywhere, async {
        let _ = stopped.await;
    }));
    let url = format!("ws://127.0.0.1:{port}");
    let alice = Client::connect(&url, &mint(secret.as_bytes(), "alice", 60), "phone").await.expect("served");
    alice.list_chats().await.expect("served");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
