//! Encrypted chats (protocol version 2): the device check on sendMessage,
//! delivery to ready devices only, and sendToDevices.

mod v2;

use courier_tests::client::Client;
use courier_tests::{QUIET, Server, WAIT, next_of_type};
use serde_json::{Value, json};
use v2::{
    create_chat, digest, digest_of, inbox, inbox_ids, ok, publish, recipients, refusal, refused, sorted,
};

/// An encrypted sendMessage with the sender's `devices` digest; the whole response frame.
async fn send(client: &Client, chat: &str, text: &str, devices: &str, client_message_id: &str) -> Value {
    client
        .request(
            "sendMessage",
            json!({ "chatId": chat, "message": text, "devices": devices, "clientMessageId": client_message_id }),
        )
        .await
        .expect("an answer")
}

fn message_id(frame: &Value) -> String {
    assert_eq!(frame["status"], "SUCCESS", "{frame}");
    frame["data"]["messageId"].as_str().expect("a messageId").to_owned()
}

/// sendToDevices of `(userId, deviceId, body)` items; the whole response frame.
async fn to_devices(client: &Client, items: &[(&str, &str, &str)], client_message_id: Option<&str>) -> Value {
    let mut fields = to_devices_fields(items);
    if let Some(id) = client_message_id {
        fields["clientMessageId"] = json!(id);
    }
    client.request("sendToDevices", fields).await.expect("an answer")
}

/// Every frame that arrives within QUIET, by `type`.
async fn quiet_types(client: &mut Client) -> Vec<String> {
    let mut types = Vec::new();
    while let Some(frame) = client.next_frame(QUIET).await {
        types.push(frame["type"].as_str().unwrap_or_default().to_owned());
    }
    types
}

#[tokio::test]
async fn list_chats_shows_which_chats_are_encrypted() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let secret = create_chat(&alice, &["bob"], true).await;
    let plain = create_chat(&alice, &["bob"], false).await;
    let default = alice.create_chat(&["bob"], "v1 style").await.unwrap();
    let bob = server.connect("bob", "phone").await;

    let listed = ok(&bob, "listChats", json!({})).await;
    let encrypted = |chat: &str| {
        let found = listed["chats"].as_array().unwrap().iter().find(|c| c["chatId"] == chat);
        found.unwrap_or_else(|| panic!("{chat} not listed: {listed}"))["encrypted"].clone()
    };
    assert_eq!(encrypted(&secret), json!(true));
    assert_eq!(encrypted(&plain), json!(false));
    assert_eq!(encrypted(&default), json!(false), "not encrypted unless asked");
    let mistyped = json!({ "participants": ["bob"], "name": "c", "encrypted": "yes" });
    assert_eq!(refusal(&alice, "createChat", mistyped).await, "BAD_REQUEST");
}

#[tokio::test]
async fn a_message_to_an_encrypted_chat_must_carry_devices_and_a_plain_chat_ignores_them() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    publish(&alice, "KA", 0).await;
    publish(&bob, "KB", 0).await;
    let secret = create_chat(&alice, &["bob"], true).await;
    let plain = create_chat(&alice, &["bob"], false).await;

    let bare = json!({ "chatId": secret, "message": "ciphertext" });
    assert_eq!(refusal(&alice, "sendMessage", bare).await, "BAD_REQUEST");
    assert!(bob.next_message(QUIET).await.is_none(), "nothing was sent");
    assert!(inbox(&bob).await.is_empty(), "nothing was stored");

    // In a plain chat `devices` means nothing, even a wrong one: every device gets the message.
    let sent = message_id(&send(&alice, &plain, "hello", "not a digest", "p1").await);
    for device in [&mut bob, &mut bob_laptop] {
        let got = device.next_message(WAIT).await.expect("the plain message");
        assert_eq!(got.message_id.as_str(), sent);
    }
}

