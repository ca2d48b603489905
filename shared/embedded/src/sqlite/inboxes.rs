//! Which inbox holds which message, in memory: rebuilt from the log and the ack cursors at open.
//!
//! The log (table `log`) holds each message once, with the inboxes it went
//! to; an inbox's cursor (table `cursors`) holds the highest log position it
//! has acked and the positions below that it still holds (usually none). What
//! an inbox holds follows from the two, so a send appends one row whatever the
//! number of recipients and an ack writes one cursor row whatever the number
//! of ids: nothing lands on a page of its own per recipient. This index is
//! what the database would otherwise keep per recipient; the writer thread is
//! the only one that changes it, and always after its statements succeeded,
//! so a failed write leaves it as it was (a failed commit rebuilds it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rusqlite::{Connection, params};

use super::rows::{from_json, id, json};
use courier_core::domain::Millis;
use courier_core::ids::MessageId;

/// A row of the log, by its position.
pub(super) type Seq = i64;

/// Bytes of message bodies kept in memory beside the index, shared by
/// every inbox holding the message: a sync or an ack reads no row for them.
/// Past it, bodies are read from the log.
const BODY_BUDGET: usize = 64 << 20;

/// A message an inbox holds: where its body is (and the body itself, while
/// the budget allows), and when it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Held {
    pub seq: Seq,
    pub expires_at: Millis,
    pub body: Option<Arc<str>>,
}

/// A row some inbox still holds.
#[derive(Debug)]
struct Live {
    holding: u32,
    /// Bytes of its body kept in memory (0: none).
    cached: usize,
}

/// How far an inbox has acked: every position up to `position` except `held`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    pub position: Seq,
    pub held: Vec<Seq>,
}

#[derive(Debug, Default)]
struct Inbox {
    pending: BTreeMap<MessageId, Held>,
    /// The same rows by position, so an ack finds those below its new
    /// position without walking the whole inbox.
    seqs: BTreeSet<Seq>,
    /// None until the inbox first acks: it holds every row that names it.
    cursor: Option<Cursor>,
}

impl Inbox {
    fn hold(&mut self, message: MessageId, held: Held) {
        self.seqs.insert(held.seq);
        if let Some(before) = self.pending.insert(message, held) {
            self.seqs.remove(&before.seq);
        }
    }

    fn take(&mut self, message: &MessageId) -> Option<Held> {
        let held = self.pending.remove(message)?;
        self.seqs.remove(&held.seq);
        Some(held)
    }
}

#[derive(Debug, Default)]
pub(super) struct Inboxes {
    inboxes: HashMap<String, Inbox>,
    /// Rows with a body still kept, and how many inboxes hold each.
    live: HashMap<Seq, Live>,
    /// Bytes of bodies held in memory, at most [`BODY_BUDGET`].
    cached: usize,
    /// Every row up to here is committed; the writer may have appended
    /// rows past it, which no reader is shown until their commit.
    committed: Seq,
    /// Rows no inbox holds any more, whose bodies compaction drops.
    done: Vec<Seq>,
    /// A compaction write is queued and has not taken `done` yet.
    compaction_queued: bool,
    /// (chat, dedupe key), hashed, to the row that first used it. A lookup
    /// reads the row and compares, so a collision costs a read, never a wrong answer.
    dedupe: HashMap<u64, Seq>,
    next: Seq,
}

/// What an ack changes: the rows it takes out of the inbox, and the cursor after.
pub(super) struct Acked {
    pub rows: Vec<(MessageId, Held)>,
    pub cursor: Cursor,
}

pub(super) fn dedupe_hash(chat: &str, dedupe: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (chat, dedupe).hash(&mut h);
    h.finish()
}

/// A cursor's row, written whole.
pub(super) fn save_cursor(c: &Connection, key: &str, cursor: &Cursor) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO cursors (inbox, position, held) VALUES (?1, ?2, ?3)
         ON CONFLICT (inbox) DO UPDATE SET position = excluded.position, held = excluded.held",
    )?
    .execute(params![key, cursor.position, json(&cursor.held)])
    .map(drop)
}

