//! Chats: createChat, modifyChatParticipants and listChats, and the
//! chatUpdate pushes they make.

use courier_tests::client::Client;
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code, next_of_type};
use serde_json::{Value, json};

fn sorted(list: &Value) -> Vec<String> {
    let mut users: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|u| u.as_str().expect("a userId").to_owned())
        .collect();
    users.sort();
    users
}

fn names(users: &[&str]) -> Vec<String> {
    let mut users: Vec<String> = users.iter().map(|u| (*u).to_owned()).collect();
    users.sort();
    users
}

async fn chat_update(client: &mut Client) -> Value {
    next_of_type(client, "chatUpdate", WAIT).await.expect("a chatUpdate push")
}

/// The chat as listChats shows it to `client`.
async fn listed(client: &Client, chat: &str) -> Option<Value> {
    let list: Value = client.call("listChats", json!({})).await.expect("listChats");
    list["chats"].as_array().expect("chats").iter().find(|c| c["chatId"] == chat).cloned()
}

async fn modify(client: &Client, chat: &str, user: &str, operation: &str) -> Result<Vec<String>, ErrorCode> {
    client.modify(chat, user, operation).await.map_err(|e| e.code().unwrap_or_else(|| panic!("{e}")))
}

fn others(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i:03}")).collect()
}

#[tokio::test]
async fn create_chat_tells_every_connected_device_of_every_participant() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut dave = server.connect("dave", "phone").await;

    let chat = alice.create_chat(&["bob", "carol"], "Weekend").await.unwrap();
    assert_eq!(chat.len(), 26, "chatId is a ULID: {chat}");

    for (who, client) in [("alice", &mut alice), ("alice's laptop", &mut alice_laptop), ("bob", &mut bob)] {
        let update = chat_update(client).await;
        let mut keys: Vec<&str> = update.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["admins", "chatId", "name", "participants", "type"], "{who}: {update}");
        assert_eq!(update["chatId"], chat.as_str(), "{who}");
        assert_eq!(update["name"], "Weekend", "{who}");
        assert_eq!(sorted(&update["participants"]), names(&["alice", "bob", "carol"]), "{who}");
        assert_eq!(update["admins"], json!(["alice"]), "{who}");
    }
    assert!(dave.next_frame(QUIET).await.is_none(), "a non-participant hears nothing");

    // carol was offline: she finds the chat in listChats, and nothing is pushed on connect.
    let mut carol = server.connect("carol", "phone").await;
    let seen = listed(&carol, &chat).await.expect("carol lists the chat");
    assert_eq!(seen["name"], "Weekend");
    assert_eq!(sorted(&seen["participants"]), names(&["alice", "bob", "carol"]));
    assert_eq!(seen["admins"], json!(["alice"]));
    assert!(carol.next_frame(QUIET).await.is_none(), "no chatUpdate is pushed on connect");
    assert!(listed(&dave, &chat).await.is_none(), "a non-participant does not list it");
}

#[tokio::test]
async fn create_chat_dedupes_participants_and_always_includes_the_caller() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob", "bob", "alice", "carol", "carol", "bob"], "dupes").await.unwrap();
    let seen = listed(&alice, &chat).await.unwrap();
    assert_eq!(seen["participants"].as_array().unwrap().len(), 3, "{seen}");
    assert_eq!(sorted(&seen["participants"]), names(&["alice", "bob", "carol"]));
    assert_eq!(seen["admins"], json!(["alice"]), "the caller is admin even when listed among the others");
}

#[tokio::test]
async fn a_chat_needs_at_least_two_participants() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    assert_eq!(code(alice.create_chat(&[], "alone").await), ErrorCode::BadRequest);
    assert_eq!(code(alice.create_chat(&["alice"], "me").await), ErrorCode::BadRequest);
    assert_eq!(code(alice.create_chat(&["alice", "alice"], "me twice").await), ErrorCode::BadRequest);
    let missing = alice.request("createChat", json!({ "name": "no list" })).await.unwrap();
    assert_eq!(missing["error"]["code"], "BAD_REQUEST", "{missing}");
    let bad_user = alice.create_chat(&["bob smith"], "bad").await;
    assert_eq!(code(bad_user), ErrorCode::BadRequest, "a malformed userId");
    alice.create_chat(&["bob"], "two").await.expect("two participants are enough");
    assert!(alice.list_chats().await.unwrap().chats.len() == 1, "only the valid chat was made");
}

