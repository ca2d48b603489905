//! `--backend aws`: the deployed topology on one machine. The same handlers
//! run over the AWS adapters against `AWS_ENDPOINT_URL` (moto's server in the
//! tests); this process plays the parts AWS would: it creates the tables,
//! queue and bucket, polls the Messages stream and hands `fanout` real-shaped
//! stream events, polls the queues and hands `deliver` and `wake` SQS events, and takes
//! the pushes on its own `@connections` endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::dynamodb::{Event as StreamEvent, EventRecord, StreamRecord, StreamViewType};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use courier_aws::aws_sdk_apigatewaymanagement as management;
use courier_aws::aws_sdk_sqs::error::DisplayErrorContext;
use courier_aws::aws_sdk_sqs::types::QueueAttributeName;
use courier_aws::lambda;
use courier_aws::{Aws, Names, Watcher, aws_config, done_receipts, lambda_event, schema};
use courier_core::ports::Clock;
use courier_core::{Courier, Ports};
use tokio::task::JoinHandle;

/// Lambda polls a stream shard four times a second.
const STREAM_POLL: Duration = Duration::from_millis(250);
/// How long `fanout` waits before finishing a fan-out the send path left
/// unmarked. Deployed it must exceed sendMessage's timeout; here the send
/// path runs in this process, so a short wait is enough.
const FANOUT_CHECK: Duration = Duration::from_secs(2);
/// Receives before a job goes to the dead-letter queue.
const MAX_RECEIVES: u32 = 5;

/// The AWS side as this process uses it.
pub struct Backend {
    pub aws: Aws,
    streams: aws_sdk_dynamodbstreams::Client,
}

impl Backend {
    /// Creates (where missing) the tables, queues and bucket named with
    /// `prefix`, and builds the clients, with `watcher` on them if given.
    /// Pushes go to `connections_endpoint`, signed with `management_key`
    /// (id, secret).
    pub async fn provision(
        config: &aws_config::SdkConfig,
        prefix: &str,
        connections_endpoint: &str,
        management_key: (&str, &str),
        watcher: Option<&dyn Watcher>,
    ) -> anyhow::Result<Backend> {
        let sqs = courier_aws::aws_sdk_sqs::Client::new(config);
        let jobs = create_queue(&sqs, &format!("{prefix}-jobs")).await?;
        let wakes = create_queue(&sqs, &format!("{prefix}-wakes")).await?;
        let names = Names { wakes_queue_url: wakes, ..Names::prefixed(prefix, &jobs, connections_endpoint) };
        let mut aws = match watcher {
            Some(watcher) => Aws::watched(config, names, watcher),
            None => Aws::new(config, names),
        };
        // This process is the API Gateway that checks those pushes, and it
        // knows only its management key, not the SDK's credentials.
        let (key_id, secret) = management_key;
        let credentials = management::config::Credentials::new(key_id, secret, None, None, "courier-local");
        aws.management = management::Client::from_conf(
            aws.management.config().to_builder().credentials_provider(credentials).build(),
        );
        schema::create_tables(&aws.dynamodb, &aws.names).await?;
        if let Err(e) = aws.s3().create_bucket().bucket(&aws.names.media_bucket).send().await {
            let owned = e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you());
            anyhow::ensure!(owned, "creating the bucket failed: {}", DisplayErrorContext(e));
        }
        Ok(Backend { streams: aws_sdk_dynamodbstreams::Client::new(config), aws })
    }

    pub fn ports(&self, clock: Arc<dyn Clock>) -> Ports {
        self.aws.ports_with_clock(clock)
    }

    /// Starts the stream poller and a poller per queue (`deliver`'s and `wake`'s).
    pub fn spawn(&self, courier: Arc<Courier>) -> [JoinHandle<()>; 3] {
        let names = &self.aws.names;
        [
            tokio::spawn(poll_stream(self.aws.clone(), self.streams.clone(), courier.clone())),
            tokio::spawn(poll_queue(self.aws.clone(), names.jobs_queue_url.clone(), courier.clone())),
            tokio::spawn(poll_queue(self.aws.clone(), names.wakes_queue_url.clone(), courier)),
        ]
    }
}

/// Creates a job queue and its dead-letter queue; answers the queue's URL.
async fn create_queue(sqs: &courier_aws::aws_sdk_sqs::Client, name: &str) -> anyhow::Result<String> {
    let dlq = sqs.create_queue().queue_name(format!("{name}-dlq")).send().await?;
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(dlq.queue_url().unwrap_or_default())
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let redrive = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{MAX_RECEIVES}"}}"#);
    let queue = sqs
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .attributes(QueueAttributeName::VisibilityTimeout, "5")
        .send()
        .await?;
    Ok(queue.queue_url().unwrap_or_default().to_owned())
}

