//! Group messages stored once: the message row keeps the text for every recipient device, and each device a position per chat.
//!
//! A chat message with at least [`SHARED_FROM`] recipient devices gets no
//! inbox row per device. Its Messages row keeps the wire JSON and the
//! recipient keys in `shared` (a map the fan-out mark leaves alone) until
//! every device acked it, or it expires. Each recipient device has one
//! position item per chat in the Inbox table, under `positions#user#device`
//! and the chat id: it holds every message of the chat listing it after
//! `after` that it has not acked (`acked`), and the ids in `held` (older ones
//! it has not acked). A pointer item, `message#id#chat`, gives an ack, which
//! names ids only, the chat of each. Users with no device yet still get an
//! inbox row, which their first device claims; the pointer names them, so
//! that device's ack deletes the row. docs/architecture.md walks through
//! each operation.
//!
//! Per recipient device this trades the inbox row's put and delete (2 write
//! units) for reads: the positions at send and at delivery, the pointers at
//! ack, and a position update per ack frame. docs/cost.md counts both.
//!
//! Ids are ULIDs, ordered by the time the sender's function made them, and
//! a row may land up to that function's timeout after its id's time. So a
//! position moves `after` only past ids older than [`LATE_ROW_MS`], and a new
//! position starts that far before the message that made it.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::messages::ulid_millis;
use super::rows::PositionRow;
use super::{DynamoTables, Item, QueryOf, in_parallel, key, n, now_secs, s, unique};
use crate::sdk_error;
use courier_core::domain::{InboxKey, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, MessageId};
use courier_core::ports::StoredMessage;

/// Recipient devices from which a chat message is stored once. A chat of
/// two users has at most five (three devices each, less the sender's), so
/// only groups are: there, per device, the inbox row costs more than the
/// reads that replace it.
pub(super) const SHARED_FROM: usize = 6;

/// How long after its id's time a message row may still land: more than
/// sendMessage's timeout (template.yaml: 10 s; functions/tests/template.rs
/// checks it), with room for clock skew.
pub const LATE_ROW_MS: Millis = 60_000;

/// Acked ids a position keeps above `after` before an ack moves `after`.
const COMPACT_AT: usize = 64;

/// Rows of the chat one compaction reads at most (one Query page).
const COMPACT_READ: i32 = 500;

/// A position is kept as long as the newest message it may hold; a send
/// pushes its expiry out when it would end more than this much earlier.
const REFRESH_SECS: i64 = 24 * 3600;

/// How long a message is kept at most (PROTOCOL.md: 30 days), with a day's margin.
const RETENTION_MS: Millis = 31 * 24 * 3600 * 1000;

/// An ack whose position changed under it reads it again, this often.
const ACK_ATTEMPTS: usize = 5;

/// Whether a message to these recipients is stored once.
pub(super) fn is_shared(recipients: &[InboxKey]) -> bool {
    recipients.iter().filter(|k| matches!(k, InboxKey::Device(..))).count() >= SHARED_FROM
}

/// The partition of one device's positions. Two `#`: never an inbox key.
pub(super) fn positions_of(inbox: &str) -> String {
    format!("positions#{inbox}")
}

fn pointer_of(id: &MessageId) -> String {
    format!("message#{id}#chat")
}

/// The smallest ULID of a millisecond: every id made then or later sorts after it.
fn ulid_floor(ms: Millis) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let ms = ms.max(0) as u64;
    let time: String = (0..10).rev().map(|i| DIGITS[((ms >> (5 * i)) & 31) as usize] as char).collect();
    format!("{time}{}", "0".repeat(16))
}

fn wall_clock() -> Millis {
    use courier_core::ports::{Clock, SystemClock};
    SystemClock.now()
}

impl PositionRow {
    fn holds(&self, id: &str) -> bool {
        self.held.binary_search_by(|h| h.as_str().cmp(id)).is_ok()
            || (id > self.after.as_str() && self.acked.binary_search_by(|a| a.as_str().cmp(id)).is_err())
    }

