//! The key directory and device routing of encrypted chats: uploadKeys,
//! getKeys, listDevices, sendToDevices, the device check and deviceList pushes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::instrument;

use super::Courier;
use crate::domain::{Caller, Device, InboxKey, Millis};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, UserId};
use crate::ports::{ClaimCount, DeviceKeys, Job, KeyUpload, OneTimeKey, PushTarget, SignedKey, Uploaded};
use crate::protocol::{
    self, DeviceIdentities, DeviceIdentity, DeviceList, DeviceMessage, DevicesSent, GetKeys, KeyBundle,
    KeyBundles, KeysLow, KeysStored, ListDevices, RecipientDevice, SendToDevices, ServerFrame, UploadKeys,
};

const HOUR_MS: Millis = 60 * 60 * 1000;

/// A ready device: live (not expired) and with published keys.
pub(super) struct Ready {
    pub device: Device,
    pub keys: DeviceKeys,
}

impl Ready {
    pub fn recipient(&self) -> RecipientDevice {
        RecipientDevice {
            user_id: self.keys.user.clone(),
            device_id: self.keys.device.clone(),
            identity_key: self.keys.identity_key.clone(),
        }
    }
}

/// The device check's digest: lowercase hex SHA-256 of the lines
/// `USERID DEVICEID IDENTITYKEY\n`, sorted by byte value, concatenated.
pub fn devices_digest(devices: &[RecipientDevice]) -> String {
    let mut lines: Vec<String> =
        devices.iter().map(|d| format!("{} {} {}\n", d.user_id, d.device_id, d.identity_key)).collect();
    lines.sort();
    hex::encode(Sha256::digest(lines.concat().as_bytes()))
}

