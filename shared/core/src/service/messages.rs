//! Messages: sendMessage and its fan-out, the delivery jobs, sync and ack.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tracing::instrument;

use super::Courier;
use super::wake::wake_targets;
use crate::domain::{Caller, Device, InboxKey};
use crate::error::{Error, Result};
use crate::ids::{AttachmentId, ChatId, MessageId, UserId};
use crate::ports::{Job, PushTarget, Quota, Store, StoredMessage, WakeTarget};
use crate::protocol::{Ack, Acked, Message, MessageSent, SendMessage, Sync, SyncPage};

/// Connections per delivery job; small enough that one job's retry repeats little.
const TARGETS_PER_JOB: usize = 50;

impl Courier {
    /// Stores the message for every recipient device, answers, then pushes.
    /// The answer comes only after the store has committed; the pushes are a
    /// fast path that the feed (Streams when deployed) backs up.
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %caller.device, chat = %cmd.chat_id))]
    pub async fn send_message(&self, caller: &Caller, cmd: SendMessage) -> Result<MessageSent> {
        if cmd.message.len() > self.limits.max_message_bytes {
            return Err(Error::LimitExceeded(format!(
                "a message is at most {} bytes of UTF-8",
                self.limits.max_message_bytes
            )));
        }
        if cmd.attachments.len() > self.limits.max_attachments {
            return Err(Error::LimitExceeded(format!(
                "a message carries at most {} attachments",
                self.limits.max_attachments
            )));
        }
        let dedupe = self.dedupe_key(caller, cmd.client_message_id)?;
        let chat = self.member_chat(caller, &cmd.chat_id).await?;
        self.check_attachments(caller, &cmd.attachments).await?;

        let now = self.now();
        let participants = chat.participants();
        let (devices, recipients) = if chat.encrypted {
            // Ready devices only, checked against the sender's view; no pending inbox.
            let devices =
                self.encrypted_recipients(caller, &participants, cmd.devices.as_deref(), now).await?;
            let recipients = devices.iter().map(Device::inbox).collect();
            (devices, recipients)
        } else {
            let devices = self.live_devices(&participants, now).await?;
            let recipients = recipients(caller, &participants, &devices);
            (devices, recipients)
        };
        let message = Message {
            message_id: self.ids.message(now),
            chat_id: chat.id.clone(),
            user_id: caller.user.clone(),
            device_id: caller.device.clone(),
            message: cmd.message,
            attachments: cmd.attachments,
            timestamp: now,
        };
        let stored = StoredMessage {
            chat: chat.id.clone(),
            id: message.message_id.clone(),
            timestamp: now,
            json: serde_json::to_string(&message).map_err(Error::internal)?,
            recipients,
            // Stored done when nothing can be left to finish. Not with
            // attachments: a retry after a crash between the store and the
            // link reads them from the first send's body.
            fanned_out: self.limits.connections_in_process && message.attachments.is_empty(),
        };
        let pending = stored.recipients.iter().filter(|r| matches!(r, InboxKey::Pending(_))).count();
        if pending > 0 {
            let bytes = (stored.json.len() * pending) as u64;
            self.charge(&caller.user, Quota::PendingBytes, bytes).await?;
        }
        let expires_at = now + self.limits.retention_ms;
        match self.ports.messages.store(&stored, dedupe.as_ref(), expires_at).await? {
            Store::Stored => {
                // Shared before anyone is told of the message, so recipients can fetch them.
                self.link_attachments(&message.attachments, &chat.id).await?;
                let targets = push_targets(&stored.recipients, &devices);
                self.fan_out(&stored, targets).await;
                self.enqueue_wake(wake_targets(&stored.recipients, &devices)).await;
                Ok(MessageSent { message_id: stored.id, timestamp: now })
            }
            // A retry. It shares what the first send carried (which may have
            // died before linking), never what the retry added; delivery is
            // the first send's fan-out's, or the feed's.
            Store::Duplicate(first) => {
                if !first.fanned_out
                    && let Ok(original) = serde_json::from_str::<Message>(&first.json)
                {
                    self.link_attachments(&original.attachments, &chat.id).await?;
                }
                Ok(MessageSent { message_id: first.id, timestamp: first.timestamp })
            }
        }
    }

    async fn link_attachments(&self, ids: &[AttachmentId], chat: &ChatId) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ports.attachments.link(ids, chat).await
    }

    /// Pushes to the recipients' live connections, inline for small fan-outs
    /// and through delivery jobs for large ones, then marks the message done.
    /// Failures leave the mark unset, so the feed finishes the work later.
    /// A message stored done is only pushed (see `Limits::connections_in_process`).
    async fn fan_out(&self, message: &StoredMessage, targets: Vec<PushTarget>) {
        if message.fanned_out {
            if let Err(e) = self.push_message(&message.json, &targets).await {
                tracing::warn!(message = %message.id, error = %e, "pushing failed; the inboxes keep it");
            }
            return;
        }
        let deliver = |targets: Vec<PushTarget>| Job::Deliver {
            message_id: message.id.clone(),
            message: message.json.clone(),
            targets,
        };
        let result = async {
            if targets.len() > self.limits.inline_push_limit {
                for chunk in targets.chunks(TARGETS_PER_JOB) {
                    self.ports.jobs.enqueue(&deliver(chunk.to_vec()), Duration::ZERO).await?;
                }
            } else if let Err(e) = self.push_message(&message.json, &targets).await {
                if !e.is_retryable() {
                    return Err(e);
                }
                self.ports.jobs.enqueue(&deliver(targets), Duration::ZERO).await?;
            }
            self.ports.messages.mark_fanned_out(&message.chat, &message.id).await
        };
        if let Err(e) = result.await {
            tracing::warn!(message = %message.id, error = %e, "fan-out left to the feed");
        }
    }

    /// Pushes a stored message (a chat message or a device message) to these
    /// connections. A device whose connection turns out gone is woken instead.
    pub(super) async fn push_message(&self, message_json: &str, targets: &[PushTarget]) -> Result<()> {
        let frame = crate::protocol::stored_frame(message_json)
            .ok_or_else(|| Error::internal("a message to push that is no JSON object"))?;
        let gone = self.push_all(targets.iter().map(|t| &t.connection_id), &frame).await?;
        let wake = targets
            .iter()
            .filter(|t| gone.contains(&t.connection_id))
            .map(|t| WakeTarget { user_id: t.user_id.clone(), device_id: t.device_id.clone() })
            .collect();
        self.enqueue_wake(wake).await;
        Ok(())
    }

    /// The safety net (fanout on the change feed, or a delayed job): finish a
    /// fan-out whose mark is missing. Pushes only to inboxes still holding
    /// the message, so nothing acked is pushed again.
    #[instrument(level = "debug", skip_all, fields(chat = %chat, message = %id))]
    pub async fn finish_fanout(&self, chat: &ChatId, id: &MessageId) -> Result<()> {
        let Some(message) = self.ports.messages.message(chat, id).await? else {
            return Ok(());
        };
        if message.fanned_out {
            return Ok(());
        }
        let now = self.now();
        let holders = self.ports.messages.holders(id, &message.recipients, now).await?;
        // Once per user, though several of their devices may hold it.
        let users: BTreeSet<UserId> = holders
            .iter()
            .map(|k| match k {
                InboxKey::Device(u, _) | InboxKey::Pending(u) => u.clone(),
            })
            .collect();
        let users: Vec<UserId> = users.into_iter().collect();
        let devices = self.live_devices(&users, now).await?;
        let targets = push_targets(&holders, &devices);
        self.push_message(&message.json, &targets).await?;
        // The send path may have died before it asked for these.
        self.enqueue_wake(wake_targets(&holders, &devices)).await;
        self.ports.messages.mark_fanned_out(chat, id).await
    }

    /// The stream's first look at a new message: one read, and if the send
    /// path has not marked it done, a delayed job that finishes it.
    pub async fn check_fanout_later(&self, chat: &ChatId, id: &MessageId, after: Duration) -> Result<()> {
        match self.ports.messages.message(chat, id).await? {
            Some(message) if !message.fanned_out => {
                let job = Job::FinishFanout { chat_id: chat.clone(), message_id: id.clone() };
                self.ports.jobs.enqueue(&job, after).await
            }
            _ => Ok(()),
        }
    }

    /// Runs one queued job. An `Err` that is retryable asks the queue to try again.
    pub async fn run_job(&self, job: &Job) -> Result<()> {
        match job {
            Job::Deliver { message_id, message, targets } => {
                // Only inboxes still holding the message get it: nothing acked is pushed again.
                let keys: Vec<InboxKey> = targets
                    .iter()
                    .map(|t| InboxKey::Device(t.user_id.clone(), t.device_id.clone()))
                    .collect();
                let holders: BTreeSet<InboxKey> =
                    self.ports.messages.holders(message_id, &keys, self.now()).await?.into_iter().collect();
                let live: Vec<PushTarget> = targets
                    .iter()
                    .zip(&keys)
                    .filter(|(_, key)| holders.contains(key))
                    .map(|(t, _)| t.clone())
                    .collect();
                self.push_message(message, &live).await
            }
            Job::FinishFanout { chat_id, message_id } => self.finish_fanout(chat_id, message_id).await,
            Job::Wake { devices } => self.wake(devices).await,
            Job::Release { registration } => self.ports.wakeups.release(registration).await,
        }
    }

    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %caller.device))]
    pub async fn sync(&self, caller: &Caller, cmd: Sync) -> Result<SyncPage> {
        let limit = self.page_limit(cmd.limit)?;
        // A cursor is the last messageId of a page: anything else was not made by sync.
        let after = match cmd.cursor {
            None => None,
            Some(c) if ulid::Ulid::from_string(&c).is_ok() => {
                Some(MessageId::try_from(c).map_err(Error::BadRequest)?)
            }
            Some(_) => return Err(Error::BadRequest("cursor is not one that sync returned".into())),
        };
        let rows =
            self.ports.messages.inbox_page(&caller.inbox(), after.as_ref(), limit + 1, self.now()).await?;
        let mut messages = Vec::with_capacity(rows.len().min(limit));
        let mut bytes = 0;
        let mut last = None;
        for (id, json) in &rows {
            if messages.len() == limit
                || (bytes + json.len() + 1 > self.limits.max_page_bytes && !messages.is_empty())
            {
                break;
            }
            let Some(item) = crate::protocol::stored_frame(json) else {
                tracing::error!(message = %id, "an inbox row that is no JSON object");
                continue;
            };
            bytes += item.len() + 1;
            messages
                .push(serde_json::value::RawValue::from_string(item.into_owned()).map_err(Error::internal)?);
            last = Some(id);
        }
        let cursor = if messages.len() < rows.len() { last.map(|id| id.to_string()) } else { None };
        Ok(SyncPage { messages, cursor })
    }

    pub async fn ack(&self, caller: &Caller, cmd: Ack) -> Result<Acked> {
        let ids: Vec<MessageId> = match (cmd.message_ids, cmd.message_id) {
            (Some(ids), None) => ids,
            (None, Some(id)) => vec![id],
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest("give messageIds or messageId, not both".into()));
            }
            (None, None) => return Err(Error::BadRequest("messageIds is required".into())),
        };
        if ids.is_empty() {
            return Err(Error::BadRequest("messageIds must name at least one message".into()));
        }
        if ids.len() > self.limits.max_ack_ids {
            return Err(Error::LimitExceeded(format!(
                "an ack names at most {} messages",
                self.limits.max_ack_ids
            )));
        }
        let acked = self.ports.messages.ack(&caller.inbox(), &ids).await?;
        self.delivered(caller, &acked).await;
        Ok(Acked { acked: acked.len() as u64 })
    }
}

