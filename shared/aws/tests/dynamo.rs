//! The DynamoDB adapter on moto: the contract suite, the requests each operation makes, DynamoDB specifics.

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;

use courier_aws::DynamoTables;
use courier_core::domain::{DAY_MS, InboxKey, Millis};
use courier_core::ids::{ChatId, ConnectionId, DeviceId, MessageId, UserId};
use courier_core::ports::{ChatStore, Connected, DedupeKey, DeviceStore, MessageStore, Store, StoredMessage};
use courier_testkit::contract::{self, Tables};
use courier_testkit::{Meter, moto};

fn tables_of(store: DynamoTables) -> Tables {
    Tables {
        chats: Arc::new(store.clone()),
        devices: Arc::new(store.clone()),
        messages: Arc::new(store.clone()),
        retention: Arc::new(store.clone()),
        attachments: Arc::new(store.clone()),
        quotas: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        receipts: Arc::new(store),
    }
}

#[tokio::test]
async fn dynamodb_keeps_the_table_contract() {
    let moto = moto::shared().await;
    let names = moto.tables("contract").await;
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config());
    // Not `contract::races`: moto serves requests on threads and checks a
    // write's condition and applies it with no lock (a TransactWriteItems
    // one item at a time, rolled back by restoring a copy of the table), so
    // racing writes that DynamoDB isolates can both pass there: 4 devices
    // admitted of 3, 4 quota charges of 3. What a claim does when it loses
    // its key to another is checked below without a race.
    contract::all(&tables_of(DynamoTables::new(client, names))).await;
}

/// The cost model, pinned: how many DynamoDB requests each operation makes.
#[tokio::test]
async fn requests_per_operation() {
    use std::collections::BTreeMap;

    use courier_core::ids::IdGen;

    let moto = moto::shared().await;
    let names = moto.tables("calls").await;
    let (client, calls) = moto.counted_dynamodb();
    let t = DynamoTables::new(client, names);
    let expect = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(op, count)| (op.to_string(), *count)).collect()
    };
    let ids = IdGen::new();
    let now = 1_800_000_000_000;
    let (a, b) = (UserId::try_from("a").unwrap(), UserId::try_from("b").unwrap());
    let (phone, laptop) = (DeviceId::try_from("phone").unwrap(), DeviceId::try_from("laptop").unwrap());
    let connection = |name: &str| ConnectionId::try_from(name).unwrap();
    let old = now - 30 * DAY_MS;

    t.connect(&b, &phone, &connection("c1"), now, 3, old).await.unwrap();
    // The device row and its slot go in one transaction, so racing devices cannot pass the limit.
    // The Queries: the live devices, and the inbox and the group-chat positions a device of the same id left.
    let new_device = [("GetItem", 2), ("PutItem", 1), ("Query", 3), ("TransactWriteItems", 1)];
    assert_eq!(calls.take(), expect(&new_device), "a new device");
    t.connect(&b, &laptop, &connection("c2"), now, 3, old).await.unwrap();
    calls.take();
    t.connect(&b, &phone, &connection("c3"), now, 3, old).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("DeleteItem", 1), ("GetItem", 1), ("PutItem", 1), ("UpdateItem", 1)]),
        "a known device on a new connection, replacing its old one"
    );
    t.disconnect(&connection("c2"), now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("GetItem", 1), ("UpdateItem", 1)]), "the row is TTL's to delete");
    t.devices_of(&[a.clone(), b.clone()], old).await.unwrap();
    assert_eq!(calls.take(), expect(&[("Query", 2)]), "one query per user");

    let chat = contract::chat_of(ids.chat(now), &[&a, &b]);
    t.create_chat(&chat).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchWriteItem", 1), ("PutItem", 1)]));
    let mut renamed = chat.clone();
    renamed.add(UserId::try_from("c").unwrap(), now, &Default::default()).unwrap();
    t.update_chat(&renamed, 0).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchWriteItem", 1), ("PutItem", 1)]));
    t.chats_of(&b, None, 100).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchGetItem", 1), ("Query", 1)]));

    let two = [InboxKey::Device(b.clone(), phone.clone()), InboxKey::Device(b.clone(), laptop.clone())];
    let message = |recipients: &[InboxKey]| StoredMessage {
        chat: chat.id.clone(),
        id: ids.message(now),
        timestamp: now,
        json: "{}".into(),
        recipients: recipients.to_vec(),
        fanned_out: false,
    };
    let m = message(&two);
    t.store(&m, None, now + DAY_MS).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchWriteItem", 1), ("PutItem", 1)]), "store to two devices");
    let key = DedupeKey { user: a.clone(), device: phone.clone(), client_message_id: "k".into() };
    t.store(&message(&two), Some(&key), now + DAY_MS).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchWriteItem", 1), ("PutItem", 2)]),
        "with a dedupe key: the message row, then its claim"
    );
    t.store(&message(&two), Some(&key), now + DAY_MS).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchWriteItem", 1), ("DeleteItem", 1), ("GetItem", 2), ("PutItem", 2)]),
        "a retry, before the first send's fan-out was marked: its own row, deleted once the claim is read"
    );
    let many: Vec<InboxKey> =
        (0..60).map(|i| InboxKey::Device(b.clone(), DeviceId::try_from(format!("d{i}")).unwrap())).collect();
    t.store(&message(&many), None, now + DAY_MS).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchGetItem", 1), ("PutItem", 2), ("UpdateItem", 60)]),
        "a group message: its row, its pointer, the devices' positions read, and made for the chat's first"
    );
    let group = message(&many);
    t.store(&group, None, now + DAY_MS).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchGetItem", 1), ("PutItem", 2)]), "and then: no inbox rows");

    t.holders(&m.id, &two, now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchGetItem", 1), ("GetItem", 1)]), "no pointer: the inbox rows");
    t.holders(&group.id, &many, now).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchGetItem", 1), ("GetItem", 1)]),
        "the pointer, then the positions"
    );
    t.mark_fanned_out(&chat.id, &m.id).await.unwrap();
    assert_eq!(calls.take(), expect(&[("UpdateItem", 1)]));
    t.inbox_page(&two[0], None, 50, now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("Query", 2)]), "its positions (none), its rows");
    t.inbox_page(&many[0], None, 50, now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("Query", 3)]), "its positions, its rows, the group's messages");
    t.ack(&two[0], std::slice::from_ref(&m.id)).await.unwrap();
    assert_eq!(calls.take(), expect(&[("DeleteItem", 1), ("Query", 1)]), "one delete an id, no read");
    t.ack(&many[0], std::slice::from_ref(&group.id)).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchGetItem", 1), ("Query", 1), ("UpdateItem", 1)]),
        "its positions, the ids' pointers, one position moved a chat"
    );
}