#[tokio::test]
async fn a_chat_has_at_most_100_participants() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let hundred = others(99);
    let refs: Vec<&str> = hundred.iter().map(String::as_str).collect();
    let chat = alice.create_chat(&refs, "full").await.expect("100 in all");
    assert_eq!(listed(&alice, &chat).await.unwrap()["participants"].as_array().unwrap().len(), 100);

    let mut with_self = refs.clone();
    with_self.push("alice");
    alice.create_chat(&with_self, "full too").await.expect("the caller counted once: 100 in all");

    let too_many = others(100);
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_eq!(code(alice.create_chat(&refs, "101").await), ErrorCode::LimitExceeded);
}

#[tokio::test]
async fn a_chat_name_is_1_to_128_characters() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    assert_eq!(code(alice.create_chat(&["bob"], "").await), ErrorCode::BadRequest, "empty name");
    // Characters, not bytes: 128 two-byte characters fit.
    let longest = "é".repeat(128);
    let chat = alice.create_chat(&["bob"], &longest).await.expect("128 characters");
    assert_eq!(listed(&alice, &chat).await.unwrap()["name"], longest.as_str());
    // Past a maximum is LIMIT_EXCEEDED (PROTOCOL.md error codes; docs/protocol.md §4.1).
    assert_eq!(code(alice.create_chat(&["bob"], &"n".repeat(129)).await), ErrorCode::LimitExceeded);
}

#[tokio::test]
async fn only_an_admin_adds_anyone_or_removes_others() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mallory = server.connect("mallory", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "c").await.unwrap();

    assert_eq!(modify(&bob, &chat, "dave", "ADD").await, Err(ErrorCode::Forbidden));
    assert_eq!(modify(&bob, &chat, "carol", "REMOVE").await, Err(ErrorCode::Forbidden));
    assert_eq!(modify(&bob, &chat, "alice", "REMOVE").await, Err(ErrorCode::Forbidden));
    assert_eq!(modify(&mallory, &chat, "mallory", "ADD").await, Err(ErrorCode::Forbidden));
    assert_eq!(modify(&mallory, &chat, "bob", "REMOVE").await, Err(ErrorCode::Forbidden));
    let seen = listed(&alice, &chat).await.unwrap();
    assert_eq!(sorted(&seen["participants"]), names(&["alice", "bob", "carol"]), "nothing changed");

    let mut after = modify(&alice, &chat, "dave", "ADD").await.unwrap();
    after.sort();
    assert_eq!(after, names(&["alice", "bob", "carol", "dave"]));
    let mut after = modify(&alice, &chat, "carol", "REMOVE").await.unwrap();
    after.sort();
    assert_eq!(after, names(&["alice", "bob", "dave"]));
    assert_eq!(sorted(&listed(&bob, &chat).await.unwrap()["participants"]), after);
}

#[tokio::test]
async fn modify_chat_participants_checks_its_fields() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    assert_eq!(modify(&alice, "01NOSUCHCHAT0000000000000", "bob", "ADD").await, Err(ErrorCode::NotFound));
    assert_eq!(modify(&alice, &chat, "dave", "KICK").await, Err(ErrorCode::BadRequest));
    assert_eq!(modify(&alice, &chat, "dave", "add").await, Err(ErrorCode::BadRequest));
    assert_eq!(modify(&alice, &chat, "dave smith", "ADD").await, Err(ErrorCode::BadRequest));
    let missing = alice.request("modifyChatParticipants", json!({ "chatId": chat, "userId": "dave" })).await;
    assert_eq!(missing.unwrap()["error"]["code"], "BAD_REQUEST");
}

#[tokio::test]
async fn anyone_may_leave_even_when_that_leaves_fewer_than_two() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let carol = server.connect("carol", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "c").await.unwrap();

    let mut left = modify(&carol, &chat, "carol", "REMOVE").await.expect("a member leaves");
    left.sort();
    assert_eq!(left, names(&["alice", "bob"]));
    assert_eq!(modify(&bob, &chat, "bob", "REMOVE").await.unwrap(), vec!["alice".to_owned()]);
    assert!(listed(&bob, &chat).await.is_none(), "bob no longer lists the chat");
    let seen = listed(&alice, &chat).await.expect("alice is alone in it");
    assert_eq!(seen["participants"], json!(["alice"]));
    assert_eq!(seen["admins"], json!(["alice"]));
    assert_eq!(modify(&alice, &chat, "alice", "REMOVE").await.unwrap(), Vec::<String>::new());
    assert!(listed(&alice, &chat).await.is_none());
}

