//! E2EE over Courier with a real Olm + Megolm client (vodozemac); the store never holds a plaintext.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use courier_core::protocol::{DeviceMessage, KeyBundle, Message, OneTimeKey, RecipientDevice, SignedKey};
use courier_local::Backend;
use courier_tests::client::{CallError, Client, Item, Keys, ToDevice};
use courier_tests::{ErrorCode, QUIET, Server, WAIT, code};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use vodozemac::megolm::{
    GroupSession, InboundGroupSession, MegolmMessage, SessionConfig as MegolmConfig, SessionKey,
};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig as OlmConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

/// One-time prekeys each device publishes: more than the keysLow threshold
/// (10), so claims in this test leave no device short.
const ONE_TIME_KEYS: usize = 20;

/// A recipient device as the sender believes it: what the device check hashes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Peer {
    user: String,
    device: String,
    identity: String,
}

impl Peer {
    fn addr(&self) -> Addr {
        (self.user.clone(), self.device.clone())
    }
}

impl From<&RecipientDevice> for Peer {
    fn from(d: &RecipientDevice) -> Peer {
        Peer {
            user: d.user_id.to_string(),
            device: d.device_id.to_string(),
            identity: d.identity_key.clone(),
        }
    }
}

/// (userId, deviceId).
type Addr = (String, String);

/// The device check's digest as PROTOCOL.md defines it, written apart from
/// the server's: lowercase hex SHA-256 of the lines `USERID DEVICEID
/// IDENTITYKEY\n`, sorted by byte value, concatenated.
fn digest<'a>(peers: impl IntoIterator<Item = &'a Peer>) -> String {
    let mut lines: Vec<Vec<u8>> =
        peers.into_iter().map(|p| format!("{} {} {}\n", p.user, p.device, p.identity).into_bytes()).collect();
    lines.sort();
    hex::encode(Sha256::digest(lines.concat()).as_slice())
}

/// What a signed prekey's signature covers. Olm keeps its signing key
/// (Ed25519) apart from its identity key (Curve25519) and the protocol has
/// room for one identity key only, so the signature field carries the
/// signer's public key too (`ED25519.SIGNATURE`); the client pins that key
/// per device on first sight, and the signed text binds the prekey to the
/// identity key.
fn signed_text(identity: &str, public_key: &str) -> String {
    format!("courier-signed-prekey\n{identity}\n{public_key}")
}

/// The room key a sender shares over Olm: a Megolm session for one chat.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomKey {
    chat_id: String,
    session_id: String,
    session_key: String,
}

/// The `message` of an encrypted chat message: Megolm ciphertext and the session that made it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sealed {
    session_id: String,
    ciphertext: String,
}

/// What a sender's Megolm session for one chat has been shared with.
struct Outbound {
    session: GroupSession,
    shared_with: BTreeSet<Peer>,
}

/// A group message as sent, with what the test checks about it later.
struct Sent {
    message_id: String,
    session_id: String,
    /// The Megolm ciphertext (base64), which the store should hold.
    ciphertext: String,
    /// The device lists of the MISMATCHED_DEVICES answers on the way, in order.
    mismatches: Vec<BTreeSet<Peer>>,
    /// The sendToDevices messageIds that shared keys for this send.
    shares: Vec<String>,
}

/// One device running an E2EE client over Courier.
struct Device {
    user: String,
    id: String,
    client: Client,
    account: Account,
    /// The Ed25519 key that signed each peer device's prekeys, pinned on first sight.
    signers: HashMap<Addr, Ed25519PublicKey>,
    /// Peer identity keys as listDevices told them, for incoming Olm sessions.
    identities: HashMap<Addr, String>,
    /// Olm sessions by peer device; a pair may hold two, made from both ends.
    olm: HashMap<Addr, Vec<Session>>,
    outbound: HashMap<String, Outbound>,
    /// Megolm sessions shared with this device, by session id: (sender, chat, session).
    inbound: HashMap<String, (Addr, String, InboundGroupSession)>,
    /// Recipient devices of each chat as this device believes them. Only a
    /// MISMATCHED_DEVICES answer updates them (deviceList pushes are not
    /// used), so the server's check is what finds a new or removed device.
    recipients: HashMap<String, BTreeSet<Peer>>,
    /// Group messages read: messageId -> plaintext.
    read: BTreeMap<String, String>,
    /// Group messages whose key has not arrived yet.
    waiting: Vec<Message>,
    /// Device messages handled: delivery is at least once, and Olm refuses a replay.
    handled: BTreeSet<String>,
    /// Every push seen, by type (deviceList pushes are kept whole).
    pushes: BTreeMap<String, usize>,
    device_lists: Vec<Value>,
    /// Every Megolm session key this device shared: the store must hold none.
    secrets: Vec<String>,
}

