//! `DeviceStore` on SQLite: device rows, the connection each holds, the
//! device limit, and each device's push registration and wake mark.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use std::sync::Mutex;

use super::SqliteStore;
use super::inboxes::Inboxes;
use super::messages::drop_inbox;
use super::rows::{from_json, id, json};
use courier_core::domain::{Device, Millis};
use courier_core::error::Result;
use courier_core::ids::{ConnectionId, DeviceId, UserId};
use courier_core::ports::{Connected, DeviceStore, PushRegistration};

#[async_trait]
impl DeviceStore for SqliteStore {
    async fn connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Connected> {
        let owner = user.clone();
        let (user, device, connection) = (user.to_string(), device.to_string(), connection.to_string());
        let inboxes = self.inner.inboxes.clone();
        let connected = self.write(move |c| {
            let existing: Option<(Option<String>, Millis)> = c
                .query_row(
                    "SELECT connection_id, last_seen FROM devices WHERE user_id = ?1 AND device_id = ?2",
                    [&user, &device],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            // A device unseen for too long has expired: it comes back as a new one, inbox and all gone.
            let existing = match existing {
                Some((_, last_seen)) if last_seen < expired_before => {
                    delete_device_rows(c, &inboxes, &user, &device)?;
                    None
                }
                other => other,
            };
            let outcome = match existing {
                Some((previous, _)) => {
                    // A connection answers any wake-up: the next one may go at once.
                    c.execute(
                        "UPDATE devices SET connection_id = ?3, last_seen = ?4, woken_at = NULL
                         WHERE user_id = ?1 AND device_id = ?2",
                        params![user, device, connection, now],
                    )?;
                    let replaced = previous.filter(|p| p != &connection);
                    if let Some(old) = &replaced {
                        c.execute("DELETE FROM connections WHERE connection_id = ?1", [old])?;
                    }
                    Connected::Ok {
                        new_device: false,
                        first_device: false,
                        replaced: replaced.map(id).transpose()?,
                    }
                }
                None => {
                    let live: i64 = c.query_row(
                        "SELECT count(*) FROM devices WHERE user_id = ?1 AND last_seen >= ?2",
                        params![user, expired_before],
                        |r| r.get(0),
                    )?;
                    if live as usize >= max_devices {
                        return Ok(Connected::DeviceLimit);
                    }
                    // No push registration: a device registered anew registers again.
                    c.execute(
                        "INSERT INTO devices (user_id, device_id, connection_id, last_seen) VALUES (?1, ?2, ?3, ?4)",
                        params![user, device, connection, now],
                    )?;
                    Connected::Ok { new_device: true, first_device: live == 0, replaced: None }
                }
            };
            c.execute(
                "INSERT OR REPLACE INTO connections (connection_id, user_id, device_id) VALUES (?1, ?2, ?3)",
                [&connection, &user, &device],
            )?;
            Ok(outcome)
        })
        .await;
        self.inner.devices.forget(&owner);
        connected
    }

    async fn disconnect(&self, connection: &ConnectionId, now: Millis) -> Result<()> {
        let connection = connection.to_string();
        let owner = self
            .write(move |c| {
                let owner: Option<(String, String)> = c
                    .query_row(
                        "SELECT user_id, device_id FROM connections WHERE connection_id = ?1",
                        [&connection],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((user, device)) = owner else { return Ok(None) };
                c.execute("DELETE FROM connections WHERE connection_id = ?1", [&connection])?;
                c.execute(
                    "UPDATE devices SET connection_id = NULL, last_seen = ?4
                 WHERE user_id = ?1 AND device_id = ?2 AND connection_id = ?3",
                    params![user, device, connection, now],
                )?;
                Ok(Some(id::<UserId>(user)?))
            })
            .await;
        match &owner {
            Ok(Some(user)) => self.inner.devices.forget(user),
            Ok(None) => {}
            Err(_) => self.inner.devices.forget_all(),
        }
        owner.map(drop)
    }

    async fn devices_of(&self, users: &[UserId], expired_before: Millis) -> Result<Vec<Device>> {
        let mut devices = Vec::new();
        let mut missing = Vec::new();
        for user in users {
            match self.inner.devices.get(user) {
                Some(known) => devices.extend(known),
                None => missing.push(user.clone()),
            }
        }
        if !missing.is_empty() {
            let epoch = self.inner.devices.epoch();
            let read = self.read(move |c| every_device_of(c, missing)).await?;
            devices.extend(read.iter().flat_map(|(_, theirs)| theirs.iter().cloned()));
            self.inner.devices.fill(epoch, read);
        }
        devices.retain(|d| d.last_seen >= expired_before);
        Ok(devices)
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<Option<Device>> {
        let (owner, user, device) = (user.clone(), user.clone(), device.clone());
        let inboxes = self.inner.inboxes.clone();
        let removed = self
            .write(move |c| {
                let found: Option<(Option<String>, Millis, Option<String>)> = c
                    .query_row(
                        "SELECT connection_id, last_seen, push FROM devices WHERE user_id = ?1 AND device_id = ?2",
                        [user.as_str(), device.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let Some((connection, last_seen, push)) = found else { return Ok(None) };
                delete_device_rows(c, &inboxes, user.as_str(), device.as_str())?;
                Ok(Some(Device {
                    user,
                    id: device,
                    connection: connection.map(id).transpose()?,
                    last_seen,
                    push: registration(push)?,
                }))
            })
            .await;
        self.inner.devices.forget(&owner);
        removed
    }

    async fn expire_devices(&self, before: Millis) -> Result<Vec<Device>> {
        let inboxes = self.inner.inboxes.clone();
        let expired = self
            .write(move |c| {
                let stale: Vec<(String, String, Millis, Option<String>)> = c
                    .prepare(
                        "SELECT user_id, device_id, last_seen, push FROM devices
                         WHERE last_seen < ?1 AND connection_id IS NULL",
                    )?
                    .query_map([before], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut expired = Vec::with_capacity(stale.len());
                for (user, device, last_seen, push) in stale {
                    delete_device_rows(c, &inboxes, &user, &device)?;
                    expired.push(Device {
                        user: id(user)?,
                        id: id(device)?,
                        connection: None,
                        last_seen,
                        push: registration(push)?,
                    });
                }
                Ok(expired)
            })
            .await;
        self.inner.devices.forget_all();
        expired
    }

    async fn register_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        registration: &PushRegistration,
    ) -> Result<bool> {
        let (owner, user, device, body) =
            (user.clone(), user.to_string(), device.to_string(), json(registration));
        let stored = self
            .write(move |c| {
                // The mark belonged to the old registration's wake-up.
                c.execute(
                    "UPDATE devices SET push = ?3, woken_at = NULL WHERE user_id = ?1 AND device_id = ?2",
                    params![user, device, body],
                )
                .map(|n| n > 0)
            })
            .await;
        self.inner.devices.forget(&owner);
        stored
    }

    async fn unregister_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        expected: Option<&PushRegistration>,
    ) -> Result<Option<PushRegistration>> {
        let (owner, user, device, expected) =
            (user.clone(), user.to_string(), device.to_string(), expected.cloned());
        let removed = self
            .write(move |c| {
                let found: Option<Option<String>> = c
                    .query_row(
                        "SELECT push FROM devices WHERE user_id = ?1 AND device_id = ?2",
                        [&user, &device],
                        |r| r.get(0),
                    )
                    .optional()?;
                // Compared as values, not as text: the JSON of one registration may be spelt two ways.
                let Some(current) = registration(found.flatten())? else { return Ok(None) };
                if expected.as_ref().is_some_and(|e| e != &current) {
                    return Ok(None);
                }
                c.execute(
                    "UPDATE devices SET push = NULL, woken_at = NULL WHERE user_id = ?1 AND device_id = ?2",
                    [&user, &device],
                )?;
                Ok(Some(current))
            })
            .await;
        if !matches!(removed, Ok(None)) {
            self.inner.devices.forget(&owner);
        }
        removed
    }

    async fn begin_wake(
        &self,
        user: &UserId,
        device: &DeviceId,
        now: Millis,
        not_before: Millis,
    ) -> Result<Option<PushRegistration>> {
        let (user, device) = (user.to_string(), device.to_string());
        // One statement, so two wake jobs racing for a device cannot both
        // pass the check. The mark is not part of a cached `Device`, so the
        // cache is left as it is.
        self.write(move |c| {
            let push: Option<String> = c
                .prepare_cached(
                    "UPDATE devices SET woken_at = ?3
                     WHERE user_id = ?1 AND device_id = ?2 AND push IS NOT NULL AND connection_id IS NULL
                       AND (woken_at IS NULL OR woken_at < ?4)
                     RETURNING push",
                )?
                .query_row(params![user, device, now, not_before], |r| r.get(0))
                .optional()?;
            registration(push)
        })
        .await
    }

    async fn end_wake(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let (user, device) = (user.to_string(), device.to_string());
        self.write(move |c| {
            c.execute(
                "UPDATE devices SET woken_at = NULL WHERE user_id = ?1 AND device_id = ?2",
                [&user, &device],
            )
            .map(drop)
        })
        .await
    }
}

/// A device row's `push` column as the registration it holds.
fn registration(column: Option<String>) -> rusqlite::Result<Option<PushRegistration>> {
    column.as_deref().map(from_json).transpose()
}

/// Each user's device rows, expired or not (what the device cache holds).
fn every_device_of(c: &Connection, users: Vec<UserId>) -> rusqlite::Result<Vec<(UserId, Vec<Device>)>> {
    let mut stmt =
        c.prepare_cached("SELECT device_id, connection_id, last_seen, push FROM devices WHERE user_id = ?1")?;
    let mut all = Vec::with_capacity(users.len());
    for user in users {
        let rows = stmt.query_map([user.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Millis>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut devices = Vec::new();
        for row in rows {
            let (device, connection, last_seen, push) = row?;
            let connection = connection.map(id).transpose()?;
            let push = registration(push)?;
            devices.push(Device { user: user.clone(), id: id(device)?, connection, last_seen, push });
        }
        all.push((user, devices));
    }
    Ok(all)
}

fn delete_device_rows(
    c: &Connection,
    inboxes: &Mutex<Inboxes>,
    user: &str,
    device: &str,
) -> rusqlite::Result<()> {
    drop_inbox(c, inboxes, &format!("{user}#{device}"))?;
    c.execute("DELETE FROM connections WHERE user_id = ?1 AND device_id = ?2", [user, device])?;
    c.execute("DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2", [user, device])?;
    Ok(())
}
