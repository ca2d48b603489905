//! Devices: removeDevice, and what becomes of a removed device's inbox and connection.

use courier_tests::client::{Client, ConnectError};
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code};
use serde_json::json;

async fn inbox_ids(client: &Client) -> Vec<String> {
    client.sync_all().await.expect("sync").into_iter().map(|m| m.message_id.to_string()).collect()
}

#[tokio::test]
async fn remove_device_drops_the_devices_inbox_and_closes_its_connection() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob_phone = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let sent = alice.send_message(&chat, "kept by the phone only").await.unwrap();
    bob_laptop.next_message(WAIT).await.expect("the laptop got it");

    let frame = bob_phone.request("removeDevice", json!({ "deviceId": "laptop" })).await.unwrap();
    assert_eq!(frame["status"], "SUCCESS", "{frame}");
    assert_eq!(frame["data"], json!({}));
    assert_eq!(bob_laptop.closed(WAIT).await, Some(1000), "the removed device's connection is closed");

    // Messages sent now go to the phone only.
    let after = alice.send_message(&chat, "after").await.unwrap();
    assert_eq!(inbox_ids(&bob_phone).await, vec![sent.message_id.to_string(), after.message_id.to_string()]);
    // The same deviceId connecting again is a new, later device: its old inbox is gone.
    let bob_laptop = server.connect("bob", "laptop").await;
    assert!(inbox_ids(&bob_laptop).await.is_empty(), "the removed inbox went with the device");
}

#[tokio::test]
async fn a_device_may_remove_itself() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob_phone = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    alice.send_message(&chat, "hi").await.unwrap();

    // Every command is answered by exactly one response (docs/protocol.md §4),
    // this one included; then the connection closes.
    let answer = bob_phone.call::<serde_json::Value>("removeDevice", json!({ "deviceId": "phone" })).await;
    assert_eq!(bob_phone.closed(WAIT).await, Some(1000), "its own connection is closed");
    assert_eq!(answer.expect("a SUCCESS response before the close"), json!({}));

    let bob_phone = server.connect("bob", "phone").await;
    assert!(inbox_ids(&bob_phone).await.is_empty(), "its inbox is gone: it is a later device now");
    assert_eq!(inbox_ids(&bob_laptop).await.len(), 1, "the other device keeps its copy");
}

#[tokio::test]
async fn remove_device_names_one_of_the_callers_own_devices() {
    let server = Server::start().await;
    let mut alice_tablet = server.connect("alice", "tablet").await;
    let bob = server.connect("bob", "phone").await;
    assert_eq!(code(bob.remove_device("laptop").await), ErrorCode::NotFound, "bob has no laptop");
    assert_eq!(code(bob.remove_device("tablet").await), ErrorCode::NotFound, "alice's tablet is not bob's");
    assert!(alice_tablet.closed(QUIET).await.is_none(), "alice's device is untouched");
    alice_tablet.list_chats().await.expect("and still connected");
    assert_eq!(code(bob.remove_device("two words").await), ErrorCode::BadRequest, "a malformed deviceId");
    let missing = bob.request("removeDevice", json!({})).await.unwrap();
    assert_eq!(missing["error"]["code"], "BAD_REQUEST");
}

#[tokio::test]
async fn a_removed_offline_device_is_gone_too() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob_phone = server.connect("bob", "phone").await;
    let bob_tablet = server.connect("bob", "tablet").await;
    bob_tablet.close();
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    alice.send_message(&chat, "for the tablet too").await.unwrap();

    bob_phone.remove_device("tablet").await.expect("an offline device can be removed");
    assert_eq!(code(bob_phone.remove_device("tablet").await), ErrorCode::NotFound, "only once");
    let bob_tablet = server.connect("bob", "tablet").await;
    assert!(inbox_ids(&bob_tablet).await.is_empty());
}

#[tokio::test]
async fn a_user_whose_devices_were_all_removed_starts_over_with_a_first_device() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob_phone = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    bob_phone.remove_device("laptop").await.unwrap();
    assert!(bob_laptop.closed(WAIT).await.is_some());
    let mut bob_phone = bob_phone;
    // Whatever the answer to a self-removal, the device must be gone afterwards.
    let _ = bob_phone.remove_device("phone").await;
    assert!(bob_phone.closed(WAIT).await.is_some());

    let sent = alice.send_message(&chat, "while bob has no device").await.unwrap();
    // docs/protocol.md §10: the next device is a first device and gets the backlog.
    let bob_tablet = server.connect("bob", "tablet").await;
    assert_eq!(inbox_ids(&bob_tablet).await, vec![sent.message_id.to_string()]);
}

#[tokio::test]
async fn a_device_unseen_past_the_expiry_frees_its_slot_and_its_user_starts_over() {
    // Devices expire after 30 days unseen; here after 200 ms (moto, slower, gets longer).
    let expiry = if courier_tests::on_aws() { 1500 } else { 200 };
    let server = Server::start_with(|c| c.limits.device_expiry_ms = expiry).await;
    for device in ["phone", "laptop", "tablet"] {
        server.connect("bob", device).await.close();
    }
    let early = server.try_connect("bob", "watch").await;
    assert!(matches!(early, Err(ConnectError::Refused(403))), "a 4th device while the three are fresh");
    tokio::time::sleep(std::time::Duration::from_millis(3 * expiry as u64)).await;

    // alice connects now, so that her own device is fresh.
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let sent = alice.send_message(&chat, "while bob's devices are gone").await.unwrap();
    let watch = server.connect("bob", "watch").await;
    assert_eq!(
        inbox_ids(&watch).await,
        vec![sent.message_id.to_string()],
        "bob had no device left: the watch is a first device"
    );
}
