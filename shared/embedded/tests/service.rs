//! Service unit tests over the embedded adapters, with a fake clock, a push
//! port that records what it was asked to send and a wake-up port that
//! records whom it was asked to wake.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use courier_core::Courier;
use courier_core::domain::{Caller, DAY_MS, Limits};
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, ConnectionId, DeviceId, UserId};
use courier_core::ports::{
    AttachmentStore, Clock, DeviceStore, KeyStore, MessageStore, Platform, Posted, Push, PushRegistration,
    Wakeups, WebPushKeys, Woken,
};
use courier_core::protocol::{
    Ack, CreateAttachment, CreateChat, GetReceipts, OneTimeKey, RegisterPush, SendMessage, SignedKey,
    Subscription, Sync, UnregisterPush, UploadKeys,
};
use courier_embedded::{Durability, FileBlobs, SqliteStore};
use courier_testkit::FakeClock;

/// Records pushes; connections in `gone` answer 410.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(String, String)>>,
    gone: Mutex<HashSet<String>>,
    /// Every post fails, as a broken push endpoint would.
    broken: std::sync::atomic::AtomicBool,
}

impl Recorder {
    /// The newMessage pushes sent to one connection.
    fn messages_to(&self, connection: &str) -> Vec<String> {
        let sent = self.sent.lock().unwrap();
        let pushes = sent.iter().filter(|(c, f)| c == connection && f.starts_with(r#"{"type":"newMessage""#));
        pushes.map(|(_, f)| f.clone()).collect()
    }
}

#[async_trait]
impl Push for Recorder {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> Result<Posted> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::internal("push endpoint broken"));
        }
        if self.gone.lock().unwrap().contains(connection.as_str()) {
            return Ok(Posted::Gone);
        }
        self.sent.lock().unwrap().push((connection.to_string(), frame.to_owned()));
        Ok(Posted::Sent)
    }
    async fn close(&self, connection: &ConnectionId) -> Result<()> {
        self.gone.lock().unwrap().insert(connection.to_string());
        Ok(())
    }
}

/// What the push service answers the next wake-ups.
#[derive(Clone, Copy, Debug, Default)]
enum Answer {
    #[default]
    Sent,
    Gone,
    Unavailable,
}

/// Records wake-ups and released registrations (by address); serves every
/// platform, and gives each registration an endpoint to release, as SNS does.
#[derive(Default)]
struct Waker {
    woken: Mutex<Vec<(String, String)>>,
    released: Mutex<Vec<String>>,
    answer: Mutex<Answer>,
}

impl Waker {
    /// The addresses woken so far for `user`'s `device`.
    fn woken(&self, of: &Caller) -> Vec<String> {
        let key = format!("{}#{}", of.user, of.device);
        self.woken.lock().unwrap().iter().filter(|(d, _)| *d == key).map(|(_, a)| a.clone()).collect()
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

#[async_trait]
impl Wakeups for Waker {
    fn serves(&self, _: Platform) -> bool {
        true
    }
    async fn prepare(
        &self,
        registration: PushRegistration,
        _: Option<&PushRegistration>,
    ) -> Result<PushRegistration> {
        Ok(PushRegistration { endpoint: Some(format!("endpoint/{}", registration.address)), ..registration })
    }
    async fn wake(&self, user: &UserId, device: &DeviceId, registration: &PushRegistration) -> Result<Woken> {
        let answer = *self.answer.lock().unwrap();
        self.woken.lock().unwrap().push((format!("{user}#{device}"), registration.address.clone()));
        match answer {
            Answer::Sent => Ok(Woken::Sent),
            Answer::Gone => Ok(Woken::Gone),
            Answer::Unavailable => Err(Error::unavailable("the push service answered 503")),
        }
    }
    async fn release(&self, registration: &PushRegistration) -> Result<()> {
        self.released.lock().unwrap().push(registration.address.clone());
        Ok(())
    }
}

struct World {
    courier: Courier,
    store: SqliteStore,
    push: Arc<Recorder>,
    wake: Arc<Waker>,
    clock: Arc<FakeClock>,
    _dir: tempfile::TempDir,
}

fn world(limits: Limits) -> World {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::at(1_800_000_000_000));
    let store = SqliteStore::open(&dir.path().join("t.db"), Durability::Process, clock.clone()).unwrap();
    let blobs = FileBlobs::open(&dir.path().join("blobs"), "http://blobs.test").unwrap();
    let push = Arc::new(Recorder::default());
    let wake = Arc::new(Waker::default());
    let ports = courier_embedded::ports(&store, &blobs, push.clone(), wake.clone(), clock.clone());
    World { courier: Courier::new(ports, limits), store, push, wake, clock, _dir: dir }
}

impl World {
    async fn device(&self, user: &str, device: &str) -> Caller {
        let caller = Caller {
            user: UserId::try_from(user).unwrap(),
            device: DeviceId::try_from(device).unwrap(),
            connection: ConnectionId::try_from(format!("{user}-{device}")).unwrap(),
        };
        self.courier.connect(&caller.user, &caller.device, &caller.connection).await.unwrap();
        caller
    }

