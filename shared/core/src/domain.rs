//! Domain types and the rules that hold whatever stores them: chats, members, devices, inboxes.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{ChatId, DeviceId, UserId};
use crate::protocol::{ChatSummary, ChatUpdate};

/// Milliseconds since the Unix epoch, the protocol's unit of time.
pub type Millis = i64;

pub const DAY_MS: Millis = 24 * 60 * 60 * 1000;

/// The numeric limits of the protocol. They are configuration, so tests and
/// deployments may tighten them; the defaults are the protocol's.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_participants: usize,
    pub max_devices: usize,
    pub max_message_bytes: usize,
    pub max_attachments: usize,
    pub max_attachment_bytes: u64,
    pub max_chat_name_chars: usize,
    pub max_ack_ids: usize,
    /// The largest and the default `limit` of a paged answer (sync, listChats).
    pub max_page_limit: u32,
    pub default_page_limit: u32,
    /// A paged answer stays under this many bytes (API Gateway allows 128 KB).
    pub max_page_bytes: usize,
    pub retention_ms: Millis,
    pub device_expiry_ms: Millis,
    pub url_ttl_ms: Millis,
    /// Fan-outs to more live connections than this go through the job queue.
    pub inline_push_limit: usize,
    /// The connections live in this process (courier-local's embedded
    /// shape): a push cannot be lost while its message survives, since when
    /// the process dies its connections die with it and their devices sync
    /// on reconnecting. A message is then pushed inline whatever its
    /// fan-out and stored done: no delivery job, no done mark, nothing for a
    /// feed to finish. Deployed, API Gateway holds the connections and a
    /// Lambda that dies leaves them open, so the mark and the feed stay.
    pub connections_in_process: bool,
    /// Daily quotas per user (see `ports::Quota`).
    pub max_pending_bytes_per_day: u64,
    pub max_attachment_bytes_per_day: u64,
    /// The key directory (protocol version 2).
    pub max_one_time_keys: usize,
    pub max_one_time_keys_per_upload: usize,
    pub max_identity_key_chars: usize,
    pub max_key_chars: usize,
    pub max_key_id_chars: usize,
    /// One-time prekeys a calling device may claim per hour, of one target
    /// device and in all.
    pub max_claims_per_target_per_hour: u64,
    pub max_claims_per_hour: u64,
    /// A device left with fewer one-time prekeys than this is told `keysLow`.
    pub keys_low_below: u64,
    pub max_device_messages: usize,
    /// typing frames from one device to one chat closer together than this are dropped.
    pub typing_interval_ms: Millis,
    /// No second wake-up of a device within this long while the first is unanswered.
    pub wake_collapse_ms: Millis,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_participants: 100,
            max_devices: 3,
            max_message_bytes: 16 * 1024,
            max_attachments: 10,
            max_attachment_bytes: 100 * 1024 * 1024,
            max_chat_name_chars: 128,
            max_ack_ids: 100,
            max_page_limit: 100,
            default_page_limit: 50,
            max_page_bytes: 100 * 1024 - 512,
            retention_ms: 30 * DAY_MS,
            device_expiry_ms: 30 * DAY_MS,
            url_ttl_ms: 15 * 60 * 1000,
            inline_push_limit: 64,
            connections_in_process: false,
            // A 16 KiB message to 99 people who have not installed the app
            // yet is 1.6 MB; this allows a dozen such a day.
            max_pending_bytes_per_day: 20 * 1024 * 1024,
            // Twenty full-size videos a day.
            max_attachment_bytes_per_day: 2 * 1024 * 1024 * 1024,
            max_one_time_keys: 200,
            max_one_time_keys_per_upload: 100,
            max_identity_key_chars: 64,
            max_key_chars: 2048,
            max_key_id_chars: 64,
            max_claims_per_target_per_hour: 5,
            max_claims_per_hour: 600,
            keys_low_below: 10,
            max_device_messages: 100,
            typing_interval_ms: 1000,
            wake_collapse_ms: 30_000,
        }
    }
}

/// A participant and when they joined; the order of `Chat::members` is seniority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user: UserId,
    pub joined_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    pub id: ChatId,
    pub name: String,
    /// Longest-standing first; createChat's order breaks ties.
    pub members: Vec<Member>,
    pub admins: Vec<UserId>,
    pub created_at: Millis,
    /// Bumped by every change, for optimistic concurrency in the stores.
    pub version: u64,
    /// End-to-end encrypted: fixed at creation; messages go to ready devices only.
    #[serde(default)]
    pub encrypted: bool,
}

impl Chat {
    pub fn is_member(&self, user: &UserId) -> bool {
        self.members.iter().any(|m| &m.user == user)
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        self.admins.contains(user)
    }

    pub fn participants(&self) -> Vec<UserId> {
        self.members.iter().map(|m| m.user.clone()).collect()
    }

