//! Receipts and typing (protocol version 2): markRead, the delivered marker
//! moved by ack, private reads, getReceipts, and typing pushes.

mod v2;

use std::time::Duration;

use courier_tests::client::Client;
use courier_tests::{QUIET, Server, WAIT, next_of_type};
use serde_json::{Value, json};
use v2::{inbox, ok, refusal};

async fn mark_read(client: &Client, chat: &str, up_to: &str, private: bool) {
    let done = ok(client, "markRead", json!({ "chatId": chat, "upTo": up_to, "private": private })).await;
    assert_eq!(done, json!({}));
}

/// getReceipts as `client` sees it: each participant's `(delivered, read)`, by userId.
async fn receipts(client: &Client, chat: &str) -> Vec<(String, Value, Value)> {
    let data = ok(client, "getReceipts", json!({ "chatId": chat })).await;
    let mut list: Vec<(String, Value, Value)> = data["receipts"]
        .as_array()
        .unwrap_or_else(|| panic!("no receipts: {data}"))
        .iter()
        .map(|r| {
            (r["userId"].as_str().expect("userId").to_owned(), r["delivered"].clone(), r["read"].clone())
        })
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list
}

/// The `(delivered, read)` getReceipts shows `client` for `user`.
async fn markers_of(client: &Client, chat: &str, user: &str) -> (Value, Value) {
    let all = receipts(client, chat).await;
    let (_, delivered, read) =
        all.into_iter().find(|(u, _, _)| u == user).unwrap_or_else(|| panic!("no entry for {user}"));
    (delivered, read)
}

fn id(id: &str) -> Value {
    json!(id)
}

const NONE: Value = Value::Null;

/// Waits for the receipt push that shows `user`'s markers at `delivered` and
/// `read` (the server may coalesce moves, so earlier states are skipped).
async fn receipt_reaching(client: &mut Client, chat: &str, user: &str, delivered: &Value, read: &Value) {
    let expected =
        json!({ "type": "receipt", "chatId": chat, "userId": user, "delivered": delivered, "read": read });
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_of_type(client, "receipt", left).await {
            Some(frame) if frame == expected => return,
            Some(frame) => seen.push(frame),
            None => panic!("no receipt push {expected}; got {seen:?}"),
        }
    }
}

/// A chat of alice and `others`, and the ids of `n` messages alice sent to it.
async fn chat_with_messages(alice: &Client, others: &[&str], n: usize) -> (String, Vec<String>) {
    let chat = alice.create_chat(others, "c").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(alice.send_message(&chat, &format!("m{i}")).await.unwrap().message_id.to_string());
    }
    (chat, ids)
}

#[tokio::test]
async fn mark_read_moves_read_and_delivered_forward_only_and_everyone_sees_it() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let mut carol = server.connect("carol", "phone").await;
    let (chat, m) = chat_with_messages(&alice, &["bob", "carol"], 3).await;
    let nothing = |u: &str| (u.to_owned(), NONE, NONE);
    assert_eq!(receipts(&carol, &chat).await, vec![nothing("alice"), nothing("bob"), nothing("carol")]);

    mark_read(&bob, &chat, &m[1], false).await;
    for device in [&mut alice, &mut carol, &mut bob_laptop] {
        receipt_reaching(device, &chat, "bob", &id(&m[1]), &id(&m[1])).await;
    }
    assert_eq!(markers_of(&alice, &chat, "bob").await, (id(&m[1]), id(&m[1])));
    assert_eq!(markers_of(&bob, &chat, "bob").await, (id(&m[1]), id(&m[1])));

    mark_read(&bob, &chat, &m[0], false).await;
    assert_eq!(markers_of(&carol, &chat, "bob").await, (id(&m[1]), id(&m[1])), "an upTo behind is a no-op");
    mark_read(&bob, &chat, &m[2], false).await;
    receipt_reaching(&mut alice, &chat, "bob", &id(&m[2]), &id(&m[2])).await;
    assert_eq!(bob.ack(&[m[0].as_str(), m[1].as_str()]).await.unwrap(), 2);
    assert_eq!(markers_of(&carol, &chat, "bob").await, (id(&m[2]), id(&m[2])), "an ack behind is a no-op");
    assert_eq!(markers_of(&carol, &chat, "alice").await, (NONE, NONE), "only bob's markers moved");
}

