//! Wake-ups end to end (issue #13): devices that are not connected are woken through an independent Web Push receiver and a push gateway, on both backends.
//!
//! The push service is scripts/webpush-receiver.py, which decrypts each
//! wake-up with Python's http_ece and verifies its VAPID token with
//! `cryptography`, apart from the Rust sender. What it cannot play (a push
//! service that fails a few times and then answers, an FCM/APNs push
//! gateway) is a tiny HTTP server here that records what it is sent.

mod v2;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use courier_core::ratelimit::RateLimit;
use courier_tests::client::{Client, ToDevice};
use courier_tests::{Server, WAIT, http, on_aws};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::time::sleep;
use v2::{ok, publish, refused};

/// A wake-up must reach the push service this soon after the message that caused it.
const WITHIN: Duration = Duration::from_secs(5);

/// How long to wait for a wake-up that must not come: longer than one that
/// must takes (the AWS backend's queue is polled, not pushed to).
fn settle() -> Duration {
    if on_aws() { Duration::from_secs(3) } else { Duration::from_millis(1500) }
}

/// scripts/webpush-receiver.py, running; it exits when its stdin closes, so
/// dropping this stops it (and lets go of the requests it holds unanswered).
struct Receiver {
    child: Child,
    /// `http://127.0.0.1:PORT/push/`: a name appended makes an endpoint.
    endpoint: String,
    p256dh: String,
    auth: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Receiver {
    fn start() -> Receiver {
        let venv =
            std::env::var_os("COURIER_VENV").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv"));
        let python = venv.join("bin").join("python");
        assert!(python.is_file(), "{} not found: run scripts/test, which makes the venv", python.display());
        let mut child = Command::new(&python)
            .arg(repo_root().join("scripts/webpush-receiver.py"))
            .args(["--timeout", "600"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a first line");
        let Ok(subscription) = serde_json::from_str::<Value>(&line) else {
            let _ = child.kill();
            panic!("scripts/webpush-receiver.py did not start (its error is above): run scripts/test");
        };
        let text = |field: &str| subscription[field].as_str().expect("a subscription field").to_owned();
        Receiver { endpoint: text("endpoint"), p256dh: text("p256dh"), auth: text("auth"), child }
    }

    /// A subscription, as `registerPush` takes it, whose endpoint is named
    /// `name` (its prefix picks the answer: `gone-` 410, `fail-` 500, `hang-`
    /// none, anything else 201).
    fn subscription(&self, name: &str) -> Value {
        json!({
            "endpoint": format!("{}{name}", self.endpoint),
            "keys": { "p256dh": self.p256dh, "auth": self.auth },
        })
    }

    /// What the receiver made of each request to `name`, in arrival order.
    async fn records(&self, name: &str) -> Vec<Value> {
        let base = self.endpoint.trim_end_matches("push/");
        let all = http::get(&format!("{base}received")).await.expect("GET /received").json();
        all.as_array().expect("a list").iter().filter(|r| r["name"] == name).cloned().collect()
    }

    /// The records of `name` once there are `n`, or all there are after `within`.
    async fn wait(&self, name: &str, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.records(name).await;
            if records.len() >= n || Instant::now() >= deadline {
                return records;
            }
            sleep(Duration::from_millis(25)).await;
        }
    }
}

/// One request a [`Stub`] received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

/// A tiny HTTP/1.1 server on a free port that records every request and
/// answers the n-th (from 0) with `answer(n)` and no body.
struct Stub {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stub {
    async fn start(answer: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (recorded, answer) = (seen.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (seen, answer) = (recorded.clone(), answer.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, &seen, answer.as_ref()).await;
                });
            }
        });
        Stub { base, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests once there are `n`, or all there are after `within`.
    async fn wait(&self, n: usize, within: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + within;
        while self.seen().len() < n && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
        self.seen()
    }
}

/// Serves the requests of one connection (kept alive as long as the client likes).
async fn serve(
    socket: tokio::net::TcpStream,
    seen: &Mutex<Vec<Seen>>,
    answer: &(dyn Fn(usize) -> u16 + Send + Sync),
) -> std::io::Result<()> {
    let mut reader = tokio::io::BufReader::new(socket);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let Some((name, value)) = header.trim_end().split_once(':') else { break };
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        let length = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let status = {
            let mut seen = seen.lock().unwrap();
            let status = answer(seen.len());
            seen.push(Seen { at: Instant::now(), path, headers, body, status });
            status
        };
        let head = format!("HTTP/1.1 {status} Stub\r\ncontent-length: 0\r\n\r\n");
        reader.get_mut().write_all(head.as_bytes()).await?;
    }
}