#[tokio::test]
async fn a_stale_device_list_is_refused_with_the_current_one_and_nothing_is_stored() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_tablet = server.connect("bob", "tablet").await;
    publish(&alice, "KAP", 0).await;
    publish(&alice_laptop, "KAL", 0).await;
    publish(&bob, "KBP", 0).await;
    let chat = create_chat(&alice, &["bob"], true).await;

    let current = [("alice", "laptop", "KAL"), ("bob", "phone", "KBP")];
    for (what, believed) in [
        ("the sender's other device is missing", digest(&[("bob", "phone", "KBP")])),
        ("an identity key is wrong", digest(&[("alice", "laptop", "KAL"), ("bob", "phone", "KX")])),
        ("the sending device is no recipient", digest(&[("alice", "phone", "KAP"), current[0], current[1]])),
        (
            "a device that is not ready is no recipient",
            digest(&[current[0], current[1], ("bob", "tablet", "KBT")]),
        ),
        ("the digest of nothing", digest(&[])),
    ] {
        let frame = send(&alice, &chat, "ciphertext", &believed, "m1").await;
        assert_eq!(frame["status"], "FAILURE", "{what}: {frame}");
        assert_eq!(frame["error"]["code"], "MISMATCHED_DEVICES", "{what}: {frame}");
        assert!(frame["error"]["message"].is_string(), "{frame}");
        assert_eq!(sorted(&frame["error"]["devices"]), recipients(&current), "{what}: the current list");
    }
    assert!(bob.next_message(QUIET).await.is_none(), "nothing was sent");
    assert!(inbox(&bob).await.is_empty() && inbox(&alice_laptop).await.is_empty(), "nothing was stored");

    // The client takes the list it was given and sends again with the same clientMessageId.
    let frame = send(&alice, &chat, "ciphertext", &digest(&[("bob", "phone", "KBP")]), "m1").await;
    let fresh = digest_of(&frame["error"]["devices"]);
    assert_eq!(fresh, digest(&current));
    let sent = message_id(&send(&alice, &chat, "ciphertext", &fresh, "m1").await);
    let got = bob.next_message(WAIT).await.expect("bob's phone gets it");
    assert_eq!((got.message_id.as_str(), got.message.as_str()), (sent.as_str(), "ciphertext"));
    assert_eq!(message_id(&send(&alice, &chat, "ciphertext", &fresh, "m1").await), sent, "a retry");
    assert!(bob.next_message(QUIET).await.is_none(), "a retry delivers nothing twice");
    assert_eq!(inbox_ids(&alice_laptop).await, vec![sent.clone()], "the sender's other device has it once");

    // bob's tablet becomes ready: the list alice holds is stale again.
    publish(&bob_tablet, "KBT", 0).await;
    let frame = send(&alice, &chat, "second", &fresh, "m2").await;
    assert_eq!(frame["error"]["code"], "MISMATCHED_DEVICES", "{frame}");
    let now = [current[0], current[1], ("bob", "tablet", "KBT")];
    assert_eq!(sorted(&frame["error"]["devices"]), recipients(&now));
    let second = message_id(&send(&alice, &chat, "second", &digest(&now), "m2").await);
    assert_eq!(bob_tablet.next_message(WAIT).await.expect("the tablet gets it").message_id.as_str(), second);
}

#[tokio::test]
async fn only_ready_devices_get_an_encrypted_message() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    publish(&alice, "KA", 0).await;
    publish(&bob, "KB", 0).await;
    let chat = create_chat(&alice, &["bob"], true).await;

    let first = message_id(&send(&alice, &chat, "c1", &digest(&[("bob", "phone", "KB")]), "m1").await);
    assert_eq!(bob.next_message(WAIT).await.expect("the ready phone").message_id.as_str(), first);
    for (who, device) in [("bob's laptop", &mut bob_laptop), ("alice's laptop", &mut alice_laptop)] {
        assert!(device.next_message(QUIET).await.is_none(), "{who} is not ready: no push");
        assert!(inbox(device).await.is_empty(), "{who} is not ready: nothing stored");
    }

    // Ready later, the laptop gets what is sent from then on, and nothing from before.
    publish(&bob_laptop, "KL", 0).await;
    let now = digest(&[("bob", "phone", "KB"), ("bob", "laptop", "KL")]);
    let second = message_id(&send(&alice, &chat, "c2", &now, "m2").await);
    assert_eq!(bob_laptop.next_message(WAIT).await.expect("now ready").message_id.as_str(), second);
    assert_eq!(inbox_ids(&bob_laptop).await, vec![second.clone()]);
    assert_eq!(inbox_ids(&bob).await, vec![first, second]);
}