#[tokio::test]
async fn an_ack_by_any_of_the_users_devices_moves_the_delivered_marker() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let (chat, m) = chat_with_messages(&alice, &["bob"], 3).await;

    assert_eq!(bob.ack(&[m[0].as_str()]).await.unwrap(), 1);
    receipt_reaching(&mut alice, &chat, "bob", &id(&m[0]), &NONE).await;
    receipt_reaching(&mut bob_laptop, &chat, "bob", &id(&m[0]), &NONE).await;
    assert_eq!(markers_of(&alice, &chat, "bob").await, (id(&m[0]), NONE));

    assert_eq!(bob_laptop.ack(&[m[2].as_str(), m[1].as_str()]).await.unwrap(), 2, "the laptop, newest first");
    receipt_reaching(&mut alice, &chat, "bob", &id(&m[2]), &NONE).await;
    assert_eq!(bob.ack(&[m[1].as_str()]).await.unwrap(), 1);
    assert_eq!(markers_of(&alice, &chat, "bob").await, (id(&m[2]), NONE), "delivered only moves forward");

    // markRead moves delivered only when it is behind.
    mark_read(&bob, &chat, &m[0], false).await;
    receipt_reaching(&mut alice, &chat, "bob", &id(&m[2]), &id(&m[0])).await;
    assert_eq!(markers_of(&alice, &chat, "bob").await, (id(&m[2]), id(&m[0])));
}

#[tokio::test]
async fn a_private_read_is_seen_by_the_readers_own_devices_only() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let (chat, m) = chat_with_messages(&alice, &["bob"], 2).await;

    mark_read(&bob, &chat, &m[1], true).await;
    receipt_reaching(&mut bob_laptop, &chat, "bob", &NONE, &id(&m[1])).await;
    assert!(next_of_type(&mut alice, "receipt", QUIET).await.is_none(), "alice is not told");
    assert_eq!(markers_of(&alice, &chat, "bob").await, (NONE, NONE), "others see no read");
    assert_eq!(markers_of(&bob_laptop, &chat, "bob").await, (NONE, id(&m[1])), "bob's own entry shows it");

    // A shared read behind the private one: others see it, bob still sees the further one.
    mark_read(&bob, &chat, &m[0], false).await;
    receipt_reaching(&mut alice, &chat, "bob", &id(&m[0]), &id(&m[0])).await;
    assert_eq!(markers_of(&alice, &chat, "bob").await, (id(&m[0]), id(&m[0])));
    assert_eq!(markers_of(&bob, &chat, "bob").await, (id(&m[0]), id(&m[1])));
}

#[tokio::test]
async fn up_to_must_be_a_message_id_that_is_not_in_the_future() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let (chat, m) = chat_with_messages(&alice, &["bob"], 1).await;
    let hour_ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    let ms = hour_ahead.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let future = courier_core::ids::IdGen::new().message(ms).to_string();

    for (what, up_to) in [
        ("not a ULID", json!("hello")),
        ("a ULID an hour from now", json!(future)),
        ("one character short", json!(&m[0][..25])),
        ("a number", json!(12)),
    ] {
        let fields = json!({ "chatId": chat, "upTo": up_to });
        assert_eq!(refusal(&alice, "markRead", fields).await, "BAD_REQUEST", "{what}");
    }
    assert_eq!(refusal(&alice, "markRead", json!({ "chatId": chat })).await, "BAD_REQUEST", "no upTo");
    assert_eq!(markers_of(&alice, &chat, "alice").await, (NONE, NONE), "nothing moved");
    mark_read(&alice, &chat, &m[0], false).await;
}