    async fn chat(&self, by: &Caller, with: &[&str]) -> ChatId {
        let participants = with.iter().map(|u| UserId::try_from(*u).unwrap()).collect();
        self.courier
            .create_chat(by, CreateChat { participants, name: "t".into(), encrypted: false })
            .await
            .unwrap()
            .chat_id
    }

    async fn send(&self, by: &Caller, chat: &ChatId, text: &str) -> String {
        let cmd = SendMessage {
            chat_id: chat.clone(),
            message: text.into(),
            attachments: vec![],
            client_message_id: None,
            devices: None,
        };
        self.courier.send_message(by, cmd).await.unwrap().message_id.to_string()
    }

    /// Sends while every push fails for good, so the send path leaves the
    /// fan-out mark unset, as a crash between storing and fanning out would.
    async fn send_unmarked(&self, by: &Caller, chat: &ChatId, text: &str) -> courier_core::ids::MessageId {
        self.push.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        let id = self.send(by, chat, text).await;
        self.push.broken.store(false, std::sync::atomic::Ordering::SeqCst);
        courier_core::ids::MessageId::try_from(id).unwrap()
    }

    /// Makes the device ready, with `n` one-time prekeys.
    async fn upload_keys(&self, of: &Caller, n: usize) {
        let cmd = UploadKeys {
            identity_key: Some(format!("id-{}", of.device)),
            signed_pre_key: Some(SignedKey {
                key_id: "s1".into(),
                public_key: "spk".into(),
                signature: "sig".into(),
            }),
            one_time_pre_keys: (0..n)
                .map(|i| OneTimeKey { key_id: format!("k{i}"), public_key: format!("otk{i}") })
                .collect(),
            fallback_key: None,
        };
        self.courier.upload_keys(of, cmd).await.unwrap();
    }

