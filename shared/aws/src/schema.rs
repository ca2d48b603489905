//! The DynamoDB tables: keys, indexes, TTL and streams. `template.yaml`
//! declares the same tables (a test compares them) and the local AWS
//! topology creates them from here.
//!
//! | table | key | what a row is |
//! |---|---|---|
//! | chats | `chatId` | name, members (with joinedAt, in seniority order), admins, version |
//! | participants | `chatId`, `userId`; index `byUser`: `userId`, `chatId` | one membership, for listChats |
//! | devices | `userId`, `deviceId` | live connectionId, lastSeen, push (the registration, a map) and wokenAt (the wake mark), TTL lastSeen + 30 d |
//! | connections | `connectionId` | userId, deviceId, TTL connectedAt + 2 h 10 min |
//! | messages | `chatId`, `messageId` | the wire JSON until fan-out is done, recipients, fannedOut, TTL; streamed. A group message stored once keeps its JSON and recipients in `shared` until every device acked it. Dedupe rows share it under `messageId` = `dedupe#user#device#clientMessageId` |
//! | inbox | `inbox` (`user#device` or `user#*`), `messageId` | the wire JSON, TTL 30 d. The dedupe rows of sendToDevices share it under `inbox` = `dedupe#user#device`, `messageId` = clientMessageId; a device's position in a group chat under `positions#user#device`, chatId; a group message's pointer under `message#id#chat`, messageId (see `dynamo::shared`) |
//! | attachments | `attachmentId`; index `byUploader`: `uploader`, `attachmentId` | uploader, contentType, size, sha256, chats (a string set); TTL enabled, but no row carries `expiresAt` yet (see `DynamoTables`' attachment impl) |
//! | keys | `userId`, `entry` | `bundle#device`: a ready device's identity key, signed prekey, fallback key and its count of one-time prekeys; `otk#device#keyId`: one one-time prekey; `claims#user#device#hour#scope`: an hourly claim counter, TTL |
//! | receipts | `chatId`, `userId` | the participant's delivered, read and privateRead markers |
//!
//! Protocol version 2 added the `Keys` and `Receipts` tables (template.yaml's
//! `KeysTable` and `ReceiptsTable`, `COURIER_KEYS_TABLE` and
//! `COURIER_RECEIPTS_TABLE`) and the `byUploader` index of `Attachments`.
//! Which functions reach them (the ports' callers in courier-core): Keys
//! uploadKeys, getKeys, listDevices, sendToDevices, sendMessage (encrypted
//! chats), removeDevice, deleteAccount and cleanup; Receipts markRead,
//! getReceipts, ack (the delivered marker), modifyChatParticipants and
//! deleteAccount (forgetting a leaver's markers); deleteAccount queries `byUploader`.

/// One key attribute: its name and DynamoDB type (`S` or `N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub kind: &'static str,
}