/// What the contract cannot see: DynamoDB's paging, rows TTL removes on
/// its own schedule, and crashes between two writes. One server for all.
#[tokio::test]
async fn dynamodb_specifics() {
    let moto = moto::shared().await;
    let names = moto.tables("specifics").await;
    let (client, calls) = moto.counted_dynamodb();
    let t = DynamoTables::new(client.clone(), names.clone());
    let ids = courier_core::ids::IdGen::new();
    let now: Millis = 1_800_000_000_000;
    let user = |name: &str| UserId::try_from(name).unwrap();
    let device = |name: &str| DeviceId::try_from(name).unwrap();
    let message = |chat: &ChatId, at: Millis, to: &[InboxKey]| StoredMessage {
        chat: chat.clone(),
        id: ids.message(at),
        timestamp: at,
        json: format!("{{\"at\":{at}}}"),
        recipients: to.to_vec(),
        fanned_out: false,
    };
    let chat = ids.chat(now);

    // Limit counts rows read before the expiry filter: a page must read on.
    let inbox = InboxKey::Device(user("reader"), device("d"));
    for i in 0..5 {
        let m = message(&chat, now - 40 * DAY_MS + i, std::slice::from_ref(&inbox));
        t.store(&m, None, now - DAY_MS).await.unwrap();
    }
    let live: Vec<StoredMessage> =
        (0..2).map(|i| message(&chat, now + i, std::slice::from_ref(&inbox))).collect();
    for m in &live {
        t.store(m, None, now + DAY_MS).await.unwrap();
    }
    calls.take();
    let page = t.inbox_page(&inbox, None, 1, now).await.unwrap();
    assert_eq!(page, vec![(live[0].id.clone(), live[0].json.clone())], "past five expired rows");
    assert_eq!(calls.take().get("Query"), Some(&7), "one row read a call, so six calls, and the positions");
    let page = t.inbox_page(&inbox, Some(&live[0].id), 5, now).await.unwrap();
    assert_eq!(page, vec![(live[1].id.clone(), live[1].json.clone())]);

    // A device row that TTL removed before the clean-up job ran: the
    // device comes back new, and its old inbox does not come back with it.
    let (u, d) = (user("returning"), device("phone"));
    let old = now - 30 * DAY_MS;
    let c = |name: &str| ConnectionId::try_from(name).unwrap();
    t.connect(&u, &d, &c("r1"), now, 3, old).await.unwrap();
    let mine = InboxKey::Device(u.clone(), d.clone());
    t.store(&message(&chat, now, std::slice::from_ref(&mine)), None, now + DAY_MS).await.unwrap();
    client
        .delete_item()
        .table_name(&names.devices_table)
        .key("userId", AttributeValue::S(u.to_string()))
        .key("deviceId", AttributeValue::S(d.to_string()))
        .send()
        .await
        .unwrap();
    let back = t.connect(&u, &d, &c("r2"), now + 1, 3, old).await.unwrap();
    assert_eq!(back, Connected::Ok { new_device: true, first_device: true, replaced: None });
    assert!(t.inbox_page(&mine, None, 10, now).await.unwrap().is_empty());

    // A send that died after its message row, before its inbox rows: the
    // client's retry finds it and the inbox rows are written then.
    let to = [InboxKey::Device(user("friend"), device("d"))];
    let key_ = DedupeKey { user: u.clone(), device: d.clone(), client_message_id: "once".into() };
    let first = message(&chat, now, &to);
    t.store(&first, Some(&key_), now + DAY_MS).await.unwrap();
    t.ack(&to[0], std::slice::from_ref(&first.id)).await.unwrap();
    let retry = message(&chat, now + 1, &to);
    assert!(
        matches!(t.store(&retry, Some(&key_), now + DAY_MS).await.unwrap(), Store::Duplicate(m) if m.id == first.id)
    );
    assert_eq!(t.holders(&first.id, &to, now).await.unwrap(), to.to_vec(), "the lost inbox row is back");
    // Once the fan-out is marked, a retry writes nothing: an ack stays an ack.
    t.mark_fanned_out(&chat, &first.id).await.unwrap();
    t.ack(&to[0], std::slice::from_ref(&first.id)).await.unwrap();
    let again = message(&chat, now + 2, &to);
    assert!(matches!(t.store(&again, Some(&key_), now + DAY_MS).await.unwrap(), Store::Duplicate(_)));
    assert!(t.holders(&first.id, &to, now).await.unwrap().is_empty());
    // The same for a group message stored once: a send that died after its
    // row, before its pointer and positions, is finished by the retry.
    let members: Vec<InboxKey> =
        (0..6).map(|i| InboxKey::Device(user("member"), device(&format!("m{i}")))).collect();
    let group_chat = ids.chat(now);
    let group_key = DedupeKey { client_message_id: "group-once".into(), ..key_.clone() };
    let sent = message(&group_chat, now, &members);
    t.store(&sent, Some(&group_key), now + DAY_MS).await.unwrap();
    let mut lost = vec![(format!("message#{}#chat", sent.id), sent.id.to_string())];
    lost.extend(members.iter().map(|k| (format!("positions#{}", k.key()), group_chat.to_string())));
    for (inbox, sort) in lost {
        client
            .delete_item()
            .table_name(&names.inbox_table)
            .key("inbox", AttributeValue::S(inbox))
            .key("messageId", AttributeValue::S(sort))
            .send()
            .await
            .unwrap();
    }
    assert!(t.holders(&sent.id, &members, now).await.unwrap().is_empty(), "nothing holds it");
    assert!(t.inbox_page(&members[0], None, 10, now).await.unwrap().is_empty());
    let retry = message(&group_chat, now + 1, &members);
    assert!(
        matches!(t.store(&retry, Some(&group_key), now + DAY_MS).await.unwrap(), Store::Duplicate(m) if m.id == sent.id)
    );
    assert_eq!(t.holders(&sent.id, &members, now).await.unwrap(), members, "every device holds it again");
    assert_eq!(
        t.inbox_page(&members[0], None, 10, now).await.unwrap(),
        vec![(sent.id.clone(), sent.json.clone())]
    );
    // ... and so is one whose positions a later message made first: they
    // start after it, so the retry puts it in their held ids.
    let late = DedupeKey { client_message_id: "group-late".into(), ..key_.clone() };
    let lost = message(&group_chat, now + 10, &members);
    t.store(&lost, Some(&late), now + DAY_MS).await.unwrap();
    for k in &members {
        client
            .delete_item()
            .table_name(&names.inbox_table)
            .key("inbox", AttributeValue::S(format!("positions#{}", k.key())))
            .key("messageId", AttributeValue::S(group_chat.to_string()))
            .send()
            .await
            .unwrap();
    }
    let later = message(&group_chat, now + 120_000, &members);
    t.store(&later, None, now + DAY_MS).await.unwrap();
    assert!(t.holders(&lost.id, &members, now).await.unwrap().is_empty(), "its positions start after it");
    let retry = message(&group_chat, now + 120_001, &members);
    assert!(
        matches!(t.store(&retry, Some(&late), now + DAY_MS).await.unwrap(), Store::Duplicate(m) if m.id == lost.id)
    );
    assert_eq!(t.holders(&lost.id, &members, now).await.unwrap(), members, "held since the retry");
    let ids_of = |page: Vec<(MessageId, String)>| page.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let both = vec![lost.id.clone(), later.id.clone()];
    assert_eq!(ids_of(t.inbox_page(&members[1], None, 10, now).await.unwrap()), both);
    assert_eq!(t.ack(&members[1], std::slice::from_ref(&lost.id)).await.unwrap().len(), 1);
    assert_eq!(ids_of(t.inbox_page(&members[1], None, 10, now).await.unwrap()), both[1..]);

    // A device the chat's newer rows do not list (it left, or only sends):
    // a sync that finds nothing for it moves its position past them, so the
    // next one does not read them again.
    // Ids of 2023 (long settled), from a generator of their own: one
    // generator never goes back in time.
    let past: Millis = 1_700_000_000_000;
    let past_ids = courier_core::ids::IdGen::new();
    let old_message = |chat: &ChatId, at: Millis, to: &[InboxKey]| StoredMessage {
        id: past_ids.message(at),
        ..message(chat, at, to)
    };
    let quiet = InboxKey::Device(user("quiet"), device("q"));
    let quiet_chat = ids.chat(now);
    let first = old_message(&quiet_chat, past, &[members.clone(), vec![quiet.clone()]].concat());
    t.store(&first, None, now + DAY_MS).await.unwrap();
    assert_eq!(t.ack(&quiet, std::slice::from_ref(&first.id)).await.unwrap().len(), 1);
    let unlisted: Vec<StoredMessage> = (1..4).map(|i| old_message(&quiet_chat, past + i, &members)).collect();
    for m in &unlisted {
        t.store(m, None, now + DAY_MS).await.unwrap();
    }
    assert!(t.inbox_page(&quiet, None, 10, now).await.unwrap().is_empty());
    let position = client
        .get_item()
        .table_name(&names.inbox_table)
        .key("inbox", AttributeValue::S(format!("positions#{}", quiet.key())))
        .key("messageId", AttributeValue::S(quiet_chat.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let after = position["after"].as_s().unwrap();
    assert!(after.as_str() > unlisted[2].id.as_str(), "moved past what it read: {after}");
    assert!(!position.contains_key("acked"), "and what it had acked before: {position:?}");
    // A claim past its expiry, that TTL has not removed yet, is free.
    let short = DedupeKey { client_message_id: "short".into(), ..key_.clone() };
    t.store(&message(&chat, now, &to), Some(&short), now + 1_000).await.unwrap();
    let later = message(&chat, now + 2_000, &to);
    assert_eq!(t.store(&later, Some(&short), now + DAY_MS).await.unwrap(), Store::Stored);
    // The stream shows dedupe rows too (sort key `dedupe#user#device#clientMessageId`);
    // they read as no message at all.
    let dedupe_id =
        MessageId::try_from(format!("dedupe#{}#{}#{}", short.user, short.device, short.client_message_id))
            .unwrap();
    assert_eq!(t.message(&chat, &dedupe_id).await.unwrap(), None);

    // A participant row whose delete was lost does not bring the chat back.
    let (a, b) = (user("a"), user("b"));
    let mut group = contract::chat_of(ids.chat(now), &[&a, &b]);
    t.create_chat(&group).await.unwrap();
    group.remove(&b);
    assert!(t.update_chat(&group, 0).await.unwrap());
    client
        .put_item()
        .table_name(&names.participants_table)
        .item("chatId", AttributeValue::S(group.id.to_string()))
        .item("userId", AttributeValue::S(b.to_string()))
        .send()
        .await
        .unwrap();
    assert!(t.chats_of(&b, None, 100).await.unwrap().is_empty());
    assert_eq!(t.chats_of(&a, None, 100).await.unwrap(), vec![group]);
}

/// Tells the client that every request of its next `left` batch calls
/// went unprocessed, which moto never does, so the retry path runs. (The
/// requests did land; repeating them is idempotent, as in production.)
#[derive(Clone, Debug, Default)]
struct Unprocessed {
    left: Arc<std::sync::atomic::AtomicUsize>,
    request: Arc<std::sync::Mutex<Option<(String, serde_json::Value)>>>,
}

impl aws_sdk_dynamodb::config::Intercept for Unprocessed {
    fn name(&self) -> &'static str {
        "Unprocessed"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_dynamodb::error::BoxError> {
        let target = context.request().headers().get("x-amz-target").unwrap_or_default().to_owned();
        if target.ends_with(".BatchWriteItem") || target.ends_with(".BatchGetItem") {
            let body = serde_json::from_slice(context.request().body().bytes().unwrap_or_default())?;
            *self.request.lock().unwrap() = Some((target, body));
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut<'_>,
        _: &aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_dynamodb::error::BoxError> {
        use std::sync::atomic::Ordering::SeqCst;
        let Some((target, request)) = self.request.lock().unwrap().take() else { return Ok(()) };
        if self.left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_err() {
            return Ok(());
        }
        let body = if target.ends_with(".BatchWriteItem") {
            serde_json::json!({ "UnprocessedItems": request["RequestItems"] })
        } else {
            serde_json::json!({ "Responses": {}, "UnprocessedKeys": request["RequestItems"] })
        };
        let response = context.response_mut();
        response.headers_mut().remove("content-length");
        response.headers_mut().remove("x-amz-crc32");
        *response.body_mut() = body.to_string().into();
        Ok(())
    }
}

#[tokio::test]
async fn unprocessed_batch_items_are_retried_then_given_up_on() {
    let moto = moto::shared().await;
    let names = moto.tables("unprocessed").await;
    let (meter, unprocessed) = (Meter::new(), Unprocessed::default());
    let config = aws_sdk_dynamodb::config::Builder::from(&moto.sdk_config())
        .interceptor(meter.clone())
        .interceptor(unprocessed.clone())
        .build();
    let calls = || meter.take().requests_to("DynamoDB");
    let t = DynamoTables::new(aws_sdk_dynamodb::Client::from_conf(config), names);
    let ids = courier_core::ids::IdGen::new();
    let now: Millis = 1_800_000_000_000;
    let to = [InboxKey::Device(UserId::try_from("u").unwrap(), DeviceId::try_from("d").unwrap())];
    let message = || StoredMessage {
        chat: ChatId::try_from("chat").unwrap(),
        id: ids.message(now),
        timestamp: now,
        json: "{}".into(),
        recipients: to.to_vec(),
        fanned_out: false,
    };
    let set_left = |n| unprocessed.left.store(n, std::sync::atomic::Ordering::SeqCst);

    set_left(3);
    let m = message();
    assert_eq!(t.store(&m, None, now + DAY_MS).await.unwrap(), Store::Stored);
    assert_eq!(calls().get("BatchWriteItem"), Some(&4), "three retries, then done");
    set_left(3);
    assert_eq!(t.holders(&m.id, &to, now).await.unwrap(), to.to_vec());
    assert_eq!(calls().get("BatchGetItem"), Some(&4));

    set_left(usize::MAX);
    let err = t.store(&message(), None, now + DAY_MS).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(calls().get("BatchWriteItem"), Some(&DynamoTables::BATCH_ATTEMPTS.into()), "bounded");
}

/// A client whose every request the meter sees, sized by the tables of `names`.
fn metered(moto: &moto::MotoServer, names: &courier_aws::Names) -> (aws_sdk_dynamodb::Client, Meter) {
    let meter = Meter::new();
    meter.watch(names);
    let config =
        aws_sdk_dynamodb::config::Builder::from(&moto.sdk_config()).interceptor(meter.clone()).build();
    (aws_sdk_dynamodb::Client::from_conf(config), meter)
}

/// The requests and units of the version 2 operations, pinned: the figures
/// of docs/cost.md's "Key directory, device messages and receipt markers".
/// Sizes as a real client makes them: UUID user ids, 44-character Curve25519
/// keys in base64, 88-character signatures.
#[tokio::test]
async fn version_2_requests_per_operation() {
    use std::collections::BTreeMap;

    use courier_core::ids::IdGen;
    use courier_core::ports::{
        AttachmentStore, ClaimCount, KeyStore, KeyUpload, Markers, OneTimeKey, ReceiptStore, SignedKey,
        Uploaded,
    };

    let moto = moto::shared().await;
    let names = moto.tables("calls2").await;
    let (client, meter) = metered(moto, &names);
    let t = DynamoTables::new(client, names);
    let ids = IdGen::new();
    let now: Millis = 1_800_000_000_000;
    let user = |name: &str| UserId::try_from(format!("{name}0000-1111-2222-3333-444444444444")).unwrap();
    let (a, b) = (user("aaaa"), user("bbbb"));
    let (phone, laptop) = (DeviceId::try_from("phone").unwrap(), DeviceId::try_from("laptop").unwrap());
    let key = |i: usize| format!("{i:0>43}=");
    let signed =
        |id: &str| SignedKey { key_id: id.into(), public_key: key(7), signature: format!("{:0>86}==", 9) };
    let one_time = |range: std::ops::Range<usize>| {
        range.map(|i| OneTimeKey { key_id: i.to_string(), public_key: key(i) }).collect::<Vec<_>>()
    };
    // Requests by operation, read and write units in all; no item's size guessed.
    let take = || {
        let usage = meter.take();
        assert_eq!(usage.unsized_items, 0, "{usage}");
        println!("{usage}");
        (usage.requests_to("DynamoDB"), usage.read_units_total(), usage.write_units_total())
    };
    let expect = |pairs: &[(&str, u64)], rru: f64, wru: f64| {
        let requests: BTreeMap<String, u64> = pairs.iter().map(|(op, n)| (op.to_string(), *n)).collect();
        (requests, rru, wru)
    };

    // uploadKeys, a device's first: the bundle read, the keyIds looked up,
    // the bundle and 99 keys in one transaction, the 100th key in a second
    // with a check of the bundle, the count read back.
    let first = KeyUpload {
        identity_key: Some(key(1)),
        signed_pre_key: Some(signed("s1")),
        one_time_pre_keys: one_time(0..100),
        fallback_key: Some(signed("f1")),
    };
    let stored = t.upload_keys(&b, &phone, &first, 200).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 100, became_ready: true });
    assert_eq!(
        take(),
        expect(&[("BatchGetItem", 1), ("GetItem", 2), ("TransactWriteItems", 2)], 102.0, 204.0),
        "uploadKeys: first, with 100 one-time prekeys"
    );
    let more = KeyUpload { one_time_pre_keys: one_time(100..150), ..KeyUpload::default() };
    t.upload_keys(&b, &phone, &more, 200).await.unwrap();
    assert_eq!(
        take(),
        expect(&[("BatchGetItem", 1), ("GetItem", 2), ("TransactWriteItems", 1)], 52.0, 102.0),
        "uploadKeys: 50 more"
    );
    let rotate = KeyUpload { signed_pre_key: Some(signed("s2")), ..KeyUpload::default() };
    t.upload_keys(&b, &phone, &rotate, 200).await.unwrap();
    assert_eq!(take(), expect(&[("GetItem", 2), ("TransactWriteItems", 1)], 2.0, 2.0), "a new signed prekey");
    t.upload_keys(&b, &laptop, &KeyUpload { one_time_pre_keys: Vec::new(), ..first.clone() }, 200)
        .await
        .unwrap();
    take();

    // getKeys of one device: its claim counters, the bundles, one claim.
    let claimer = InboxKey::Device(a.clone(), phone.clone());
    let scope = InboxKey::Device(b.clone(), phone.clone()).key();
    let counts =
        [ClaimCount { scope: "*".into(), amount: 1, limit: 600 }, ClaimCount { scope, amount: 1, limit: 5 }];
    assert!(t.count_claims(&claimer, now / 3_600_000, &counts).await.unwrap());
    assert_eq!(
        take(),
        expect(&[("TransactWriteItems", 1)], 0.0, 4.0),
        "two claim counters, in one transaction"
    );
    assert_eq!(t.device_keys(std::slice::from_ref(&b)).await.unwrap().len(), 2);
    assert_eq!(take(), expect(&[("Query", 1)], 1.0, 0.0), "the bundles of a user's devices: one Query");
    let (claimed, left) = t.claim_one_time_key(&b, &phone).await.unwrap();
    assert_eq!((claimed.is_some(), left), (true, 149));
    assert_eq!(
        take(),
        expect(&[("DeleteItem", 1), ("Query", 1), ("UpdateItem", 1)], 1.0, 2.0),
        "a claim: the count, ten candidates, one delete"
    );
    assert_eq!(t.claim_one_time_key(&b, &laptop).await.unwrap(), (None, 0));
    assert_eq!(take(), expect(&[("UpdateItem", 1)], 0.0, 1.0), "none left: the count alone says so");
    t.one_time_key_count(&b, &phone).await.unwrap();
    assert_eq!(take(), expect(&[("GetItem", 1)], 1.0, 0.0), "uploadKeys {{}}");

    // sendToDevices to two devices, with a clientMessageId: the claim holding
    // the batch, the inbox rows, the claim let go of the batch.
    let dedupe = DedupeKey { user: a.clone(), device: phone.clone(), client_message_id: "k".into() };
    let id = ids.message(now);
    let body = |to: &str| {
        format!(
            r#"{{"type":"deviceMessage","messageId":"{id}","userId":"{a}","deviceId":"phone","body":"{}","timestamp":{now}}}"#,
            to.repeat(200)
        )
    };
    let two = [
        (InboxKey::Device(b.clone(), phone.clone()), body("p")),
        (InboxKey::Device(b.clone(), laptop.clone()), body("l")),
    ];
    assert_eq!(t.store_device_messages(&id, &two, Some(&dedupe), now + 30 * DAY_MS).await.unwrap(), None);
    assert_eq!(
        take(),
        expect(&[("BatchWriteItem", 1), ("PutItem", 1), ("UpdateItem", 1)], 0.0, 4.0),
        "sendToDevices: two devices"
    );
    let retry = ids.message(now + 1);
    let found = t.store_device_messages(&retry, &two, Some(&dedupe), now + 30 * DAY_MS).await.unwrap();
    assert_eq!(found, Some(id.clone()));
    assert_eq!(take(), expect(&[("GetItem", 1), ("PutItem", 1)], 1.0, 1.0), "a retry: the claim is found");
    let plain = ids.message(now + 2);
    t.store_device_messages(&plain, &two, None, now + 30 * DAY_MS).await.unwrap();
    assert_eq!(take(), expect(&[("BatchWriteItem", 1)], 0.0, 2.0), "without a clientMessageId");

    // Receipts: markRead moves three markers at once; an ack's move of the
    // delivered marker is one update; getReceipts one Query.
    let chat = ids.chat(now);
    let m: Vec<MessageId> = (0..3).map(|i| ids.message(now + i)).collect();
    let up_to = |i: usize| Some(m[i].clone());
    t.advance(&chat, &b, &Markers { delivered: up_to(1), ..Markers::default() }).await.unwrap();
    assert_eq!(take(), expect(&[("UpdateItem", 1)], 0.0, 1.0), "ack: the delivered marker");
    let read = Markers { delivered: up_to(0), read: up_to(0), private_read: up_to(0) };
    t.advance(&chat, &b, &read).await.unwrap();
    assert_eq!(
        take(),
        expect(&[("UpdateItem", 2)], 0.0, 2.0),
        "markRead behind the delivered marker: the failed try costs its unit"
    );
    let read = Markers { delivered: up_to(2), read: up_to(2), private_read: up_to(2) };
    t.advance(&chat, &b, &read).await.unwrap();
    assert_eq!(take(), expect(&[("UpdateItem", 1)], 0.0, 1.0), "markRead: all three markers");
    t.advance(&chat, &a, &read).await.unwrap();
    take();
    assert_eq!(t.receipts(&chat).await.unwrap().len(), 2);
    assert_eq!(take(), expect(&[("Query", 1)], 1.0, 0.0), "getReceipts");
    t.remove_receipts(&chat, &a).await.unwrap();
    assert_eq!(take(), expect(&[("DeleteItem", 1)], 0.0, 1.0), "a participant leaves");
    let group = ids.chat(now);
    for i in 0..100 {
        t.advance(&group, &user(&format!("{i:0>4}")), &read).await.unwrap();
    }
    take();
    assert_eq!(t.receipts(&group).await.unwrap().len(), 100);
    assert_eq!(take(), expect(&[("Query", 1)], 5.0, 0.0), "getReceipts of 100 participants");

    // deleteAccount's share: keys, the pending inbox, attachments by uploader.
    t.remove_keys(&b, &phone).await.unwrap();
    assert_eq!(
        take(),
        expect(&[("BatchWriteItem", 6), ("DeleteItem", 1), ("GetItem", 1), ("Query", 1)], 6.0, 150.0),
        "removing a device's keys: 149 one-time prekeys and the bundle"
    );
    t.remove_keys(&a, &phone).await.unwrap();
    assert_eq!(
        take(),
        expect(&[("GetItem", 1)], 1.0, 0.0),
        "a device without keys: one read (a new device's connect)"
    );
    t.drop_pending(&b).await.unwrap();
    assert_eq!(take(), expect(&[("Query", 1)], 1.0, 0.0), "no pending inbox: one Query finds none");
    assert!(t.remove_attachments_of(&b).await.unwrap().is_empty());
    assert_eq!(take(), expect(&[("Query", 1)], 0.5, 0.0), "no attachments: the index Query alone");
}

/// What the contract cannot see of the version 2 tables: the upload split
/// past TransactWriteItems' 100 items, a count left above the keys by a
/// crash, a sendToDevices that died between its claim and its inbox rows,
/// a dedupe claim past its expiry that TTL has not removed, and chat rows
/// written before encrypted chats existed. (Racing claims are the
/// contract's, on a server of their own.)
#[tokio::test]
async fn version_2_dynamodb_specifics() {
    use courier_core::ids::IdGen;
    use courier_core::ports::{KeyStore, KeyUpload, OneTimeKey, SignedKey, Uploaded};

    let moto = moto::shared().await;
    let names = moto.tables("specifics2").await;
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config());
    let t = DynamoTables::new(client.clone(), names.clone());
    let ids = IdGen::new();
    let now: Millis = 1_800_000_000_000;
    let (u, phone) = (UserId::try_from("u").unwrap(), DeviceId::try_from("phone").unwrap());
    let one_time = |range: std::ops::Range<usize>| {
        range
            .map(|i| OneTimeKey { key_id: format!("k{i}"), public_key: format!("otk-{i}") })
            .collect::<Vec<_>>()
    };
    let signed = SignedKey { key_id: "s".into(), public_key: "spk".into(), signature: "sig".into() };

    // An upload of 100 new keys is 101 writes: the transaction holds 100, so
    // the last key goes after it, and every key is there and counted once.
    let first = KeyUpload {
        identity_key: Some("id".into()),
        signed_pre_key: Some(signed),
        one_time_pre_keys: one_time(0..100),
        fallback_key: None,
    };
    let stored = t.upload_keys(&u, &phone, &first, 200).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 100, became_ready: true });
    let second = KeyUpload { one_time_pre_keys: one_time(50..150), ..KeyUpload::default() };
    let stored = t.upload_keys(&u, &phone, &second, 200).await.unwrap();
    assert_eq!(
        stored,
        Uploaded::Stored { one_time_keys: 150, became_ready: false },
        "50 were stored already"
    );
    let over = KeyUpload { one_time_pre_keys: one_time(150..201), ..KeyUpload::default() };
    assert_eq!(t.upload_keys(&u, &phone, &over, 200).await.unwrap(), Uploaded::TooManyOneTimeKeys);
    let to_cap = KeyUpload { one_time_pre_keys: one_time(150..200), ..KeyUpload::default() };
    let stored = t.upload_keys(&u, &phone, &to_cap, 200).await.unwrap();
    assert_eq!(stored, Uploaded::Stored { one_time_keys: 200, became_ready: false });

    // A crash after the transaction, before the keys put after it: the
    // count is above the keys. A claim that finds none says so, and its
    // decrement brings the count back to the keys.
    let (w, laptop) = (UserId::try_from("w").unwrap(), DeviceId::try_from("laptop").unwrap());
    let three =
        KeyUpload { one_time_pre_keys: one_time(0..3), identity_key: Some("idw".into()), ..first.clone() };
    t.upload_keys(&w, &laptop, &three, 200).await.unwrap();
    client
        .delete_item()
        .table_name(&names.keys_table)
        .key("userId", AttributeValue::S(w.to_string()))
        .key("entry", AttributeValue::S("otk#laptop#k1".into()))
        .send()
        .await
        .unwrap();
    let mut claims = Vec::new();
    for _ in 0..3 {
        let (key, left) = t.claim_one_time_key(&w, &laptop).await.unwrap();
        claims.push((key.map(|k| k.key_id), left));
    }
    let lefts: Vec<u64> = claims.iter().map(|(_, left)| *left).collect();
    assert_eq!(lefts, vec![2, 1, 0], "{claims:?}");
    let mut handed: Vec<Option<String>> = claims.into_iter().map(|(key, _)| key).collect();
    handed.sort();
    assert_eq!(handed, vec![None, Some("k0".into()), Some("k2".into())], "the two keys there, then none");
    assert_eq!(t.one_time_key_count(&w, &laptop).await.unwrap(), 0);
    assert_eq!(t.claim_one_time_key(&w, &laptop).await.unwrap(), (None, 0));

    // A sendToDevices that died after its claim, before its inbox rows: the
    // claim still holds the batch, and the retry writes it under the first id.
    let (v, tablet) = (UserId::try_from("v").unwrap(), DeviceId::try_from("tablet").unwrap());
    let to = InboxKey::Device(v.clone(), tablet.clone());
    let claim_key = |client_message_id: &str| {
        [
            ("inbox".to_owned(), AttributeValue::S("dedupe#u#phone".into())),
            ("messageId".to_owned(), AttributeValue::S(client_message_id.into())),
        ]
    };
    // What the first attempt left: its claim, holding the batch, and nothing else.
    let plant = |client_message_id: &str, first: &MessageId, body: &str| {
        let batch = AttributeValue::L(vec![AttributeValue::M(
            [
                ("inbox".to_owned(), AttributeValue::S(to.key())),
                ("body".to_owned(), AttributeValue::S(body.to_owned())),
            ]
            .into(),
        )]);
        client
            .put_item()
            .table_name(&names.inbox_table)
            .set_item(Some(claim_key(client_message_id).into()))
            .item("firstMessageId", AttributeValue::S(first.to_string()))
            .item("pending", batch)
            .item("expiresAt", AttributeValue::N(((now + DAY_MS) / 1000).to_string()))
            .send()
    };
    let still_pending = |client_message_id: &str| {
        client
            .get_item()
            .table_name(&names.inbox_table)
            .set_key(Some(claim_key(client_message_id).into()))
            .send()
    };
    let first_id = ids.message(now);
    let body = format!(r#"{{"type":"deviceMessage","messageId":"{first_id}","body":"x"}}"#);
    plant("lost", &first_id, &body).await.unwrap();
    let key_ = DedupeKey { user: u.clone(), device: phone.clone(), client_message_id: "lost".into() };
    let retry = ids.message(now + 1);
    let items = [(to.clone(), "the retry's own body".to_owned())];
    let found = t.store_device_messages(&retry, &items, Some(&key_), now + DAY_MS).await.unwrap();
    assert_eq!(found, Some(first_id.clone()));
    assert_eq!(
        t.inbox_page(&to, None, 10, now).await.unwrap(),
        vec![(first_id.clone(), body)],
        "the first batch"
    );
    let claim = still_pending("lost").await.unwrap().item.unwrap();
    assert!(!claim.contains_key("pending"), "the claim let go of the batch: {claim:?}");
    t.ack(&to, std::slice::from_ref(&first_id)).await.unwrap();

    // The SDK's retry of a claim whose first attempt landed finds its own
    // id: the batch is stored, and the answer is no duplicate.
    let own = ids.message(now + 2);
    let own_body = format!(r#"{{"type":"deviceMessage","messageId":"{own}","body":"y"}}"#);
    plant("own", &own, &own_body).await.unwrap();
    let own_key = DedupeKey { client_message_id: "own".into(), ..key_.clone() };
    let mine = [(to.clone(), own_body.clone())];
    assert_eq!(t.store_device_messages(&own, &mine, Some(&own_key), now + DAY_MS).await.unwrap(), None);
    assert_eq!(t.inbox_page(&to, None, 10, now).await.unwrap(), vec![(own.clone(), own_body)]);
    let claim = still_pending("own").await.unwrap().item.unwrap();
    assert!(!claim.contains_key("pending"), "{claim:?}");

    // A claim past its expiry, that TTL has not removed yet, is free.
    let short = DedupeKey { client_message_id: "short".into(), ..key_.clone() };
    let early = ids.message(now);
    t.store_device_messages(&early, &items, Some(&short), now + 1_000).await.unwrap();
    let later = ids.message(now + 2_000);
    assert_eq!(t.store_device_messages(&later, &items, Some(&short), now + DAY_MS).await.unwrap(), None);

    // Chat rows from before encrypted chats read as plain chats.
    let old = ids.chat(now);
    let row = serde_json::json!({
        "chatId": old, "name": "old", "members": [{"user": "u", "joinedAt": now}],
        "admins": ["u"], "createdAt": now, "version": 0,
    });
    let item: std::collections::HashMap<String, AttributeValue> = serde_dynamo::to_item(row).unwrap();
    client.put_item().table_name(&names.chats_table).set_item(Some(item)).send().await.unwrap();
    let chat = t.chat(&old).await.unwrap().expect("the old row reads");
    assert!(!chat.encrypted);
}

/// Makes each of the next `left` DeleteItems ask for a key that is not there,
/// as when another claim deleted the chosen one-time prekey first: moto
/// cannot make two claims race deterministically, this can.
#[derive(Clone, Debug, Default)]
struct TakenFirst {
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl aws_sdk_dynamodb::config::Intercept for TakenFirst {
    fn name(&self) -> &'static str {
        "TakenFirst"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _: &aws_sdk_dynamodb::config::RuntimeComponents,
        _: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_dynamodb::error::BoxError> {
        use std::sync::atomic::Ordering::SeqCst;
        let request = context.request_mut();
        let target = request.headers().get("x-amz-target").unwrap_or_default();
        if !target.ends_with(".DeleteItem")
            || self.left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_err()
        {
            return Ok(());
        }
        let mut body: serde_json::Value = serde_json::from_slice(request.body().bytes().unwrap_or_default())?;
        body["Key"]["entry"]["S"] = "otk#gone#already".into();
        let body = body.to_string();
        request.headers_mut().insert("content-length", body.len().to_string());
        *request.body_mut() = body.into();
        Ok(())
    }
}

/// A claim whose chosen key another claim deleted first reads again and
/// takes another; one that keeps losing gives up with a retryable error,
/// never handing out a key twice or none while keys are left.
#[tokio::test]
async fn a_claim_that_loses_its_key_takes_another() {
    use courier_core::ports::{KeyStore, KeyUpload, OneTimeKey, SignedKey};

    let moto = moto::shared().await;
    let names = moto.tables("taken").await;
    let (meter, taken) = (Meter::new(), TakenFirst::default());
    let config = aws_sdk_dynamodb::config::Builder::from(&moto.sdk_config())
        .interceptor(meter.clone())
        .interceptor(taken.clone())
        .build();
    let calls = || meter.take().requests_to("DynamoDB");
    let t = DynamoTables::new(aws_sdk_dynamodb::Client::from_conf(config), names);
    let (u, d) = (UserId::try_from("u").unwrap(), DeviceId::try_from("phone").unwrap());
    let upload = KeyUpload {
        identity_key: Some("id".into()),
        signed_pre_key: Some(SignedKey {
            key_id: "s".into(),
            public_key: "spk".into(),
            signature: "sig".into(),
        }),
        one_time_pre_keys: (0..5)
            .map(|i| OneTimeKey { key_id: format!("k{i}"), public_key: format!("p{i}") })
            .collect(),
        fallback_key: None,
    };
    t.upload_keys(&u, &d, &upload, 200).await.unwrap();
    calls();
    let lose = |n| taken.left.store(n, std::sync::atomic::Ordering::SeqCst);

    lose(3);
    let (first, left) = t.claim_one_time_key(&u, &d).await.unwrap();
    assert!(first.is_some());
    assert_eq!(left, 4);
    let made = calls();
    assert_eq!(
        (made.get("Query"), made.get("DeleteItem")),
        (Some(&4), Some(&4)),
        "three lost, the fourth won"
    );

    let mut handed = vec![first.unwrap().key_id];
    for left in (0..4).rev() {
        let (key, now_left) = t.claim_one_time_key(&u, &d).await.unwrap();
        handed.push(key.expect("a key is left").key_id);
        assert_eq!(now_left, left);
    }
    handed.sort();
    assert_eq!(handed, ["k0", "k1", "k2", "k3", "k4"], "each key once");

    t.upload_keys(
        &u,
        &d,
        &KeyUpload { one_time_pre_keys: upload.one_time_pre_keys.clone(), ..KeyUpload::default() },
        200,
    )
    .await
    .unwrap();
    lose(usize::MAX);
    let err = t.claim_one_time_key(&u, &d).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    lose(0);
    assert_eq!(
        t.one_time_key_count(&u, &d).await.unwrap(),
        4,
        "the lost claim's count is spent, its key kept"
    );
}

/// A device's push registration and wake mark ride on its row: what each
/// step of a wake-up asks of DynamoDB (docs/cost.md's "Wake-ups"), and what
/// the contract cannot see (no row made for a device that is not there, the
/// registration kept by a reconnect and dropped by expiry).
#[tokio::test]
async fn wake_ups_on_the_device_row() {
    use std::collections::BTreeMap;

    use courier_core::ports::{Platform, PushRegistration};

    let moto = moto::shared().await;
    let names = moto.tables("wake").await;
    let (client, meter) = metered(moto, &names);
    let t = DynamoTables::new(client, names.clone());
    let raw = aws_sdk_dynamodb::Client::new(&moto.sdk_config());
    let now: Millis = 1_800_000_000_000;
    let old = now - 30 * DAY_MS;
    let window = 30_000;
    let u = UserId::try_from("aaaa0000-1111-2222-3333-444444444444").unwrap();
    let (phone, ghost) = (DeviceId::try_from("phone").unwrap(), DeviceId::try_from("ghost").unwrap());
    let c = |name: &str| ConnectionId::try_from(name).unwrap();
    // As deployed: an FCM token (about 160 characters) and its SNS endpoint.
    let registration = |token: char| PushRegistration {
        platform: Platform::Fcm,
        address: std::iter::repeat_n(token, 163).collect(),
        keys: None,
        endpoint: Some(format!(
            "arn:aws:sns:eu-west-1:123456789012:endpoint/GCM/courier/{token}aaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
        )),
    };
    let (reg, other) = (registration('f'), registration('g'));
    let take = || {
        let usage = meter.take();
        assert_eq!(usage.unsized_items, 0, "{usage}");
        (usage.requests_to("DynamoDB"), usage.read_units_total(), usage.write_units_total())
    };
    let one_update = (BTreeMap::from([("UpdateItem".to_owned(), 1)]), 0.0, 1.0);

    t.connect(&u, &phone, &c("c1"), now, 3, old).await.unwrap();
    take();
    assert!(t.register_push(&u, &phone, &reg).await.unwrap());
    assert_eq!(take(), one_update, "registerPush: one UpdateItem");
    let found = t.devices_of(std::slice::from_ref(&u), old).await.unwrap();
    assert_eq!(found[0].push.as_ref(), Some(&reg), "devices_of reads it");
    take();

    // Connected: no wake-up, and the refusal is the condition's.
    assert_eq!(t.begin_wake(&u, &phone, now, now - window + 1).await.unwrap(), None);
    assert_eq!(take(), one_update, "a refused begin_wake costs its write all the same");
    t.disconnect(&c("c1"), now).await.unwrap();
    take();
    assert_eq!(t.begin_wake(&u, &phone, now + 1, now + 1 - window + 1).await.unwrap(), Some(reg.clone()));
    assert_eq!(take(), one_update, "begin_wake: one conditional UpdateItem, the registration with it");
    // Collapsed: a second within the window begins nothing; past it, one does.
    assert_eq!(t.begin_wake(&u, &phone, now + 2, now + 2 - window + 1).await.unwrap(), None);
    let later = now + 1 + window;
    assert_eq!(t.begin_wake(&u, &phone, later, later - window + 1).await.unwrap(), Some(reg.clone()));
    t.end_wake(&u, &phone).await.unwrap();
    assert_eq!(take().0, BTreeMap::from([("UpdateItem".to_owned(), 3)]));
    assert_eq!(t.begin_wake(&u, &phone, later + 1, later - window + 2).await.unwrap(), Some(reg.clone()));

    // A reconnect keeps the registration and clears the mark.
    t.connect(&u, &phone, &c("c2"), later + 2, 3, old).await.unwrap();
    let found = t.devices_of(std::slice::from_ref(&u), old).await.unwrap();
    assert_eq!(found[0].push.as_ref(), Some(&reg));
    t.disconnect(&c("c2"), later + 3).await.unwrap();
    assert_eq!(t.begin_wake(&u, &phone, later + 4, later + 4 - window + 1).await.unwrap(), Some(reg.clone()));

    // A registration replaced since it was read is not the one removed.
    assert!(t.register_push(&u, &phone, &other).await.unwrap());
    assert_eq!(t.unregister_push(&u, &phone, Some(&reg)).await.unwrap(), None);
    assert_eq!(
        t.begin_wake(&u, &phone, later + 5, later + 5 - window + 1).await.unwrap(),
        Some(other.clone())
    );
    take();
    assert_eq!(t.unregister_push(&u, &phone, Some(&other)).await.unwrap(), Some(other.clone()));
    assert_eq!(take(), one_update, "unregister_push: one conditional UpdateItem");
    assert_eq!(t.unregister_push(&u, &phone, None).await.unwrap(), None);
    assert_eq!(t.begin_wake(&u, &phone, later + 6, later + 6).await.unwrap(), None, "nothing to wake");
    let row = raw
        .get_item()
        .table_name(&names.devices_table)
        .key("userId", AttributeValue::S(u.to_string()))
        .key("deviceId", AttributeValue::S(phone.to_string()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert!(!row.contains_key("push") && !row.contains_key("wokenAt"), "both gone: {row:?}");

    // A device that is not there gets no row from an update.
    assert!(!t.register_push(&u, &ghost, &reg).await.unwrap());
    t.end_wake(&u, &ghost).await.unwrap();
    assert_eq!(t.begin_wake(&u, &ghost, now, now).await.unwrap(), None);
    assert_eq!(t.unregister_push(&u, &ghost, None).await.unwrap(), None);
    let ghost_row = raw
        .get_item()
        .table_name(&names.devices_table)
        .key("userId", AttributeValue::S(u.to_string()))
        .key("deviceId", AttributeValue::S(ghost.to_string()))
        .send()
        .await
        .unwrap();
    assert!(ghost_row.item.is_none(), "{ghost_row:?}");

    // Removal and expiry hand back the registration, for its release; a
    // device back after it expired is registered anew, without one.
    assert!(t.register_push(&u, &phone, &reg).await.unwrap());
    assert_eq!(t.remove_device(&u, &phone).await.unwrap().and_then(|d| d.push), Some(reg.clone()));
    t.connect(&u, &phone, &c("c3"), now, 3, old).await.unwrap();
    t.disconnect(&c("c3"), now).await.unwrap();
    assert!(t.register_push(&u, &phone, &reg).await.unwrap());
    let expired = t.expire_devices(now + 1).await.unwrap();
    assert_eq!(expired.iter().map(|d| d.push.clone()).collect::<Vec<_>>(), vec![Some(reg.clone())]);
    t.connect(&u, &phone, &c("c4"), now, 3, old).await.unwrap();
    t.disconnect(&c("c4"), now).await.unwrap();
    assert!(t.register_push(&u, &phone, &reg).await.unwrap());
    let month = now + 31 * DAY_MS;
    t.connect(&u, &phone, &c("c5"), month, 3, month - 30 * DAY_MS).await.unwrap();
    let found = t.devices_of(std::slice::from_ref(&u), month - 30 * DAY_MS).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].push, None, "registered anew after expiring: no registration");
}
