//! `KeyStore` on SQLite: each ready device's keys, its one-time prekeys, and the hourly claim counters.

use std::collections::BTreeSet;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use super::rows::{from_json, id, json};
use courier_core::domain::InboxKey;
use courier_core::error::Result;
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{ClaimCount, DeviceKeys, KeyStore, KeyUpload, OneTimeKey, Uploaded};

#[async_trait]
impl KeyStore for SqliteStore {
    async fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        upload: &KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<Uploaded> {
        let owner = user.clone();
        let (user, device, upload) = (user.to_string(), device.to_string(), upload.clone());
        // One write: the checks and the change see the same rows, and the
        // writer runs one write at a time, so racing uploads cannot both pass the cap.
        let uploaded = self
            .write(move |c| {
                let stored: Option<String> = c
                    .prepare_cached(
                        "SELECT identity_key FROM device_keys WHERE user_id = ?1 AND device_id = ?2",
                    )?
                    .query_row([&user, &device], |r| r.get(0))
                    .optional()?;
                match (&stored, &upload.identity_key) {
                    (Some(stored), Some(given)) if stored != given => return Ok(Uploaded::IdentityMismatch),
                    (None, None) => return Ok(Uploaded::NotReady),
                    (None, Some(_)) if upload.signed_pre_key.is_none() => return Ok(Uploaded::NotReady),
                    _ => {}
                }
                let count = one_time_keys(c, &user, &device)?;
                let mut known = c.prepare_cached(
                    "SELECT 1 FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3",
                )?;
                // New keyIds, each counted once however often the upload names it.
                let mut new = BTreeSet::new();
                for key in &upload.one_time_pre_keys {
                    if !known.exists([&user, &device, &key.key_id])? {
                        new.insert(key.key_id.as_str());
                    }
                }
                let total = count + new.len() as u64;
                if total > max_one_time_keys as u64 {
                    return Ok(Uploaded::TooManyOneTimeKeys);
                }
                let signed = upload.signed_pre_key.as_ref().map(json);
                let fallback = upload.fallback_key.as_ref().map(json);
                if stored.is_none() {
                    c.prepare_cached(
                        "INSERT INTO device_keys (user_id, device_id, identity_key, signed_pre_key, fallback_key)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![user, device, upload.identity_key, signed, fallback])?;
                } else {
                    c.prepare_cached(
                        "UPDATE device_keys SET signed_pre_key = coalesce(?3, signed_pre_key),
                             fallback_key = coalesce(?4, fallback_key)
                         WHERE user_id = ?1 AND device_id = ?2",
                    )?
                    .execute(params![user, device, signed, fallback])?;
                }
                let mut put = c.prepare_cached(
                    "INSERT OR IGNORE INTO one_time_keys (user_id, device_id, key_id, public_key)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for key in &upload.one_time_pre_keys {
                    put.execute([&user, &device, &key.key_id, &key.public_key])?;
                }
                Ok(Uploaded::Stored { one_time_keys: total, became_ready: stored.is_none() })
            })
            .await;
        self.inner.keys.forget(&owner);
        uploaded
    }

    async fn device_keys(&self, users: &[UserId]) -> Result<Vec<DeviceKeys>> {
        let mut keys = Vec::new();
        let mut missing = Vec::new();
        for user in users {
            match self.inner.keys.get(user) {
                Some(known) => keys.extend(known),
                None => missing.push(user.clone()),
            }
        }
        if !missing.is_empty() {
            let epoch = self.inner.keys.epoch();
            let read = self.read(move |c| device_keys_of(c, missing)).await?;
            keys.extend(read.iter().flat_map(|(_, theirs)| theirs.iter().cloned()));
            self.inner.keys.fill(epoch, read);
        }
        Ok(keys)
    }

    async fn one_time_key_count(&self, user: &UserId, device: &DeviceId) -> Result<u64> {
        let (user, device) = (user.to_string(), device.to_string());
        self.read(move |c| one_time_keys(c, &user, &device)).await
    }

    async fn claim_one_time_key(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(Option<OneTimeKey>, u64)> {
        let (user, device) = (user.to_string(), device.to_string());
        // The select and the delete are one statement in the one writer: no
        // other claim runs between them, so no key goes out twice.
        self.write(move |c| {
            let claimed = c
                .prepare_cached(
                    "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id =
                         (SELECT key_id FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2
                          ORDER BY key_id LIMIT 1)
                     RETURNING key_id, public_key",
                )?
                .query_row([&user, &device], |r| Ok(OneTimeKey { key_id: r.get(0)?, public_key: r.get(1)? }))
                .optional()?;
            let left = match claimed {
                Some(_) => one_time_keys(c, &user, &device)?,
                None => 0,
            };
            Ok((claimed, left))
        })
        .await
    }

    async fn count_claims(&self, claimer: &InboxKey, hour: i64, counts: &[ClaimCount]) -> Result<bool> {
        if counts.iter().any(|c| c.amount > c.limit) {
            return Ok(false);
        }
        let (claimer, counts) = (claimer.key(), counts.to_vec());
        // All in one write: every counter is checked before any is moved
        // (the writer is the only one, so nothing moves in between). A row
        // of another hour counts as zero and starts over.
        self.write(move |c| {
            // Other claimers' rows of hours gone by, found through the hour
            // index (a seek when there are none): so the table holds about
            // one hour of claims without a clean-up job.
            c.prepare_cached("DELETE FROM key_claims WHERE hour < ?1")?.execute([hour])?;
            let mut used = c.prepare_cached(
                "SELECT used FROM key_claims WHERE claimer = ?1 AND scope = ?2 AND hour = ?3",
            )?;
            for count in &counts {
                let now: i64 = used
                    .query_row(params![claimer, count.scope, hour], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                if now as u64 + count.amount > count.limit {
                    return Ok(false);
                }
            }
            let mut add = c.prepare_cached(
                "INSERT INTO key_claims (claimer, scope, hour, used) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (claimer, scope) DO UPDATE SET
                     used = CASE WHEN hour = excluded.hour THEN used + excluded.used ELSE excluded.used END,
                     hour = excluded.hour",
            )?;
            for count in &counts {
                add.execute(params![claimer, count.scope, hour, count.amount as i64])?;
            }
            Ok(true)
        })
        .await
    }

    async fn remove_keys(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let owner = user.clone();
        let (user, device) = (user.to_string(), device.to_string());
        let removed = self
            .write(move |c| {
                c.prepare_cached("DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2")?
                    .execute([&user, &device])?;
                c.prepare_cached("DELETE FROM device_keys WHERE user_id = ?1 AND device_id = ?2")?
                    .execute([&user, &device])?;
                Ok(())
            })
            .await;
        self.inner.keys.forget(&owner);
        removed
    }
}

fn one_time_keys(c: &Connection, user: &str, device: &str) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT count(*) FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2")?
        .query_row([user, device], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Each user's ready devices' keys (what the keys cache holds).
fn device_keys_of(c: &Connection, users: Vec<UserId>) -> rusqlite::Result<Vec<(UserId, Vec<DeviceKeys>)>> {
    let mut stmt = c.prepare_cached(
        "SELECT device_id, identity_key, signed_pre_key, fallback_key FROM device_keys WHERE user_id = ?1
         ORDER BY device_id",
    )?;
    let mut all = Vec::with_capacity(users.len());
    for user in users {
        let rows = stmt.query_map([user.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut keys = Vec::new();
        for row in rows {
            let (device, identity_key, signed, fallback) = row?;
            keys.push(DeviceKeys {
                user: user.clone(),
                device: id(device)?,
                identity_key,
                signed_pre_key: from_json(&signed)?,
                fallback_key: fallback.as_deref().map(from_json).transpose()?,
            });
        }
        all.push((user, keys));
    }
    Ok(all)
}
