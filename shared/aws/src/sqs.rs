//! `SqsJobs`: the job queues on SQS. Their consumers are the `deliver` and `wake` Lambdas.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::Message;

use courier_core::error::{Error, Result};
use courier_core::ports::{Clock, Job, Jobs};

/// SQS delays a message by at most 15 minutes.
const MAX_DELAY: Duration = Duration::from_secs(900);

#[derive(Clone)]
pub struct SqsJobs {
    client: aws_sdk_sqs::Client,
    jobs_url: String,
    /// Where jobs that talk to push services go ([`Job::is_push_service`]).
    wakes_url: String,
    _clock: Arc<dyn Clock>,
}

impl SqsJobs {
    pub fn new(
        client: aws_sdk_sqs::Client,
        jobs_url: String,
        wakes_url: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { client, jobs_url, wakes_url, _clock: clock }
    }
}

#[async_trait]
impl Jobs for SqsJobs {
    async fn enqueue(&self, job: &Job, delay: Duration) -> Result<()> {
        let body = serde_json::to_string(job).map_err(Error::internal)?;
        self.client
            .send_message()
            .queue_url(if job.is_push_service() { &self.wakes_url } else { &self.jobs_url })
            .message_body(body)
            .delay_seconds(delay.min(MAX_DELAY).as_secs() as i32)
            .send()
            .await
            .map_err(super::sdk_error)?;
        Ok(())
    }
}

/// The event Lambda's SQS event source mapping makes of received
/// `messages`: how `deliver` runs off the queue without Lambda
/// (courier-local's poller, the fault tests).
pub fn lambda_event(messages: &[Message]) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages
        .iter()
        .map(|m| {
            let mut record = SqsMessage::default();
            record.message_id = m.message_id().map(str::to_owned);
            record.receipt_handle = m.receipt_handle().map(str::to_owned);
            record.body = m.body().map(str::to_owned);
            record.md5_of_body = m.md5_of_body().map(str::to_owned);
            record.event_source = Some("aws:sqs".to_owned());
            record
        })
        .collect();
    event
}

/// The receipt handles of the `messages` that `response` does not report
/// failed: those are done and get deleted; the failed ones come back.
pub fn done_receipts<'a>(
    messages: &'a [Message],
    response: &'a SqsBatchResponse,
) -> impl Iterator<Item = &'a str> + 'a {
    messages
        .iter()
        .filter(|m| {
            !response.batch_item_failures.iter().any(|f| Some(f.item_identifier.as_str()) == m.message_id())
        })
        .map(|m| m.receipt_handle().unwrap_or_default())
}
