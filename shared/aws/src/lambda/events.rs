//! The handlers of the non-WebSocket functions: `fanout` on the Messages
//! stream, `deliver` on the job queue, `cleanup` on a schedule.

use std::time::Duration;

use aws_lambda_events::dynamodb::Event as StreamEvent;
use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde::Deserialize;

use courier_core::Courier;
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, MessageId};
use courier_core::ports::Job;

/// The stream image fields the safety net reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageImage {
    chat_id: ChatId,
    message_id: String,
}

/// `fanout`: the safety net behind sendMessage. For each new message it
/// reads the row once; if the send path has not marked it fanned out (it may
/// still be running) it schedules a check after `check_after`, longer than
/// the send function's timeout, which finishes the fan-out if the mark is
/// still missing. Failed records are reported so only they are retried.
pub async fn fanout(courier: &Courier, event: StreamEvent, check_after: Duration) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    for record in event.records {
        if record.event_name != "INSERT" {
            continue;
        }
        let outcome = async {
            let image: MessageImage =
                serde_dynamo::from_item(record.change.new_image.clone()).map_err(Error::internal)?;
            // Dedupe rows share the table; they are no message.
            let Ok(message_id) = MessageId::try_from(image.message_id) else { return Ok(()) };
            if message_id.as_str().starts_with("dedupe#") {
                return Ok(());
            }
            courier.check_fanout_later(&image.chat_id, &message_id, check_after).await
        };
        if let Err(e) = outcome.await {
            tracing::error!(error = %e, "fanout record failed");
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = record.change.sequence_number.clone();
            response.batch_item_failures.push(failure);
        }
    }
    response
}

/// `deliver`: runs the jobs of an SQS batch, at once: a batch of jobs
/// waiting on as many services takes as long as its slowest. A job that
/// fails retryably is reported, so SQS redelivers only it (and after
/// maxReceiveCount moves it to the dead-letter queue; the message still
/// waits in the inbox). One that fails for good is logged and dropped.
pub async fn deliver(courier: &Courier, event: SqsEvent) -> SqsBatchResponse {
    let outcomes = futures_util::future::join_all(event.records.iter().map(|message| async move {
        match serde_json::from_str::<Job>(message.body.as_deref().unwrap_or_default()) {
            Ok(job) => courier.run_job(&job).await,
            Err(e) => Err(Error::internal(e)),
        }
    }))
    .await;
    let mut response = SqsBatchResponse::default();
    for (message, outcome) in event.records.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "job will be retried");
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = message.message_id.clone().unwrap_or_default();
                response.batch_item_failures.push(failure);
            }
            Err(e) => tracing::error!(error = %e, "job failed for good"),
        }
    }
    response
}

/// `wake`: the wake-up queue's batches (wake-ups, SNS endpoint releases),
/// run as `deliver` runs the job queue's.
pub async fn wake(courier: &Courier, event: SqsEvent) -> SqsBatchResponse {
    deliver(courier, event).await
}

/// `cleanup`: what TTL cannot do (devices unseen for 30 days with their inboxes).
pub async fn cleanup(courier: &Courier) -> Result<()> {
    courier.cleanup().await.map(drop)
}
