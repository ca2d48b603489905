//! Every file in events/ through its function's handler, as the Lambda
//! binary would run it, over the embedded adapters (SQLite in a temp dir,
//! files for blobs, a push port that records). Each event is what AWS sends;
//! each check is what that event asks for.
//!
//! The authorizer's token in events/authorizer.json and events/connect.json
//! is an HS256 JWT for `alice` signed with [`EVENTS_SECRET`], valid until
//! 2100, far past the day a deployed authorizer accepts
//! (`courier_core::auth::MAX_LIFETIME`): only a verifier told to accept it
//! does, as this test's is. Never deploy with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use aws_lambda_events::dynamodb::Event as StreamEvent;
use aws_lambda_events::encodings::Body;
use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::SqsEvent;
use base64::Engine;
use courier_aws::lambda::{self, WsResponse};
use courier_core::Courier;
use courier_core::auth::Verifier;
use courier_core::domain::{Caller, Chat, DAY_MS, InboxKey, Limits, Member, Millis};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, MessageId, UserId};
use courier_core::ports::{
    Attachment, Clock, Markers, Platform, Posted, Push, PushRegistration, StoredMessage, Unwired,
};
use courier_core::protocol::{OneTimeKey, RegisterPush, SignedKey, UnregisterPush, UploadKeys};
use courier_embedded::{self, Durability, FileBlobs, SqliteStore};
use courier_testkit::FakeClock;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::Digest;

/// The test secret the authorizer event's token is signed with.
const EVENTS_SECRET: &[u8] = b"courier-events-secret";
/// When the events happen (2025-11-29T11:20:00Z); the clock runs a minute later.
const T0: Millis = 1_764_415_200_000;
/// The bytes whose size and SHA-256 events/create-attachment.json declares.
const ATTACHMENT_BODY: &[u8] = b"courier attachment\n";

fn event_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../events").join(format!("{name}.json"))
}

