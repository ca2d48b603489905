//! The attack suite: what a hostile client tries, and what it must get.
//!
//! Each test plays an attacker against a running server (on either backend)
//! and then looks at the victim's side, as the victim would: the chat's
//! participants and admins, the inbox, the open connection, the bytes of an
//! attachment. A refusal is not enough; nothing may have changed.
//!
//! Covered elsewhere and only cross-checked here: the slow-reader limits
//! (hardening.rs: byte cap, stall deadline, header timeout, pending cap) and
//! the management API's signatures (management.rs). docs/security.md lists
//! what each layer checks and counts the checks of this file.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use courier_core::ratelimit::RateLimit;
use courier_tests::client::{Client, ConnectError};
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code, http, put_upload, sha256_hex, upload, with_param};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Put into every value an attacker sends, so that an echo of it shows.
const CANARY: &str = "Zq9Canary";
/// Server frames stay under this (API Gateway's limit on a message).
const MAX_SERVER_FRAME: usize = 128_000;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Percent-encodes everything but the unreserved characters, for a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The status of a WebSocket upgrade of `/?{query}` with extra `headers`.
async fn upgrade(server: &Server, query: &str, headers: &[(&str, &str)]) -> u16 {
    let mut all = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    all.extend_from_slice(headers);
    let url = format!("{}/?{query}", server.http);
    http::request("GET", &url, &all, b"").await.expect("upgrade request").status
}

/// The status of connecting as `device` with `token` in the query.
async fn connect_status(server: &Server, token: &str, device: &str) -> u16 {
    upgrade(server, &format!("token={}&deviceId={device}", encode(token)), &[]).await
}

// ---------------------------------------------------------------- tokens

/// A JWT with exactly this header and these claims, signed with HMAC-SHA256
/// under `secret` whatever the header says (or unsigned with `None`).
fn forge(header: &Value, claims: &Value, secret: Option<&str>) -> String {
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let signature = match secret {
        Some(secret) => {
            let key = EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key");
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).expect("sign")
        }
        None => String::new(),
    };
    format!("{input}.{signature}")
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("sign")
}

/// Every way a token can be wrong, each on a device of its own, each
/// refused with 401 and nothing upgraded; and the refusals take none of the
/// user's three device slots.
#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_nothing_is_upgraded() {
    let server = Server::start().await;
    let secret = server.config.jwt_secret.clone();
    let hs256 = json!({ "alg": "HS256", "typ": "JWT" });
    let t = now();
    let good = json!({ "sub": "alice", "iat": t, "exp": t + 600 });
    let with = |field: &str, value: Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let without = |field: &str| {
        let mut claims = good.clone();
        claims.as_object_mut().unwrap().remove(field);
        claims
    };
    let valid = forge(&hs256, &good, Some(&secret));
    // The forger is sound: its token for the same claims is accepted.
    assert_eq!(connect_status(&server, &valid, "control").await, 101, "a well-made token");
    let (head, rest) = valid.split_once('.').unwrap();
    let (claims, signature) = rest.split_once('.').unwrap();
    // The first character: all six of its bits are the signature's (the last one's are partly padding).
    let other = if signature.starts_with('A') { "B" } else { "A" };
    let flipped = format!("{head}.{claims}.{other}{}", &signature[1..]);
    let mallory = B64.encode(json!({ "sub": "mallory", "iat": t, "exp": t + 600 }).to_string());

    let cases: Vec<(&str, String)> = vec![
        ("alg none, no signature", forge(&json!({ "alg": "none", "typ": "JWT" }), &good, None)),
        ("alg None", forge(&json!({ "alg": "None" }), &good, None)),
        ("alg NONE with a signature", forge(&json!({ "alg": "NONE" }), &good, Some(&secret))),
        ("no alg", forge(&json!({ "typ": "JWT" }), &good, Some(&secret))),
        ("HS512 with the secret", sign(Algorithm::HS512, &secret, &good)),
        ("HS384 with the secret", sign(Algorithm::HS384, &secret, &good)),
        ("RS256 header, HMAC with the secret", forge(&json!({ "alg": "RS256" }), &good, Some(&secret))),
        ("ES256 header, HMAC with the secret", forge(&json!({ "alg": "ES256" }), &good, Some(&secret))),
        ("bad signature", flipped),
        ("alice's signature on mallory's claims", format!("{head}.{mallory}.{signature}")),
        ("signature stripped", format!("{head}.{claims}.")),
        ("a token for another secret", forge(&hs256, &good, Some("another-secret"))),
        ("expired", forge(&hs256, &with("exp", json!(t - 60)), Some(&secret))),
        ("expired a second ago", forge(&hs256, &json!({ "sub": "alice", "exp": t - 1 }), Some(&secret))),
        ("not yet valid (nbf)", forge(&hs256, &with("nbf", json!(t + 60)), Some(&secret))),
        ("nbf not a number", forge(&hs256, &with("nbf", json!("soon")), Some(&secret))),
        ("valid for a day and a second", forge(&hs256, &with("exp", json!(t + 86_401)), Some(&secret))),
        ("30 days, no iat", forge(&hs256, &json!({ "sub": "alice", "exp": t + 30 * 86_400 }), Some(&secret))),
        (
            "iat in the past stretches it past a day",
            forge(&hs256, &json!({ "sub": "alice", "iat": t - 1000, "exp": t + 86_000 }), Some(&secret)),
        ),
        (
            "iat in the future hides a long life",
            forge(
                &hs256,
                &json!({ "sub": "alice", "iat": t + 86_400, "exp": t + 2 * 86_400 }),
                Some(&secret),
            ),
        ),
        ("missing sub", forge(&hs256, &without("sub"), Some(&secret))),
        ("empty sub", forge(&hs256, &with("sub", json!("")), Some(&secret))),
        ("sub with a space", forge(&hs256, &with("sub", json!("alice smith")), Some(&secret))),
        ("sub with the inbox separator", forge(&hs256, &with("sub", json!("alice#phone")), Some(&secret))),
        ("sub with a path", forge(&hs256, &with("sub", json!("../alice")), Some(&secret))),
        ("sub with a NUL", forge(&hs256, &with("sub", json!("alice\u{0}")), Some(&secret))),
        ("sub of 65 characters", forge(&hs256, &with("sub", json!("a".repeat(65))), Some(&secret))),
        ("sub a number", forge(&hs256, &with("sub", json!(42)), Some(&secret))),
        ("sub a list", forge(&hs256, &with("sub", json!(["alice"])), Some(&secret))),
        ("missing exp", forge(&hs256, &without("exp"), Some(&secret))),
        ("exp a string", forge(&hs256, &with("exp", json!((t + 600).to_string())), Some(&secret))),
        ("exp null", forge(&hs256, &with("exp", Value::Null), Some(&secret))),
        ("iat a string", forge(&hs256, &with("iat", json!("now")), Some(&secret))),
        ("claims not JSON", format!("{head}.{}.{signature}", B64.encode("{"))),
        ("garbage", "garbage".to_owned()),
        ("three empty parts", "..".to_owned()),
        ("a.b.c", "a.b.c".to_owned()),
        ("four parts", format!("{valid}.{signature}")),
        ("16 KiB of nothing", "a".repeat(16 * 1024)),
        ("spaces and quotes", format!("\" {valid} \"")),
    ];
    let mut accepted = Vec::new();
    for (i, (what, token)) in cases.iter().enumerate() {
        let status = connect_status(&server, token, &format!("d{i}")).await;
        if status != 401 {
            accepted.push(format!("{what}: HTTP {status}"));
        }
    }
    // A valid token anywhere but the query is no token at all.
    let bearer = format!("Bearer {valid}");
    let cookie = format!("token={valid}");
    for (what, header) in [
        ("in Authorization", ("Authorization", bearer.as_str())),
        ("in Sec-WebSocket-Protocol", ("Sec-WebSocket-Protocol", valid.as_str())),
        ("in a cookie", ("Cookie", cookie.as_str())),
    ] {
        let status = upgrade(&server, "deviceId=header", &[header]).await;
        if status != 401 {
            accepted.push(format!("a valid token {what}: HTTP {status}"));
        }
    }
    assert!(accepted.is_empty(), "tokens not refused with 401:\n{}", accepted.join("\n"));
    assert_eq!(server.connections().len(), 0, "a refused token left a connection");

    // No refusal took a device slot: alice still has her three.
    let _devices = [
        server.connect("alice", "one").await,
        server.connect("alice", "two").await,
        server.connect("alice", "control").await,
    ];
    assert!(matches!(server.try_connect("alice", "four").await, Err(ConnectError::Refused(403))));
}