#[tokio::test]
async fn a_user_with_no_ready_device_gets_no_pending_inbox_of_an_encrypted_chat() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    publish(&alice, "KA", 0).await;
    // carol has never connected: a plain chat keeps a pending inbox for her, an encrypted one does not.
    let secret = create_chat(&alice, &["carol"], true).await;
    let plain = create_chat(&alice, &["carol"], false).await;
    let nobody = digest(&[]);
    message_id(&send(&alice, &secret, "ciphertext", &nobody, "e1").await);
    let kept = message_id(&send(&alice, &plain, "hello", "", "p1").await);

    let carol = server.connect("carol", "phone").await;
    assert_eq!(inbox_ids(&carol).await, vec![kept.clone()], "the plain chat's backlog only");
    // Connected but not ready is no better.
    message_id(&send(&alice, &secret, "ciphertext", &nobody, "e2").await);
    assert_eq!(inbox_ids(&carol).await, vec![kept]);
}

#[tokio::test]
async fn send_to_devices_stores_one_item_per_named_device_and_pushes_and_syncs_it() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    publish(&alice, "KA", 0).await;
    publish(&alice_laptop, "KAL", 0).await;
    publish(&bob, "KB", 0).await;
    publish(&bob_laptop, "KL", 0).await;
    bob_laptop.close();
    let plain = create_chat(&alice, &["bob"], false).await;

    let frame =
        to_devices(&alice, &[("bob", "phone", "for-phone"), ("bob", "laptop", "for-laptop")], None).await;
    let id = message_id(&frame);
    assert_eq!(frame["data"].as_object().unwrap().len(), 1, "data is {{messageId}}: {frame}");

    let pushed = next_of_type(&mut bob, "deviceMessage", WAIT).await.expect("a deviceMessage push");
    let timestamp = pushed["timestamp"].as_i64().expect("a timestamp");
    let expected = |body: &str| {
        json!({
            "type": "deviceMessage", "messageId": id, "userId": "alice", "deviceId": "phone",
            "body": body, "timestamp": timestamp,
        })
    };
    assert_eq!(pushed, expected("for-phone"));
    assert!(next_of_type(&mut alice_laptop, "deviceMessage", QUIET).await.is_none(), "only named devices");
    assert!(inbox(&alice_laptop).await.is_empty());

    // Offline, the laptop finds its own item in sync, with chat messages typed apart.
    let sent = alice.send_message(&plain, "plain text").await.unwrap();
    let bob_laptop = server.connect("bob", "laptop").await;
    let items = inbox(&bob_laptop).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], expected("for-laptop"), "synced as it would have been pushed");
    assert_eq!(items[1]["type"], "newMessage", "{}", items[1]);
    assert_eq!(items[1]["messageId"], sent.message_id.as_str());
    assert_eq!(items[1]["message"], "plain text");

    // Acked like a message, per device.
    assert_eq!(inbox(&bob).await[0], expected("for-phone"), "at least once until acked");
    assert_eq!(bob.ack(&[id.as_str()]).await.unwrap(), 1);
    assert_eq!(inbox_ids(&bob).await, vec![sent.message_id.to_string()]);
    assert_eq!(inbox(&bob_laptop).await.len(), 2, "the laptop's item is its own");
}

#[tokio::test]
async fn send_to_devices_reaches_the_users_own_devices_without_a_chat() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    publish(&alice_laptop, "KAL", 0).await;
    let id = message_id(&to_devices(&alice, &[("alice", "laptop", "history key")], None).await);
    let pushed = next_of_type(&mut alice_laptop, "deviceMessage", WAIT).await.expect("a push");
    assert_eq!(
        (pushed["messageId"].as_str(), pushed["body"].as_str()),
        (Some(id.as_str()), Some("history key"))
    );
}