fn raw(name: &str) -> Value {
    let text =
        std::fs::read_to_string(event_path(name)).unwrap_or_else(|e| panic!("events/{name}.json: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("events/{name}.json is not JSON: {e}"))
}

/// An event file as the Lambda runtime hands it to the function.
fn event<T: DeserializeOwned>(name: &str) -> T {
    serde_json::from_value(raw(name))
        .unwrap_or_else(|e| panic!("events/{name}.json is not the event its function takes: {e}"))
}

/// The frame a WebSocket event's body carries.
fn frame(name: &str) -> Value {
    let body = raw(name)["body"].as_str().map(str::to_owned).expect("a body");
    serde_json::from_str(&body).expect("the body is a JSON frame")
}

fn user(s: &str) -> UserId {
    UserId::try_from(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::try_from(s).unwrap()
}

fn connection(s: &str) -> ConnectionId {
    ConnectionId::try_from(s).unwrap()
}

/// Records what the service pushes and closes.
#[derive(Default)]
struct Recorder {
    posted: Mutex<Vec<(String, Value)>>,
    closed: Mutex<Vec<String>>,
}

#[async_trait]
impl Push for Recorder {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> courier_core::Result<Posted> {
        let frame = serde_json::from_str(frame).expect("pushes are JSON frames");
        self.posted.lock().unwrap().push((connection.to_string(), frame));
        Ok(Posted::Sent)
    }

    async fn close(&self, connection: &ConnectionId) -> courier_core::Result<()> {
        self.closed.lock().unwrap().push(connection.to_string());
        Ok(())
    }
}

impl Recorder {
    fn to(&self, connection: &str, kind: &str) -> Vec<Value> {
        let posted = self.posted.lock().unwrap();
        posted.iter().filter(|(c, f)| c == connection && f["type"] == kind).map(|(_, f)| f.clone()).collect()
    }
}

/// A Courier over the embedded adapters, in its own temp dir.
struct World {
    courier: Courier,
    store: SqliteStore,
    blobs: FileBlobs,
    push: Arc<Recorder>,
    clock: Arc<FakeClock>,
    _dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        Self::at(T0 + 60_000)
    }

    fn at(now: Millis) -> World {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::at(now));
        let store =
            SqliteStore::open(&dir.path().join("courier.db"), Durability::Process, clock.clone()).unwrap();
        let blobs = FileBlobs::open(&dir.path().join("blobs"), "http://blobs.test").unwrap();
        let push = Arc::new(Recorder::default());
        let ports = courier_embedded::ports(&store, &blobs, push.clone(), Arc::new(Unwired), clock.clone());
        World { courier: Courier::new(ports, Limits::default()), store, blobs, push, clock, _dir: dir }
    }

    /// The caller of every WebSocket event: alice on her phone, on this connection.
    fn caller_connection(&self, name: &str) -> String {
        raw(name)["requestContext"]["connectionId"].as_str().expect("a connectionId").to_owned()
    }

    async fn connect(&self, who: &str, on: &str, conn: &str) {
        self.courier.connect(&user(who), &device(on), &connection(conn)).await.expect("connect");
    }

    /// The chat an event names, with alice (its admin) and bob in it.
    async fn chat(&self, id: &str) -> Chat {
        let chat = Chat {
            id: ChatId::try_from(id).unwrap(),
            name: "lunch".into(),
            members: vec![
                Member { user: user("alice"), joined_at: T0 - DAY_MS },
                Member { user: user("bob"), joined_at: T0 - DAY_MS },
            ],
            admins: vec![user("alice")],
            created_at: T0 - DAY_MS,
            version: 0,
            encrypted: false,
        };
        self.courier.ports().chats.create_chat(&chat).await.expect("create the chat");
        chat
    }

    /// Makes a device ready, as its own `uploadKeys` would: an identity key,
    /// a signed prekey and `one_time` one-time prekeys. Returns the identity key.
    async fn ready(&self, who: &str, on: &str, one_time: usize) -> String {
        let caller =
            Caller { user: user(who), device: device(on), connection: connection(&format!("{who}-{on}")) };
        let identity = format!("identity-of-{who}-{on}");
        let signed = |id: &str| SignedKey {
            key_id: id.into(),
            public_key: format!("{id}-of-{who}-{on}"),
            signature: format!("{id}-signed-by-{who}-{on}"),
        };
        let upload = UploadKeys {
            identity_key: Some(identity.clone()),
            signed_pre_key: Some(signed("spk")),
            one_time_pre_keys: (0..one_time)
                .map(|i| OneTimeKey {
                    key_id: format!("otk-{i}"),
                    public_key: format!("otk-{i}-of-{who}-{on}"),
                })
                .collect(),
            fallback_key: Some(signed("fallback")),
        };
        self.courier.upload_keys(&caller, upload).await.expect("upload the keys");
        identity
    }

    /// The message events/fanout.json streams, unmarked, in alice's phone's inbox.
    async fn message(&self) -> StoredMessage {
        let image = &raw("fanout")["Records"][0]["dynamodb"]["NewImage"];
        let wire = image["body"]["S"].as_str().expect("the message body");
        let parsed: Value = serde_json::from_str(wire).unwrap();
        let message = StoredMessage {
            chat: ChatId::try_from(image["chatId"]["S"].as_str().unwrap()).unwrap(),
            id: MessageId::try_from(image["messageId"]["S"].as_str().unwrap()).unwrap(),
            timestamp: parsed["timestamp"].as_i64().unwrap(),
            json: wire.to_owned(),
            recipients: vec![InboxKey::Device(user("alice"), device("phone"))],
            fanned_out: false,
        };
        let expires = message.timestamp + 30 * DAY_MS;
        self.courier.ports().messages.store(&message, None, expires).await.expect("store the message");
        message
    }
}

/// The frame a route response carries back to the client.
fn answer(response: &WsResponse) -> Value {
    assert_eq!(response.status_code, 200, "a route response that reaches the client");
    match &response.body {
        Some(Body::Text(text)) => serde_json::from_str(text).expect("the answer is a JSON frame"),
        other => panic!("the route response carries no text frame: {other:?}"),
    }
}

/// The answer to a command event: a response to its action and requestId,
/// SUCCESS, and its data.
fn success(name: &str, response: &WsResponse) -> Value {
    let answer = answer(response);
    let asked = frame(name);
    assert_eq!(answer["type"], "response", "{name}: {answer}");
    assert_eq!(answer["action"], asked["action"], "{name}: {answer}");
    assert_eq!(answer["requestId"], asked["requestId"], "{name}: {answer}");
    assert_eq!(answer["status"], "SUCCESS", "{name}: {answer}");
    answer["data"].clone()
}

fn is_ulid(value: &Value) -> bool {
    value.as_str().is_some_and(|s| s.len() == 26 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[test]
fn the_authorizer_event_names_alice_and_her_device() {
    let request: ApiGatewayCustomAuthorizerRequestTypeRequest = event("authorizer");
    // A fixture must not expire, so its token lasts until 2100: longer than a real one may.
    let refused = lambda::authorizer(&Verifier::hs256(EVENTS_SECRET).unwrap(), &request);
    assert!(
        matches!(&refused, Err(courier_core::Error::Unauthorized(why)) if why == "token lifetime too long"),
        "a token valid for decades is refused by default"
    );
    let verifier =
        Verifier::hs256(EVENTS_SECRET).unwrap().with_max_lifetime(Duration::from_secs(100 * 365 * 86_400));
    let response =
        lambda::authorizer(&verifier, &request).expect("the token in events/authorizer.json is valid");
    assert_eq!(response.principal_id.as_deref(), Some("alice"));
    let statement = &response.policy_document.statement[0];
    assert_eq!(statement.action, ["execute-api:Invoke"]);
    assert_eq!(statement.resource, [request.method_arn.clone().unwrap()], "allowed on this very $connect");
    let context = lambda::authorizer_context(&response);
    assert_eq!(context["userId"], "alice");
    assert_eq!(context["deviceId"], "phone");

    // What the routes' events carry is what the authorizer returns (plus API Gateway's latency).
    for name in ["connect", "disconnect", "send-message", "sync"] {
        let carried = raw(name)["requestContext"]["authorizer"].clone();
        for (key, value) in &context {
            assert_eq!(&carried[key], value, "events/{name}.json's authorizer context");
        }
    }

    let other = Verifier::hs256(b"some other secret").unwrap();
    assert!(lambda::authorizer(&other, &request).is_err(), "a token is checked against the secret");
}

#[tokio::test]
async fn connect_registers_the_device() {
    let w = World::new();
    let response = lambda::connect(&w.courier, event("connect")).await;
    assert_eq!(response.status_code, 200, "connected");
    let devices = w.courier.ports().devices.devices_of(&[user("alice")], 0).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id.as_str(), "phone");
    assert_eq!(devices[0].connection.as_ref().map(|c| c.to_string()), Some(w.caller_connection("connect")));
}

#[tokio::test]
async fn disconnect_unbinds_the_connection() {
    let w = World::new();
    w.connect("alice", "phone", &w.caller_connection("disconnect")).await;
    let response = lambda::disconnect(&w.courier, event("disconnect")).await;
    assert_eq!(response.status_code, 200);
    let devices = w.courier.ports().devices.devices_of(&[user("alice")], 0).await.unwrap();
    assert_eq!(devices[0].connection, None, "the device has no live connection any more");
}

#[tokio::test]
async fn default_answers_an_unknown_action() {
    let answer = answer(&lambda::default(event("default")));
    let asked = frame("default");
    assert_eq!(answer["status"], "FAILURE");
    assert_eq!(answer["error"]["code"], "UNKNOWN_ACTION");
    assert_eq!(answer["action"], asked["action"]);
    assert_eq!(answer["requestId"], asked["requestId"]);
}

#[tokio::test]
async fn create_chat_makes_the_chat_and_tells_its_participants() {
    let w = World::new();
    w.connect("bob", "laptop", "bob-laptop").await;
    let data = success("create-chat", &lambda::command(&w.courier, event("create-chat")).await);
    assert!(is_ulid(&data["chatId"]), "{data}");
    let chats = w.courier.ports().chats.chats_of(&user("bob"), None, 100).await.unwrap();
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0].id.as_str(), data["chatId"].as_str().unwrap());
    assert_eq!(chats[0].participants(), [user("alice"), user("bob")]);
    assert_eq!(w.push.to("bob-laptop", "chatUpdate").len(), 1, "bob's connected device hears of it");
}