#[tokio::test]
async fn the_longest_standing_participant_becomes_admin_when_the_last_admin_leaves() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let dave = server.connect("dave", "phone").await;
    // carol comes before bob in createChat's list; dave joins later.
    let chat = alice.create_chat(&["carol", "bob"], "c").await.unwrap();
    modify(&alice, &chat, "dave", "ADD").await.unwrap();
    chat_update(&mut carol).await; // created
    chat_update(&mut carol).await; // dave added

    modify(&alice, &chat, "alice", "REMOVE").await.unwrap();
    let update = chat_update(&mut carol).await;
    assert_eq!(update["admins"], json!(["carol"]), "{update}");
    assert_eq!(listed(&bob, &chat).await.unwrap()["admins"], json!(["carol"]));
    // The new admin has the admin's rights.
    modify(&carol, &chat, "erin", "ADD").await.expect("the new admin adds");
    modify(&carol, &chat, "erin", "REMOVE").await.expect("the new admin removes others");

    modify(&carol, &chat, "carol", "REMOVE").await.unwrap();
    assert_eq!(listed(&dave, &chat).await.unwrap()["admins"], json!(["bob"]), "bob joined before dave");
    modify(&bob, &chat, "bob", "REMOVE").await.unwrap();
    assert_eq!(listed(&dave, &chat).await.unwrap()["admins"], json!(["dave"]));
}

#[tokio::test]
async fn createchat_order_breaks_seniority_ties_even_when_the_caller_is_listed() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob", "alice", "carol"], "c").await.unwrap();
    modify(&alice, &chat, "alice", "REMOVE").await.unwrap();
    assert_eq!(listed(&bob, &chat).await.unwrap()["admins"], json!(["bob"]));

    let chat = alice.create_chat(&["carol", "bob"], "d").await.unwrap();
    modify(&alice, &chat, "alice", "REMOVE").await.unwrap();
    assert_eq!(listed(&bob, &chat).await.unwrap()["admins"], json!(["carol"]));
}

#[tokio::test]
async fn adding_past_100_participants_is_limit_exceeded() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let hundred = others(99);
    let refs: Vec<&str> = hundred.iter().map(String::as_str).collect();
    let chat = alice.create_chat(&refs, "full").await.unwrap();
    assert_eq!(modify(&alice, &chat, "extra", "ADD").await, Err(ErrorCode::LimitExceeded));
    let seen = listed(&alice, &chat).await.unwrap();
    assert_eq!(seen["participants"].as_array().unwrap().len(), 100);
    modify(&alice, &chat, "user000", "REMOVE").await.unwrap();
    assert_eq!(modify(&alice, &chat, "extra", "ADD").await.unwrap().len(), 100, "a slot opened");
}

#[tokio::test]
async fn participant_changes_are_pushed_to_old_and_new_participants() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let mut dave = server.connect("dave", "phone").await;
    let mut erin = server.connect("erin", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "c").await.unwrap();
    for c in [&mut alice, &mut bob, &mut carol] {
        chat_update(c).await;
    }

    modify(&alice, &chat, "dave", "ADD").await.unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob), ("carol", &mut carol), ("dave", &mut dave)] {
        let update = chat_update(c).await;
        assert_eq!(update["chatId"], chat.as_str(), "{who}");
        assert_eq!(update["name"], "c", "{who}");
        assert_eq!(sorted(&update["participants"]), names(&["alice", "bob", "carol", "dave"]), "{who}");
        assert_eq!(update["admins"], json!(["alice"]), "{who}");
    }

    modify(&alice, &chat, "carol", "REMOVE").await.unwrap();
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob), ("carol", &mut carol), ("dave", &mut dave)] {
        let update = chat_update(c).await;
        assert_eq!(
            sorted(&update["participants"]),
            names(&["alice", "bob", "dave"]),
            "{who} sees carol gone"
        );
    }
    assert!(erin.next_frame(QUIET).await.is_none(), "outsiders hear nothing");
}

