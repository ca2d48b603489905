//! The table ports' contract: one suite that every adapter's tests run, so
//! the SQLite and DynamoDB stores cannot drift apart.
//!
//! Each check makes its own ids, so the suite can share one database (or
//! one emulator) with other runs.

use std::sync::Arc;

use courier_core::domain::{Chat, InboxKey, Member, Millis};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, IdGen, MessageId, UserId};
use courier_core::ports::{
    Attachment, AttachmentStore, ChatStore, Connected, DedupeKey, DeviceStore, MessageStore, Quota,
    QuotaStore, Store, StoredMessage,
};

/// The table ports of one adapter family.
#[derive(Clone)]
pub struct Tables {
    pub chats: Arc<dyn ChatStore>,
    pub devices: Arc<dyn DeviceStore>,
    pub messages: Arc<dyn MessageStore>,
    pub attachments: Arc<dyn AttachmentStore>,
    pub quotas: Arc<dyn QuotaStore>,
}

/// A fixed "now" for the suite; adapters must not read the clock themselves
/// where a port passes the time in.
const NOW: Millis = 1_800_000_000_000;
const DAY: Millis = courier_core::domain::DAY_MS;

struct Names {
    ids: IdGen,
    run: String,
}

impl Names {
    fn new() -> Self {
        let ids = IdGen::new();
        let run = ids.next(NOW)[16..].to_owned();
        Self { ids, run }
    }
    fn user(&self, name: &str) -> UserId {
        UserId::try_from(format!("{name}-{}", self.run)).unwrap()
    }
    fn device(&self, name: &str) -> DeviceId {
        DeviceId::try_from(name).unwrap()
    }
    fn connection(&self) -> ConnectionId {
        ConnectionId::try_from(format!("c{}", &self.ids.next(NOW)[10..])).unwrap()
    }
    fn chat(&self) -> ChatId {
        self.ids.chat(NOW)
    }
    fn message(&self, at: Millis) -> MessageId {
        self.ids.message(at)
    }
}

/// Runs every check.
pub async fn all(t: &Tables) {
    chats(t).await;
    chat_pages(t).await;
    devices(t).await;
    device_limit_and_expiry(t).await;
    messages(t).await;
    dedupe(t).await;
    pending_inbox(t).await;
    expiry(t).await;
    attachments(t).await;
    quotas(t).await;
}

/// A quota counts per user, per quota and per day, and refuses (changing
/// nothing) what would pass the limit, even when charges race.
pub async fn quotas(t: &Tables) {
    let n = Names::new();
    let (u, v) = (n.user("u"), n.user("v"));
    let (q, day) = (Quota::PendingBytes, 20_000);
    assert!(t.quotas.charge(&u, q, day, 60, 100).await.unwrap());
    assert!(t.quotas.charge(&u, q, day, 40, 100).await.unwrap(), "up to the limit exactly");
    assert!(!t.quotas.charge(&u, q, day, 1, 100).await.unwrap(), "past it");
    assert!(t.quotas.charge(&v, q, day, 100, 100).await.unwrap(), "each user has their own");
    assert!(t.quotas.charge(&u, Quota::AttachmentBytes, day, 100, 100).await.unwrap(), "and each quota");
    assert!(!t.quotas.charge(&u, q, day + 1, 101, 100).await.unwrap(), "never more than the limit at once");
    assert!(t.quotas.charge(&u, q, day + 1, 100, 100).await.unwrap(), "a new day starts from zero");

    let w = n.user("w");
    let charges = (0..10).map(|_| t.quotas.charge(&w, q, day, 30, 100));
    let admitted =
        futures_util::future::join_all(charges).await.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    assert_eq!(admitted, 3, "racing charges stay within the limit");
}

/// A chat of `users` made at the suite's time, the first its admin; adapters' own tests use it too.
pub fn chat_of(id: ChatId, users: &[&UserId]) -> Chat {
    Chat {
        id,
        name: "contract".into(),
        members: users.iter().map(|u| Member { user: (*u).clone(), joined_at: NOW }).collect(),
        admins: vec![users[0].clone()],
        created_at: NOW,
        version: 0,
    }
}

