//! Frames: bad frames, requestId echo, frame size limits, the rate limit and
//! the idle timeout. Each bad frame gets a FAILURE and the connection keeps serving.

use std::time::Duration;

use courier_core::ratelimit::RateLimit;
use courier_tests::client::Client;
use courier_tests::{QUIET, Server, WAIT};
use serde_json::{Value, json};

/// Sends `text` as one frame and returns the answer.
async fn answer(client: &mut Client, text: &str) -> Value {
    client.send_raw(text).expect("send");
    client.next_frame(WAIT).await.unwrap_or_else(|| panic!("no answer to {:.80}", text))
}

#[track_caller]
fn assert_failure(frame: &Value, code: &str) {
    assert_eq!(frame["type"], "response", "{frame}");
    assert_eq!(frame["status"], "FAILURE", "{frame}");
    assert_eq!(frame["error"]["code"], code, "{frame}");
    assert!(frame["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
    assert!(frame.get("data").is_none(), "{frame}");
}

/// The connection still answers a real command.
async fn still_serving(client: &Client) {
    client.list_chats().await.expect("the connection keeps serving");
}

#[tokio::test]
async fn a_frame_that_is_not_json_gets_bad_request() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    for text in ["hello", "{", "{\"action\":\"listChats\"", "", "{'action':'listChats'}"] {
        let frame = answer(&mut alice, text).await;
        assert_failure(&frame, "BAD_REQUEST");
    }
    still_serving(&alice).await;
}

#[tokio::test]
async fn json_that_is_not_an_object_gets_bad_request() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut wrong = Vec::new();
    for text in [
        "[]",
        "42",
        "null",
        "true",
        "\"listChats\"",
        "[\"listChats\"]",
        "[\"listChats\",\"r1\"]",
        "[\"sync\",null]",
    ] {
        let frame = answer(&mut alice, text).await;
        if frame["status"] != "FAILURE" || frame["error"]["code"] != "BAD_REQUEST" {
            wrong.push(format!("{text} -> {frame}"));
        }
    }
    assert!(wrong.is_empty(), "not refused as BAD_REQUEST:\n{}", wrong.join("\n"));
    still_serving(&alice).await;
}

#[tokio::test]
async fn a_frame_without_a_usable_action_gets_bad_request() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let frame = answer(&mut alice, r#"{"requestId":"no-action"}"#).await;
    assert_failure(&frame, "BAD_REQUEST");
    assert_eq!(frame["requestId"], "no-action");
    for text in [r#"{}"#, r#"{"action":5}"#, r#"{"action":null}"#, r#"{"action":["sync"]}"#] {
        let frame = answer(&mut alice, text).await;
        assert_failure(&frame, "BAD_REQUEST");
    }
    still_serving(&alice).await;
}

#[tokio::test]
async fn an_unknown_action_gets_unknown_action() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    for action in ["deleteEverything", "SYNC", "$connect", "$disconnect", "$default", ""] {
        let text = json!({ "action": action, "requestId": "u1" }).to_string();
        let frame = answer(&mut alice, &text).await;
        assert_failure(&frame, "UNKNOWN_ACTION");
        assert_eq!(frame["requestId"], "u1", "{frame}");
    }
    still_serving(&alice).await;
}

#[tokio::test]
async fn a_field_of_the_wrong_type_gets_bad_request() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    for (action, fields) in [
        ("createChat", json!({ "participants": "bob", "name": "x" })),
        ("createChat", json!({ "participants": ["bob"], "name": 5 })),
        ("createChat", json!({ "participants": [5], "name": "x" })),
        ("sendMessage", json!({ "chatId": 5, "message": "x" })),
        ("sendMessage", json!({ "chatId": chat, "message": ["x"] })),
        ("sendMessage", json!({ "chatId": chat, "message": "x", "attachments": [1] })),
        ("createAttachment", json!({ "contentType": "text/plain", "size": "5", "sha256": "0".repeat(64) })),
        ("getAttachment", json!({ "attachmentId": 1 })),
        ("modifyChatParticipants", json!({ "chatId": chat, "userId": ["bob"], "operation": "ADD" })),
        ("sync", json!({ "limit": "5" })),
        ("sync", json!({ "cursor": 5 })),
        ("ack", json!({ "messageIds": "x" })),
        ("ack", json!({ "messageId": 5 })),
        ("removeDevice", json!({ "deviceId": true })),
    ] {
        let frame = alice.request(action, fields.clone()).await.expect("an answer");
        assert_failure(&frame, "BAD_REQUEST");
        assert_eq!(frame["action"], action, "{frame}");
    }
    still_serving(&alice).await;
    assert_eq!(alice.list_chats().await.unwrap().chats.len(), 1, "no bad frame created anything");
}

