//! The wire protocol of docs/protocol.md: commands, responses, pushes and error codes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{AttachmentId, ChatId, DeviceId, MessageId, UserId};
pub use crate::ports::{OneTimeKey, Platform, SignedKey, WebPushKeys};

mod request;

pub use request::{RouteCommand, RouteRequest};

/// The route keys of the WebSocket API, one per command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    CreateChat,
    SendMessage,
    CreateAttachment,
    GetAttachment,
    ModifyChatParticipants,
    ListChats,
    Sync,
    Ack,
    RemoveDevice,
    UploadKeys,
    GetKeys,
    ListDevices,
    SendToDevices,
    MarkRead,
    GetReceipts,
    Typing,
    DeleteAccount,
    RegisterPush,
    UnregisterPush,
}

impl Action {
    pub const ALL: [Action; 19] = [
        Action::CreateChat,
        Action::SendMessage,
        Action::CreateAttachment,
        Action::GetAttachment,
        Action::ModifyChatParticipants,
        Action::ListChats,
        Action::Sync,
        Action::Ack,
        Action::RemoveDevice,
        Action::UploadKeys,
        Action::GetKeys,
        Action::ListDevices,
        Action::SendToDevices,
        Action::MarkRead,
        Action::GetReceipts,
        Action::Typing,
        Action::DeleteAccount,
        Action::RegisterPush,
        Action::UnregisterPush,
    ];

    /// The name on the wire, which is also the API Gateway route key.
    pub fn name(self) -> &'static str {
        match self {
            Action::CreateChat => "createChat",
            Action::SendMessage => "sendMessage",
            Action::CreateAttachment => "createAttachment",
            Action::GetAttachment => "getAttachment",
            Action::ModifyChatParticipants => "modifyChatParticipants",
            Action::ListChats => "listChats",
            Action::Sync => "sync",
            Action::Ack => "ack",
            Action::RemoveDevice => "removeDevice",
            Action::UploadKeys => "uploadKeys",
            Action::GetKeys => "getKeys",
            Action::ListDevices => "listDevices",
            Action::SendToDevices => "sendToDevices",
            Action::MarkRead => "markRead",
            Action::GetReceipts => "getReceipts",
            Action::Typing => "typing",
            Action::DeleteAccount => "deleteAccount",
            Action::RegisterPush => "registerPush",
            Action::UnregisterPush => "unregisterPush",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    UnknownAction,
    Unauthorized,
    Forbidden,
    NotFound,
    LimitExceeded,
    RateLimited,
    Internal,
    /// An encrypted send's device list is not the server's (protocol version 2).
    MismatchedDevices,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Success,
    Failure,
}

// ---- commands (client to server) ----

/// One client frame: the command its `action` names, and the `requestId`
/// its answer echoes. It reads the frame in one pass (see [`request`]); parse
/// it with `serde_json::from_str`, whose borrowed input that pass relies on.
#[derive(Debug)]
pub struct Request {
    pub request_id: Option<RequestId>,
    pub command: Command,
}

/// Every command of the protocol, one variant per action.
#[derive(Debug)]
pub enum Command {
    CreateChat(CreateChat),
    SendMessage(SendMessage),
    CreateAttachment(CreateAttachment),
    GetAttachment(GetAttachment),
    ModifyChatParticipants(ModifyChatParticipants),
    ListChats(ListChats),
    Sync(Sync),
    Ack(Ack),
    RemoveDevice(RemoveDevice),
    UploadKeys(UploadKeys),
    GetKeys(GetKeys),
    ListDevices(ListDevices),
    SendToDevices(SendToDevices),
    MarkRead(MarkRead),
    GetReceipts(GetReceipts),
    Typing(Typing),
    DeleteAccount(DeleteAccount),
    RegisterPush(RegisterPush),
    UnregisterPush(UnregisterPush),
}

impl Command {
    pub fn action(&self) -> Action {
        match self {
            Command::CreateChat(_) => Action::CreateChat,
            Command::SendMessage(_) => Action::SendMessage,
            Command::CreateAttachment(_) => Action::CreateAttachment,
            Command::GetAttachment(_) => Action::GetAttachment,
            Command::ModifyChatParticipants(_) => Action::ModifyChatParticipants,
            Command::ListChats(_) => Action::ListChats,
            Command::Sync(_) => Action::Sync,
            Command::Ack(_) => Action::Ack,
            Command::RemoveDevice(_) => Action::RemoveDevice,
            Command::UploadKeys(_) => Action::UploadKeys,
            Command::GetKeys(_) => Action::GetKeys,
            Command::ListDevices(_) => Action::ListDevices,
            Command::SendToDevices(_) => Action::SendToDevices,
            Command::MarkRead(_) => Action::MarkRead,
            Command::GetReceipts(_) => Action::GetReceipts,
            Command::Typing(_) => Action::Typing,
            Command::DeleteAccount(_) => Action::DeleteAccount,
            Command::RegisterPush(_) => Action::RegisterPush,
            Command::UnregisterPush(_) => Action::UnregisterPush,
        }
    }
}

/// A client's `requestId`: a string of at most 64 characters, echoed as given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl TryFrom<String> for RequestId {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.chars().count() <= 64 {
            Ok(Self(s))
        } else {
            Err("requestId must be a string of at most 64 characters")
        }
    }
}