#[tokio::test]
async fn send_to_devices_is_idempotent_by_client_message_id_apart_from_send_message() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    publish(&bob, "KB", 0).await;
    let chat = create_chat(&alice, &["bob"], false).await;

    let keys = message_id(&to_devices(&alice, &[("bob", "phone", "once")], Some("x")).await);
    let again = to_devices(&alice, &[("bob", "phone", "twice")], Some("x")).await;
    assert_eq!(message_id(&again), keys, "a retry returns the first messageId");
    // The same clientMessageId names another send in sendMessage's namespace.
    let text = json!({ "chatId": chat, "message": "hi", "clientMessageId": "x" });
    let said = alice.send_message_with(text.clone()).await.expect("sendMessage").message_id.to_string();
    assert_ne!(said, keys);
    assert_eq!(alice.send_message_with(text).await.unwrap().message_id.as_str(), said);
    assert_eq!(message_id(&to_devices(&alice, &[("bob", "phone", "thrice")], Some("x")).await), keys);

    let items = inbox(&bob).await;
    let seen: Vec<(&str, &str)> =
        items.iter().map(|i| (i["type"].as_str().unwrap(), i["messageId"].as_str().unwrap())).collect();
    assert_eq!(seen, vec![("deviceMessage", keys.as_str()), ("newMessage", said.as_str())]);
    assert_eq!(items[0]["body"], "once", "the first send's body");
    let mut pushes = quiet_types(&mut bob).await;
    pushes.retain(|t| t == "deviceMessage" || t == "newMessage");
    assert_eq!(pushes, ["deviceMessage", "newMessage"], "each pushed once");
}

#[tokio::test]
async fn send_to_devices_refuses_a_device_that_is_not_ready_or_does_not_exist() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let _alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let _bob_laptop = server.connect("bob", "laptop").await;
    publish(&bob, "KB", 0).await;
    create_chat(&alice, &["bob"], false).await;

    for (what, second) in [("not ready", "laptop"), ("no such device", "watch")] {
        let frame = to_devices(&alice, &[("bob", "phone", "b"), ("bob", second, "b")], Some("d1")).await;
        assert_eq!(frame["status"], "FAILURE", "{what}: {frame}");
        assert_eq!(frame["error"]["code"], "MISMATCHED_DEVICES", "{what}: {frame}");
        assert_eq!(sorted(&frame["error"]["devices"]), recipients(&[("bob", "phone", "KB")]), "{what}");
    }
    let own = to_devices(&alice, &[("alice", "laptop", "b")], None).await;
    assert_eq!(own["error"]["code"], "MISMATCHED_DEVICES", "alice's laptop is not ready: {own}");
    assert!(next_of_type(&mut bob, "deviceMessage", QUIET).await.is_none(), "nothing was sent");
    assert!(inbox(&bob).await.is_empty(), "nothing was stored");

    // The refused clientMessageId was not used up.
    let id = message_id(&to_devices(&alice, &[("bob", "phone", "b")], Some("d1")).await);
    assert_eq!(inbox_ids(&bob).await, vec![id]);
}

#[tokio::test]
async fn send_to_devices_of_a_user_who_shares_no_chat_is_forbidden() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut mallory = server.connect("mallory", "phone").await;
    publish(&bob, "KB", 0).await;
    publish(&mallory, "KM", 0).await;
    let chat = create_chat(&alice, &["bob"], false).await;

    for (what, items) in [
        ("a stranger", vec![("mallory", "phone", "b")]),
        ("a stranger among co-members", vec![("bob", "phone", "b"), ("mallory", "phone", "b")]),
        ("a user who does not exist", vec![("ghost", "phone", "b")]),
    ] {
        let error = refused(&alice, "sendToDevices", to_devices_fields(&items)).await;
        assert_eq!(error["code"], "FORBIDDEN", "{what}: {error}");
    }
    assert!(next_of_type(&mut bob, "deviceMessage", QUIET).await.is_none());
    assert!(next_of_type(&mut mallory, "deviceMessage", QUIET).await.is_none());
    assert!(inbox(&bob).await.is_empty() && inbox(&mallory).await.is_empty(), "nothing was stored");

    alice.modify(&chat, "bob", "REMOVE").await.expect("remove bob");
    let error = refused(&alice, "sendToDevices", to_devices_fields(&[("bob", "phone", "b")])).await;
    assert_eq!(error["code"], "FORBIDDEN", "bob left the only chat they shared");
}

/// The fields of a sendToDevices of `(userId, deviceId, body)` items.
fn to_devices_fields(items: &[(&str, &str, &str)]) -> Value {
    let messages: Vec<Value> =
        items.iter().map(|(u, d, b)| json!({ "userId": u, "deviceId": d, "body": b })).collect();
    json!({ "messages": messages })
}
