//! deleteAccount: every device, inbox, key, attachment and chat membership of a user, gone.

use std::collections::BTreeSet;

use tracing::instrument;

use super::Courier;
use crate::domain::Caller;
use crate::error::Result;
use crate::ids::ConnectionId;
use crate::protocol::{ModifyChatParticipants, Operation};

impl Courier {
    /// Deletes the caller's account and returns the connections to close
    /// (the caller's own among them, closed last by the handler). Final and
    /// idempotent: a second call finds nothing left, and a new connection
    /// with the same userId starts a new account.
    #[instrument(level = "debug", skip_all, fields(user = %caller.user))]
    pub async fn delete_account(&self, caller: &Caller) -> Result<Vec<ConnectionId>> {
        let user = &caller.user;
        // Who shared a chat with the user, asked before the chats are left.
        let former = self.co_members(user).await?;
        let had_ready = !self.ports.keys.device_keys(std::slice::from_ref(user)).await?.is_empty();

        // Chats first: once out of them, nothing new is sent to the user.
        loop {
            let chats = self.ports.chats.chats_of(user, None, 100).await?;
            if chats.is_empty() {
                break;
            }
            for chat in chats {
                let leave = ModifyChatParticipants {
                    chat_id: chat.id.clone(),
                    user_id: user.clone(),
                    operation: Operation::Remove,
                };
                self.modify_chat_participants(caller, leave).await?;
            }
        }

        let mut connections = Vec::new();
        for device in self.ports.devices.devices_of(std::slice::from_ref(user), i64::MIN).await? {
            self.ports.keys.remove_keys(user, &device.id).await?;
            if let Some(removed) = self.ports.devices.remove_device(user, &device.id).await? {
                self.release_devices(std::slice::from_ref(&removed)).await;
                connections.extend(removed.connection);
            }
        }
        self.ports.messages.drop_pending(user).await?;
        for attachment in self.ports.attachments.remove_attachments_of(user).await? {
            self.ports.blobs.delete(&attachment).await?;
        }
        if had_ready {
            let mut tell: BTreeSet<_> = former;
            tell.remove(user);
            self.announce_devices(user, Some(tell)).await;
        }
        // The caller's own connection goes last, after its answer.
        connections.sort_by_key(|c| c == &caller.connection);
        if !connections.contains(&caller.connection) {
            connections.push(caller.connection.clone());
        }
        Ok(connections)
    }
}
