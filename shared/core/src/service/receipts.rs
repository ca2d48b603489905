//! Receipts and typing: markRead, getReceipts, the delivered marker moved by
//! ack, and typing, which is pushed and never stored.

use std::collections::BTreeMap;

use tracing::instrument;

use super::Courier;
use crate::domain::{Caller, Chat, Millis};
use crate::error::{Error, Result};
use crate::ids::{ChatId, MessageId, UserId};
use crate::ports::Markers;
use crate::protocol::{
    self, Empty, GetReceipts, MarkRead, Receipt, ReceiptPush, Receipts, ServerFrame, Typing, TypingPush,
};

/// typing throttle entries kept before the oldest are forgotten.
const TYPING_ENTRIES: usize = 100_000;

impl Courier {
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, chat = %cmd.chat_id))]
    pub async fn mark_read(&self, caller: &Caller, cmd: MarkRead) -> Result<Empty> {
        let up_to = match ulid::Ulid::from_string(&cmd.up_to) {
            Ok(ulid) if (ulid.timestamp_ms() as Millis) <= self.now() => {
                MessageId::try_from(cmd.up_to).map_err(Error::BadRequest)?
            }
            Ok(_) => return Err(Error::BadRequest("upTo lies in the future".into())),
            Err(_) => return Err(Error::BadRequest("upTo must be a messageId".into())),
        };
        let chat = self.member_chat(caller, &cmd.chat_id).await?;
        let to = if cmd.private {
            Markers { private_read: Some(up_to), ..Markers::default() }
        } else {
            Markers { delivered: Some(up_to.clone()), read: Some(up_to.clone()), private_read: Some(up_to) }
        };
        if let Some(now) = self.ports.receipts.advance(&chat.id, &caller.user, &to).await? {
            self.tell_receipt(&chat, caller, &now, cmd.private).await;
        }
        Ok(Empty {})
    }

    pub async fn get_receipts(&self, caller: &Caller, cmd: GetReceipts) -> Result<Receipts> {
        let chat = self.member_chat(caller, &cmd.chat_id).await?;
        let mut markers: BTreeMap<UserId, Markers> =
            self.ports.receipts.receipts(&chat.id).await?.into_iter().collect();
        let receipts = chat
            .members
            .iter()
            .map(|m| {
                let marks = markers.remove(&m.user).unwrap_or_default();
                let read = if m.user == caller.user { own_read(&marks) } else { marks.read };
                Receipt { user_id: m.user.clone(), delivered: marks.delivered, read }
            })
            .collect();
        Ok(Receipts { receipts })
    }

    /// Moves the caller's delivered marker in each chat up to the newest of
    /// the chat messages an ack removed (`acked` as the store returned them).
    pub(super) async fn delivered(&self, caller: &Caller, acked: &[(MessageId, Option<ChatId>)]) {
        let mut newest: BTreeMap<&ChatId, &MessageId> = BTreeMap::new();
        for (id, chat) in acked {
            let Some(chat) = chat else { continue };
            let entry = newest.entry(chat).or_insert(id);
            if id > *entry {
                *entry = id;
            }
        }
        for (chat, id) in newest {
            let to = Markers { delivered: Some(id.clone()), ..Markers::default() };
            let result = async {
                if let Some(now) = self.ports.receipts.advance(chat, &caller.user, &to).await?
                    && let Some(chat) = self.ports.chats.chat(chat).await?
                    && chat.is_member(&caller.user)
                {
                    self.tell_receipt(&chat, caller, &now, false).await;
                }
                Ok::<_, Error>(())
            };
            if let Err(e) = result.await {
                tracing::warn!(%chat, error = %e, "moving the delivered marker failed");
            }
        }
    }

    /// Pushes the reader's markers as they now stand: to the other
    /// participants' connected devices (unless the move was private) with
    /// the shared read marker, and to the reader's other devices with the
    /// further of the two read markers.
    async fn tell_receipt(&self, chat: &Chat, caller: &Caller, markers: &Markers, private: bool) {
        let push = |read| {
            protocol::push_frame(ServerFrame::Receipt(ReceiptPush {
                chat_id: chat.id.clone(),
                user_id: caller.user.clone(),
                delivered: markers.delivered.clone(),
                read,
            }))
        };
        let result = async {
            let users = if private { vec![caller.user.clone()] } else { chat.participants() };
            let devices = self.live_devices(&users, self.now()).await?;
            let own = push(own_read(markers));
            let own_devices = devices.iter().filter(|d| d.user == caller.user && d.id != caller.device);
            self.push_all(own_devices.filter_map(|d| d.connection.as_ref()), &own).await?;
            if !private {
                let shared = push(markers.read.clone());
                let others = devices.iter().filter(|d| d.user != caller.user);
                self.push_all(others.filter_map(|d| d.connection.as_ref()), &shared).await?;
            }
            Ok::<_, Error>(())
        };
        if let Err(e) = result.await {
            tracing::warn!(chat = %chat.id, error = %e, "receipt push failed");
        }
    }

    /// Tells the other participants' connected devices; stores nothing. A
    /// device typing to one chat more than once an interval gets SUCCESS and
    /// the extra frames go nowhere.
    pub async fn typing(&self, caller: &Caller, cmd: Typing) -> Result<Empty> {
        let chat = self.member_chat(caller, &cmd.chat_id).await?;
        let now = self.now();
        {
            let mut last = self.typing.lock().unwrap_or_else(|e| e.into_inner());
            let key = (caller.inbox(), chat.id.clone());
            if last.get(&key).is_some_and(|at| now - at < self.limits.typing_interval_ms) {
                return Ok(Empty {});
            }
            if last.len() >= TYPING_ENTRIES {
                last.retain(|_, at| now - *at < self.limits.typing_interval_ms);
                if last.len() >= TYPING_ENTRIES {
                    last.clear();
                }
            }
            last.insert(key, now);
        }
        let frame = protocol::push_frame(ServerFrame::Typing(TypingPush {
            chat_id: chat.id.clone(),
            user_id: caller.user.clone(),
            device_id: caller.device.clone(),
            state: cmd.state,
        }));
        let others: Vec<UserId> = chat.participants().into_iter().filter(|u| u != &caller.user).collect();
        let devices = self.live_devices(&others, now).await?;
        if let Err(e) = self.push_all(devices.iter().filter_map(|d| d.connection.as_ref()), &frame).await {
            tracing::debug!(error = %e, "typing push failed");
        }
        Ok(Empty {})
    }
}

/// What the reader's own devices see as read: the further of the shared and the private marker.
fn own_read(markers: &Markers) -> Option<MessageId> {
    markers.read.clone().max(markers.private_read.clone())
}