async fn register(client: &Client, subscription: Value) {
    let done =
        ok(client, "registerPush", json!({ "platform": "webpush", "subscription": subscription })).await;
    assert_eq!(done, json!({}));
}

/// Closes the device's connection and waits until the server has let it go.
async fn leave(server: &Server, client: Client, user: &str, device: &str) {
    client.close();
    let deadline = Instant::now() + WAIT;
    while server.connection_id(user, device).is_some() {
        assert!(Instant::now() < deadline, "{user}/{device} still connected after {WAIT:?}");
        sleep(Duration::from_millis(10)).await;
    }
    drop(client);
    // $disconnect unbinds the device in its table just after the connection map forgets it.
    sleep(Duration::from_millis(300)).await;
}

/// Checks a wake-up as the receiver saw it: VAPID verified (with this
/// server's key and contact), decrypted, high priority, and carrying
/// nothing but `{"type":"wake"}`: none of `secrets` in the payload or in
/// any header the push service sees.
async fn assert_content_free(record: &Value, server: &Server, secrets: &[&str]) {
    assert_eq!(record["ok"], true, "the receiver refused it: {}", record["error"]);
    assert_eq!(record["status"], 201, "{record}");
    let payload = record["payload"].as_str().expect("a payload");
    assert_eq!(payload, r#"{"type":"wake"}"#);
    let headers = record["headers"].as_object().expect("headers");
    for secret in secrets {
        assert!(!payload.contains(secret), "{secret:?} in the payload");
        for (name, value) in headers {
            assert!(!value.as_str().unwrap_or_default().contains(secret), "{secret:?} in the {name} header");
        }
    }
    assert_eq!(headers["urgency"], "high");
    assert_eq!(headers["content-encoding"], "aes128gcm");
    assert_eq!(headers["topic"].as_str().map(str::len), Some(32), "collapsed by a topic");
    let key = http::get(&format!("{}/push/vapid-public-key", server.http)).await.expect("the key").text();
    assert_eq!(record["vapid"]["k"], key.trim(), "signed with the key the page hands out");
    assert_eq!(record["vapid"]["claims"]["sub"], server.config.push.subject);
}

/// alice and bob on their phones, in a chat alice made; bob registered at `name` of `receiver`.
async fn alice_and_bob(server: &Server, receiver: &Receiver, name: &str) -> (Client, Client, String) {
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "Lunch plans").await.expect("createChat");
    register(&bob, receiver.subscription(name)).await;
    (alice, bob, chat)
}

#[tokio::test]
async fn a_chat_message_wakes_a_device_that_left_once_with_nothing_in_it_and_one_connected_never() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let (alice, mut bob, chat) = alice_and_bob(&server, &receiver, "ok-bob").await;

    alice.send_message(&chat, "while you are here").await.unwrap();
    assert!(bob.next_message(WAIT).await.is_some(), "a connected device gets the message pushed");
    sleep(settle()).await;
    assert!(receiver.records("ok-bob").await.is_empty(), "and no wake-up");

    leave(&server, bob, "bob", "phone").await;
    let text = "meet at noon by the fountain";
    let sent = Instant::now();
    alice.send_message(&chat, text).await.unwrap();
    let records = receiver.wait("ok-bob", 1, WITHIN).await;
    let took = sent.elapsed();
    assert_eq!(records.len(), 1, "a wake-up within {WITHIN:?}");
    assert_content_free(&records[0], &server, &[text, "alice", "bob", &chat, "Lunch plans", "phone"]).await;
    sleep(settle()).await;
    assert_eq!(receiver.records("ok-bob").await.len(), 1, "exactly one");
    println!("a chat message's wake-up reached the push service {} ms after sendMessage", took.as_millis());

    // Woken, the app syncs.
    let bob = server.connect("bob", "phone").await;
    let synced = bob.sync_all().await.unwrap();
    assert!(synced.iter().any(|m| m.message == text), "the message waits for the sync");
}

