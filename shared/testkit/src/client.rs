//! A typed WebSocket client for Courier: what the tests and the bench speak through.
//!
//! Responses are matched to requests by `requestId`; every other frame
//! (pushes, and answers to frames that had no usable requestId) waits in
//! order for [`Client::next_frame`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use courier_core::protocol::{
    Acked, AttachmentCreated, AttachmentLink, ChatCreated, ChatList, DeviceIdentities, DeviceIdentity,
    DeviceMessage, DevicesSent, ErrorBody, KeyBundle, KeyBundles, KeysStored, Message, MessageSent,
    OneTimeKey, Participants, Receipt, Receipts, RecipientDevice, ServerFrame, SignedKey, Status,
    TypingState,
};

/// Why a connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The upgrade was answered with this HTTP status (401, 403, 400...).
    #[error("refused with HTTP {0}")]
    Refused(u16),
    #[error("{0}")]
    Other(String),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{}: {}", code_str(.0), .0.message)]
    Failure(ErrorBody),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed")]
    Closed,
    #[error("unexpected answer: {0}")]
    Decode(String),
}

fn code_str(body: &ErrorBody) -> String {
    serde_json::to_value(body.code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

impl CallError {
    /// The protocol error code, when the server answered FAILURE.
    pub fn code(&self) -> Option<courier_core::protocol::ErrorCode> {
        match self {
            CallError::Failure(body) => Some(body.code),
            _ => None,
        }
    }

    /// The recipient devices a MISMATCHED_DEVICES failure carries: the server's current view.
    pub fn devices(&self) -> Option<&[RecipientDevice]> {
        match self {
            CallError::Failure(body) => body.devices.as_deref(),
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// One device's connection.
pub struct Client {
    out: mpsc::UnboundedSender<WsMessage>,
    pending: Pending,
    frames: mpsc::UnboundedReceiver<Value>,
    closed: watch::Receiver<Option<u16>>,
    next_id: AtomicU64,
    timeout: Duration,
}

/// One item of a `sync` page (or a push of either kind), told apart by its `type`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Item {
    NewMessage(Message),
    DeviceMessage(DeviceMessage),
}

/// A page of `sync`, decoded.
#[derive(Debug, Deserialize)]
#[serde(from = "WirePage")]
pub struct Page {
    /// The chat messages (`newMessage` items), in inbox order: what a
    /// version 1 client reads.
    pub messages: Vec<Message>,
    /// Every item, chat and device messages alike, in inbox order.
    pub items: Vec<Item>,
    pub cursor: Option<String>,
}

impl Page {
    /// The device messages (`deviceMessage` items), in inbox order.
    pub fn device_messages(&self) -> impl Iterator<Item = &DeviceMessage> {
        self.items.iter().filter_map(|item| match item {
            Item::DeviceMessage(m) => Some(m),
            Item::NewMessage(_) => None,
        })
    }
}

/// A page as the server sends it: every item carries its `type`.
#[derive(Deserialize)]
struct WirePage {
    messages: Vec<Item>,
    cursor: Option<String>,
}

impl From<WirePage> for Page {
    fn from(wire: WirePage) -> Page {
        let messages = wire
            .messages
            .iter()
            .filter_map(|item| match item {
                Item::NewMessage(m) => Some(m.clone()),
                Item::DeviceMessage(_) => None,
            })
            .collect();
        Page { messages, items: wire.messages, cursor: wire.cursor }
    }
}

/// What `uploadKeys` sends; fields left unset are not sent.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Keys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_pre_key: Option<SignedKey>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub one_time_pre_keys: Vec<OneTimeKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_key: Option<SignedKey>,
}

/// One item of `sendToDevices`: a body for one device.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToDevice {
    pub user_id: String,
    pub device_id: String,
    pub body: String,
}

impl Client {
    /// Connects to `url` (such as `ws://127.0.0.1:3001`) as `device`, with `token`.
    pub async fn connect(url: &str, token: &str, device: &str) -> Result<Client, ConnectError> {
        let url = format!("{}/?token={}&deviceId={}", url.trim_end_matches('/'), token, device);
        let (socket, _) = match tokio_tungstenite::connect_async(url).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(response)) => {
                return Err(ConnectError::Refused(response.status().as_u16()));
            }
            Err(e) => return Err(ConnectError::Other(e.to_string())),
        };
        let (mut sink, mut stream) = socket.split();
        let (out, mut outgoing) = mpsc::unbounded_channel::<WsMessage>();
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(None);
        let pending: Pending = Arc::default();

        tokio::spawn(async move {
            while let Some(message) = outgoing.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let waiting = pending.clone();
        tokio::spawn(async move {
            let mut code = 1006;
            while let Some(message) = stream.next().await {
                let text = match message {
                    Ok(WsMessage::Text(text)) => text,
                    Ok(WsMessage::Close(frame)) => {
                        code = frame.map_or(1005, |f| u16::from(f.code));
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let request_id = (frame["type"] == "response").then(|| frame["requestId"].as_str()).flatten();
                let waiter =
                    request_id.and_then(|id| waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(id));
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(frame);
                    }
                    None => {
                        let _ = frames_tx.send(frame);
                    }
                }
            }
            let _ = closed_tx.send(Some(code));
            waiting.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(Client {
            out,
            pending,
            frames,
            closed,
            next_id: AtomicU64::new(1),
            timeout: Duration::from_secs(10),
        })
    }

    /// How long a call waits for its answer (10 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `action` with `fields` and returns the whole response frame.
    pub async fn request(&self, action: &str, fields: Value) -> Result<Value, CallError> {
        let request_id = format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut frame = match fields {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        frame.insert("action".into(), json!(action));
        frame.insert("requestId".into(), json!(request_id));
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(request_id.clone(), tx);
        if self.out.send(WsMessage::Text(Value::Object(frame).to_string().into())).is_err() {
            return Err(CallError::Closed);
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&request_id);
                Err(CallError::Timeout(self.timeout))
            }
        }
    }

    /// Sends a command and decodes its `data`, or returns its FAILURE.
    pub async fn call<T: DeserializeOwned>(&self, action: &str, fields: Value) -> Result<T, CallError> {
        let frame = self.request(action, fields).await?;
        let decoded: ServerFrame<Value> =
            serde_json::from_value(frame.clone()).map_err(|e| CallError::Decode(format!("{e}: {frame}")))?;
        match decoded {
            ServerFrame::Response(r) if r.status == Status::Success => {
                serde_json::from_value(r.data.unwrap_or(Value::Null))
                    .map_err(|e| CallError::Decode(e.to_string()))
            }
            ServerFrame::Response(r) => Err(CallError::Failure(
                r.error.ok_or_else(|| CallError::Decode(format!("FAILURE without error: {frame}")))?,
            )),
            _ => Err(CallError::Decode(frame.to_string())),
        }
    }

    /// Sends raw text as one frame, for frames no well-behaved client sends.
    pub fn send_raw(&self, text: impl Into<String>) -> Result<(), CallError> {
        self.out.send(WsMessage::Text(text.into().into())).map_err(|_| CallError::Closed)
    }

    /// The next frame that answered no pending request: a push, or the
    /// answer to a raw frame. `None` after `wait` or once closed.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.frames.recv()).await.ok().flatten()
    }

    /// The next `newMessage` push, skipping other frames.
    pub async fn next_message(&mut self, wait: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame =
                self.next_frame(deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
            if frame["type"] == "newMessage" {
                return serde_json::from_value(frame).ok();
            }
        }
    }

    /// The next `deviceMessage` push, skipping other frames.
    pub async fn next_device_message(&mut self, wait: Duration) -> Option<DeviceMessage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame =
                self.next_frame(deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
            if frame["type"] == "deviceMessage" {
                return serde_json::from_value(frame).ok();
            }
        }
    }

    /// Waits for the server to close the connection; its close code.
    pub async fn closed(&mut self, wait: Duration) -> Option<u16> {
        let mut closed = self.closed.clone();
        let code = tokio::time::timeout(wait, closed.wait_for(Option::is_some)).await.ok()?.ok()?;
        *code
    }

    pub fn close(&self) {
        let _ = self.out.send(WsMessage::Close(None));
    }

    // ---- typed commands ----

    pub async fn create_chat(&self, participants: &[&str], name: &str) -> Result<String, CallError> {
        let created: ChatCreated =
            self.call("createChat", json!({ "participants": participants, "name": name })).await?;
        Ok(created.chat_id.to_string())
    }

    /// createChat with `encrypted` set (protocol version 2); `create_chat` sends none.
    pub async fn create_chat_with(
        &self,
        participants: &[&str],
        name: &str,
        encrypted: bool,
    ) -> Result<String, CallError> {
        let created: ChatCreated = self
            .call("createChat", json!({ "participants": participants, "name": name, "encrypted": encrypted }))
            .await?;
        Ok(created.chat_id.to_string())
    }

    pub async fn send_message(&self, chat_id: &str, text: &str) -> Result<MessageSent, CallError> {
        self.call("sendMessage", json!({ "chatId": chat_id, "message": text })).await
    }

    /// sendMessage to an encrypted chat: `ciphertext` with the digest of the
    /// recipient devices as the sender sees them.
    pub async fn send_encrypted(
        &self,
        chat_id: &str,
        ciphertext: &str,
        devices: &str,
        client_message_id: Option<&str>,
    ) -> Result<MessageSent, CallError> {
        let mut fields = json!({ "chatId": chat_id, "message": ciphertext, "devices": devices });
        if let Some(id) = client_message_id {
            fields["clientMessageId"] = json!(id);
        }
        self.call("sendMessage", fields).await
    }

    pub async fn send_message_with(&self, fields: Value) -> Result<MessageSent, CallError> {
        self.call("sendMessage", fields).await
    }

    pub async fn sync(&self, limit: Option<u32>, cursor: Option<&str>) -> Result<Page, CallError> {
        let mut fields = json!({});
        if let Some(limit) = limit {
            fields["limit"] = json!(limit);
        }
        if let Some(cursor) = cursor {
            fields["cursor"] = json!(cursor);
        }
        self.call("sync", fields).await
    }

    /// The chat messages of the whole inbox, page by page, without acking
    /// (device messages are left out: see [`Client::sync_all_items`]).
    pub async fn sync_all(&self) -> Result<Vec<Message>, CallError> {
        let items = self.sync_all_items().await?;
        Ok(items
            .into_iter()
            .filter_map(|item| match item {
                Item::NewMessage(m) => Some(m),
                Item::DeviceMessage(_) => None,
            })
            .collect())
    }

    /// Every item of the inbox, chat and device messages, page by page, without acking.
    pub async fn sync_all_items(&self) -> Result<Vec<Item>, CallError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.sync(Some(100), cursor.as_deref()).await?;
            all.extend(page.items);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }

    pub async fn ack(&self, message_ids: &[&str]) -> Result<u64, CallError> {
        let acked: Acked = self.call("ack", json!({ "messageIds": message_ids })).await?;
        Ok(acked.acked)
    }

    pub async fn list_chats(&self) -> Result<ChatList, CallError> {
        self.call("listChats", json!({})).await
    }

    pub async fn modify(
        &self,
        chat_id: &str,
        user_id: &str,
        operation: &str,
    ) -> Result<Vec<String>, CallError> {
        let p: Participants = self
            .call(
                "modifyChatParticipants",
                json!({ "chatId": chat_id, "userId": user_id, "operation": operation }),
            )
            .await?;
        Ok(p.participants.into_iter().map(String::from).collect())
    }

    pub async fn create_attachment(
        &self,
        content_type: &str,
        size: u64,
        sha256: &str,
    ) -> Result<AttachmentCreated, CallError> {
        self.call("createAttachment", json!({ "contentType": content_type, "size": size, "sha256": sha256 }))
            .await
    }

    pub async fn get_attachment(&self, attachment_id: &str) -> Result<AttachmentLink, CallError> {
        self.call("getAttachment", json!({ "attachmentId": attachment_id })).await
    }

    pub async fn remove_device(&self, device_id: &str) -> Result<(), CallError> {
        let _: Value = self.call("removeDevice", json!({ "deviceId": device_id })).await?;
        Ok(())
    }

    /// uploadKeys; the number of one-time prekeys the device now holds.
    pub async fn upload_keys(&self, keys: &Keys) -> Result<u64, CallError> {
        let stored: KeysStored = self.call("uploadKeys", json!(keys)).await?;
        Ok(stored.one_time_pre_keys)
    }

    /// getKeys: one bundle per ready device of `user_id` (or just `device_id`),
    /// each claiming one of that device's one-time prekeys.
    pub async fn get_keys(
        &self,
        user_id: &str,
        device_id: Option<&str>,
    ) -> Result<Vec<KeyBundle>, CallError> {
        let mut fields = json!({ "userId": user_id });
        if let Some(device) = device_id {
            fields["deviceId"] = json!(device);
        }
        let bundles: KeyBundles = self.call("getKeys", fields).await?;
        Ok(bundles.devices)
    }

    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceIdentity>, CallError> {
        let devices: DeviceIdentities = self.call("listDevices", json!({ "userId": user_id })).await?;
        Ok(devices.devices)
    }

    /// sendToDevices; the messageId all the items were stored under.
    pub async fn send_to_devices(
        &self,
        messages: &[ToDevice],
        client_message_id: Option<&str>,
    ) -> Result<String, CallError> {
        let mut fields = json!({ "messages": messages });
        if let Some(id) = client_message_id {
            fields["clientMessageId"] = json!(id);
        }
        let sent: DevicesSent = self.call("sendToDevices", fields).await?;
        Ok(sent.message_id.to_string())
    }

    pub async fn mark_read(&self, chat_id: &str, up_to: &str, private: bool) -> Result<(), CallError> {
        let _: Value =
            self.call("markRead", json!({ "chatId": chat_id, "upTo": up_to, "private": private })).await?;
        Ok(())
    }

    pub async fn get_receipts(&self, chat_id: &str) -> Result<Vec<Receipt>, CallError> {
        let receipts: Receipts = self.call("getReceipts", json!({ "chatId": chat_id })).await?;
        Ok(receipts.receipts)
    }

    pub async fn typing(&self, chat_id: &str, state: TypingState) -> Result<(), CallError> {
        let _: Value = self.call("typing", json!({ "chatId": chat_id, "state": state })).await?;
        Ok(())
    }

    pub async fn delete_account(&self) -> Result<(), CallError> {
        let _: Value = self.call("deleteAccount", json!({})).await?;
        Ok(())
    }
}
