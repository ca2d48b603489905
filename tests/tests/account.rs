//! deleteAccount (protocol version 2): every device, chat membership,
//! inbox, key and attachment of a user gone, and a fresh start after.

mod v2;

use courier_tests::client::Client;
use courier_tests::{QUIET, Server, WAIT, http, next_of_type, upload};
use serde_json::{Value, json};
use v2::{device_list, inbox, key_count, ok, publish};

/// Sends deleteAccount and waits for the connection to close. The SUCCESS
/// may or may not arrive first; a FAILURE never may.
async fn delete_account(client: &mut Client) {
    match client.request("deleteAccount", json!({})).await {
        Ok(frame) => {
            assert_eq!(frame["status"], "SUCCESS", "{frame}");
            assert_eq!(frame["data"], json!({}), "{frame}");
        }
        Err(e) => assert!(matches!(e, courier_tests::client::CallError::Closed), "{e}"),
    }
    assert!(client.closed(WAIT).await.is_some(), "the caller's own connection is closed");
}

/// The next chatUpdate about `chat`, skipping others.
async fn update_of(client: &mut Client, chat: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let update = next_of_type(client, "chatUpdate", left).await.expect("a chatUpdate");
        if update["chatId"] == chat {
            return update;
        }
    }
}

fn sorted(list: &Value) -> Vec<String> {
    let mut users: Vec<String> =
        list.as_array().expect("a list").iter().map(|u| u.as_str().expect("a userId").to_owned()).collect();
    users.sort();
    users
}

#[tokio::test]
async fn delete_account_closes_every_connection_and_leaves_every_chat() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    let mut bob_tablet = server.connect("bob", "tablet").await;
    // bob is the only admin of the first chat; alice comes first in its list.
    let bobs = bob.create_chat(&["alice", "carol"], "bob's").await.unwrap();
    let alices = alice.create_chat(&["bob"], "alice's").await.unwrap();
    for chat in [&bobs, &alices] {
        update_of(&mut alice, chat).await;
    }
    update_of(&mut carol, &bobs).await;

    delete_account(&mut bob).await;
    assert!(bob_laptop.closed(WAIT).await.is_some(), "every device's connection is closed");
    assert!(bob_tablet.closed(WAIT).await.is_some());

    for (who, client) in [("alice", &mut alice), ("carol", &mut carol)] {
        let update = update_of(client, &bobs).await;
        assert_eq!(sorted(&update["participants"]), ["alice", "carol"], "{who}: {update}");
        assert_eq!(update["admins"], json!(["alice"]), "{who}: the admin succession applies");
    }
    let update = update_of(&mut alice, &alices).await;
    assert_eq!(
        (update["participants"].clone(), update["admins"].clone()),
        (json!(["alice"]), json!(["alice"]))
    );
    let listed = alice.list_chats().await.unwrap();
    assert!(listed.chats.iter().all(|c| !c.participants.iter().any(|u| u.as_str() == "bob")), "{listed:?}");

    // Messages now reach the others; bob's three device slots are free again.
    let sent = alice.send_message(&bobs, "after bob").await.unwrap();
    assert_eq!(carol.next_message(WAIT).await.expect("carol").message_id, sent.message_id);
    let bob_watch = server.connect("bob", "watch").await;
    assert!(ok(&bob_watch, "listChats", json!({})).await["chats"].as_array().unwrap().is_empty());
    assert!(inbox(&bob_watch).await.is_empty(), "nothing sent to the chats bob was in reaches him");
}

#[tokio::test]
async fn delete_account_removes_the_inboxes_keys_and_attachments() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    publish(&bob, "KB", 5).await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    bob_laptop.close();
    alice.send_message(&chat, "waiting in the laptop's inbox").await.unwrap();
    let photo = upload(&bob, "image/png", b"bob's photo").await;
    bob.send_message_with(json!({ "chatId": chat, "message": "look", "attachments": [photo] }))
        .await
        .unwrap();
    let link = alice.get_attachment(&photo).await.expect("alice may fetch it while bob is around");
    assert_eq!(http::get(&link.download_url).await.unwrap().status, 200);

    delete_account(&mut bob).await;

    let list = device_list(&mut alice, "bob").await.expect("alice is told bob's devices are gone");
    assert_eq!(list, json!({ "type": "deviceList", "userId": "bob", "devices": [] }));
    for action in ["getKeys", "listDevices"] {
        let frame = alice.request(action, json!({ "userId": "bob" })).await.unwrap();
        let gone = frame["error"]["code"] == "FORBIDDEN" || frame["data"] == json!({ "devices": [] });
        assert!(gone, "{action}: bob's keys are gone: {frame}");
    }
    let fetched = alice.get_attachment(&photo).await;
    assert!(fetched.is_err(), "bob's attachment is gone: {fetched:?}");
    let download = http::get(&link.download_url).await.unwrap();
    assert_ne!(download.status, 200, "its bytes are gone, even by a URL handed out before");

    // The same userId starts a new account: a first device, with nothing from before.
    let bob_laptop = server.connect("bob", "laptop").await;
    assert!(inbox(&bob_laptop).await.is_empty(), "the laptop's inbox went with the account");
    assert_eq!(key_count(&bob_laptop).await, 0);
    assert_eq!(ok(&bob_laptop, "listDevices", json!({ "userId": "bob" })).await, json!({ "devices": [] }));
    assert!(bob_laptop.get_attachment(&photo).await.is_err(), "the new bob does not own it");
    let bob = server.connect("bob", "phone").await;
    publish(&bob, "a new identity", 0).await;
}

#[tokio::test]
async fn delete_account_is_idempotent() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    update_of(&mut alice, &chat).await;
    delete_account(&mut bob).await;
    assert_eq!(update_of(&mut alice, &chat).await["participants"], json!(["alice"]));

    // A retry (its first answer lost with the connection) finds nothing left and succeeds.
    let mut bob = server.connect("bob", "phone").await;
    delete_account(&mut bob).await;
    assert!(next_of_type(&mut alice, "chatUpdate", QUIET).await.is_none(), "nothing more changed");

    // And bob can start over.
    let bob = server.connect("bob", "phone").await;
    let fresh = bob.create_chat(&["alice"], "again").await.unwrap();
    let sent = bob.send_message(&fresh, "hello again").await.unwrap();
    assert_eq!(alice.next_message(WAIT).await.expect("alice").message_id, sent.message_id);
}