#[tokio::test]
async fn adding_a_member_or_removing_a_non_member_changes_nothing() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    chat_update(&mut bob).await; // created

    let mut same = modify(&alice, &chat, "bob", "ADD").await.expect("adding a member is no error");
    same.sort();
    assert_eq!(same, names(&["alice", "bob"]));
    let mut same = modify(&alice, &chat, "zed", "REMOVE").await.expect("removing a stranger is no error");
    same.sort();
    assert_eq!(same, names(&["alice", "bob"]));
    assert!(bob.next_frame(QUIET).await.is_none(), "no chatUpdate when nothing changed");
}

#[tokio::test]
async fn a_removed_user_cannot_send_and_gets_nothing_sent_after_the_removal() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let carol_tablet = server.connect("carol", "tablet").await;
    carol_tablet.close();
    let chat = alice.create_chat(&["bob", "carol"], "c").await.unwrap();

    let before = alice.send_message(&chat, "before").await.unwrap();
    assert_eq!(carol.next_message(WAIT).await.expect("carol is a member").message_id, before.message_id);
    assert_eq!(bob.next_message(WAIT).await.unwrap().message_id, before.message_id);

    modify(&alice, &chat, "carol", "REMOVE").await.unwrap();
    assert_eq!(code(carol.send_message(&chat, "let me in").await), ErrorCode::Forbidden);
    let after = alice.send_message(&chat, "after").await.unwrap();
    assert_eq!(bob.next_message(WAIT).await.unwrap().message_id, after.message_id);
    assert!(carol.next_message(QUIET).await.is_none(), "no push after the removal");

    let inbox: Vec<_> = carol.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![before.message_id.clone()], "sync holds only what was sent before");
    let tablet = server.connect("carol", "tablet").await;
    let inbox: Vec<_> = tablet.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![before.message_id], "her offline device neither");
    assert!(listed(&carol, &chat).await.is_none());
}

#[tokio::test]
async fn a_removed_user_without_devices_gets_nothing_sent_after_the_removal() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob", "carol"], "c").await.unwrap();
    let before = alice.send_message(&chat, "before").await.unwrap();
    modify(&alice, &chat, "carol", "REMOVE").await.unwrap();
    alice.send_message(&chat, "after").await.unwrap();

    let carol = server.connect("carol", "phone").await;
    let inbox: Vec<_> = carol.sync_all().await.unwrap().into_iter().map(|m| m.message_id).collect();
    assert_eq!(inbox, vec![before.message_id]);
    let bob = server.connect("bob", "phone").await;
    assert_eq!(bob.sync_all().await.unwrap().len(), 2, "bob, still a member, has both");
}

#[tokio::test]
async fn an_added_participant_gets_what_is_sent_after_joining_and_may_send() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut dave = server.connect("dave", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    assert_eq!(code(dave.send_message(&chat, "hi?").await), ErrorCode::Forbidden);
    modify(&alice, &chat, "dave", "ADD").await.unwrap();

    let sent = alice.send_message(&chat, "welcome").await.unwrap();
    assert_eq!(dave.next_message(WAIT).await.expect("a push to the new member").message_id, sent.message_id);
    let reply = dave.send_message(&chat, "thanks").await.expect("a new member may send");
    assert_eq!(alice.next_message(WAIT).await.unwrap().message_id, reply.message_id);
}

#[tokio::test]
async fn list_chats_shows_the_callers_current_chats_oldest_first() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    assert!(bob.list_chats().await.unwrap().chats.is_empty());
    let first = alice.create_chat(&["bob"], "first").await.unwrap();
    let second = bob.create_chat(&["alice", "carol"], "second").await.unwrap();
    let third = alice.create_chat(&["bob"], "third").await.unwrap();
    alice.create_chat(&["carol"], "not bob's").await.unwrap();

    let ids: Vec<String> =
        bob.list_chats().await.unwrap().chats.into_iter().map(|c| c.chat_id.into()).collect();
    assert_eq!(ids, vec![first.clone(), second.clone(), third.clone()]);
    modify(&bob, &second, "bob", "REMOVE").await.unwrap();
    let ids: Vec<String> =
        bob.list_chats().await.unwrap().chats.into_iter().map(|c| c.chat_id.into()).collect();
    assert_eq!(ids, vec![first, third]);
}