impl Device {
    /// Connects and publishes this device's keys, which makes it ready.
    async fn join(server: &Server, user: &str, id: &str) -> Device {
        let client = server.connect(user, id).await;
        let mut account = Account::new();
        let identity = account.curve25519_key().to_base64();
        // The signed prekey is the account's fallback key: Olm can open a
        // session on it once the one-time keys are gone.
        account.generate_fallback_key();
        let (key_id, public) = account.fallback_key().into_iter().next().expect("a fallback key");
        let public = public.to_base64();
        let signature = account.sign(signed_text(&identity, &public));
        let signed_pre_key = SignedKey {
            key_id: key_id.to_base64(),
            public_key: public,
            signature: format!("{}.{}", account.ed25519_key().to_base64(), signature.to_base64()),
        };
        account.generate_one_time_keys(ONE_TIME_KEYS);
        let one_time_pre_keys: Vec<OneTimeKey> = account
            .one_time_keys()
            .into_iter()
            .map(|(id, key)| OneTimeKey { key_id: id.to_base64(), public_key: key.to_base64() })
            .collect();
        let keys = Keys {
            identity_key: Some(identity),
            signed_pre_key: Some(signed_pre_key),
            one_time_pre_keys,
            fallback_key: None,
        };
        let stored = client.upload_keys(&keys).await.expect("uploadKeys");
        assert_eq!(stored, ONE_TIME_KEYS as u64, "{user}/{id}: every one-time prekey stored");
        account.mark_keys_as_published();
        Device {
            user: user.into(),
            id: id.into(),
            client,
            account,
            signers: HashMap::new(),
            identities: HashMap::new(),
            olm: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            recipients: HashMap::new(),
            read: BTreeMap::new(),
            waiting: Vec::new(),
            handled: BTreeSet::new(),
            pushes: BTreeMap::new(),
            device_lists: Vec::new(),
            secrets: Vec::new(),
        }
    }

    fn name(&self) -> String {
        format!("{}/{}", self.user, self.id)
    }

    fn peer(&self) -> Peer {
        Peer {
            user: self.user.clone(),
            device: self.id.clone(),
            identity: self.account.curve25519_key().to_base64(),
        }
    }

    // ---- sending ----

    /// Sends `text` to an encrypted chat the way a careful client does: share
    /// the Megolm key with every recipient that lacks it (rotating first if
    /// a device that had it is no longer a recipient), send with the devices
    /// digest, and on MISMATCHED_DEVICES take the server's list and retry
    /// with the same clientMessageId.
    async fn send(&mut self, chat: &str, text: &str, client_message_id: &str) -> Sent {
        if !self.recipients.contains_key(chat) {
            let peers = self.current_recipients(chat).await;
            self.recipients.insert(chat.into(), peers);
        }
        let mut mismatches = Vec::new();
        let mut shares = Vec::new();
        for _ in 0..3 {
            let want = self.recipients[chat].clone();
            let stale = self.outbound.get(chat).is_some_and(|out| !out.shared_with.is_subset(&want));
            if stale || !self.outbound.contains_key(chat) {
                let session = GroupSession::new(MegolmConfig::version_1());
                self.outbound.insert(chat.into(), Outbound { session, shared_with: BTreeSet::new() });
            }
            let missing: Vec<Peer> = want.difference(&self.outbound[chat].shared_with).cloned().collect();
            if let Some(id) = self.share(chat, &missing).await {
                shares.push(id);
            }
            let out = self.outbound.get_mut(chat).expect("an outbound session");
            out.shared_with.extend(missing);
            let ciphertext = out.session.encrypt(text).to_base64();
            let session_id = out.session.session_id();
            let sealed = serde_json::to_string(&Sealed {
                session_id: session_id.clone(),
                ciphertext: ciphertext.clone(),
            })
            .expect("json");
            match self.client.send_encrypted(chat, &sealed, &digest(&want), Some(client_message_id)).await {
                Ok(sent) => {
                    return Sent {
                        message_id: sent.message_id.to_string(),
                        session_id,
                        ciphertext,
                        mismatches,
                        shares,
                    };
                }
                Err(e) if e.code() == Some(ErrorCode::MismatchedDevices) => {
                    let now: BTreeSet<Peer> = e
                        .devices()
                        .expect("MISMATCHED_DEVICES carries the devices")
                        .iter()
                        .map(Peer::from)
                        .collect();
                    assert_ne!(
                        now,
                        want,
                        "{}: MISMATCHED_DEVICES with the very list the digest was of",
                        self.name()
                    );
                    mismatches.push(now.clone());
                    self.recipients.insert(chat.into(), now);
                }
                Err(e) => panic!("{}: sendMessage failed: {e}", self.name()),
            }
        }
        panic!("{}: still MISMATCHED_DEVICES after 3 tries", self.name());
    }