    /// Rows the database holds that name `user`, table by table, where any do.
    fn rows_of(&self, user: &str) -> Vec<(&'static str, i64)> {
        let db = rusqlite::Connection::open(self._dir.path().join("t.db")).unwrap();
        let queries = [
            ("devices", "SELECT count(*) FROM devices WHERE user_id = ?1"),
            ("connections", "SELECT count(*) FROM connections WHERE user_id = ?1"),
            ("participants", "SELECT count(*) FROM participants WHERE user_id = ?1"),
            ("log", "SELECT count(*) FROM log WHERE recipients LIKE '%\"' || ?1 || '#%'"),
            ("cursors", "SELECT count(*) FROM cursors WHERE inbox LIKE ?1 || '#%'"),
            ("attachments", "SELECT count(*) FROM attachments WHERE uploader = ?1"),
            ("device_keys", "SELECT count(*) FROM device_keys WHERE user_id = ?1"),
            ("one_time_keys", "SELECT count(*) FROM one_time_keys WHERE user_id = ?1"),
            ("receipts", "SELECT count(*) FROM receipts WHERE user_id = ?1"),
        ];
        queries
            .into_iter()
            .map(|(table, sql)| (table, db.query_row(sql, [user], |r| r.get(0)).unwrap()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Registers the device for Web Push at `address`.
    async fn register_push(&self, of: &Caller, address: &str) {
        let keys = WebPushKeys { p256dh: "p256dh".into(), auth: "auth".into() };
        let subscription = Subscription { endpoint: address.into(), keys };
        let cmd = RegisterPush { platform: Platform::WebPush, token: None, subscription: Some(subscription) };
        self.courier.register_push(of, cmd).await.unwrap();
    }

    /// Runs the jobs due now, as the job runner would, once each; returns
    /// the outcomes of those that failed.
    async fn run_jobs(&self) -> Vec<Error> {
        let mut failed = Vec::new();
        for (id, _, job) in self.store.due_jobs(100).await.unwrap() {
            match self.courier.run_job(&job).await {
                Ok(()) => self.store.complete_job(id).await.unwrap(),
                Err(e) => {
                    self.store.retry_job(id, self.clock.now()).await.unwrap();
                    failed.push(e);
                }
            }
        }
        failed
    }

    async fn registration(&self, of: &Caller) -> Option<PushRegistration> {
        let devices = self.store.devices_of(std::slice::from_ref(&of.user), 0).await.unwrap();
        devices.into_iter().find(|d| d.id == of.device).and_then(|d| d.push)
    }

    async fn inbox(&self, of: &Caller) -> Vec<String> {
        let page = self.courier.sync(of, Sync { limit: Some(100), cursor: None }).await.unwrap();
        page.messages
            .iter()
            .map(|m| {
                serde_json::from_str::<serde_json::Value>(m.get()).unwrap()["messageId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

#[tokio::test]
async fn messages_past_retention_are_neither_synced_nor_kept() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    let id = w.send(&alice, &chat, "soon gone").await;
    assert_eq!(w.inbox(&bob).await, vec![id]);
    w.clock.advance(30 * DAY_MS + 1);
    assert!(w.inbox(&bob).await.is_empty(), "expired rows are filtered on read");
    let (_, rows) = w.courier.cleanup().await.unwrap();
    assert!(rows >= 1, "the message's rows are deleted, got {rows}");
}

#[tokio::test]
async fn a_device_unseen_for_30_days_expires_and_frees_its_slot() {
    let w = world(Limits::default());
    let d1 = w.device("u", "d1").await;
    w.device("u", "d2").await;
    w.device("u", "d3").await;
    let over = w
        .courier
        .connect(&d1.user, &DeviceId::try_from("d4").unwrap(), &ConnectionId::try_from("c4").unwrap())
        .await;
    assert!(matches!(over, Err(Error::LimitExceeded(m)) if m.contains("3 devices")));

    w.courier.disconnect(&d1.connection).await.unwrap();
    w.clock.advance(30 * DAY_MS + 1);
    for d in ["d2", "d3"] {
        let c = ConnectionId::try_from(format!("u-{d}")).unwrap();
        w.courier.connect(&d1.user, &DeviceId::try_from(d).unwrap(), &c).await.unwrap();
    }
    w.courier
        .connect(&d1.user, &DeviceId::try_from("d4").unwrap(), &ConnectionId::try_from("c4").unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_feed_pushes_once_to_each_device_of_a_user_holding_it_on_two() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let bob2 = w.device("bob", "tablet").await;
    let chat = w.chat(&alice, &["bob"]).await;
    let msg_id = w.send_unmarked(&alice, &chat, "hi").await;
    w.courier.finish_fanout(&chat, &msg_id).await.unwrap();
    for device in [&bob, &bob2] {
        assert_eq!(w.push.messages_to(device.connection.as_str()).len(), 1, "{}", device.device);
    }
}

#[tokio::test]
async fn the_feed_finishes_a_fan_out_the_sender_never_marked_and_skips_acked_inboxes() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let bob2 = w.device("bob", "tablet").await;
    let chat = w.chat(&alice, &["bob"]).await;
    let msg_id = w.send_unmarked(&alice, &chat, "hi").await;
    w.courier.ack(&bob2, Ack { message_ids: Some(vec![msg_id.clone()]), message_id: None }).await.unwrap();

    let unfinished = w.store.unfinished(w.clock.now() + 1, 10).await.unwrap();
    assert_eq!(unfinished, vec![(chat.clone(), msg_id.clone())]);
    w.courier.finish_fanout(&chat, &msg_id).await.unwrap();
    assert_eq!(w.push.messages_to(bob.connection.as_str()).len(), 1, "the holder gets the push");
    assert!(
        w.push.messages_to(bob2.connection.as_str()).is_empty(),
        "the device that acked gets nothing again"
    );
    // The mark is committed with the next group: a flush waits for it.
    w.store.flush().await.unwrap();
    assert!(w.store.unfinished(w.clock.now() + 1, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_gone_connection_is_unbound_so_later_sends_skip_it() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    w.push.gone.lock().unwrap().insert(bob.connection.to_string());
    w.send(&alice, &chat, "one").await;
    let devices = w.store.devices_of(std::slice::from_ref(&bob.user), 0).await.unwrap();
    assert_eq!(devices[0].connection, None, "410 unbinds the device");
    assert_eq!(w.inbox(&bob).await.len(), 1, "the message still waits in the inbox");
}

#[tokio::test]
async fn large_fan_outs_go_through_delivery_jobs() {
    let w = world(Limits { inline_push_limit: 2, ..Limits::default() });
    let alice = w.device("alice", "p").await;
    let mut others = Vec::new();
    for u in ["b", "c", "d", "e"] {
        others.push(w.device(u, "p").await);
    }
    let chat = w.chat(&alice, &["b", "c", "d", "e"]).await;
    w.push.sent.lock().unwrap().clear();
    w.send(&alice, &chat, "to many").await;
    assert!(w.push.sent.lock().unwrap().is_empty(), "nothing pushed inline past the limit");
    let jobs = w.store.due_jobs(10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    w.courier.run_job(&jobs[0].2).await.unwrap();
    for o in &others {
        assert_eq!(w.push.messages_to(o.connection.as_str()).len(), 1);
    }
}

#[tokio::test]
async fn once_every_device_acked_no_copy_of_the_text_remains() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    let id = w.send(&alice, &chat, "a secret text").await;
    let mid = courier_core::ids::MessageId::try_from(id).unwrap();
    w.courier.ack(&bob, Ack { message_ids: None, message_id: Some(mid) }).await.unwrap();
    w.store.flush().await.unwrap();
    let db = rusqlite::Connection::open(w._dir.path().join("t.db")).unwrap();
    let copies: i64 =
        db.query_row("SELECT count(*) FROM log WHERE body LIKE '%a secret text%'", [], |r| r.get(0)).unwrap();
    assert_eq!(copies, 0);
}

#[tokio::test]
async fn an_ack_moves_the_delivered_marker_in_the_chat() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    let first = w.send(&alice, &chat, "one").await;
    let second = w.send(&alice, &chat, "two").await;
    let ids: Vec<_> = [&second, &first]
        .iter()
        .map(|id| courier_core::ids::MessageId::try_from(id.to_string()).unwrap())
        .collect();
    w.push.sent.lock().unwrap().clear();
    w.courier.ack(&bob, Ack { message_ids: Some(ids), message_id: None }).await.unwrap();

    let receipts = w.courier.get_receipts(&alice, GetReceipts { chat_id: chat.clone() }).await.unwrap();
    let of_bob = receipts.receipts.iter().find(|r| r.user_id == bob.user).unwrap();
    assert_eq!(of_bob.delivered.as_ref().map(|id| id.to_string()), Some(second), "up to the newest acked");
    assert_eq!(of_bob.read, None);
    let sent = w.push.sent.lock().unwrap();
    assert!(
        sent.iter().any(|(c, f)| c == alice.connection.as_str() && f.starts_with(r#"{"type":"receipt""#)),
        "the sender is told: {sent:?}"
    );
}

#[tokio::test]
async fn delete_account_leaves_no_row_or_blob_of_the_user() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let alice2 = w.device("alice", "tablet").await;
    let bob = w.device("bob", "p").await;
    w.upload_keys(&alice, 5).await;
    w.upload_keys(&alice2, 2).await;
    let chat = w.chat(&alice, &["bob", "carol"]).await;
    // alice acks what bob sent, so she has a delivered marker to lose too.
    let to_alice = w.send(&bob, &chat, "to alice").await;
    let to_alice = courier_core::ids::MessageId::try_from(to_alice).unwrap();
    w.courier.ack(&alice, Ack { message_ids: None, message_id: Some(to_alice) }).await.unwrap();
    let id = w.send(&alice, &chat, "from alice").await;
    let id = courier_core::ids::MessageId::try_from(id).unwrap();
    w.courier.ack(&bob, Ack { message_ids: None, message_id: Some(id) }).await.unwrap();
    let body = b"picture";
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(body))
    };
    let made = w
        .courier
        .create_attachment(&alice, CreateAttachment { content_type: "image/png".into(), size: 7, sha256 })
        .await
        .unwrap();
    let blob = w._dir.path().join("blobs").join(made.attachment_id.as_str());
    std::fs::write(&blob, body).unwrap();
    let before: Vec<&str> = w.rows_of("alice").into_iter().map(|(table, _)| table).collect();
    assert!(before.contains(&"receipts") && before.contains(&"one_time_keys"), "{before:?}");

    let closed = w.courier.delete_account(&alice).await.unwrap();
    assert_eq!(closed.len(), 2, "both of alice's connections are closed");
    w.store.flush().await.unwrap();
    assert_eq!(w.rows_of("alice"), vec![], "no row names alice");
    assert!(!blob.exists(), "the uploaded blob is deleted");
    assert_eq!(w.store.attachment(&made.attachment_id).await.unwrap(), None);
    assert!(w.store.device_keys(std::slice::from_ref(&alice.user)).await.unwrap().is_empty());
    assert_eq!(w.rows_of("bob").iter().find(|(t, _)| *t == "participants"), Some(&("participants", 1)));

    // Idempotent: a second call finds nothing and fails nothing.
    w.courier.delete_account(&alice).await.unwrap();
}

#[tokio::test]
async fn the_clean_up_takes_the_keys_of_the_devices_it_expires() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    w.upload_keys(&alice, 3).await;
    w.courier.disconnect(&alice.connection).await.unwrap();
    w.clock.advance(30 * DAY_MS + 1);
    let (devices, _) = w.courier.cleanup().await.unwrap();
    assert_eq!(devices, 1);
    assert_eq!(w.rows_of("alice"), vec![], "the device and its keys are gone");
    assert_eq!(w.store.one_time_key_count(&alice.user, &alice.device).await.unwrap(), 0);
}

#[tokio::test]
async fn a_device_without_a_connection_is_woken_once_until_it_connects_or_the_window_passes() {
    let w = world(Limits::default());
    let window = Limits::default().wake_collapse_ms;
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    w.register_push(&bob, "https://push.example/bob").await;

    w.send(&alice, &chat, "while connected").await;
    assert!(w.run_jobs().await.is_empty());
    assert!(w.wake.woken(&bob).is_empty(), "a connected device gets its push, not a wake-up");

    w.courier.disconnect(&bob.connection).await.unwrap();
    w.send(&alice, &chat, "one").await;
    w.send(&alice, &chat, "two").await;
    assert!(w.run_jobs().await.is_empty());
    assert_eq!(w.wake.woken(&bob), vec!["https://push.example/bob"], "two messages, one wake-up");
    assert!(w.wake.woken(&alice).is_empty(), "the sender is not woken");

    w.clock.advance(window - 1);
    w.send(&alice, &chat, "still unanswered").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 1, "collapsed within the window");
    w.clock.advance(1);
    w.send(&alice, &chat, "the window has passed").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 2, "a new wake-up once the window has passed");

    // A connection answers it: the next message after it leaves wakes at once.
    w.device("bob", "p").await;
    w.courier.disconnect(&bob.connection).await.unwrap();
    w.send(&alice, &chat, "after a visit").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 3);

    w.courier.unregister_push(&bob, UnregisterPush {}).await.unwrap();
    assert!(w.wake.released.lock().unwrap().is_empty(), "released through the queue");
    w.run_jobs().await;
    assert_eq!(*w.wake.released.lock().unwrap(), vec!["https://push.example/bob"]);
    w.device("bob", "p").await;
    w.courier.disconnect(&bob.connection).await.unwrap();
    w.send(&alice, &chat, "unregistered").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 3, "no registration, no wake-up");
}

#[tokio::test]
async fn a_gone_registration_is_forgotten_and_a_temporary_failure_is_retried_once_answered() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let bob = w.device("bob", "p").await;
    let chat = w.chat(&alice, &["bob"]).await;
    w.register_push(&bob, "https://push.example/old").await;
    w.courier.disconnect(&bob.connection).await.unwrap();

    w.wake.answer(Answer::Gone);
    w.send(&alice, &chat, "one").await;
    assert!(w.run_jobs().await.is_empty(), "a gone registration is no failure");
    assert_eq!(w.registration(&bob).await, None, "forgotten");
    w.run_jobs().await;
    assert_eq!(*w.wake.released.lock().unwrap(), vec!["https://push.example/old"]);
    w.device("bob", "p").await;
    w.courier.disconnect(&bob.connection).await.unwrap();
    w.send(&alice, &chat, "two").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 1, "nothing is sent to it again");

