//! The table ports' contract: one suite that every adapter's tests run, so
//! the SQLite and DynamoDB stores cannot drift apart.
//!
//! Each check makes its own ids, so the suite can share one database (or
//! one emulator) with other runs.

use std::sync::Arc;

use courier_core::domain::{Chat, InboxKey, Member, Millis};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, IdGen, MessageId, UserId};
use courier_core::ports::{
    Attachment, AttachmentStore, ChatStore, ClaimCount, Connected, DedupeKey, DeviceStore, KeyStore,
    KeyUpload, Markers, MessageRetention, MessageStore, OneTimeKey, Platform, PushRegistration, Quota,
    QuotaStore, ReceiptStore, SignedKey, Store, StoredMessage, Uploaded, WebPushKeys,
};

/// The table ports of one adapter family.
#[derive(Clone)]
pub struct Tables {
    pub chats: Arc<dyn ChatStore>,
    pub devices: Arc<dyn DeviceStore>,
    pub messages: Arc<dyn MessageStore>,
    pub retention: Arc<dyn MessageRetention>,
    pub attachments: Arc<dyn AttachmentStore>,
    pub quotas: Arc<dyn QuotaStore>,
    pub keys: Arc<dyn KeyStore>,
    pub receipts: Arc<dyn ReceiptStore>,
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
    group_messages(t).await;
    group_acks_in_bulk(t).await;
    expiry(t).await;
    attachments(t).await;
    quotas(t).await;
    key_uploads(t).await;
    one_time_key_claims(t).await;
    claim_counts(t).await;
    receipts(t).await;
    device_messages(t).await;
    dropped_pending(t).await;
    expired_devices(t).await;
    attachments_of_uploader(t).await;
    push(t).await;
}

/// A quota counts per user, per quota and per day, and refuses (changing
/// nothing) what would pass the limit.
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
}

