//! Durability, with the real courier-local binary: what was answered SUCCESS
//! survives SIGKILL, and SIGTERM is a clean exit that keeps everything.

use courier_tests::client::ConnectError;
use courier_tests::{Process, WAIT};

#[tokio::test]
async fn a_message_answered_success_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(dir.path()).await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    bob.close();

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.send_message(&chat, &format!("m{i}")).await.unwrap().message_id.to_string());
    }
    // Killed the instant the last SUCCESS is in: no shutdown code runs.
    server.kill().await;

    let server = Process::start(dir.path()).await;
    let bob = server.connect("bob", "phone").await;
    let inbox: Vec<String> =
        bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(inbox, sent, "every message answered SUCCESS is delivered after the crash");
    let alice = server.connect("alice", "phone").await;
    let more = alice.send_message(&chat, "after the crash").await.expect("the chat survived too");
    let mut bob = bob;
    // A fan-out mark lost to the kill makes the feed push that message again
    // (at least once): bob already has those, so only a new one counts.
    let pushed = loop {
        let id = bob.next_message(WAIT).await.expect("a push").message_id;
        if !sent.contains(&id.to_string()) {
            break id;
        }
    };
    assert_eq!(pushed, more.message_id);
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_a_restart_keeps_chats_devices_and_inboxes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(dir.path()).await;
    let alice = server.connect("alice", "phone").await;
    let alice_laptop = server.connect("alice", "laptop").await;
    let alice_tablet = server.connect("alice", "tablet").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "Weekend").await.unwrap();
    let sent = alice.send_message(&chat, "kept").await.unwrap();
    assert_eq!(bob.next_message(WAIT).await.unwrap().message_id, sent.message_id, "pushed, not acked");
    alice_tablet.close();
    drop((alice_laptop, alice_tablet));

    let status = server.terminate().await;
    assert!(status.success(), "SIGTERM is a clean exit, got {status}");
    assert_eq!(bob.closed(WAIT).await, Some(1001), "connections were closed on the way out");

    let server = Process::start(dir.path()).await;
    // Chats.
    let bob = server.connect("bob", "phone").await;
    let chats = bob.list_chats().await.unwrap().chats;
    assert_eq!(chats.len(), 1);
    assert_eq!((chats[0].chat_id.as_str(), chats[0].name.as_str()), (chat.as_str(), "Weekend"));
    // Inboxes: bob never acked; alice's other devices hold their copies.
    let inbox: Vec<_> = bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![sent.message_id.clone()]);
    let alice_tablet = server.connect("alice", "tablet").await;
    let inbox: Vec<_> = alice_tablet.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![sent.message_id.clone()]);
    // Devices: alice still has three, so a fourth is refused; bob's new device is a later one.
    match server.try_connect("alice", "watch").await {
        Err(ConnectError::Refused(403)) => {}
        other => panic!("a 4th device after the restart: {:?}", other.err()),
    }
    let bob_laptop = server.connect("bob", "laptop").await;
    assert!(bob_laptop.sync_all().await.unwrap().is_empty(), "bob already had a device");
    let status = server.terminate().await;
    assert!(status.success(), "{status}");
}