#[tokio::test]
async fn a_device_message_wakes_a_device_that_left() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let (alice, bob, _chat) = alice_and_bob(&server, &receiver, "ok-bob").await;
    publish(&alice, "alice-identity", 1).await;
    publish(&bob, "bob-identity", 1).await;
    leave(&server, bob, "bob", "phone").await;

    let body = "sealed-session-key";
    let to = ToDevice { user_id: "bob".into(), device_id: "phone".into(), body: body.into() };
    let sent = Instant::now();
    alice.send_to_devices(&[to], None).await.expect("sendToDevices");
    let records = receiver.wait("ok-bob", 1, WITHIN).await;
    let took = sent.elapsed();
    assert_eq!(records.len(), 1, "a wake-up within {WITHIN:?}");
    assert_content_free(&records[0], &server, &[body, "alice", "bob", "phone"]).await;
    sleep(settle()).await;
    assert_eq!(receiver.records("ok-bob").await.len(), 1, "exactly one");
    println!(
        "a device message's wake-up reached the push service {} ms after sendToDevices",
        took.as_millis()
    );
}

#[tokio::test]
async fn wake_ups_collapse_while_unanswered_and_go_again_after_a_visit_or_the_window() {
    // Short enough to wait out, long enough for each step below to fit in it.
    const WINDOW: Duration = Duration::from_secs(10);
    let receiver = Receiver::start();
    let server = Server::start_with(|c| c.limits.wake_collapse_ms = WINDOW.as_millis() as i64).await;
    let (alice, bob, chat) = alice_and_bob(&server, &receiver, "ok-bob").await;
    leave(&server, bob, "bob", "phone").await;
    let count = async || receiver.records("ok-bob").await.len();

    for text in ["one", "two", "three"] {
        alice.send_message(&chat, text).await.unwrap();
    }
    assert_eq!(receiver.wait("ok-bob", 1, WITHIN).await.len(), 1);
    let first = Instant::now();
    sleep(settle()).await;
    assert_eq!(count().await, 1, "three messages, one wake-up while it is unanswered");

    // A visit answers it: the next message after bob leaves wakes him at once.
    let bob = server.connect("bob", "phone").await;
    leave(&server, bob, "bob", "phone").await;
    alice.send_message(&chat, "four").await.unwrap();
    assert_eq!(receiver.wait("ok-bob", 2, WITHIN).await.len(), 2, "woken again after a visit");
    let second = Instant::now();
    assert!(second - first < WINDOW, "inconclusive: the first window had passed anyway");
    alice.send_message(&chat, "five").await.unwrap();
    sleep(settle()).await;
    assert_eq!(count().await, 2, "collapsed again");

    // Unanswered past the window: the next message wakes again.
    sleep((second + WINDOW).saturating_duration_since(Instant::now())).await;
    alice.send_message(&chat, "six").await.unwrap();
    assert_eq!(receiver.wait("ok-bob", 3, WITHIN).await.len(), 3, "woken again after the window");
    for record in receiver.records("ok-bob").await {
        assert_content_free(&record, &server, &["one", "four", "six", "alice"]).await;
    }
}

#[tokio::test]
async fn receipts_typing_device_lists_and_keys_low_never_wake() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();
    publish(&alice, "alice-identity", 1).await;
    publish(&bob, "bob-identity", 10).await;
    let from_bob = bob.send_message(&chat, "from bob").await.unwrap().message_id.to_string();
    register(&bob, receiver.subscription("ok-bob")).await;
    leave(&server, bob, "bob", "phone").await;

    // Each of these pushes to bob's devices if they are connected.
    assert_eq!(alice.ack(&[&from_bob]).await.unwrap(), 1, "a delivered receipt");
    ok(&alice, "markRead", json!({ "chatId": chat, "upTo": from_bob })).await;
    ok(&alice, "typing", json!({ "chatId": chat, "state": "start" })).await;
    ok(&alice, "typing", json!({ "chatId": chat, "state": "stop" })).await;
    let laptop = server.connect("alice", "laptop").await;
    publish(&laptop, "alice-laptop-identity", 1).await; // a deviceList
    let claimed = alice.get_keys("bob", Some("phone")).await.unwrap();
    assert!(claimed[0].one_time_pre_key.is_some(), "a claim that leaves bob 9: keysLow");
    sleep(settle()).await;
    assert!(receiver.records("ok-bob").await.is_empty(), "none of them woke bob");

    alice.send_message(&chat, "now a message").await.unwrap();
    assert_eq!(receiver.wait("ok-bob", 1, WITHIN).await.len(), 1, "the registration was live all along");
}