impl Inboxes {
    /// Reads the cursors, then every row of the log.
    pub(super) fn rebuild(c: &Connection) -> rusqlite::Result<Self> {
        let mut this = Inboxes::default();
        let mut stmt = c.prepare("SELECT inbox, position, held FROM cursors")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let held: String = r.get(2)?;
            let cursor = Cursor { position: r.get(1)?, held: from_json(&held)? };
            this.next = this.next.max(cursor.position + 1);
            this.inboxes.insert(r.get(0)?, Inbox { cursor: Some(cursor), ..Inbox::default() });
        }
        let mut stmt = c.prepare(
            "SELECT seq, message_id, chat_id, recipients, dedupe, expires_at FROM log ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let seq: Seq = r.get(0)?;
            this.next = this.next.max(seq + 1);
            if let (Some(chat), Some(key)) = (r.get::<_, Option<String>>(2)?, r.get::<_, Option<String>>(4)?)
            {
                this.dedupe.insert(dedupe_hash(&chat, &key), seq);
            }
            let Some(recipients) = r.get::<_, Option<String>>(3)? else { continue };
            let recipients: Vec<String> = from_json(&recipients)?;
            let message: MessageId = id(r.get(1)?)?;
            let held = Held { seq, expires_at: r.get(5)?, body: None };
            let mut holding = 0;
            for key in recipients {
                let inbox = this.inboxes.entry(key).or_default();
                let acked = inbox
                    .cursor
                    .as_ref()
                    .is_some_and(|c| seq <= c.position && c.held.binary_search(&seq).is_err());
                if !acked {
                    inbox.hold(message.clone(), held.clone());
                    holding += 1;
                }
            }
            this.settle(seq, holding, 0);
        }
        this.mark_committed();
        Ok(this)
    }

    /// The position the next appended row takes.
    pub(super) fn next_seq(&self) -> Seq {
        self.next.max(1)
    }

    pub(super) fn first_with(&self, chat: &str, dedupe: &str) -> Option<Seq> {
        self.dedupe.get(&dedupe_hash(chat, dedupe)).copied()
    }

    /// A row appended at `seq`, held by each of `recipients` (no repeats).
    pub(super) fn append(
        &mut self,
        seq: Seq,
        message: &MessageId,
        recipients: &[String],
        expires_at: Millis,
        dedupe: Option<u64>,
        body: &str,
    ) {
        self.next = seq + 1;
        let keep = !recipients.is_empty() && self.cached + body.len() <= BODY_BUDGET;
        let held = Held { seq, expires_at, body: keep.then(|| Arc::from(body)) };
        for key in recipients {
            self.inboxes.entry(key.clone()).or_default().hold(message.clone(), held.clone());
        }
        if let Some(hash) = dedupe {
            self.dedupe.insert(hash, seq);
        }
        self.settle(seq, recipients.len() as u32, if keep { body.len() } else { 0 });
    }

    /// Every row appended so far is committed.
    pub(super) fn mark_committed(&mut self) {
        self.committed = self.next - 1;
    }

    fn settle(&mut self, seq: Seq, holding: u32, cached: usize) {
        if holding == 0 {
            self.done.push(seq);
        } else {
            self.cached += cached;
            self.live.insert(seq, Live { holding, cached });
        }
    }

    fn release(&mut self, seq: Seq) {
        if let Some(live) = self.live.get_mut(&seq) {
            live.holding -= 1;
            if live.holding == 0 {
                self.cached -= live.cached;
                self.live.remove(&seq);
                self.done.push(seq);
            }
        }
    }

    /// Whether the inbox holds the message, unexpired at `now`.
    pub(super) fn holds(&self, key: &str, message: &MessageId, now: Millis) -> bool {
        self.inboxes
            .get(key)
            .and_then(|inbox| inbox.pending.get(message))
            .is_some_and(|held| held.expires_at > now)
    }

    /// Up to `limit` unexpired messages the inbox holds after `after`,
    /// oldest first, ending before the first not yet committed (so that no
    /// later cursor skips it).
    pub(super) fn page(
        &self,
        key: &str,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Vec<(MessageId, Held)> {
        let Some(inbox) = self.inboxes.get(key) else { return Vec::new() };
        let range = match after {
            Some(after) => inbox
                .pending
                .range::<MessageId, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => inbox.pending.range::<MessageId, _>(..),
        };
        range
            .filter(|(_, held)| held.expires_at > now)
            .take_while(|(_, held)| held.seq <= self.committed)
            .take(limit)
            .map(|(message, held)| (message.clone(), held.clone()))
            .collect()
    }

    /// What acking `ids` would change in the inbox; `None` if it holds none of them.
    pub(super) fn plan_ack(&self, key: &str, ids: &[MessageId]) -> Option<Acked> {
        let inbox = self.inboxes.get(key)?;
        let mut rows: Vec<(MessageId, Held)> =
            ids.iter().filter_map(|m| inbox.pending.get(m).map(|held| (m.clone(), held.clone()))).collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        let top = rows.iter().map(|(_, held)| held.seq).max()?;
        let position = inbox.cursor.as_ref().map_or(0, |c| c.position).max(top);
        let mut acked: Vec<Seq> = rows.iter().map(|(_, held)| held.seq).collect();
        acked.sort_unstable();
        let held: Vec<Seq> =
            inbox.seqs.range(..=position).filter(|seq| acked.binary_search(seq).is_err()).copied().collect();
        Some(Acked { rows, cursor: Cursor { position, held } })
    }

    pub(super) fn apply_ack(&mut self, key: &str, acked: Acked) {
        let Some(inbox) = self.inboxes.get_mut(key) else { return };
        for (message, _) in &acked.rows {
            inbox.take(message);
        }
        inbox.cursor = Some(acked.cursor);
        for (_, held) in acked.rows {
            self.release(held.seq);
        }
    }

    /// The rows the inbox holds, and whether it ever acked (so that rows
    /// it acked may still name it).
    pub(super) fn holdings(&self, key: &str) -> (Vec<(MessageId, Held)>, Option<Seq>) {
        match self.inboxes.get(key) {
            Some(inbox) => (
                inbox.pending.iter().map(|(m, h)| (m.clone(), h.clone())).collect(),
                inbox.cursor.as_ref().map(|c| c.position),
            ),
            None => (Vec::new(), None),
        }
    }

    /// Live rows at or below `position`: those an inbox with that cursor may have acked.
    pub(super) fn live_through(&self, position: Seq) -> Vec<Seq> {
        let mut seqs: Vec<Seq> = self.live.keys().copied().filter(|s| *s <= position).collect();
        seqs.sort_unstable();
        seqs
    }

    /// The inbox is gone: no row names it any more (the caller rewrote them).
    pub(super) fn apply_drop(&mut self, key: &str) {
        if let Some(inbox) = self.inboxes.remove(key) {
            for held in inbox.pending.values() {
                self.release(held.seq);
            }
        }
    }

    /// `from`'s rows move to `to`; those `to` already holds are dropped from
    /// `from` (false in the list). Also `to`'s cursor after the move, if it changes.
    pub(super) fn plan_claim(&self, from: &str, to: &str) -> (Vec<(MessageId, Held, bool)>, Option<Cursor>) {
        let (rows, _) = self.holdings(from);
        let target = self.inboxes.get(to);
        let moves: Vec<(MessageId, Held, bool)> = rows
            .into_iter()
            .map(|(m, h)| {
                let moves = !target.is_some_and(|t| t.pending.contains_key(&m));
                (m, h, moves)
            })
            .collect();
        // A row at or below the target's position must be held explicitly.
        let cursor = target.and_then(|t| t.cursor.clone()).and_then(|mut c| {
            let below: Vec<Seq> = moves
                .iter()
                .filter(|(_, h, moved)| *moved && h.seq <= c.position)
                .map(|(_, h, _)| h.seq)
                .collect();
            if below.is_empty() {
                return None;
            }
            c.held.extend(below);
            c.held.sort_unstable();
            Some(c)
        });
        (moves, cursor)
    }

    pub(super) fn apply_claim(
        &mut self,
        from: &str,
        to: &str,
        moves: &[(MessageId, Held, bool)],
        cursor: Option<Cursor>,
    ) {
        self.inboxes.remove(from);
        let target = self.inboxes.entry(to.to_owned()).or_default();
        for (message, held, moved) in moves {
            if *moved {
                target.hold(message.clone(), held.clone());
            }
        }
        if let Some(cursor) = cursor {
            target.cursor = Some(cursor);
        }
        for (_, held, moved) in moves {
            if !moved {
                self.release(held.seq);
            }
        }
    }

    /// Rows deleted from the log (expired): out of every inbox, and out of the dedupe index.
    pub(super) fn forget(
        &mut self,
        seq: Seq,
        message: &MessageId,
        recipients: &[String],
        dedupe: Option<u64>,
    ) {
        for key in recipients {
            if let Some(inbox) = self.inboxes.get_mut(key) {
                if inbox.pending.get(message).is_some_and(|h| h.seq == seq) {
                    inbox.take(message);
                }
                if inbox.pending.is_empty() && inbox.cursor.is_none() {
                    self.inboxes.remove(key);
                }
            }
        }
        if let Some(live) = self.live.remove(&seq) {
            self.cached -= live.cached;
        }
        if let Some(hash) = dedupe
            && self.dedupe.get(&hash) == Some(&seq)
        {
            self.dedupe.remove(&hash);
        }
    }

    /// Rows no inbox holds, taken by the compaction write.
    pub(super) fn take_done(&mut self) -> Vec<Seq> {
        self.compaction_queued = false;
        std::mem::take(&mut self.done)
    }

    /// Whether a compaction write should be queued: rows are done and none is queued yet.
    pub(super) fn compaction_wanted(&mut self) -> bool {
        let wanted = !self.done.is_empty() && !self.compaction_queued;
        self.compaction_queued |= wanted;
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u32) -> MessageId {
        MessageId::try_from(format!("01JDX00000000000000000{n:04}")).unwrap()
    }

    #[test]
    fn an_ack_moves_the_position_and_keeps_what_was_skipped() {
        let mut ix = Inboxes::default();
        for n in 1..=4 {
            ix.append(n as Seq, &m(n), &["bob#p".into(), "eve#p".into()], i64::MAX, None, "body");
        }
        ix.mark_committed();
        let acked = ix.plan_ack("bob#p", &[m(1), m(3)]).unwrap();
        assert_eq!(acked.cursor, Cursor { position: 3, held: vec![2] });
        ix.apply_ack("bob#p", acked);
        let page: Vec<Seq> = ix.page("bob#p", None, 10, 0).into_iter().map(|(_, h)| h.seq).collect();
        assert_eq!(page, vec![2, 4]);
        assert!(ix.plan_ack("bob#p", &[m(1)]).is_none(), "acked once, gone");
        assert!(!ix.compaction_wanted(), "eve holds them all");
        let acked = ix.plan_ack("eve#p", &[m(1), m(2)]).unwrap();
        ix.apply_ack("eve#p", acked);
        assert_eq!(ix.take_done(), vec![1]);
        assert_eq!(ix.cached, 3 * 4, "the body of every row still held stays in memory, once");
    }

    #[test]
    fn a_page_ends_before_the_first_row_not_yet_committed() {
        let mut ix = Inboxes::default();
        ix.append(1, &m(1), &["bob#p".into()], i64::MAX, None, "one");
        ix.mark_committed();
        ix.append(2, &m(2), &["bob#p".into()], i64::MAX, None, "two");
        let page: Vec<MessageId> = ix.page("bob#p", None, 10, 0).into_iter().map(|(m, _)| m).collect();
        assert_eq!(page, vec![m(1)]);
        ix.mark_committed();
        assert_eq!(ix.page("bob#p", None, 10, 0).len(), 2);
    }
}
