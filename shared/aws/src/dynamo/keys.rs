//! `KeyStore`: the key directory in the Keys table, one partition per user.
//!
//! Sort keys (`entry`) keep three item types apart, so each read touches only
//! its own:
//!
//! - `bundle#DEVICE`: a ready device's identity key, signed prekey and
//!   fallback key, and `oneTimeKeys`, the count of its one-time prekeys.
//!   `device_keys` is one Query per user over `bundle#`.
//! - `otk#DEVICE#KEYID`: one one-time prekey.
//! - `claims#USER#DEVICE#HOUR#SCOPE`: an hour's claim counter, with a TTL.
//!
//! The count on the bundle is what caps a device at 200 one-time prekeys: an
//! upload adds to it in the same transaction as its key puts, on condition
//! that it stays within the cap. A claim first takes one off the count (a
//! conditional update, which also tells how many are left), then deletes one
//! key by a conditional delete; a delete that finds its key gone lost a race
//! and tries another. Two claims never delete the same key, and no more
//! claims get past the count than there are keys.
//!
//! TransactWriteItems takes 100 items, and an upload may carry 100 new keys
//! besides the bundle's write. The bundle's write and the first 99 keys go in
//! one transaction, which counts every new key of the upload; the rest follow
//! in transactions that check the bundle is still there (so no one-time
//! prekey ever outlives its bundle). Should the process die in between, the
//! count is above the keys stored by those few; a claim that then finds no
//! key returns none, and its decrement has set that right.
//! (The other way round, a claim that dies between its two writes leaves a
//! key uncounted, which a later upload's count brings back into play.)

use std::collections::HashSet;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{ConditionCheck, Put, ReturnValue, TransactWriteItem, Update};
use rand::Rng;
use tracing::instrument;

use super::batch::delete_request;
use super::rows::{BundleRow, OneTimeKeyRow, from_item, to_item};
use super::{DynamoTables, Item, cancellation_reasons, condition_failed, in_parallel, key, n, s};
use crate::{SdkFailure, sdk_error};
use courier_core::domain::InboxKey;
use courier_core::error::{Error, Result};
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{ClaimCount, DeviceKeys, KeyStore, KeyUpload, OneTimeKey, Uploaded};

const BUNDLE_PREFIX: &str = "bundle#";
/// TransactWriteItems takes at most this many items.
const TRANSACTION_ITEMS: usize = 100;
/// Uploads that lose a race (a concurrent upload or claim changed the
/// bundle between its read and the transaction) read again this often.
const UPLOAD_ATTEMPTS: usize = 8;
/// A claim picks at random among this many of the device's first keys, so
/// claims racing for one device seldom pick the same one.
const CLAIM_CANDIDATES: i32 = 10;
/// Deletes a claim tries before giving up. Each lost one means another
/// claim took a key, so many claims of one device at once still finish.
const CLAIM_ATTEMPTS: usize = 32;
const HOUR_SECS: i64 = 60 * 60;

fn bundle_entry(device: &DeviceId) -> String {
    format!("{BUNDLE_PREFIX}{device}")
}

/// `#` is not allowed in a deviceId, so one device's prefix never covers another's keys.
fn one_time_prefix(device: &DeviceId) -> String {
    format!("otk#{device}#")
}

fn one_time_entry(device: &DeviceId, key_id: &str) -> String {
    format!("{}{key_id}", one_time_prefix(device))
}

fn owner(inbox: &InboxKey) -> &UserId {
    match inbox {
        InboxKey::Device(user, _) | InboxKey::Pending(user) => user,
    }
}

fn attribute<T: serde::Serialize>(value: &T) -> Result<aws_sdk_dynamodb::types::AttributeValue> {
    serde_dynamo::to_attribute_value(value).map_err(Error::internal)
}

