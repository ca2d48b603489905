//! Reading the inbox: sync's order, limits, cursor and page size, and ack.

use courier_core::ratelimit::RateLimit;
use courier_tests::client::{Client, Page};
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code};
use serde_json::{Value, json};

/// A chat from alice to bob, with `n` messages sent while bob's "phone" is
/// offline; returns bob's phone, alice and the messageIds in sending order.
async fn backlog(server: &Server, n: usize, text: &str) -> (Client, Client, Vec<String>) {
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    bob.close();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(alice.send_message(&chat, &format!("{text}{i}")).await.unwrap().message_id.to_string());
    }
    let bob = server.connect("bob", "phone").await;
    (bob, alice, ids)
}

fn ids(page: &Page) -> Vec<String> {
    page.messages.iter().map(|m| m.message_id.to_string()).collect()
}

async fn ack_page(client: &Client, page: &Page) {
    let ids = ids(page);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(client.ack(&refs).await.unwrap(), refs.len() as u64);
}

#[tokio::test]
async fn sync_returns_the_inbox_oldest_first() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 5, "m").await;
    let page = bob.sync(None, None).await.unwrap();
    assert_eq!(ids(&page), sent);
    assert_eq!(page.cursor, None, "the whole inbox fit in one page");
    let texts: Vec<&str> = page.messages.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(page.messages.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
}

#[tokio::test]
async fn nothing_of_the_backlog_is_pushed_on_connect() {
    let server = Server::start().await;
    let (mut bob, _alice, sent) = backlog(&server, 3, "m").await;
    assert!(bob.next_frame(QUIET).await.is_none(), "no frame arrives unasked");
    assert_eq!(ids(&bob.sync(None, None).await.unwrap()), sent);
}

#[tokio::test]
async fn an_empty_inbox_syncs_to_an_empty_page_and_a_null_cursor() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let frame = bob.request("sync", json!({})).await.unwrap();
    assert_eq!(frame["status"], "SUCCESS", "{frame}");
    assert_eq!(frame["data"], json!({ "messages": [], "cursor": null }));
}

#[tokio::test]
async fn sync_limit_is_1_to_100_and_defaults_to_50() {
    // 101 sends in a row would empty the default bucket.
    let server =
        Server::start_with(|c| c.rate_limit = RateLimit { capacity: 500.0, per_second: 100.0 }).await;
    let (bob, _alice, sent) = backlog(&server, 101, "m").await;
    assert_eq!(code(bob.sync(Some(0), None).await), ErrorCode::BadRequest);
    assert_eq!(code(bob.sync(Some(101), None).await), ErrorCode::LimitExceeded);
    for bad in [json!("5"), json!(-1), json!(2.5)] {
        let frame = bob.request("sync", json!({ "limit": bad })).await.unwrap();
        assert_eq!(frame["error"]["code"], "BAD_REQUEST", "limit {bad}: {frame}");
    }
    assert_eq!(ids(&bob.sync(Some(1), None).await.unwrap()), sent[..1]);
    let most = bob.sync(Some(100), None).await.unwrap();
    assert_eq!(ids(&most), sent[..100]);
    assert!(most.cursor.is_some());
    let default = bob.sync(None, None).await.unwrap();
    assert_eq!(ids(&default), sent[..50], "50 by default");
    assert!(default.cursor.is_some());
}

#[tokio::test]
async fn paging_with_the_cursor_after_acking_skips_nothing() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 7, "m").await;

    let first = bob.sync(Some(3), None).await.unwrap();
    assert_eq!(ids(&first), sent[0..3]);
    ack_page(&bob, &first).await;
    let cursor = first.cursor.expect("more to come");
    let second = bob.sync(Some(3), Some(&cursor)).await.unwrap();
    assert_eq!(ids(&second), sent[3..6], "acking the first page skipped nothing");
    ack_page(&bob, &second).await;
    let third = bob.sync(Some(3), second.cursor.as_deref()).await.unwrap();
    assert_eq!(ids(&third), sent[6..7]);
    assert_eq!(third.cursor, None, "the end");
    ack_page(&bob, &third).await;
    assert!(bob.sync(None, None).await.unwrap().messages.is_empty());
}

#[tokio::test]
async fn paging_without_acking_walks_the_inbox_once() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 4, "m").await;
    let first = bob.sync(Some(2), None).await.unwrap();
    assert_eq!(ids(&first), sent[0..2]);
    let second = bob.sync(Some(2), first.cursor.as_deref()).await.unwrap();
    assert_eq!(ids(&second), sent[2..4]);
    assert_eq!(second.cursor, None, "a page that reaches the end exactly has a null cursor");
    // A new pass without a cursor starts over with what is still un-acked.
    assert_eq!(ids(&bob.sync(Some(2), None).await.unwrap()), sent[0..2]);
}

#[tokio::test]
async fn messages_that_arrive_between_pages_are_not_skipped() {
    let server = Server::start().await;
    let (bob, alice, mut sent) = backlog(&server, 3, "m").await;
    let chat = alice.list_chats().await.unwrap().chats[0].chat_id.to_string();
    let first = bob.sync(Some(2), None).await.unwrap();
    assert_eq!(ids(&first), sent[0..2]);
    sent.push(alice.send_message(&chat, "late").await.unwrap().message_id.to_string());
    let second = bob.sync(Some(10), first.cursor.as_deref()).await.unwrap();
    assert_eq!(ids(&second), sent[2..4]);
    assert_eq!(second.cursor, None);
}