    /// The chat's recipient devices from the directory: the ready devices of
    /// every participant but this one.
    async fn current_recipients(&self, chat: &str) -> BTreeSet<Peer> {
        let chats = self.client.list_chats().await.expect("listChats");
        let summary = chats.chats.iter().find(|c| c.chat_id.to_string() == chat).expect("a chat of mine");
        assert!(summary.encrypted, "listChats says the chat is encrypted");
        let mut peers = BTreeSet::new();
        for user in &summary.participants {
            for d in self.client.list_devices(user.as_str()).await.expect("listDevices") {
                peers.insert(Peer {
                    user: user.to_string(),
                    device: d.device_id.to_string(),
                    identity: d.identity_key.clone(),
                });
            }
        }
        peers.remove(&self.peer());
        peers
    }

    /// Shares the chat's current Megolm session key with `peers`, each as an
    /// Olm ciphertext for that device, in one sendToDevices. Its messageId.
    async fn share(&mut self, chat: &str, peers: &[Peer]) -> Option<String> {
        if peers.is_empty() {
            return None;
        }
        let out = &self.outbound[chat];
        let room_key = RoomKey {
            chat_id: chat.into(),
            session_id: out.session.session_id(),
            session_key: out.session.session_key().to_base64(),
        };
        self.secrets.push(room_key.session_key.clone());
        let plaintext = serde_json::to_string(&room_key).expect("json");
        let mut messages = Vec::new();
        for peer in peers {
            if self.olm.get(&peer.addr()).is_none_or(Vec::is_empty) {
                let session = self.open_session(peer).await;
                self.olm.entry(peer.addr()).or_default().push(session);
            }
            let session = self.olm.get_mut(&peer.addr()).and_then(|s| s.last_mut()).expect("an Olm session");
            let body =
                serde_json::to_string(&session.encrypt(&plaintext).expect("Olm encrypt")).expect("json");
            messages.push(ToDevice { user_id: peer.user.clone(), device_id: peer.device.clone(), body });
        }
        Some(self.client.send_to_devices(&messages, None).await.expect("sendToDevices"))
    }

    /// Claims the peer's keys, checks them and opens an Olm session on a
    /// one-time prekey (or on the signed prekey when none is left).
    async fn open_session(&mut self, peer: &Peer) -> Session {
        let bundles = self.client.get_keys(&peer.user, Some(&peer.device)).await.expect("getKeys");
        let [bundle] = bundles.as_slice() else {
            panic!("{}: getKeys for one device answered {} bundles", self.name(), bundles.len())
        };
        assert_eq!(bundle.device_id.as_str(), peer.device);
        assert_eq!(
            bundle.identity_key, peer.identity,
            "getKeys and the device list agree on the identity key"
        );
        self.verify(peer, bundle);
        let identity =
            Curve25519PublicKey::from_base64(&bundle.identity_key).expect("a Curve25519 identity key");
        let one_time = bundle.one_time_pre_key.as_ref().expect("a one-time prekey is left");
        let key = Curve25519PublicKey::from_base64(&one_time.public_key).expect("a Curve25519 one-time key");
        self.account.create_outbound_session(OlmConfig::version_1(), identity, key).expect("an Olm session")
    }

    /// Checks the signed prekey's signature and pins its signer.
    fn verify(&mut self, peer: &Peer, bundle: &KeyBundle) {
        let spk = &bundle.signed_pre_key;
        let (signer, signature) = spk.signature.split_once('.').expect("ED25519.SIGNATURE");
        let signer = Ed25519PublicKey::from_base64(signer).expect("an Ed25519 key");
        let signature = Ed25519Signature::from_base64(signature).expect("an Ed25519 signature");
        signer
            .verify(signed_text(&bundle.identity_key, &spk.public_key).as_bytes(), &signature)
            .expect("the signed prekey's signature verifies");
        let pinned = self.signers.entry(peer.addr()).or_insert(signer);
        assert_eq!(*pinned, signer, "the device's signing key did not change");
    }

