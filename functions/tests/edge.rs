//! The deployed edge's own checks, which the local gateway makes too: the
//! 32 KiB frame limit and the per-connection rate limit in `lambda::command`,
//! each command route's function answering as the local gateway's dispatch
//! and refusing other actions' frames as `$default` does, and the download
//! URLs `S3Blobs` presigns for getAttachment.
//!
//! The rate limit's buckets live in the process (as in a Lambda execution
//! environment), shared by every test here: each test uses its own
//! connection ids.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_lambda_events::encodings::Body;
use courier_aws::S3Blobs;
use courier_aws::aws_sdk_s3;
use courier_aws::lambda::{self, MAX_FRAME_BYTES, WsEvent, WsResponse};
use courier_core::Courier;
use courier_core::domain::Limits;
use courier_core::ids::ConnectionId;
use courier_core::ports::{Attachment, Blobs, Posted, Push, Unwired};
use courier_core::protocol::ListChats;
use courier_embedded::{self, Durability, FileBlobs, SqliteStore};
use courier_testkit::FakeClock;
use serde_json::{Value, json};

/// A push port that delivers nowhere: these tests look only at the answers.
struct Nowhere;

#[async_trait]
impl Push for Nowhere {
    async fn post(&self, _: &ConnectionId, _: &str) -> courier_core::Result<Posted> {
        Ok(Posted::Gone)
    }

    async fn close(&self, _: &ConnectionId) -> courier_core::Result<()> {
        Ok(())
    }
}

/// A Courier over the embedded adapters, in its own temp dir.
struct World {
    courier: Courier,
    _store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::at(1_764_415_260_000));
        let store =
            SqliteStore::open(&dir.path().join("courier.db"), Durability::Process, clock.clone()).unwrap();
        let blobs = FileBlobs::open(&dir.path().join("blobs"), "http://blobs.test").unwrap();
        let ports = courier_embedded::ports(&store, &blobs, Arc::new(Nowhere), Arc::new(Unwired), clock);
        World { courier: Courier::new(ports, Limits::default()), _store: store, _dir: dir }
    }

    /// `frame` from alice's phone on `connection`, as API Gateway hands it to a command route.
    async fn send(&self, connection: &str, frame: &str) -> Value {
        answer(&lambda::command(&self.courier, event(connection, frame)).await)
    }
}

/// events/list-chats.json (alice, authorized), on `connection`, carrying `frame`.
fn event(connection: &str, frame: &str) -> WsEvent {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../events/list-chats.json");
    let mut event: WsEvent = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    event.request_context.connection_id = Some(connection.to_owned());
    event.body = Some(frame.to_owned());
    event
}

fn answer(response: &WsResponse) -> Value {
    assert_eq!(response.status_code, 200);
    match &response.body {
        Some(Body::Text(text)) => serde_json::from_str(text).expect("a JSON frame"),
        other => panic!("no text frame: {other:?}"),
    }
}

/// A listChats frame of exactly `len` bytes.
fn list_chats(request_id: &str, len: usize) -> String {
    let bare = json!({"action": "listChats", "requestId": request_id, "pad": ""}).to_string();
    let frame = json!({"action": "listChats", "requestId": request_id, "pad": "x".repeat(len - bare.len())});
    let frame = frame.to_string();
    assert_eq!(frame.len(), len);
    frame
}

#[tokio::test]
async fn a_frame_over_32_kib_is_refused_before_it_runs() {
    let w = World::new();
    let over = w.send("edge-size", &list_chats("r-big", MAX_FRAME_BYTES + 1)).await;
    assert_eq!(over["status"], "FAILURE", "{over}");
    assert_eq!(over["error"]["code"], "LIMIT_EXCEEDED");
    assert_eq!(over["error"]["message"], "a frame is at most 32768 bytes", "it names the limit");
    assert_eq!((&over["action"], &over["requestId"]), (&json!("listChats"), &json!("r-big")), "echoed");

    let at = w.send("edge-size", &list_chats("r-max", MAX_FRAME_BYTES)).await;
    assert_eq!(at["status"], "SUCCESS", "32 KiB itself is processed: {at}");

    // $default applies the same limit.
    let unknown = json!({"action": "nope", "pad": "x".repeat(MAX_FRAME_BYTES)}).to_string();
    let answer = answer(&lambda::default(event("edge-size-default", &unknown)));
    assert_eq!(answer["error"]["code"], "LIMIT_EXCEEDED", "{answer}");
}

