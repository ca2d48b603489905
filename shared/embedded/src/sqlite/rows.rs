//! Rows to domain values and back: JSON bodies, ids, chats, stored messages.

use courier_core::domain::{Chat, InboxKey, Member, Millis};
use courier_core::ids::UserId;
use courier_core::ports::{DedupeKey, StoredMessage};

pub(super) fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("domain types serialize")
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

pub(super) fn id<T: TryFrom<String, Error = String>>(text: String) -> rusqlite::Result<T> {
    T::try_from(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ChatRow {
    name: String,
    /// Read on its own by `update_chat`, to drop the participant rows of members who left.
    pub(super) members: Vec<Member>,
    admins: Vec<UserId>,
    created_at: Millis,
    /// Absent from the rows of layout 2 and before, which no encrypted chat wrote.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    encrypted: bool,
}

pub(super) fn chat_from_row(chat_id: String, body: String, version: i64) -> rusqlite::Result<Chat> {
    let row: ChatRow = from_json(&body)?;
    Ok(Chat {
        id: id(chat_id)?,
        name: row.name,
        members: row.members,
        admins: row.admins,
        created_at: row.created_at,
        version: version as u64,
        encrypted: row.encrypted,
    })
}

pub(super) fn chat_body(chat: &Chat) -> String {
    json(&ChatRow {
        name: chat.name.clone(),
        members: chat.members.clone(),
        admins: chat.admins.clone(),
        created_at: chat.created_at,
        encrypted: chat.encrypted,
    })
}

pub(super) fn dedupe_text(key: &DedupeKey) -> String {
    format!("{}#{}#{}", key.user, key.device, key.client_message_id)
}

pub(super) fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let recipients: String = r.get("recipients")?;
    let recipients: Vec<String> = from_json(&recipients)?;
    Ok(StoredMessage {
        chat: id(r.get("chat_id")?)?,
        id: id(r.get("message_id")?)?,
        timestamp: r.get("timestamp")?,
        json: r.get::<_, Option<String>>("body")?.unwrap_or_default(),
        recipients: recipients.iter().filter_map(|k| InboxKey::parse(k)).collect(),
        fanned_out: r.get::<_, i64>("fanned_out")? != 0,
    })
}
