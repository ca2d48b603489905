//! `QuotaStore` on SQLite: one row per user and quota, holding the current day's use.

use async_trait::async_trait;
use rusqlite::params;

use super::SqliteStore;
use courier_core::error::Result;
use courier_core::ids::UserId;
use courier_core::ports::{Quota, QuotaStore};

#[async_trait]
impl QuotaStore for SqliteStore {
    async fn charge(&self, user: &UserId, quota: Quota, day: i64, amount: u64, limit: u64) -> Result<bool> {
        if amount > limit {
            return Ok(false);
        }
        let (user, amount, limit) = (user.to_string(), amount as i64, limit as i64);
        // One statement: a row of an earlier day starts over, and the update
        // happens only while the day's use stays within the limit.
        self.write(move |c| {
            let changed = c.execute(
                "INSERT INTO quotas (user_id, quota, day, used) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, quota) DO UPDATE SET
                     used = CASE WHEN day = excluded.day THEN used + excluded.used ELSE excluded.used END,
                     day = excluded.day
                 WHERE CASE WHEN day = excluded.day THEN used + excluded.used ELSE excluded.used END <= ?5",
                params![user, quota.name(), day, amount, limit],
            )?;
            Ok(changed == 1)
        })
        .await
    }
}
