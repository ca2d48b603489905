//! Chats: createChat, modifyChatParticipants and listChats, with their chatUpdate pushes.

use std::collections::BTreeSet;

use tracing::instrument;

use super::Courier;
use crate::domain::{Caller, Chat, Member};
use crate::error::{Error, Result};
use crate::ids::{ChatId, UserId};
use crate::protocol::{
    ChatCreated, ChatList, CreateChat, ListChats, ModifyChatParticipants, Operation, Participants,
};

/// How often a participant change re-reads the chat after losing a race:
/// enough for every member of a full chat leaving at once.
const CONFLICT_RETRIES: u32 = 128;

impl Courier {
    #[instrument(level = "debug", skip_all, fields(user = %caller.user))]
    pub async fn create_chat(&self, caller: &Caller, cmd: CreateChat) -> Result<ChatCreated> {
        let chars = cmd.name.chars().count();
        if chars == 0 {
            return Err(Error::BadRequest("name must not be empty".into()));
        }
        if chars > self.limits.max_chat_name_chars {
            let max = self.limits.max_chat_name_chars;
            return Err(Error::LimitExceeded(format!("a chat name is at most {max} characters")));
        }
        let mut users: Vec<UserId> = Vec::with_capacity(cmd.participants.len() + 1);
        if !cmd.participants.contains(&caller.user) {
            users.push(caller.user.clone());
        }
        let mut seen = BTreeSet::new();
        for u in cmd.participants {
            if seen.insert(u.clone()) && !users.contains(&u) {
                users.push(u);
            }
        }
        if users.len() < 2 {
            return Err(Error::BadRequest("a chat needs at least 2 participants, you included".into()));
        }
        if users.len() > self.limits.max_participants {
            return Err(Error::LimitExceeded(format!(
                "a chat has at most {} participants",
                self.limits.max_participants
            )));
        }
        let now = self.now();
        let chat = Chat {
            id: self.ids.chat(now),
            name: cmd.name,
            members: users.into_iter().map(|user| Member { user, joined_at: now }).collect(),
            admins: vec![caller.user.clone()],
            created_at: now,
            version: 0,
            encrypted: cmd.encrypted,
        };
        self.ports.chats.create_chat(&chat).await?;
        self.announce(&chat, &[]).await;
        Ok(ChatCreated { chat_id: chat.id })
    }

    #[instrument(level = "debug", skip_all, fields(user = %caller.user, chat = %cmd.chat_id, target = %cmd.user_id))]
    pub async fn modify_chat_participants(
        &self,
        caller: &Caller,
        cmd: ModifyChatParticipants,
    ) -> Result<Participants> {
        for attempt in 0..CONFLICT_RETRIES {
            if attempt > 0 {
                // Jittered backoff, so racing writers spread out rather than collide again.
                let ceiling = 1u64 << attempt.min(5);
                tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(0..=ceiling))).await;
            }
            let mut chat = self.member_chat(caller, &cmd.chat_id).await?;
            let leaving = cmd.operation == Operation::Remove && cmd.user_id == caller.user;
            if !leaving && !chat.is_admin(&caller.user) {
                return Err(Error::Forbidden("only an admin adds participants or removes others".into()));
            }
            let before = chat.participants();
            let expected = chat.version;
            let changed = match cmd.operation {
                Operation::Add => chat.add(cmd.user_id.clone(), self.now(), &self.limits)?,
                Operation::Remove => chat.remove(&cmd.user_id),
            };
            if !changed {
                return Ok(Participants { participants: before });
            }
            if self.ports.chats.update_chat(&chat, expected).await? {
                if cmd.operation == Operation::Remove
                    && let Err(e) = self.ports.receipts.remove_receipts(&chat.id, &cmd.user_id).await
                {
                    tracing::warn!(chat = %chat.id, error = %e, "forgetting a leaver's receipts failed");
                }
                self.announce(&chat, &before).await;
                return Ok(Participants { participants: chat.participants() });
            }
        }
        Err(Error::unavailable("the chat kept changing under this request"))
    }

    /// A page of the caller's chats. Like sync's, the cursor is a position
    /// (the last chatId shown), so a chat joined meanwhile shows up on a
    /// later page or not at all, never twice; a page stays under the byte
    /// limit whatever the chats' sizes.
    pub async fn list_chats(&self, caller: &Caller, cmd: ListChats) -> Result<ChatList> {
        let limit = self.page_limit(cmd.limit)?;
        let after = match cmd.cursor {
            None => None,
            Some(c) if ulid::Ulid::from_string(&c).is_ok() => {
                Some(ChatId::try_from(c).map_err(Error::BadRequest)?)
            }
            Some(_) => return Err(Error::BadRequest("cursor is not one that listChats returned".into())),
        };
        let found = self.ports.chats.chats_of(&caller.user, after.as_ref(), limit + 1).await?;
        let mut chats = Vec::with_capacity(found.len().min(limit));
        let mut bytes = 0;
        for chat in &found {
            let summary = chat.summary();
            let size = serde_json::to_vec(&summary).map_err(Error::internal)?.len() + 1;
            if chats.len() == limit || (bytes + size > self.limits.max_page_bytes && !chats.is_empty()) {
                break;
            }
            bytes += size;
            chats.push(summary);
        }
        let cursor =
            if chats.len() < found.len() { chats.last().map(|c| c.chat_id.to_string()) } else { None };
        Ok(ChatList { chats, cursor })
    }

    /// The chat, if the caller is one of its participants.
    pub(super) async fn member_chat(&self, caller: &Caller, id: &ChatId) -> Result<Chat> {
        let chat = self.ports.chats.chat(id).await?;
        let chat = chat.ok_or_else(|| Error::NotFound("no such chat".into()))?;
        if !chat.is_member(&caller.user) {
            return Err(Error::Forbidden("you are not a participant of this chat".into()));
        }
        Ok(chat)
    }

    /// Pushes a chatUpdate to the connected devices of the chat's current
    /// participants and of `former` ones. The change is already stored, so a
    /// failed push is logged, not returned: listChats tells the rest.
    async fn announce(&self, chat: &Chat, former: &[UserId]) {
        let mut users: BTreeSet<UserId> = chat.members.iter().map(|m| m.user.clone()).collect();
        users.extend(former.iter().cloned());
        let users: Vec<UserId> = users.into_iter().collect();
        let frame = crate::protocol::chat_update_frame(&chat.update());
        let result = async {
            let devices = self.live_devices(&users, self.now()).await?;
            self.push_all(devices.iter().filter_map(|d| d.connection.as_ref()), &frame).await
        };
        if let Err(e) = result.await {
            tracing::warn!(chat = %chat.id, error = %e, "chatUpdate push failed");
        }
    }
}