/// Charges racing for the last of a quota admit no more than the limit.
pub async fn racing_quotas(t: &Tables) {
    let n = Names::new();
    let (w, q, day) = (n.user("w"), Quota::PendingBytes, 20_000);
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
        encrypted: false,
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

    // The encrypted flag is kept through creation, updates and listings.
    let secret = Chat { encrypted: true, ..chat_of(n.chat(), &[&a, &b]) };
    t.chats.create_chat(&secret).await.unwrap();
    assert_eq!(t.chats.chat(&secret.id).await.unwrap(), Some(secret.clone()));
    let mut grown = secret.clone();
    grown.add(c.clone(), NOW + 1, &Default::default()).unwrap();
    assert!(t.chats.update_chat(&grown, 0).await.unwrap());
    assert!(t.chats.chat(&secret.id).await.unwrap().unwrap().encrypted, "an update keeps it");
    let listed = t.chats.chats_of(&c, None, 10).await.unwrap();
    let flags: Vec<(ChatId, bool)> = listed.into_iter().map(|c| (c.id, c.encrypted)).collect();
    let mut expected = vec![(chat.id.clone(), false), (secret.id.clone(), true)];
    expected.sort();
    assert_eq!(flags, expected, "chats_of carries the flag");
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

/// Runs every check of writes that race: device slots, quota charges,
/// one-time prekey claims and claim counts, receipt markers.
///
/// Not part of [`all`]: moto checks a write's condition and applies it with
/// no lock, one item at a time, so racing writes that DynamoDB isolates can
/// both pass on moto (a racing quota charge admitted 4 of 3 on about one run
/// in three, with the counter started before the race or not). Adapters
/// whose test store isolates writes, as DynamoDB itself does, run these.
pub async fn races(t: &Tables) {
    racing_devices(t).await;
    racing_quotas(t).await;
    racing_claims(t).await;
    racing_receipts(t).await;
}

/// New devices connecting at once still get at most `max_devices` slots.
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

    // Ack is per inbox and returns the ids that were there, with their chat.
    let acked = t.messages.ack(&b1, &[m1.id.clone(), n.message(NOW)]).await.unwrap();
    assert_eq!(acked, vec![(m1.id.clone(), Some(chat.clone()))]);
    assert!(t.messages.ack(&b1, std::slice::from_ref(&m1.id)).await.unwrap().is_empty(), "acked once");
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

    // Stored done (connections in this process): the inboxes hold it, the
    // message row keeps no text and no feed ever picks it up.
    let m3 = StoredMessage {
        fanned_out: true,
        ..stored(&n, &chat, &a, std::slice::from_ref(&b1), NOW + 2, "three")
    };
    assert_eq!(t.messages.store(&m3, None, expires).await.unwrap(), Store::Stored);
    let row = t.messages.message(&chat, &m3.id).await.unwrap().unwrap();
    assert!(row.fanned_out && !row.json.contains("three"), "{row:?}");
    assert!(
        !t.messages.unfinished(NOW + 10, 100_000).await.unwrap().contains(&(chat.clone(), m3.id.clone()))
    );
    let held = t.messages.inbox_page(&b1, Some(&m2.id), 10, NOW).await.unwrap();
    assert_eq!(held, vec![(m3.id.clone(), m3.json.clone())]);
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

/// A group message: one store for many devices (stored once where the
/// backend does so), each device's inbox its own, merged in id order with
/// the inbox's other rows; the text goes once every device acked it.
pub async fn group_messages(t: &Tables) {
    let n = Names::new();
    let (a, b, c, d) = (n.user("a"), n.user("b"), n.user("c"), n.user("d"));
    let chat = n.chat();
    let device = |u: &UserId, name: &str| InboxKey::Device(u.clone(), n.device(name));
    let (b1, b2) = (device(&b, "b1"), device(&b, "b2"));
    let mut to = vec![b1.clone(), b2.clone(), device(&a, "a2")];
    to.extend((1..=5).map(|i| device(&c, &format!("c{i}"))));
    to.push(InboxKey::Pending(d.clone()));
    let expires = NOW + 30 * DAY;
    let m1 = stored(&n, &chat, &a, &to, NOW, "first of the group");
    let direct = stored(&n, &chat, &a, std::slice::from_ref(&b1), NOW + 1, "just for b1");
    let m2 = stored(&n, &chat, &a, &to, NOW + 2, "second of the group");
    let m3 = stored(&n, &chat, &a, &to, NOW + 3, "third of the group");
    for m in [&m1, &direct, &m2, &m3] {
        assert_eq!(t.messages.store(m, None, expires).await.unwrap(), Store::Stored);
    }
    let page = |p: Vec<(MessageId, String)>| p.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let all = vec![m1.id.clone(), direct.id.clone(), m2.id.clone(), m3.id.clone()];
    assert_eq!(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap()[0], (m1.id.clone(), m1.json.clone()));
    assert_eq!(page(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap()), all, "in id order");
    assert_eq!(page(t.messages.inbox_page(&b1, None, 2, NOW).await.unwrap()), all[..2]);
    assert_eq!(page(t.messages.inbox_page(&b1, Some(&direct.id), 10, NOW).await.unwrap()), all[2..]);
    assert_eq!(t.messages.holders(&m1.id, &to, NOW).await.unwrap(), to, "every recipient holds it");
    let mut listed = t.messages.message(&chat, &m1.id).await.unwrap().unwrap().recipients;
    listed.sort();
    assert_eq!(
        listed,
        {
            let mut all = to.clone();
            all.sort();
            all
        },
        "the row lists every recipient"
    );

    // An ack out of order takes that id only, from that device only.
    let chat_of = |m: &StoredMessage| vec![(m.id.clone(), Some(chat.clone()))];
    assert_eq!(t.messages.ack(&b1, std::slice::from_ref(&m2.id)).await.unwrap(), chat_of(&m2));
    assert!(t.messages.ack(&b1, std::slice::from_ref(&m2.id)).await.unwrap().is_empty(), "acked once");
    let sender = InboxKey::Device(a.clone(), n.device("phone"));
    assert!(
        t.messages.ack(&sender, std::slice::from_ref(&m1.id)).await.unwrap().is_empty(),
        "not the sender's"
    );
    assert_eq!(
        page(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap()),
        [&all[..2], &all[3..]].concat()
    );
    assert_eq!(t.messages.holders(&m2.id, &[b1.clone(), b2.clone()], NOW).await.unwrap(), vec![b2.clone()]);
    assert_eq!(
        page(t.messages.inbox_page(&b2, None, 10, NOW).await.unwrap()),
        [&all[..1], &all[2..]].concat()
    );
    let mut acked = t.messages.ack(&b1, &[m3.id.clone(), m1.id.clone(), direct.id.clone()]).await.unwrap();
    acked.sort();
    assert_eq!(acked, [chat_of(&m1), chat_of(&direct), chat_of(&m3)].concat());
    assert!(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap().is_empty());

    // The user with no device yet: their first device claims what was kept.
    let d1 = n.device("d1");
    assert_eq!(t.messages.claim_pending(&d, &d1).await.unwrap(), 3);
    let d1 = InboxKey::Device(d.clone(), d1);
    assert_eq!(
        page(t.messages.inbox_page(&d1, None, 10, NOW).await.unwrap()),
        [&all[..1], &all[2..]].concat()
    );

    // That device is a recipient like any other from then on; what it
    // claimed is still its own to ack.
    let to_now: Vec<InboxKey> =
        to.iter().map(|k| if *k == InboxKey::Pending(d.clone()) { d1.clone() } else { k.clone() }).collect();
    let m4 = stored(&n, &chat, &a, &to_now, NOW + 4, "fourth of the group");
    t.messages.store(&m4, None, expires).await.unwrap();
    let claimed_then_new = [&all[..1], &all[2..], std::slice::from_ref(&m4.id)].concat();
    assert_eq!(page(t.messages.inbox_page(&d1, None, 10, NOW).await.unwrap()), claimed_then_new);
    assert_eq!(t.messages.ack(&d1, std::slice::from_ref(&m3.id)).await.unwrap(), chat_of(&m3));
    assert!(!page(t.messages.inbox_page(&d1, None, 10, NOW).await.unwrap()).contains(&m3.id), "acked");

    // Once every device acked the first message, no copy of its text remains.
    for inbox in
        to.iter().filter(|k| **k != b1).map(|k| if *k == InboxKey::Pending(d.clone()) { &d1 } else { k })
    {
        assert_eq!(t.messages.ack(inbox, std::slice::from_ref(&m1.id)).await.unwrap(), chat_of(&m1));
    }
    assert!(t.messages.holders(&m1.id, &to, NOW).await.unwrap().is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // Deployed, the clean-up drops it; the embedded store compacts on its own.
        t.retention.expire_messages(NOW, 30 * DAY).await.unwrap();
        let text = t.messages.message(&chat, &m1.id).await.unwrap().map(|m| m.json).unwrap_or_default();
        if !text.contains("first of the group") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the text of a message every device acked stays");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = t.messages.message(&chat, &m2.id).await.unwrap().map(|m| m.json).unwrap_or_default();
    assert!(text.contains("second of the group"), "held by others, it stays");

    // Past its expiry, no one holds it.
    let old = stored(&n, &chat, &a, &to, NOW - 31 * DAY, "old");
    t.messages.store(&old, None, NOW - DAY).await.unwrap();
    assert!(t.messages.holders(&old.id, &to, NOW).await.unwrap().is_empty());
    assert!(!page(t.messages.inbox_page(&b2, None, 10, NOW).await.unwrap()).contains(&old.id));
}

/// A device that acks many group messages at once keeps holding the one it skipped.
pub async fn group_acks_in_bulk(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let chat = n.chat();
    let to: Vec<InboxKey> =
        (1..=6).map(|i| InboxKey::Device(b.clone(), n.device(&format!("b{i}")))).collect();
    // Long past (hence settled), and kept: a position moves only past ids old enough.
    let at = NOW - 400 * DAY;
    let sent: Vec<StoredMessage> = (0..80).map(|i| stored(&n, &chat, &a, &to, at + i, "bulk")).collect();
    for m in &sent {
        t.messages.store(m, None, NOW + DAY).await.unwrap();
    }
    let skipped = sent[10].id.clone();
    let ids: Vec<MessageId> = sent.iter().map(|m| m.id.clone()).filter(|id| *id != skipped).collect();
    assert_eq!(t.messages.ack(&to[0], &ids[..40]).await.unwrap().len(), 40);
    assert_eq!(t.messages.ack(&to[0], &ids[30..]).await.unwrap().len(), 39, "the first 40 were acked");
    let held = t.messages.inbox_page(&to[0], None, 100, NOW).await.unwrap();
    assert_eq!(held.into_iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![skipped.clone()]);
    assert_eq!(t.messages.holders(&skipped, &to[..2], NOW).await.unwrap(), to[..2]);
    assert_eq!(t.messages.holders(&sent[79].id, &to[..2], NOW).await.unwrap(), to[1..2]);
    assert_eq!(t.messages.ack(&to[0], std::slice::from_ref(&skipped)).await.unwrap().len(), 1);
    assert!(t.messages.inbox_page(&to[0], None, 100, NOW).await.unwrap().is_empty());
    assert_eq!(
        t.messages.inbox_page(&to[1], None, 100, NOW).await.unwrap().len(),
        80,
        "the others keep theirs"
    );
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
        t.retention.expire_messages(NOW, 30 * DAY).await.unwrap() >= 1,
        "what held the old message is deleted"
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

fn signed(key_id: &str, public_key: &str) -> SignedKey {
    SignedKey { key_id: key_id.into(), public_key: public_key.into(), signature: format!("sig-{public_key}") }
}

fn one_time(ids: impl IntoIterator<Item = usize>) -> Vec<OneTimeKey> {
    ids.into_iter().map(|i| OneTimeKey { key_id: format!("k{i}"), public_key: format!("otk-{i}") }).collect()
}

/// A device's first upload: both keys and `one_time` one-time prekeys.
fn first_upload(identity: &str, one_time_keys: Vec<OneTimeKey>) -> KeyUpload {
    KeyUpload {
        identity_key: Some(identity.into()),
        signed_pre_key: Some(signed("s1", "spk-1")),
        one_time_pre_keys: one_time_keys,
        fallback_key: None,
    }
}

/// The rules of `uploadKeys`: the first upload needs the identity key and
/// the signed prekey; the identity key never changes; one-time prekeys are
/// capped, stored keyIds are ignored and uncounted, and a refusal stores
/// nothing; the signed and fallback keys are replaced.
pub async fn key_uploads(t: &Tables) {
    let n = Names::new();
    let (u, v) = (n.user("u"), n.user("v"));
    let (phone, laptop) = (n.device("phone"), n.device("laptop"));
    let count = |d: &DeviceId| {
        let (u, d) = (u.clone(), d.clone());
        async move { t.keys.one_time_key_count(&u, &d).await }
    };
    let max = 10;

    let lone_keys = KeyUpload { one_time_pre_keys: one_time(0..3), ..KeyUpload::default() };
    assert_eq!(t.keys.upload_keys(&u, &phone, &lone_keys, max).await.unwrap(), Uploaded::NotReady);
    let no_signed = KeyUpload { identity_key: Some("id-u".into()), ..lone_keys.clone() };
    assert_eq!(t.keys.upload_keys(&u, &phone, &no_signed, max).await.unwrap(), Uploaded::NotReady);
    let no_identity = KeyUpload { signed_pre_key: Some(signed("s1", "spk-1")), ..lone_keys.clone() };
    assert_eq!(t.keys.upload_keys(&u, &phone, &no_identity, max).await.unwrap(), Uploaded::NotReady);
    assert_eq!(count(&phone).await.unwrap(), 0, "a refused first upload stores nothing");
    assert!(t.keys.device_keys(std::slice::from_ref(&u)).await.unwrap().is_empty(), "nothing is ready");

    let first = first_upload("id-u", one_time(0..3));
    let stored = t.keys.upload_keys(&u, &phone, &first, max).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 3, became_ready: true });
    let ready = t.keys.device_keys(std::slice::from_ref(&u)).await.unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!((&ready[0].user, &ready[0].device), (&u, &phone));
    assert_eq!(ready[0].identity_key, "id-u");
    assert_eq!(ready[0].signed_pre_key, signed("s1", "spk-1"));
    assert_eq!(ready[0].fallback_key, None);

    // Another identity key is refused whole: its other keys are not stored either.
    let other = KeyUpload {
        identity_key: Some("id-other".into()),
        signed_pre_key: Some(signed("s9", "spk-9")),
        one_time_pre_keys: one_time(10..12),
        fallback_key: Some(signed("f9", "fb-9")),
    };
    assert_eq!(t.keys.upload_keys(&u, &phone, &other, max).await.unwrap(), Uploaded::IdentityMismatch);
    assert_eq!(count(&phone).await.unwrap(), 3);
    let kept = t.keys.device_keys(std::slice::from_ref(&u)).await.unwrap();
    assert_eq!(kept, ready, "nothing of the refused upload was stored");

    // The same identity key again, or none, is fine; signed and fallback keys are replaced.
    let replace = KeyUpload {
        identity_key: Some("id-u".into()),
        signed_pre_key: Some(signed("s2", "spk-2")),
        one_time_pre_keys: Vec::new(),
        fallback_key: Some(signed("f1", "fb-1")),
    };
    let stored = t.keys.upload_keys(&u, &phone, &replace, max).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 3, became_ready: false });
    let fallback_only = KeyUpload { fallback_key: Some(signed("f2", "fb-2")), ..KeyUpload::default() };
    t.keys.upload_keys(&u, &phone, &fallback_only, max).await.unwrap();
    let now = t.keys.device_keys(std::slice::from_ref(&u)).await.unwrap();
    assert_eq!(now[0].identity_key, "id-u");
    assert_eq!(now[0].signed_pre_key, signed("s2", "spk-2"), "an upload without one keeps it");
    assert_eq!(now[0].fallback_key, Some(signed("f2", "fb-2")));

    // keyIds already stored are ignored and do not count, nor does a keyId named twice.
    let mut again = one_time(1..5);
    again.push(OneTimeKey { key_id: "k4".into(), public_key: "otk-4".into() });
    let upload = KeyUpload { one_time_pre_keys: again, ..KeyUpload::default() };
    let stored = t.keys.upload_keys(&u, &phone, &upload, max).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 5, became_ready: false });
    assert_eq!(count(&phone).await.unwrap(), 5);

    // Past the cap: refused, nothing stored; up to it exactly: stored.
    let too_many = KeyUpload { one_time_pre_keys: one_time(0..11), ..KeyUpload::default() };
    assert_eq!(t.keys.upload_keys(&u, &phone, &too_many, max).await.unwrap(), Uploaded::TooManyOneTimeKeys);
    assert_eq!(count(&phone).await.unwrap(), 5, "a refused upload stores none of its keys");
    let to_the_cap = KeyUpload {
        one_time_pre_keys: one_time(0..10),
        fallback_key: Some(signed("f3", "fb-3")),
        ..KeyUpload::default()
    };
    let stored = t.keys.upload_keys(&u, &phone, &to_the_cap, max).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 10, became_ready: false });
    let at_the_cap = KeyUpload { one_time_pre_keys: one_time(0..10), ..KeyUpload::default() };
    let stored = t.keys.upload_keys(&u, &phone, &at_the_cap, max).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 10, became_ready: false }, "stored keyIds are free");
    let one_more = KeyUpload { one_time_pre_keys: one_time(10..11), ..KeyUpload::default() };
    assert_eq!(t.keys.upload_keys(&u, &phone, &one_more, max).await.unwrap(), Uploaded::TooManyOneTimeKeys);

    // Only ready devices are listed, of the users asked for.
    t.keys.upload_keys(&u, &laptop, &lone_keys, max).await.unwrap();
    t.keys.upload_keys(&v, &phone, &first_upload("id-v", Vec::new()), max).await.unwrap();
    let listed = |users: Vec<UserId>| async move {
        let mut keys: Vec<(UserId, DeviceId)> =
            t.keys.device_keys(&users).await.unwrap().into_iter().map(|k| (k.user, k.device)).collect();
        keys.sort();
        keys
    };
    assert_eq!(listed(vec![u.clone()]).await, vec![(u.clone(), phone.clone())], "laptop is not ready");
    let mut both = vec![(u.clone(), phone.clone()), (v.clone(), phone.clone())];
    both.sort();
    assert_eq!(listed(vec![u.clone(), v.clone()]).await, both);
    assert!(listed(vec![n.user("nobody")]).await.is_empty());

    // Removed keys are gone, and the device starts over, with any identity key.
    t.keys.remove_keys(&u, &phone).await.unwrap();
    assert_eq!(count(&phone).await.unwrap(), 0);
    assert_eq!(t.keys.claim_one_time_key(&u, &phone).await.unwrap(), (None, 0));
    assert_eq!(listed(vec![u.clone(), v.clone()]).await, vec![(v.clone(), phone.clone())]);
    assert_eq!(t.keys.upload_keys(&u, &phone, &fallback_only, max).await.unwrap(), Uploaded::NotReady);
    let anew = t.keys.upload_keys(&u, &phone, &first_upload("id-new", one_time(0..1)), max).await.unwrap();
    assert_eq!(anew, Uploaded::Stored { one_time_keys: 1, became_ready: true });
    t.keys.remove_keys(&u, &laptop).await.unwrap();
}