#[tokio::test]
async fn send_message_stores_and_pushes() {
    let w = World::new();
    let asked = frame("send-message");
    w.chat(asked["chatId"].as_str().unwrap()).await;
    w.connect("alice", "phone", &w.caller_connection("send-message")).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let data = success("send-message", &lambda::command(&w.courier, event("send-message")).await);
    assert!(is_ulid(&data["messageId"]) && data["timestamp"].is_i64(), "{data}");
    let pushed = w.push.to("bob-laptop", "newMessage");
    assert_eq!(pushed.len(), 1, "bob's laptop gets it at once");
    assert_eq!(pushed[0]["message"], asked["message"]);
    assert_eq!(pushed[0]["messageId"], data["messageId"]);
    assert!(
        w.push.to(&w.caller_connection("send-message"), "newMessage").is_empty(),
        "not the sending device"
    );
    let inbox = InboxKey::Device(user("bob"), device("laptop"));
    let held = w.courier.ports().messages.inbox_page(&inbox, None, 10, w.clock.now()).await.unwrap();
    assert_eq!(held.len(), 1, "and it waits in bob's inbox until acked");

    // The same event again (a retry) is the same message, delivered once.
    let again = success("send-message", &lambda::command(&w.courier, event("send-message")).await);
    assert_eq!(again["messageId"], data["messageId"], "clientMessageId makes a retry harmless");
    assert_eq!(w.push.to("bob-laptop", "newMessage").len(), 1);
}

