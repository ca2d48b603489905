//! Quotas on what one user can make the server store: messages kept for
//! users who have never connected, and attachments. Past either, the
//! command is LIMIT_EXCEEDED naming the quota, and nothing is stored.

use courier_tests::{ErrorCode, Server, code};
use serde_json::json;

#[tokio::test]
async fn messages_to_users_who_never_connected_stop_at_the_daily_quota() {
    let server = Server::start_with(|c| {
        c.limits.max_pending_bytes_per_day = 4_000;
        c.rate_limit.capacity = 1000.0;
    })
    .await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    // Ten made-up users who will never connect, and bob, who is connected.
    let ghosts: Vec<String> = (0..10).map(|i| format!("ghost{i}")).collect();
    let mut members: Vec<&str> = ghosts.iter().map(String::as_str).collect();
    members.push("bob");
    let chat = alice.create_chat(&members, "to nobody").await.unwrap();
    let text = "x".repeat(200);

    let mut sent = 0;
    let refused = loop {
        match alice.send_message(&chat, &text).await {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "never refused");
    };
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded));
    assert!(refused.to_string().contains("quota"), "says which limit: {refused}");
    // ~300 bytes of JSON, kept for ten ghosts: 4,000 bytes allow one message.
    assert_eq!(sent, 1);
    let delivered = bob.sync_all().await.unwrap();
    assert_eq!(delivered.len(), sent, "the refused message reached nobody");
    while bob.next_message(courier_tests::QUIET).await.is_some() {}

    // Sending to devices that exist costs no quota.
    let direct = alice.create_chat(&["bob"], "direct").await.unwrap();
    for _ in 0..5 {
        alice.send_message(&direct, &text).await.expect("no quota for delivered messages");
    }
}

#[tokio::test]
async fn attachments_stop_at_the_daily_quota() {
    let server = Server::start_with(|c| c.limits.max_attachment_bytes_per_day = 10_000).await;
    let alice = server.connect("alice", "phone").await;
    let declare = |size: u64| {
        alice.call::<serde_json::Value>(
            "createAttachment",
            json!({ "contentType": "image/png", "size": size, "sha256": "a".repeat(64) }),
        )
    };
    declare(6_000).await.unwrap();
    let refused = declare(6_000).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded));
    assert!(refused.to_string().contains("quota"), "{refused}");
    declare(4_000).await.expect("what is left of the day's quota");
    assert_eq!(code(declare(1).await), ErrorCode::LimitExceeded);

    let bob = server.connect("bob", "phone").await;
    bob.call::<serde_json::Value>(
        "createAttachment",
        json!({ "contentType": "image/png", "size": 10_000, "sha256": "b".repeat(64) }),
    )
    .await
    .expect("each user has their own quota");
}