/// One-time prekeys are claimed one at a time, each once, per device.
pub async fn one_time_key_claims(t: &Tables) {
    let n = Names::new();
    let (u, phone, tablet) = (n.user("u"), n.device("phone"), n.device("tablet"));
    t.keys.upload_keys(&u, &phone, &first_upload("id-u", one_time(0..3)), 200).await.unwrap();
    t.keys.upload_keys(&u, &tablet, &first_upload("id-t", one_time(0..2)), 200).await.unwrap();

    // The count left goes down with each claim; each device's keys are its own.
    assert_eq!(t.keys.one_time_key_count(&u, &tablet).await.unwrap(), 2);
    let (first, left) = t.keys.claim_one_time_key(&u, &tablet).await.unwrap();
    assert_eq!((first.is_some(), left), (true, 1));
    let (second, left) = t.keys.claim_one_time_key(&u, &tablet).await.unwrap();
    assert_eq!((second.is_some(), left), (true, 0));
    assert_ne!(first, second);
    assert_eq!(t.keys.claim_one_time_key(&u, &tablet).await.unwrap(), (None, 0));
    assert_eq!(t.keys.one_time_key_count(&u, &phone).await.unwrap(), 3, "the phone's keys are its own");
    let mut handed = Vec::new();
    for left in [2, 1, 0] {
        let (key, now_left) = t.keys.claim_one_time_key(&u, &phone).await.unwrap();
        assert_eq!(now_left, left);
        handed.push(key.expect("a key is left"));
    }
    handed.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(handed, one_time(0..3), "each key once, with its public key");
    assert_eq!(t.keys.claim_one_time_key(&u, &phone).await.unwrap(), (None, 0));
    assert_eq!(t.keys.device_keys(std::slice::from_ref(&u)).await.unwrap().len(), 2, "still ready");
}