#[tokio::test]
async fn a_cursor_the_server_did_not_issue_is_bad_request() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 2, "m").await;
    let frame = bob.request("sync", json!({ "cursor": 5 })).await.unwrap();
    assert_eq!(frame["error"]["code"], "BAD_REQUEST", "{frame}");
    // A null cursor is no cursor (docs/protocol.md §10).
    let frame = bob.request("sync", json!({ "cursor": null })).await.unwrap();
    assert_eq!(frame["data"]["messages"].as_array().map(Vec::len), Some(2), "{frame}");
    // docs/protocol.md §4.7: a cursor "not a cursor this server issued" is BAD_REQUEST;
    // anything else would let a client take a bad cursor for the end of its inbox.
    assert_eq!(code(bob.sync(None, Some("not-a-cursor")).await), ErrorCode::BadRequest);
    assert_eq!(ids(&bob.sync(None, None).await.unwrap()), sent);
}

#[tokio::test]
async fn every_sync_response_stays_under_100_kib() {
    let server = Server::start().await;
    // Nearly 16 KiB each, half of it quotes that JSON escapes: the page size
    // must be measured as sent, not as text.
    let big = format!("{}{}", "\"".repeat(8000), "x".repeat(16 * 1024 - 8008));
    let (bob, _alice, sent) = backlog(&server, 12, &big).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut fields = json!({ "limit": 100 });
        if let Some(c) = &cursor {
            fields["cursor"] = json!(c);
        }
        let frame: Value = bob.request("sync", fields).await.unwrap();
        let size = serde_json::to_string(&frame).unwrap().len();
        assert!(size < 100 * 1024, "a sync response of {size} bytes");
        assert_eq!(frame["status"], "SUCCESS", "{frame}");
        let messages = frame["data"]["messages"].as_array().unwrap();
        assert!(!messages.is_empty(), "a page makes progress");
        seen.extend(messages.iter().map(|m| m["messageId"].as_str().unwrap().to_owned()));
        pages += 1;
        match frame["data"]["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, sent, "every message once, in order, across {pages} pages");
    assert!(pages >= 3, "12 messages of 24 KB of JSON cannot fit two pages");
}

#[tokio::test]
async fn ack_removes_messages_from_the_calling_devices_inbox_only() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob_phone = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let sent = alice.send_message(&chat, "hi").await.unwrap();
    bob_phone.next_message(WAIT).await.unwrap();

    assert_eq!(bob_phone.ack(&[sent.message_id.as_str()]).await.unwrap(), 1);
    assert!(bob_phone.sync_all().await.unwrap().is_empty());
    let laptop: Vec<_> = bob_laptop.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(laptop, vec![sent.message_id.clone()], "the other device keeps its copy");
    // Acking someone else's copy is impossible: alice's ack touches only her own inbox.
    assert_eq!(alice.ack(&[sent.message_id.as_str()]).await.unwrap(), 0);
    assert_eq!(bob_laptop.sync_all().await.unwrap().len(), 1);
    assert_eq!(bob_laptop.ack(&[sent.message_id.as_str()]).await.unwrap(), 1);
    assert!(bob_laptop.sync_all().await.unwrap().is_empty());
}

#[tokio::test]
async fn ack_counts_the_ids_that_were_in_the_inbox_and_ignores_the_rest() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 3, "m").await;
    let unknown = "01JGGMXMPW6CQ643DZVMXXQKFB";
    let acked = bob.ack(&[&sent[0], unknown, &sent[1], &sent[0]]).await.expect("unknown ids are no error");
    assert_eq!(acked, 2);
    assert_eq!(bob.ack(&[&sent[0], &sent[1]]).await.unwrap(), 0, "already acked");
    assert_eq!(bob.ack(&[unknown]).await.unwrap(), 0);
    let left: Vec<_> = bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(left, sent[2..]);
}

#[tokio::test]
async fn ack_of_a_single_message_id() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 2, "m").await;
    let frame = bob.request("ack", json!({ "messageId": sent[1] })).await.unwrap();
    assert_eq!(frame["data"], json!({ "acked": 1 }), "{frame}");
    let frame = bob.request("ack", json!({ "messageId": sent[1] })).await.unwrap();
    assert_eq!(frame["data"], json!({ "acked": 0 }), "{frame}");
    let left: Vec<_> = bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(left, sent[..1]);
}

#[tokio::test]
async fn ack_takes_1_to_100_ids() {
    let server = Server::start().await;
    let (bob, _alice, sent) = backlog(&server, 1, "m").await;
    let error = |frame: Value| frame["error"]["code"].as_str().map(str::to_owned);

    let none: Vec<&str> = Vec::new();
    assert_eq!(code(bob.ack(&none).await), ErrorCode::BadRequest, "no ids");
    assert_eq!(error(bob.request("ack", json!({})).await.unwrap()).as_deref(), Some("BAD_REQUEST"));
    let both = json!({ "messageIds": [sent[0]], "messageId": sent[0] });
    assert_eq!(error(bob.request("ack", both).await.unwrap()).as_deref(), Some("BAD_REQUEST"));
    let wrong = json!({ "messageIds": sent[0] });
    assert_eq!(error(bob.request("ack", wrong).await.unwrap()).as_deref(), Some("BAD_REQUEST"));

    let mut many: Vec<String> = (0..100).map(|i| format!("01JGGMXMPW6CQ643DZVMXX{i:04}")).collect();
    many[99] = sent[0].clone();
    let mut too_many: Vec<&str> = many.iter().map(String::as_str).collect();
    too_many.push("01JGGMXMPW6CQ643DZVMXXQKFB");
    assert_eq!(code(bob.ack(&too_many).await), ErrorCode::LimitExceeded, "101 ids");
    assert_eq!(bob.sync_all().await.unwrap().len(), 1, "a refused ack acks nothing");
    assert_eq!(bob.ack(&too_many[..100]).await.unwrap(), 1, "100 ids are allowed");
    assert!(bob.sync_all().await.unwrap().is_empty());
}
