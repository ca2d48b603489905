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
        attachments: Arc::new(store.clone()),
        quotas: Arc::new(store),
    }
}

#[tokio::test]
async fn dynamodb_keeps_the_table_contract() {
    let moto = moto::shared().await;
    let names = moto.tables("contract").await;
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config());
    // Not `contract::racing_devices`: it fails on moto about one run in
    // four, admitting 4 devices of 3. moto serves requests on threads, and
    // its TransactWriteItems checks and applies one item at a time with no
    // lock (and rolls back by restoring a copy of the table), so two racing
    // claims both find 2 slots taken. DynamoDB isolates transactions and
    // cancels one of them (TransactionConflict, which `connect` retries).
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
    let new_device = [("GetItem", 2), ("PutItem", 1), ("Query", 2), ("TransactWriteItems", 1)];
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
        expect(&[("BatchWriteItem", 1), ("TransactWriteItems", 1)]),
        "with a dedupe key"
    );
    t.store(&message(&two), Some(&key), now + DAY_MS).await.unwrap();
    assert_eq!(
        calls.take(),
        expect(&[("BatchWriteItem", 1), ("GetItem", 2), ("TransactWriteItems", 1)]),
        "a retry, before the first send's fan-out was marked"
    );
    let many: Vec<InboxKey> =
        (0..60).map(|i| InboxKey::Device(b.clone(), DeviceId::try_from(format!("d{i}")).unwrap())).collect();
    t.store(&message(&many), None, now + DAY_MS).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchWriteItem", 3), ("PutItem", 1)]), "25 inbox rows a call");

    t.holders(&m.id, &two, now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("BatchGetItem", 1)]));
    t.mark_fanned_out(&chat.id, &m.id).await.unwrap();
    assert_eq!(calls.take(), expect(&[("UpdateItem", 1)]));
    t.inbox_page(&two[0], None, 50, now).await.unwrap();
    assert_eq!(calls.take(), expect(&[("Query", 1)]));
    t.ack(&two[0], std::slice::from_ref(&m.id)).await.unwrap();
    assert_eq!(calls.take(), expect(&[("DeleteItem", 1)]), "one delete an id, no read");
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
    assert_eq!(calls.take().get("Query"), Some(&6), "one row read a call, so six calls");
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