/// Claims racing for a device's one-time prekeys get each key once, and
/// claim counts racing for the last slots of an hour admit no more than the
/// limit.
pub async fn racing_claims(t: &Tables) {
    let n = Names::new();
    let (u, phone) = (n.user("u"), n.device("phone"));
    let uploaded = one_time(0..30);
    t.keys.upload_keys(&u, &phone, &first_upload("id-u", uploaded.clone()), 200).await.unwrap();
    let claims = (0..60).map(|_| t.keys.claim_one_time_key(&u, &phone));
    let outcomes: Vec<(Option<OneTimeKey>, u64)> =
        futures_util::future::join_all(claims).await.into_iter().map(Result::unwrap).collect();
    let mut handed: Vec<OneTimeKey> = outcomes.iter().filter_map(|(k, _)| k.clone()).collect();
    assert_eq!(handed.len(), 30, "every key is handed out");
    handed.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    handed.dedup();
    assert_eq!(handed.len(), 30, "and none twice");
    let mut expected = uploaded;
    expected.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(handed, expected, "each with its public key");
    for (key, left) in &outcomes {
        match key {
            Some(_) => assert!(*left < 30, "{left} left after a claim"),
            None => assert_eq!(*left, 0, "none left when none is handed out"),
        }
    }
    assert_eq!(t.keys.one_time_key_count(&u, &phone).await.unwrap(), 0);
    assert_eq!(t.keys.claim_one_time_key(&u, &phone).await.unwrap(), (None, 0));

    let racer = InboxKey::Device(n.user("r"), n.device("phone"));
    let hour = NOW / 3_600_000;
    let one = [ClaimCount { scope: "*".into(), amount: 1, limit: 5 }];
    let racing = (0..12).map(|_| t.keys.count_claims(&racer, hour, &one));
    let admitted =
        futures_util::future::join_all(racing).await.into_iter().filter(|ok| *ok.as_ref().unwrap()).count();
    assert_eq!(admitted, 5, "racing counts stay within the limit");
}

