//! `DynamoTables`: every table port on DynamoDB, with the keys and indexes of [`super::schema`].
//!
//! One file per port (`chats`, `devices`, `messages`, `attachments`,
//! `quotas`, `keys`, `receipts`), group messages stored once in `shared`,
//! the items they write in `rows`, and batched calls of any size in `batch`.

mod attachments;
mod batch;
mod chats;
mod devices;
mod keys;
mod messages;
mod quotas;
mod receipts;
mod rows;
mod shared;

pub use shared::LATE_ROW_MS;

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::AttributeValue;
use futures_util::{StreamExt, TryStreamExt};

use courier_core::domain::Millis;
use courier_core::error::Result;

type Item = HashMap<String, AttributeValue>;

/// Most calls one operation keeps in flight: a fan-out to 100 people's 300
/// devices is 12 batch writes, all at once; a clean-up page waits its turn.
const PARALLEL_CALLS: usize = 16;

/// Every table port on DynamoDB. Cheap to clone.
///
/// No transaction spans the tables (one would cost double and cap a fan-out
/// at 100 rows), so each operation orders its writes so that a crash between
/// two of them leaves something a retry or a later read repairs, never a
/// lost message. TTL deletes "within a few days", so every read that is
/// given a time filters rows past `expiresAt` itself.
#[derive(Clone)]
pub struct DynamoTables {
    pub(crate) client: aws_sdk_dynamodb::Client,
    pub(crate) names: super::Names,
}

impl DynamoTables {
    pub fn new(client: aws_sdk_dynamodb::Client, names: super::Names) -> Self {
        Self { client, names }
    }
}

/// An expression's attribute names and values, as data.
type Names<'a> = &'a [(&'a str, &'a str)];
type Values<'a> = Vec<(&'a str, AttributeValue)>;

fn names_of(names: Names) -> Option<HashMap<String, String>> {
    (!names.is_empty()).then(|| names.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
}

fn values_of(values: Values) -> Option<HashMap<String, AttributeValue>> {
    (!values.is_empty()).then(|| values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// One page of a Query: the items, and where the next page starts.
pub(crate) struct Page {
    pub(crate) items: Vec<Item>,
    pub(crate) next: Option<Item>,
}

/// What a Query asks, as data (see [`DynamoTables::query_page`]).
#[derive(Default)]
pub(crate) struct QueryOf<'a> {
    pub(crate) key: &'a str,
    pub(crate) filter: Option<&'a str>,
    pub(crate) projection: Option<&'a str>,
    pub(crate) names: Names<'a>,
    pub(crate) limit: Option<i32>,
    pub(crate) start: Option<Item>,
}

impl DynamoTables {
    /// One conditional UpdateItem; false when its condition did not hold.
    /// The expressions come as data so that every caller shares one
    /// instance of the call: each inlined SDK call costs the Lambda
    /// bootstraps, which have a size budget (scripts/sam-build).
    pub(crate) async fn update(
        &self,
        table: &str,
        at: Item,
        expression: &str,
        condition: &str,
        names: Names<'_>,
        values: Values<'_>,
    ) -> Result<bool> {
        let out = self
            .client
            .update_item()
            .table_name(table)
            .set_key(Some(at))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_names(names_of(names))
            .set_expression_attribute_values(values_of(values))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(crate::sdk_error(e)),
        }
    }

    /// One strongly consistent Query page, shared by its callers as [`Self::update`] is.
    pub(crate) async fn query_page(
        &self,
        table: &str,
        query: QueryOf<'_>,
        values: Values<'_>,
    ) -> Result<Page> {
        let out = self
            .client
            .query()
            .table_name(table)
            .consistent_read(true)
            .key_condition_expression(query.key)
            .set_filter_expression(query.filter.map(str::to_owned))
            .set_projection_expression(query.projection.map(str::to_owned))
            .set_expression_attribute_names(names_of(query.names))
            .set_expression_attribute_values(values_of(values))
            .set_limit(query.limit)
            .set_exclusive_start_key(query.start)
            .send()
            .await
            .map_err(crate::sdk_error)?;
        Ok(Page { items: out.items.unwrap_or_default(), next: out.last_evaluated_key })
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn key<const N: usize>(parts: [(&str, &str); N]) -> Item {
    parts.into_iter().map(|(name, value)| (name.to_owned(), s(value))).collect()
}

/// DynamoDB's TTL counts epoch seconds. Rounding up means a row never
/// expires before the time it was given.
fn ttl_secs(ms: Millis) -> i64 {
    (ms + 999).div_euclid(1000)
}

/// A row is live while `expiresAt > now_secs(now)`, and expired from then on.
fn now_secs(ms: Millis) -> i64 {
    ms.div_euclid(1000)
}

/// Whether a call failed only because its condition did not hold.
fn condition_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|s| s.code()) == Some("ConditionalCheckFailedException")
}

/// Why DynamoDB cancelled a transaction, one code per item in order (`"None"`
/// for an item that was fine); empty if the call failed any other way.
fn cancellation_reasons<R>(e: &SdkError<TransactWriteItemsError, R>) -> Vec<&str> {
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
            c.cancellation_reasons().iter().map(|r| r.code().unwrap_or_default()).collect()
        }
        _ => Vec::new(),
    }
}

/// Keeps the first of each repeated value, in order: a batch call refuses
/// two requests for one key.
fn unique<T: Clone + Eq + std::hash::Hash>(values: &[T]) -> Vec<T> {
    let mut seen = HashSet::new();
    values.iter().filter(|v| seen.insert(*v)).cloned().collect()
}

/// Runs calls [`PARALLEL_CALLS`] at a time, answers in order; the first error wins.
/// (A `Vec`, not an iterator: a lazy `map` closure held across the await
/// defeats the `Send` proof that `async_trait` needs.)
async fn in_parallel<T, F>(calls: Vec<F>) -> Result<Vec<T>>
where
    F: Future<Output = Result<T>>,
{
    futures_util::stream::iter(calls).buffered(PARALLEL_CALLS).try_collect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_seconds_never_cut_a_row_short() {
        assert_eq!(ttl_secs(1_000), 1);
        assert_eq!(ttl_secs(1_001), 2);
        assert_eq!(now_secs(1_999), 1);
        // Live at every millisecond before the time given.
        for e in [1_000, 1_500, 2_000] {
            assert!(ttl_secs(e) > now_secs(e - 1));
        }
    }
}
