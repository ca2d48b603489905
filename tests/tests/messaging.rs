//! Chats and messages end to end: send, push, sync, ack, devices.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_tests::client::Client;
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code, next_of_type};
use serde_json::json;

#[tokio::test]
async fn a_message_reaches_an_online_recipient_and_the_senders_other_device() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;

    let chat = alice.create_chat(&["bob"], "lunch").await.unwrap();
    let sent = alice.send_message(&chat, "noon?").await.unwrap();

    let got = bob.next_message(WAIT).await.expect("bob gets a push");
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.message, "noon?");
    assert_eq!(got.user_id.as_str(), "alice");
    assert_eq!(got.device_id.as_str(), "phone");
    assert_eq!(got.timestamp, sent.timestamp);
    let mine = alice_laptop.next_message(WAIT).await.expect("the sender's other device gets it");
    assert_eq!(mine.message_id, sent.message_id);
}

#[tokio::test]
async fn an_offline_device_gets_its_messages_on_sync_and_ack_removes_them() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    bob.close();
    drop(bob);

    let first = alice.send_message(&chat, "one").await.unwrap();
    let second = alice.send_message(&chat, "two").await.unwrap();

    let bob = server.connect("bob", "phone").await;
    let inbox = bob.sync_all().await.unwrap();
    let ids: Vec<_> = inbox.iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(ids, vec![first.message_id.to_string(), second.message_id.to_string()]);

    // Unacked messages come back on the next sync; acked ones never again.
    assert_eq!(bob.sync_all().await.unwrap().len(), 2);
    assert_eq!(bob.ack(&[first.message_id.as_str()]).await.unwrap(), 1);
    assert_eq!(bob.ack(&[first.message_id.as_str()]).await.unwrap(), 0, "acking twice is no error");
    let left = bob.sync_all().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, second.message_id);
}

#[tokio::test]
async fn non_participants_are_refused() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let err = mallory.send_message(&chat, "hi").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let err = mallory.send_message("01NOSUCHCHAT0000000000000", "hi").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let _ = QUIET;
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn inbox_ids(client: &Client) -> Vec<String> {
    client.sync_all().await.expect("sync").into_iter().map(|m| m.message_id.to_string()).collect()
}

#[tokio::test]
async fn a_sent_message_gets_a_ulid_and_the_servers_timestamp_and_is_pushed_whole() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();

    let before = now_ms();
    let first = alice.send_message(&chat, "one").await.unwrap();
    let second = alice.send_message(&chat, "two").await.unwrap();
    let after = now_ms();
    assert_eq!(first.message_id.as_str().len(), 26, "a ULID");
    assert!(first.message_id < second.message_id, "messageIds sort by server time");
    for sent in [&first, &second] {
        assert!((before..=after).contains(&sent.timestamp), "{} not in {before}..={after}", sent.timestamp);
    }

    let push = next_of_type(&mut bob, "newMessage", WAIT).await.expect("a push");
    let mut keys: Vec<&str> = push.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["attachments", "chatId", "deviceId", "message", "messageId", "timestamp", "type", "userId"],
        "{push}"
    );
    assert_eq!(
        push,
        json!({
            "type": "newMessage", "messageId": first.message_id.as_str(), "chatId": chat, "userId": "alice",
            "deviceId": "phone", "message": "one", "attachments": [], "timestamp": first.timestamp,
        })
    );
}

#[tokio::test]
async fn send_message_checks_its_fields() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    for fields in [
        json!({ "message": "no chat" }),
        json!({ "chatId": chat }),
        json!({ "chatId": 5, "message": "x" }),
        json!({ "chatId": chat, "message": 5 }),
        json!({ "chatId": chat, "message": "x", "attachments": "a" }),
        json!({ "chatId": chat, "message": "x", "clientMessageId": 7 }),
    ] {
        assert_eq!(code(alice.send_message_with(fields.clone()).await), ErrorCode::BadRequest, "{fields}");
    }
    let bob = server.connect("bob", "phone").await;
    assert!(bob.sync_all().await.unwrap().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_message_is_at_most_16_kib_of_utf8() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();

    let largest = "x".repeat(16 * 1024);
    let sent = alice.send_message(&chat, &largest).await.expect("16384 bytes are allowed");
    let got = bob.next_message(WAIT).await.expect("the push");
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.message, largest, "delivered intact");
    let over = "x".repeat(16 * 1024 + 1);
    assert_eq!(code(alice.send_message(&chat, &over).await), ErrorCode::LimitExceeded);

    // Bytes of UTF-8, not characters: 4096 four-byte characters are the limit.
    let emoji = "\u{1F600}".repeat(4096);
    assert_eq!(emoji.len(), 16 * 1024);
    alice.send_message(&chat, &emoji).await.expect("16384 bytes in 4096 characters");
    let over = format!("{emoji}a");
    assert_eq!(code(alice.send_message(&chat, &over).await), ErrorCode::LimitExceeded);
    let short_but_wide = "\u{e9}".repeat(8193);
    assert_eq!(
        code(alice.send_message(&chat, &short_but_wide).await),
        ErrorCode::LimitExceeded,
        "8193 chars, 16386 bytes"
    );

    let inbox = bob.sync_all().await.unwrap();
    assert_eq!(inbox.len(), 2, "only the two allowed messages were stored");
    assert_eq!(inbox[1].message, emoji);
}