#[tokio::test]
async fn the_51st_frame_of_a_burst_is_rate_limited_and_other_connections_are_not() {
    let w = World::new();
    let frame = r#"{"action":"listChats","requestId":"r"}"#;
    // The bucket refills 20 tokens a second: a burst slower than 50 ms earns
    // one back, so a burst stalled by a busy machine is tried again on a
    // fresh connection.
    for attempt in 0..5 {
        let connection = format!("edge-burst-{attempt}");
        let started = Instant::now();
        let mut answers = Vec::new();
        for _ in 0..51 {
            answers.push(w.send(&connection, frame).await);
        }
        if started.elapsed() > Duration::from_millis(40) {
            continue;
        }
        for (i, answer) in answers[..50].iter().enumerate() {
            assert_eq!(answer["status"], "SUCCESS", "frame {}: {answer}", i + 1);
        }
        let limited = &answers[50];
        assert_eq!(limited["status"], "FAILURE", "{limited}");
        assert_eq!(limited["error"]["code"], "RATE_LIMITED");
        assert_eq!((&limited["action"], &limited["requestId"]), (&json!("listChats"), &json!("r")));

        let other = w.send(&format!("edge-other-{attempt}"), frame).await;
        assert_eq!(other["status"], "SUCCESS", "another connection has its own bucket: {other}");

        // $default frames cost a token too.
        let answer = answer(&lambda::default(event(&connection, r#"{"action":"nope"}"#)));
        assert_eq!(answer["error"]["code"], "RATE_LIMITED", "{answer}");

        // 20 a second: a token is back within 50 ms.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(w.send(&connection, frame).await["status"], "SUCCESS", "the bucket refills");
        return;
    }
    panic!("no burst of 51 frames ran within 40 ms");
}

#[tokio::test]
async fn a_route_answers_a_frame_for_another_action_as_default_does() {
    let w = World::new();
    let list_chats = async |connection: &str, frame: &str| {
        answer(&lambda::command_for::<ListChats>(&w.courier, event(connection, frame)).await)
    };
    for (i, frame) in [
        r#"{"action":"sync","requestId":"r1","limit":5}"#,
        // Refused, not run: alice keeps her account and her phone.
        r#"{"action":"deleteAccount","requestId":"r2"}"#,
        r#"{"action":"removeDevice","deviceId":"phone"}"#,
        r#"{"action":"nope","requestId":"r3"}"#,
        r#"{"action":5}"#,
        "not json",
    ]
    .into_iter()
    .enumerate()
    {
        let routed = list_chats(&format!("edge-route-{i}"), frame).await;
        let default = answer(&lambda::default(event(&format!("edge-route-default-{i}"), frame)));
        assert_eq!(routed, default, "{frame}");
        assert_eq!(routed["status"], "FAILURE", "{frame}");
    }
    let own = list_chats("edge-route-own", r#"{"requestId":"r4","action":"listChats"}"#).await;
    assert_eq!(own["status"], "SUCCESS", "{own}");
    assert_eq!((&own["action"], &own["requestId"]), (&json!("listChats"), &json!("r4")));
    // The edge of every command runs what the listChats route refused.
    let sync = w.send("edge-route-any", r#"{"action":"sync","requestId":"r1","limit":5}"#).await;
    assert_eq!(sync["status"], "SUCCESS", "{sync}");
}

#[tokio::test]
async fn every_command_event_gets_the_same_answer_from_its_route_as_from_dispatch() {
    let events = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../events");
    let mut routes = 0;
    for entry in std::fs::read_dir(events).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let Ok(mut event) = serde_json::from_str::<WsEvent>(&text) else { continue };
        let key = event.request_context.route_key.clone().unwrap_or_default();
        if courier_core::protocol::Action::from_name(&key).is_none() {
            continue;
        }
        event.request_context.connection_id = Some(format!("edge-events-{key}"));
        // Each in a world of its own, where most fail the same way: what
        // is compared is the shape of the answer, not generated ids.
        let typed = lambda::route(&World::new().courier, event.clone()).await;
        let every = lambda::command(&World::new().courier, event).await;
        let shape = |response: &WsResponse| match &response.body {
            None => (response.status_code, None),
            Some(_) => {
                let a = answer(response);
                let shape = [&a["action"], &a["requestId"], &a["status"], &a["error"]["code"]];
                (response.status_code, Some(shape.map(Value::to_string)))
            }
        };
        assert_eq!(shape(&typed), shape(&every), "events for {key}");
        routes += 1;
    }
    assert_eq!(routes, courier_core::protocol::Action::ALL.len(), "an event file per command route");
}

#[tokio::test]
async fn a_presigned_download_asks_s3_to_serve_the_bytes_as_an_attachment() {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .build();
    let blobs = S3Blobs::new(aws_sdk_s3::Client::from_conf(config), "media".into());
    let attachment = Attachment {
        id: "01JGGMXKBVV37E3S3E28JT97KB".try_into().unwrap(),
        uploader: "alice".try_into().unwrap(),
        content_type: "text/html".into(),
        size: 5,
        sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
        created_at: 0,
    };
    let expires_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as i64
        + 900_000;
    let link = blobs.presign_download(&attachment, expires_at).await.unwrap();
    let (_, query) = link.url.split_once('?').expect("a presigned URL has a query");
    let params: Vec<&str> = query.split('&').collect();
    assert!(params.contains(&"response-content-disposition=attachment"), "{params:?}");
    // Signed, not appended: changing it would break the signature.
    assert!(params.iter().any(|p| p.starts_with("X-Amz-Signature=")), "{params:?}");
    assert!(link.headers.is_empty(), "a plain GET downloads it");
}
