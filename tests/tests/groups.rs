//! Group chats large enough that the deployed store keeps each message once
//! (six recipient devices or more, see shared/aws/src/dynamo/shared.rs):
//! every inbox rule of a 1:1 chat holds there too, on either backend.

use courier_tests::client::{Client, Page};
use courier_tests::{QUIET, Server, WAIT};

/// Alice's phone and six other members, one phone each: every message alice
/// sends has six recipient devices. Returns alice, the others, and the chat.
async fn group(server: &Server) -> (Client, Vec<Client>, String) {
    let alice = server.connect("alice", "phone").await;
    let names = ["bob", "carol", "dave", "erin", "frank", "grace"];
    let mut others = Vec::new();
    for name in names {
        others.push(server.connect(name, "phone").await);
    }
    let chat = alice.create_chat(&names, "seven").await.unwrap();
    (alice, others, chat)
}

async fn send(alice: &Client, chat: &str, texts: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut ids = Vec::new();
    for text in texts {
        ids.push(alice.send_message(chat, &text).await.unwrap().message_id.to_string());
    }
    ids
}

fn ids(page: &Page) -> Vec<String> {
    page.messages.iter().map(|m| m.message_id.to_string()).collect()
}

async fn inbox(client: &Client) -> Vec<String> {
    client.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect()
}

async fn ack(client: &Client, ids: &[String]) -> u64 {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    client.ack(&refs).await.unwrap()
}

#[tokio::test]
async fn an_offline_member_pages_through_the_group_backlog_and_acks_for_its_device_only() {
    let server = Server::start().await;
    let (alice, others, chat) = group(&server).await;
    others[0].close();
    let sent = send(&alice, &chat, (0..7).map(|i| format!("backlog {i}"))).await;

    let bob = server.connect("bob", "phone").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = bob.sync(Some(3), cursor.as_deref()).await.unwrap();
        assert!(page.messages.len() <= 3);
        // Acking a page before asking for the next skips nothing.
        assert_eq!(ack(&bob, &ids(&page)).await, page.messages.len() as u64);
        seen.extend(ids(&page));
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, sent, "every message once, oldest first");
    assert!(inbox(&bob).await.is_empty(), "acked");
    assert_eq!(inbox(&others[1]).await, sent, "carol's inbox is her own");
    assert_eq!(ack(&bob, &sent).await, 0, "an ack counts only what the inbox held");
}

#[tokio::test]
async fn group_and_direct_messages_share_one_inbox_in_sending_order() {
    let server = Server::start().await;
    let (alice, others, group_chat) = group(&server).await;
    let direct = alice.create_chat(&["bob"], "just us").await.unwrap();
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.extend(send(&alice, &group_chat, [format!("to all {i}")]).await);
        sent.extend(send(&alice, &direct, [format!("to bob {i}")]).await);
    }
    assert_eq!(inbox(&others[0]).await, sent);
    assert_eq!(
        inbox(&others[1]).await,
        [&sent[0..1], &sent[2..3], &sent[4..5]].concat(),
        "carol: the group's"
    );
    assert_eq!(ack(&others[0], &sent).await, 6);
    assert!(inbox(&others[0]).await.is_empty());
}

#[tokio::test]
async fn a_pushed_group_message_stays_until_acked_and_an_ack_out_of_order_takes_only_its_id() {
    let server = Server::start().await;
    let (alice, mut others, chat) = group(&server).await;
    let sent = send(&alice, &chat, (0..3).map(|i| format!("pushed {i}"))).await;
    for id in &sent {
        assert_eq!(others[0].next_message(WAIT).await.unwrap().message_id.as_str(), id);
    }
    assert_eq!(inbox(&others[0]).await, sent, "a push is not an ack");
    assert_eq!(ack(&others[0], &sent[1..2]).await, 1);
    assert_eq!(inbox(&others[0]).await, [&sent[0..1], &sent[2..]].concat());
    others.swap_remove(0).close();
    let bob = server.connect("bob", "phone").await;
    assert_eq!(inbox(&bob).await, [&sent[0..1], &sent[2..]].concat(), "after a reconnect too");
    assert_eq!(ack(&bob, &sent).await, 2);
    assert!(inbox(&bob).await.is_empty(), "never again after the ack");
}

#[tokio::test]
async fn a_removed_member_keeps_what_was_sent_before_and_gets_nothing_after() {
    let server = Server::start().await;
    let (alice, mut others, chat) = group(&server).await;
    let before = send(&alice, &chat, ["before".to_owned()]).await;
    alice.modify(&chat, "bob", "REMOVE").await.unwrap();
    let after = send(&alice, &chat, ["after".to_owned()]).await;
    assert_eq!(inbox(&others[0]).await, before);
    assert_eq!(inbox(&others[1]).await, [before, after].concat(), "the others get both");
    while others[0].next_message(QUIET).await.is_some() {}
}

#[tokio::test]
async fn a_device_that_takes_a_removed_ones_id_starts_empty() {
    let server = Server::start().await;
    let (alice, others, chat) = group(&server).await;
    let bob_laptop = server.connect("bob", "laptop").await;
    others[0].close();
    let old = send(&alice, &chat, ["for the old phone".to_owned()]).await;
    assert_eq!(inbox(&bob_laptop).await, old);
    bob_laptop.remove_device("phone").await.unwrap();

    let phone = server.connect("bob", "phone").await;
    assert!(inbox(&phone).await.is_empty(), "what the removed phone held went with it");
    let new = send(&alice, &chat, ["for the new phone".to_owned()]).await;
    assert_eq!(inbox(&phone).await, new);
    assert_eq!(inbox(&bob_laptop).await, [old, new].concat());
}

#[tokio::test]
async fn a_device_added_later_gets_only_what_is_sent_after() {
    let server = Server::start().await;
    let (alice, others, chat) = group(&server).await;
    let old = send(&alice, &chat, ["before the laptop".to_owned()]).await;
    let bob_laptop = server.connect("bob", "laptop").await;
    assert!(inbox(&bob_laptop).await.is_empty());
    let new = send(&alice, &chat, ["after".to_owned()]).await;
    assert_eq!(inbox(&bob_laptop).await, new);
    assert_eq!(inbox(&others[0]).await, [old, new].concat());
}