impl Courier {
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %caller.device))]
    pub async fn upload_keys(&self, caller: &Caller, cmd: UploadKeys) -> Result<KeysStored> {
        let l = &self.limits;
        if let Some(identity) = &cmd.identity_key {
            check_text("identityKey", identity, l.max_identity_key_chars)?;
        }
        for (name, key) in [("signedPreKey", &cmd.signed_pre_key), ("fallbackKey", &cmd.fallback_key)] {
            if let Some(key) = key {
                self.check_signed(name, key)?;
            }
        }
        if cmd.one_time_pre_keys.len() > l.max_one_time_keys_per_upload {
            return Err(Error::LimitExceeded(format!(
                "an upload carries at most {} one-time prekeys",
                l.max_one_time_keys_per_upload
            )));
        }
        for key in &cmd.one_time_pre_keys {
            check_text("oneTimePreKeys.keyId", &key.key_id, l.max_key_id_chars)?;
            check_text("oneTimePreKeys.publicKey", &key.public_key, l.max_key_chars)?;
        }
        let upload = KeyUpload {
            identity_key: cmd.identity_key,
            signed_pre_key: cmd.signed_pre_key,
            one_time_pre_keys: cmd.one_time_pre_keys,
            fallback_key: cmd.fallback_key,
        };
        if upload == KeyUpload::default() {
            let n = self.ports.keys.one_time_key_count(&caller.user, &caller.device).await?;
            return Ok(KeysStored { one_time_pre_keys: n });
        }
        match self.ports.keys.upload_keys(&caller.user, &caller.device, &upload, l.max_one_time_keys).await? {
            Uploaded::Stored { one_time_keys, became_ready } => {
                if became_ready {
                    self.announce_devices(&caller.user, None).await;
                }
                Ok(KeysStored { one_time_pre_keys: one_time_keys })
            }
            Uploaded::NotReady => Err(Error::BadRequest(
                "the first upload of a device must carry identityKey and signedPreKey".into(),
            )),
            Uploaded::IdentityMismatch => Err(Error::Forbidden(
                "this device has another identityKey; remove the device to change it".into(),
            )),
            Uploaded::TooManyOneTimeKeys => Err(Error::LimitExceeded(format!(
                "a device holds at most {} one-time prekeys",
                l.max_one_time_keys
            ))),
        }
    }

    fn check_signed(&self, name: &str, key: &SignedKey) -> Result<()> {
        let l = &self.limits;
        check_text(&format!("{name}.keyId"), &key.key_id, l.max_key_id_chars)?;
        check_text(&format!("{name}.publicKey"), &key.public_key, l.max_key_chars)?;
        check_text(&format!("{name}.signature"), &key.signature, l.max_key_chars)
    }

    /// Hands out each ready device's keys, claiming one one-time prekey of each.
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, target = %cmd.user_id))]
    pub async fn get_keys(&self, caller: &Caller, cmd: GetKeys) -> Result<KeyBundles> {
        self.check_may_see(caller, &cmd.user_id).await?;
        let now = self.now();
        let mut ready = self.ready_devices(std::slice::from_ref(&cmd.user_id), now).await?;
        if let Some(device) = &cmd.device_id {
            ready.retain(|r| &r.device.id == device);
        }
        // Counted before anything is claimed, all counters at once, so a
        // refusal claims nothing and counts nothing.
        let l = &self.limits;
        let mut counts =
            vec![ClaimCount { scope: "*".into(), amount: ready.len() as u64, limit: l.max_claims_per_hour }];
        counts.extend(ready.iter().map(|r| ClaimCount {
            scope: r.device.inbox().key(),
            amount: 1,
            limit: l.max_claims_per_target_per_hour,
        }));
        let keys = &self.ports.keys;
        if !ready.is_empty() && !keys.count_claims(&caller.inbox(), now.div_euclid(HOUR_MS), &counts).await? {
            return Err(Error::RateLimited("too many one-time prekeys claimed this hour".into()));
        }
        let mut devices = Vec::with_capacity(ready.len());
        for r in ready {
            let (one_time, left) = keys.claim_one_time_key(&r.keys.user, &r.keys.device).await?;
            if one_time.is_some() && left < self.limits.keys_low_below {
                self.tell_keys_low(&r.device, left).await;
            }
            devices.push(bundle(r.keys, one_time));
        }
        Ok(KeyBundles { devices })
    }

    async fn tell_keys_low(&self, device: &Device, remaining: u64) {
        if let Some(connection) = &device.connection {
            let frame = protocol::push_frame(ServerFrame::KeysLow(KeysLow { remaining }));
            if let Err(e) = self.push_all([connection], &frame).await {
                tracing::debug!(error = %e, "keysLow push failed");
            }
        }
    }

    pub async fn list_devices(&self, caller: &Caller, cmd: ListDevices) -> Result<DeviceIdentities> {
        self.check_may_see(caller, &cmd.user_id).await?;
        let ready = self.ready_devices(std::slice::from_ref(&cmd.user_id), self.now()).await?;
        Ok(DeviceIdentities { devices: ready.iter().map(|r| identity(&r.keys)).collect() })
    }

    /// Stores one inbox row per named device under one messageId and pushes
    /// each to its device if connected. Every named device must be a ready
    /// device of a user the caller may write to.
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %caller.device, n = cmd.messages.len()))]
    pub async fn send_to_devices(&self, caller: &Caller, cmd: SendToDevices) -> Result<DevicesSent> {
        let l = &self.limits;
        if cmd.messages.is_empty() {
            return Err(Error::BadRequest("messages must name at least one device".into()));
        }
        if cmd.messages.len() > l.max_device_messages {
            return Err(Error::LimitExceeded(format!(
                "sendToDevices carries at most {} messages",
                l.max_device_messages
            )));
        }
        if cmd.messages.iter().any(|m| m.body.len() > l.max_message_bytes) {
            return Err(Error::LimitExceeded(format!(
                "a device message body is at most {} bytes",
                l.max_message_bytes
            )));
        }
        let mut seen = BTreeSet::new();
        if !cmd.messages.iter().all(|m| seen.insert((&m.user_id, &m.device_id))) {
            return Err(Error::BadRequest("messages name a device twice".into()));
        }
        let dedupe = self.dedupe_key(caller, cmd.client_message_id)?;
        let users: Vec<UserId> =
            cmd.messages.iter().map(|m| m.user_id.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let co_members = self.co_members(&caller.user).await?;
        if users.iter().any(|u| u != &caller.user && !co_members.contains(u)) {
            return Err(Error::Forbidden("you share no chat with a user named in messages".into()));
        }
        let now = self.now();
        let ready = self.ready_devices(&users, now).await?;
        let by_key: BTreeMap<(&UserId, &DeviceId), &Ready> =
            ready.iter().map(|r| ((&r.keys.user, &r.keys.device), r)).collect();
        let missing: BTreeSet<&UserId> = cmd
            .messages
            .iter()
            .filter(|m| !by_key.contains_key(&(&m.user_id, &m.device_id)))
            .map(|m| &m.user_id)
            .collect();
        if !missing.is_empty() {
            let current =
                ready.iter().filter(|r| missing.contains(&r.keys.user)).map(Ready::recipient).collect();
            return Err(Error::MismatchedDevices(current));
        }
        let id = self.ids.message(now);
        let items: Vec<(InboxKey, String)> = cmd
            .messages
            .into_iter()
            .map(|m| {
                let json = protocol::device_message_json(&DeviceMessage {
                    message_id: id.clone(),
                    user_id: caller.user.clone(),
                    device_id: caller.device.clone(),
                    body: m.body,
                    timestamp: now,
                });
                (InboxKey::Device(m.user_id, m.device_id), json)
            })
            .collect();
        let expires_at = now + l.retention_ms;
        if let Some(first) =
            self.ports.messages.store_device_messages(&id, &items, dedupe.as_ref(), expires_at).await?
        {
            return Ok(DevicesSent { message_id: first });
        }
        // Stored: the pushes are a fast path; a device that misses one syncs it.
        let inboxes: Vec<InboxKey> = items.iter().map(|(inbox, _)| inbox.clone()).collect();
        let devices: Vec<Device> = ready.iter().map(|r| r.device.clone()).collect();
        self.enqueue_wake(super::wake::wake_targets(&inboxes, &devices)).await;
        for (inbox, json) in &items {
            let InboxKey::Device(user, device) = inbox else { continue };
            let Some(connection) = by_key.get(&(user, device)).and_then(|r| r.device.connection.clone())
            else {
                continue;
            };
            let target =
                PushTarget { user_id: user.clone(), device_id: device.clone(), connection_id: connection };
            if let Err(e) = self.push_message(json, std::slice::from_ref(&target)).await {
                let job =
                    Job::Deliver { message_id: id.clone(), message: json.clone(), targets: vec![target] };
                if !e.is_retryable() || self.ports.jobs.enqueue(&job, Duration::ZERO).await.is_err() {
                    tracing::warn!(error = %e, "device message push left to sync");
                }
            }
        }
        Ok(DevicesSent { message_id: id })
    }

    /// The live devices of these users that have published keys.
    pub(super) async fn ready_devices(&self, users: &[UserId], now: Millis) -> Result<Vec<Ready>> {
        let (devices, keys) =
            tokio::try_join!(self.live_devices(users, now), self.ports.keys.device_keys(users))?;
        let mut keys: BTreeMap<(UserId, DeviceId), DeviceKeys> =
            keys.into_iter().map(|k| ((k.user.clone(), k.device.clone()), k)).collect();
        Ok(devices
            .into_iter()
            .filter_map(|device| {
                let keys = keys.remove(&(device.user.clone(), device.id.clone()))?;
                Some(Ready { device, keys })
            })
            .collect())
    }

    /// Everyone who shares a chat with `user` (the user included once they have one).
    pub(super) async fn co_members(&self, user: &UserId) -> Result<BTreeSet<UserId>> {
        let mut users = BTreeSet::new();
        let mut after = None;
        loop {
            let page = self.ports.chats.chats_of(user, after.as_ref(), 100).await?;
            for chat in &page {
                users.extend(chat.members.iter().map(|m| m.user.clone()));
            }
            match page.last() {
                Some(last) if page.len() == 100 => after = Some(last.id.clone()),
                _ => return Ok(users),
            }
        }
    }

    /// getKeys and listDevices answer for the caller's own user and for users
    /// who share a chat with the caller; the same FORBIDDEN for anyone else
    /// and for users who do not exist, so ids cannot be probed.
    async fn check_may_see(&self, caller: &Caller, user: &UserId) -> Result<()> {
        if user == &caller.user || self.co_members(&caller.user).await?.contains(user) {
            return Ok(());
        }
        Err(Error::Forbidden("you share no chat with this user".into()))
    }

    /// Tells every user who shares a chat with `user` (and the user's own
    /// devices) the user's ready devices as they now stand. `among` gives the
    /// users to tell when the chats are already gone (deleteAccount).
    pub(super) async fn announce_devices(&self, user: &UserId, among: Option<BTreeSet<UserId>>) {
        let result = async {
            let mut users = match among {
                Some(users) => users,
                None => self.co_members(user).await?,
            };
            users.insert(user.clone());
            let now = self.now();
            let ready = self.ready_devices(std::slice::from_ref(user), now).await?;
            let frame = protocol::push_frame(ServerFrame::DeviceList(DeviceList {
                user_id: user.clone(),
                devices: ready.iter().map(|r| identity(&r.keys)).collect(),
            }));
            let users: Vec<UserId> = users.into_iter().collect();
            let devices = self.live_devices(&users, now).await?;
            self.push_all(devices.iter().filter_map(|d| d.connection.as_ref()), &frame).await
        };
        if let Err(e) = result.await {
            tracing::warn!(%user, error = %e, "deviceList push failed");
        }
    }

    /// The device check of an encrypted send: the recipients are the ready
    /// devices of every participant but the sending device, and the sender's
    /// digest must match them.
    pub(super) async fn encrypted_recipients(
        &self,
        caller: &Caller,
        participants: &[UserId],
        digest: Option<&str>,
        now: Millis,
    ) -> Result<Vec<Device>> {
        let Some(digest) = digest else {
            return Err(Error::BadRequest("a message to an encrypted chat must carry devices".into()));
        };
        let ready = self.ready_devices(participants, now).await?;
        let ready: Vec<Ready> = ready
            .into_iter()
            .filter(|r| !(r.device.user == caller.user && r.device.id == caller.device))
            .collect();
        let current: Vec<RecipientDevice> = ready.iter().map(Ready::recipient).collect();
        if digest != devices_digest(&current) {
            return Err(Error::MismatchedDevices(current));
        }
        Ok(ready.into_iter().map(|r| r.device).collect())
    }
}