#[tokio::test]
async fn a_push_service_that_says_gone_removes_the_registration() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let (alice, bob, chat) = alice_and_bob(&server, &receiver, "gone-bob").await;
    leave(&server, bob, "bob", "phone").await;

    alice.send_message(&chat, "one").await.unwrap();
    let records = receiver.wait("gone-bob", 1, WITHIN).await;
    assert_eq!(records.len(), 1);
    assert_eq!((records[0]["status"].as_u64(), &records[0]["ok"]), (Some(410), &json!(true)));
    // Let the 410 be acted on, then clear any wake mark with a visit, so
    // that only a missing registration can keep the next message silent.
    sleep(Duration::from_millis(500)).await;
    let bob = server.connect("bob", "phone").await;
    leave(&server, bob, "bob", "phone").await;
    alice.send_message(&chat, "two").await.unwrap();
    sleep(settle()).await;
    assert_eq!(receiver.records("gone-bob").await.len(), 1, "no request at all after the 410");

    let bob = server.connect("bob", "phone").await;
    register(&bob, receiver.subscription("ok-bob-again")).await;
    leave(&server, bob, "bob", "phone").await;
    alice.send_message(&chat, "three").await.unwrap();
    assert_eq!(receiver.wait("ok-bob-again", 1, WITHIN).await.len(), 1, "a new registration wakes again");
}

#[tokio::test]
async fn a_failing_push_service_is_retried_with_backoff_until_it_answers() {
    let receiver = Receiver::start();
    // Three 500s, then 201s.
    let flaky = Stub::start(|n| if n < 3 { 500 } else { 201 }).await;
    let server = Server::start().await;
    let (alice, bob, chat) = alice_and_bob(&server, &receiver, "fail-bob").await;
    let laptop = server.connect("bob", "laptop").await;
    let mut subscription = receiver.subscription("unused");
    subscription["endpoint"] = json!(flaky.url("/push/flaky"));
    register(&laptop, subscription).await;
    leave(&server, bob, "bob", "phone").await;
    leave(&server, laptop, "bob", "laptop").await;

    let sent = Instant::now();
    alice.send_message(&chat, "one").await.expect("a failing push service fails no send");
    let answered = sent.elapsed();
    // The SQS queue of the AWS backend retries once a message's visibility
    // timeout (5 s) ends; the embedded queue backs off from 100 ms.
    let patience = if on_aws() { Duration::from_secs(40) } else { Duration::from_secs(10) };
    let tries = flaky.wait(4, patience).await;
    let statuses: Vec<u16> = tries.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [500, 500, 500, 201], "retried until it answered");
    for attempt in &tries {
        assert_eq!(attempt.path, "/push/flaky");
        assert!(attempt.headers["authorization"].starts_with("vapid t="), "each try is signed");
        assert_eq!(attempt.headers["content-encoding"], "aes128gcm");
        assert!(!attempt.body.is_empty());
    }
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!(
        "sendMessage answered in {answered:?}; tries of a push service failing 3 times came {gaps:?} apart"
    );
    assert!(gaps.iter().all(|g| *g >= Duration::from_millis(90)), "not retried at once: {gaps:?}");
    if !on_aws() {
        assert!(gaps[2] > gaps[0], "the waits grow: {gaps:?}");
    }
    sleep(settle()).await;
    assert_eq!(flaky.seen().len(), 4, "nothing more once it answered");

    // The receiver answers fail-* with 500 every time: each retry is a
    // whole, valid wake-up again.
    let failing = receiver.wait("fail-bob", 2, patience).await;
    assert!(failing.len() >= 2, "retried: {failing:?}");
    for record in &failing {
        assert_eq!((record["status"].as_u64(), &record["ok"]), (Some(500), &json!(true)), "{record}");
        assert_eq!(record["payload"], r#"{"type":"wake"}"#);
    }
}