#[tokio::test]
async fn create_attachment_presigns_an_upload() {
    let w = World::new();
    let asked = frame("create-attachment");
    let data = success("create-attachment", &lambda::command(&w.courier, event("create-attachment")).await);
    assert!(is_ulid(&data["attachmentId"]), "{data}");
    assert!(data["uploadUrl"].as_str().is_some_and(|u| u.starts_with("http://blobs.test/")), "{data}");
    assert!(data["uploadHeaders"]["x-amz-checksum-sha256"].is_string(), "{data}");
    assert!(data["expiresAt"].as_i64().is_some_and(|t| t > w.clock.now()), "{data}");
    assert_eq!(asked["size"].as_u64(), Some(ATTACHMENT_BODY.len() as u64), "the body this test uploads");
    assert_eq!(
        asked["sha256"],
        hex::encode(sha2::Sha256::digest(ATTACHMENT_BODY)),
        "the body this test uploads"
    );
}

#[tokio::test]
async fn get_attachment_presigns_a_download_of_an_upload() {
    let w = World::new();
    let declared = frame("create-attachment");
    let attachment = Attachment {
        id: AttachmentId::try_from(frame("get-attachment")["attachmentId"].as_str().unwrap()).unwrap(),
        uploader: user("alice"),
        content_type: declared["contentType"].as_str().unwrap().to_owned(),
        size: ATTACHMENT_BODY.len() as u64,
        sha256: declared["sha256"].as_str().unwrap().to_owned(),
        created_at: T0,
    };
    w.courier.ports().attachments.put_attachment(&attachment).await.unwrap();
    let checksum = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(ATTACHMENT_BODY));
    let mut upload =
        w.blobs.begin_upload(&attachment, Some(&checksum), Some(attachment.size)).await.expect("upload");
    upload.write(ATTACHMENT_BODY).await.unwrap();
    upload.finish().await.unwrap();

    let data = success("get-attachment", &lambda::command(&w.courier, event("get-attachment")).await);
    assert_eq!(data["attachmentId"], attachment.id.as_str());
    assert!(data["downloadUrl"].as_str().is_some_and(|u| u.starts_with("http://blobs.test/")), "{data}");
    assert_eq!(data["contentType"], attachment.content_type);
    assert_eq!(data["size"], attachment.size);
    assert_eq!(data["sha256"], attachment.sha256);
}

#[tokio::test]
async fn modify_chat_participants_adds_carol() {
    let w = World::new();
    let asked = frame("modify-chat-participants");
    w.chat(asked["chatId"].as_str().unwrap()).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let response = lambda::command(&w.courier, event("modify-chat-participants")).await;
    let data = success("modify-chat-participants", &response);
    assert_eq!(data["participants"], json!(["alice", "bob", asked["userId"]]));
    assert_eq!(w.push.to("bob-laptop", "chatUpdate").len(), 1, "participants hear of the change");
}

#[tokio::test]
async fn list_chats_lists_the_callers_chats() {
    let w = World::new();
    let chat = w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    let data = success("list-chats", &lambda::command(&w.courier, event("list-chats")).await);
    assert_eq!(
        data["chats"],
        json!([{"chatId": chat.id.as_str(), "name": chat.name, "participants": ["alice", "bob"], "admins": ["alice"],
                "encrypted": false}])
    );
    assert_eq!(data["cursor"], json!(null), "one page holds them all");
}

#[tokio::test]
async fn sync_returns_a_page_of_the_inbox() {
    let w = World::new();
    let message = w.message().await;
    let data = success("sync", &lambda::command(&w.courier, event("sync")).await);
    let messages = data["messages"].as_array().expect("a page");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["messageId"], message.id.as_str());
    assert_eq!(data["cursor"], Value::Null, "the inbox read to its end");
}