// ------------------------------------------------------- the chat as victims see it

/// What the victims of an attack on one chat can see of it: the chat as
/// its admin lists it, and each victim device's inbox.
#[derive(Debug, PartialEq)]
struct Seen {
    chat: Option<Value>,
    inboxes: Vec<Vec<String>>,
}

async fn seen(admin: &Client, chat: &str, inboxes: &[&Client]) -> Seen {
    let chats = admin.call::<Value>("listChats", json!({ "limit": 100 })).await.expect("listChats");
    let chat = chats["chats"].as_array().unwrap().iter().find(|c| c["chatId"] == chat).cloned();
    let mut all = Vec::new();
    for client in inboxes {
        let messages = client.sync_all().await.expect("sync");
        all.push(
            messages.into_iter().map(|m| format!("{}:{}:{}", m.message_id, m.user_id, m.message)).collect(),
        );
    }
    Seen { chat, inboxes: all }
}

fn chats_of(list: &Value) -> Vec<String> {
    list["chats"].as_array().unwrap().iter().map(|c| c["chatId"].as_str().unwrap().to_owned()).collect()
}

/// alice (admin) and bob share a chat holding two messages and an
/// attachment; mallory shares nothing with them. Every command mallory can
/// aim at that chat, its messages or its attachment is refused, and
/// alice and bob see nothing change.
#[tokio::test]
async fn a_stranger_can_do_nothing_to_a_chat_she_is_not_in() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let chat = alice.create_chat(&["bob"], "private").await.unwrap();
    let shared = upload(&alice, "image/png", b"the picture").await;
    alice
        .send_message_with(json!({ "chatId": chat, "message": "one", "attachments": [shared] }))
        .await
        .unwrap();
    alice.send_message(&chat, "two").await.unwrap();
    let before = seen(&alice, &chat, &[&bob]).await;
    let ids: Vec<String> =
        bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    while bob.next_frame(QUIET).await.is_some() {}

    let send = json!({ "chatId": chat, "message": "let me in" });
    assert_eq!(code(mallory.send_message_with(send).await), ErrorCode::Forbidden, "sendMessage");
    for (user, op) in
        [("mallory", "ADD"), ("carol", "ADD"), ("bob", "REMOVE"), ("alice", "REMOVE"), ("mallory", "REMOVE")]
    {
        assert_eq!(code(mallory.modify(&chat, user, op).await), ErrorCode::Forbidden, "{op} {user}");
    }
    assert_eq!(code(mallory.get_attachment(&shared).await), ErrorCode::Forbidden, "getAttachment");
    let fwd = json!({ "chatId": chat, "message": "x", "attachments": [shared] });
    assert_eq!(code(mallory.send_message_with(fwd).await), ErrorCode::Forbidden, "sendMessage with it");
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(mallory.ack(&id_refs).await.unwrap(), 0, "ack of bob's messages acks none");
    assert!(mallory.sync_all().await.unwrap().is_empty(), "sync shows none of the chat");
    // A cursor is a position in the caller's own inbox, never a way into another's.
    let page = mallory.sync(Some(100), Some(&ids[0])).await.unwrap();
    assert!(page.messages.is_empty(), "a cursor taken from bob's inbox");
    let listed = mallory.call::<Value>("listChats", json!({})).await.unwrap();
    assert!(!chats_of(&listed).contains(&chat), "listChats: {listed}");
    let from_before = "00000000000000000000000000";
    let listed = mallory.call::<Value>("listChats", json!({ "cursor": from_before })).await.unwrap();
    assert!(!chats_of(&listed).contains(&chat), "listChats from a cursor: {listed}");
    // Fields a command does not take are ignored, not obeyed.
    let created: Value = mallory
        .call(
            "createChat",
            json!({ "chatId": chat, "participants": ["carol"], "name": "mine", "admins": ["mallory", "alice"] }),
        )
        .await
        .unwrap();
    assert_ne!(created["chatId"], chat.as_str(), "createChat took the client's chatId");
    let unknown = "01JGGMXKBVV37E3S3E28JT97KB";
    assert_eq!(
        code(mallory.send_message(unknown, "x").await),
        ErrorCode::NotFound,
        "a chat that does not exist"
    );
    assert_eq!(code(mallory.modify(unknown, "mallory", "ADD").await), ErrorCode::NotFound);

    assert!(bob.next_frame(QUIET).await.is_none(), "nothing reached bob");
    assert_eq!(seen(&alice, &chat, &[&bob]).await, before, "the chat or bob's inbox changed");
    bob.get_attachment(&shared).await.expect("bob still gets the attachment");
}