/// Claim counters: per claimer, per scope and per hour, refusing (changing
/// nothing) what would pass the limit.
pub async fn claim_counts(t: &Tables) {
    let n = Names::new();
    let claimer = InboxKey::Device(n.user("a"), n.device("phone"));
    let other = InboxKey::Device(n.user("a"), n.device("laptop"));
    let (target, hour) = (InboxKey::Device(n.user("b"), n.device("phone")).key(), NOW / 3_600_000);
    let count = |c: &InboxKey, scope: &str, hour: i64, amount: u64| {
        let (c, scope) = (c.clone(), scope.to_owned());
        async move { t.keys.count_claims(&c, hour, &[ClaimCount { scope, amount, limit: 5 }]).await.unwrap() }
    };
    for i in 0..5 {
        assert!(count(&claimer, &target, hour, 1).await, "claim {i} is within the limit");
    }
    assert!(!count(&claimer, &target, hour, 1).await, "the sixth passes it");
    assert!(count(&claimer, "*", hour, 5).await, "another scope counts apart");
    assert!(count(&other, &target, hour, 5).await, "another claimer counts apart");
    assert!(!count(&claimer, "*", hour, 1).await);
    assert!(!count(&claimer, &target, hour + 1, 6).await, "never more than the limit at once");
    assert!(count(&claimer, &target, hour + 1, 3).await, "a new hour starts from zero");
    assert!(!count(&claimer, &target, hour + 1, 3).await, "3 + 3 passes 5");
    assert!(count(&claimer, &target, hour + 1, 2).await, "the refusal counted nothing");

    // Several counters at once: all move, or none.
    let both = |amount| {
        [
            ClaimCount { scope: "*".into(), amount, limit: 4 },
            ClaimCount { scope: target.clone(), amount: 1, limit: 2 },
        ]
    };
    let fresh = InboxKey::Device(n.user("c"), n.device("phone"));
    assert!(t.keys.count_claims(&fresh, hour, &both(1)).await.unwrap());
    assert!(t.keys.count_claims(&fresh, hour, &both(1)).await.unwrap());
    assert!(!t.keys.count_claims(&fresh, hour, &both(1)).await.unwrap(), "the device's counter is full");
    let total = [ClaimCount { scope: "*".into(), amount: 2, limit: 4 }];
    assert!(
        t.keys.count_claims(&fresh, hour, &total).await.unwrap(),
        "the refused request moved no counter, the total's included"
    );
}

/// Receipt markers move forward only, each on its own.
pub async fn receipts(t: &Tables) {
    let n = Names::new();
    let (u, v, chat) = (n.user("u"), n.user("v"), n.chat());
    let m: Vec<MessageId> = (0..4).map(|i| n.message(NOW + i)).collect();
    let marks = |delivered: Option<usize>, read: Option<usize>, private_read: Option<usize>| Markers {
        delivered: delivered.map(|i| m[i].clone()),
        read: read.map(|i| m[i].clone()),
        private_read: private_read.map(|i| m[i].clone()),
    };

    assert!(t.receipts.receipts(&chat).await.unwrap().is_empty());
    let moved = t.receipts.advance(&chat, &u, &marks(Some(1), None, None)).await.unwrap();
    assert_eq!(moved, Some(marks(Some(1), None, None)));
    assert_eq!(t.receipts.advance(&chat, &u, &marks(Some(0), None, None)).await.unwrap(), None, "behind");
    assert_eq!(t.receipts.advance(&chat, &u, &marks(Some(1), None, None)).await.unwrap(), None, "level");
    assert_eq!(t.receipts.advance(&chat, &u, &Markers::default()).await.unwrap(), None, "nothing asked");

    // Each marker moves on its own: read behind delivered is fine.
    let moved = t.receipts.advance(&chat, &u, &marks(None, Some(0), None)).await.unwrap();
    assert_eq!(moved, Some(marks(Some(1), Some(0), None)));
    let moved = t.receipts.advance(&chat, &u, &marks(None, None, Some(2))).await.unwrap();
    assert_eq!(moved, Some(marks(Some(1), Some(0), Some(2))), "the private marker alone");
    // One marker behind and one ahead: the one ahead moves, the other stays.
    let moved = t.receipts.advance(&chat, &u, &marks(Some(0), Some(2), Some(1))).await.unwrap();
    assert_eq!(moved, Some(marks(Some(1), Some(2), Some(2))));

    t.receipts.advance(&chat, &v, &marks(Some(3), Some(3), Some(3))).await.unwrap();
    let mut all = t.receipts.receipts(&chat).await.unwrap();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected =
        vec![(u.clone(), marks(Some(1), Some(2), Some(2))), (v.clone(), marks(Some(3), Some(3), Some(3)))];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(all, expected);
    assert!(t.receipts.receipts(&n.chat()).await.unwrap().is_empty(), "per chat");

    t.receipts.remove_receipts(&chat, &v).await.unwrap();
    assert_eq!(
        t.receipts.receipts(&chat).await.unwrap(),
        vec![(u.clone(), marks(Some(1), Some(2), Some(2)))]
    );
    t.receipts.remove_receipts(&chat, &v).await.unwrap();
}

