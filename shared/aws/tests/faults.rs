//! Fault tests of the deployed send path, on moto: a crash between each two
//! steps, failing and throttled pushes, throttled DynamoDB calls, SQS
//! redelivery. Whatever fails, a message that got SUCCESS reaches every
//! recipient; when nothing fails, nothing is pushed twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextMut,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;

use courier_aws::lambda;
use courier_aws::{DynamoTables, Names, S3Blobs, SqsJobs};
use courier_core::domain::{Caller, Limits};
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, ConnectionId, DeviceId, UserId};
use courier_core::ports::{Clock, Posted, Push, SystemClock, Unwired};
use courier_core::protocol::{CreateChat, SendMessage, Sync};
use courier_core::service::{Courier, Ports};
use courier_testkit::moto::{self, MotoServer};

/// How a DynamoDB call is made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The Lambda dies before the call leaves: nothing is written, the caller gets an error.
    Crash,
    /// DynamoDB answers ThrottlingException without writing; the SDK retries.
    Throttle,
}

/// Fails DynamoDB calls of one operation (the next `times`, after letting
/// `skip` through); counts the throttles sent.
#[derive(Clone, Debug, Default)]
struct Faults(Arc<Mutex<Armed>>, Arc<AtomicUsize>, Arc<AtomicUsize>);

/// Per operation: the failure, the calls to let through first, the calls to fail.
type Armed = HashMap<&'static str, (Failure, usize, usize)>;

impl Faults {
    fn arm(&self, operation: &'static str, failure: Failure, times: usize) {
        self.arm_after(operation, 0, failure, times);
    }

    fn arm_after(&self, operation: &'static str, skip: usize, failure: Failure, times: usize) {
        self.0.lock().unwrap().insert(operation, (failure, skip, times));
    }

    /// Takes one failure for this request's operation, if one is armed.
    fn take(&self, target: &str) -> Option<Failure> {
        let operation = target.rsplit('.').next()?;
        let mut armed = self.0.lock().unwrap();
        let (failure, skip, left) = armed.get_mut(operation)?;
        if *skip > 0 {
            *skip -= 1;
            return None;
        }
        if *left == 0 {
            return None;
        }
        *left -= 1;
        Some(*failure)
    }
}

impl Intercept for Faults {
    fn name(&self) -> &'static str {
        "Faults"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        let target = context.request().headers().get("x-amz-target").unwrap_or_default().to_owned();
        match self.take(&target) {
            Some(Failure::Crash) => Err("injected crash".into()),
            Some(Failure::Throttle) => {
                // Send moto an operation it does not know, so nothing is
                // written, and answer the client as a throttled call.
                context.request_mut().headers_mut().insert("x-amz-target", "DynamoDB_20120810.Throttled");
                self.1.fetch_add(1, Ordering::SeqCst);
                self.2.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        // moto answers the unknown operation with an HTML 500: that is a throttled call's answer.
        let html =
            context.response().headers().get("content-type").is_some_and(|t| t.starts_with("text/html"));
        if !html || context.response().status().as_u16() != 500 {
            return Ok(());
        }
        if self.2.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            return Ok(());
        }
        let response = context.response_mut();
        *response.status_mut() = 400u16.try_into()?;
        response.headers_mut().remove("content-length");
        response.headers_mut().remove("x-amz-crc32");
        response.headers_mut().insert("x-amzn-errortype", "ThrottlingException");
        *response.body_mut() =
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"slow down"}"#
                .into();
        Ok(())
    }
}

/// What a push does on the next calls: scripted outcomes, then success.
#[derive(Default)]
struct Pushes {
    script: Mutex<VecDeque<Outcome>>,
    sent: Mutex<Vec<(String, String)>>,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// The process died mid-push: not a retryable answer.
    Die,
    /// 500 or 429 from the Management API.
    Unavailable,
}

impl Pushes {
    fn script(&self, outcomes: &[Outcome]) {
        self.script.lock().unwrap().extend(outcomes);
    }

    /// How many `newMessage` pushes each connection got.
    fn messages(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (connection, frame) in self.sent.lock().unwrap().iter() {
            if frame.starts_with(r#"{"type":"newMessage""#) {
                *counts.entry(connection.clone()).or_default() += 1;
            }
        }
        counts
    }
}

#[async_trait]
impl Push for Pushes {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> Result<Posted> {
        match self.script.lock().unwrap().pop_front() {
            Some(Outcome::Die) => return Err(Error::internal("the function died")),
            Some(Outcome::Unavailable) => return Err(Error::unavailable("500 from the Management API")),
            None => {}
        }
        self.sent.lock().unwrap().push((connection.to_string(), frame.to_owned()));
        Ok(Posted::Sent)
    }

    async fn close(&self, _: &ConnectionId) -> Result<()> {
        Ok(())
    }
}