/// The 50th and 99th percentiles and the maximum.
fn percentiles(mut took: Vec<Duration>) -> (Duration, Duration, Duration) {
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    (at(0.50), at(0.99), *took.last().expect("some"))
}

#[tokio::test]
async fn a_failing_or_hanging_push_service_neither_fails_nor_slows_send_message() {
    const SENDS: usize = 200;
    let receiver = Receiver::start();
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 1e9, per_second: 1e9 }).await;
    let alice = server.connect("alice", "phone").await;
    let scenarios =
        [("none", None), ("healthy", Some("ok-h")), ("failing", Some("fail-f")), ("hanging", Some("hang-g"))];
    let mut chats = Vec::new();
    for (user, name) in scenarios {
        let client = server.connect(user, "phone").await;
        chats.push(alice.create_chat(&[user], user).await.unwrap());
        if let Some(name) = name {
            register(&client, receiver.subscription(name)).await;
        }
        leave(&server, client, user, "phone").await;
    }

    let mut report = Vec::new();
    for ((scenario, name), chat) in scenarios.iter().zip(&chats) {
        let mut took = Vec::with_capacity(SENDS);
        for i in 0..SENDS {
            let started = Instant::now();
            alice.send_message(chat, &format!("{scenario} {i}")).await.expect("sendMessage succeeds");
            took.push(started.elapsed());
        }
        let (p50, p99, max) = percentiles(took);
        let tries = match name {
            Some(name) => receiver.records(name).await.len(),
            None => 0,
        };
        report.push(format!(
            "{scenario:>8}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({tries} requests to the push service so far)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ));
    }
    let backend = if on_aws() { "aws" } else { "embedded" };
    println!("sendMessage over {SENDS} sends each to a device that left, {backend} backend:");
    for line in &report {
        println!("  {line}");
    }
    assert!(!receiver.wait("hang-g", 1, WITHIN).await.is_empty(), "the hanging service was asked");
    assert!(!receiver.wait("fail-f", 1, WITHIN).await.is_empty(), "the failing service was asked");
    assert_eq!(receiver.wait("ok-h", 1, WITHIN).await.len(), 1, "the healthy one woke the device once");
}

/// A p256dh or auth of these bytes, base64url.
fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn bad_registrations_are_refused() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let good = receiver.subscription("ok-bob");
    let with = |path: &str, value: Value| {
        let mut subscription = good.clone();
        match path.split_once('.') {
            Some((outer, inner)) => subscription[outer][inner] = value,
            None => subscription[path] = value,
        }
        json!({ "platform": "webpush", "subscription": subscription })
    };
    let (mut point, auth) = (URL_SAFE_NO_PAD.decode(&receiver.p256dh).unwrap(), receiver.auth.clone());
    assert_eq!((point.len(), URL_SAFE_NO_PAD.decode(&auth).unwrap().len()), (65, 16));
    point[64] ^= 1; // off the curve
    let cases = [
        ("plain http to a name", with("endpoint", json!("http://push.example.com/x"))),
        ("plain http to localhost", with("endpoint", json!("http://localhost:9/push/x"))),
        ("plain http to a private address", with("endpoint", json!("http://10.1.2.3:8080/x"))),
        ("plain http to IPv6 loopback", with("endpoint", json!("http://[::1]:9/x"))),
        ("not a URL", with("endpoint", json!("push me"))),
        ("missing keys", json!({ "platform": "webpush", "subscription": { "endpoint": good["endpoint"] } })),
        ("missing auth", with("keys", json!({ "p256dh": receiver.p256dh }))),
        ("p256dh of 64 bytes", with("keys.p256dh", json!(b64(&[4; 64])))),
        ("p256dh compressed", with("keys.p256dh", json!(b64(&[&[2u8][..], &[7; 32]].concat())))),
        ("p256dh off the curve", with("keys.p256dh", json!(b64(&point)))),
        ("p256dh not base64url", with("keys.p256dh", json!("not*base64"))),
        ("auth of 15 bytes", with("keys.auth", json!(b64(&[1; 15])))),
        ("auth of 17 bytes", with("keys.auth", json!(b64(&[1; 17])))),
        ("an unknown platform", json!({ "platform": "gcm", "token": "t" })),
        ("webpush with a token", json!({ "platform": "webpush", "token": "t" })),
        ("fcm without a gateway", json!({ "platform": "fcm", "token": "fcm-token" })),
        ("apns without a gateway", json!({ "platform": "apns", "token": "apns-token" })),
        ("apns-sandbox without a gateway", json!({ "platform": "apns-sandbox", "token": "t" })),
        ("fcm with an empty token", json!({ "platform": "fcm", "token": "" })),
    ];
    for (what, fields) in cases {
        let error = refused(&bob, "registerPush", fields).await;
        assert_eq!(error["code"], "BAD_REQUEST", "{what}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        for quoted in ["push.example.com", "10.1.2.3", &receiver.p256dh, "fcm-token", "apns-token"] {
            assert!(!message.contains(quoted), "{what}: the message quotes the request: {message}");
        }
    }
    register(&bob, good).await;
    leave(&server, bob, "bob", "phone").await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    alice.send_message(&chat, "hi").await.unwrap();
    assert_eq!(receiver.wait("ok-bob", 1, WITHIN).await.len(), 1, "none of the refusals replaced it");
}