#[tokio::test]
async fn an_empty_message_is_allowed() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let sent = alice.send_message(&chat, "").await.expect("an empty message");
    let got = bob.next_message(WAIT).await.unwrap();
    assert_eq!((got.message_id, got.message.as_str()), (sent.message_id, ""));
}

#[tokio::test]
async fn a_retry_with_the_same_client_message_id_is_delivered_once() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let bob_tablet = server.connect("bob", "tablet").await;
    bob_tablet.close();
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();

    let send = json!({ "chatId": chat, "message": "once", "clientMessageId": "c-7f3a" });
    let first = alice.send_message_with(send.clone()).await.unwrap();
    let got = bob.next_message(WAIT).await.expect("the first push");
    assert_eq!(got.message_id, first.message_id);
    for _ in 0..3 {
        let retry = alice.send_message_with(send.clone()).await.expect("a retry succeeds");
        assert_eq!(retry.message_id, first.message_id, "the same messageId");
        assert_eq!(retry.timestamp, first.timestamp, "and the same timestamp");
    }
    // Even a retry with other text is the same message: the key decides.
    let changed = json!({ "chatId": chat, "message": "twice?", "clientMessageId": "c-7f3a" });
    assert_eq!(alice.send_message_with(changed).await.unwrap().message_id, first.message_id);

    assert!(bob.next_message(QUIET).await.is_none(), "no second push");
    assert_eq!(inbox_ids(&bob).await, vec![first.message_id.to_string()], "one copy in sync");
    let tablet = server.connect("bob", "tablet").await;
    assert_eq!(inbox_ids(&tablet).await, vec![first.message_id.to_string()], "one copy offline");
    assert_eq!(alice_laptop.next_message(WAIT).await.unwrap().message_id, first.message_id);
    assert!(alice_laptop.next_message(QUIET).await.is_none());
    assert_eq!(inbox_ids(&alice_laptop).await, vec![first.message_id.to_string()]);
}

#[tokio::test]
async fn the_same_client_message_id_from_another_device_is_another_message() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let alice_laptop = server.connect("alice", "laptop").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let send = json!({ "chatId": chat, "message": "hi", "clientMessageId": "same-key" });
    let from_phone = alice.send_message_with(send.clone()).await.unwrap();
    let from_laptop = alice_laptop.send_message_with(send.clone()).await.unwrap();
    assert_ne!(from_phone.message_id, from_laptop.message_id);
    let from_bob = bob.send_message_with(send).await.unwrap();
    assert_ne!(from_bob.message_id, from_phone.message_id, "nor is another user's");
    assert_eq!(
        inbox_ids(&bob).await,
        vec![from_phone.message_id.to_string(), from_laptop.message_id.to_string()]
    );
}

#[tokio::test]
async fn a_client_message_id_is_at_most_64_characters() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let ok = json!({ "chatId": chat, "message": "m", "clientMessageId": "k".repeat(64) });
    alice.send_message_with(ok).await.expect("64 characters");
    // Past a maximum is LIMIT_EXCEEDED (docs/protocol.md §4.2).
    let long = json!({ "chatId": chat, "message": "m", "clientMessageId": "k".repeat(65) });
    assert_eq!(code(alice.send_message_with(long).await), ErrorCode::LimitExceeded);
}

#[tokio::test]
async fn every_device_of_every_participant_but_the_sending_one_receives_it() {
    let server = Server::start().await;
    let mut alice_phone = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let alice_tablet = server.connect("alice", "tablet").await;
    let mut bob_phone = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let mut carol = server.connect("carol", "phone").await;
    alice_tablet.close();
    let chat = alice_phone.create_chat(&["bob", "carol"], "c").await.unwrap();

    let sent = alice_phone.send_message(&chat, "to all").await.unwrap();
    for (who, device) in [
        ("alice/laptop", &mut alice_laptop),
        ("bob/phone", &mut bob_phone),
        ("bob/laptop", &mut bob_laptop),
        ("carol/phone", &mut carol),
    ] {
        let got = device.next_message(WAIT).await.unwrap_or_else(|| panic!("{who} got no push"));
        assert_eq!(got.message_id, sent.message_id, "{who}");
        assert_eq!(inbox_ids(device).await, vec![sent.message_id.to_string()], "{who}'s inbox");
    }
    let alice_tablet = server.connect("alice", "tablet").await;
    assert_eq!(inbox_ids(&alice_tablet).await, vec![sent.message_id.to_string()], "the offline device");
    assert!(alice_phone.next_message(QUIET).await.is_none(), "the sending device gets no push");
    assert!(inbox_ids(&alice_phone).await.is_empty(), "nor a copy in its inbox");
}