struct World {
    courier: Courier,
    faults: Faults,
    pushes: Arc<Pushes>,
    sqs: aws_sdk_sqs::Client,
    queue: String,
    alice: Caller,
    bob: Caller,
    chat: ChatId,
}

impl World {
    /// Alice and Bob online, one device each, in a 1:1 chat, on fresh tables.
    async fn new() -> World {
        let moto: &MotoServer = moto::shared().await;
        let config = moto.sdk_config();
        let prefix = format!("faults{:x}", rand::random::<u64>());
        let sqs = aws_sdk_sqs::Client::new(&config);
        let queue = sqs.create_queue().queue_name(format!("{prefix}-jobs")).send().await.unwrap();
        let queue = queue.queue_url().unwrap().to_owned();
        let names: Names = Names { jobs_queue_url: queue.clone(), ..moto.tables(&prefix).await };
        let faults = Faults::default();
        let dynamodb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&config).interceptor(faults.clone()).build(),
        );
        let tables = Arc::new(DynamoTables::new(dynamodb, names.clone()));
        let pushes = Arc::new(Pushes::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let ports = Ports {
            chats: tables.clone(),
            devices: tables.clone(),
            messages: tables.clone(),
            retention: tables.clone(),
            attachments: tables.clone(),
            quotas: tables.clone(),
            keys: tables.clone(),
            receipts: tables,
            // No device here registers for push.
            wakeups: Arc::new(Unwired),
            blobs: Arc::new(S3Blobs::new(aws_sdk_s3::Client::new(&config), names.media_bucket.clone())),
            push: pushes.clone(),
            jobs: Arc::new(SqsJobs::new(sqs.clone(), queue.clone(), queue.clone(), clock.clone())),
            clock,
        };
        let courier = Courier::new(ports, Limits::default());
        let caller = |user: &str| Caller {
            user: UserId::try_from(user).unwrap(),
            device: DeviceId::try_from("phone").unwrap(),
            connection: ConnectionId::try_from(format!("{user}-conn")).unwrap(),
        };
        let (alice, bob) = (caller("alice"), caller("bob"));
        for c in [&alice, &bob] {
            courier.connect(&c.user, &c.device, &c.connection).await.unwrap();
        }
        let create =
            CreateChat { participants: vec![bob.user.clone()], name: "faults".into(), encrypted: false };
        let chat = courier.create_chat(&alice, create).await.unwrap().chat_id;
        World { courier, faults, pushes, sqs, queue, alice, bob, chat }
    }

    async fn send(&self, text: &str, client_id: &str) -> Result<String> {
        let cmd = SendMessage {
            chat_id: self.chat.clone(),
            message: text.into(),
            attachments: vec![],
            client_message_id: Some(client_id.into()),
            devices: None,
        };
        self.courier.send_message(&self.alice, cmd).await.map(|sent| sent.message_id.to_string())
    }

    /// Bob's inbox, by messageId.
    async fn bobs_inbox(&self) -> Vec<String> {
        let page = self.courier.sync(&self.bob, Sync { limit: Some(100), cursor: None }).await.unwrap();
        let ids = page.messages.iter().map(|m| serde_json::from_str::<serde_json::Value>(m.get()).unwrap());
        ids.map(|m| m["messageId"].as_str().unwrap().to_owned()).collect()
    }

    fn pushes_to_bob(&self) -> usize {
        self.pushes.messages().get(self.bob.connection.as_str()).copied().unwrap_or(0)
    }

    /// What the stream does for each new message: `fanout` reads it and,
    /// when its fan-out is not marked done, queues the check (here without delay).
    async fn stream_sees(&self, message_id: &str) {
        let id = courier_core::ids::MessageId::try_from(message_id).unwrap();
        self.courier.check_fanout_later(&self.chat, &id, Duration::ZERO).await.unwrap();
    }

    /// Runs the queue dry through `deliver`, as Lambda's SQS mapping would:
    /// failed records stay and come back. Returns how many batches ran.
    async fn drain_queue(&self) -> usize {
        for batches in 0..20 {
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.queue)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .send()
                .await
                .unwrap();
            let messages = received.messages.unwrap_or_default();
            if messages.is_empty() {
                return batches;
            }
            let response = lambda::deliver(&self.courier, courier_aws::lambda_event(&messages)).await;
            for handle in courier_aws::done_receipts(&messages, &response) {
                self.sqs.delete_message().queue_url(&self.queue).receipt_handle(handle).send().await.unwrap();
            }
        }
        panic!("the queue never drained");
    }
}

