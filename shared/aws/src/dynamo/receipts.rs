//! `ReceiptStore`: one Receipts row per (chat, participant) holding the three markers.
//!
//! A marker moves only forward, by a conditional update. DynamoDB has no
//! `max` in an update, so one update moves every marker given while the
//! condition holds that each of them is behind; when one is not, the
//! answer carries the row as it stood (ReturnValuesOnConditionCheckFailure),
//! and the update goes again with only the markers still behind. A marker
//! ahead never blocks another, and racing moves end at the furthest.

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};

use super::rows::{ReceiptRow, from_item};
use super::{DynamoTables, Item, key, s};
use crate::sdk_error;
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, MessageId, UserId};
use courier_core::ports::{Markers, ReceiptStore};

/// Each lost race leaves fewer markers to move, or finds them moved: three
/// markers cannot lose more than a few times in a row.
const ADVANCE_ATTEMPTS: usize = 8;

/// The markers' attributes (`read` is one of DynamoDB's reserved words, so
/// every name goes through a placeholder).
const DELIVERED: &str = "delivered";
const READ: &str = "read";
const PRIVATE_READ: &str = "privateRead";

#[async_trait]
impl ReceiptStore for DynamoTables {
    async fn advance(&self, chat: &ChatId, user: &UserId, to: &Markers) -> Result<Option<Markers>> {
        let mut behind: Vec<(&str, &MessageId)> =
            [(DELIVERED, &to.delivered), (READ, &to.read), (PRIVATE_READ, &to.private_read)]
                .into_iter()
                .filter_map(|(name, id)| id.as_ref().map(|id| (name, id)))
                .collect();
        for _ in 0..ADVANCE_ATTEMPTS {
            if behind.is_empty() {
                return Ok(None);
            }
            let mut update = self
                .client
                .update_item()
                .table_name(&self.names.receipts_table)
                .set_key(Some(key([("chatId", chat.as_str()), ("userId", user.as_str())])))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            let mut sets = Vec::new();
            let mut conditions = Vec::new();
            for (i, (name, id)) in behind.iter().enumerate() {
                sets.push(format!("#m{i} = :m{i}"));
                conditions.push(format!("(attribute_not_exists(#m{i}) OR #m{i} < :m{i})"));
                update = update
                    .expression_attribute_names(format!("#m{i}"), *name)
                    .expression_attribute_values(format!(":m{i}"), s(id.as_str()));
            }
            let moved = update
                .update_expression(format!("SET {}", sets.join(", ")))
                .condition_expression(conditions.join(" AND "))
                .send()
                .await;
            match moved {
                Ok(out) => return markers(out.attributes.unwrap_or_default()).map(Some),
                Err(e) => match e.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                        // Keep only what is still behind the row as it stood.
                        let stood = failed.item().cloned().map(markers).transpose()?.unwrap_or_default();
                        behind.retain(|(name, id)| {
                            let current = match *name {
                                DELIVERED => &stood.delivered,
                                READ => &stood.read,
                                _ => &stood.private_read,
                            };
                            current.as_ref().is_none_or(|c| c < *id)
                        });
                    }
                    _ => return Err(sdk_error(e)),
                },
            }
        }
        Err(Error::unavailable("receipt markers kept moving; retry"))
    }

    async fn receipts(&self, chat: &ChatId) -> Result<Vec<(UserId, Markers)>> {
        let items: Vec<Item> = self
            .client
            .query()
            .table_name(&self.names.receipts_table)
            .consistent_read(true)
            .key_condition_expression("chatId = :c")
            .expression_attribute_values(":c", s(chat.as_str()))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        items
            .into_iter()
            .map(|i| from_item::<ReceiptRow>(i).map(|r| (r.user_id.clone(), Markers::from(r))))
            .collect()
    }

    async fn remove_receipts(&self, chat: &ChatId, user: &UserId) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.names.receipts_table)
            .set_key(Some(key([("chatId", chat.as_str()), ("userId", user.as_str())])))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

fn markers(item: Item) -> Result<Markers> {
    from_item::<ReceiptRow>(item).map(Markers::from)
}
