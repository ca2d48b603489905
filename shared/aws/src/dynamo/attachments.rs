//! `AttachmentStore`: one row per upload, with the set of chats it was sent in.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;

use super::batch::delete_request;
use super::rows::{AttachmentRow, from_item, to_item};
use super::{DynamoTables, Item, condition_failed, in_parallel, key, s, unique};
use crate::sdk_error;
use courier_core::error::{Error, Result};
use courier_core::ids::{AttachmentId, ChatId, UserId};
use courier_core::ports::{Attachment, AttachmentStore};

/// Attachment rows get no `expiresAt`, although the table has TTL on: one
/// may be sent in a message any time after its upload, and must outlive
/// that message's inbox rows; the port passes no time to filter reads by.
#[async_trait]
impl AttachmentStore for DynamoTables {
    async fn put_attachment(&self, a: &Attachment) -> Result<()> {
        let put = self
            .client
            .put_item()
            .table_name(&self.names.attachments_table)
            .set_item(Some(to_item(&AttachmentRow::from(a))?))
            .condition_expression("attribute_not_exists(attachmentId)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Err(Error::internal(format!("attachment {} exists", a.id))),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn attachment(&self, id: &AttachmentId) -> Result<Option<Attachment>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.attachments_table)
            .set_key(Some(key([("attachmentId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(|i| from_item::<AttachmentRow>(i).map(Attachment::from)).transpose()
    }

    async fn link(&self, ids: &[AttachmentId], chat: &ChatId) -> Result<()> {
        let links = unique(ids).into_iter().map(|id| async move {
            let linked = self
                .client
                .update_item()
                .table_name(&self.names.attachments_table)
                .set_key(Some(key([("attachmentId", id.as_str())])))
                .update_expression("ADD chats :chat")
                // ADD would otherwise create a stub row for an unknown id.
                .condition_expression("attribute_exists(attachmentId)")
                .expression_attribute_values(":chat", AttributeValue::Ss(vec![chat.to_string()]))
                .send()
                .await;
            match linked {
                Err(e) if condition_failed(&e) => Ok(()),
                other => other.map(drop).map_err(sdk_error),
            }
        });
        in_parallel(links.collect()).await.map(drop)
    }

    async fn chats_of_attachment(&self, id: &AttachmentId) -> Result<Vec<ChatId>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.attachments_table)
            .set_key(Some(key([("attachmentId", id.as_str())])))
            .projection_expression("chats")
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let mut chats: Vec<ChatId> = match out.item.as_ref().and_then(|i| i.get("chats")) {
            Some(AttributeValue::Ss(chats)) => {
                chats.iter().filter_map(|c| ChatId::try_from(c.as_str()).ok()).collect()
            }
            _ => Vec::new(),
        };
        chats.sort();
        Ok(chats)
    }

    /// The uploader's rows through the `byUploader` index, then read whole
    /// (the index keeps keys only) and deleted. A global index reads
    /// eventually consistent: an upload made a moment before may be missed,
    /// and a second deleteAccount (it is idempotent) finds it.
    async fn remove_attachments_of(&self, uploader: &UserId) -> Result<Vec<Attachment>> {
        let table = &self.names.attachments_table;
        let found: Vec<Item> = self
            .client
            .query()
            .table_name(table)
            .index_name("byUploader")
            .key_condition_expression("uploader = :u")
            .expression_attribute_values(":u", s(uploader.as_str()))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        let keys: Vec<Item> = found
            .into_iter()
            .filter_map(|mut k| k.remove("attachmentId"))
            .map(|id| Item::from([("attachmentId".to_owned(), id)]))
            .collect();
        let rows = self.get_batches(table, keys, None).await?;
        let attachments = rows
            .into_iter()
            .map(|i| from_item::<AttachmentRow>(i).map(Attachment::from))
            .collect::<Result<Vec<_>>>()?;
        let deletes = attachments
            .iter()
            .map(|a| delete_request(key([("attachmentId", a.id.as_str())])))
            .collect::<Result<Vec<_>>>()?;
        self.write_batches(table, deletes).await?;
        Ok(attachments)
    }
}