pub async fn chats(t: &Tables) {
    let n = Names::new();
    let (a, b, c) = (n.user("a"), n.user("b"), n.user("c"));
    let chat = chat_of(n.chat(), &[&a, &b]);
    t.chats.create_chat(&chat).await.unwrap();
    assert_eq!(t.chats.chat(&chat.id).await.unwrap(), Some(chat.clone()));
    assert_eq!(t.chats.chat(&n.chat()).await.unwrap(), None);

    let mut changed = chat.clone();
    changed.add(c.clone(), NOW + 1, &Default::default()).unwrap();
    changed.remove(&a);
    assert!(t.chats.update_chat(&changed, 0).await.unwrap(), "the expected version matches");
    let stale = chat.clone();
    assert!(!t.chats.update_chat(&stale, 0).await.unwrap(), "a stale version is refused");
    let stored = t.chats.chat(&chat.id).await.unwrap().unwrap();
    assert_eq!(stored, changed);
    assert_eq!(stored.admins, vec![b.clone()], "b inherited admin");

    let ids = |chats: Vec<Chat>| chats.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(t.chats.chats_of(&a, None, 10).await.unwrap()), Vec::<ChatId>::new(), "a left");
    assert_eq!(ids(t.chats.chats_of(&b, None, 10).await.unwrap()), vec![chat.id.clone()]);
    assert_eq!(ids(t.chats.chats_of(&c, None, 10).await.unwrap()), vec![chat.id.clone()]);
}

/// A user's chats come in pages, in chatId order, each after the last id of
/// the one before; chats left are skipped without shortening a page.
pub async fn chat_pages(t: &Tables) {
    let n = Names::new();
    let (u, v) = (n.user("u"), n.user("v"));
    let mut made = Vec::new();
    for _ in 0..7 {
        let chat = chat_of(n.chat(), &[&v, &u]);
        t.chats.create_chat(&chat).await.unwrap();
        made.push(chat);
    }
    // u leaves the second and the fifth.
    for i in [1, 4] {
        let mut left = made[i].clone();
        left.remove(&u);
        assert!(t.chats.update_chat(&left, 0).await.unwrap());
    }
    let expected: Vec<ChatId> =
        made.iter().enumerate().filter(|(i, _)| ![1, 4].contains(i)).map(|(_, c)| c.id.clone()).collect();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = t.chats.chats_of(&u, after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2, "a page holds at most the limit");
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        let full = page.len() == 2;
        seen.extend(page.into_iter().map(|c| c.id));
        if !full {
            break;
        }
    }
    assert_eq!(seen, expected, "every chat of u once, in chatId order, none that u left");
    assert_eq!(t.chats.chats_of(&v, None, 100).await.unwrap().len(), 7);
    assert!(t.chats.chats_of(&u, Some(&made[6].id), 5).await.unwrap().is_empty(), "after the last, nothing");
}