#[tokio::test]
async fn a_user_without_a_device_gets_everything_on_their_first_device() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        sent.push(alice.send_message(&chat, text).await.unwrap().message_id.to_string());
    }

    let bob_phone = server.connect("bob", "phone").await;
    assert_eq!(inbox_ids(&bob_phone).await, sent, "the first device gets the backlog, in order");
    let mut bob_laptop = server.connect("bob", "laptop").await;
    assert!(inbox_ids(&bob_laptop).await.is_empty(), "a later device starts empty");

    let next = alice.send_message(&chat, "four").await.unwrap();
    assert_eq!(bob_laptop.next_message(WAIT).await.unwrap().message_id, next.message_id);
    assert_eq!(inbox_ids(&bob_laptop).await, vec![next.message_id.to_string()]);
    sent.push(next.message_id.to_string());
    assert_eq!(inbox_ids(&bob_phone).await, sent);
}

#[tokio::test]
async fn a_device_added_later_starts_with_an_empty_inbox() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob_phone = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let old = alice.send_message(&chat, "before the laptop").await.unwrap();

    let mut bob_laptop = server.connect("bob", "laptop").await;
    assert!(inbox_ids(&bob_laptop).await.is_empty());
    assert!(bob_laptop.next_message(QUIET).await.is_none());
    let new = alice.send_message(&chat, "after").await.unwrap();
    assert_eq!(inbox_ids(&bob_laptop).await, vec![new.message_id.to_string()]);
    assert_eq!(inbox_ids(&bob_phone).await, vec![old.message_id.to_string(), new.message_id.to_string()]);
}

#[tokio::test]
async fn a_pushed_message_stays_in_the_inbox_until_acked() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let sent = alice.send_message(&chat, "hi").await.unwrap();
    assert_eq!(bob.next_message(WAIT).await.unwrap().message_id, sent.message_id);
    assert_eq!(inbox_ids(&bob).await, vec![sent.message_id.to_string()], "a push is not an ack");
    drop(bob);
    let bob = server.connect("bob", "phone").await;
    assert_eq!(inbox_ids(&bob).await, vec![sent.message_id.to_string()], "still there after a reconnect");
    assert_eq!(bob.ack(&[sent.message_id.as_str()]).await.unwrap(), 1);
    drop(bob);
    let bob = server.connect("bob", "phone").await;
    assert!(inbox_ids(&bob).await.is_empty(), "never again after the ack");
}

#[tokio::test]
async fn concurrent_sends_with_one_client_message_id_make_one_message() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let send = json!({ "chatId": chat, "message": "racy", "clientMessageId": "k-1" });
    let tries = (0..8).map(|_| alice.send_message_with(send.clone()));
    let answers = futures_util::future::join_all(tries).await;
    let first = answers[0].as_ref().unwrap().message_id.clone();
    for answer in &answers {
        assert_eq!(answer.as_ref().expect("every try succeeds").message_id, first);
    }
    assert_eq!(bob.next_message(WAIT).await.unwrap().message_id, first);
    assert!(bob.next_message(QUIET).await.is_none(), "one push");
    assert_eq!(inbox_ids(&bob).await, vec![first.to_string()], "one copy");
}

#[tokio::test]
async fn a_message_to_a_full_chat_reaches_every_connected_device_once() {
    // 99 recipients online: more than a send pushes inline, so delivery jobs carry it.
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let users: Vec<String> = (0..99).map(|i| format!("member{i:02}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let chat = alice.create_chat(&refs, "everyone").await.unwrap();
    let mut members = Vec::new();
    for user in &users {
        members.push(server.connect(user, "phone").await);
    }

    let sent = alice.send_message(&chat, "hello all").await.unwrap();
    for (user, member) in users.iter().zip(members.iter_mut()) {
        let got = member.next_message(WAIT).await.unwrap_or_else(|| panic!("{user} got no push"));
        assert_eq!(got.message_id, sent.message_id, "{user}");
    }
    for (user, member) in users.iter().zip(members.iter_mut()) {
        assert!(member.next_message(Duration::ZERO).await.is_none(), "{user} got it twice");
    }
}
