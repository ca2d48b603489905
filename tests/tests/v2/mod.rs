//! What the protocol version 2 suites share: publishing a device's keys, the
//! device check's digest computed as a client would, raw inbox items and
//! FAILURE bodies. Each suite uses part of it.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_tests::client::Client;
use courier_tests::{WAIT, next_of_type, sha256_hex};
use serde_json::{Value, json};

/// A signed key (signed prekey or fallback key) as a client uploads it.
pub fn signed(key_id: &str, public_key: &str) -> Value {
    json!({ "keyId": key_id, "publicKey": public_key, "signature": format!("sig-{public_key}") })
}

/// One-time prekeys with keyIds `k{i}` and public keys `{tag}-{i}`.
pub fn one_time_keys(ids: std::ops::Range<usize>, tag: &str) -> Value {
    ids.map(|i| json!({ "keyId": format!("k{i}"), "publicKey": format!("{tag}-{i}") })).collect()
}

/// Makes the client's device ready: `identity` as its identity key, a signed
/// prekey, a fallback key and `n` one-time prekeys (`k0`.. tagged `identity`).
pub async fn publish(client: &Client, identity: &str, n: usize) {
    let stored = ok(
        client,
        "uploadKeys",
        json!({
            "identityKey": identity,
            "signedPreKey": signed("s1", &format!("spk-{identity}")),
            "fallbackKey": signed("f1", &format!("fb-{identity}")),
            "oneTimePreKeys": one_time_keys(0..n, identity),
        }),
    )
    .await;
    assert_eq!(stored, json!({ "oneTimePreKeys": n }), "publishing {identity}");
}

/// How many one-time prekeys the calling device has stored (`uploadKeys {}`).
pub async fn key_count(client: &Client) -> u64 {
    ok(client, "uploadKeys", json!({})).await["oneTimePreKeys"].as_u64().expect("a count")
}

/// The `data` of a command that must succeed.
pub async fn ok(client: &Client, action: &str, fields: Value) -> Value {
    let frame = client.request(action, fields).await.unwrap_or_else(|e| panic!("{action}: {e}"));
    assert_eq!(frame["status"], "SUCCESS", "{action}: {frame}");
    frame["data"].clone()
}

/// The `error` of a command that must fail: `{code, message, ...}`.
pub async fn refused(client: &Client, action: &str, fields: Value) -> Value {
    let frame = client.request(action, fields).await.unwrap_or_else(|e| panic!("{action}: {e}"));
    assert_eq!(frame["status"], "FAILURE", "{action} must fail: {frame}");
    frame["error"].clone()
}

/// The error code of a command that must fail.
pub async fn refusal(client: &Client, action: &str, fields: Value) -> String {
    refused(client, action, fields).await["code"].as_str().expect("a code").to_owned()
}

/// The device check's digest, computed as PROTOCOL.md says a client does:
/// SHA-256 of the sorted lines `USERID DEVICEID IDENTITYKEY\n`, in lowercase hex.
pub fn digest(devices: &[(&str, &str, &str)]) -> String {
    let mut lines: Vec<String> = devices.iter().map(|(u, d, k)| format!("{u} {d} {k}\n")).collect();
    lines.sort();
    sha256_hex(lines.concat().as_bytes())
}

/// The digest of the `devices` a MISMATCHED_DEVICES error carries.
pub fn digest_of(devices: &Value) -> String {
    let devices: Vec<(&str, &str, &str)> = devices
        .as_array()
        .unwrap_or_else(|| panic!("no device list: {devices}"))
        .iter()
        .map(|d| {
            let field = |name: &str| d[name].as_str().unwrap_or_else(|| panic!("no {name}: {d}"));
            (field("userId"), field("deviceId"), field("identityKey"))
        })
        .collect();
    digest(&devices)
}

/// `[{userId, deviceId, identityKey}]` sorted, to compare with what the server lists.
pub fn recipients(devices: &[(&str, &str, &str)]) -> Vec<Value> {
    let mut list: Vec<Value> =
        devices.iter().map(|(u, d, k)| json!({ "userId": u, "deviceId": d, "identityKey": k })).collect();
    list.sort_by_key(Value::to_string);
    list
}

/// A list of JSON objects sorted, so that lists can be compared as sets.
pub fn sorted(list: &Value) -> Vec<Value> {
    let mut list = list.as_array().unwrap_or_else(|| panic!("not a list: {list}")).clone();
    list.sort_by_key(Value::to_string);
    list
}

/// Creates a chat with `encrypted` set; its chatId.
pub async fn create_chat(client: &Client, participants: &[&str], encrypted: bool) -> String {
    let data = ok(
        client,
        "createChat",
        json!({ "participants": participants, "name": "c", "encrypted": encrypted }),
    )
    .await;
    data["chatId"].as_str().expect("a chatId").to_owned()
}

/// Every item of the calling device's inbox as `sync` returns it, page by page, without acking.
pub async fn inbox(client: &Client) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let page = ok(client, "sync", json!({ "limit": 100, "cursor": cursor })).await;
        items.extend(page["messages"].as_array().expect("messages").iter().cloned());
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            return items;
        }
    }
}

/// The messageIds of [`inbox`].
pub async fn inbox_ids(client: &Client) -> Vec<String> {
    inbox(client).await.iter().map(|m| m["messageId"].as_str().expect("a messageId").to_owned()).collect()
}

/// The next `deviceList` push about `user`, skipping every other frame.
pub async fn device_list(client: &mut Client, user: &str) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_of_type(client, "deviceList", left).await?;
        if frame["userId"] == user {
            return Some(frame);
        }
    }
}

/// Claim limits count per hour of the server's clock: a test of them waits
/// until it is more than a minute away from the next hour, so that its
/// claims all fall in one hour.
pub async fn clear_of_the_hour() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64;
    let to_next = 3_600_000 - ms % 3_600_000;
    if to_next < 60_000 {
        tokio::time::sleep(Duration::from_millis(to_next + 1_000)).await;
    }
}