#[tokio::test]
async fn the_request_id_and_action_are_echoed() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let frame = answer(&mut alice, r#"{"action":"listChats","requestId":"r-42"}"#).await;
    assert_eq!(
        frame,
        json!({ "type": "response", "action": "listChats", "requestId": "r-42", "status": "SUCCESS",
                "data": { "chats": [], "cursor": null } })
    );
    let frame = answer(&mut alice, r#"{"action":"listChats"}"#).await;
    assert!(frame.get("requestId").is_none(), "no requestId sent, none echoed: {frame}");
    assert_eq!(frame["status"], "SUCCESS");

    let frame = answer(&mut alice, r#"{"action":"sync","requestId":"r-43","limit":0}"#).await;
    assert_failure(&frame, "BAD_REQUEST");
    assert_eq!((&frame["action"], &frame["requestId"]), (&json!("sync"), &json!("r-43")));

    let longest = "r".repeat(64);
    let frame = answer(&mut alice, &json!({ "action": "listChats", "requestId": longest }).to_string()).await;
    assert_eq!(frame["requestId"], longest.as_str());
    assert_eq!(frame["status"], "SUCCESS");
    // A requestId that is no string of at most 64 characters is refused.
    for bad in [json!("r".repeat(65)), json!(42), json!({ "id": 1 })] {
        let frame = answer(&mut alice, &json!({ "action": "listChats", "requestId": bad }).to_string()).await;
        assert_failure(&frame, "BAD_REQUEST");
    }
    still_serving(&alice).await;
}

/// A listChats frame of exactly `len` bytes.
fn padded_frame(len: usize) -> String {
    let empty = json!({ "action": "listChats", "requestId": "big", "pad": "" }).to_string();
    let frame = json!({ "action": "listChats", "requestId": "big", "pad": "p".repeat(len - empty.len()) });
    let text = frame.to_string();
    assert_eq!(text.len(), len);
    text
}

#[tokio::test]
async fn a_frame_over_32_kib_gets_limit_exceeded_and_the_connection_stays_open() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;

    let frame = answer(&mut alice, &padded_frame(32 * 1024)).await;
    assert_eq!(frame["status"], "SUCCESS", "a frame of exactly 32 KiB is processed");
    let frame = answer(&mut alice, &padded_frame(32 * 1024 + 1)).await;
    assert_failure(&frame, "LIMIT_EXCEEDED");
    assert_eq!(frame["requestId"], "big");
    let frame = answer(&mut alice, &padded_frame(500 * 1024)).await;
    assert_failure(&frame, "LIMIT_EXCEEDED");
    assert!(alice.closed(QUIET).await.is_none(), "still open");
    still_serving(&alice).await;
}

#[tokio::test]
async fn a_frame_over_1_mib_closes_the_connection_with_1009() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let frame = answer(&mut alice, &padded_frame(1024 * 1024)).await;
    assert_failure(&frame, "LIMIT_EXCEEDED");
    assert!(alice.closed(QUIET).await.is_none(), "exactly 1 MiB is refused, not cut off");
    alice.send_raw(padded_frame(1024 * 1024 + 1)).unwrap();
    assert_eq!(alice.closed(WAIT).await, Some(1009));
    // Only that connection: the device connects again.
    let alice = server.connect("alice", "phone").await;
    still_serving(&alice).await;
}

#[tokio::test]
async fn a_burst_past_the_rate_limit_gets_rate_limited_and_the_connection_stays_open() {
    // A bucket of 10 that never refills makes the count exact.
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 10.0, per_second: 0.0 }).await;
    let mut alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();

    let burst = (0..60).map(|_| alice.request("listChats", json!({})));
    let answers = futures_util::future::join_all(burst).await;
    let mut ok = 0;
    let mut limited = 0;
    for answer in answers {
        let frame = answer.expect("every frame is answered, with its requestId");
        match frame["status"].as_str() {
            Some("SUCCESS") => ok += 1,
            _ => {
                assert_failure(&frame, "RATE_LIMITED");
                assert_eq!(frame["action"], "listChats");
                limited += 1;
            }
        }
    }
    assert_eq!((ok, limited), (10, 50));

    // Still open: pushes arrive and frames are still answered.
    assert!(alice.closed(QUIET).await.is_none());
    let sent = bob.send_message(&chat, "still there?").await.unwrap();
    assert_eq!(alice.next_message(WAIT).await.expect("a push").message_id, sent.message_id);
    let frame = alice.request("listChats", json!({})).await.unwrap();
    assert_failure(&frame, "RATE_LIMITED");
    // Each connection has its own bucket.
    let alice_laptop = server.connect("alice", "laptop").await;
    still_serving(&alice_laptop).await;
}

#[tokio::test]
async fn the_rate_limit_bucket_refills_over_time() {
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 3.0, per_second: 5.0 }).await;
    let alice = server.connect("alice", "phone").await;
    let burst = (0..10).map(|_| alice.request("listChats", json!({})));
    let answers = futures_util::future::join_all(burst).await;
    let limited = answers.iter().filter(|a| a.as_ref().unwrap()["status"] == "FAILURE").count();
    assert!(limited >= 1, "a burst of 10 on a bucket of 3 is limited");
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serving(&alice).await;
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let server = Server::start_with(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut alice = server.connect("alice", "phone").await;
    assert_eq!(alice.closed(WAIT).await, Some(1001));
}

#[tokio::test]
async fn a_connection_that_keeps_sending_is_not_idle() {
    let server = Server::start_with(|c| c.idle_timeout = Duration::from_millis(600)).await;
    let mut alice = server.connect("alice", "phone").await;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        still_serving(&alice).await;
    }
    assert!(alice.closed(Duration::from_millis(50)).await.is_none(), "1.2 s of activity kept it open");
    assert_eq!(alice.closed(WAIT).await, Some(1001), "and silence closes it");
}

#[tokio::test]
async fn a_connection_is_closed_at_its_lifetime_limit_even_when_busy() {
    let server = Server::start_with(|c| c.max_connection = Duration::from_millis(400)).await;
    let mut alice = server.connect("alice", "phone").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let code = loop {
        if let Some(code) = alice.closed(Duration::from_millis(50)).await {
            break Some(code);
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        let _ = alice.request("listChats", json!({})).await;
    };
    assert_eq!(code, Some(1001));
}