/// Every device of every participant but the sending one; a participant with
/// no device yet gets a pending row that their first device claims.
fn recipients(caller: &Caller, participants: &[UserId], devices: &[Device]) -> Vec<InboxKey> {
    let mut by_user: HashMap<&UserId, Vec<&Device>> = HashMap::new();
    for d in devices {
        by_user.entry(&d.user).or_default().push(d);
    }
    let mut keys = Vec::with_capacity(devices.len() + participants.len());
    for user in participants {
        match by_user.get(user) {
            Some(ds) => keys.extend(
                ds.iter().filter(|d| !(d.user == caller.user && d.id == caller.device)).map(|d| d.inbox()),
            ),
            None => keys.push(InboxKey::Pending(user.clone())),
        }
    }
    keys
}

/// The live connections of these inboxes' devices.
fn push_targets(inboxes: &[InboxKey], devices: &[Device]) -> Vec<PushTarget> {
    let wanted: BTreeSet<&InboxKey> = inboxes.iter().collect();
    devices
        .iter()
        .filter_map(|d| {
            let connection = d.connection.clone()?;
            wanted.contains(&d.inbox()).then(|| PushTarget {
                user_id: d.user.clone(),
                device_id: d.id.clone(),
                connection_id: connection,
            })
        })
        .collect()
}