fn check_text(name: &str, value: &str, max: usize) -> Result<()> {
    let n = value.chars().count();
    if n == 0 {
        return Err(Error::BadRequest(format!("{name} must not be empty")));
    }
    if n > max {
        return Err(Error::LimitExceeded(format!("{name} is at most {max} characters")));
    }
    Ok(())
}

fn identity(keys: &DeviceKeys) -> DeviceIdentity {
    DeviceIdentity { device_id: keys.device.clone(), identity_key: keys.identity_key.clone() }
}

fn bundle(keys: DeviceKeys, one_time: Option<OneTimeKey>) -> KeyBundle {
    KeyBundle {
        device_id: keys.device,
        identity_key: keys.identity_key,
        signed_pre_key: keys.signed_pre_key,
        one_time_pre_key: one_time,
        fallback_key: keys.fallback_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_of_sorted_lines() {
        let d = |u: &str, dev: &str, k: &str| RecipientDevice {
            user_id: UserId::try_from(u).unwrap(),
            device_id: DeviceId::try_from(dev).unwrap(),
            identity_key: k.into(),
        };
        let a = devices_digest(&[d("bob", "phone", "K1"), d("alice", "laptop", "K2")]);
        let b = devices_digest(&[d("alice", "laptop", "K2"), d("bob", "phone", "K1")]);
        assert_eq!(a, b);
        let expected = hex::encode(Sha256::digest(b"alice laptop K2\nbob phone K1\n"));
        assert_eq!(a, expected);
        assert_eq!(devices_digest(&[]), hex::encode(Sha256::digest(b"")));
    }
}