#[tokio::test]
async fn ack_removes_from_the_inbox() {
    let w = World::new();
    let message = w.message().await;
    assert_eq!(frame("ack")["messageIds"], json!([message.id.as_str()]));
    let data = success("ack", &lambda::command(&w.courier, event("ack")).await);
    assert_eq!(data["acked"], 1);
    let page = success("sync", &lambda::command(&w.courier, event("sync")).await);
    assert_eq!(page["messages"], json!([]), "never seen again");
}

#[tokio::test]
async fn remove_device_removes_another_device_and_closes_it() {
    let w = World::new();
    w.connect("alice", "phone", &w.caller_connection("remove-device")).await;
    w.connect("alice", "tablet", "alice-tablet").await;
    assert_eq!(frame("remove-device")["deviceId"], "tablet");
    let data = success("remove-device", &lambda::command(&w.courier, event("remove-device")).await);
    assert_eq!(data, json!({}));
    assert_eq!(*w.push.closed.lock().unwrap(), ["alice-tablet"]);
    let devices = w.courier.ports().devices.devices_of(&[user("alice")], 0).await.unwrap();
    assert_eq!(devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["phone"]);
}

#[tokio::test]
async fn fanout_schedules_a_check_of_an_unmarked_message() {
    let w = World::new();
    let message = w.message().await;
    let response = lambda::fanout(&w.courier, event::<StreamEvent>("fanout"), Duration::ZERO).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let jobs = w.store.due_jobs(10).await.unwrap();
    assert_eq!(jobs.len(), 1, "one delayed check");
    let job = serde_json::to_value(&jobs[0].2).unwrap();
    assert_eq!(
        job,
        json!({"job": "finishFanout", "chatId": message.chat.as_str(), "messageId": message.id.as_str()})
    );

    // Once the send path has marked it, the stream costs one read and nothing more.
    w.courier.ports().messages.mark_fanned_out(&message.chat, &message.id).await.unwrap();
    w.store.complete_job(jobs[0].0).await.unwrap();
    let response = lambda::fanout(&w.courier, event::<StreamEvent>("fanout"), Duration::ZERO).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(w.store.due_jobs(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn deliver_pushes_the_job_to_inboxes_still_holding_it() {
    let w = World::new();
    let message = w.message().await;
    let sqs: SqsEvent = event("deliver");
    let job: Value = serde_json::from_str(sqs.records[0].body.as_deref().unwrap()).unwrap();
    let target = job["targets"][0]["connectionId"].as_str().unwrap().to_owned();
    w.connect("alice", "phone", &target).await;
    let response = lambda::deliver(&w.courier, sqs).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let pushed = w.push.to(&target, "newMessage");
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0]["messageId"], message.id.as_str());
}

#[tokio::test]
async fn cleanup_expires_devices_unseen_for_30_days() {
    let w = World::at(T0 - 31 * DAY_MS);
    w.connect("carol", "old-phone", "carol-old").await;
    w.courier.disconnect(&connection("carol-old")).await.unwrap();
    w.clock.advance(31 * DAY_MS + 60_000);
    let _: EventBridgeEvent = event("cleanup");
    lambda::cleanup(&w.courier).await.expect("cleanup");
    let devices = w.courier.ports().devices.devices_of(&[user("carol")], 0).await.unwrap();
    assert!(devices.is_empty(), "the device is gone: {devices:?}");
}

#[tokio::test]
async fn upload_keys_makes_the_device_ready_and_tells_who_shares_a_chat() {
    let w = World::new();
    w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    w.connect("alice", "phone", &w.caller_connection("upload-keys")).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let asked = frame("upload-keys");
    let data = success("upload-keys", &lambda::command(&w.courier, event("upload-keys")).await);
    assert_eq!(data, json!({"oneTimePreKeys": asked["oneTimePreKeys"].as_array().unwrap().len()}));
    let keys = w.courier.ports().keys.device_keys(&[user("alice")]).await.unwrap();
    assert_eq!(keys.len(), 1, "alice's phone is ready");
    assert_eq!(keys[0].identity_key, asked["identityKey"].as_str().unwrap());
    assert_eq!(keys[0].signed_pre_key.key_id, asked["signedPreKey"]["keyId"].as_str().unwrap());
    let told = w.push.to("bob-laptop", "deviceList");
    assert_eq!(
        told,
        [json!({"type": "deviceList", "userId": "alice",
                "devices": [{"deviceId": "phone", "identityKey": asked["identityKey"]}]})],
        "bob shares a chat with alice: he hears of her new ready device"
    );

    // The same upload again (a retry): the stored keyIds are ignored, and nobody is told twice.
    let again = success("upload-keys", &lambda::command(&w.courier, event("upload-keys")).await);
    assert_eq!(again, data);
    assert_eq!(w.push.to("bob-laptop", "deviceList").len(), 1);
}

#[tokio::test]
async fn get_keys_hands_out_each_one_time_prekey_once() {
    let w = World::new();
    w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let identity = w.ready("bob", "laptop", 1).await;
    assert_eq!(frame("get-keys")["userId"], "bob");
    let data = success("get-keys", &lambda::command(&w.courier, event("get-keys")).await);
    let devices = data["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{data}");
    assert_eq!(devices[0]["deviceId"], "laptop");
    assert_eq!(devices[0]["identityKey"], identity);
    assert_eq!(devices[0]["signedPreKey"]["keyId"], "spk");
    assert_eq!(devices[0]["oneTimePreKey"]["keyId"], "otk-0");
    assert_eq!(devices[0]["fallbackKey"]["keyId"], "fallback");
    assert_eq!(
        w.push.to("bob-laptop", "keysLow"),
        [json!({"type": "keysLow", "remaining": 0})],
        "bob's laptop is told to upload more"
    );

    // The one-time prekey is gone: the fallback key serves.
    let again = success("get-keys", &lambda::command(&w.courier, event("get-keys")).await);
    assert_eq!(again["devices"][0]["oneTimePreKey"], Value::Null, "{again}");
    assert_eq!(again["devices"][0]["fallbackKey"]["keyId"], "fallback");
}

#[tokio::test]
async fn list_devices_lists_the_ready_devices_of_a_co_member() {
    let w = World::new();
    w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    w.connect("bob", "phone", "bob-phone").await;
    let identity = w.ready("bob", "laptop", 0).await;
    assert_eq!(frame("list-devices")["userId"], "bob");
    let data = success("list-devices", &lambda::command(&w.courier, event("list-devices")).await);
    assert_eq!(
        data,
        json!({"devices": [{"deviceId": "laptop", "identityKey": identity}]}),
        "bob's phone has no keys: it is not ready"
    );
}

#[tokio::test]
async fn send_to_devices_stores_and_pushes_a_device_message() {
    let w = World::new();
    w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    w.connect("alice", "phone", &w.caller_connection("send-to-devices")).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    w.ready("bob", "laptop", 0).await;
    let asked = frame("send-to-devices");
    assert_eq!(asked["messages"][0]["userId"], "bob");
    assert_eq!(asked["messages"][0]["deviceId"], "laptop");
    let data = success("send-to-devices", &lambda::command(&w.courier, event("send-to-devices")).await);
    assert!(is_ulid(&data["messageId"]), "{data}");
    let pushed = w.push.to("bob-laptop", "deviceMessage");
    assert_eq!(pushed.len(), 1, "bob's laptop gets it at once");
    assert_eq!(pushed[0]["messageId"], data["messageId"]);
    assert_eq!(pushed[0]["userId"], "alice");
    assert_eq!(pushed[0]["deviceId"], "phone");
    assert_eq!(pushed[0]["body"], asked["messages"][0]["body"]);
    let inbox = InboxKey::Device(user("bob"), device("laptop"));
    let held = w.courier.ports().messages.inbox_page(&inbox, None, 10, w.clock.now()).await.unwrap();
    assert_eq!(held.len(), 1, "and it waits in bob's inbox until acked");

    // The same event again (a retry) is the same device message, delivered once.
    let again = success("send-to-devices", &lambda::command(&w.courier, event("send-to-devices")).await);
    assert_eq!(again["messageId"], data["messageId"], "clientMessageId makes a retry harmless");
    assert_eq!(w.push.to("bob-laptop", "deviceMessage").len(), 1);
}

#[tokio::test]
async fn mark_read_moves_the_markers_and_tells_the_chat() {
    let w = World::new();
    let asked = frame("mark-read");
    let chat = w.chat(asked["chatId"].as_str().unwrap()).await;
    w.connect("alice", "phone", &w.caller_connection("mark-read")).await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let data = success("mark-read", &lambda::command(&w.courier, event("mark-read")).await);
    assert_eq!(data, json!({}));
    let up_to = &asked["upTo"];
    assert_eq!(
        w.push.to("bob-laptop", "receipt"),
        [
            json!({"type": "receipt", "chatId": chat.id.as_str(), "userId": "alice", "delivered": up_to, "read": up_to})
        ]
    );
    let markers: Vec<(UserId, Markers)> = w.courier.ports().receipts.receipts(&chat.id).await.unwrap();
    let up_to = MessageId::try_from(up_to.as_str().unwrap()).unwrap();
    assert_eq!(
        markers,
        [(
            user("alice"),
            Markers { delivered: Some(up_to.clone()), read: Some(up_to.clone()), private_read: Some(up_to) }
        )]
    );

    // Again: the markers are there already, so nothing moves and nobody is told.
    success("mark-read", &lambda::command(&w.courier, event("mark-read")).await);
    assert_eq!(w.push.to("bob-laptop", "receipt").len(), 1);
}

#[tokio::test]
async fn get_receipts_shows_every_participants_markers() {
    let w = World::new();
    let chat = w.chat(frame("get-receipts")["chatId"].as_str().unwrap()).await;
    let read = MessageId::try_from(frame("mark-read")["upTo"].as_str().unwrap()).unwrap();
    let bob_read = Markers { delivered: Some(read.clone()), read: Some(read.clone()), private_read: None };
    w.courier.ports().receipts.advance(&chat.id, &user("bob"), &bob_read).await.unwrap();
    let data = success("get-receipts", &lambda::command(&w.courier, event("get-receipts")).await);
    assert_eq!(
        data,
        json!({"receipts": [
            {"userId": "alice", "delivered": null, "read": null},
            {"userId": "bob", "delivered": read.as_str(), "read": read.as_str()},
        ]})
    );
}

#[tokio::test]
async fn typing_tells_the_other_participants_and_stores_nothing() {
    let w = World::new();
    let asked = frame("typing");
    w.chat(asked["chatId"].as_str().unwrap()).await;
    w.connect("alice", "phone", &w.caller_connection("typing")).await;
    w.connect("alice", "tablet", "alice-tablet").await;
    w.connect("bob", "laptop", "bob-laptop").await;
    let data = success("typing", &lambda::command(&w.courier, event("typing")).await);
    assert_eq!(data, json!({}));
    assert_eq!(
        w.push.to("bob-laptop", "typing"),
        [
            json!({"type": "typing", "chatId": asked["chatId"], "userId": "alice", "deviceId": "phone", "state": "start"})
        ]
    );
    assert!(w.push.to("alice-tablet", "typing").is_empty(), "the other participants' devices only");
    let inbox = InboxKey::Device(user("bob"), device("laptop"));
    let held = w.courier.ports().messages.inbox_page(&inbox, None, 10, w.clock.now()).await.unwrap();
    assert!(held.is_empty(), "nothing of it is stored");

    // Within a second the same device's typing to the same chat goes nowhere.
    success("typing", &lambda::command(&w.courier, event("typing")).await);
    assert_eq!(w.push.to("bob-laptop", "typing").len(), 1);
}

#[tokio::test]
async fn delete_account_removes_the_user_and_closes_their_connections() {
    let w = World::new();
    let chat = w.chat(frame("send-message")["chatId"].as_str().unwrap()).await;
    let own = w.caller_connection("delete-account");
    w.connect("alice", "phone", &own).await;
    w.connect("alice", "tablet", "alice-tablet").await;
    w.connect("bob", "laptop", "bob-laptop").await;
    w.ready("alice", "phone", 2).await;
    let response = lambda::command(&w.courier, event("delete-account")).await;
    // The answer goes out through the connection before it is closed, not as the route response.
    assert_eq!(response.status_code, 200);
    assert!(response.body.is_none(), "{response:?}");
    let answered = w.push.to(&own, "response");
    assert_eq!(answered.len(), 1, "the SUCCESS is pushed to the asking connection");
    assert_eq!(answered[0]["action"], "deleteAccount");
    assert_eq!(answered[0]["requestId"], frame("delete-account")["requestId"]);
    assert_eq!(answered[0]["status"], "SUCCESS");
    assert_eq!(*w.push.closed.lock().unwrap(), ["alice-tablet", own.as_str()], "its own connection last");

    let ports = w.courier.ports();
    assert!(ports.devices.devices_of(&[user("alice")], 0).await.unwrap().is_empty(), "no device left");
    assert!(ports.keys.device_keys(&[user("alice")]).await.unwrap().is_empty(), "no key left");
    let left = ports.chats.chat(&chat.id).await.unwrap().expect("the chat goes on");
    assert_eq!(left.participants(), [user("bob")]);
    assert_eq!(left.admins, [user("bob")], "admin succession, as if alice had left");
    assert!(!w.push.to("bob-laptop", "chatUpdate").is_empty(), "bob hears that alice left");
    assert_eq!(
        w.push.to("bob-laptop", "deviceList").last(),
        Some(&json!({"type": "deviceList", "userId": "alice", "devices": []})),
        "and that she has no device left"
    );

    // Final and idempotent: a second deleteAccount finds nothing left.
    let again = lambda::command(&w.courier, event("delete-account")).await;
    assert_eq!(again.status_code, 200);
    assert_eq!(w.push.to(&own, "response").len(), 2);
}

#[tokio::test]
async fn register_push_is_refused_while_web_push_is_turned_off() {
    let w = World::new();
    w.connect("alice", "phone", &w.caller_connection("register-push")).await;
    let asked = frame("register-push");

    // The subscription is one a browser could hand over (RFC 8291): an https
    // endpoint, an uncompressed P-256 point and a 16-byte secret, base64url.
    let subscription = &asked["subscription"];
    assert_eq!(asked["platform"], "webpush");
    assert!(subscription["endpoint"].as_str().is_some_and(|e| e.starts_with("https://")), "{subscription}");
    let decode = |field: &str| {
        let text = subscription["keys"][field].as_str().unwrap_or_else(|| panic!("keys.{field}"));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).expect("unpadded base64url")
    };
    let p256dh = decode("p256dh");
    assert_eq!((p256dh.len(), p256dh[0]), (65, 0x04), "an uncompressed P-256 point");
    assert_eq!(decode("auth").len(), 16);

    // This Courier has no push service (every platform off, as a stack whose
    // push parameters are left empty): the platform is refused by name, and
    // nothing is stored.
    let answer = answer(&lambda::command_for::<RegisterPush>(&w.courier, event("register-push")).await);
    assert_eq!(answer["type"], "response");
    assert_eq!(answer["action"], "registerPush");
    assert_eq!(answer["requestId"], asked["requestId"]);
    assert_eq!(answer["status"], "FAILURE", "{answer}");
    assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("webpush") && message.contains("turned off"), "{answer}");
    assert!(!message.contains("fcm.googleapis.com"), "the endpoint is not quoted back: {answer}");
    let devices = w.courier.ports().devices.devices_of(&[user("alice")], 0).await.unwrap();
    assert_eq!(devices[0].push, None, "no registration stored");
}