/// Racing moves of one user's markers, in any order, end at the furthest.
pub async fn racing_receipts(t: &Tables) {
    let n = Names::new();
    let (chat, w) = (n.chat(), n.user("w"));
    let ids: Vec<MessageId> = (0..20).map(|i| n.message(NOW + 100 + i)).collect();
    let moves = ids.iter().rev().chain(ids.iter()).map(|id| {
        let to = Markers { delivered: Some(id.clone()), read: Some(id.clone()), private_read: None };
        let w = w.clone();
        let chat = chat.clone();
        async move { t.receipts.advance(&chat, &w, &to).await.unwrap() }
    });
    let answers = futures_util::future::join_all(moves).await;
    assert!(answers.iter().any(Option::is_some), "the furthest move moved");
    for answer in answers.into_iter().flatten() {
        assert!(answer.delivered.is_some() && answer.read.is_some(), "{answer:?}");
    }
    let last = ids.last().cloned();
    let stands = t.receipts.receipts(&chat).await.unwrap().into_iter().find(|(user, _)| user == &w);
    assert_eq!(
        stands,
        Some((w.clone(), Markers { delivered: last.clone(), read: last, private_read: None }))
    );
}

/// Device messages: one inbox row per device under one id, deduped apart
/// from chat messages, synced and acked like them.
pub async fn device_messages(t: &Tables) {
    let n = Names::new();
    let (a, b) = (n.user("a"), n.user("b"));
    let (b1, b2) = (InboxKey::Device(b.clone(), n.device("b1")), InboxKey::Device(b.clone(), n.device("b2")));
    let a2 = InboxKey::Device(a.clone(), n.device("tablet"));
    let key = DedupeKey { user: a.clone(), device: n.device("phone"), client_message_id: "c-1".into() };
    let row = |id: &MessageId, body: &str| {
        serde_json::json!({
            "type": "deviceMessage", "messageId": id, "userId": a, "deviceId": "phone",
            "body": body, "timestamp": NOW,
        })
        .to_string()
    };
    let expires = NOW + 30 * DAY;

    let id = n.message(NOW);
    let items = vec![
        (b1.clone(), row(&id, "to b1")),
        (b2.clone(), row(&id, "to b2")),
        (a2.clone(), row(&id, "to a2")),
    ];
    assert_eq!(t.messages.store_device_messages(&id, &items, Some(&key), expires).await.unwrap(), None);
    for (inbox, json) in &items {
        let page = t.messages.inbox_page(inbox, None, 10, NOW).await.unwrap();
        assert_eq!(page, vec![(id.clone(), json.clone())], "each device its own body");
    }
    assert_eq!(t.messages.holders(&id, &[b1.clone(), b2.clone()], NOW).await.unwrap().len(), 2);

    // A retry with the same key stores nothing and answers the first id.
    let retry = n.message(NOW + 1);
    let again = vec![(b1.clone(), row(&retry, "to b1"))];
    let found = t.messages.store_device_messages(&retry, &again, Some(&key), expires).await.unwrap();
    assert_eq!(found, Some(id.clone()));
    assert_eq!(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap().len(), 1, "no second copy");

    // Chat messages with the same clientMessageId are another namespace, both ways.
    let chat = n.chat();
    let message = stored(&n, &chat, &a, std::slice::from_ref(&b1), NOW + 2, "chat");
    assert_eq!(t.messages.store(&message, Some(&key), expires).await.unwrap(), Store::Stored);
    let key2 = DedupeKey { client_message_id: "c-2".into(), ..key.clone() };
    let chat2 = stored(&n, &chat, &a, std::slice::from_ref(&b2), NOW + 3, "chat first");
    assert_eq!(t.messages.store(&chat2, Some(&key2), expires).await.unwrap(), Store::Stored);
    let later = n.message(NOW + 4);
    let stored_after = t
        .messages
        .store_device_messages(&later, &[(b2.clone(), row(&later, "after"))], Some(&key2), expires)
        .await
        .unwrap();
    assert_eq!(stored_after, None, "a chat message's key does not dedupe a device message");
    // Without a key, nothing is deduped.
    let plain = n.message(NOW + 5);
    let items_plain = [(b2.clone(), row(&plain, "plain"))];
    assert_eq!(t.messages.store_device_messages(&plain, &items_plain, None, expires).await.unwrap(), None);
    let ids = |page: Vec<(MessageId, String)>| page.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let b2_inbox = ids(t.messages.inbox_page(&b2, None, 10, NOW).await.unwrap());
    assert_eq!(b2_inbox, vec![id.clone(), chat2.id.clone(), later.clone(), plain.clone()], "in id order");

    // Ack returns the ids, device messages (no chat) and chat messages alike.
    let acked = t.messages.ack(&b1, &[id.clone(), message.id.clone()]).await.unwrap();
    let mut expected = vec![(id.clone(), None), (message.id.clone(), Some(message.chat.clone()))];
    let mut acked_sorted = acked;
    acked_sorted.sort();
    expected.sort();
    assert_eq!(acked_sorted, expected);
    assert!(t.messages.inbox_page(&b1, None, 10, NOW).await.unwrap().is_empty());
    assert_eq!(t.messages.inbox_page(&b2, None, 10, NOW).await.unwrap().len(), 4, "b2 keeps its copies");

    // Device messages past retention are filtered on read like any row.
    let old = n.message(NOW - 31 * DAY);
    let old_items = [(a2.clone(), row(&old, "old"))];
    t.messages.store_device_messages(&old, &old_items, None, NOW - DAY).await.unwrap();
    assert_eq!(ids(t.messages.inbox_page(&a2, None, 10, NOW).await.unwrap()), vec![id.clone()]);
}

/// deleteAccount drops the rows kept for a user with no device yet, and no one else's.
pub async fn dropped_pending(t: &Tables) {
    let n = Names::new();
    let (a, b, c) = (n.user("a"), n.user("b"), n.user("c"));
    let chat = n.chat();
    let to = [InboxKey::Pending(b.clone()), InboxKey::Pending(c.clone())];
    let m = stored(&n, &chat, &a, &to, NOW, "while you had no device");
    t.messages.store(&m, None, NOW + DAY).await.unwrap();
    t.messages.drop_pending(&b).await.unwrap();
    t.messages.drop_pending(&b).await.unwrap();
    assert_eq!(t.messages.claim_pending(&b, &n.device("first")).await.unwrap(), 0, "b's rows are gone");
    assert_eq!(t.messages.claim_pending(&c, &n.device("first")).await.unwrap(), 1, "c's are not");
}