#[tokio::test]
async fn unregister_push_stops_wake_ups() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let (alice, bob, chat) = alice_and_bob(&server, &receiver, "ok-bob").await;
    assert_eq!(ok(&bob, "unregisterPush", json!({})).await, json!({}));
    assert_eq!(
        ok(&bob, "unregisterPush", json!({})).await,
        json!({}),
        "and again: nothing to remove is fine"
    );
    leave(&server, bob, "bob", "phone").await;
    alice.send_message(&chat, "one").await.unwrap();
    sleep(settle()).await;
    assert!(receiver.records("ok-bob").await.is_empty(), "unregistered: not woken");

    let bob = server.connect("bob", "phone").await;
    register(&bob, receiver.subscription("ok-bob-again")).await;
    leave(&server, bob, "bob", "phone").await;
    alice.send_message(&chat, "two").await.unwrap();
    assert_eq!(receiver.wait("ok-bob-again", 1, WITHIN).await.len(), 1, "registered again: woken");
}

#[tokio::test]
async fn remove_device_removes_its_registration() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let (alice, phone, chat) = alice_and_bob(&server, &receiver, "ok-bob-phone").await;
    let laptop = server.connect("bob", "laptop").await;
    register(&laptop, receiver.subscription("ok-bob-laptop")).await;
    laptop.remove_device("phone").await.expect("removeDevice");
    drop(phone);
    // The same phone comes back as a new device: it must not be woken
    // through the registration of the device that was removed.
    let phone = server.connect("bob", "phone").await;
    leave(&server, phone, "bob", "phone").await;
    leave(&server, laptop, "bob", "laptop").await;

    alice.send_message(&chat, "to both").await.unwrap();
    assert_eq!(receiver.wait("ok-bob-laptop", 1, WITHIN).await.len(), 1, "the laptop is woken");
    sleep(settle()).await;
    assert!(receiver.records("ok-bob-phone").await.is_empty(), "the removed phone's registration is gone");
}

#[tokio::test]
async fn delete_account_removes_its_registrations() {
    let receiver = Receiver::start();
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let carol = server.connect("carol", "phone").await;
    register(&carol, receiver.subscription("ok-carol-old")).await;
    carol.delete_account().await.expect("deleteAccount");
    drop(carol);

    // A new account under the same userId, on the same devices.
    let phone = server.connect("carol", "phone").await;
    let laptop = server.connect("carol", "laptop").await;
    register(&laptop, receiver.subscription("ok-carol-new")).await;
    let chat = alice.create_chat(&["carol"], "again").await.unwrap();
    leave(&server, phone, "carol", "phone").await;
    leave(&server, laptop, "carol", "laptop").await;
    alice.send_message(&chat, "welcome back").await.unwrap();
    assert_eq!(receiver.wait("ok-carol-new", 1, WITHIN).await.len(), 1, "the new account's laptop is woken");
    sleep(settle()).await;
    assert!(receiver.records("ok-carol-old").await.is_empty(), "the deleted account's registration is gone");
}