const fn s(name: &'static str) -> Key {
    Key { name, kind: "S" }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Index {
    pub name: &'static str,
    pub hash: Key,
    pub range: Option<Key>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// The logical name: `template.yaml`'s resource is `{Logical}Table`.
    pub logical: &'static str,
    pub hash: Key,
    pub range: Option<Key>,
    pub indexes: &'static [Index],
    /// The TTL attribute (seconds since the epoch, as DynamoDB wants).
    pub ttl: Option<&'static str>,
    /// Whether the table streams new images (the fan-out safety net).
    pub stream: bool,
}

pub const TTL: &str = "expiresAt";

pub const CHATS: Table =
    Table { logical: "Chats", hash: s("chatId"), range: None, indexes: &[], ttl: None, stream: false };
pub const PARTICIPANTS: Table = Table {
    logical: "Participants",
    hash: s("chatId"),
    range: Some(s("userId")),
    indexes: &[Index { name: "byUser", hash: s("userId"), range: Some(s("chatId")) }],
    ttl: None,
    stream: false,
};
pub const DEVICES: Table = Table {
    logical: "Devices",
    hash: s("userId"),
    range: Some(s("deviceId")),
    indexes: &[],
    ttl: Some(TTL),
    stream: false,
};
pub const CONNECTIONS: Table = Table {
    logical: "Connections",
    hash: s("connectionId"),
    range: None,
    indexes: &[],
    ttl: Some(TTL),
    stream: false,
};
pub const MESSAGES: Table = Table {
    logical: "Messages",
    hash: s("chatId"),
    range: Some(s("messageId")),
    indexes: &[],
    ttl: Some(TTL),
    stream: true,
};
pub const INBOX: Table = Table {
    logical: "Inbox",
    hash: s("inbox"),
    range: Some(s("messageId")),
    indexes: &[],
    ttl: Some(TTL),
    stream: false,
};
pub const ATTACHMENTS: Table = Table {
    logical: "Attachments",
    hash: s("attachmentId"),
    range: None,
    // deleteAccount: the user's uploads, without a scan.
    indexes: &[Index { name: "byUploader", hash: s("uploader"), range: Some(s("attachmentId")) }],
    ttl: Some(TTL),
    stream: false,
};
/// Only the claim counters carry `expiresAt`; keys live until claimed or removed.
pub const KEYS: Table = Table {
    logical: "Keys",
    hash: s("userId"),
    range: Some(s("entry")),
    indexes: &[],
    ttl: Some(TTL),
    stream: false,
};
pub const RECEIPTS: Table = Table {
    logical: "Receipts",
    hash: s("chatId"),
    range: Some(s("userId")),
    indexes: &[],
    ttl: None,
    stream: false,
};

pub const TABLES: [Table; 9] =
    [CHATS, PARTICIPANTS, DEVICES, CONNECTIONS, MESSAGES, INBOX, ATTACHMENTS, KEYS, RECEIPTS];

impl Table {
    /// This table's name among `names`.
    pub fn name_in<'a>(&self, names: &'a super::Names) -> &'a str {
        match self.logical {
            "Chats" => &names.chats_table,
            "Participants" => &names.participants_table,
            "Devices" => &names.devices_table,
            "Connections" => &names.connections_table,
            "Messages" => &names.messages_table,
            "Inbox" => &names.inbox_table,
            "Keys" => &names.keys_table,
            "Receipts" => &names.receipts_table,
            _ => &names.attachments_table,
        }
    }
}

/// Creates every table (on-demand billing), with its TTL and stream, where it
/// does not exist yet: for the local AWS topology and the adapter tests.
pub async fn create_tables(client: &aws_sdk_dynamodb::Client, names: &super::Names) -> crate::Result<()> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
        ProjectionType, ScalarAttributeType, StreamSpecification, StreamViewType, TimeToLiveSpecification,
    };
    let schema = |hash: Key, range: Option<Key>| {
        let mut keys =
            vec![KeySchemaElement::builder().attribute_name(hash.name).key_type(KeyType::Hash).build()];
        if let Some(r) = range {
            keys.push(KeySchemaElement::builder().attribute_name(r.name).key_type(KeyType::Range).build());
        }
        keys.into_iter().collect::<Result<Vec<_>, _>>().map_err(crate::Error::internal)
    };
    for table in TABLES {
        let name = table.name_in(names);
        let mut attributes: Vec<Key> = vec![table.hash];
        attributes.extend(table.range);
        for index in table.indexes {
            attributes.push(index.hash);
            attributes.extend(index.range);
        }
        attributes.sort_by_key(|k| k.name);
        attributes.dedup();
        let mut create = client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(schema(table.hash, table.range)?));
        for a in attributes {
            let kind = if a.kind == "N" { ScalarAttributeType::N } else { ScalarAttributeType::S };
            create = create.attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(a.name)
                    .attribute_type(kind)
                    .build()
                    .map_err(crate::Error::internal)?,
            );
        }
        for index in table.indexes {
            create = create.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(index.name)
                    .set_key_schema(Some(schema(index.hash, index.range)?))
                    .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
                    .build()
                    .map_err(crate::Error::internal)?,
            );
        }
        if table.stream {
            create = create.stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .map_err(crate::Error::internal)?,
            );
        }
        match create.send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => continue,
            Err(e) => return Err(super::sdk_error(e)),
        }
        if let Some(ttl) = table.ttl {
            client
                .update_time_to_live()
                .table_name(name)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(ttl)
                        .build()
                        .map_err(crate::Error::internal)?,
                )
                .send()
                .await
                .map_err(super::sdk_error)?;
        }
    }
    Ok(())
}