    // ---- receiving ----

    /// Handles pushes for up to `wait`, returning early once `done` holds.
    async fn pump_until(&mut self, wait: Duration, done: impl Fn(&Device) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.client.next_frame(left).await else { return done(self) };
            self.handle(frame).await;
        }
        true
    }

    /// Handles every push that arrives within `wait`.
    async fn pump(&mut self, wait: Duration) {
        self.pump_until(wait, |_| false).await;
    }

    /// Waits for the group message `message_id` and returns its plaintext.
    async fn read_until(&mut self, message_id: &str) -> String {
        let read = self.pump_until(WAIT, |d| d.read.contains_key(message_id)).await;
        assert!(read, "{} did not read {message_id}; waiting for keys: {}", self.name(), self.waiting.len());
        self.read[message_id].clone()
    }

    async fn handle(&mut self, frame: Value) {
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        *self.pushes.entry(kind.clone()).or_default() += 1;
        match kind.as_str() {
            "deviceMessage" => {
                let message: DeviceMessage = serde_json::from_value(frame).expect("a deviceMessage");
                self.on_device_message(message).await;
            }
            "newMessage" => {
                let message: Message = serde_json::from_value(frame).expect("a newMessage");
                self.on_message(message);
            }
            "deviceList" => self.device_lists.push(frame),
            _ => {}
        }
    }

    /// Reads the whole inbox by sync, as a device that was offline does.
    async fn catch_up(&mut self) -> Vec<Item> {
        let items = self.client.sync_all_items().await.expect("sync");
        for item in &items {
            match item.clone() {
                Item::DeviceMessage(m) => self.on_device_message(m).await,
                Item::NewMessage(m) => self.on_message(m),
            }
        }
        items
    }

    async fn on_device_message(&mut self, message: DeviceMessage) {
        if !self.handled.insert(message.message_id.to_string()) {
            return;
        }
        let from: Addr = (message.user_id.to_string(), message.device_id.to_string());
        let olm: OlmMessage = serde_json::from_str(&message.body).expect("an Olm message");
        let plaintext = match &olm {
            OlmMessage::PreKey(pre) => {
                let known = self
                    .olm
                    .get_mut(&from)
                    .and_then(|sessions| sessions.iter_mut().find(|s| s.session_id() == pre.session_id()));
                match known {
                    Some(session) => session.decrypt(&olm).expect("Olm decrypt"),
                    None => {
                        // The sender's identity key comes from the directory, not from the message.
                        let identity = self.identity_of(&from).await;
                        let identity = Curve25519PublicKey::from_base64(&identity).expect("identity key");
                        let created = self
                            .account
                            .create_inbound_session(OlmConfig::version_1(), identity, pre)
                            .expect("an inbound Olm session from the sender's identity key");
                        self.olm.entry(from.clone()).or_default().push(created.session);
                        created.plaintext
                    }
                }
            }
            OlmMessage::Normal(_) => {
                let sessions = self.olm.get_mut(&from).expect("an Olm session with the sender");
                sessions
                    .iter_mut()
                    .find_map(|s| s.decrypt(&olm).ok())
                    .expect("one of the sender's sessions decrypts")
            }
        };
        let key: RoomKey = serde_json::from_slice(&plaintext).expect("a room key");
        let session_key = SessionKey::from_base64(&key.session_key).expect("a Megolm session key");
        let session = InboundGroupSession::new(&session_key, MegolmConfig::version_1());
        assert_eq!(session.session_id(), key.session_id, "the room key names its own session");
        self.inbound.insert(key.session_id, (from, key.chat_id, session));
        for message in std::mem::take(&mut self.waiting) {
            self.on_message(message);
        }
    }

    fn on_message(&mut self, message: Message) {
        let id = message.message_id.to_string();
        if self.read.contains_key(&id) {
            return;
        }
        match self.try_read(&message) {
            Ok(plaintext) => {
                self.read.insert(id, plaintext);
            }
            Err(Unreadable::NoSession) => self.waiting.push(message),
            Err(e) => panic!("{} cannot read {id}: {e:?}", self.name()),
        }
    }

    /// Decrypts a group message with a Megolm session shared with this device.
    fn try_read(&mut self, message: &Message) -> Result<String, Unreadable> {
        let sealed: Sealed = serde_json::from_str(&message.message).map_err(|_| Unreadable::NotSealed)?;
        let (sender, chat, session) =
            self.inbound.get_mut(&sealed.session_id).ok_or(Unreadable::NoSession)?;
        // The Megolm key came over an Olm session with its sender's device: a
        // message from anyone else, or for another chat, under it is forged.
        assert_eq!(*sender, (message.user_id.to_string(), message.device_id.to_string()), "sender");
        assert_eq!(*chat, message.chat_id.to_string(), "chat");
        let megolm = MegolmMessage::from_base64(&sealed.ciphertext).map_err(|_| Unreadable::NotSealed)?;
        let decrypted = session.decrypt(&megolm).map_err(|e| Unreadable::Refused(e.to_string()))?;
        Ok(String::from_utf8(decrypted.plaintext).expect("UTF-8"))
    }

    /// Whether any Megolm session this device holds opens `ciphertext`.
    fn any_session_opens(&mut self, ciphertext: &str) -> bool {
        let megolm = MegolmMessage::from_base64(ciphertext).expect("Megolm");
        self.inbound.values_mut().any(|(_, _, session)| session.decrypt(&megolm).is_ok())
    }

    async fn identity_of(&mut self, from: &Addr) -> String {
        if !self.identities.contains_key(from) {
            for d in self.client.list_devices(&from.0).await.expect("listDevices") {
                self.identities.insert((from.0.clone(), d.device_id.to_string()), d.identity_key);
            }
        }
        self.identities.get(from).cloned().expect("the sender is a ready device")
    }
}