#[tokio::test]
async fn unregister_push_removes_the_devices_registration() {
    let w = World::new();
    w.connect("alice", "phone", &w.caller_connection("unregister-push")).await;
    w.connect("alice", "tablet", "alice-tablet").await;
    // A registration as registerPush stores one, on the phone and on the tablet.
    let subscription = &frame("register-push")["subscription"];
    let registration = PushRegistration {
        platform: Platform::WebPush,
        address: subscription["endpoint"].as_str().unwrap().to_owned(),
        keys: Some(serde_json::from_value(subscription["keys"].clone()).unwrap()),
        endpoint: None,
    };
    let devices = &w.courier.ports().devices;
    for on in ["phone", "tablet"] {
        assert!(devices.register_push(&user("alice"), &device(on), &registration).await.unwrap());
    }

    let data = success(
        "unregister-push",
        &lambda::command_for::<UnregisterPush>(&w.courier, event("unregister-push")).await,
    );
    assert_eq!(data, json!({}));
    let stored = devices.devices_of(&[user("alice")], 0).await.unwrap();
    let push_of = |on: &str| stored.iter().find(|d| d.id == device(on)).expect("the device").push.clone();
    assert_eq!(push_of("phone"), None, "the calling device's registration is gone");
    assert_eq!(push_of("tablet"), Some(registration), "the user's other devices keep theirs");

    // Again: nothing left to remove, and still SUCCESS.
    let again = lambda::command_for::<UnregisterPush>(&w.courier, event("unregister-push")).await;
    assert_eq!(success("unregister-push", &again), json!({}));
}
