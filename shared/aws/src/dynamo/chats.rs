//! `ChatStore`: a chat is one row in Chats, and one row per participant in Participants for `chats_of`.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::batch::{delete_request, put_request};
use super::rows::{ChatRow, ParticipantRow, from_item, to_item};
use super::{DynamoTables, condition_failed, key, s, unique};
use crate::sdk_error;
use courier_core::domain::Chat;
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, UserId};
use courier_core::ports::ChatStore;

#[async_trait]
impl ChatStore for DynamoTables {
    async fn create_chat(&self, chat: &Chat) -> Result<()> {
        let put = self
            .client
            .put_item()
            .table_name(&self.names.chats_table)
            .set_item(Some(to_item(&ChatRow::from(chat))?))
            .condition_expression("attribute_not_exists(chatId)")
            .send()
            .await;
        match put {
            Ok(_) => {}
            Err(e) if condition_failed(&e) => {
                return Err(Error::internal(format!("chat {} exists", chat.id)));
            }
            Err(e) => return Err(sdk_error(e)),
        }
        let rows = unique(&chat.participants())
            .into_iter()
            .map(|user| put_request(to_item(&ParticipantRow { chat_id: chat.id.clone(), user_id: user })?))
            .collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.participants_table, rows).await
    }

    async fn chat(&self, id: &ChatId) -> Result<Option<Chat>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.chats_table)
            .set_key(Some(key([("chatId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(|i| from_item::<ChatRow>(i).map(Chat::from)).transpose()
    }

    async fn update_chat(&self, chat: &Chat, expected_version: u64) -> Result<bool> {
        let put = self
            .client
            .put_item()
            .table_name(&self.names.chats_table)
            .set_item(Some(to_item(&ChatRow::from(chat))?))
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", AttributeValue::N(expected_version.to_string()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        let old: Chat = match put {
            Ok(out) => from_item::<ChatRow>(out.attributes.unwrap_or_default())?.into(),
            Err(e) if condition_failed(&e) => return Ok(false),
            Err(e) => return Err(sdk_error(e)),
        };
        // Should this fail, a leftover row only costs a read: chats_of checks membership.
        let participant =
            |user: &UserId| to_item(&ParticipantRow { chat_id: chat.id.clone(), user_id: user.clone() });
        let mut writes = Vec::new();
        for user in unique(&chat.participants()).iter().filter(|u| !old.is_member(u)) {
            writes.push(put_request(participant(user)?)?);
        }
        for user in unique(&old.participants()).iter().filter(|u| !chat.is_member(u)) {
            writes.push(delete_request(participant(user)?)?);
        }
        self.write_batches(&self.names.participants_table, writes).await?;
        Ok(true)
    }

    async fn chats_of(&self, user: &UserId, after: Option<&ChatId>, limit: usize) -> Result<Vec<Chat>> {
        // A global index reads eventually consistent: a chat just joined may
        // show a moment late; one just left is filtered out below, and the
        // query reads on until the page is full or the index ends.
        let mut chats = Vec::with_capacity(limit.min(100));
        let mut start = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.names.participants_table)
                .index_name("byUser")
                .expression_attribute_values(":u", s(user.as_str()))
                .limit(i32::try_from(limit - chats.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take());
            query = match after {
                Some(after) => query
                    .key_condition_expression("userId = :u AND chatId > :after")
                    .expression_attribute_values(":after", s(after.as_str())),
                None => query.key_condition_expression("userId = :u"),
            };
            let page = query.send().await.map_err(sdk_error)?;
            let chat_keys = page
                .items()
                .iter()
                .filter_map(|k| k.get("chatId").cloned())
                .map(|id| HashMap::from([("chatId".to_owned(), id)]))
                .collect();
            let items = self.get_batches(&self.names.chats_table, chat_keys, None).await?;
            let mut found = items
                .into_iter()
                .map(|i| from_item::<ChatRow>(i).map(Chat::from))
                .filter(|c| c.as_ref().map_or(true, |c| c.is_member(user)))
                .collect::<Result<Vec<_>>>()?;
            found.sort_by(|a, b| a.id.cmp(&b.id));
            chats.extend(found);
            match page.last_evaluated_key {
                Some(key) if chats.len() < limit => start = Some(key),
                _ => break,
            }
        }
        chats.truncate(limit);
        Ok(chats)
    }
}
