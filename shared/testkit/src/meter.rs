//! [`Meter`]: an interceptor that counts what the AWS clients send, the way
//! the bill counts it. Attach one to every client with `courier_aws::Aws::watched`.
//!
//! Requests are named `Service.Operation` by [`request_name`], from the wire
//! alone, so that `courier-recorder` (which sees only the wire of the Lambda
//! processes in scripts/lambda-invoke-check) names them as the meter does.
//!
//! - DynamoDB: requests per operation, and read and write request units per
//!   table. Units are computed here from item sizes, by DynamoDB's rules,
//!   not asked of the service: moto answers `ReturnConsumedCapacity` with
//!   constants (1 for PutItem, 0.5 for GetItem, nothing for transactions)
//!   that have nothing to do with the items. The rules:
//!   - an item's size is its attribute names plus values (strings by UTF-8
//!     bytes, numbers by 1 byte per 2 significant digits plus 1, lists and
//!     maps 3 bytes plus 1 per element);
//!   - a write costs 1 unit per started KB of the larger of the item before
//!     and after (a delete: the item deleted; a failed condition: the item
//!     as it stands), at least 1; transactional writes cost twice that; a
//!     put of a new item or a delete of one also writes each global
//!     secondary index holding it (1 unit: the indexes here are KEYS_ONLY);
//!   - a read costs 1 unit per started 4 KB, half for an eventually
//!     consistent one, at least 1 (or 0.5) even when nothing is found; a
//!     Query adds the sizes of the items it read and rounds once, BatchGetItem
//!     rounds each item. Projections do not make a read cheaper.
//!
//!   The request shows the new item of a put; the response shows what a read
//!   found. What neither shows (the item an update or delete replaced, an
//!   item read through a projection, the rows a Query's filter dropped)
//!   comes from the sizes this meter saw earlier for the same keys, so a
//!   meter should watch a table from its start; an item it never saw counts
//!   as new. An update's new size is taken as the old one plus every value
//!   it writes (an upper bound; it only matters when it crosses a KB). What
//!   it cannot size at all (filtered rows of a partial Query, a projected
//!   row never seen) is counted in [`Usage::unsized_items`].
//! - SQS: requests as billed, each 64 KB of payload one request; receives
//!   that found nothing are counted apart (Lambda's pollers make them all
//!   day long, whatever the traffic), as are sends with a delay.
//! - API Gateway: PostToConnection calls, each 32 KB of data one message,
//!   and DeleteConnection calls.
//! - S3: requests by operation.
//!
//! Every attempt that got an answer counts, retries included: each is billed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use serde_json::{Map, Value};

use courier_aws::{Names, schema};

/// What the clients sent since the last [`Meter::take`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Requests by `Service.Operation` (`DynamoDB.PutItem`, `SQS.SendMessage`...).
    /// Receives that found nothing are `SQS.ReceiveMessage(empty)`.
    pub requests: BTreeMap<String, u64>,
    /// DynamoDB read request units, by table (the logical names of [`schema`]).
    pub read_units: BTreeMap<String, f64>,
    /// DynamoDB write request units, by table; index writes count on their table.
    pub write_units: BTreeMap<String, f64>,
    /// SQS requests as billed (64 KB chunks), empty receives left out.
    pub sqs_requests: u64,
    pub sqs_empty_receives: u64,
    /// SendMessage calls with a delay (the safety net's delayed checks).
    pub sqs_delayed_sends: u64,
    /// API Gateway messages sent through PostToConnection (32 KB each).
    pub push_messages: u64,
    /// Items whose size the meter had to guess (see the module docs).
    pub unsized_items: u64,
}

impl Usage {
    pub fn read_units_total(&self) -> f64 {
        self.read_units.values().fold(0.0, |a, b| a + b)
    }

    pub fn write_units_total(&self) -> f64 {
        self.write_units.values().fold(0.0, |a, b| a + b)
    }

    /// The requests to one service, by operation.
    pub fn requests_to(&self, service: &str) -> BTreeMap<String, u64> {
        let prefix = format!("{service}.");
        self.requests
            .iter()
            .filter_map(|(op, n)| op.strip_prefix(&prefix).map(|op| (op.to_owned(), *n)))
            .collect()
    }

