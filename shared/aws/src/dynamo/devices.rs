//! `DeviceStore`: device rows (with their push registration and wake mark) capped by a per-user slots row, and the connection rows that find them.

use std::collections::HashSet;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnValue, TransactWriteItem, Update};
use tracing::instrument;

use super::rows::{ConnectionRow, DeviceRow, from_item, to_item};
use super::{DynamoTables, Item, cancellation_reasons, condition_failed, in_parallel, key, n, s, ttl_secs};
use crate::sdk_error;
use courier_core::domain::{DAY_MS, Device, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{ConnectionId, DeviceId, UserId};
use courier_core::ports::{Connected, DeviceStore, PushRegistration};

/// A device row lives this long past its last sighting (the default device
/// expiry; reads decide liveness from `lastSeen`, the TTL only cleans up).
const DEVICE_TTL_MS: Millis = 30 * DAY_MS;
/// API Gateway closes a connection after 2 h; the row outlives it a little.
const CONNECTION_TTL_MS: Millis = (2 * 60 + 10) * 60 * 1000;
/// Lost races (a concurrent connect of the same device) are retried this often.
const CONNECT_ATTEMPTS: usize = 8;
/// Slots to free before claiming one, and the cap.
struct Slots {
    max: usize,
    stale: Vec<String>,
}

/// The `deviceId` of each user's slots row: the set of their registered
/// devices, which caps them atomically (and their quota counters, see
/// `quotas`). `#` is not allowed in a deviceId.
pub(super) const SLOTS: &str = "#slots";

#[async_trait]
impl DeviceStore for DynamoTables {
    #[instrument(level = "debug", skip_all, fields(user = %user, device = %device))]
    async fn connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Connected> {
        for _ in 0..CONNECT_ATTEMPTS {
            if let Some(outcome) =
                self.try_connect(user, device, connection, now, max_devices, expired_before).await?
            {
                return Ok(outcome);
            }
            tracing::debug!("connect lost a race; looking again");
        }
        Err(Error::unavailable("connect kept losing races"))
    }

    async fn disconnect(&self, connection: &ConnectionId, now: Millis) -> Result<()> {
        let connections = &self.names.connections_table;
        let out = self
            .client
            .get_item()
            .table_name(connections)
            .set_key(Some(key([("connectionId", connection.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        // Not filtered on expiresAt: a row past it names a connection that is
        // surely closed, and unbinding its device is exactly what is due.
        let Some(item) = out.item else { return Ok(()) };
        let row: ConnectionRow = from_item(item)?;
        // The row stays for TTL to delete, which is free: a closed connection's
        // id never comes back, and should a late $disconnect or 410 name it
        // again, the condition below makes that a no-op, as for any old row.
        let unbound = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", row.user_id.as_str()), ("deviceId", row.device_id.as_str())])))
            .update_expression("REMOVE connectionId SET lastSeen = :now, expiresAt = :exp")
            .condition_expression("connectionId = :c")
            .expression_attribute_values(":c", s(connection.as_str()))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(ttl_secs(now + DEVICE_TTL_MS)))
            .send()
            .await;
        match unbound {
            // A newer connection owns the device (or it was removed): nothing to unbind.
            Err(e) if condition_failed(&e) => Ok(()),
            other => other.map(drop).map_err(sdk_error),
        }
    }

    async fn devices_of(&self, users: &[UserId], expired_before: Millis) -> Result<Vec<Device>> {
        let calls = users.iter().map(|u| self.user_devices(u, expired_before));
        let per_user = in_parallel(calls.collect()).await?;
        Ok(per_user.into_iter().flatten().collect())
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<Option<Device>> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(old) = out.attributes.filter(|a| !a.is_empty()) else { return Ok(None) };
        let removed: Device = from_item::<DeviceRow>(old)?.into();
        self.delete_device_data(user, device, removed.connection.as_ref()).await?;
        Ok(Some(removed))
    }

    #[instrument(level = "debug", skip_all)]
    async fn expire_devices(&self, before: Millis) -> Result<Vec<Device>> {
        let stale = "lastSeen < :before AND attribute_not_exists(connectionId)";
        let mut pages = self
            .client
            .scan()
            .table_name(&self.names.devices_table)
            .filter_expression(stale)
            .expression_attribute_values(":before", n(before))
            .into_paginator()
            .send();
        let mut expired = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(sdk_error)? {
            let rows = page.items.unwrap_or_default().into_iter().map(from_item::<DeviceRow>);
            let deletions = rows.map(|row| async move {
                let row = row?;
                // Conditional, so a device that reconnected since the scan
                // stays; the row as deleted, so a registration changed since
                // the scan is the one released.
                let deleted = self
                    .client
                    .delete_item()
                    .table_name(&self.names.devices_table)
                    .set_key(Some(key([
                        ("userId", row.user_id.as_str()),
                        ("deviceId", row.device_id.as_str()),
                    ])))
                    .condition_expression(stale)
                    .expression_attribute_values(":before", n(before))
                    .return_values(ReturnValue::AllOld)
                    .send()
                    .await;
                let row = match deleted {
                    Ok(out) => match out.attributes.filter(|a| !a.is_empty()) {
                        Some(old) => from_item::<DeviceRow>(old)?,
                        None => row,
                    },
                    Err(e) if condition_failed(&e) => return Ok(None),
                    Err(e) => return Err(sdk_error(e)),
                };
                self.delete_device_data(&row.user_id, &row.device_id, None).await?;
                Ok::<_, Error>(Some(Device::from(row)))
            });
            expired.extend(in_parallel(deletions.collect()).await?.into_iter().flatten());
        }
        Ok(expired)
    }

    async fn register_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        registration: &PushRegistration,
    ) -> Result<bool> {
        let stored = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            // The wake mark was the old registration's.
            .update_expression("SET #push = :push REMOVE wokenAt")
            // An update writes a row where there is none: a removed device stays removed.
            .condition_expression("attribute_exists(deviceId)")
            .expression_attribute_names("#push", PUSH)
            .expression_attribute_values(":push", registration_value(registration)?)
            .send()
            .await;
        match stored {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn unregister_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        expected: Option<&PushRegistration>,
    ) -> Result<Option<PushRegistration>> {
        let update = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .update_expression("REMOVE #push, wokenAt")
            .expression_attribute_names("#push", PUSH)
            .return_values(ReturnValue::AllOld);
        // Equality holds between maps too: a registration replaced since the
        // caller read it (a new token, say) is not the one removed.
        let update = match expected {
            Some(expected) => update
                .condition_expression("#push = :expected")
                .expression_attribute_values(":expected", registration_value(expected)?),
            None => update.condition_expression("attribute_exists(#push)"),
        };
        match update.send().await {
            Ok(out) => match out.attributes.filter(|a| !a.is_empty()) {
                Some(old) => Ok(from_item::<DeviceRow>(old)?.push),
                None => Ok(None),
            },
            Err(e) if condition_failed(&e) => Ok(None),
            Err(e) => Err(sdk_error(e)),
        }
    }

    /// One conditional write: two Wake jobs racing for a device cannot both
    /// pass, and the registration comes back with it, so no read goes first.
    async fn begin_wake(
        &self,
        user: &UserId,
        device: &DeviceId,
        now: Millis,
        not_before: Millis,
    ) -> Result<Option<PushRegistration>> {
        let begun = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .update_expression("SET wokenAt = :now")
            .condition_expression(
                "attribute_exists(#push) AND attribute_not_exists(connectionId) \
                 AND (attribute_not_exists(wokenAt) OR wokenAt < :not_before)",
            )
            .expression_attribute_names("#push", PUSH)
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":not_before", n(not_before))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match begun {
            Ok(out) => match out.attributes {
                Some(row) => Ok(from_item::<DeviceRow>(row)?.push),
                None => Ok(None),
            },
            Err(e) if condition_failed(&e) => Ok(None),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn end_wake(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let ended = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .update_expression("REMOVE wokenAt")
            .condition_expression("attribute_exists(deviceId)")
            .send()
            .await;
        match ended {
            // Removed meanwhile: nothing to clear.
            Err(e) if condition_failed(&e) => Ok(()),
            other => other.map(drop).map_err(sdk_error),
        }
    }
}

/// The attribute holding a device's push registration; always through an
/// expression attribute name, as DynamoDB reserves many plain words.
const PUSH: &str = "push";

/// A registration as the map the device row stores.
fn registration_value(registration: &PushRegistration) -> Result<AttributeValue> {
    serde_dynamo::to_attribute_value(registration).map_err(Error::internal)
}

impl DynamoTables {
    /// Deletes what belongs to a device whose row is already gone: its inbox and its connection row.
    async fn delete_device_data(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: Option<&ConnectionId>,
    ) -> Result<()> {
        if let Some(c) = connection {
            self.delete_connection(c).await?;
        }
        self.delete_device_inbox(user, device).await
    }

    async fn delete_connection(&self, connection: &ConnectionId) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.names.connections_table)
            .set_key(Some(key([("connectionId", connection.as_str())])))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn device_row(&self, user: &UserId, device: &DeviceId) -> Result<Option<DeviceRow>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(from_item).transpose()
    }

    /// The live devices of one user (consistent, so a device just registered counts).
    async fn user_devices(&self, user: &UserId, expired_before: Millis) -> Result<Vec<Device>> {
        let items: Vec<Item> = self
            .client
            .query()
            .table_name(&self.names.devices_table)
            .consistent_read(true)
            .key_condition_expression("userId = :u")
            .filter_expression("lastSeen >= :cutoff")
            .expression_attribute_values(":u", s(user.as_str()))
            .expression_attribute_values(":cutoff", n(expired_before))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        items.into_iter().map(|i| from_item::<DeviceRow>(i).map(Device::from)).collect()
    }

    /// Registers a new device within the user's device limit. The device row
    /// and its entry in the user's slots row are written in one transaction
    /// whose condition caps the slots, so connects racing from several
    /// devices cannot overshoot the limit (a count read first could). Returns
    /// `Some(false)` at the limit and `None` when the same device raced us.
    async fn claim_slot(&self, row: &DeviceRow, slots: Slots) -> Result<Option<bool>> {
        let table = &self.names.devices_table;
        let slots_key = key([("userId", row.user_id.as_str()), ("deviceId", SLOTS)]);
        if !slots.stale.is_empty() {
            self.client
                .update_item()
                .table_name(table)
                .set_key(Some(slots_key.clone()))
                .update_expression("DELETE devices :stale")
                .expression_attribute_values(":stale", AttributeValue::Ss(slots.stale))
                .send()
                .await
                .map_err(sdk_error)?;
        }
        let claim = Update::builder()
            .table_name(table)
            .set_key(Some(slots_key))
            .update_expression("ADD devices :d")
            .condition_expression("attribute_not_exists(devices) OR size(devices) < :max")
            .expression_attribute_values(":d", AttributeValue::Ss(vec![row.device_id.to_string()]))
            .expression_attribute_values(":max", n(slots.max as i64))
            .build()
            .map_err(Error::internal)?;
        let put = Put::builder()
            .table_name(table)
            .set_item(Some(to_item(row)?))
            .condition_expression("attribute_not_exists(deviceId)")
            .build()
            .map_err(Error::internal)?;
        let written = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(claim).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        let Err(e) = written else { return Ok(Some(true)) };
        match cancellation_reasons(&e).as_slice() {
            ["ConditionalCheckFailed", _] => Ok(Some(false)),
            [_, "ConditionalCheckFailed"] => Ok(None),
            r if r.contains(&"TransactionConflict") => Ok(None),
            _ => Err(sdk_error(e)),
        }
    }

    /// The user's live devices and the slots held by devices no longer live.
    /// The slots row is read before the device rows, so a claim committing
    /// in between is never taken for stale.
    async fn slots(&self, user: &UserId, max: usize, expired_before: Millis) -> Result<(Vec<Device>, Slots)> {
        let held = self
            .client
            .get_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", SLOTS)])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?
            .item
            .and_then(|mut item| item.remove("devices"))
            .and_then(|set| set.as_ss().ok().cloned())
            .unwrap_or_default();
        let live = self.user_devices(user, expired_before).await?;
        let ids: HashSet<&str> = live.iter().map(|d| d.id.as_str()).collect();
        let stale = held.into_iter().filter(|d| !ids.contains(d.as_str())).collect();
        Ok((live, Slots { max, stale }))
    }

    /// One try of `connect`; `None` means a concurrent change won a race and the caller should look again.
    async fn try_connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Option<Connected>> {
        let devices = &self.names.devices_table;
        let device_key = key([("userId", user.as_str()), ("deviceId", device.as_str())]);
        let mut existing = self.device_row(user, device).await?;
        let mut inbox_cleared = false;
        // A device unseen for too long has expired: it comes back as a new one, inbox and all gone.
        if let Some(stale) = existing.take_if(|d| d.last_seen < expired_before) {
            let deleted = self
                .client
                .delete_item()
                .table_name(devices)
                .set_key(Some(device_key.clone()))
                .condition_expression("lastSeen < :cutoff")
                .expression_attribute_values(":cutoff", n(expired_before))
                .send()
                .await;
            match deleted {
                Ok(_) => {
                    self.delete_device_data(user, device, stale.connection_id.as_ref()).await?;
                    inbox_cleared = true;
                }
                Err(e) if condition_failed(&e) => return Ok(None),
                Err(e) => return Err(sdk_error(e)),
            }
        }

        let (first_device, slots) = match existing {
            Some(_) => (false, None),
            None => {
                let (live, slots) = self.slots(user, max_devices, expired_before).await?;
                let live = live.len();
                if live >= max_devices {
                    return Ok(Some(Connected::DeviceLimit));
                }
                // The TTL may have taken the row of an expired device before
                // the clean-up job saw it; its inbox must not outlive it.
                if !inbox_cleared {
                    self.delete_device_inbox(user, device).await?;
                }
                (live == 0, Some(slots))
            }
        };

        // The connection row goes first: a $disconnect (or a 410 on push) can
        // then always find the device it must unbind.
        let row = ConnectionRow {
            connection_id: connection.clone(),
            user_id: user.clone(),
            device_id: device.clone(),
            connected_at: now,
            expires_at: ttl_secs(now + CONNECTION_TTL_MS),
        };
        self.client
            .put_item()
            .table_name(&self.names.connections_table)
            .set_item(Some(to_item(&row)?))
            .send()
            .await
            .map_err(sdk_error)?;

        let expires = ttl_secs(now + DEVICE_TTL_MS);
        if let Some(slots) = slots {
            let row = DeviceRow {
                user_id: user.clone(),
                device_id: device.clone(),
                connection_id: Some(connection.clone()),
                last_seen: now,
                expires_at: expires,
                // New, or back after it expired: registered anew, with no registration.
                push: None,
                woken_at: None,
            };
            return Ok(match self.claim_slot(&row, slots).await? {
                Some(true) => Some(Connected::Ok { new_device: true, first_device, replaced: None }),
                Some(false) => Some(Connected::DeviceLimit),
                None => None,
            });
        }

        // The old connection comes from the update itself, not the earlier
        // read, so two racing connects each learn what they replaced.
        let updated = self
            .client
            .update_item()
            .table_name(devices)
            .set_key(Some(device_key))
            // A wake-up is answered once the device connects; the
            // registration stays, for the next time it is away.
            .update_expression("SET connectionId = :c, lastSeen = :now, expiresAt = :exp REMOVE wokenAt")
            .condition_expression("attribute_exists(deviceId)")
            .expression_attribute_values(":c", s(connection.as_str()))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(expires))
            .return_values(ReturnValue::UpdatedOld)
            .send()
            .await;
        let old = match updated {
            Ok(out) => out.attributes.unwrap_or_default(),
            Err(e) if condition_failed(&e) => return Ok(None),
            Err(e) => return Err(sdk_error(e)),
        };
        let replaced = match old.get("connectionId") {
            Some(AttributeValue::S(old)) if old != connection.as_str() => {
                Some(ConnectionId::try_from(old.as_str()).map_err(Error::internal)?)
            }
            _ => None,
        };
        if let Some(old) = &replaced {
            self.delete_connection(old).await?;
        }
        Ok(Some(Connected::Ok { new_device: false, first_device: false, replaced }))
    }
}
