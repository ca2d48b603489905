//! Identifier newtypes: the validated ids clients choose and the ULIDs the server mints.

use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Declares a string newtype id. `$check` decides which strings are valid.
macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $what:literal, $rule:literal, $check:expr) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> bool = $check;
                if check(&s) {
                    Ok(Self(s))
                } else {
                    // Never the value itself: error messages go back to clients.
                    Err(concat!("invalid ", $what, ": expected ", $rule).to_owned())
                }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(s: &str) -> Result<Self, String> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn charset(s: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Server-made ids are ULIDs; a client may quote any short string back, and an
/// id that names nothing is a NOT_FOUND, not a malformed request.
fn opaque(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

id_type!(
    /// A user, as named by the token's `sub`.
    UserId, "userId", "1-64 characters of A-Z a-z 0-9 . _ @ -", |s| charset(s, b"._@-")
);
id_type!(
    /// One install of an app, chosen by the app.
    DeviceId, "deviceId", "1-64 characters of A-Z a-z 0-9 _ -", |s| charset(s, b"_-")
);
id_type!(ChatId, "chatId", "1-64 printable ASCII characters", opaque);
id_type!(MessageId, "messageId", "1-64 printable ASCII characters", opaque);
id_type!(AttachmentId, "attachmentId", "1-64 printable ASCII characters", opaque);
id_type!(
    /// An API Gateway connection id (or the local gateway's look-alike).
    ConnectionId, "connectionId", "1-64 printable ASCII characters", opaque
);

/// Mints ULIDs that sort by the time given, strictly increasing within a process.
#[derive(Default)]
pub struct IdGen(Mutex<ulid::Generator>);

impl fmt::Debug for IdGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdGen")
    }
}

impl IdGen {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh ULID whose time part is `now_ms`.
    pub fn next(&self, now_ms: i64) -> String {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms.max(0) as u64);
        let mut generator = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Overflow needs 2^80 ids in one millisecond; fall back to a fresh random one.
        generator.generate_from_datetime(time).unwrap_or_else(|_| ulid::Ulid::from_datetime(time)).to_string()
    }

    pub fn chat(&self, now_ms: i64) -> ChatId {
        ChatId(self.next(now_ms))
    }

    pub fn message(&self, now_ms: i64) -> MessageId {
        MessageId(self.next(now_ms))
    }

    pub fn attachment(&self, now_ms: i64) -> AttachmentId {
        AttachmentId(self.next(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_device_ids_follow_the_protocol_charsets() {
        assert!(UserId::try_from("alice.b@example-1_x").is_ok());
        assert!(UserId::try_from("").is_err());
        assert!(UserId::try_from("a b").is_err());
        assert!(UserId::try_from("x".repeat(65)).is_err());
        assert!(DeviceId::try_from("phone_1-A").is_ok());
        assert!(DeviceId::try_from("phone.1").is_err());
        assert!(DeviceId::try_from("d@x").is_err());
    }

    #[test]
    fn ulids_are_26_chars_and_increase_within_one_millisecond() {
        let ids = IdGen::new();
        let a = ids.next(1_700_000_000_000);
        let b = ids.next(1_700_000_000_000);
        let c = ids.next(1_700_000_000_001);
        assert_eq!(a.len(), 26);
        assert!(a < b && b < c, "{a} {b} {c}");
    }
}