/// carol was in the chat and was removed: from then on she sends nothing
/// to it, manages nothing in it, fetches none of its attachments and gets
/// nothing sent to it; and an admin who left is no admin.
#[tokio::test]
async fn a_removed_member_keeps_no_right_in_the_chat() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "team").await.unwrap();
    let shared = upload(&alice, "text/plain", b"shared while carol was in").await;
    alice
        .send_message_with(json!({ "chatId": chat, "message": "file", "attachments": [shared] }))
        .await
        .unwrap();
    let keyed = json!({ "chatId": chat, "message": "hi", "clientMessageId": "k1" });
    let first = carol.send_message_with(keyed.clone()).await.unwrap();
    carol.get_attachment(&shared).await.expect("carol may, while a member");
    alice.modify(&chat, "carol", "REMOVE").await.unwrap();
    while carol.next_frame(QUIET).await.is_some() {}
    let carols_inbox = carol.sync_all().await.unwrap().len();
    let before = seen(&alice, &chat, &[&bob]).await;

    assert_eq!(code(carol.send_message(&chat, "still here?").await), ErrorCode::Forbidden, "sendMessage");
    // Not even as a retry of what she sent while a member.
    let retry = carol.send_message_with(keyed).await;
    assert_eq!(
        code(retry),
        ErrorCode::Forbidden,
        "a retry of message {} after the removal",
        first.message_id
    );
    assert_eq!(code(carol.modify(&chat, "carol", "ADD").await), ErrorCode::Forbidden, "ADD herself");
    assert_eq!(code(carol.modify(&chat, "bob", "REMOVE").await), ErrorCode::Forbidden, "REMOVE bob");
    assert_eq!(code(carol.get_attachment(&shared).await), ErrorCode::Forbidden, "an attachment of the chat");
    let listed = carol.call::<Value>("listChats", json!({})).await.unwrap();
    assert!(!chats_of(&listed).contains(&chat), "the chat is still listed: {listed}");
    assert_eq!(seen(&alice, &chat, &[&bob]).await, before, "carol changed the chat or bob's inbox");

    alice.send_message(&chat, "after carol left").await.unwrap();
    assert!(carol.next_message(QUIET).await.is_none(), "pushed to a removed member");
    assert_eq!(carol.sync_all().await.unwrap().len(), carols_inbox, "synced to a removed member");

    // alice leaves: bob inherits the chat, and alice holds no admin right.
    alice.modify(&chat, "alice", "REMOVE").await.unwrap();
    let before = seen(&bob, &chat, &[]).await;
    assert_eq!(before.chat.as_ref().unwrap()["admins"], json!(["bob"]));
    assert_eq!(code(alice.modify(&chat, "alice", "ADD").await), ErrorCode::Forbidden, "a former admin");
    assert_eq!(code(alice.modify(&chat, "bob", "REMOVE").await), ErrorCode::Forbidden, "a former admin");
    assert_eq!(seen(&bob, &chat, &[]).await, before);
}

/// bob is a participant but not an admin: he may leave, and nothing else.
#[tokio::test]
async fn a_member_who_is_not_an_admin_adds_and_removes_no_one() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let dave = server.connect("dave", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "team").await.unwrap();
    while carol.next_frame(QUIET).await.is_some() {}
    let before = seen(&alice, &chat, &[&carol]).await;

    for (user, op) in [("dave", "ADD"), ("alice", "REMOVE"), ("carol", "REMOVE")] {
        assert_eq!(code(bob.modify(&chat, user, op).await), ErrorCode::Forbidden, "{op} {user}");
    }
    // An operation other than ADD and REMOVE is no way around the check.
    for op in ["add", "PROMOTE", "REMOVE "] {
        let frame = json!({ "chatId": chat, "userId": "carol", "operation": op });
        let answer = bob.request("modifyChatParticipants", frame).await.unwrap();
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{op}: {answer}");
    }
    assert!(carol.next_frame(QUIET).await.is_none(), "carol heard of a change");
    assert_eq!(seen(&alice, &chat, &[&carol]).await, before);
    assert!(chats_of(&dave.call::<Value>("listChats", json!({})).await.unwrap()).is_empty());

    // The one thing he may do, as a control: leave.
    assert_eq!(bob.modify(&chat, "bob", "REMOVE").await.unwrap(), ["alice", "carol"]);
}

/// A sender cannot speak as someone else, nor choose the ids and times the
/// server stamps: the message reaches bob as mallory's, from her device, now.
#[tokio::test]
async fn a_message_carries_the_senders_identity_whatever_the_frame_claims() {
    let server = Server::start().await;
    let mallory = server.connect("mallory", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = mallory.create_chat(&["bob", "alice"], "c").await.unwrap();
    let before = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    let forged = json!({
        "chatId": chat, "message": "from alice, honest", "userId": "alice", "deviceId": "laptop",
        "timestamp": 0, "messageId": "01JGGMXKBVV37E3S3E28JT97KB", "type": "newMessage",
    });
    let sent = mallory.send_message_with(forged).await.unwrap();
    let got = bob.next_message(WAIT).await.expect("the push");
    assert_eq!((got.user_id.as_str(), got.device_id.as_str()), ("mallory", "phone"));
    assert_eq!(got.message_id, sent.message_id);
    assert_ne!(got.message_id.as_str(), "01JGGMXKBVV37E3S3E28JT97KB");
    assert!(got.timestamp >= before, "the client's timestamp was kept: {}", got.timestamp);
}

/// removeDevice names a device of the caller's own user only: mallory's
/// attempts on alice's device names remove nothing of alice's.
#[tokio::test]
async fn remove_device_reaches_only_the_callers_own_devices() {
    let server = Server::start().await;
    let mut alice_phone = server.connect("alice", "phone").await;
    let mut alice_tablet = server.connect("alice", "tablet").await;
    let mallory = server.connect("mallory", "tablet").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();
    bob.send_message(&chat, "kept").await.unwrap();
    while alice_phone.next_frame(QUIET).await.is_some() {}
    while alice_tablet.next_frame(QUIET).await.is_some() {}

    assert_eq!(code(mallory.remove_device("phone").await), ErrorCode::NotFound, "a device only alice has");
    for bad in ["alice#phone", "../phone", "phone\u{0}", ""] {
        let answer = mallory.request("removeDevice", json!({ "deviceId": bad })).await.unwrap();
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{bad:?}: {answer}");
    }
    // Both have a "tablet": mallory's goes, alice's stays.
    let mallory_laptop = server.connect("mallory", "laptop").await;
    mallory_laptop.remove_device("tablet").await.expect("her own tablet");

    for (device, client) in [("phone", &mut alice_phone), ("tablet", &mut alice_tablet)] {
        assert!(client.closed(QUIET).await.is_none(), "alice's {device} was closed");
        let inbox = client.sync_all().await.expect("alice's device still serves");
        assert_eq!(inbox.len(), 1, "alice's {device} inbox");
    }
    assert!(server.connection_id("alice", "tablet").is_some());
}

/// An attachment is its uploader's: no one else may fetch it before it is
/// shared, nor send it, nor take its id over with createAttachment.
#[tokio::test]
async fn another_users_attachment_is_neither_fetched_nor_sent_nor_taken_over() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = mallory.create_chat(&["bob", "alice"], "c").await.unwrap();
    let private = upload(&alice, "text/plain", b"alice's only").await;

    assert_eq!(code(mallory.get_attachment(&private).await), ErrorCode::Forbidden, "getAttachment");
    let send = json!({ "chatId": chat, "message": "look", "attachments": [private] });
    assert_eq!(code(mallory.send_message_with(send).await), ErrorCode::BadRequest, "sent by another");
    assert_eq!(
        code(mallory.get_attachment(&private).await),
        ErrorCode::Forbidden,
        "the refused send shared it"
    );
    assert_eq!(code(bob.get_attachment(&private).await), ErrorCode::Forbidden, "bob got it through her chat");
    assert!(bob.next_message(QUIET).await.is_none(), "the refused message was delivered");
    assert_eq!(code(mallory.get_attachment("01JGGMXKBVV37E3S3E28JT97KB").await), ErrorCode::NotFound);
    let long = "a".repeat(65);
    let answer = mallory.request("getAttachment", json!({ "attachmentId": long })).await.unwrap();
    assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");

    // createAttachment mints its own id; an upload through it is mallory's.
    let evil = b"mallory's bytes";
    let created = mallory
        .call::<courier_core::protocol::AttachmentCreated>(
            "createAttachment",
            json!({ "attachmentId": private, "contentType": "text/plain", "size": evil.len(),
                    "sha256": sha256_hex(evil), "uploader": "alice" }),
        )
        .await
        .unwrap();
    assert_ne!(created.attachment_id.as_str(), private, "createAttachment took the client's id");
    assert_eq!(put_upload(&created, evil).await.status, 200);
    let link = alice.get_attachment(&private).await.unwrap();
    assert_eq!(http::get(&link.download_url).await.unwrap().body, b"alice's only", "alice's bytes changed");
    assert_eq!(code(alice.get_attachment(created.attachment_id.as_str()).await), ErrorCode::Forbidden);
}

