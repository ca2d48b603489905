//! Crash test: SIGKILL the real courier-local at random moments while two
//! devices send and a third syncs and acks, restart it on the same data,
//! and check the two promises of PROTOCOL.md that a crash could break:
//! no message answered SUCCESS is lost, and no message whose ack was
//! answered comes back.
//!
//! `COURIER_CRASH_ROUNDS` sets the number of kills (default 3, so the test
//! command stays quick; the documented long run uses 20).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use courier_tests::Process;
use courier_tests::client::Client;
use rand::Rng;
use tokio::sync::Notify;

/// Enough tokens that the rate limit never shapes the load.
const SETTINGS: [(&str, &str); 2] =
    [("COURIER_RATE_BURST", "1000000"), ("COURIER_RATE_PER_SECOND", "1000000")];

fn rounds() -> usize {
    std::env::var("COURIER_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3)
}

/// Sends until the server goes away; returns the ids answered SUCCESS.
async fn send_until_killed(client: Client, chat: String) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0.. {
        match client.send_message(&chat, &format!("m{i}")).await {
            Ok(answer) => sent.push(answer.message_id.to_string()),
            Err(_) => break,
        }
    }
    sent
}

/// Syncs and acks pages until the server goes away; returns the ids whose ack
/// was answered SUCCESS, and those of the ack that got no answer: the server
/// may have committed it before it died, so they may be gone without being lost.
/// `flowing` is told when the first ack is answered.
async fn ack_until_killed(client: Client, flowing: Arc<Notify>) -> (Vec<String>, Vec<String>) {
    let mut acked = Vec::new();
    loop {
        let Ok(page) = client.sync(Some(50), None).await else { break };
        let ids: Vec<String> = page.messages.iter().map(|m| m.message_id.to_string()).collect();
        if ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        match client.ack(&refs).await {
            Ok(_) => {
                acked.extend(ids);
                flowing.notify_one();
            }
            Err(_) => return (acked, ids),
        }
    }
    (acked, Vec::new())
}

#[tokio::test]
async fn sigkill_under_load_loses_no_success_and_brings_back_no_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Process::start_env(dir.path(), &SETTINGS).await;
    let chat = {
        let alice = server.connect("alice", "phone").await;
        server.connect("bob", "phone").await;
        server.connect("carol", "phone").await;
        alice.create_chat(&["bob", "carol"], "crash").await.unwrap()
    };
    let (mut sent, mut acked, mut maybe_acked) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());

    for round in 0..rounds() {
        let alice = server.connect("alice", "phone").await;
        let carol = server.connect("carol", "phone").await;
        let bob = server.connect("bob", "phone").await;
        let senders = [
            tokio::spawn(send_until_killed(alice, chat.clone())),
            tokio::spawn(send_until_killed(carol, chat.clone())),
        ];
        let flowing = Arc::new(Notify::new());
        let receiver = tokio::spawn(ack_until_killed(bob, flowing.clone()));

        // The kill lands at a random moment once the round's load flows (a
        // first ack answered), not during connection set-up: on a slow backend
        // a blind timer can fire before anything was acked, and the round
        // then tests nothing.
        tokio::time::timeout(Duration::from_secs(60), flowing.notified())
            .await
            .expect("an ack answered within 60 s of the round's start");
        let after = Duration::from_millis(rand::rng().random_range(20..400));
        tokio::time::sleep(after).await;
        server.kill().await;
        for sender in senders {
            sent.extend(sender.await.unwrap());
        }
        let (answered, unanswered) = receiver.await.unwrap();
        acked.extend(answered);
        maybe_acked.extend(unanswered);

        server = Process::start_env(dir.path(), &SETTINGS).await;
        let bob = server.connect("bob", "phone").await;
        let inbox: BTreeSet<String> =
            bob.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
        let back: Vec<&String> = inbox.intersection(&acked).collect();
        assert!(
            back.is_empty(),
            "round {round} (killed after {after:?}): acked messages came back: {back:?}"
        );
        let lost: Vec<&String> = sent
            .iter()
            .filter(|id| !inbox.contains(*id) && !acked.contains(*id) && !maybe_acked.contains(*id))
            .collect();
        assert!(lost.is_empty(), "round {round} (killed after {after:?}): SUCCESS but lost: {lost:?}");
        let committed = maybe_acked.iter().filter(|id| !inbox.contains(*id) && !acked.contains(*id)).count();
        eprintln!(
            "round {round}: killed after {after:?}; {} sent, {} acked, {} waiting in bob's inbox, \
             {} acked without an answer so far",
            sent.len(),
            acked.len(),
            inbox.len(),
            committed
        );
    }
    assert!(
        !sent.is_empty() && !acked.is_empty(),
        "the load ran: {} sent, {} acked",
        sent.len(),
        acked.len()
    );
}