#[tokio::test]
async fn fcm_and_apns_wake_ups_reach_the_push_gateway_content_free() {
    let gateway = Stub::start(|_| 200).await;
    let server = Server::start_with(|c| {
        c.push.gateway_url = Some(gateway.url("/wake"));
        c.push.gateway_secret = Some("gateway-secret".into());
    })
    .await;
    let alice = server.connect("alice", "phone").await;
    let tokens = [
        ("phone", "fcm", "fcm-token-1"),
        ("laptop", "apns", "apns-token-2"),
        ("tablet", "apns-sandbox", "sandbox-token-3"),
    ];
    let mut devices = Vec::new();
    for (device, platform, token) in tokens {
        let client = server.connect("bob", device).await;
        ok(&client, "registerPush", json!({ "platform": platform, "token": token })).await;
        devices.push((client, device));
    }
    let chat = alice.create_chat(&["bob"], "Lunch plans").await.unwrap();
    for (client, device) in devices {
        leave(&server, client, "bob", device).await;
    }

    let text = "meet at noon";
    alice.send_message(&chat, text).await.unwrap();
    let seen = gateway.wait(3, WITHIN).await;
    assert_eq!(seen.len(), 3, "one wake-up per device within {WITHIN:?}");
    let mut woken: Vec<(String, String)> = Vec::new();
    for request in &seen {
        assert_eq!(request.path, "/wake");
        assert_eq!(request.headers["authorization"], "Bearer gateway-secret");
        assert_eq!(request.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&request.body).expect("a JSON body");
        let fields: Vec<&String> = body.as_object().expect("an object").keys().collect();
        assert_eq!(fields, ["collapseKey", "platform", "priority", "token"], "nothing more: {body}");
        assert_eq!(body["priority"], "high");
        assert_eq!(body["collapseKey"].as_str().map(str::len), Some(32));
        let raw = String::from_utf8_lossy(&request.body);
        for secret in [text, "alice", "bob", &chat, "Lunch plans"] {
            assert!(!raw.contains(secret), "{secret:?} went to the gateway: {raw}");
        }
        woken.push((body["platform"].as_str().unwrap().into(), body["token"].as_str().unwrap().into()));
    }
    woken.sort();
    let mut expected: Vec<(String, String)> =
        tokens.iter().map(|(_, p, t)| (p.to_string(), t.to_string())).collect();
    expected.sort();
    assert_eq!(woken, expected);
    sleep(settle()).await;
    assert_eq!(gateway.seen().len(), 3, "exactly one each");
}

#[tokio::test]
async fn the_push_page_hands_out_the_key_that_signs_and_keeps_it_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(|c| c.data_dir = dir.path().to_owned()).await;
    let page = http::get(&format!("{}/push/", server.http)).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text().contains("registerPush") && page.text().contains("/push/sw.js"));
    let worker = http::get(&format!("{}/push/sw.js", server.http)).await.unwrap();
    assert_eq!(worker.status, 200);
    assert!(worker.header("content-type").unwrap().starts_with("text/javascript"));
    assert!(worker.text().contains("showNotification"));
    let key = http::get(&format!("{}/push/vapid-public-key", server.http)).await.unwrap().text();
    let point = URL_SAFE_NO_PAD.decode(key.trim()).expect("base64url");
    assert_eq!((point.len(), point[0]), (65, 4), "an uncompressed P-256 point");

    // Browsers subscribed with this key: a restart on the same data must keep it.
    let config = server.config.clone();
    server.stop().await;
    assert!(dir.path().join(courier_local::config::VAPID_KEY_FILE).is_file());
    let again = Server::start_in(config).await;
    let after = http::get(&format!("{}/push/vapid-public-key", again.http)).await.unwrap().text();
    assert_eq!(after, key, "the key outlives a restart");
}