pub async fn devices(t: &Tables) {
    let n = Names::new();
    let u = n.user("u");
    let (phone, laptop) = (n.device("phone"), n.device("laptop"));
    let (c1, c2, c3) = (n.connection(), n.connection(), n.connection());
    let old = NOW - 40 * DAY;

    let first = t.devices.connect(&u, &phone, &c1, NOW, 3, old).await.unwrap();
    assert_eq!(first, Connected::Ok { new_device: true, first_device: true, replaced: None });
    let second = t.devices.connect(&u, &laptop, &c2, NOW, 3, old).await.unwrap();
    assert_eq!(second, Connected::Ok { new_device: true, first_device: false, replaced: None });
    let again = t.devices.connect(&u, &phone, &c3, NOW + 1, 3, old).await.unwrap();
    assert_eq!(again, Connected::Ok { new_device: false, first_device: false, replaced: Some(c1.clone()) });

    // The replaced connection's late $disconnect must not unbind the new one.
    t.devices.disconnect(&c1, NOW + 2).await.unwrap();
    let mut found = t.devices.devices_of(std::slice::from_ref(&u), old).await.unwrap();
    found.sort_by(|x, y| x.id.cmp(&y.id));
    let bound: Vec<_> = found.iter().map(|d| (d.id.clone(), d.connection.clone())).collect();
    assert_eq!(bound, vec![(laptop.clone(), Some(c2.clone())), (phone.clone(), Some(c3.clone()))]);

    t.devices.disconnect(&c2, NOW + 3).await.unwrap();
    let laptop_now = t.devices.devices_of(std::slice::from_ref(&u), old).await.unwrap();
    let laptop_now = laptop_now.iter().find(|d| d.id == laptop).unwrap();
    assert_eq!(laptop_now.connection, None);
    assert_eq!(laptop_now.last_seen, NOW + 3);

    let removed = t.devices.remove_device(&u, &phone).await.unwrap().expect("phone existed");
    assert_eq!(removed.connection, Some(c3));
    assert_eq!(t.devices.remove_device(&u, &phone).await.unwrap(), None);
    assert_eq!(t.devices.devices_of(std::slice::from_ref(&u), old).await.unwrap().len(), 1);
}

pub async fn device_limit_and_expiry(t: &Tables) {
    let n = Names::new();
    let u = n.user("u");
    let cutoff = NOW - 30 * DAY;
    // Three devices: one of them last seen 31 days ago, so expired.
    let stale_day = NOW - 31 * DAY;
    let old_connection = n.connection();
    t.devices
        .connect(&u, &n.device("old"), &old_connection, stale_day, 3, stale_day - 30 * DAY)
        .await
        .unwrap();
    t.devices.disconnect(&old_connection, stale_day).await.unwrap();
    for d in ["d1", "d2"] {
        t.devices.connect(&u, &n.device(d), &n.connection(), NOW, 3, cutoff).await.unwrap();
    }
    // The expired one does not count: a third live device is allowed.
    let third = t.devices.connect(&u, &n.device("d3"), &n.connection(), NOW, 3, cutoff).await.unwrap();
    assert!(matches!(third, Connected::Ok { new_device: true, .. }));
    let fourth = t.devices.connect(&u, &n.device("d4"), &n.connection(), NOW, 3, cutoff).await.unwrap();
    assert_eq!(fourth, Connected::DeviceLimit);
    let live = t.devices.devices_of(std::slice::from_ref(&u), cutoff).await.unwrap();
    assert_eq!(live.len(), 3, "the expired device is not listed");
}

/// New devices connecting at once still get at most `max_devices` slots.
/// Not part of [`all`]: moto does not isolate concurrent transactions (DynamoDB
/// does), so only adapters whose test store isolates writes run it.
pub async fn racing_devices(t: &Tables) {
    let n = Names::new();
    let u = n.user("u");
    let cutoff = NOW - 30 * DAY;
    let devices: Vec<DeviceId> = (0..6).map(|i| n.device(&format!("d{i}"))).collect();
    let connects = devices.iter().map(|d| {
        let (u, c) = (u.clone(), n.connection());
        async move { t.devices.connect(&u, d, &c, NOW, 3, cutoff).await.unwrap() }
    });
    let outcomes = futures_util::future::join_all(connects).await;
    let admitted = outcomes.iter().filter(|o| matches!(o, Connected::Ok { .. })).count();
    assert_eq!(admitted, 3, "{outcomes:?}");
    assert_eq!(t.devices.devices_of(std::slice::from_ref(&u), cutoff).await.unwrap().len(), 3);
    // A removed device frees its slot.
    let live = t.devices.devices_of(std::slice::from_ref(&u), cutoff).await.unwrap();
    t.devices.remove_device(&u, &live[0].id).await.unwrap();
    let again = t.devices.connect(&u, &n.device("late"), &n.connection(), NOW, 3, cutoff).await.unwrap();
    assert!(matches!(again, Connected::Ok { new_device: true, .. }), "{again:?}");
}