    w.device("bob", "p").await;
    w.register_push(&bob, "https://push.example/new").await;
    w.courier.disconnect(&bob.connection).await.unwrap();
    w.wake.answer(Answer::Unavailable);
    w.send(&alice, &chat, "three").await;
    let failed = w.run_jobs().await;
    assert!(failed.len() == 1 && failed[0].is_retryable(), "{failed:?}");
    assert!(w.run_jobs().await[0].is_retryable(), "still failing, still retried");
    w.wake.answer(Answer::Sent);
    assert!(w.run_jobs().await.is_empty(), "the retry goes through");
    assert_eq!(w.wake.woken(&bob)[1..], ["https://push.example/new"; 3], "tried until it answered");
    assert!(w.store.due_jobs(10).await.unwrap().is_empty(), "and then no more");
    w.send(&alice, &chat, "four").await;
    w.run_jobs().await;
    assert_eq!(w.wake.woken(&bob).len(), 4, "the answered wake-up collapses the next");
    assert_eq!(w.registration(&bob).await.map(|r| r.address), Some("https://push.example/new".into()));
}

#[tokio::test]
async fn removing_expiring_or_deleting_a_device_releases_its_registration() {
    let w = world(Limits::default());
    let alice = w.device("alice", "p").await;
    let alice2 = w.device("alice", "tablet").await;
    let bob = w.device("bob", "p").await;
    let carol = w.device("carol", "p").await;
    w.register_push(&alice2, "https://push.example/alice-tablet").await;
    w.register_push(&bob, "https://push.example/bob").await;
    w.register_push(&carol, "https://push.example/carol").await;

    w.courier.remove_device(&alice, &alice2.device).await.unwrap();
    w.courier.delete_account(&bob).await.unwrap();
    w.courier.disconnect(&carol.connection).await.unwrap();
    w.clock.advance(30 * DAY_MS + 1);
    w.courier.cleanup().await.unwrap();
    w.run_jobs().await;
    let mut released = w.wake.released.lock().unwrap().clone();
    released.sort();
    assert_eq!(
        released,
        ["https://push.example/alice-tablet", "https://push.example/bob", "https://push.example/carol"]
    );
    // A device added again under the same id starts without one.
    let again = w.device("alice", "tablet").await;
    assert_eq!(w.registration(&again).await, None);
}