    /// Records the ack of `id`; false if the position did not hold it.
    fn ack(&mut self, id: &str) -> bool {
        if let Ok(at) = self.held.binary_search_by(|h| h.as_str().cmp(id)) {
            self.held.remove(at);
            return true;
        }
        if id <= self.after.as_str() {
            return false;
        }
        match self.acked.binary_search_by(|a| a.as_str().cmp(id)) {
            Ok(_) => false,
            Err(at) => {
                self.acked.insert(at, id.to_owned());
                true
            }
        }
    }

    /// Moves `after` up to `to`: `listing` are the chat's live rows in
    /// between that list this device; those not acked become `held`.
    fn advance(&mut self, to: &str, listing: Vec<String>) {
        for id in listing {
            if id.as_str() > self.after.as_str()
                && id.as_str() <= to
                && self.acked.binary_search(&id).is_err()
                && let Err(at) = self.held.binary_search(&id)
            {
                self.held.insert(at, id);
            }
        }
        self.acked.retain(|a| a.as_str() > to);
        self.after = to.to_owned();
    }
}

impl DynamoTables {
    /// Makes a group message reach its devices: its pointer, then a
    /// position for each device that has none in the chat (or one that
    /// would expire before the message). Before the send's answer, so a
    /// crash after it loses nothing.
    pub(super) async fn share(&self, message: &StoredMessage, expires_at: i64) -> Result<()> {
        let table = &self.names.inbox_table;
        let pending = message.recipients.iter().filter_map(|k| match k {
            InboxKey::Pending(user) => Some(user.to_string()),
            InboxKey::Device(..) => None,
        });
        let pointer = Pointer {
            message_id: message.id.clone(),
            chat_id: message.chat.clone(),
            pending: pending.collect(),
            expires_at,
        };
        self.client
            .put_item()
            .table_name(table)
            .set_item(Some(pointer.item()))
            .send()
            .await
            .map_err(sdk_error)?;

        let devices: Vec<String> = unique(&message.recipients)
            .iter()
            .filter(|k| matches!(k, InboxKey::Device(..)))
            .map(|k| positions_of(&k.key()))
            .collect();
        let lookups =
            devices.iter().map(|p| key([("inbox", p), ("messageId", message.chat.as_str())])).collect();
        // Eventually consistent: a position is never deleted before its
        // expiry, and the writes below are conditional on what they find.
        let found: HashMap<String, PositionRow> = self
            .get_batches_eventually(table, lookups, None)
            .await?
            .into_iter()
            .map(|item| position(item).map(|f| (f.inbox.clone(), f)))
            .collect::<Result<_>>()?;
        let floor = ulid_floor(message.timestamp - LATE_ROW_MS);
        let id = message.id.as_str();
        let writes = devices.into_iter().filter_map(|partition| {
            let (make, hold) = match found.get(&partition) {
                None => (true, false),
                // Made after this message should have made it (a first
                // attempt that died, retried later): it holds the id on its own.
                Some(f) => (f.expires_at < expires_at, id <= f.since.as_str()),
            };
            let (chat, floor) = (&message.chat, &floor);
            (make || hold).then_some(async move {
                let at = key([("inbox", &partition), ("messageId", chat.as_str())]);
                if make {
                    // Made, or its expiry pushed a day past the message's, in
                    // one write whichever: a racing send's or TTL's change in
                    // between only makes the condition fail or the item anew.
                    self.update(
                        table,
                        at.clone(),
                        "SET expiresAt = :e, #a = if_not_exists(#a, :f), #si = if_not_exists(#si, :f), \
                         #v = if_not_exists(#v, :zero)",
                        "attribute_not_exists(inbox) OR expiresAt < :e",
                        &[("#a", "after"), ("#si", "since"), ("#v", "version")],
                        vec![(":e", n(expires_at + REFRESH_SECS)), (":f", s(floor)), (":zero", n(0))],
                    )
                    .await?;
                }
                if hold {
                    self.update(
                        table,
                        at,
                        "SET #h = list_append(if_not_exists(#h, :none), :id), #v = #v + :one",
                        "#si >= :i AND NOT contains(#h, :i)",
                        &[("#h", "held"), ("#si", "since"), ("#v", "version")],
                        vec![
                            (":none", AttributeValue::L(Vec::new())),
                            (":id", AttributeValue::L(vec![s(id)])),
                            (":i", s(id)),
                            (":one", n(1)),
                        ],
                    )
                    .await?;
                }
                Ok(())
            })
        });
        in_parallel(writes.collect()).await.map(drop)
    }