/// The `oneTimeKeys` count in an item, 0 if it has none.
fn count_in(item: Option<&Item>) -> u64 {
    item.and_then(|i| i.get("oneTimeKeys"))
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The keyIds whose puts failed their condition (`reasons` in the order of
/// `keys`): stored meanwhile by another upload, so ignored like those stored before.
fn taken_keys(reasons: &[String], keys: &[&OneTimeKey]) -> HashSet<String> {
    reasons
        .iter()
        .zip(keys)
        .filter(|(r, _)| *r == "ConditionalCheckFailed")
        .map(|(_, k)| k.key_id.clone())
        .collect()
}

/// Whether DynamoDB cancelled a transaction for throttling: worth a retry
/// later, by the caller, not at once.
fn throttled(reasons: &[String]) -> bool {
    reasons.iter().any(|r| r == "ThrottlingError" || r == "ProvisionedThroughputExceeded")
}

#[async_trait]
impl KeyStore for DynamoTables {
    #[instrument(level = "debug", skip_all, fields(user = %user, device = %device, one_time = upload.one_time_pre_keys.len()))]
    async fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        upload: &KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<Uploaded> {
        let table = &self.names.keys_table;
        let bundle_key = key([("userId", user.as_str()), ("entry", &bundle_entry(device))]);
        // The new keyIds, each once however often the upload names it, less
        // those already stored: they are ignored and do not count.
        let mut seen = HashSet::new();
        let mut fresh: Vec<_> =
            upload.one_time_pre_keys.iter().filter(|k| seen.insert(k.key_id.as_str())).collect();
        if !fresh.is_empty() {
            let lookups = fresh
                .iter()
                .map(|k| key([("userId", user.as_str()), ("entry", &one_time_entry(device, &k.key_id))]))
                .collect();
            let stored: HashSet<String> = self
                .get_batches(table, lookups, Some("entry"))
                .await?
                .into_iter()
                .filter_map(|mut i| i.remove("entry")?.as_s().ok().cloned())
                .collect();
            fresh.retain(|k| !stored.contains(&one_time_entry(device, &k.key_id)));
        }

        for _ in 0..UPLOAD_ATTEMPTS {
            let bundle: Option<BundleRow> = self.bundle(&bundle_key).await?;
            if let (Some(b), Some(given)) = (&bundle, &upload.identity_key)
                && &b.identity_key != given
            {
                return Ok(Uploaded::IdentityMismatch);
            }
            // The device's identity key, and the signed prekey a first upload must carry.
            let (identity, first_signed) = match (&bundle, &upload.identity_key, &upload.signed_pre_key) {
                (Some(b), _, _) => (b.identity_key.as_str(), None),
                (None, Some(identity), Some(signed)) => (identity.as_str(), Some(signed)),
                (None, _, _) => return Ok(Uploaded::NotReady),
            };
            let count = bundle.as_ref().map_or(0, |b| b.one_time_keys);
            if count + fresh.len() as u64 > max_one_time_keys as u64 {
                return Ok(Uploaded::TooManyOneTimeKeys);
            }
            // The bundle's write, on condition that the bundle is still as read.
            let write = match first_signed {
                Some(signed) => {
                    let row = BundleRow {
                        user_id: user.clone(),
                        entry: bundle_entry(device),
                        device_id: device.clone(),
                        identity_key: identity.to_owned(),
                        signed_pre_key: signed.clone(),
                        fallback_key: upload.fallback_key.clone(),
                        one_time_keys: fresh.len() as u64,
                    };
                    let put = Put::builder()
                        .table_name(table)
                        .set_item(Some(to_item(&row)?))
                        .condition_expression("attribute_not_exists(entry)")
                        .build()
                        .map_err(Error::internal)?;
                    TransactWriteItem::builder().put(put).build()
                }
                None => {
                    let mut update = Update::builder()
                        .table_name(table)
                        .set_key(Some(bundle_key.clone()))
                        // The identity key never changes, so this also says the bundle is still there.
                        .expression_attribute_values(":identity", s(identity));
                    let mut sets = Vec::new();
                    if let Some(signed) = &upload.signed_pre_key {
                        sets.push("signedPreKey = :signed");
                        update = update.expression_attribute_values(":signed", attribute(signed)?);
                    }
                    if let Some(fallback) = &upload.fallback_key {
                        sets.push("fallbackKey = :fallback");
                        update = update.expression_attribute_values(":fallback", attribute(fallback)?);
                    }
                    let mut expression = String::new();
                    if !sets.is_empty() {
                        expression = format!("SET {}", sets.join(", "));
                    }
                    if fresh.is_empty() {
                        update = update.condition_expression("identityKey = :identity");
                    } else {
                        expression.push_str(" ADD oneTimeKeys :added");
                        let room = (max_one_time_keys - fresh.len()) as i64;
                        update = update
                            .condition_expression("identityKey = :identity AND oneTimeKeys <= :room")
                            .expression_attribute_values(":added", n(fresh.len() as i64))
                            .expression_attribute_values(":room", n(room));
                    }
                    if expression.is_empty() {
                        // The same identity key and nothing new: nothing to write.
                        return Ok(Uploaded::Stored { one_time_keys: count, became_ready: false });
                    }
                    TransactWriteItem::builder()
                        .update(update.update_expression(expression.trim()).build().map_err(Error::internal)?)
                        .build()
                }
            };
            let (first, rest) = fresh.split_at(fresh.len().min(TRANSACTION_ITEMS - 1));
            let mut transaction = self.client.transact_write_items().transact_items(write);
            for k in first {
                transaction = transaction
                    .transact_items(TransactWriteItem::builder().put(self.key_put(user, device, k)?).build());
            }
            let written = transaction.send().await;
            if let Err(e) = written {
                let reasons: Vec<String> = cancellation_reasons(&e).into_iter().map(str::to_owned).collect();
                if reasons.is_empty() {
                    return Err(sdk_error(e));
                }
                // Keys another upload stored meanwhile: ignored, like those stored before.
                let taken = taken_keys(&reasons[1..], first);
                if !taken.is_empty() {
                    fresh.retain(|k| !taken.contains(&k.key_id));
                } else if throttled(&reasons) {
                    return Err(Error::unavailable(SdkFailure(e)));
                } else if !(reasons[0] == "ConditionalCheckFailed"
                    || reasons.iter().any(|r| r == "TransactionConflict"))
                {
                    return Err(sdk_error(e));
                }
                tracing::debug!(?reasons, "key upload lost a race; reading again");
                continue;
            }
            for chunk in rest.chunks(TRANSACTION_ITEMS - 1) {
                self.put_more_keys(&bundle_key, identity, user, device, chunk).await?;
            }
            let one_time_keys = self.one_time_key_count(user, device).await?;
            return Ok(Uploaded::Stored { one_time_keys, became_ready: bundle.is_none() });
        }
        Err(Error::unavailable("key upload kept losing races"))
    }

    async fn device_keys(&self, users: &[UserId]) -> Result<Vec<DeviceKeys>> {
        let queries = users.iter().map(|user| async move {
            let items: Vec<Item> = self
                .client
                .query()
                .table_name(&self.names.keys_table)
                .consistent_read(true)
                .key_condition_expression("userId = :u AND begins_with(entry, :bundle)")
                .expression_attribute_values(":u", s(user.as_str()))
                .expression_attribute_values(":bundle", s(BUNDLE_PREFIX))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(sdk_error)?;
            items
                .into_iter()
                .map(|i| {
                    let b: BundleRow = from_item(i)?;
                    Ok(DeviceKeys {
                        user: b.user_id,
                        device: b.device_id,
                        identity_key: b.identity_key,
                        signed_pre_key: b.signed_pre_key,
                        fallback_key: b.fallback_key,
                    })
                })
                .collect::<Result<Vec<_>>>()
        });
        Ok(in_parallel(queries.collect()).await?.into_iter().flatten().collect())
    }

    async fn one_time_key_count(&self, user: &UserId, device: &DeviceId) -> Result<u64> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.keys_table)
            .set_key(Some(key([("userId", user.as_str()), ("entry", &bundle_entry(device))])))
            .projection_expression("oneTimeKeys")
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(count_in(out.item.as_ref()))
    }

    #[instrument(level = "debug", skip_all, fields(user = %user, device = %device))]
    async fn claim_one_time_key(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(Option<OneTimeKey>, u64)> {
        let table = &self.names.keys_table;
        // Take one off the count first: past it, no claim goes looking.
        let reserved = self
            .client
            .update_item()
            .table_name(table)
            .set_key(Some(key([("userId", user.as_str()), ("entry", &bundle_entry(device))])))
            .update_expression("ADD oneTimeKeys :minus")
            .condition_expression("oneTimeKeys > :zero")
            .expression_attribute_values(":minus", n(-1))
            .expression_attribute_values(":zero", n(0))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        let left = match reserved {
            Ok(out) => count_in(out.attributes.as_ref()),
            Err(e) if condition_failed(&e) => return Ok((None, 0)),
            Err(e) => return Err(sdk_error(e)),
        };
        for _ in 0..CLAIM_ATTEMPTS {
            let out = self
                .client
                .query()
                .table_name(table)
                .consistent_read(true)
                .key_condition_expression("userId = :u AND begins_with(entry, :prefix)")
                .expression_attribute_values(":u", s(user.as_str()))
                .expression_attribute_values(":prefix", s(one_time_prefix(device)))
                .projection_expression("userId, entry")
                .limit(CLAIM_CANDIDATES)
                .send()
                .await
                .map_err(sdk_error)?;
            let mut candidates = out.items.unwrap_or_default();
            if candidates.is_empty() {
                // The count was above the keys (see the module's notes); it is one closer now.
                return Ok((None, left));
            }
            let pick = candidates.swap_remove(rand::rng().random_range(0..candidates.len()));
            let deleted = self
                .client
                .delete_item()
                .table_name(table)
                .set_key(Some(pick))
                .condition_expression("attribute_exists(entry)")
                .return_values(ReturnValue::AllOld)
                .send()
                .await;
            match deleted {
                Ok(out) => {
                    let row: OneTimeKeyRow = from_item(out.attributes.unwrap_or_default())?;
                    return Ok((Some(OneTimeKey { key_id: row.key_id, public_key: row.public_key }), left));
                }
                // Another claim took it first.
                Err(e) if condition_failed(&e) => continue,
                Err(e) => return Err(sdk_error(e)),
            }
        }
        Err(Error::unavailable("one-time prekey claims kept colliding"))
    }

    /// One conditional update per counter, in one transaction when there are
    /// several (a getKeys of a user's devices: the total and one per
    /// device), so a refusal by any counter moves none.
    async fn count_claims(&self, claimer: &InboxKey, hour: i64, counts: &[ClaimCount]) -> Result<bool> {
        if counts.iter().any(|c| c.amount > c.limit) {
            return Ok(false);
        }
        let table = &self.names.keys_table;
        let update = |count: &ClaimCount| {
            let entry = format!("claims#{}#{hour}#{}", claimer.key(), count.scope);
            Update::builder()
                .table_name(table)
                .set_key(Some(key([("userId", owner(claimer).as_str()), ("entry", &entry)])))
                .update_expression("ADD used :amount SET expiresAt = :expires")
                .condition_expression("attribute_not_exists(used) OR used <= :room")
                .expression_attribute_values(":amount", n(count.amount as i64))
                .expression_attribute_values(":room", n((count.limit - count.amount) as i64))
                // An hour after the hour ends: TTL may lag, but the hour is in the key.
                .expression_attribute_values(":expires", n((hour + 2) * HOUR_SECS))
                .build()
                .map_err(Error::internal)
        };
        if let [count] = counts {
            let u = update(count)?;
            let counted = self
                .client
                .update_item()
                .table_name(u.table_name())
                .set_key(Some(u.key().clone()))
                .update_expression(u.update_expression())
                .set_condition_expression(u.condition_expression().map(str::to_owned))
                .set_expression_attribute_values(u.expression_attribute_values().cloned())
                .send()
                .await;
            return match counted {
                Ok(_) => Ok(true),
                Err(e) if condition_failed(&e) => Ok(false),
                Err(e) => Err(sdk_error(e)),
            };
        }
        let mut transaction = self.client.transact_write_items();
        for count in counts {
            transaction =
                transaction.transact_items(TransactWriteItem::builder().update(update(count)?).build());
        }
        match transaction.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let reasons = cancellation_reasons(&e);
                if reasons.contains(&"ConditionalCheckFailed") {
                    Ok(false)
                } else if reasons.iter().any(|r| matches!(*r, "TransactionConflict" | "ThrottlingError")) {
                    // Two getKeys of one claimer at once: worth another try.
                    Err(Error::unavailable(SdkFailure(e)))
                } else {
                    Err(sdk_error(e))
                }
            }
        }
    }

    /// The one-time prekeys go first and the bundle last, so no one-time
    /// prekey outlives its bundle (uploads keep that too): a device without
    /// a bundle has nothing to remove, which is what a new device's connect
    /// finds, for one read. Until the end the device still counts as having
    /// keys, and none can be handed out after the bundle is gone (a claim
    /// starts at the bundle's count).
    async fn remove_keys(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let table = &self.names.keys_table;
        let bundle_key = key([("userId", user.as_str()), ("entry", &bundle_entry(device))]);
        let found = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(bundle_key.clone()))
            .projection_expression("entry")
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        if found.item.is_none() {
            return Ok(());
        }
        let keys: Vec<Item> = self
            .client
            .query()
            .table_name(table)
            .consistent_read(true)
            .key_condition_expression("userId = :u AND begins_with(entry, :prefix)")
            .expression_attribute_values(":u", s(user.as_str()))
            .expression_attribute_values(":prefix", s(one_time_prefix(device)))
            .projection_expression("userId, entry")
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        let deletes = keys.into_iter().map(delete_request).collect::<Result<Vec<_>>>()?;
        self.write_batches(table, deletes).await?;
        self.client
            .delete_item()
            .table_name(table)
            .set_key(Some(bundle_key))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