    /// All requests to AWS, empty receives left out.
    pub fn request_count(&self) -> u64 {
        self.requests.iter().filter(|(op, _)| !op.ends_with("(empty)")).map(|(_, n)| n).sum()
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops = |service: &str| {
            self.requests_to(service).iter().map(|(op, n)| format!("{op} {n}")).collect::<Vec<_>>().join(", ")
        };
        let units = |by: &BTreeMap<String, f64>| {
            by.iter().map(|(t, u)| format!("{t} {u}")).collect::<Vec<_>>().join(", ")
        };
        write!(
            f,
            "DynamoDB [{}] RRU {} ({}) WRU {} ({}); SQS [{}] billed {}; API GW [{}] messages {}; S3 [{}]",
            ops("DynamoDB"),
            self.read_units_total(),
            units(&self.read_units),
            self.write_units_total(),
            units(&self.write_units),
            ops("SQS"),
            self.sqs_requests,
            ops("ApiGatewayManagementApi"),
            self.push_messages,
            ops("S3"),
        )
    }
}

/// What the meter knows of one table: its logical name, key and indexes' keys.
#[derive(Clone, Debug)]
struct TableInfo {
    logical: &'static str,
    keys: Vec<&'static str>,
    /// Each global secondary index's key attributes.
    indexes: Vec<Vec<&'static str>>,
}

#[derive(Debug, Default)]
struct State {
    usage: Usage,
    tables: HashMap<String, TableInfo>,
    /// The size of every item seen, by table and key.
    sizes: HashMap<String, HashMap<String, usize>>,
}

/// Counts requests and units; cheap to clone (clones share the counts).
#[derive(Clone, Debug, Default)]
pub struct Meter {
    state: Arc<Mutex<State>>,
}