impl From<RequestId> for String {
    fn from(id: RequestId) -> String {
        id.0
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateChat {
    pub participants: Vec<UserId>,
    pub name: String,
    #[serde(default)]
    pub encrypted: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMessage {
    pub chat_id: ChatId,
    pub message: String,
    #[serde(default)]
    pub attachments: Vec<AttachmentId>,
    #[serde(default)]
    pub client_message_id: Option<String>,
    /// In an encrypted chat, the digest of the recipient devices as the sender sees them.
    #[serde(default)]
    pub devices: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateAttachment {
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetAttachment {
    pub attachment_id: AttachmentId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Add,
    Remove,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModifyChatParticipants {
    pub chat_id: ChatId,
    pub user_id: UserId,
    pub operation: Operation,
}

#[derive(Debug, Default, Deserialize)]
pub struct ListChats {
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Sync {
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    #[serde(default)]
    pub message_ids: Option<Vec<MessageId>>,
    #[serde(default)]
    pub message_id: Option<MessageId>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveDevice {
    pub device_id: DeviceId,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadKeys {
    #[serde(default)]
    pub identity_key: Option<String>,
    #[serde(default)]
    pub signed_pre_key: Option<SignedKey>,
    #[serde(default)]
    pub one_time_pre_keys: Vec<OneTimeKey>,
    #[serde(default)]
    pub fallback_key: Option<SignedKey>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetKeys {
    pub user_id: UserId,
    #[serde(default)]
    pub device_id: Option<DeviceId>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListDevices {
    pub user_id: UserId,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendToDevices {
    pub messages: Vec<DeviceMessageOut>,
    #[serde(default)]
    pub client_message_id: Option<String>,
}

/// One item of `sendToDevices`: a body for one device.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMessageOut {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub body: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkRead {
    pub chat_id: ChatId,
    pub up_to: String,
    #[serde(default)]
    pub private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetReceipts {
    pub chat_id: ChatId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TypingState {
    Start,
    Stop,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Typing {
    pub chat_id: ChatId,
    pub state: TypingState,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeleteAccount {}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterPush {
    pub platform: Platform,
    /// fcm, apns, apns-sandbox.
    #[serde(default)]
    pub token: Option<String>,
    /// webpush.
    #[serde(default)]
    pub subscription: Option<Subscription>,
}

/// A Web Push subscription as the browser's `PushSubscription.toJSON()` gives it.
#[derive(Debug, Deserialize)]
pub struct Subscription {
    pub endpoint: String,
    pub keys: WebPushKeys,
}

#[derive(Debug, Default, Deserialize)]
pub struct UnregisterPush {}

// ---- results (the `data` of a SUCCESS) ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeysStored {
    pub one_time_pre_keys: u64,
}

/// One device's keys as `getKeys` hands them out.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyBundle {
    pub device_id: DeviceId,
    pub identity_key: String,
    pub signed_pre_key: SignedKey,
    pub one_time_pre_key: Option<OneTimeKey>,
    pub fallback_key: Option<SignedKey>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyBundles {
    pub devices: Vec<KeyBundle>,
}

/// A ready device as `listDevices` and `deviceList` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    pub device_id: DeviceId,
    pub identity_key: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceIdentities {
    pub devices: Vec<DeviceIdentity>,
}

/// A recipient device as the device check names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecipientDevice {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub identity_key: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicesSent {
    pub message_id: MessageId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub user_id: UserId,
    pub delivered: Option<MessageId>,
    pub read: Option<MessageId>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Receipts {
    pub receipts: Vec<Receipt>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatCreated {
    pub chat_id: ChatId,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageSent {
    pub message_id: MessageId,
    pub timestamp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentCreated {
    pub attachment_id: AttachmentId,
    pub upload_url: String,
    pub upload_headers: BTreeMap<String, String>,
    pub expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentLink {
    pub attachment_id: AttachmentId,
    pub download_url: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    pub expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Participants {
    pub participants: Vec<UserId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatSummary {
    pub chat_id: ChatId,
    pub name: String,
    pub participants: Vec<UserId>,
    pub admins: Vec<UserId>,
    pub encrypted: bool,
}

/// A page of the caller's chats, in chatId order; `cursor: null` at the end.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatList {
    pub chats: Vec<ChatSummary>,
    pub cursor: Option<String>,
}

/// A page of the inbox. Messages stay as the JSON stored at send time, so a
/// sync copies bytes rather than re-encoding every message.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncPage {
    pub messages: Vec<Box<RawValue>>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Acked {
    pub acked: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

// ---- server frames ----

/// A message as pushed in `newMessage` and returned by `sync`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub message_id: MessageId,
    pub chat_id: ChatId,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub message: String,
    pub attachments: Vec<AttachmentId>,
    pub timestamp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// With MISMATCHED_DEVICES: the recipient devices as the server sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<RecipientDevice>>,
}

/// A response to one command.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response<D = Box<RawValue>> {
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<D>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Every frame the server sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerFrame<D = Box<RawValue>> {
    Response(Response<D>),
    NewMessage(Message),
    ChatUpdate(ChatUpdate),
    DeviceMessage(DeviceMessage),
    Receipt(ReceiptPush),
    Typing(TypingPush),
    DeviceList(DeviceList),
    KeysLow(KeysLow),
}

/// A message for one device (`sendToDevices`), as pushed and synced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMessage {
    pub message_id: MessageId,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub body: String,
    pub timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptPush {
    pub chat_id: ChatId,
    pub user_id: UserId,
    pub delivered: Option<MessageId>,
    pub read: Option<MessageId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypingPush {
    pub chat_id: ChatId,
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub state: TypingState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceList {
    pub user_id: UserId,
    pub devices: Vec<DeviceIdentity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysLow {
    pub remaining: u64,
}

/// Encodes a push frame.
pub fn push_frame(frame: ServerFrame<()>) -> String {
    serde_json::to_string(&frame).expect("push frames serialise")
}

/// The form a stored device message takes: its `deviceMessage` push frame,
/// which is also what sync returns for it.
pub fn device_message_json(message: &DeviceMessage) -> String {
    push_frame(ServerFrame::DeviceMessage(message.clone()))
}

/// The push frame, which is also the sync item, of a stored inbox row:
/// device messages are stored with their `type`; chat messages (stored as
/// the bare Message object) get `"type":"newMessage"` put in front. `None`
/// for a row that is no JSON object.
pub fn stored_frame(stored: &str) -> Option<std::borrow::Cow<'_, str>> {
    if stored.starts_with(r#"{"type":"#) {
        Some(std::borrow::Cow::Borrowed(stored))
    } else {
        new_message_frame(stored).map(std::borrow::Cow::Owned)
    }
}

/// The `chatId` of a stored message's wire JSON; `None` for a device
/// message (which has none) or a row that is no message.
pub fn chat_of(stored: &str) -> Option<ChatId> {
    #[derive(Deserialize)]
    struct ChatOf {
        #[serde(rename = "chatId")]
        chat_id: Option<ChatId>,
    }
    serde_json::from_str::<ChatOf>(stored).ok()?.chat_id
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatUpdate {
    pub chat_id: ChatId,
    pub name: String,
    pub participants: Vec<UserId>,
    pub admins: Vec<UserId>,
}

/// Encodes a SUCCESS frame.
pub fn success<D: Serialize>(action: &str, request_id: Option<String>, data: &D) -> String {
    serde_json::to_string(&ServerFrame::Response(Response {
        action: action.to_owned(),
        request_id,
        status: Status::Success,
        data: Some(data),
        error: None,
    }))
    .expect("response data serializes")
}

/// The longest error message a FAILURE carries, in characters.
pub const MAX_ERROR_MESSAGE: usize = 256;

/// Encodes a FAILURE frame.
/// The message is cut to [`MAX_ERROR_MESSAGE`] characters.
pub fn failure(action: &str, request_id: Option<String>, code: ErrorCode, mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_MESSAGE) {
        message.truncate(cut);
    }
    serde_json::to_string(&ServerFrame::<()>::Response(Response {
        action: action.to_owned(),
        request_id,
        status: Status::Failure,
        data: None,
        error: Some(ErrorBody { code, message, devices: None }),
    }))
    .expect("error frame serializes")
}

/// Encodes the FAILURE of an encrypted send whose device list is stale,
/// carrying the current one.
pub fn mismatched_devices(action: &str, request_id: Option<String>, devices: &[RecipientDevice]) -> String {
    serde_json::to_string(&ServerFrame::<()>::Response(Response {
        action: action.to_owned(),
        request_id,
        status: Status::Failure,
        data: None,
        error: Some(ErrorBody {
            code: ErrorCode::MismatchedDevices,
            message: "the recipient devices have changed".to_owned(),
            devices: Some(devices.to_vec()),
        }),
    }))
    .expect("error frame serializes")
}

/// Encodes a `newMessage` push from a message's stored JSON, without
/// re-parsing it: `None` unless that JSON opens an object with a member. A
/// Deliver job carries the JSON in its body, and a queue delivers whatever
/// was sent to it.
pub fn new_message_frame(message_json: &str) -> Option<String> {
    let members = message_json.strip_prefix('{').filter(|rest| rest.trim_start().starts_with('"'))?;
    Some(format!(r#"{{"type":"newMessage",{members}"#))
}

pub fn chat_update_frame(update: &ChatUpdate) -> String {
    serde_json::to_string(&ServerFrame::<()>::ChatUpdate(update.clone())).expect("chat update serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_exact_wire_shapes() {
        let ok = success(
            "createChat",
            Some("r1".into()),
            &ChatCreated { chat_id: ChatId::try_from("C1").unwrap() },
        );
        assert_eq!(
            ok,
            r#"{"type":"response","action":"createChat","requestId":"r1","status":"SUCCESS","data":{"chatId":"C1"}}"#
        );
        let bad = failure("sync", None, ErrorCode::BadRequest, "no".into());
        assert_eq!(
            bad,
            r#"{"type":"response","action":"sync","status":"FAILURE","error":{"code":"BAD_REQUEST","message":"no"}}"#
        );
        let msg = Message {
            message_id: MessageId::try_from("M").unwrap(),
            chat_id: ChatId::try_from("C").unwrap(),
            user_id: UserId::try_from("u").unwrap(),
            device_id: DeviceId::try_from("d").unwrap(),
            message: "hi".into(),
            attachments: vec![],
            timestamp: 5,
        };
        let push = new_message_frame(&serde_json::to_string(&msg).unwrap()).unwrap();
        assert_eq!(
            push,
            r#"{"type":"newMessage","messageId":"M","chatId":"C","userId":"u","deviceId":"d","message":"hi","attachments":[],"timestamp":5}"#
        );
        let parsed: ServerFrame = serde_json::from_str(&push).unwrap();
        assert!(matches!(parsed, ServerFrame::NewMessage(m) if m == msg));
        // A job's body is not trusted to hold an object (fuzz/regressions/sqs_event/).
        for json in ["", r#"!"messageId":"M"}"#, "{}", "{ }", "\u{e9}{", "[1]"] {
            assert_eq!(new_message_frame(json), None, "{json}");
        }
    }

    #[test]
    fn every_action_round_trips_through_its_route_key() {
        for a in Action::ALL {
            assert_eq!(Action::from_name(a.name()), Some(a));
        }
        assert_eq!(Action::from_name("$default"), None);
    }
}