#[tokio::test]
async fn with_no_fault_a_message_is_pushed_once_and_nothing_is_queued() {
    let w = World::new().await;
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.pushes_to_bob(), 1);
    w.stream_sees(&id).await;
    assert_eq!(w.drain_queue().await, 0, "a marked message costs the stream one read and no job");
    assert_eq!(w.pushes_to_bob(), 1, "no duplicate push");
    assert_eq!(w.bobs_inbox().await, vec![id]);
}

#[tokio::test]
async fn a_crash_between_the_message_row_and_the_inbox_rows_loses_nothing_on_retry() {
    let w = World::new().await;
    w.faults.arm("BatchWriteItem", Failure::Crash, 1);
    let first = w.send("hello", "c1").await;
    assert!(first.is_err(), "no SUCCESS when the inbox rows were not written");
    // The client retries with the same clientMessageId.
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.bobs_inbox().await, vec![id.clone()], "the retry completed the inbox");
    // The retry returned the first message, whose fan-out the stream finishes.
    w.stream_sees(&id).await;
    w.drain_queue().await;
    assert_eq!(w.pushes_to_bob(), 1);
    w.stream_sees(&id).await;
    w.drain_queue().await;
    assert_eq!(w.pushes_to_bob(), 1, "once marked, the safety net pushes nothing more");
}

#[tokio::test]
async fn a_crash_between_the_message_row_and_its_claim_delivers_only_the_retry() {
    let w = World::new().await;
    // The message row lands; the claim, the second put, never leaves.
    w.faults.arm_after("PutItem", 1, Failure::Crash, 1);
    assert!(w.send("hello", "c1").await.is_err(), "no SUCCESS without the claim");
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.bobs_inbox().await, vec![id.clone()], "only the retry is in the inbox");
    assert_eq!(w.send("hello", "c1").await.unwrap(), id, "and it holds the claim");
    // The orphan row's stream record: unmarked, so the safety net looks,
    // finds no inbox holding it, pushes nothing and marks it.
    let messages = &w.courier.ports().messages;
    let orphans = messages.unfinished(i64::MAX, 10).await.unwrap();
    assert_eq!(orphans.len(), 1, "the first send's row: {orphans:?}");
    assert_ne!(orphans[0].1.as_str(), id);
    w.stream_sees(orphans[0].1.as_str()).await;
    w.drain_queue().await;
    assert_eq!(w.pushes_to_bob(), 1, "the retry's push only");
    assert!(messages.unfinished(i64::MAX, 10).await.unwrap().is_empty(), "the orphan is marked");
}

#[tokio::test]
async fn a_crash_after_success_and_before_the_push_is_finished_by_the_stream() {
    let w = World::new().await;
    w.pushes.script(&[Outcome::Die]);
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.pushes_to_bob(), 0);
    w.stream_sees(&id).await;
    w.drain_queue().await;
    assert_eq!(w.pushes_to_bob(), 1, "the safety net pushed it");
    assert_eq!(w.bobs_inbox().await, vec![id]);
}

#[tokio::test]
async fn a_crash_between_the_push_and_the_mark_delivers_at_least_once() {
    let w = World::new().await;
    w.faults.arm("UpdateItem", Failure::Crash, 1);
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.pushes_to_bob(), 1);
    w.stream_sees(&id).await;
    w.drain_queue().await;
    // Unmarked, so the safety net pushes again: at least once, as promised.
    assert_eq!(w.pushes_to_bob(), 2);
    w.stream_sees(&id).await;
    assert_eq!(w.drain_queue().await, 0, "and now it is marked");
}

#[tokio::test]
async fn a_failing_or_throttled_push_is_retried_through_the_queue() {
    let w = World::new().await;
    // The inline push gets a 500; the first delivery job gets a 429, and SQS
    // hands the job back; the second try succeeds.
    w.pushes.script(&[Outcome::Unavailable, Outcome::Unavailable]);
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.pushes_to_bob(), 0);
    let batches = w.drain_queue().await;
    assert_eq!(batches, 2, "the job failed once, was redelivered, then succeeded");
    assert_eq!(w.pushes_to_bob(), 1, "delivered once");
    w.stream_sees(&id).await;
    assert_eq!(w.drain_queue().await, 0, "the send path marked it after queueing the job");
}

#[tokio::test]
async fn throttled_dynamodb_calls_are_retried_by_the_sdk() {
    let w = World::new().await;
    // The message row's put, and the inbox rows' batch.
    w.faults.arm("PutItem", Failure::Throttle, 1);
    w.faults.arm("BatchWriteItem", Failure::Throttle, 1);
    let id = w.send("hello", "c1").await.unwrap();
    assert_eq!(w.faults.1.load(Ordering::SeqCst), 2, "both calls were throttled once");
    assert_eq!(w.faults.2.load(Ordering::SeqCst), 0, "and each was answered as a throttle");
    assert_eq!(w.bobs_inbox().await, vec![id]);
    assert_eq!(w.pushes_to_bob(), 1);
}