/// The chat ids of one listChats page, and its cursor.
async fn page(client: &Client, limit: Option<u32>, cursor: Option<&str>) -> (Vec<String>, Option<String>) {
    let mut fields = json!({});
    if let Some(limit) = limit {
        fields["limit"] = json!(limit);
    }
    if let Some(cursor) = cursor {
        fields["cursor"] = json!(cursor);
    }
    let data: Value = client.call("listChats", fields).await.unwrap();
    let ids =
        data["chats"].as_array().unwrap().iter().map(|c| c["chatId"].as_str().unwrap().to_owned()).collect();
    (ids, data["cursor"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn list_chats_comes_in_pages_that_a_cursor_continues() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(alice.create_chat(&["bob"], &format!("c{i}")).await.unwrap());
    }
    let (first, cursor) = page(&alice, Some(2), None).await;
    assert_eq!(first, made[..2]);
    let cursor = cursor.expect("more to come");
    // A chat made now sorts after every page already read: it shows up at the end, once.
    made.push(alice.create_chat(&["carol"], "late").await.unwrap());
    let (second, cursor) = page(&alice, Some(2), Some(&cursor)).await;
    assert_eq!(second, made[2..4]);
    let (rest, end) = page(&alice, Some(100), cursor.as_deref()).await;
    assert_eq!(rest, made[4..]);
    assert_eq!(end, None, "the end of the list");

    let (all, end) = page(&alice, None, None).await;
    assert_eq!((all.len(), end), (6, None), "no limit: up to 50");
    let refused = alice.call::<Value>("listChats", json!({ "limit": 101 })).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitExceeded));
    let refused = alice.call::<Value>("listChats", json!({ "cursor": "not a cursor" })).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::BadRequest));
    let listed: Value = alice.call("listChats", json!({})).await.unwrap();
    assert_eq!(listed["chats"][0]["encrypted"], false);
}

#[tokio::test]
async fn a_user_put_in_many_full_chats_still_gets_every_chat_in_frames_under_100_kib() {
    // Anyone may add anyone: a stranger puts the victim in 24 chats of 100
    // members with the longest ids. One answer of them all would be ~164 KB,
    // past what API Gateway delivers.
    let server = Server::start_with(|c| c.rate_limit.capacity = 1000.0).await;
    let victim = "v".repeat(64);
    let stranger = server.connect(&"s".repeat(64), "phone").await;
    let members: Vec<String> = (0..98).map(|i| format!("{i:0>64}")).collect();
    let mut refs: Vec<&str> = members.iter().map(String::as_str).collect();
    refs.push(&victim);
    for i in 0..24 {
        stranger.create_chat(&refs, &format!("{}{i:03}", "n".repeat(125))).await.unwrap();
    }
    let victim = server.connect(&victim, "phone").await;
    let (mut seen, mut cursor, mut pages) = (0, None, 0);
    loop {
        let frame = victim.request("listChats", json!({ "cursor": cursor })).await.unwrap();
        assert!(frame.to_string().len() < 100 * 1024, "page {pages} is {} bytes", frame.to_string().len());
        let data = &frame["data"];
        seen += data["chats"].as_array().unwrap().len();
        pages += 1;
        cursor = data["cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, 24, "every chat, over {pages} pages");
    assert!(pages > 1);
}

#[tokio::test]
async fn participants_leaving_at_once_all_succeed() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    // Each racing change re-reads the chat; moto answers a few hundred
    // requests a second, so on it fewer leave at once.
    let users = others(if courier_tests::on_aws() { 12 } else { 40 });
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let chat = alice.create_chat(&refs, "big").await.unwrap();
    let mut members = Vec::new();
    for user in &users {
        members.push(server.connect(user, "phone").await);
    }

    let leaving = members.iter().zip(&users).map(|(member, user)| modify(member, &chat, user, "REMOVE"));
    let outcomes = futures_util::future::join_all(leaving).await;
    let failed: Vec<String> = users
        .iter()
        .zip(&outcomes)
        .filter_map(|(user, outcome)| outcome.as_ref().err().map(|code| format!("{user}: {code:?}")))
        .collect();
    assert!(failed.is_empty(), "{} of 40 could not leave: {failed:?}", failed.len());
    assert_eq!(listed(&alice, &chat).await.unwrap()["participants"], json!(["alice"]));
}