/// Reads the Messages stream as Lambda's event source mapping does and hands
/// each batch to `fanout`; a batch with failures is read again from its first
/// failed record.
async fn poll_stream(aws: Aws, streams: aws_sdk_dynamodbstreams::Client, courier: Arc<Courier>) {
    loop {
        if let Err(e) = follow_stream(&aws, &streams, &courier).await {
            tracing::warn!(error = %e, "stream poller restarting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn follow_stream(
    aws: &Aws,
    streams: &aws_sdk_dynamodbstreams::Client,
    courier: &Courier,
) -> anyhow::Result<()> {
    let table = aws.dynamodb.describe_table().table_name(&aws.names.messages_table).send().await?;
    let arn = table.table().and_then(|t| t.latest_stream_arn()).unwrap_or_default().to_owned();
    let stream = streams.describe_stream().stream_arn(&arn).send().await?;
    let shards: Vec<String> = stream
        .stream_description()
        .map(|d| d.shards().iter().filter_map(|s| s.shard_id().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut iterators = HashMap::new();
    for shard in shards {
        let it = streams
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&shard)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?;
        iterators.insert(shard, it.shard_iterator().unwrap_or_default().to_owned());
    }
    loop {
        for (shard, iterator) in iterators.iter_mut() {
            let batch = streams.get_records().shard_iterator(iterator.as_str()).limit(100).send().await?;
            let records: Vec<EventRecord> = batch.records().iter().map(|r| event_record(r, &arn)).collect();
            if !records.is_empty() {
                let mut event = StreamEvent::default();
                event.records = records;
                let response = lambda::fanout(courier, event, FANOUT_CHECK).await;
                if let Some(failed) = response.batch_item_failures.first() {
                    // Lambda retries from the first failed record; so do we.
                    let seq = failed.item_identifier.clone().unwrap_or_default();
                    tracing::warn!(%shard, %seq, "fanout reported failures; retrying from there");
                    let again = streams
                        .get_shard_iterator()
                        .stream_arn(&arn)
                        .shard_id(shard.as_str())
                        .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                        .sequence_number(seq)
                        .send()
                        .await?;
                    *iterator = again.shard_iterator().unwrap_or_default().to_owned();
                    continue;
                }
            }
            if let Some(next) = batch.next_shard_iterator() {
                *iterator = next.to_owned();
            }
        }
        tokio::time::sleep(STREAM_POLL).await;
    }
}

/// A stream record in the shape Lambda hands it over.
fn event_record(record: &aws_sdk_dynamodbstreams::types::Record, arn: &str) -> EventRecord {
    let mut change = StreamRecord::default();
    if let Some(r) = record.dynamodb() {
        change.keys = r.keys().cloned().unwrap_or_default().into();
        change.new_image = r.new_image().cloned().unwrap_or_default().into();
        change.old_image = r.old_image().cloned().unwrap_or_default().into();
        change.sequence_number = r.sequence_number().map(str::to_owned);
        change.size_bytes = r.size_bytes().unwrap_or_default();
        change.stream_view_type = Some(StreamViewType::NewImage);
    }
    let mut event = EventRecord::default();
    event.event_id = record.event_id().unwrap_or_default().to_owned();
    event.event_name = record.event_name().map(|n| n.as_str().to_owned()).unwrap_or_default();
    event.event_source = Some("aws:dynamodb".to_owned());
    event.event_version = record.event_version().map(str::to_owned);
    event.aws_region = record.aws_region().unwrap_or_default().to_owned();
    event.event_source_arn = Some(arn.to_owned());
    event.change = change;
    event
}

/// Batches handed to `deliver` at once. Lambda runs a batch per concurrent
/// invocation; one at a time here, a wake-up to a push service that hangs
/// would hold up every job behind it for the sender's timeout.
const CONCURRENT_BATCHES: usize = 8;

/// Receives jobs as Lambda's SQS event source mapping does, hands each batch
/// to `deliver` (or `wake`: the same handler), and deletes what did not
/// fail: the rest comes back after the visibility timeout, and to the
/// dead-letter queue after five tries.
async fn poll_queue(aws: Aws, url: String, courier: Arc<Courier>) {
    // Dropped with this task, which aborts the batches still running.
    let mut batches = tokio::task::JoinSet::new();
    loop {
        while batches.try_join_next().is_some() {}
        while batches.len() >= CONCURRENT_BATCHES {
            batches.join_next().await;
        }
        let received = aws
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(
                courier_aws::aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await;
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %DisplayErrorContext(e), "receiving jobs failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let (aws, courier, url) = (aws.clone(), courier.clone(), url.clone());
        batches.spawn(async move {
            let response = lambda::deliver(&courier, lambda_event(&messages)).await;
            for handle in done_receipts(&messages, &response) {
                let deleted = aws.sqs.delete_message().queue_url(&url).receipt_handle(handle).send().await;
                if let Err(e) = deleted {
                    tracing::warn!(error = %DisplayErrorContext(e), "deleting a done job failed");
                }
            }
        });
    }
}