fn stored(
    n: &Names,
    chat: &ChatId,
    sender: &UserId,
    to: &[InboxKey],
    at: Millis,
    text: &str,
) -> StoredMessage {
    let id = n.message(at);
    let json = serde_json::json!({
        "messageId": id, "chatId": chat, "userId": sender, "deviceId": "phone",
        "message": text, "attachments": [], "timestamp": at,
    })
    .to_string();
    StoredMessage { chat: chat.clone(), id, timestamp: at, json, recipients: to.to_vec(), fanned_out: false }
}

pub async fn messages(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let chat = n.chat();
    let (b1, b2) = (InboxKey::Device(b.clone(), n.device("b1")), InboxKey::Device(b.clone(), n.device("b2")));
    let expires = NOW + 30 * DAY;
    let m1 = stored(&n, &chat, &a, &[b1.clone(), b2.clone()], NOW, "one");
    let m2 = stored(&n, &chat, &a, &[b1.clone(), b2.clone()], NOW + 1, "two");
    assert_eq!(t.messages.store(&m1, None, expires).await.unwrap(), Store::Stored);
    assert_eq!(t.messages.store(&m2, None, expires).await.unwrap(), Store::Stored);

    assert_eq!(t.messages.message(&chat, &m1.id).await.unwrap(), Some(m1.clone()));
    let page = t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap();
    assert_eq!(page, vec![(m1.id.clone(), m1.json.clone()), (m2.id.clone(), m2.json.clone())]);
    let after = t.messages.inbox_page(&b1, Some(&m1.id), 10, NOW).await.unwrap();
    assert_eq!(after, vec![(m2.id.clone(), m2.json.clone())]);
    assert_eq!(t.messages.inbox_page(&b1, None, 1, NOW).await.unwrap().len(), 1, "limit holds");

    // A generous limit: the suite may share its tables with other runs' rows.
    let unfinished = t.messages.unfinished(NOW + 10, 100_000).await.unwrap();
    assert!(unfinished.contains(&(chat.clone(), m1.id.clone())));
    assert!(
        !t.messages.unfinished(NOW, 100_000).await.unwrap().contains(&(chat.clone(), m1.id.clone())),
        "before bounds it"
    );

    // Ack is per inbox and counts what was there.
    assert_eq!(t.messages.ack(&b1, &[m1.id.clone(), n.message(NOW)]).await.unwrap(), 1);
    assert_eq!(t.messages.ack(&b1, std::slice::from_ref(&m1.id)).await.unwrap(), 0);
    assert_eq!(t.messages.holders(&m1.id, &[b1.clone(), b2.clone()], NOW).await.unwrap(), vec![b2.clone()]);
    assert_eq!(t.messages.inbox_page(&b2, None, 10, NOW).await.unwrap().len(), 2, "b2 keeps its copy");

    t.messages.mark_fanned_out(&chat, &m1.id).await.unwrap();
    // The mark may land after the call returns (SQLite commits it with the next group).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let done = loop {
        let row = t.messages.message(&chat, &m1.id).await.unwrap().unwrap();
        if row.fanned_out || std::time::Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert!(done.fanned_out, "the mark lands");
    assert!(!done.json.contains("one"), "the message row keeps no text after fan-out");
    assert!(
        !t.messages.unfinished(NOW + 10, 100_000).await.unwrap().contains(&(chat.clone(), m1.id.clone()))
    );
}