/// An ack removes messages from the acking device's inbox only: not from
/// the user's other devices, and never from another user's.
#[tokio::test]
async fn acking_another_devices_messages_leaves_that_inbox_alone() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let _alice_laptop = server.connect("alice", "laptop").await;
    let bob_phone = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    let mallory = server.connect("mallory", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let mut ids = Vec::new();
    for text in ["a", "b", "c"] {
        ids.push(alice.send_message(&chat, text).await.unwrap().message_id.to_string());
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();

    assert_eq!(mallory.ack(&ids).await.unwrap(), 0, "a stranger's ack");
    assert_eq!(alice.ack(&ids).await.unwrap(), 0, "the sender's ack, from the sending device");
    assert_eq!(bob_laptop.ack(&ids).await.unwrap(), 3, "bob's laptop acks its own copies");
    assert_eq!(bob_laptop.ack(&ids).await.unwrap(), 0, "and only once");
    let phone: Vec<String> =
        bob_phone.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(phone, ids, "bob's phone lost messages to another device's ack");
    assert!(bob_laptop.sync_all().await.unwrap().is_empty());
}

// ------------------------------------------------------------------ blob URLs

fn query_of(url: &str) -> &str {
    url.split_once('?').expect("a query").1
}

fn headers_of(created: &courier_core::protocol::AttachmentCreated) -> Vec<(&str, &str)> {
    created.upload_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// mallory holds URLs for her own attachment and bends them toward alice's:
/// another id, another method, another expiry, another signature, a path
/// out of the blob folder. Each is 403, the same whether or not the id
/// exists, and alice's bytes stay hers.
#[tokio::test]
async fn a_blob_url_cannot_be_bent_to_another_attachment() {
    if courier_tests::moto_cannot_check("URL signatures") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let victim = upload(&alice, "text/plain", b"alice's bytes").await;
    let evil = b"mallory's bytes";
    let mine = mallory.create_attachment("text/plain", evil.len() as u64, &sha256_hex(evil)).await.unwrap();
    let headers = headers_of(&mine);
    let put_url = &mine.upload_url;
    let my_id = mine.attachment_id.as_str();

    let on_victim = put_url.replace(my_id, &victim);
    assert_eq!(http::put(&on_victim, &headers, evil).await.unwrap().status, 403, "PUT on alice's id");
    assert_eq!(http::get(&on_victim).await.unwrap().status, 403, "GET of alice's id");
    assert_eq!(http::get(put_url).await.unwrap().status, 403, "an upload URL used to download");
    let sig: String = query_of(put_url).split("sig=").nth(1).unwrap().chars().rev().collect();
    assert_eq!(http::put(&with_param(put_url, "sig", &sig), &headers, evil).await.unwrap().status, 403);
    assert_eq!(
        http::put(&with_param(put_url, "expires", "99999999999999"), &headers, evil).await.unwrap().status,
        403
    );
    assert_eq!(http::put(&with_param(put_url, "expires", "-1"), &headers, evil).await.unwrap().status, 403);

    // A made-up id gets the same answer as a real one: no way to probe ids.
    let base = &server.http;
    let never = "01JGGMXKBVV37E3S3E28JT97KB";
    for path in [
        format!("/blobs/{never}?{}", query_of(put_url)),
        format!("/blobs/{victim}?{}", query_of(put_url)),
        format!("/blobs/url-signing.key?{}", query_of(put_url)),
        format!("/blobs/..%2Furl-signing.key?{}", query_of(put_url)),
        format!("/blobs/..%2Fcourier.db?{}", query_of(put_url)),
        format!("/blobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd?{}", query_of(put_url)),
    ] {
        let got = http::get(&format!("{base}{path}")).await.unwrap();
        assert_eq!(got.status, 403, "GET {path}: {}", got.text());
        let put = http::put(&format!("{base}{path}"), &headers, evil).await.unwrap();
        assert_eq!(put.status, 403, "PUT {path}: {}", put.text());
    }
    let link = alice.get_attachment(&victim).await.unwrap();
    assert_eq!(http::get(&link.download_url).await.unwrap().body, b"alice's bytes");
    assert_eq!(put_upload(&mine, evil).await.status, 200, "mallory's own URL, untouched, works");
}

/// A URL dies at its expiry, for uploads and downloads alike.
#[tokio::test]
async fn an_expired_blob_url_is_refused() {
    if courier_tests::moto_cannot_check("URL expiry") {
        return;
    }
    let server = Server::start_with(|c| c.limits.url_ttl_ms = 1000).await;
    let alice = server.connect("alice", "phone").await;
    let bytes = b"expiring";
    let id = upload(&alice, "text/plain", bytes).await;
    let link = alice.get_attachment(&id).await.unwrap();
    let later = alice.create_attachment("text/plain", bytes.len() as u64, &sha256_hex(bytes)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    assert_eq!(http::get(&link.download_url).await.unwrap().status, 403, "an expired download URL");
    assert_eq!(put_upload(&later, bytes).await.status, 403, "an expired upload URL");
    let fresh = alice.get_attachment(&id).await.unwrap();
    assert_eq!(http::get(&fresh.download_url).await.unwrap().body, bytes, "a fresh URL works");
}

/// An upload must be exactly what was declared: not another size, not
/// other bytes, and not a second upload over a finished one.
#[tokio::test]
async fn an_upload_of_other_bytes_than_declared_stores_nothing() {
    if courier_tests::moto_cannot_check("an upload's length and checksum") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let declared = b"hello";
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(declared)).await.unwrap();
    for (what, body) in
        [("short", &b"hell"[..]), ("long", b"hello, world"), ("other bytes", b"jello"), ("empty", b"")]
    {
        let put = put_upload(&created, body).await;
        assert!((400..500).contains(&put.status), "{what}: HTTP {}", put.status);
    }
    let id = created.attachment_id.as_str();
    assert_eq!(code(alice.get_attachment(id).await), ErrorCode::NotFound, "something was stored");
    let send = json!({ "chatId": chat, "message": "x", "attachments": [id] });
    assert_eq!(code(alice.send_message_with(send.clone()).await), ErrorCode::BadRequest);

    // Finished, the URL (leaked, say, with the headers) overwrites nothing with other bytes.
    assert_eq!(put_upload(&created, declared).await.status, 200);
    let put = put_upload(&created, b"jello").await;
    assert!((400..500).contains(&put.status), "an overwrite with other bytes: HTTP {}", put.status);
    let link = alice.get_attachment(id).await.unwrap();
    assert_eq!(http::get(&link.download_url).await.unwrap().body, declared);
}

/// What a user uploads is served to be saved, never rendered on the API's
/// origin: markup types included.
#[tokio::test]
async fn a_download_of_markup_is_never_rendered() {
    if courier_tests::on_aws() {
        eprintln!("not checked on the AWS backend: nosniff (S3 serves media from the bucket's own origin)");
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    for content_type in ["text/html", "image/svg+xml", "application/xhtml+xml", "text/xml"] {
        let id = upload(&alice, content_type, b"<svg onload=alert(1)><script>alert(2)</script></svg>").await;
        let link = alice.get_attachment(&id).await.unwrap();
        let download = http::get(&link.download_url).await.unwrap();
        assert_eq!(download.status, 200);
        assert_eq!(download.header("content-disposition"), Some("attachment"), "{content_type}");
        assert_eq!(download.header("x-content-type-options"), Some("nosniff"), "{content_type}");
    }
}

// ------------------------------------------------------------ malformed frames

/// Checks a refusal as a client would read it: a FAILURE with `code`, a
/// message of at most 256 characters, the frame under 128 KB, and no
/// value the client sent (the canary) anywhere but the echoed requestId
/// and action. The problem, if any, as text.
fn unclean(frame: &Value, code: &str) -> Option<String> {
    let mut rest = frame.clone();
    if let Some(map) = rest.as_object_mut() {
        map.remove("requestId");
        map.remove("action");
    }
    let message = frame["error"]["message"].as_str().unwrap_or_default();
    let problem = if frame["type"] != "response" || frame["status"] != "FAILURE" {
        "not a FAILURE response"
    } else if frame["error"]["code"] != code {
        "another code"
    } else if message.is_empty() || message.chars().count() > 256 {
        "a message empty or over 256 characters"
    } else if frame.to_string().len() >= MAX_SERVER_FRAME {
        "a frame of 128 KB or more"
    } else if rest.to_string().contains(CANARY) {
        "the client's value quoted back"
    } else {
        return None;
    };
    Some(format!("{problem} (wanted {code}): {:.300}", frame.to_string()))
}

/// Sends each frame as is and checks its answer: with [`unclean`], or for
/// `"SUCCESS"`, a SUCCESS under 128 KB. The frames answered wrongly.
async fn answers(client: &mut Client, frames: &[(String, &str)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (text, code) in frames {
        client.send_raw(text.clone()).expect("send");
        let problem = match client.next_frame(WAIT).await {
            None => Some("no answer".to_owned()),
            Some(answer) if *code == "SUCCESS" => (answer["status"] != "SUCCESS"
                || answer.to_string().len() >= MAX_SERVER_FRAME)
                .then(|| format!("not a SUCCESS under 128 KB: {:.300}", answer.to_string())),
            Some(answer) => unclean(&answer, code),
        };
        wrong.extend(problem.map(|p| format!("{text:.80}: {p}")));
    }
    wrong
}

fn nested(open: &str, depth: usize) -> String {
    open.repeat(depth)
}

/// Frames no client library would send: broken JSON, deep nesting, huge
/// numbers, duplicate keys, bad escapes, oversize. Each gets a clean
/// FAILURE (see [`unclean`]) and changes nothing; the connection and the
/// server go on serving.
#[tokio::test]
async fn malformed_frames_get_clean_failures_and_the_server_keeps_serving() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let _alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    while alice.next_frame(QUIET).await.is_some() {}
    let hash = sha256_hex(b"x");
    let digits = "9".repeat(30_000);
    let c = CANARY;
    let bad = "BAD_REQUEST";
    let frames: Vec<(String, &str)> = vec![
        // Not JSON, or not only JSON.
        (format!(r#"{{"action":"sync","requestId":"{c}","#), bad),
        (c.to_owned(), bad),
        (format!(r#"{{"action":"sync","limit":{c}}}"#), bad),
        (format!(r#"{{"action":"sendMessage","chatId":"{chat}","message":"{c}""#), bad),
        (format!("\u{feff}{{\"action\":\"listChats\",\"x\":\"{c}\"}}"), bad),
        (format!(r#"{{"action":"listChats"}} {{"action":"sync","x":"{c}"}}"#), bad),
        (format!(r#"{{"action":"listChats"}}{c}"#), bad),
        (r#"{"action":"sync","limit":NaN}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":Infinity}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":1,}"#.to_owned(), bad),
        (format!(r#"{{"action":"sync"/*{c}*/}}"#), bad),
        (format!("{{'action':'sync','cursor':'{c}'}}"), bad),
        // Strings JSON does not allow.
        (format!(r#"{{"action":"sendMessage","chatId":"{chat}","message":"\ud800{c}"}}"#), bad),
        (format!(r#"{{"action":"sendMessage","chatId":"{chat}","message":"\x41{c}"}}"#), bad),
        (format!("{{\"action\":\"sendMessage\",\"chatId\":\"{chat}\",\"message\":\"\u{1}{c}\"}}"), bad),
        (format!("{{\"action\":\"sendMessage\",\"chatId\":\"{chat}\",\"message\":\"\n{c}\"}}"), bad),
        // Deep nesting, in every place a value can stand, within 32 KiB.
        (nested("[", 30_000), bad),
        (format!(r#"{{"action":"sync","limit":{}"#, nested("[", 30_000)), bad),
        // Valid however deep: a field no command takes is skipped without recursing.
        (format!(r#"{{"x":{},"action":"listChats"}}"#, nested("[", 15_000) + &"]".repeat(15_000)), "SUCCESS"),
        (format!(r#"{{"action":"listChats","x":{}}}"#, nested("[", 15_000) + &"]".repeat(15_000)), "SUCCESS"),
        (format!(r#"{{"x":{}"#, nested(r#"{"a":"#, 6_000)), bad),
        (
            format!(
                r#"{{"action":"sendMessage","chatId":"{chat}","message":"m","attachments":{}"#,
                nested("[", 30_000)
            ),
            bad,
        ),
        (format!(r#"{{"requestId":{},"action":"sync"}}"#, nested("[", 30_000)), bad),
        // Numbers too big, too small or not whole.
        (r#"{"action":"sync","limit":1e999999}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":4294967296}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":-1}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":1.5}"#.to_owned(), bad),
        (r#"{"action":"sync","limit":1e-99999999999999999999}"#.to_owned(), bad),
        (format!(r#"{{"action":"sync","limit":{digits}}}"#), bad),
        (format!(r#"{{"action":"sync","limit":0.{digits}}}"#), bad),
        (
            format!(
                r#"{{"action":"createAttachment","contentType":"text/plain","size":1e400,"sha256":"{hash}"}}"#
            ),
            bad,
        ),
        (
            format!(
                r#"{{"action":"createAttachment","contentType":"text/plain","size":18446744073709551616,"sha256":"{hash}"}}"#
            ),
            bad,
        ),
        (
            format!(
                r#"{{"action":"createAttachment","contentType":"text/plain","size":18446744073709551615,"sha256":"{hash}"}}"#
            ),
            "LIMIT_EXCEEDED",
        ),
        (
            format!(
                r#"{{"action":"createAttachment","contentType":"text/plain","size":-1,"sha256":"{hash}"}}"#
            ),
            bad,
        ),
        // Duplicate keys: refused, never resolved one way or the other.
        (r#"{"action":"sync","limit":1,"limit":2}"#.to_owned(), bad),
        (r#"{"action":"listChats","action":"removeDevice","deviceId":"laptop"}"#.to_owned(), bad),
        (r#"{"action":"removeDevice","action":"listChats","deviceId":"laptop"}"#.to_owned(), bad),
        (r#"{"deviceId":"phone","action":"removeDevice","deviceId":"laptop"}"#.to_owned(), bad),
        (format!(r#"{{"action":"sendMessage","chatId":"{chat}","message":"a","message":"{c}"}}"#), bad),
        (format!(r#"{{"chatId":"{chat}","action":"sendMessage","chatId":"{c}","message":"m"}}"#), bad),
        // Names and types the protocol does not have.
        (format!(r#"{{"action":"{c}"}}"#), "UNKNOWN_ACTION"),
        (format!(r#"{{"action":"{}"}}"#, c.repeat(3000)), "UNKNOWN_ACTION"),
        (format!(r#"{{"action":"sendMessage","chatId":["{c}"],"message":"m"}}"#), bad),
        (
            format!(
                r#"{{"action":"modifyChatParticipants","chatId":"{chat}","userId":"bob","operation":"{c}"}}"#
            ),
            bad,
        ),
        (format!(r#"{{"action":"sync","requestId":"{}"}}"#, c.repeat(8)), bad),
        // Past the frame limit, by one byte and by far.
        (format!(r#"{{"action":"listChats","pad":"{}"}}"#, "p".repeat(32 * 1024 - 30)), "LIMIT_EXCEEDED"),
        (nested("[", 100_000), "LIMIT_EXCEEDED"),
        (
            format!(r#"{{"action":"sendMessage","chatId":"{chat}","message":"{}"}}"#, c.repeat(100_000)),
            "LIMIT_EXCEEDED",
        ),
    ];
    assert!(frames.iter().any(|(text, _)| text.len() == 32 * 1024 + 1), "a frame one byte over 32 KiB");
    let started = Instant::now();
    let wrong = answers(&mut alice, &frames).await;
    assert!(
        wrong.is_empty(),
        "{} of {} frames answered wrongly:\n{}",
        wrong.len(),
        frames.len(),
        wrong.join("\n")
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{} frames took {:?}",
        frames.len(),
        started.elapsed()
    );

    // Nothing was done: no device removed, nothing sent, and both still serve.
    assert!(server.connection_id("alice", "laptop").is_some(), "a duplicate key removed a device");
    assert!(bob.next_message(QUIET).await.is_none(), "a malformed frame sent a message");
    assert!(bob.sync_all().await.unwrap().is_empty());
    assert!(alice.closed(QUIET).await.is_none(), "the connection was closed");
    alice.list_chats().await.expect("the connection keeps serving");
    server.connect("carol", "phone").await.list_chats().await.expect("the server keeps serving");
}

/// Control characters, bidi overrides and line separators in every string
/// field. Ids refuse them (BAD_REQUEST, not quoted back); free text (a
/// chat's name, a message, a clientMessageId, a requestId) keeps them
/// exactly, escaped on the wire, and hands them back as they came.
#[tokio::test]
async fn control_characters_in_every_string_field() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let message = alice.send_message(&chat, "m").await.unwrap().message_id.to_string();
    while alice.next_frame(QUIET).await.is_some() {}
    while bob.next_frame(QUIET).await.is_some() {}
    let nasty = format!("\u{0}\u{1}\u{7}\u{8}\u{1b}[2J\r\n\t\u{7f}\u{85}\u{2028}\u{202e}{CANARY}");
    let n = nasty.as_str();
    let hash = sha256_hex(b"x");

    let refused: Vec<(&str, Value)> = vec![
        ("createChat", json!({ "participants": [n], "name": "x" })),
        ("sendMessage", json!({ "chatId": n, "message": "x" })),
        ("sendMessage", json!({ "chatId": chat, "message": "x", "attachments": [n] })),
        ("createAttachment", json!({ "contentType": n, "size": 1, "sha256": hash })),
        ("createAttachment", json!({ "contentType": "text/plain", "size": 1, "sha256": n })),
        ("getAttachment", json!({ "attachmentId": n })),
        ("modifyChatParticipants", json!({ "chatId": n, "userId": "carol", "operation": "ADD" })),
        ("modifyChatParticipants", json!({ "chatId": chat, "userId": n, "operation": "ADD" })),
        ("modifyChatParticipants", json!({ "chatId": chat, "userId": "carol", "operation": n })),
        ("listChats", json!({ "cursor": n })),
        ("sync", json!({ "cursor": n })),
        ("ack", json!({ "messageIds": [n] })),
        ("ack", json!({ "messageId": n })),
        ("removeDevice", json!({ "deviceId": n })),
    ];
    let mut frames: Vec<(String, &str)> = refused
        .iter()
        .map(|(action, fields)| {
            let mut frame = fields.clone();
            frame["action"] = json!(action);
            (frame.to_string(), "BAD_REQUEST")
        })
        .collect();
    frames.push((json!({ "action": n }).to_string(), "UNKNOWN_ACTION"));
    let wrong = answers(&mut alice, &frames).await;
    assert!(wrong.is_empty(), "{} of {} answered wrongly:\n{}", wrong.len(), frames.len(), wrong.join("\n"));

    // Free text keeps every character, and comes back exactly.
    let named = alice.create_chat(&["bob"], n).await.expect("a name of any characters");
    let listed = alice.call::<Value>("listChats", json!({})).await.unwrap();
    let names: Vec<&Value> = listed["chats"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["chatId"] == named)
        .map(|c| &c["name"])
        .collect();
    assert_eq!(names, [&json!(n)], "the name as listed");
    assert_eq!(next_of_type(&mut bob, "chatUpdate").await["name"], n, "the name as pushed");
    let keyed = json!({ "chatId": named, "message": n, "clientMessageId": n });
    let sent = alice.send_message_with(keyed.clone()).await.expect("a message of any characters");
    assert_eq!(alice.send_message_with(keyed).await.unwrap().message_id, sent.message_id, "a retry");
    assert_eq!(bob.next_message(WAIT).await.expect("the push").message, n, "the message as pushed");
    let inbox = bob.sync_all().await.unwrap();
    assert_eq!(inbox.iter().map(|m| m.message.as_str()).collect::<Vec<_>>(), ["m", n], "as synced");
    while alice.next_frame(QUIET).await.is_some() {}
    let answer =
        answer_to(&mut alice, &json!({ "action": "sync", "limit": 1, "requestId": n }).to_string()).await;
    assert_eq!(answer["status"], "SUCCESS", "{answer}");
    assert_eq!(answer["requestId"], n, "the requestId as echoed");
    assert_eq!(bob.ack(&[&message]).await.unwrap(), 1, "the plain message is still acked as usual");
}

/// The next frame of type `ty`, skipping others.
async fn next_of_type(client: &mut Client, ty: &str) -> Value {
    courier_tests::next_of_type(client, ty, WAIT).await.unwrap_or_else(|| panic!("no {ty} frame"))
}

/// Sends `text` as one frame and returns the answer.
async fn answer_to(client: &mut Client, text: &str) -> Value {
    client.send_raw(text).expect("send");
    client.next_frame(WAIT).await.unwrap_or_else(|| panic!("no answer to {text:.80}"))
}

// ------------------------------------------------------------- raw WebSocket

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;

/// A WebSocket client on a bare socket, for what the test kit's client
/// never does: binary frames, text that is not UTF-8, and not reading.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Connects as (user, device); with `small_buffer`, a receive buffer of
    /// 4 KiB, so that when it stops reading the server's writes back up at once.
    async fn connect(server: &Server, user: &str, device: &str, small_buffer: bool) -> Raw {
        let socket = TcpSocket::new_v4().expect("socket");
        if small_buffer {
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        }
        let addr = server.http.trim_start_matches("http://").parse().expect("addr");
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = format!(
            "GET /?token={}&deviceId={device} HTTP/1.1\r\nHost: courier\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.token(user)
        );
        stream.write_all(request.as_bytes()).await.expect("upgrade request");
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

    /// The next frame from the server (opcode, payload), or `None` when the
    /// socket closes or nothing comes within [`WAIT`].
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let read = async {
            let head = self.stream.read_u16().await?;
            let len = match head & 0x7f {
                126 => u64::from(self.stream.read_u16().await?),
                127 => self.stream.read_u64().await?,
                n => u64::from(n),
            };
            let mut payload = vec![0; len as usize];
            self.stream.read_exact(&mut payload).await?;
            std::io::Result::Ok(((head >> 8) as u8 & 0x0f, payload))
        };
        tokio::time::timeout(WAIT, read).await.ok()?.ok()
    }

    /// The next text frame, as JSON.
    async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Some((TEXT, payload)) => return serde_json::from_slice(&payload).expect("JSON"),
                Some(_) => continue,
                None => panic!("no text frame"),
            }
        }
    }

    /// The close code the server ends with, if it sends one; `None` if it
    /// just drops the socket. Panics if it keeps the socket open.
    async fn close_code(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "the server kept the socket open");
            match self.next().await {
                Some((CLOSE, payload)) if payload.len() >= 2 => {
                    return Some(u16::from_be_bytes([payload[0], payload[1]]));
                }
                Some((CLOSE, _)) | None => return None,
                Some(_) => continue,
            }
        }
    }
}

/// Binary frames, text frames that are not UTF-8, and frames past 1 MiB:
/// the first is a clean FAILURE, the others end that connection (1009 for
/// the oversize one) and only that one.
#[tokio::test]
async fn binary_non_utf8_and_oversize_frames_end_no_one_else() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let mut raw = Raw::connect(&server, "alice", "phone", false).await;
    let invalid =
        [b"{\"action\":\"listChats\",\"requestId\":\"".as_slice(), &[0xff, 0xfe, 0xc0, 0x80], b"\"}"]
            .concat();
    raw.send(BINARY, &invalid).await.unwrap();
    let answer = raw.next_json().await;
    assert_eq!(unclean(&answer, "BAD_REQUEST"), None);
    raw.send(TEXT, br#"{"action":"listChats","requestId":"after"}"#).await.unwrap();
    assert_eq!(raw.next_json().await["status"], "SUCCESS", "the connection serves on");

    // Text that is not UTF-8 breaks the WebSocket protocol: the connection ends.
    raw.send(TEXT, &invalid).await.unwrap();
    let code = raw.close_code().await;
    assert!(matches!(code, None | Some(1007)), "closed with {code:?}");

    let mut big = Raw::connect(&server, "alice", "laptop", false).await;
    let mut frame = br#"{"action":"listChats","pad":""#.to_vec();
    frame.resize(1024 * 1024 + 1, b'p');
    let _ = big.send(TEXT, &frame).await;
    assert_eq!(big.close_code().await, Some(1009));

    bob.list_chats().await.expect("others are served");
    server.connect("alice", "phone").await.list_chats().await.expect("alice connects again");
}

// ---------------------------------------------------------------------- floods

/// A burst past the token bucket: the frames past it are RATE_LIMITED and
/// do nothing (each limited send stores no message); the connection stays
/// open, and serves again once the bucket has refilled.
#[tokio::test]
async fn a_burst_past_the_bucket_is_refused_does_nothing_and_the_connection_recovers() {
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 10.0, per_second: 2.0 }).await;
    let mallory = server.connect("mallory", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = bob.create_chat(&["mallory"], "c").await.unwrap();

    let burst = (0..40).map(|i| {
        mallory.request(
            "sendMessage",
            json!({ "chatId": chat, "message": "spam", "clientMessageId": format!("k{i}") }),
        )
    });
    let started = Instant::now();
    let answers = futures_util::future::join_all(burst).await;
    // What refilled while the burst was served (slowly, on moto) may be spent too.
    let elapsed = started.elapsed().as_secs_f64();
    let most = 10 + (2.0 * elapsed).ceil() as usize;
    let (mut sent, mut limited) = (0, 0);
    for answer in answers {
        let frame = answer.expect("every frame is answered");
        if frame["status"] == "SUCCESS" {
            sent += 1;
        } else {
            assert_eq!(unclean(&frame, "RATE_LIMITED"), None);
            assert_eq!(frame["action"], "sendMessage", "{frame}");
            limited += 1;
        }
    }
    assert!(
        (10..=most).contains(&sent) && limited >= 1,
        "{sent} sent (10 to {most} allowed in {elapsed:.2} s), {limited} limited"
    );
    assert_eq!(bob.sync_all().await.unwrap().len(), sent, "a limited frame stored a message");

    let mut mallory = mallory;
    assert!(mallory.closed(QUIET).await.is_none(), "closed for going too fast");
    tokio::time::sleep(Duration::from_millis(600)).await;
    mallory.send_message(&chat, "calm now").await.expect("served after the refill");
}

/// A user past three devices is refused (403), however many try at once,
/// and her three keep working; one device connecting many times at once
/// ends up with one connection.
#[tokio::test]
async fn a_connection_flood_gets_no_fourth_device_and_one_connection_per_device() {
    let server = Server::start().await;
    let mut devices = vec![
        server.connect("alice", "d1").await,
        server.connect("alice", "d2").await,
        server.connect("alice", "d3").await,
    ];
    let names: Vec<String> = (0..10).map(|i| format!("extra{i}")).collect();
    let flood = names.iter().map(|name| server.try_connect("alice", name));
    for outcome in futures_util::future::join_all(flood).await {
        assert!(matches!(outcome, Err(ConnectError::Refused(403))), "{:?}", outcome.err());
    }
    for device in &mut devices {
        assert!(device.closed(Duration::from_millis(50)).await.is_none(), "a device lost its connection");
        device.list_chats().await.expect("still served");
    }

    if courier_tests::moto_cannot_check("concurrent updates of one item in isolation") {
        return;
    }
    let same = (0..10).map(|_| server.try_connect("bob", "phone"));
    let mut clients: Vec<Client> = futures_util::future::join_all(same)
        .await
        .into_iter()
        .map(|c| c.expect("each replaces the last"))
        .collect();
    let deadline = Instant::now() + WAIT;
    while server.connections().len() != 4 {
        assert!(Instant::now() < deadline, "{} connections for 4 devices", server.connections().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut open = 0;
    for client in &mut clients {
        if client.closed(Duration::from_millis(50)).await.is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 1, "connections left open for bob's phone");
}

// ---------------------------------------------------------------- slow clients

/// What hardening.rs does not cover: a client that never reads holds up no
/// one. Its pushes back up (until it is cut off) while the sender's answers
/// and the other member's pushes keep flowing at once.
#[tokio::test]
async fn a_client_that_never_reads_delays_no_one_else() {
    let server = Server::start_with(|c| c.rate_limit = RateLimit { capacity: 1000.0, per_second: 0.0 }).await;
    let _stalled = Raw::connect(&server, "alice", "phone", true).await;
    let bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let chat = bob.create_chat(&["alice", "carol"], "c").await.unwrap();
    let text = "m".repeat(15_000);

    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let started = Instant::now();
        bob.send_message(&chat, &text).await.expect("sent");
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "a send waited {slowest:?} on a recipient that does not read");
    let mut pushed = 0;
    while pushed < 100 {
        carol.next_message(WAIT).await.expect("carol gets every push");
        pushed += 1;
    }
}

/// Sockets in the HTTP phase are capped (hardening.rs); a request whose
/// body never finishes must not hold its place forever, or a few such
/// sockets, unsigned, shut everyone else out.
#[tokio::test]
async fn a_management_request_whose_body_never_ends_is_dropped() {
    let server = Server::start_with(|c| {
        c.max_pending_connections = 2;
        c.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.http.trim_start_matches("http://").to_owned();
    let mut trickling = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(&addr).await.unwrap();
        let head = "POST /@connections/abc HTTP/1.1\r\nHost: courier\r\nContent-Length: 100000\r\n\r\n{";
        socket.write_all(head.as_bytes()).await.unwrap();
        trickling.push(socket);
    }
    // A byte every 200 ms: the headers are long done, the body never is.
    let started = Instant::now();
    let mut dropped = vec![false; trickling.len()];
    while Instant::now() - started < Duration::from_secs(4) && dropped.contains(&false) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (socket, dropped) in trickling.iter_mut().zip(&mut dropped) {
            if !*dropped && (socket.write_all(b" ").await.is_err() || closed_now(socket).await) {
                *dropped = true;
            }
        }
    }
    assert_eq!(dropped, [true, true], "sockets still held after {:?}", started.elapsed());
    server.connect("alice", "phone").await.list_chats().await.expect("room for a client again");
}

/// A blob transfer that stops moving must not hold its socket either: an
/// upload whose body never comes, a download that is never read. Any user
/// with a token could otherwise fill the cap on sockets in the HTTP phase.
#[tokio::test]
async fn a_blob_transfer_that_stops_moving_is_dropped() {
    if courier_tests::on_aws() {
        eprintln!("not checked on the AWS backend: blob URLs go to S3 (moto), not to courier-local");
        return;
    }
    let server = Server::start_with(|c| {
        c.max_pending_connections = 2;
        c.stall_timeout = Duration::from_secs(1);
    })
    .await;
    let alice = server.connect("alice", "phone").await;
    let big = vec![7u8; 4 * 1024 * 1024];
    let id = upload(&alice, "application/octet-stream", &big).await;
    let link = alice.get_attachment(&id).await.unwrap();
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello")).await.unwrap();
    let quiet_since = Instant::now();
    let addr: std::net::SocketAddr = server.http.trim_start_matches("http://").parse().unwrap();
    let target = |url: &str| url.split_once("://").unwrap().1.split_once('/').unwrap().1.to_owned();

    // A download into a 4 KiB receive buffer, never read.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(addr).await.unwrap();
    let get = format!("GET /{} HTTP/1.1\r\nHost: courier\r\n\r\n", target(&link.download_url));
    reader.write_all(get.as_bytes()).await.unwrap();
    // An upload that sends its headers and never its body.
    let mut writer = TcpStream::connect(addr).await.unwrap();
    let mut put =
        format!("PUT /{} HTTP/1.1\r\nHost: courier\r\nContent-Length: 5\r\n", target(&created.upload_url));
    for (name, value) in &created.upload_headers {
        put.push_str(&format!("{name}: {value}\r\n"));
    }
    writer.write_all(format!("{put}\r\n").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(server.try_connect("bob", "phone").await.is_err(), "the two sockets fill the cap");

    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let upload_dropped =
        tokio::time::timeout(WAIT, async { while let Ok(1..) = writer.read(&mut buf).await {} })
            .await
            .is_ok();
    assert!(upload_dropped, "an upload without a body held its socket for {:?}", started.elapsed());
    // The download's socket goes too (read now, it ends short of the 4 MiB).
    let mut got = 0;
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            got += n;
        }
    })
    .await
    .is_ok();
    assert!(ended && got < big.len(), "an unread download held its socket ({got} bytes read)");
    server.connect("bob", "phone").await.list_chats().await.expect("room for a client again");
    // The deadline is the HTTP phase's: a WebSocket quiet for longer lives on.
    tokio::time::sleep_until(quiet_since + Duration::from_millis(1500)).await;
    alice.list_chats().await.expect("a quiet WebSocket is not dropped");
}

/// Whether the peer has closed `socket` (read returns end of stream or an error at once).
async fn closed_now(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_millis(10), socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

// -------------------------------------------------------------- management API

/// One cross-check of management.rs from a client's side: a user's own
/// valid token opens no door to the management API.
#[tokio::test]
async fn a_client_token_opens_no_management_door() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let url = format!("{}/@connections/{}", server.http, server.connection_id("alice", "phone").unwrap());
    let bearer = format!("Bearer {}", server.token("alice"));
    for method in ["POST", "GET", "DELETE"] {
        let response = http::request(method, &url, &[("Authorization", &bearer)], br#"{"type":"forged"}"#)
            .await
            .unwrap();
        assert_eq!(response.status, 403, "{method} with a client token: {}", response.text());
    }
    assert!(alice.next_frame(QUIET).await.is_none(), "something was delivered or closed");
    alice.list_chats().await.expect("still connected");
}
