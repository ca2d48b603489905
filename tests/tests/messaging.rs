//! Chats and messages end to end: send, push, sync, ack, devices.

use courier_tests::{ErrorCode, QUIET, Server, WAIT};

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
    let mine = alice_laptop
        .next_message(WAIT)
        .await
        .expect("the sender's other device gets it");
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
    assert_eq!(
        ids,
        vec![first.message_id.to_string(), second.message_id.to_string()]
    );

    // Unacked messages come back on the next sync; acked ones never again.
    assert_eq!(bob.sync_all().await.unwrap().len(), 2);
    assert_eq!(bob.ack(&[first.message_id.as_str()]).await.unwrap(), 1);
    assert_eq!(
        bob.ack(&[first.message_id.as_str()]).await.unwrap(),
        0,
        "acking twice is no error"
    );
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
    let err = mallory
        .send_message("01NOSUCHCHAT0000000000000", "hi")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let _ = QUIET;
}
