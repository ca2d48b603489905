//! Connecting: the token and deviceId checks on the upgrade, the device
//! limit, and one connection per device.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use courier_tests::client::{Client, ConnectError};
use courier_tests::{QUIET, Server, WAIT};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn far_future() -> u64 {
    jsonwebtoken::get_current_timestamp() + 3600
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("sign")
}

async fn refusal(server: &Server, token: &str, device: &str) -> u16 {
    match Client::connect(&server.url, token, device).await {
        Ok(_) => panic!("the connect with token {token:?} was accepted"),
        Err(ConnectError::Refused(status)) => status,
        Err(e) => panic!("the connect failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn a_valid_token_and_device_are_upgraded() {
    let server = Server::start().await;
    let token = server.token("alice");
    assert_eq!(server.upgrade_status(&format!("token={token}&deviceId=phone")).await, 101);
    let alice = server.connect("alice", "laptop").await;
    alice.list_chats().await.expect("the connection serves commands");
}

#[tokio::test]
async fn a_missing_or_unreadable_token_is_refused_with_401() {
    let server = Server::start().await;
    assert_eq!(server.upgrade_status("deviceId=phone").await, 401, "no token");
    assert_eq!(server.upgrade_status("token=&deviceId=phone").await, 401, "empty token");
    assert_eq!(refusal(&server, "not-a-jwt", "phone").await, 401);
    assert_eq!(refusal(&server, "a.b.c", "phone").await, 401);
}

#[tokio::test]
async fn an_expired_token_is_refused_with_401() {
    let server = Server::start().await;
    let expired = courier_core::auth::mint(server.config.jwt_secret.as_bytes(), "alice", -60);
    assert_eq!(refusal(&server, &expired, "phone").await, 401);
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused_with_401() {
    let server = Server::start().await;
    let secret = &server.config.jwt_secret;
    let now = jsonwebtoken::get_current_timestamp();
    let later = sign(Algorithm::HS256, secret, &json!({ "sub": "alice", "exp": now + 600, "nbf": now + 60 }));
    assert_eq!(refusal(&server, &later, "phone").await, 401);
    let from_now = sign(Algorithm::HS256, secret, &json!({ "sub": "alice", "exp": now + 600, "nbf": now }));
    Client::connect(&server.url, &from_now, "phone").await.expect("valid from nbf on");
}

#[tokio::test]
async fn a_token_valid_for_more_than_a_day_is_refused_with_401() {
    let server = Server::start().await;
    let secret = &server.config.jwt_secret;
    let day = 24 * 60 * 60;
    let now = jsonwebtoken::get_current_timestamp();
    let long = sign(Algorithm::HS256, secret, &json!({ "sub": "alice", "iat": now, "exp": now + day + 1 }));
    assert_eq!(refusal(&server, &long, "phone").await, 401, "iat to exp");
    let no_iat = sign(Algorithm::HS256, secret, &json!({ "sub": "alice", "exp": now + 30 * day }));
    assert_eq!(refusal(&server, &no_iat, "phone").await, 401, "now to exp");
    // What `courier-local token` mints by default: a day exactly.
    let minted = courier_core::auth::mint(secret.as_bytes(), "alice", day as i64);
    Client::connect(&server.url, &minted, "phone").await.expect("a day is accepted");
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused_with_401() {
    let server = Server::start().await;
    let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = B64.encode(json!({ "sub": "alice", "exp": far_future() }).to_string());
    assert_eq!(refusal(&server, &format!("{header}.{claims}."), "phone").await, 401);
    // The same claims with a real signature are accepted: only alg none was refused.
    let signed =
        sign(Algorithm::HS256, &server.config.jwt_secret, &json!({ "sub": "alice", "exp": far_future() }));
    Client::connect(&server.url, &signed, "phone").await.expect("a signed token is accepted");
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused_with_401() {
    let server = Server::start().await;
    let forged = sign(Algorithm::HS256, "not-the-secret", &json!({ "sub": "alice", "exp": far_future() }));
    assert_eq!(refusal(&server, &forged, "phone").await, 401);
}

#[tokio::test]
async fn a_token_with_another_algorithm_is_refused_with_401() {
    let server = Server::start().await;
    let hs512 =
        sign(Algorithm::HS512, &server.config.jwt_secret, &json!({ "sub": "alice", "exp": far_future() }));
    assert_eq!(refusal(&server, &hs512, "phone").await, 401);
}

#[tokio::test]
async fn a_token_without_a_valid_sub_or_without_exp_is_refused_with_401() {
    let server = Server::start().await;
    let secret = &server.config.jwt_secret;
    let no_sub = sign(Algorithm::HS256, secret, &json!({ "exp": far_future() }));
    assert_eq!(refusal(&server, &no_sub, "phone").await, 401, "no sub");
    let bad_sub = sign(Algorithm::HS256, secret, &json!({ "sub": "alice smith", "exp": far_future() }));
    assert_eq!(refusal(&server, &bad_sub, "phone").await, 401, "sub with a space");
    let long_sub = sign(Algorithm::HS256, secret, &json!({ "sub": "a".repeat(65), "exp": far_future() }));
    assert_eq!(refusal(&server, &long_sub, "phone").await, 401, "sub of 65 chars");
    let no_exp = sign(Algorithm::HS256, secret, &json!({ "sub": "alice" }));
    assert_eq!(refusal(&server, &no_exp, "phone").await, 401, "no exp");
}

#[tokio::test]
async fn a_missing_or_malformed_device_id_is_refused_with_400() {
    let server = Server::start().await;
    let token = server.token("alice");
    assert_eq!(server.upgrade_status(&format!("token={token}")).await, 400, "no deviceId");
    for bad in ["", "two%20words", "dot.ted", "slash%2Fed", "at%40sign", &"d".repeat(65)] {
        assert_eq!(
            server.upgrade_status(&format!("token={token}&deviceId={bad}")).await,
            400,
            "deviceId {bad:?}"
        );
    }
    // The limits themselves are fine.
    let longest = "d".repeat(64);
    assert_eq!(server.upgrade_status(&format!("token={token}&deviceId={longest}")).await, 101);
    assert_eq!(server.upgrade_status(&format!("token={token}&deviceId=A-z_0")).await, 101);
}

#[tokio::test]
async fn a_fourth_device_is_refused_with_403_until_one_is_removed() {
    let server = Server::start().await;
    let phone = server.connect("alice", "phone").await;
    let laptop = server.connect("alice", "laptop").await;
    let tablet = server.connect("alice", "tablet").await;

    match server.try_connect("alice", "watch").await {
        Err(ConnectError::Refused(403)) => {}
        Err(e) => panic!("a 4th device got {e} instead of 403"),
        Ok(_) => panic!("a 4th device was accepted"),
    }
    // Known devices still reconnect, and other users are not affected.
    drop(laptop);
    let _laptop = server.connect("alice", "laptop").await;
    let _bob = server.connect("bob", "phone").await;

    phone.remove_device("tablet").await.expect("removeDevice");
    let mut tablet = tablet;
    assert_eq!(tablet.closed(WAIT).await, Some(1000), "the removed device's connection is closed");
    let watch = server.connect("alice", "watch").await;
    watch.list_chats().await.expect("the new device works");
    // Now there are three again.
    match server.try_connect("alice", "tablet").await {
        Err(ConnectError::Refused(403)) => {}
        other => panic!("expected 403 for a 4th device again, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_second_connection_for_the_same_device_replaces_the_first() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let mut alice_old = server.connect("alice", "phone").await;
    let chat = bob.create_chat(&["alice"], "c").await.unwrap();

    let mut alice_new = server.connect("alice", "phone").await;
    assert_eq!(alice_old.closed(WAIT).await, Some(1000), "the older connection is closed normally");

    let sent = bob.send_message(&chat, "to the newest").await.unwrap();
    let got = alice_new.next_message(WAIT).await.expect("the newest connection gets the push");
    assert_eq!(got.message_id, sent.message_id);
    assert!(alice_old.next_message(QUIET).await.is_none(), "nothing reaches the replaced connection");
    // It is the same device: one inbox, holding the message once.
    let inbox = alice_new.sync_all().await.unwrap();
    assert_eq!(inbox.iter().map(|m| &m.message_id).collect::<Vec<_>>(), vec![&sent.message_id]);
}

#[tokio::test]
async fn a_close_from_the_client_is_answered_and_the_device_goes_offline() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();

    let started = std::time::Instant::now();
    bob.close();
    // The close handshake: the server answers the client's Close frame. A
    // well-behaved client waits for that answer before it drops the socket,
    // so it must come well within the harness's WAIT, not after a 5 s grace.
    let answered = bob.closed(Duration::from_secs(2)).await;
    assert!(answered.is_some(), "no close frame back after {:?}", started.elapsed());

    let sent = alice.send_message(&chat, "while away").await.unwrap();
    let bob = server.connect("bob", "phone").await;
    let inbox: Vec<_> = bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![sent.message_id]);
}

#[tokio::test]
async fn devices_connecting_at_once_still_get_at_most_three_slots() {
    if courier_tests::moto_cannot_check("concurrent transactions in isolation") {
        return;
    }
    let server = Server::start().await;
    let devices = ["d1", "d2", "d3", "d4", "d5", "d6"];
    let attempts = devices.iter().map(|d| server.try_connect("alice", d));
    let outcomes = futures_util::future::join_all(attempts).await;
    let mut connected = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(client) => connected.push(client),
            Err(ConnectError::Refused(403)) => {}
            Err(e) => panic!("a connect failed otherwise: {e}"),
        }
    }
    assert_eq!(connected.len(), 3, "exactly three devices got in");
    for client in &connected {
        client.list_chats().await.expect("each of them works");
    }
}