#[derive(Debug)]
enum Unreadable {
    NotSealed,
    NoSession,
    Refused(#[allow(dead_code)] String),
}

/// Everything the server's store holds, as bytes: the files in its data
/// dir (SQLite database and WAL) and, on the AWS backend, every item of its
/// tables, read with Scan (by the test: the server itself never scans).
/// The second part is the store proper: where a message must be found.
async fn store_bytes(server: &Server) -> (Vec<u8>, Vec<u8>) {
    let mut files = Vec::new();
    read_dir(&server.config.data_dir, &mut files);
    let store = match &server.config.backend {
        Backend::Embedded => files.clone(),
        Backend::Aws { prefix, sdk } => {
            scan_tables(prefix, sdk.as_deref().expect("the harness gives an SDK config")).await
        }
    };
    (files, store)
}

fn read_dir(dir: &Path, out: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).expect("read the data dir") {
        let path = entry.expect("a dir entry").path();
        if path.is_dir() {
            read_dir(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend_from_slice(&bytes);
        }
    }
}

async fn scan_tables(prefix: &str, sdk: &courier_aws::aws_config::SdkConfig) -> Vec<u8> {
    use courier_aws::aws_sdk_dynamodb::{Client, types::AttributeValue};
    fn flatten(value: &AttributeValue, out: &mut Vec<u8>) {
        match value {
            AttributeValue::S(s) | AttributeValue::N(s) => out.extend_from_slice(s.as_bytes()),
            AttributeValue::B(b) => out.extend_from_slice(b.as_ref()),
            AttributeValue::Ss(v) | AttributeValue::Ns(v) => {
                v.iter().for_each(|s| out.extend_from_slice(s.as_bytes()))
            }
            AttributeValue::Bs(v) => v.iter().for_each(|b| out.extend_from_slice(b.as_ref())),
            AttributeValue::L(v) => v.iter().for_each(|v| flatten(v, out)),
            AttributeValue::M(m) => m.values().for_each(|v| flatten(v, out)),
            _ => {}
        }
        out.push(0);
    }
    let client = Client::new(sdk);
    let mut tables = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client
            .list_tables()
            .set_exclusive_start_table_name(after.take())
            .send()
            .await
            .expect("ListTables");
        tables.extend(page.table_names().iter().filter(|t| t.starts_with(prefix)).cloned());
        match page.last_evaluated_table_name {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    assert!(!tables.is_empty(), "no table under the server's prefix {prefix}");
    let mut out = Vec::new();
    for table in tables {
        let mut start = None;
        loop {
            let page = client
                .scan()
                .table_name(&table)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .expect("Scan");
            for item in page.items() {
                item.values().for_each(|v| flatten(v, &mut out));
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Asserts each device read exactly these group messages, with these plaintexts.
fn assert_read(device: &Device, expected: &[(&Sent, &str)]) {
    let expected: BTreeMap<String, String> =
        expected.iter().map(|(sent, text)| (sent.message_id.clone(), text.to_string())).collect();
    assert_eq!(device.read, expected, "{} read other than it should", device.name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_with_two_devices_each_talk_end_to_end_encrypted() {
    let server = Server::start().await;
    // "Tablet" sorts before "phone" by byte value but after it ignoring
    // case, so a digest over wrongly sorted lines differs from the right one.
    let mut a1 = Device::join(&server, "alice", "phone").await;
    let mut a2 = Device::join(&server, "alice", "Tablet").await;
    let mut b1 = Device::join(&server, "bob", "phone").await;
    let mut b2 = Device::join(&server, "bob", "Tablet").await;
    let mut c1 = Device::join(&server, "carol", "phone").await;
    let mut c2 = Device::join(&server, "carol", "Tablet").await;
    assert_eq!(
        a1.client.upload_keys(&Keys::default()).await.unwrap(),
        ONE_TIME_KEYS as u64,
        "uploadKeys {{}}"
    );

    let chat = a1.client.create_chat_with(&["bob", "carol"], "secret plans", true).await.expect("createChat");
    // carol's tablet goes offline: it reads everything by sync later.
    c2.client.close();
    c2.client.closed(WAIT).await.expect("closed");

    // ---- the device check, exactly as PROTOCOL.md says ----
    let others: BTreeSet<Peer> = [&a2, &b1, &b2, &c1, &c2].iter().map(|d| d.peer()).collect();
    let bobs: BTreeSet<(String, String)> = a1
        .client
        .list_devices("bob")
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.device_id.to_string(), d.identity_key))
        .collect();
    let expected_bobs: BTreeSet<(String, String)> =
        [&b1, &b2].iter().map(|d| (d.id.clone(), d.peer().identity)).collect();
    assert_eq!(bobs, expected_bobs, "listDevices shows bob's ready devices and their identity keys");
    assert_eq!(code(a1.client.send_message(&chat, "no devices digest").await), ErrorCode::BadRequest);
    let lines = |order: fn(&String, &String) -> std::cmp::Ordering| {
        let mut lines: Vec<String> =
            others.iter().map(|p| format!("{} {} {}\n", p.user, p.device, p.identity)).collect();
        lines.sort_by(order);
        lines.concat()
    };
    let by_bytes = lines(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let ignoring_case = lines(|a, b| a.to_lowercase().cmp(&b.to_lowercase()));
    assert_ne!(by_bytes, ignoring_case, "the device names make the sort order matter");
    let sha = |text: &str| hex::encode(Sha256::digest(text.as_bytes()).as_slice());
    assert_eq!(sha(&by_bytes), digest(&others));
    let wrong = [
        sha(&ignoring_case),
        sha(by_bytes.trim_end()),
        sha(&by_bytes.replace('\n', "\r\n")),
        digest(others.iter().filter(|p| p.user != "carol")),
        digest(&BTreeSet::new()),
    ];
    for (i, wrong) in wrong.iter().enumerate() {
        let err = a1.client.send_encrypted(&chat, "probe", wrong, None).await.expect_err("a wrong digest");
        assert_eq!(err.code(), Some(ErrorCode::MismatchedDevices), "wrong digest {i}: {err}");
        let listed: BTreeSet<Peer> = err.devices().expect("devices").iter().map(Peer::from).collect();
        assert_eq!(listed, others, "MISMATCHED_DEVICES carries every recipient device but the sender's");
    }

    // ---- everyone reads everyone ----
    let t1 = "M1 alice: the eagle lands at noon";
    let m1 = a1.send(&chat, t1, "m1").await;
    assert!(m1.mismatches.is_empty(), "the directory's devices are the server's: {:?}", m1.mismatches);
    assert_eq!(a1.recipients[&chat], others);
    for d in [&mut a2, &mut b1, &mut b2, &mut c1] {
        assert_eq!(d.read_until(&m1.message_id).await, t1, "{}", d.name());
    }
    let t2 = "M2 bob: bring the blue folder";
    let m2 = b1.send(&chat, t2, "m2").await;
    for d in [&mut a1, &mut a2, &mut b2, &mut c1] {
        assert_eq!(d.read_until(&m2.message_id).await, t2, "{}", d.name());
    }
    let t3 = "M3 carol: the folder is under the oak";
    let m3 = c1.send(&chat, t3, "m3").await;
    for d in [&mut a1, &mut a2, &mut b1, &mut b2] {
        assert_eq!(d.read_until(&m3.message_id).await, t3, "{}", d.name());
    }

    // The offline tablet syncs: its keys as device messages, then the group messages.
    c2.client = server.connect("carol", "Tablet").await;
    let items = c2.catch_up().await;
    let kinds: Vec<&str> = items
        .iter()
        .map(|i| match i {
            Item::NewMessage(_) => "newMessage",
            Item::DeviceMessage(_) => "deviceMessage",
        })
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "deviceMessage").count(),
        3,
        "a key from each sender: {kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "newMessage").count(), 3, "{kinds:?}");
    assert_read(&c2, &[(&m1, t1), (&m2, t2), (&m3, t3)]);

    // ---- a device added mid-conversation ----
    let mut b3 = Device::join(&server, "bob", "watch").await;
    let told = a1
        .pump_until(WAIT, |d| {
            d.device_lists
                .iter()
                .any(|f| f["userId"] == "bob" && f["devices"].as_array().is_some_and(|v| v.len() == 3))
        })
        .await;
    assert!(told, "alice is told bob's devices changed: {:?}", a1.device_lists);
    let t4 = "M4 alice: welcome, watch";
    let m4 = a1.send(&chat, t4, "m4").await;
    let mut with_watch = others.clone();
    with_watch.insert(b3.peer());
    assert_eq!(m4.mismatches, vec![with_watch.clone()], "the new device is caught by the device check");
    for d in [&mut a2, &mut b1, &mut b2, &mut c1, &mut c2, &mut b3] {
        assert_eq!(d.read_until(&m4.message_id).await, t4, "{}", d.name());
    }
    // The retry was the same send: asking again answers the same messageId and delivers nothing twice.
    let again =
        a1.client.send_encrypted(&chat, "retry", &digest(&with_watch), Some("m4")).await.expect("a retry");
    assert_eq!(again.message_id.to_string(), m4.message_id);
    let watch_inbox: Vec<String> =
        b3.client.sync_all().await.unwrap().into_iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(watch_inbox, vec![m4.message_id.clone()], "the watch starts empty and has M4 once");
    // The watch holds the key from where it was shared: the history before stays closed to it.
    assert!(!b3.any_session_opens(&m1.ciphertext), "the watch opens M1");

    // ---- a member removed ----
    a1.client.modify(&chat, "carol", "REMOVE").await.expect("remove carol");
    c1.pump(QUIET).await;
    c2.pump(QUIET).await;
    let (c1_before, c2_before) = (c1.pushes.clone(), c2.pushes.clone());
    let t5 = "M5 alice: carol is out, new key";
    let m5 = a1.send(&chat, t5, "m5").await;
    let remaining: BTreeSet<Peer> = with_watch.iter().filter(|p| p.user != "carol").cloned().collect();
    assert_eq!(m5.mismatches, vec![remaining.clone()], "the removal is caught by the device check");
    assert_ne!(m5.session_id, m4.session_id, "alice rotated her Megolm session");
    assert_eq!(a1.outbound[&chat].shared_with, remaining, "the new key went to the remaining devices only");
    let t6 = "M6 bob: agreed, rotating mine too";
    let m6 = b1.send(&chat, t6, "m6").await;
    assert_ne!(m6.session_id, m2.session_id, "bob rotated his Megolm session");
    for d in [&mut a2, &mut b2, &mut b3] {
        assert_eq!(d.read_until(&m5.message_id).await, t5, "{}", d.name());
        assert_eq!(d.read_until(&m6.message_id).await, t6, "{}", d.name());
    }
    assert_eq!(b1.read_until(&m5.message_id).await, t5);
    assert_eq!(a1.read_until(&m6.message_id).await, t6);
    // carol gets nothing new: no push, nothing in her inboxes...
    let after_removal: BTreeSet<String> =
        [&m5, &m6].iter().flat_map(|s| s.shares.iter().cloned().chain([s.message_id.clone()])).collect();
    for (carol, before) in [(&mut c1, c1_before), (&mut c2, c2_before)] {
        carol.pump(QUIET).await;
        for kind in ["newMessage", "deviceMessage"] {
            let seen = |p: &BTreeMap<String, usize>| p.get(kind).copied().unwrap_or(0);
            assert_eq!(seen(&carol.pushes), seen(&before), "{} got a {kind} after the removal", carol.name());
        }
        let inbox: BTreeSet<String> = carol
            .client
            .sync_all_items()
            .await
            .unwrap()
            .into_iter()
            .map(|i| match i {
                Item::NewMessage(m) => m.message_id.to_string(),
                Item::DeviceMessage(m) => m.message_id.to_string(),
            })
            .collect();
        assert!(
            inbox.is_disjoint(&after_removal),
            "{}'s inbox holds what followed the removal",
            carol.name()
        );
        // ...and could not read it if she did.
        for sent in [&m5, &m6] {
            assert!(!carol.any_session_opens(&sent.ciphertext), "{} opens {}", carol.name(), sent.message_id);
        }
    }
    let err = c1
        .client
        .send_encrypted(&chat, "still here?", &digest(&remaining), None)
        .await
        .expect_err("carol left");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");

    // Every device read exactly the messages sent to it while it was a member, but its own.
    assert_read(&a1, &[(&m2, t2), (&m3, t3), (&m6, t6)]);
    assert_read(&a2, &[(&m1, t1), (&m2, t2), (&m3, t3), (&m4, t4), (&m5, t5), (&m6, t6)]);
    assert_read(&b1, &[(&m1, t1), (&m3, t3), (&m4, t4), (&m5, t5)]);
    assert_read(&b2, &[(&m1, t1), (&m2, t2), (&m3, t3), (&m4, t4), (&m5, t5), (&m6, t6)]);
    assert_read(&b3, &[(&m4, t4), (&m5, t5), (&m6, t6)]);
    assert_read(&c1, &[(&m1, t1), (&m2, t2), (&m4, t4)]);
    assert_read(&c2, &[(&m1, t1), (&m2, t2), (&m3, t3), (&m4, t4)]);

    // ---- the store never holds a plaintext ----
    // Nothing has been acked, so every message is still stored: its
    // ciphertext must be found, or this check proves nothing.
    let (files, store) = store_bytes(&server).await;
    for sent in [&m1, &m2, &m3, &m4, &m5, &m6] {
        assert!(contains(&store, &sent.ciphertext), "the store holds no ciphertext of {}", sent.message_id);
    }
    let secrets: Vec<&String> = [&a1, &b1, &c1].iter().flat_map(|d| &d.secrets).collect();
    assert!(secrets.len() >= 5, "sessions shared: {}", secrets.len());
    let plaintexts = [t1, t2, t3, t4, t5, t6];
    let words =
        ["eagle lands", "blue folder", "under the oak", "welcome, watch", "carol is out", "rotating mine"];
    for (name, bytes) in [("the data dir", &files), ("the store", &store)] {
        for text in plaintexts.iter().chain(&words) {
            assert!(!contains(bytes, text), "{name} holds the plaintext {text:?}");
        }
        for secret in &secrets {
            assert!(!contains(bytes, secret), "{name} holds a Megolm session key");
        }
    }
}

/// The claims a client makes are the server's: one-time prekeys go out once,
/// then the signed prekey serves; a send that misses a device stores nothing.
#[tokio::test]
async fn one_time_prekeys_are_handed_out_once_and_a_refused_send_stores_nothing() {
    let server = Server::start().await;
    let alice = Device::join(&server, "alice", "phone").await;
    let bob = Device::join(&server, "bob", "phone").await;
    let chat = alice.client.create_chat_with(&["bob"], "c", true).await.unwrap();
    let mut claimed = BTreeSet::new();
    // 5 an hour per target device: the claims of this test stay under it.
    for _ in 0..5 {
        let bundles = alice.client.get_keys("bob", None).await.unwrap();
        let [bundle] = bundles.as_slice() else { panic!("bob has one ready device: {bundles:?}") };
        let key = bundle.one_time_pre_key.clone().expect("one left");
        assert!(claimed.insert(key.key_id), "a one-time prekey handed out twice");
    }
    assert_eq!(code(alice.client.get_keys("bob", None).await), ErrorCode::RateLimited);
    assert_eq!(
        bob.client.upload_keys(&Keys::default()).await.unwrap(),
        (ONE_TIME_KEYS - 5) as u64,
        "bob's count went down by the claims"
    );
    let stale = digest(&BTreeSet::new());
    let err =
        alice.client.send_encrypted(&chat, "to nobody", &stale, Some("x")).await.expect_err("stale digest");
    assert!(
        matches!(err, CallError::Failure(_)) && err.code() == Some(ErrorCode::MismatchedDevices),
        "{err}"
    );
    assert!(bob.client.sync_all().await.unwrap().is_empty(), "a refused send stored nothing");
    let sent = alice.client.send_encrypted(&chat, "to bob", &digest(&[bob.peer()]), Some("x")).await.unwrap();
    let inbox = bob.client.sync_all().await.unwrap();
    assert_eq!(inbox.iter().map(|m| m.message_id.clone()).collect::<Vec<_>>(), vec![sent.message_id]);
    assert_eq!(inbox[0].message, "to bob", "the server passes the ciphertext through untouched");
}