    /// Adds `user` unless already there. Returns whether anything changed.
    pub fn add(&mut self, user: UserId, now: Millis, limits: &Limits) -> Result<bool> {
        if self.is_member(&user) {
            return Ok(false);
        }
        if self.members.len() >= limits.max_participants {
            return Err(Error::LimitExceeded(format!(
                "a chat has at most {} participants",
                limits.max_participants
            )));
        }
        self.members.push(Member { user, joined_at: now });
        self.version += 1;
        Ok(true)
    }

    /// Removes `user`. When the last admin goes, the longest-standing remaining
    /// participant becomes admin. Returns whether anything changed.
    pub fn remove(&mut self, user: &UserId) -> bool {
        let before = self.members.len();
        self.members.retain(|m| &m.user != user);
        if self.members.len() == before {
            return false;
        }
        self.admins.retain(|a| a != user);
        if self.admins.is_empty()
            && let Some(senior) = self.members.first()
        {
            self.admins.push(senior.user.clone());
        }
        self.version += 1;
        true
    }

    pub fn summary(&self) -> ChatSummary {
        ChatSummary {
            chat_id: self.id.clone(),
            name: self.name.clone(),
            participants: self.participants(),
            admins: self.admins.clone(),
            encrypted: self.encrypted,
        }
    }

    pub fn update(&self) -> ChatUpdate {
        let s = self.summary();
        ChatUpdate { chat_id: s.chat_id, name: s.name, participants: s.participants, admins: s.admins }
    }
}

/// Which inbox a row sits in: a device's, or a user's pending inbox that their
/// first device will claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum InboxKey {
    Device(UserId, DeviceId),
    Pending(UserId),
}

impl InboxKey {
    /// The partition key form, `user#device` or `user#*` (`#` and `*` appear in neither id).
    pub fn key(&self) -> String {
        match self {
            InboxKey::Device(u, d) => format!("{u}#{d}"),
            InboxKey::Pending(u) => format!("{u}#*"),
        }
    }

    /// The user whose inbox this is.
    pub fn user(&self) -> &UserId {
        match self {
            InboxKey::Device(u, _) | InboxKey::Pending(u) => u,
        }
    }

    pub fn parse(key: &str) -> Option<InboxKey> {
        let (user, device) = key.split_once('#')?;
        let user = UserId::try_from(user).ok()?;
        if device == "*" {
            Some(InboxKey::Pending(user))
        } else {
            Some(InboxKey::Device(user, DeviceId::try_from(device).ok()?))
        }
    }
}

/// A registered device of a user, and its live connection if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub user: UserId,
    pub id: DeviceId,
    pub connection: Option<crate::ids::ConnectionId>,
    pub last_seen: Millis,
    /// Where to wake the device when it is not connected (`registerPush`).
    pub push: Option<crate::ports::PushRegistration>,
}

impl Device {
    pub fn inbox(&self) -> InboxKey {
        InboxKey::Device(self.user.clone(), self.id.clone())
    }
}

/// Who sent a command: the authorizer's verdict plus the connection it came on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user: UserId,
    pub device: DeviceId,
    pub connection: crate::ids::ConnectionId,
}

impl Caller {
    pub fn inbox(&self) -> InboxKey {
        InboxKey::Device(self.user.clone(), self.device.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::try_from(s).unwrap()
    }

    fn chat(users: &[&str]) -> Chat {
        Chat {
            id: ChatId::try_from("c").unwrap(),
            name: "n".into(),
            members: users.iter().map(|u| Member { user: user(u), joined_at: 1 }).collect(),
            admins: vec![user(users[0])],
            created_at: 1,
            version: 0,
            encrypted: false,
        }
    }

    #[test]
    fn the_longest_standing_member_inherits_admin_when_the_last_admin_leaves() {
        let mut c = chat(&["a", "b", "c"]);
        assert!(c.remove(&user("a")));
        assert_eq!(c.admins, vec![user("b")]);
        assert!(!c.remove(&user("a")), "removing a non-member changes nothing");
        assert!(c.remove(&user("b")));
        assert!(c.remove(&user("c")));
        assert!(c.admins.is_empty() && c.members.is_empty());
    }

    #[test]
    fn adding_past_the_limit_names_the_limit() {
        let limits = Limits { max_participants: 2, ..Limits::default() };
        let mut c = chat(&["a", "b"]);
        assert!(!c.add(user("a"), 2, &limits).unwrap());
        let err = c.add(user("x"), 2, &limits).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded(m) if m.contains("2 participants")));
    }

    #[test]
    fn inbox_keys_round_trip() {
        for k in
            [InboxKey::Device(user("u.1"), DeviceId::try_from("d-1").unwrap()), InboxKey::Pending(user("u"))]
        {
            assert_eq!(InboxKey::parse(&k.key()), Some(k));
        }
    }
}