pub async fn dedupe(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let chat = n.chat();
    let to = [InboxKey::Device(b.clone(), n.device("b1"))];
    let key = DedupeKey { user: a.clone(), device: n.device("phone"), client_message_id: "c-1".into() };
    let first = stored(&n, &chat, &a, &to, NOW, "hello");
    let retry = stored(&n, &chat, &a, &to, NOW + 5, "hello");
    assert_eq!(t.messages.store(&first, Some(&key), NOW + DAY).await.unwrap(), Store::Stored);
    match t.messages.store(&retry, Some(&key), NOW + DAY).await.unwrap() {
        Store::Duplicate(found) => {
            assert_eq!(found.id, first.id);
            assert_eq!(found.timestamp, first.timestamp);
        }
        Store::Stored => panic!("a retry with the same key must find the first message"),
    }
    assert_eq!(t.messages.inbox_page(&to[0], None, 10, NOW).await.unwrap().len(), 1, "no second copy");
    let other_device = DedupeKey { device: n.device("laptop"), ..key };
    let third = stored(&n, &chat, &a, &to, NOW + 6, "hello");
    assert_eq!(t.messages.store(&third, Some(&other_device), NOW + DAY).await.unwrap(), Store::Stored);
}

pub async fn pending_inbox(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let chat = n.chat();
    let m = stored(&n, &chat, &a, &[InboxKey::Pending(b.clone())], NOW, "before you joined");
    t.messages.store(&m, None, NOW + DAY).await.unwrap();
    let first = n.device("first");
    assert_eq!(t.messages.claim_pending(&b, &first).await.unwrap(), 1);
    let inbox = InboxKey::Device(b.clone(), first);
    assert_eq!(
        t.messages.inbox_page(&inbox, None, 10, NOW).await.unwrap(),
        vec![(m.id.clone(), m.json.clone())]
    );
    assert_eq!(t.messages.claim_pending(&b, &n.device("second")).await.unwrap(), 0, "claimed once");
}

pub async fn expiry(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let chat = n.chat();
    let inbox = InboxKey::Device(b.clone(), n.device("b1"));
    let old = stored(&n, &chat, &a, std::slice::from_ref(&inbox), NOW - 31 * DAY, "old");
    let fresh = stored(&n, &chat, &a, std::slice::from_ref(&inbox), NOW, "fresh");
    t.messages.store(&old, None, NOW - DAY).await.unwrap();
    t.messages.store(&fresh, None, NOW + 30 * DAY).await.unwrap();
    // Expired rows are filtered on read, before any clean-up ran.
    assert_eq!(
        t.messages.inbox_page(&inbox, None, 10, NOW).await.unwrap(),
        vec![(fresh.id.clone(), fresh.json.clone())]
    );
    assert!(t.messages.holders(&old.id, std::slice::from_ref(&inbox), NOW).await.unwrap().is_empty());
    assert!(
        t.messages.expire_messages(NOW, 30 * DAY).await.unwrap() >= 2,
        "the inbox row and the message row"
    );
    assert_eq!(t.messages.message(&chat, &old.id).await.unwrap(), None);
    assert!(t.messages.message(&chat, &fresh.id).await.unwrap().is_some());
}

pub async fn attachments(t: &Tables) {
    let n = Names::new();
    let id: AttachmentId = n.ids.attachment(NOW);
    let a = Attachment {
        id: id.clone(),
        uploader: n.user("a"),
        content_type: "image/png".into(),
        size: 42,
        sha256: "ab".repeat(32),
        created_at: NOW,
    };
    t.attachments.put_attachment(&a).await.unwrap();
    assert_eq!(t.attachments.attachment(&id).await.unwrap(), Some(a.clone()));
    assert_eq!(t.attachments.attachment(&n.ids.attachment(NOW)).await.unwrap(), None);
    assert!(t.attachments.chats_of_attachment(&id).await.unwrap().is_empty());
    let (c1, c2) = (n.chat(), n.chat());
    t.attachments.link(std::slice::from_ref(&id), &c1).await.unwrap();
    t.attachments.link(std::slice::from_ref(&id), &c1).await.unwrap();
    t.attachments.link(std::slice::from_ref(&id), &c2).await.unwrap();
    let mut chats = t.attachments.chats_of_attachment(&id).await.unwrap();
    chats.sort();
    assert_eq!(chats, vec![c1, c2]);
}