impl DynamoTables {
    /// Puts keys of an upload past its first transaction, in a transaction
    /// that checks the bundle they belong to is still there: keys removed
    /// meanwhile (removeDevice, deleteAccount) get none of these back, so no
    /// one-time prekey outlives its bundle and `remove_keys` may stop at a
    /// missing bundle. The first transaction has counted them already.
    async fn put_more_keys(
        &self,
        bundle_key: &Item,
        identity: &str,
        user: &UserId,
        device: &DeviceId,
        keys: &[&OneTimeKey],
    ) -> Result<()> {
        let mut keys = keys.to_vec();
        for _ in 0..UPLOAD_ATTEMPTS {
            if keys.is_empty() {
                return Ok(());
            }
            let check = ConditionCheck::builder()
                .table_name(&self.names.keys_table)
                .set_key(Some(bundle_key.clone()))
                .condition_expression("identityKey = :identity")
                .expression_attribute_values(":identity", s(identity))
                .build()
                .map_err(Error::internal)?;
            let mut transaction = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().condition_check(check).build());
            for k in &keys {
                transaction = transaction
                    .transact_items(TransactWriteItem::builder().put(self.key_put(user, device, k)?).build());
            }
            let Err(e) = transaction.send().await else { return Ok(()) };
            let reasons: Vec<String> = cancellation_reasons(&e).into_iter().map(str::to_owned).collect();
            if reasons.is_empty() {
                return Err(sdk_error(e));
            }
            if reasons[0] == "ConditionalCheckFailed" {
                tracing::debug!("the device's keys were removed during its upload");
                return Ok(());
            }
            let taken = taken_keys(&reasons[1..], &keys);
            if !taken.is_empty() {
                keys.retain(|k| !taken.contains(&k.key_id));
            } else if throttled(&reasons) {
                return Err(Error::unavailable(SdkFailure(e)));
            } else if !reasons.iter().any(|r| r == "TransactionConflict") {
                return Err(sdk_error(e));
            }
        }
        Err(Error::unavailable("key upload kept losing races"))
    }

    async fn bundle(&self, bundle_key: &Item) -> Result<Option<BundleRow>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.keys_table)
            .set_key(Some(bundle_key.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(from_item).transpose()
    }

    /// A one-time prekey's put, on condition that its keyId is not stored yet.
    fn key_put(&self, user: &UserId, device: &DeviceId, k: &OneTimeKey) -> Result<Put> {
        Put::builder()
            .table_name(&self.names.keys_table)
            .set_item(Some(to_item(&OneTimeKeyRow {
                user_id: user.clone(),
                entry: one_time_entry(device, &k.key_id),
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
            })?))
            .condition_expression("attribute_not_exists(entry)")
            .build()
            .map_err(Error::internal)
    }
}