/// Expiry returns the devices it deleted, with their inboxes gone.
pub async fn expired_devices(t: &Tables) {
    let n = Names::new();
    let (u, v) = (n.user("u"), n.user("v"));
    // Far older than any other check's devices, so this expiry touches none of theirs.
    let long_ago = NOW - 400 * DAY;
    let (old, live) = (n.device("old"), n.device("live"));
    let connection = n.connection();
    t.devices.connect(&u, &old, &connection, long_ago, 3, long_ago - DAY).await.unwrap();
    t.devices.disconnect(&connection, long_ago).await.unwrap();
    t.devices.connect(&u, &live, &n.connection(), NOW, 3, NOW - 30 * DAY).await.unwrap();
    // An old device still connected is not expired: its connection is live.
    let held = n.connection();
    t.devices.connect(&v, &old, &held, long_ago, 3, long_ago - DAY).await.unwrap();

    let inbox = InboxKey::Device(u.clone(), old.clone());
    let m = stored(&n, &n.chat(), &v, std::slice::from_ref(&inbox), NOW, "never read");
    t.messages.store(&m, None, NOW + DAY).await.unwrap();

    let expired = t.devices.expire_devices(long_ago + 1).await.unwrap();
    let ours: Vec<_> = expired.iter().filter(|d| d.user == u || d.user == v).collect();
    assert_eq!(ours.len(), 1, "{expired:?}");
    assert_eq!((&ours[0].user, &ours[0].id, ours[0].last_seen), (&u, &old, long_ago));
    assert_eq!(ours[0].connection, None);
    let left = t.devices.devices_of(std::slice::from_ref(&u), i64::MIN).await.unwrap();
    assert_eq!(left.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), vec![live.clone()]);
    assert!(t.messages.inbox_page(&inbox, None, 10, NOW).await.unwrap().is_empty(), "its inbox went with it");
    let again = t.devices.expire_devices(long_ago + 1).await.unwrap();
    assert!(!again.iter().any(|d| d.user == u), "expired once");
    t.devices.remove_device(&v, &old).await.unwrap();
}

/// deleteAccount finds every attachment of a user and removes them, no one else's.
pub async fn attachments_of_uploader(t: &Tables) {
    let n = Names::new();
    let (u, v) = (n.user("u"), n.user("v"));
    let attachment = |uploader: &UserId, size: u64| Attachment {
        id: n.ids.attachment(NOW),
        uploader: uploader.clone(),
        content_type: "image/png".into(),
        size,
        sha256: "cd".repeat(32),
        created_at: NOW,
    };
    let (mine, also_mine, theirs) = (attachment(&u, 1), attachment(&u, 2), attachment(&v, 3));
    for a in [&mine, &also_mine, &theirs] {
        t.attachments.put_attachment(a).await.unwrap();
    }
    let chat = n.chat();
    t.attachments.link(&[mine.id.clone(), theirs.id.clone()], &chat).await.unwrap();

    let mut removed = t.attachments.remove_attachments_of(&u).await.unwrap();
    removed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(removed, vec![mine.clone(), also_mine.clone()]);
    assert_eq!(t.attachments.attachment(&mine.id).await.unwrap(), None);
    assert_eq!(t.attachments.attachment(&also_mine.id).await.unwrap(), None);
    assert!(t.attachments.chats_of_attachment(&mine.id).await.unwrap().is_empty(), "its links went too");
    assert_eq!(t.attachments.attachment(&theirs.id).await.unwrap(), Some(theirs.clone()));
    assert_eq!(t.attachments.chats_of_attachment(&theirs.id).await.unwrap(), vec![chat]);
    assert!(t.attachments.remove_attachments_of(&u).await.unwrap().is_empty(), "a second call finds none");
}