impl Meter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learns the tables' keys and indexes, so that it can size what is written to them.
    pub fn watch(&self, names: &Names) {
        let mut state = self.lock();
        for table in schema::TABLES {
            let mut keys = vec![table.hash.name];
            keys.extend(table.range.map(|k| k.name));
            let indexes = table
                .indexes
                .iter()
                .map(|i| std::iter::once(i.hash.name).chain(i.range.map(|k| k.name)).collect())
                .collect();
            state
                .tables
                .insert(table.name_in(names).to_owned(), TableInfo { logical: table.logical, keys, indexes });
        }
    }

    /// The usage so far, resetting it (what the meter knows of item sizes stays).
    pub fn take(&self) -> Usage {
        std::mem::take(&mut self.lock().usage)
    }

    /// The usage so far.
    pub fn peek(&self) -> Usage {
        self.lock().usage.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's name, `Service.Operation` as the SDK names it
/// (`DynamoDB.PutItem`, `SQS.SendMessage`, `S3.HeadObject`,
/// `ApiGatewayManagementApi.PostToConnection`), from its method, path (with
/// the query) and `X-Amz-Target` header. S3 requests are path-style, as
/// courier_aws makes them; one this does not know is `S3.Unknown`. The meter
/// checks each name against the SDK's.
pub fn request_name(method: &str, path: &str, target: Option<&str>) -> String {
    // The JSON protocols name the operation in X-Amz-Target: `DynamoDB_20120810.PutItem`.
    if let Some((prefix, operation)) = target.and_then(|t| t.split_once('.')) {
        let service = match prefix {
            "DynamoDB_20120810" => "DynamoDB",
            "AmazonSQS" => "SQS",
            "AmazonSSM" => "SSM",
            other => other,
        };
        return format!("{service}.{operation}");
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    if path.contains("/@connections/") {
        let operation = match method {
            "POST" => "PostToConnection",
            "GET" => "GetConnection",
            "DELETE" => "DeleteConnection",
            _ => "Unknown",
        };
        return format!("ApiGatewayManagementApi.{operation}");
    }
    // The rest is S3's REST API on /bucket or /bucket/key. An object request
    // naming a subresource in its query is another operation (a multipart
    // upload's, an ACL's...); other query parameters (a presigned URL's
    // signature, the SDK's `x-id`, `response-*` overrides) leave it alone.
    let object = path.trim_start_matches('/').split_once('/').is_some_and(|(_, key)| !key.is_empty());
    let subresource = query.split('&').map(|p| p.split('=').next().unwrap_or_default()).any(|k| {
        let multipart = matches!(k, "uploads" | "uploadId");
        multipart || matches!(k, "acl" | "attributes" | "legal-hold" | "restore" | "retention" | "tagging")
    });
    let operation = match (method, object) {
        (_, true) if subresource => "Unknown",
        ("HEAD", true) => "HeadObject",
        ("GET", true) => "GetObject",
        ("PUT", true) => "PutObject",
        ("DELETE", true) => "DeleteObject",
        ("PUT", false) if query.is_empty() => "CreateBucket",
        _ => "Unknown",
    };
    format!("S3.{operation}")
}

/// `http://host:port/p?q` -> `/p?q`.
fn path_of(uri: &str) -> &str {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// What the answer is recorded with, kept from before transmit (the request
/// itself is gone by the answer): the request's name and body.
#[derive(Clone, Debug)]
struct Sent {
    name: String,
    body: Option<Vec<u8>>,
}

impl Storable for Sent {
    type Storer = StoreReplace<Self>;
}

impl Intercept for Meter {
    fn name(&self) -> &'static str {
        "Meter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let name =
            request_name(request.method(), path_of(request.uri()), request.headers().get("x-amz-target"));
        let body = request.body().bytes().map(<[u8]>::to_vec);
        cfg.interceptor_state().store_put(Sent { name, body });
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (Some(metadata), Some(sent)) = (cfg.load::<Metadata>(), cfg.load::<Sent>()) else {
            return Ok(());
        };
        // courier-recorder has only the wire to name requests by: every
        // metered test checks that the wire gives the SDK's names.
        let sdk = format!("{}.{}", metadata.service(), metadata.name());
        assert_eq!(sent.name, sdk, "meter::request_name misnames {sdk}");
        let (service, operation) = sdk.split_once('.').unwrap_or_default();
        let response = context.response();
        let answer = Answer {
            ok: response.status().as_u16() < 400,
            body: response.body().bytes().unwrap_or_default(),
        };
        self.lock().record(service, operation, sent.body.as_deref().unwrap_or_default(), &answer);
        Ok(())
    }
}

struct Answer<'a> {
    ok: bool,
    body: &'a [u8],
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// Units of `size` bytes in `unit`-byte chunks, at least one.
fn chunks(size: usize, unit: usize) -> u64 {
    size.div_ceil(unit).max(1) as u64
}

fn read_units(size: usize, consistent: bool) -> f64 {
    let units = chunks(size, 4096) as f64;
    if consistent { units } else { units / 2.0 }
}

fn write_units(size: usize) -> f64 {
    chunks(size, 1024) as f64
}

/// DynamoDB's size of a number: 1 byte per 2 significant digits, plus 1.
fn number_size(n: &str) -> usize {
    let mantissa = n.trim_start_matches('-').split(['e', 'E']).next().unwrap_or_default();
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len().max(1);
    significant.div_ceil(2) + 1
}

/// The size of one attribute value, in DynamoDB's JSON form (`{"S": "..."}`).
fn value_size(value: &Value) -> usize {
    let Some((kind, v)) = value.as_object().and_then(|o| o.iter().next()) else { return 0 };
    let strings =
        |v: &Value| v.as_array().map_or(0, |a| a.iter().filter_map(Value::as_str).map(str::len).sum());
    match kind.as_str() {
        "S" => v.as_str().map_or(0, str::len),
        "N" => v.as_str().map_or(1, number_size),
        "B" => v.as_str().map_or(0, |b| b.len() / 4 * 3),
        "BOOL" | "NULL" => 1,
        "SS" => strings(v),
        "BS" => strings(v) / 4 * 3,
        "NS" => v.as_array().map_or(0, |a| a.iter().filter_map(Value::as_str).map(number_size).sum()),
        "L" => 3 + v.as_array().map_or(0, |a| a.iter().map(|e| 1 + value_size(e)).sum::<usize>()),
        "M" => {
            3 + v.as_object().map_or(0, |m| m.iter().map(|(k, e)| 1 + k.len() + value_size(e)).sum::<usize>())
        }
        _ => 0,
    }
}

fn item_size(item: &Map<String, Value>) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

fn object(value: &Value) -> Option<&Map<String, Value>> {
    value.as_object()
}

/// The partition a Query reads, as key text: the value its key condition
/// gives `hash` (`hash = :v`, or `#h = :v` with `#h` naming it).
fn partition_value(request: &Value, hash: &str) -> Option<String> {
    let condition = request["KeyConditionExpression"].as_str()?;
    let (name, placeholder) = condition.split_once('=')?;
    let name = name.trim();
    let name = request["ExpressionAttributeNames"][name].as_str().unwrap_or(name);
    let value = &request["ExpressionAttributeValues"][placeholder.trim()];
    (name == hash && !value.is_null()).then(|| value.to_string())
}

impl State {
    fn count(&mut self, op: String) {
        *self.usage.requests.entry(op).or_default() += 1;
    }

    fn record(&mut self, service: &str, operation: &str, sent: &[u8], answer: &Answer<'_>) {
        match service {
            "DynamoDB" => {
                self.count(format!("DynamoDB.{operation}"));
                self.dynamodb(operation, &json(sent), answer);
            }
            "SQS" => self.sqs(operation, &json(sent), answer),
            "ApiGatewayManagementApi" => {
                self.count(format!("ApiGatewayManagementApi.{operation}"));
                if operation == "PostToConnection" && answer.ok {
                    self.usage.push_messages += chunks(sent.len(), 32 * 1024);
                }
            }
            _ => self.count(format!("{service}.{operation}")),
        }
    }

    fn sqs(&mut self, operation: &str, request: &Value, answer: &Answer<'_>) {
        let body_len = |v: &Value| v["MessageBody"].as_str().or(v["Body"].as_str()).map_or(0, str::len);
        match operation {
            "SendMessage" => {
                self.count("SQS.SendMessage".into());
                self.usage.sqs_requests += chunks(body_len(request), 64 * 1024);
                if request["DelaySeconds"].as_i64().unwrap_or(0) > 0 {
                    self.usage.sqs_delayed_sends += 1;
                }
            }
            "SendMessageBatch" => {
                self.count("SQS.SendMessageBatch".into());
                let total = request["Entries"].as_array().map_or(0, |e| e.iter().map(body_len).sum());
                self.usage.sqs_requests += chunks(total, 64 * 1024);
            }
            "ReceiveMessage" => {
                let response = json(answer.body);
                let messages = response["Messages"].as_array().cloned().unwrap_or_default();
                if messages.is_empty() {
                    self.count("SQS.ReceiveMessage(empty)".into());
                    self.usage.sqs_empty_receives += 1;
                } else {
                    self.count("SQS.ReceiveMessage".into());
                    self.usage.sqs_requests += chunks(messages.iter().map(body_len).sum(), 64 * 1024);
                }
            }
            other => {
                self.count(format!("SQS.{other}"));
                self.usage.sqs_requests += 1;
            }
        }
    }

    fn info(&self, table: &str) -> Option<TableInfo> {
        self.tables.get(table).cloned()
    }

    /// The logical name of a table, for the per-table counts.
    fn label(&self, table: &str) -> String {
        self.tables.get(table).map_or_else(|| table.to_owned(), |t| t.logical.to_owned())
    }

    /// A key's text: its attributes' values in the table's key order. (Each
    /// value is a JSON object, so the keys of one partition share a prefix
    /// that no other partition's keys have.)
    fn key_of(&self, table: &str, item: &Map<String, Value>) -> String {
        self.key_within(table, item, None)
    }

    /// [`Self::key_of`] from the key attributes in `only`, the others left
    /// blank: for items a projection left only part of their key.
    fn key_within(&self, table: &str, item: &Map<String, Value>, only: Option<&[&str]>) -> String {
        match self.tables.get(table) {
            Some(info) => info
                .keys
                .iter()
                .map(|k| match only {
                    Some(only) if !only.contains(k) => String::new(),
                    _ => item.get(*k).map(Value::to_string).unwrap_or_default(),
                })
                .collect(),
            None => {
                let mut parts: Vec<String> = item.iter().map(|(k, v)| format!("{k}={v}")).collect();
                parts.sort();
                parts.concat()
            }
        }
    }

    /// The sizes seen of the items of one partition (`hash`: its key text), by key.
    fn partition(&self, table: &str, hash: &str) -> Vec<(String, usize)> {
        let Some(items) = self.sizes.get(table) else { return Vec::new() };
        items.iter().filter(|(k, _)| k.starts_with(hash)).map(|(k, s)| (k.clone(), *s)).collect()
    }

    fn known_size(&self, table: &str, key: &str) -> Option<usize> {
        self.sizes.get(table).and_then(|t| t.get(key)).copied()
    }

    fn remember(&mut self, table: &str, key: String, size: usize) {
        self.sizes.entry(table.to_owned()).or_default().insert(key, size);
    }

    fn forget(&mut self, table: &str, key: &str) -> Option<usize> {
        self.sizes.get_mut(table).and_then(|t| t.remove(key))
    }

    fn add_read(&mut self, table: &str, units: f64) {
        *self.usage.read_units.entry(self.label(table)).or_default() += units;
    }

    fn add_write(&mut self, table: &str, units: f64) {
        *self.usage.write_units.entry(self.label(table)).or_default() += units;
    }

    /// The size of an item a read returned under `key`: the item itself,
    /// unless a projection cut it, in which case the size seen before.
    fn read_size(&mut self, table: &str, key: String, item: &Map<String, Value>, projected: bool) -> usize {
        if !projected {
            let size = item_size(item);
            self.remember(table, key, size);
            return size;
        }
        match self.known_size(table, &key) {
            Some(size) => size,
            None => {
                self.usage.unsized_items += 1;
                item_size(item)
            }
        }
    }

    /// The size of the `dropped` rows a Query read but its filter dropped,
    /// and how many of them it could not size. They are known when the Query
    /// read a whole partition (no sort key condition, no Limit, no paging):
    /// then they are the rows seen in that partition but not returned.
    fn filtered(&self, table: &str, request: &Value, returned: &[String], dropped: u64) -> (usize, u64) {
        if dropped == 0 {
            return (0, 0);
        }
        let whole = request.get("IndexName").is_none()
            && request.get("Limit").is_none()
            && request.get("ExclusiveStartKey").is_none()
            && !request["KeyConditionExpression"].as_str().unwrap_or(" AND ").contains(" AND ");
        let value = match self.tables.get(table) {
            Some(info) if whole => partition_value(request, info.keys[0]),
            _ => None,
        };
        let Some(value) = value else { return (0, dropped) };
        let rest: Vec<usize> = self
            .partition(table, &value)
            .into_iter()
            .filter(|(k, _)| !returned.contains(k))
            .map(|(_, size)| size)
            .collect();
        if rest.len() as u64 == dropped { (rest.iter().sum(), 0) } else { (0, dropped) }
    }

    /// Index writes for an item that appears or disappears: one per global
    /// secondary index whose keys it has.
    fn index_writes(&self, table: &str, item: Option<&Map<String, Value>>) -> f64 {
        let Some(info) = self.info(table) else { return 0.0 };
        info.indexes
            .iter()
            .filter(|keys| item.is_none_or(|item| keys.iter().all(|k| item.contains_key(*k))))
            .count() as f64
    }

    /// Units of a put of `item`; `old` is what the answer said it replaced, if it said.
    fn put(&mut self, table: &str, item: &Map<String, Value>, old: Option<usize>, ok: bool) -> f64 {
        let key = self.key_of(table, item);
        let old = old.or_else(|| self.known_size(table, &key));
        if !ok {
            return write_units(old.unwrap_or(0));
        }
        let new = item_size(item);
        let index = if old.is_none() { self.index_writes(table, Some(item)) } else { 0.0 };
        self.remember(table, key, new);
        write_units(old.unwrap_or(0).max(new)) + index
    }

    fn delete(&mut self, table: &str, key: &Map<String, Value>, old: Option<usize>, ok: bool) -> f64 {
        let text = self.key_of(table, key);
        let known = if ok { self.forget(table, &text) } else { self.known_size(table, &text) };
        let old = old.or(known);
        let index = if ok && old.is_some() { self.index_writes(table, None) } else { 0.0 };
        write_units(old.unwrap_or(0)) + index
    }

    fn update(&mut self, table: &str, request: &Value, response: &Value, ok: bool) -> f64 {
        let Some(key) = object(&request["Key"]) else { return 1.0 };
        let text = self.key_of(table, key);
        let returned = object(&response["Attributes"]).map(item_size);
        let old = match request["ReturnValues"].as_str() {
            Some("ALL_OLD") => returned.or_else(|| self.known_size(table, &text)),
            _ => self.known_size(table, &text),
        };
        if !ok {
            return write_units(old.unwrap_or(0));
        }
        let new = match request["ReturnValues"].as_str() {
            Some("ALL_NEW") => returned.unwrap_or(0),
            _ => {
                // Not shown: at most the old item (or the key, for an item the
                // update creates) plus every value the update writes.
                let values: usize = object(&request["ExpressionAttributeValues"])
                    .map_or(0, |v| v.values().map(value_size).sum());
                old.unwrap_or_else(|| item_size(key)) + values
            }
        };
        self.remember(table, text, new);
        write_units(old.unwrap_or(0).max(new))
    }

    fn dynamodb(&mut self, operation: &str, request: &Value, answer: &Answer<'_>) {
        let response = json(answer.body);
        let ok = answer.ok;
        let table = request["TableName"].as_str().unwrap_or_default().to_owned();
        let consistent = request["ConsistentRead"].as_bool().unwrap_or(false);
        let projected =
            request.get("ProjectionExpression").is_some() || request.get("AttributesToGet").is_some();
        match operation {
            "GetItem" if ok => {
                let key = object(&request["Key"]).map(|k| self.key_of(&table, k)).unwrap_or_default();
                let size = match object(&response["Item"]) {
                    Some(item) => self.read_size(&table, key, item, projected),
                    None => {
                        self.forget(&table, &key);
                        0
                    }
                };
                self.add_read(&table, read_units(size, consistent));
            }
            "BatchGetItem" if ok => {
                let Some(tables) = object(&request["RequestItems"]) else { return };
                for (table, wanted) in tables {
                    let consistent = wanted["ConsistentRead"].as_bool().unwrap_or(false);
                    let projected = wanted.get("ProjectionExpression").is_some();
                    let unprocessed: Vec<String> = response["UnprocessedKeys"][table]["Keys"]
                        .as_array()
                        .map(|keys| keys.iter().filter_map(object).map(|k| self.key_of(table, k)).collect())
                        .unwrap_or_default();
                    let found: Vec<Map<String, Value>> = response["Responses"][table]
                        .as_array()
                        .map(|items| items.iter().filter_map(object).cloned().collect())
                        .unwrap_or_default();
                    // A projection may leave the items only part of their
                    // key: they are matched to the keys asked for on that part.
                    let present: Vec<&str> = match (self.tables.get(table.as_str()), found.first()) {
                        (Some(info), Some(first)) => {
                            info.keys.iter().copied().filter(|k| first.contains_key(*k)).collect()
                        }
                        _ => Vec::new(),
                    };
                    let found: HashMap<String, Map<String, Value>> = found
                        .into_iter()
                        .map(|item| (self.key_within(table, &item, Some(&present)), item))
                        .collect();
                    let keys = wanted["Keys"].as_array().cloned().unwrap_or_default();
                    let mut units = 0.0;
                    for key in keys.iter().filter_map(object) {
                        let text = self.key_of(table, key);
                        if unprocessed.contains(&text) {
                            continue;
                        }
                        let size = match found.get(&self.key_within(table, key, Some(&present))) {
                            Some(item) => self.read_size(table, text, item, projected),
                            None => 0,
                        };
                        units += read_units(size, consistent);
                    }
                    self.add_read(table, units);
                }
            }
            "Query" | "Scan" if ok => {
                let index = request.get("IndexName").is_some();
                let items = response["Items"].as_array().cloned().unwrap_or_default();
                let mut size = 0;
                let mut returned = Vec::new();
                for item in items.iter().filter_map(object) {
                    if index {
                        // An index holds its own, smaller copies: their size is what is read.
                        size += item_size(item);
                    } else {
                        let key = self.key_of(&table, item);
                        returned.push(key.clone());
                        size += self.read_size(&table, key, item, projected);
                    }
                }
                let scanned = response["ScannedCount"].as_u64().unwrap_or(0);
                let count = response["Count"].as_u64().unwrap_or(items.len() as u64);
                let (dropped, unseen) =
                    self.filtered(&table, request, &returned, scanned.saturating_sub(count));
                self.usage.unsized_items += unseen;
                self.add_read(&table, read_units(size + dropped, consistent));
            }
            "PutItem" => {
                let Some(item) = object(&request["Item"]) else { return };
                let old = object(&response["Attributes"]).map(item_size);
                let units = self.put(&table, item, old, ok);
                self.add_write(&table, units);
            }
            "UpdateItem" => {
                let units = self.update(&table, request, &response, ok);
                self.add_write(&table, units);
            }
            "DeleteItem" => {
                let Some(key) = object(&request["Key"]) else { return };
                let old = object(&response["Attributes"]).map(item_size);
                let units = self.delete(&table, key, old, ok);
                self.add_write(&table, units);
            }
            "BatchWriteItem" => {
                let Some(tables) = object(&request["RequestItems"]) else { return };
                for (table, writes) in tables {
                    let unprocessed: Vec<&Value> = response["UnprocessedItems"][table]
                        .as_array()
                        .map(|w| w.iter().collect())
                        .unwrap_or_default();
                    let mut units = 0.0;
                    for write in writes.as_array().into_iter().flatten() {
                        if !ok || unprocessed.contains(&write) {
                            continue;
                        }
                        if let Some(item) = object(&write["PutRequest"]["Item"]) {
                            units += self.put(table, item, None, true);
                        } else if let Some(key) = object(&write["DeleteRequest"]["Key"]) {
                            units += self.delete(table, key, None, true);
                        }
                    }
                    self.add_write(table, units);
                }
            }
            "TransactWriteItems" => {
                // Each item at twice the units; a cancelled transaction is
                // charged too, and changes nothing the meter knows.
                for entry in request["TransactItems"].as_array().into_iter().flatten() {
                    let (kind, action) = match entry.as_object().and_then(|o| o.iter().next()) {
                        Some((kind, action)) => (kind.as_str(), action),
                        None => continue,
                    };
                    let table = action["TableName"].as_str().unwrap_or_default().to_owned();
                    let units = match kind {
                        "Put" => object(&action["Item"]).map_or(1.0, |item| self.put(&table, item, None, ok)),
                        "Update" => self.update(&table, action, &Value::Null, ok),
                        "Delete" => {
                            object(&action["Key"]).map_or(1.0, |key| self.delete(&table, key, None, ok))
                        }
                        _ => {
                            let key =
                                object(&action["Key"]).map(|k| self.key_of(&table, k)).unwrap_or_default();
                            write_units(self.known_size(&table, &key).unwrap_or(0))
                        }
                    };
                    self.add_write(&table, 2.0 * units);
                }
            }
            "TransactGetItems" if ok => {
                let entries = request["TransactItems"].as_array().cloned().unwrap_or_default();
                let found = response["Responses"].as_array().cloned().unwrap_or_default();
                for (entry, got) in entries.iter().zip(found.iter().chain(std::iter::repeat(&Value::Null))) {
                    let table = entry["Get"]["TableName"].as_str().unwrap_or_default().to_owned();
                    let key =
                        object(&entry["Get"]["Key"]).map(|k| self.key_of(&table, k)).unwrap_or_default();
                    let size = match object(&got["Item"]) {
                        Some(item) => self.read_size(&table, key, item, false),
                        None => 0,
                    };
                    self.add_read(&table, 2.0 * read_units(size, true));
                }
            }
            // The control plane (CreateTable, DescribeTable...) and failed reads cost no units.
            _ => {}
        }
    }
}

impl courier_aws::Watcher for Meter {
    fn interceptor(&self, names: &Names) -> courier_aws::SharedInterceptor {
        self.watch(names);
        courier_aws::SharedInterceptor::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_dynamodbs_rules() {
        assert_eq!(number_size("0"), 2);
        assert_eq!(number_size("1800000000000"), 2);
        assert_eq!(number_size("-12345"), 4);
        assert_eq!(number_size("1.50"), 2);
        let item: Map<String, Value> = serde_json::from_str(
            r#"{"id": {"S": "abc"}, "n": {"N": "42"}, "ok": {"BOOL": true},
                "l": {"L": [{"S": "xy"}, {"S": "z"}]}, "m": {"M": {"k": {"S": "v"}}}, "s": {"SS": ["a", "bc"]}}"#,
        )
        .unwrap();
        // id 2+3, n 1+2, ok 2+1, l 1+(3+1+2+1+1), m 1+(3+1+1+1), s 1+3
        assert_eq!(item_size(&item), 5 + 3 + 3 + 9 + 7 + 4);
    }

    #[test]
    fn units_round_up_per_kb_and_per_4_kb() {
        assert_eq!(write_units(0), 1.0);
        assert_eq!(write_units(1024), 1.0);
        assert_eq!(write_units(1025), 2.0);
        assert_eq!(read_units(4096, true), 1.0);
        assert_eq!(read_units(4097, true), 2.0);
        assert_eq!(read_units(100, false), 0.5);
    }

    fn answer(body: &str) -> Answer<'_> {
        Answer { ok: true, body: body.as_bytes() }
    }

    #[test]
    fn writes_are_charged_for_the_larger_of_before_and_after() {
        let meter = Meter::new();
        meter.watch(&Names::prefixed("t", "q", "e"));
        let mut state = meter.lock();
        let big = "x".repeat(3000);
        let put = serde_json::json!({
            "TableName": "t-messages",
            "Item": { "chatId": {"S": "c"}, "messageId": {"S": "m"}, "body": {"S": big} },
        });
        state.record("DynamoDB", "PutItem", put.to_string().as_bytes(), &answer("{}"));
        let mark = serde_json::json!({
            "TableName": "t-messages",
            "Key": { "chatId": {"S": "c"}, "messageId": {"S": "m"} },
            "UpdateExpression": "SET fannedOut = :t REMOVE body",
            "ExpressionAttributeValues": { ":t": {"BOOL": true} },
        });
        state.record("DynamoDB", "UpdateItem", mark.to_string().as_bytes(), &answer("{}"));
        assert_eq!(state.usage.write_units["Messages"], 3.0 + 3.0, "3 KB written, then 3 KB replaced");
        let participant = serde_json::json!({
            "RequestItems": { "t-participants": [
                { "PutRequest": { "Item": { "chatId": {"S": "c"}, "userId": {"S": "u"} } } },
            ] },
        });
        state.record("DynamoDB", "BatchWriteItem", participant.to_string().as_bytes(), &answer("{}"));
        assert_eq!(state.usage.write_units["Participants"], 2.0, "the row and its byUser index entry");
        let transaction = serde_json::json!({ "TransactItems": [
            { "Put": { "TableName": "t-devices", "Item": { "userId": {"S": "u"}, "deviceId": {"S": "d"} } } },
            { "Update": { "TableName": "t-devices", "Key": { "userId": {"S": "u"}, "deviceId": {"S": "#slots"} },
                          "ExpressionAttributeValues": { ":d": {"SS": ["d"]} } } },
        ] });
        state.record("DynamoDB", "TransactWriteItems", transaction.to_string().as_bytes(), &answer("{}"));
        assert_eq!(state.usage.write_units["Devices"], 4.0);
    }

    #[test]
    fn reads_round_per_item_in_batches_and_once_per_query() {
        let meter = Meter::new();
        meter.watch(&Names::prefixed("t", "q", "e"));
        let mut state = meter.lock();
        let row = |id: &str| serde_json::json!({ "inbox": {"S": "u#d"}, "messageId": {"S": id}, "body": {"S": "x".repeat(1500)} });
        let query = serde_json::json!({ "TableName": "t-inbox", "ConsistentRead": true });
        let found =
            serde_json::json!({ "Items": [row("1"), row("2"), row("3")], "Count": 3, "ScannedCount": 3 });
        state.record("DynamoDB", "Query", query.to_string().as_bytes(), &answer(&found.to_string()));
        assert_eq!(state.usage.read_units["Inbox"], 2.0, "4.5 KB in one query");
        let keys: Vec<Value> = ["1", "2", "3"]
            .iter()
            .map(|id| serde_json::json!({ "inbox": {"S": "u#d"}, "messageId": {"S": id} }))
            .collect();
        let get = serde_json::json!({ "RequestItems": { "t-inbox": {
            "Keys": keys, "ConsistentRead": true, "ProjectionExpression": "inbox, messageId" } } });
        let got = serde_json::json!({ "Responses": { "t-inbox": [keys[0], keys[1]] } });
        state.record("DynamoDB", "BatchGetItem", get.to_string().as_bytes(), &answer(&got.to_string()));
        assert_eq!(state.usage.read_units["Inbox"], 2.0 + 3.0, "one unit per key, found or not");
        assert_eq!(state.usage.unsized_items, 0, "the projected rows were sized by the query");
    }

    #[test]
    fn requests_are_named_from_the_wire() {
        let name = |method, path, target| request_name(method, path, target);
        assert_eq!(name("POST", "/", Some("DynamoDB_20120810.PutItem")), "DynamoDB.PutItem");
        assert_eq!(name("POST", "/", Some("AmazonSQS.SendMessage")), "SQS.SendMessage");
        assert_eq!(name("POST", "/", Some("AmazonSSM.GetParameter")), "SSM.GetParameter");
        let connection = "/check/@connections/Ab%3D";
        assert_eq!(name("POST", connection, None), "ApiGatewayManagementApi.PostToConnection");
        assert_eq!(name("DELETE", connection, None), "ApiGatewayManagementApi.DeleteConnection");
        assert_eq!(name("HEAD", "/media/a/b", None), "S3.HeadObject");
        assert_eq!(name("PUT", "/media/a?X-Amz-Signature=f&X-Amz-Expires=900", None), "S3.PutObject");
        let download = "/media/a?x-id=GetObject&response-content-disposition=attachment&X-Amz-Expires=900";
        assert_eq!(name("GET", download, None), "S3.GetObject");
        assert_eq!(name("PUT", "/media/a?partNumber=1&uploadId=u", None), "S3.Unknown");
        assert_eq!(name("PUT", "/media", None), "S3.CreateBucket");
        assert_eq!(name("PUT", "/media?cors", None), "S3.Unknown");
        assert_eq!(name("GET", "/media?list-type=2", None), "S3.Unknown");
        assert_eq!(path_of("http://127.0.0.1:5000/media/a?x=1"), "/media/a?x=1");
        assert_eq!(path_of("http://127.0.0.1:5000"), "/");
    }

    #[test]
    fn sqs_and_pushes_count_by_their_billing_chunks() {
        let meter = Meter::new();
        let mut state = meter.lock();
        let send = serde_json::json!({ "MessageBody": "x".repeat(70 * 1024), "DelaySeconds": 30 });
        state.record("SQS", "SendMessage", send.to_string().as_bytes(), &answer("{}"));
        state.record("SQS", "ReceiveMessage", b"{}", &answer("{}"));
        state.record("SQS", "ReceiveMessage", b"{}", &answer(r#"{"Messages": [{"Body": "x"}]}"#));
        state.record("ApiGatewayManagementApi", "PostToConnection", &[b'x'; 40 * 1024], &answer(""));
        assert_eq!(state.usage.sqs_requests, 2 + 1);
        assert_eq!(state.usage.sqs_empty_receives, 1);
        assert_eq!(state.usage.sqs_delayed_sends, 1);
        assert_eq!(state.usage.push_messages, 2);
    }
}