    /// The pointers of these ids (group messages stored once), by id.
    async fn pointers(&self, ids: &[MessageId], consistent: bool) -> Result<HashMap<MessageId, Pointer>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let lookups: Vec<Item> =
            ids.iter().map(|id| key([("inbox", &pointer_of(id)), ("messageId", id.as_str())])).collect();
        let table = &self.names.inbox_table;
        let items = match consistent {
            true => self.get_batches(table, lookups, None).await?,
            false => self.get_batches_eventually(table, lookups, None).await?,
        };
        items.iter().map(|i| Pointer::from_item(i).map(|p| (p.message_id.clone(), p))).collect()
    }

    /// The chat of a group message stored once, while it lives; `None` for any other message.
    pub(super) async fn shared_chat(&self, id: &MessageId, now: Millis) -> Result<Option<ChatId>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.inbox_table)
            .set_key(Some(key([("inbox", &pointer_of(id)), ("messageId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(item) = out.item else { return Ok(None) };
        let pointer = Pointer::from_item(&item)?;
        Ok((pointer.expires_at > now_secs(now)).then_some(pointer.chat_id))
    }

    /// Every position of one device, by chat.
    pub(super) async fn positions(&self, inbox: &InboxKey) -> Result<BTreeMap<ChatId, PositionRow>> {
        if !matches!(inbox, InboxKey::Device(..)) {
            return Ok(BTreeMap::new());
        }
        let items = self.inbox_partition(&positions_of(&inbox.key()), None).await?;
        items.into_iter().map(|i| position(i).map(|p| (p.message_id.clone(), p))).collect()
    }

    /// A removed device's positions are reset, not deleted: they then hold
    /// nothing sent before now, so a new device that takes the same id
    /// starts empty, as a device new to a chat does (no message lists it
    /// there without making its position first).
    pub(super) async fn reset_positions(&self, inbox: &str) -> Result<()> {
        let floor = ulid_floor(wall_clock());
        let table = &self.names.inbox_table;
        let items = self.inbox_partition(&positions_of(inbox), Some("inbox, messageId")).await?;
        // One at a time: a device is in few group chats, and removing one is rare.
        for at in items {
            // The version moves on, so an ack that read the old state fails its condition.
            self.update(
                table,
                at,
                "SET #a = :f, #si = :f, #v = #v + :one REMOVE #h, #k",
                "attribute_exists(inbox)",
                &[("#a", "after"), ("#si", "since"), ("#h", "held"), ("#k", "acked"), ("#v", "version")],
                vec![(":f", s(&floor)), (":one", n(1))],
            )
            .await?;
        }
        Ok(())
    }

    /// Of these recipient keys of a group message, those still holding it.
    pub(super) async fn shared_holders(
        &self,
        chat: &ChatId,
        id: &MessageId,
        keys: &[InboxKey],
    ) -> Result<Vec<InboxKey>> {
        let lookups = unique(keys)
            .iter()
            .filter(|k| matches!(k, InboxKey::Device(..)))
            .map(|k| key([("inbox", &positions_of(&k.key())), ("messageId", chat.as_str())]))
            .collect();
        let mut holding = std::collections::HashSet::new();
        for item in self.get_batches(&self.names.inbox_table, lookups, None).await? {
            let position = position(item)?;
            if position.holds(id.as_str()) {
                holding.insert(position.inbox);
            }
        }
        Ok(keys.iter().filter(|k| holding.contains(&positions_of(&k.key()))).cloned().collect())
    }

    /// Up to `limit` group messages of one chat that this device holds,
    /// after `cursor`, oldest first. A device the chat's newer rows hold
    /// nothing for has its position moved past them, so the next sync
    /// does not read them again.
    pub(super) async fn shared_page(
        &self,
        inbox: &InboxKey,
        position: &PositionRow,
        cursor: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>> {
        let chat = position.message_id.as_str();
        let mut page = Vec::new();
        // Held ids past the cursor, a page's worth at a time until enough
        // of them are live (an expired one is skipped, not counted).
        let held: Vec<&String> =
            position.held.iter().filter(|h| cursor.is_none_or(|c| h.as_str() > c.as_str())).collect();
        for chunk in held.chunks(limit.max(1)) {
            let keys = chunk.iter().map(|h| key([("chatId", chat), ("messageId", h)])).collect();
            let mut live = Vec::new();
            for item in self.get_batches(&self.names.messages_table, keys, None).await? {
                live.extend(live_body(&item, now)?);
            }
            live.sort_by(|a, b| a.0.cmp(&b.0));
            page.extend(live);
            if page.len() >= limit {
                break;
            }
        }
        let scanned_from_after = cursor.is_none_or(|c| c.as_str() <= position.after.as_str());
        let from = match cursor {
            Some(c) if !scanned_from_after => c.as_str(),
            _ => position.after.as_str(),
        };
        let mut start = None;
        let mut newer = 0;
        while newer < limit {
            let query = QueryOf {
                key: "chatId = :c AND messageId > :from",
                filter: Some("contains(#s.recipients, :me) AND expiresAt > :now"),
                projection: Some("messageId, #s.body, expiresAt"),
                names: &[("#s", "shared")],
                limit: Some((limit - newer).min(i32::MAX as usize) as i32),
                start: start.take(),
            };
            let values = vec![
                (":c", s(chat)),
                (":from", s(from)),
                (":me", s(inbox.key())),
                (":now", n(now_secs(now))),
            ];
            let found = self.query_page(&self.names.messages_table, query, values).await?;
            for item in found.items {
                if let Some((id, body)) = live_body(&item, now)?
                    && position.acked.binary_search_by(|a| a.as_str().cmp(id.as_str())).is_err()
                {
                    page.push((id, body));
                    newer += 1;
                }
            }
            start = found.next;
            if start.is_none() {
                break;
            }
        }
        // Read to the chat's end from `after`, and nothing there for this
        // device: no row older than a minute can still come.
        if scanned_from_after && start.is_none() && newer == 0 {
            let to = ulid_floor(wall_clock() - LATE_ROW_MS);
            if to.as_str() > position.after.as_str() {
                let mut next = position.clone();
                next.advance(&to, Vec::new());
                self.save_position(&next, position.version).await?;
            }
        }
        Ok(page)
    }

    /// Acks group messages: each id is looked up for its chat, and each
    /// chat's position of this device moves once. Returns the ids it held
    /// with their chats; the ids with no pointer; and those a pointer
    /// names but no position took, which may be inbox rows (a message kept
    /// for a user with no device yet, claimed by their first device).
    pub(super) async fn ack_shared(
        &self,
        inbox: &InboxKey,
        ids: &[MessageId],
        consistent: bool,
        positions: &BTreeMap<ChatId, PositionRow>,
    ) -> Result<AckedShared> {
        if positions.is_empty() || ids.is_empty() {
            return Ok(AckedShared { unknown: ids.to_vec(), ..AckedShared::default() });
        }
        let found = self.pointers(ids, consistent).await?;
        let mut by_chat: BTreeMap<&ChatId, Vec<&MessageId>> = BTreeMap::new();
        let mut done = AckedShared::default();
        let user = inbox.user();
        for id in ids {
            match found.get(id) {
                None => done.unknown.push(id.clone()),
                Some(p)
                    if !p.pending.iter().any(|u| u == user.as_str())
                        && positions.contains_key(&p.chat_id) =>
                {
                    by_chat.entry(&p.chat_id).or_default().push(id)
                }
                Some(_) => done.untaken.push(id.clone()),
            }
        }
        // One chat after another: an ack frame names one chat's ids, as a rule.
        for (chat, asked) in by_chat {
            let acked = self.move_position(positions[chat].clone(), &asked).await?;
            done.untaken.extend(asked.into_iter().filter(|id| !acked.contains(id)).cloned());
            done.acked.extend(acked.into_iter().map(|id| (id, Some(chat.clone()))));
        }
        Ok(done)
    }

    /// Records the acks of `ids` on one position, conditional on its
    /// version; read again and retried if another write moved it meanwhile.
    async fn move_position(&self, mut position: PositionRow, ids: &[&MessageId]) -> Result<Vec<MessageId>> {
        for _ in 0..ACK_ATTEMPTS {
            let mut next = position.clone();
            let acked: Vec<MessageId> =
                ids.iter().filter(|id| next.ack(id.as_str())).map(|&id| id.clone()).collect();
            if acked.is_empty() {
                return Ok(acked);
            }
            // What is held past retention is gone from the chat anyway.
            let expired = ulid_floor(wall_clock() - RETENTION_MS);
            next.held.retain(|h| h.as_str() > expired.as_str());
            if next.acked.len() > COMPACT_AT {
                self.compact(&mut next).await?;
            }
            if self.save_position(&next, position.version).await? {
                return Ok(acked);
            }
            // Read again (a Query of the one item: the call sync already makes).
            let query = QueryOf { key: "inbox = :p AND messageId = :c", ..QueryOf::default() };
            let values = vec![(":p", s(&position.inbox)), (":c", s(position.message_id.as_str()))];
            let again = self.query_page(&self.names.inbox_table, query, values).await?;
            match again.items.into_iter().next() {
                Some(item) => position = self::position(item)?,
                // Gone meanwhile (expired): nothing left to ack.
                None => return Ok(Vec::new()),
            }
        }
        Err(Error::unavailable("an inbox position kept changing under its ack; retry"))
    }

    /// Writes a position's `after`, `held` and `acked` if its version is
    /// still `version` (never its expiry, which sends push out); false if
    /// another write moved it first.
    async fn save_position(&self, position: &PositionRow, version: u64) -> Result<bool> {
        let list = |ids: &[String]| AttributeValue::L(ids.iter().map(|id| s(id.as_str())).collect());
        let mut set = vec!["#a = :a", "#v = :next"];
        let mut remove = Vec::new();
        let mut values =
            vec![(":a", s(&position.after)), (":v", n(version as i64)), (":next", n(version as i64 + 1))];
        for (name, value, ids) in [("#h", ":h", &position.held), ("#k", ":k", &position.acked)] {
            if ids.is_empty() {
                remove.push(name);
            } else {
                set.push(if name == "#h" { "#h = :h" } else { "#k = :k" });
                values.push((value, list(ids)));
            }
        }
        let mut expression = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        let at = key([("inbox", &position.inbox), ("messageId", position.message_id.as_str())]);
        let names = [("#a", "after"), ("#h", "held"), ("#k", "acked"), ("#v", "version")];
        self.update(&self.names.inbox_table, at, &expression, "#v = :v", &names, values).await
    }

    /// Moves `after` up to the newest acked id old enough that no row older
    /// can still land, reading which rows in between list this device.
    async fn compact(&self, position: &mut PositionRow) -> Result<()> {
        let now = wall_clock();
        let Some(newest) = position
            .acked
            .iter()
            .rev()
            .find(|a| ulid_millis(a).is_some_and(|t| t < now - LATE_ROW_MS))
            .cloned()
        else {
            return Ok(());
        };
        let me = position.inbox.strip_prefix("positions#").unwrap_or_default().to_owned();
        // One page of rows at most, so an ack never reads a long stretch
        // of the chat at once: `after` then stops at the last row read.
        let query = QueryOf {
            key: "chatId = :c AND messageId BETWEEN :from AND :to",
            filter: Some("contains(#s.recipients, :me) AND expiresAt > :now"),
            projection: Some("messageId"),
            names: &[("#s", "shared")],
            limit: Some(COMPACT_READ),
            start: None,
        };
        let values = vec![
            (":c", s(position.message_id.as_str())),
            (":from", s(&position.after)),
            (":to", s(&newest)),
            (":me", s(me)),
            (":now", n(now_secs(now))),
        ];
        let out = self.query_page(&self.names.messages_table, query, values).await?;
        let id_of = |mut item: Item| match item.remove("messageId") {
            Some(AttributeValue::S(id)) => Some(id),
            _ => None,
        };
        let to = match out.next {
            Some(last) => id_of(last).ok_or_else(|| Error::internal("a Messages key without messageId"))?,
            None => newest,
        };
        let listing = out.items.into_iter().filter_map(id_of).collect();
        position.advance(&to, listing);
        Ok(())
    }

    /// The clean-up's part for group messages: the text of each one no
    /// device holds any more goes (the row stays for its dedupe key and
    /// the fan-out's safety net, as the mark leaves other rows), and the
    /// recipients of one still held shrink to those holding it, so the
    /// next run reads only theirs. Returns how many texts went.
    pub(super) async fn drop_finished_shared(&self, now: Millis) -> Result<u64> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.names.messages_table)
            .filter_expression("attribute_exists(#s) AND expiresAt > :now")
            .projection_expression("chatId, messageId, #s.recipients")
            .expression_attribute_names("#s", "shared")
            .expression_attribute_values(":now", n(now_secs(now)))
            .into_paginator()
            .send();
        let mut dropped = 0;
        while let Some(page) = pages.next().await {
            let page = page.map_err(sdk_error)?;
            // The page's messages, then all their devices' positions in one
            // batched read, then a write for each message that changes.
            let mut listed = Vec::new();
            let mut lookups = std::collections::BTreeSet::new();
            for item in page.items.unwrap_or_default() {
                let (chat, id): (ChatId, MessageId) = (id(&item, "chatId")?, id(&item, "messageId")?);
                let shared = item.get("shared").and_then(|v| v.as_m().ok());
                let keys: Vec<InboxKey> = shared
                    .map(|m| texts(m, "recipients"))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|k| InboxKey::parse(k))
                    .collect();
                for k in keys.iter().filter(|k| matches!(k, InboxKey::Device(..))) {
                    lookups.insert((positions_of(&k.key()), chat.to_string()));
                }
                listed.push((chat, id, keys));
            }
            let mut positions = HashMap::new();
            let lookups = lookups
                .iter()
                .map(|(p, c)| key([("inbox", p.as_str()), ("messageId", c.as_str())]))
                .collect();
            for item in self.get_batches(&self.names.inbox_table, lookups, None).await? {
                let position = position(item)?;
                positions.insert((position.inbox.clone(), position.message_id.clone()), position);
            }
            for (chat, id, keys) in listed {
                let holds = |k: &InboxKey| {
                    positions
                        .get(&(positions_of(&k.key()), chat.clone()))
                        .is_some_and(|p| p.holds(id.as_str()))
                };
                let devices = keys.iter().filter(|k| matches!(k, InboxKey::Device(..))).count();
                let holding = keys.iter().filter(|k| holds(k)).count();
                let at = key([("chatId", chat.as_str()), ("messageId", id.as_str())]);
                let (table, exists, names) =
                    (&self.names.messages_table, "attribute_exists(#s)", &[("#s", "shared")]);
                if holding == 0 {
                    dropped +=
                        u64::from(self.update(table, at, "REMOVE #s", exists, names, Vec::new()).await?);
                } else if holding < devices {
                    // The users with no device yet keep their own inbox rows.
                    let keep = keys.iter().filter(|k| matches!(k, InboxKey::Pending(_)) || holds(k));
                    let keep = AttributeValue::L(keep.map(|k| s(k.key())).collect());
                    self.update(table, at, "SET #s.recipients = :keep", exists, names, vec![(":keep", keep)])
                        .await?;
                }
            }
        }
        Ok(dropped)
    }
}

/// What [`DynamoTables::ack_shared`] made of an ack's ids.
#[derive(Default)]
pub(super) struct AckedShared {
    /// Held by a position, now acked, with their chat.
    pub(super) acked: Vec<(MessageId, Option<ChatId>)>,
    /// No pointer found.
    pub(super) unknown: Vec<MessageId>,
    /// A pointer found, but no position took the id.
    pub(super) untaken: Vec<MessageId>,
}

/// A position as read, its lists sorted (a retried send appends to `held`).
///
/// This module reads and writes its items by hand, not through serde_dynamo:
/// each struct that crate deserializes costs every Lambda bootstrap that
/// links the table adapter several KB, and they have a size budget.
fn position(item: Item) -> Result<PositionRow> {
    let mut held = texts(&item, "held");
    let mut acked = texts(&item, "acked");
    held.sort();
    held.dedup();
    acked.sort();
    acked.dedup();
    Ok(PositionRow {
        inbox: required(text(&item, "inbox"), "inbox")?,
        // The chat, under the Inbox table's sort key.
        message_id: id(&item, "messageId")?,
        after: required(text(&item, "after"), "after")?,
        since: text(&item, "since").unwrap_or_default(),
        held,
        acked,
        version: number(&item, "version").unwrap_or_default() as u64,
        expires_at: number(&item, "expiresAt").unwrap_or_default(),
    })
}

/// Names a group message's chat, for an ack (which names ids only): the
/// item `message#id#chat`, id.
pub(super) struct Pointer {
    pub(super) message_id: MessageId,
    pub(super) chat_id: ChatId,
    /// The users who had no device at the send: their copy is an inbox
    /// row, which their first device claims and acks as such.
    pub(super) pending: Vec<String>,
    pub(super) expires_at: i64,
}

impl Pointer {
    fn item(&self) -> Item {
        let mut item =
            key([("inbox", &pointer_of(&self.message_id)), ("messageId", self.message_id.as_str())]);
        item.insert("chatId".into(), s(self.chat_id.as_str()));
        item.insert("expiresAt".into(), n(self.expires_at));
        if !self.pending.is_empty() {
            item.insert(
                "pending".into(),
                AttributeValue::L(self.pending.iter().map(|u| s(u.as_str())).collect()),
            );
        }
        item
    }

    fn from_item(item: &Item) -> Result<Self> {
        Ok(Self {
            message_id: id(item, "messageId")?,
            chat_id: id(item, "chatId")?,
            pending: texts(item, "pending"),
            expires_at: number(item, "expiresAt").unwrap_or_default(),
        })
    }
}

/// A group message's id and text as sync reads them, unless expired or already dropped.
fn live_body(item: &Item, now: Millis) -> Result<Option<(MessageId, String)>> {
    let live = number(item, "expiresAt").is_some_and(|e| e > now_secs(now));
    let body = item.get("shared").and_then(|v| v.as_m().ok()).and_then(|m| text(m, "body"));
    match body {
        Some(body) if live => Ok(Some((id(item, "messageId")?, body))),
        _ => Ok(None),
    }
}

fn text(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

fn texts(item: &Item, name: &str) -> Vec<String> {
    match item.get(name) {
        Some(AttributeValue::L(values)) => values.iter().filter_map(|v| v.as_s().ok().cloned()).collect(),
        _ => Vec::new(),
    }
}

fn number(item: &Item, name: &str) -> Option<i64> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

fn required<T>(value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| Error::internal(format!("an item without {name}")))
}

/// An id attribute, checked as its type checks it.
fn id<T: TryFrom<String, Error = String>>(item: &Item, name: &str) -> Result<T> {
    T::try_from(required(text(item, name), name)?).map_err(Error::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(after: &str) -> PositionRow {
        PositionRow {
            inbox: "positions#bob#phone".into(),
            message_id: ChatId::try_from("chat".to_owned()).unwrap(),
            after: after.into(),
            since: after.into(),
            held: Vec::new(),
            acked: Vec::new(),
            version: 0,
            expires_at: 0,
        }
    }

    #[test]
    fn a_floor_sorts_before_every_id_of_its_millisecond_and_after_every_earlier_one() {
        // A fresh generator each time: one generator never goes back in time.
        let id = |ms| courier_core::ids::IdGen::new().message(ms);
        for ms in [0, 1, 1_800_000_000_123] {
            let floor = ulid_floor(ms);
            assert_eq!(ulid_millis(&floor), Some(ms));
            assert!(floor.as_str() <= id(ms).as_str());
            if ms > 0 {
                assert!(floor.as_str() > id(ms - 1).as_str());
            }
        }
    }

    #[test]
    fn a_position_holds_what_it_has_not_acked_and_keeps_skipped_ids_when_it_moves() {
        let mut p = position("B");
        assert!(!p.holds("A"), "before after: not held");
        assert!(p.holds("C") && p.holds("D"));
        assert!(p.ack("D") && !p.ack("D"), "an id is acked once");
        assert!(!p.ack("A"), "nothing before after is held");
        assert!(p.holds("C") && !p.holds("D"));
        // The chat's rows for this device up to E were C, D and E: C was skipped.
        assert!(p.ack("E"));
        p.advance("E", vec!["C".into(), "D".into(), "E".into()]);
        assert_eq!((p.after.as_str(), p.held.clone(), p.acked.clone()), ("E", vec!["C".to_owned()], vec![]));
        assert!(p.holds("C") && !p.holds("D") && !p.holds("E") && p.holds("F"));
        assert!(p.ack("C") && !p.holds("C") && p.held.is_empty());
    }
}
