//! `QuotaStore`: each quota's day and use as two attributes of the user's
//! slots row in Devices, so a charge is one conditional update and no table
//! more.

use async_trait::async_trait;

use super::devices::SLOTS;
use super::{DynamoTables, condition_failed, key, n};
use crate::sdk_error;
use courier_core::error::Result;
use courier_core::ids::UserId;
use courier_core::ports::{Quota, QuotaStore};

#[async_trait]
impl QuotaStore for DynamoTables {
    async fn charge(&self, user: &UserId, quota: Quota, day: i64, amount: u64, limit: u64) -> Result<bool> {
        if amount > limit {
            return Ok(false);
        }
        let (day_attr, used_attr) = (format!("{}Day", quota.name()), format!("{}Used", quota.name()));
        let update = || {
            self.client
                .update_item()
                .table_name(&self.names.devices_table)
                .set_key(Some(key([("userId", user.as_str()), ("deviceId", SLOTS)])))
                .expression_attribute_names("#day", &day_attr)
                .expression_attribute_names("#used", &used_attr)
                .expression_attribute_values(":day", n(day))
                .expression_attribute_values(":n", n(amount as i64))
        };
        // Today's row: add while it stays within the limit. Else, a row of an
        // earlier day (or none) starts over. Two racing first charges of a
        // day: one starts the day, the other finds today's row on its retry.
        for _ in 0..3 {
            let added = update()
                .update_expression("SET #used = #used + :n")
                .condition_expression("#day = :day AND #used <= :room")
                .expression_attribute_values(":room", n((limit - amount) as i64))
                .send()
                .await;
            match added {
                Ok(_) => return Ok(true),
                Err(e) if condition_failed(&e) => {}
                Err(e) => return Err(sdk_error(e)),
            }
            let started = update()
                .update_expression("SET #day = :day, #used = :n")
                .condition_expression("attribute_not_exists(#day) OR #day <> :day")
                .send()
                .await;
            match started {
                Ok(_) => return Ok(true),
                Err(e) if condition_failed(&e) => {}
                Err(e) => return Err(sdk_error(e)),
            }
        }
        // Today's row exists and has no room for this much.
        Ok(false)
    }
}
