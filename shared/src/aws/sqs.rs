//! `SqsJobs`: the job queue on SQS. Its consumer is the `deliver` Lambda.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::ports::{Clock, Job, Jobs};

/// SQS delays a message by at most 15 minutes.
const MAX_DELAY: Duration = Duration::from_secs(900);

#[derive(Clone)]
pub struct SqsJobs {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    _clock: Arc<dyn Clock>,
}

impl SqsJobs {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: String, clock: Arc<dyn Clock>) -> Self {
        Self { client, queue_url, _clock: clock }
    }
}

#[async_trait]
impl Jobs for SqsJobs {
    async fn enqueue(&self, job: &Job, delay: Duration) -> Result<()> {
        let body = serde_json::to_string(job).map_err(Error::internal)?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .delay_seconds(delay.min(MAX_DELAY).as_secs() as i32)
            .send()
            .await
            .map_err(super::sdk_error)?;
        Ok(())
    }
}