/// Push registrations and the wake mark: one registration per device, a new
/// one replacing it; removal only of the registration expected; a wake-up
/// begun at most once within the collapse window, never for a connected
/// device or one without a registration, again at once after `end_wake` or
/// a connection; and the registration gone with its device.
pub async fn push(t: &Tables) {
    /// The collapse window this check uses, as the core passes it in.
    const WINDOW: Millis = 30_000;
    let n = Names::new();
    let u = n.user("u");
    let (phone, laptop, tablet) = (n.device("phone"), n.device("laptop"), n.device("tablet"));
    let cutoff = NOW - 30 * DAY;
    let web = PushRegistration {
        platform: Platform::WebPush,
        address: format!("https://push.example/send/{}", n.run),
        keys: Some(WebPushKeys { p256dh: format!("BP256-{}", n.run), auth: "auth-secret".into() }),
        endpoint: None,
    };
    // As the deployed adapter prepares it: the token and the SNS endpoint made for it.
    let fcm = PushRegistration {
        platform: Platform::Fcm,
        address: format!("fcm-token-{}", n.run),
        keys: None,
        endpoint: Some(format!("arn:aws:sns:us-east-1:000000000000:endpoint/GCM/courier/{}", n.run)),
    };
    let registration_of = |device: &DeviceId| {
        let (u, device) = (u.clone(), device.clone());
        async move {
            let devices = t.devices.devices_of(std::slice::from_ref(&u), cutoff).await.unwrap();
            devices.into_iter().find(|d| d.id == device).expect("the device is listed").push
        }
    };
    let wake = |device: &DeviceId, at: Millis| {
        let (u, device) = (u.clone(), device.clone());
        async move { t.devices.begin_wake(&u, &device, at, at - WINDOW + 1).await.unwrap() }
    };

    assert!(!t.devices.register_push(&u, &phone, &web).await.unwrap(), "no such device yet");
    let (c1, c2) = (n.connection(), n.connection());
    t.devices.connect(&u, &phone, &c1, NOW, 3, cutoff).await.unwrap();
    t.devices.connect(&u, &laptop, &c2, NOW, 3, cutoff).await.unwrap();
    t.devices.connect(&u, &tablet, &n.connection(), NOW, 3, cutoff).await.unwrap();
    assert_eq!(registration_of(&phone).await, None, "a new device has no registration");

    // One registration per device; a new one replaces it.
    assert!(t.devices.register_push(&u, &phone, &web).await.unwrap());
    assert_eq!(registration_of(&phone).await, Some(web.clone()));
    assert!(t.devices.register_push(&u, &phone, &fcm).await.unwrap());
    assert_eq!(registration_of(&phone).await, Some(fcm.clone()), "replaced, every field kept");
    assert_eq!(registration_of(&laptop).await, None, "the other devices have none");

    // Removed only if it is the one expected (a stale Gone must not remove a newer one).
    assert_eq!(t.devices.unregister_push(&u, &phone, Some(&web)).await.unwrap(), None);
    assert_eq!(registration_of(&phone).await, Some(fcm.clone()), "a registration not expected stays");
    assert_eq!(t.devices.unregister_push(&u, &phone, Some(&fcm)).await.unwrap(), Some(fcm.clone()));
    assert_eq!(registration_of(&phone).await, None);
    assert_eq!(t.devices.unregister_push(&u, &phone, None).await.unwrap(), None, "nothing to remove");
    assert!(t.devices.register_push(&u, &phone, &web).await.unwrap());
    assert_eq!(
        t.devices.unregister_push(&u, &phone, None).await.unwrap(),
        Some(web.clone()),
        "any, when none is expected"
    );
    assert_eq!(t.devices.unregister_push(&u, &n.device("nowhere"), None).await.unwrap(), None);

    // Wake-ups: only a device with a registration and no connection.
    assert!(t.devices.register_push(&u, &phone, &web).await.unwrap());
    assert!(t.devices.register_push(&u, &laptop, &fcm).await.unwrap());
    assert_eq!(wake(&phone, NOW).await, None, "phone is connected");
    assert_eq!(wake(&laptop, NOW).await, None, "laptop is connected");
    t.devices.disconnect(&c1, NOW + 1).await.unwrap();
    assert_eq!(registration_of(&phone).await, Some(web.clone()), "disconnecting keeps the registration");
    assert_eq!(wake(&tablet, NOW + 2).await, None, "tablet has no registration");
    assert_eq!(wake(&n.device("nowhere"), NOW + 2).await, None, "no such device");

    // At most one within the window, while it is unanswered.
    let t0 = NOW + 10;
    assert_eq!(wake(&phone, t0).await, Some(web.clone()));
    assert_eq!(wake(&phone, t0).await, None, "collapsed: at the same instant");
    assert_eq!(wake(&phone, t0 + WINDOW - 1).await, None, "collapsed: at the window's last instant");
    assert_eq!(wake(&phone, t0 + WINDOW).await, Some(web.clone()), "the window has passed");
    let t1 = t0 + WINDOW;
    // end_wake lets a wake-up go again at once (a retry after a temporary failure).
    t.devices.end_wake(&u, &phone).await.unwrap();
    assert_eq!(wake(&phone, t1 + 1).await, Some(web.clone()), "after end_wake");
    assert_eq!(wake(&phone, t1 + 2).await, None, "and it collapses again");

    // A connection answers the wake-up: the next one may go as soon as it leaves.
    let c3 = n.connection();
    t.devices.connect(&u, &phone, &c3, t1 + 3, 3, cutoff).await.unwrap();
    assert_eq!(wake(&phone, t1 + 4).await, None, "connected");
    t.devices.disconnect(&c3, t1 + 5).await.unwrap();
    assert_eq!(wake(&phone, t1 + 6).await, Some(web.clone()), "the mark went with the connection");

    // A new registration does not inherit the old one's mark.
    assert!(t.devices.register_push(&u, &phone, &fcm).await.unwrap());
    assert_eq!(wake(&phone, t1 + 7).await, Some(fcm.clone()));
    // Nor does unregistering and registering again.
    assert_eq!(t.devices.unregister_push(&u, &phone, Some(&fcm)).await.unwrap(), Some(fcm.clone()));
    assert_eq!(wake(&phone, t1 + 8).await, None, "no registration, no wake-up");
    assert!(t.devices.register_push(&u, &phone, &web).await.unwrap());
    assert_eq!(wake(&phone, t1 + 9).await, Some(web.clone()));

    // The registration goes with its device: removed...
    let removed = t.devices.remove_device(&u, &phone).await.unwrap().expect("phone existed");
    assert_eq!(removed.push, Some(web.clone()), "returned, so the core can release it");
    assert!(!t.devices.register_push(&u, &phone, &web).await.unwrap(), "removed");
    assert_eq!(wake(&phone, t1 + WINDOW * 2).await, None);
    t.devices.connect(&u, &phone, &n.connection(), t1 + 10, 3, cutoff).await.unwrap();
    assert_eq!(registration_of(&phone).await, None, "a device added anew has none");
    t.devices.remove_device(&u, &phone).await.unwrap();

    // ...expired and back as a new device...
    let long_ago = NOW - 450 * DAY;
    let (v, old) = (n.user("v"), n.device("old"));
    let stale = n.connection();
    t.devices.connect(&v, &old, &stale, long_ago, 3, long_ago - DAY).await.unwrap();
    t.devices.disconnect(&stale, long_ago).await.unwrap();
    assert!(t.devices.register_push(&v, &old, &fcm).await.unwrap());
    let back = t.devices.connect(&v, &old, &n.connection(), NOW, 3, cutoff).await.unwrap();
    assert!(matches!(back, Connected::Ok { new_device: true, .. }), "{back:?}");
    let again = t.devices.devices_of(std::slice::from_ref(&v), cutoff).await.unwrap();
    assert_eq!(
        again.iter().map(|d| d.push.clone()).collect::<Vec<_>>(),
        vec![None],
        "expired, so registered anew"
    );
    t.devices.remove_device(&v, &old).await.unwrap();

    // ...or expired by the clean-up, which returns it with its registration.
    let (w, gone, left) = (n.user("w"), n.device("gone"), n.connection());
    t.devices.connect(&w, &gone, &left, long_ago, 3, long_ago - DAY).await.unwrap();
    t.devices.disconnect(&left, long_ago).await.unwrap();
    assert!(t.devices.register_push(&w, &gone, &web).await.unwrap());
    let expired = t.devices.expire_devices(long_ago + 1).await.unwrap();
    let ours: Vec<_> = expired.iter().filter(|d| d.user == w).collect();
    assert_eq!(ours.len(), 1, "{expired:?}");
    assert_eq!(ours[0].push, Some(web.clone()));
    assert_eq!(t.devices.begin_wake(&w, &gone, NOW, NOW - WINDOW + 1).await.unwrap(), None, "gone with it");
    assert!(!t.devices.register_push(&w, &gone, &web).await.unwrap());
}
