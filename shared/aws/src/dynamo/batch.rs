//! Batch reads and writes of any size: split to DynamoDB's limits, sent in parallel, leftovers retried.

use std::time::Duration;

use aws_sdk_dynamodb::types::{DeleteRequest, KeysAndAttributes, PutRequest, WriteRequest};

use super::{DynamoTables, Item, in_parallel};
use crate::sdk_error;
use courier_core::error::{Error, Result};

/// BatchWriteItem takes at most 25 requests, BatchGetItem at most 100 keys.
const WRITE_BATCH: usize = 25;
const GET_BATCH: usize = 100;
const BACKOFF_BASE_MS: u64 = 25;
const BACKOFF_CAP_MS: u64 = 1_000;

impl DynamoTables {
    /// Calls one batch gets before what DynamoDB left unprocessed becomes an
    /// `Unavailable` error; with the backoff between them that is about 3 s at worst.
    pub const BATCH_ATTEMPTS: u32 = 8;

    /// Writes any number of puts and deletes to one table: 25 a call, the
    /// calls in parallel, what DynamoDB leaves unprocessed retried with backoff.
    /// Every caller's writes are idempotent, so a retried call is harmless.
    pub(super) async fn write_batches(&self, table: &str, requests: Vec<WriteRequest>) -> Result<()> {
        let calls = requests.chunks(WRITE_BATCH).map(|chunk| self.write_batch(table, chunk.to_vec()));
        in_parallel(calls.collect()).await.map(drop)
    }

    async fn write_batch(&self, table: &str, mut pending: Vec<WriteRequest>) -> Result<()> {
        for attempt in 0..Self::BATCH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let out = self
                .client
                .batch_write_item()
                .request_items(table, pending)
                .send()
                .await
                .map_err(sdk_error)?;
            pending = out.unprocessed_items.and_then(|mut left| left.remove(table)).unwrap_or_default();
            if pending.is_empty() {
                return Ok(());
            }
        }
        tracing::warn!(table, left = pending.len(), "batch writes left unprocessed");
        Err(Error::unavailable(format!("{} batch writes left unprocessed", pending.len())))
    }

    /// Reads any number of keys from one table (strongly consistent): 100 a
    /// call, the calls in parallel, unprocessed keys retried with backoff.
    /// Missing keys are simply absent from the answer, which has no order.
    pub(super) async fn get_batches(
        &self,
        table: &str,
        keys: Vec<Item>,
        projection: Option<&str>,
    ) -> Result<Vec<Item>> {
        self.read_batches(table, keys, projection, true).await
    }

    /// As [`Self::get_batches`], eventually consistent: half the read units,
    /// for callers that can tell a row not seen yet from one that is not there.
    pub(super) async fn get_batches_eventually(
        &self,
        table: &str,
        keys: Vec<Item>,
        projection: Option<&str>,
    ) -> Result<Vec<Item>> {
        self.read_batches(table, keys, projection, false).await
    }

    async fn read_batches(
        &self,
        table: &str,
        keys: Vec<Item>,
        projection: Option<&str>,
        consistent: bool,
    ) -> Result<Vec<Item>> {
        let calls = keys.chunks(GET_BATCH).map(|chunk| {
            let request = KeysAndAttributes::builder()
                .set_keys(Some(chunk.to_vec()))
                .consistent_read(consistent)
                .set_projection_expression(projection.map(str::to_owned))
                .build()
                .map_err(Error::internal);
            async move { self.get_batch(table, request?).await }
        });
        Ok(in_parallel(calls.collect()).await?.into_iter().flatten().collect())
    }

    async fn get_batch(&self, table: &str, request: KeysAndAttributes) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        let mut pending = Some(request);
        for attempt in 0..Self::BATCH_ATTEMPTS {
            let Some(request) = pending.take() else { break };
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let out =
                self.client.batch_get_item().request_items(table, request).send().await.map_err(sdk_error)?;
            found.extend(out.responses.and_then(|mut r| r.remove(table)).unwrap_or_default());
            pending =
                out.unprocessed_keys.and_then(|mut left| left.remove(table)).filter(|k| !k.keys.is_empty());
        }
        match pending {
            None => Ok(found),
            Some(left) => {
                tracing::warn!(table, left = left.keys.len(), "batch reads left unprocessed");
                Err(Error::unavailable(format!("{} batch reads left unprocessed", left.keys.len())))
            }
        }
    }
}

pub(super) fn put_request(item: Item) -> Result<WriteRequest> {
    let put = PutRequest::builder().set_item(Some(item)).build().map_err(Error::internal)?;
    Ok(WriteRequest::builder().put_request(put).build())
}

pub(super) fn delete_request(key: Item) -> Result<WriteRequest> {
    let delete = DeleteRequest::builder().set_key(Some(key)).build().map_err(Error::internal)?;
    Ok(WriteRequest::builder().delete_request(delete).build())
}

/// The wait before retrying what a batch call left unprocessed: exponential,
/// capped, with full jitter so parallel callers do not retry in step.
fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let cap = BACKOFF_BASE_MS.saturating_mul(1 << attempt.min(16)).min(BACKOFF_CAP_MS);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_cap() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= Duration::from_millis(BACKOFF_CAP_MS));
        }
    }
}