#[tokio::test]
async fn receipts_and_typing_are_for_participants_only() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let (chat, m) = chat_with_messages(&alice, &["bob", "carol"], 1).await;
    mark_read(&bob, &chat, &m[0], false).await;

    let chat_field = json!({ "chatId": chat });
    assert_eq!(refusal(&mallory, "getReceipts", chat_field.clone()).await, "FORBIDDEN");
    let read = json!({ "chatId": chat, "upTo": m[0] });
    assert_eq!(refusal(&mallory, "markRead", read.clone()).await, "FORBIDDEN");
    let typing = json!({ "chatId": chat, "state": "start" });
    assert_eq!(refusal(&mallory, "typing", typing.clone()).await, "FORBIDDEN");
    let nowhere = json!({ "chatId": "01NOSUCHCHAT0000000000000" });
    assert_eq!(refusal(&alice, "getReceipts", nowhere).await, "NOT_FOUND");

    // A participant who leaves is out of it, and out of the list.
    bob.modify(&chat, "bob", "REMOVE").await.expect("bob leaves");
    assert_eq!(refusal(&bob, "getReceipts", chat_field).await, "FORBIDDEN");
    assert_eq!(refusal(&bob, "markRead", read).await, "FORBIDDEN");
    assert_eq!(refusal(&bob, "typing", typing).await, "FORBIDDEN");
    let users: Vec<String> = receipts(&alice, &chat).await.into_iter().map(|(u, _, _)| u).collect();
    assert_eq!(users, ["alice", "carol"]);
}

#[tokio::test]
async fn typing_goes_to_the_other_participants_connected_devices_and_nowhere_else() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let mut dave = server.connect("dave", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    alice.create_chat(&["dave"], "another chat").await.unwrap();

    let done = ok(&alice, "typing", json!({ "chatId": chat, "state": "start" })).await;
    assert_eq!(done, json!({}));
    let expected =
        json!({ "type": "typing", "chatId": chat, "userId": "alice", "deviceId": "phone", "state": "start" });
    for device in [&mut bob, &mut bob_laptop] {
        assert_eq!(next_of_type(device, "typing", WAIT).await, Some(expected.clone()));
    }
    assert!(
        next_of_type(&mut alice_laptop, "typing", QUIET).await.is_none(),
        "not to the typist's own devices"
    );
    assert!(next_of_type(&mut dave, "typing", QUIET).await.is_none(), "not to other chats");

    // Nothing of it is stored: not in an inbox, not for a device that connects later.
    assert!(inbox(&bob).await.is_empty());
    let mut bob_tablet = server.connect("bob", "tablet").await;
    assert!(inbox(&bob_tablet).await.is_empty());
    assert!(next_of_type(&mut bob_tablet, "typing", QUIET).await.is_none());
    let bad = json!({ "chatId": chat, "state": "paused" });
    assert_eq!(refusal(&alice, "typing", bad).await, "BAD_REQUEST");
}

#[tokio::test]
async fn typing_more_often_than_the_interval_is_answered_and_dropped() {
    // A minute here, so that the burst surely falls within one interval.
    let server = Server::start_with(|c| c.limits.typing_interval_ms = 60_000).await;
    let alice = server.connect("alice", "phone").await;
    let alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let other = alice.create_chat(&["bob"], "d").await.unwrap();

    for state in ["start", "stop", "start", "stop", "start"] {
        let done = ok(&alice, "typing", json!({ "chatId": chat, "state": state })).await;
        assert_eq!(done, json!({}), "every frame is answered SUCCESS");
    }
    // Another device, or another chat, is another stream.
    ok(&alice_laptop, "typing", json!({ "chatId": chat, "state": "start" })).await;
    ok(&alice, "typing", json!({ "chatId": other, "state": "start" })).await;

    let mut pushed = Vec::new();
    while let Some(frame) = bob.next_frame(QUIET).await {
        if frame["type"] == "typing" {
            pushed.push((frame["chatId"].clone(), frame["deviceId"].clone(), frame["state"].clone()));
        }
    }
    pushed.sort_by_key(|p| format!("{p:?}"));
    let mut expected = vec![
        (json!(chat), json!("phone"), json!("start")),
        (json!(chat), json!("laptop"), json!("start")),
        (json!(other), json!("phone"), json!("start")),
    ];
    expected.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(pushed, expected, "one push per device and chat: the first");
}

#[tokio::test]
async fn typing_is_pushed_again_a_second_later() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();

    ok(&alice, "typing", json!({ "chatId": chat, "state": "start" })).await;
    assert_eq!(next_of_type(&mut bob, "typing", WAIT).await.expect("start")["state"], "start");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ok(&alice, "typing", json!({ "chatId": chat, "state": "stop" })).await;
    assert_eq!(next_of_type(&mut bob, "typing", WAIT).await.expect("stop, a second on")["state"], "stop");
}
