//! One frame in, one reply out: the typed path every client frame takes, in
//! the local gateway and behind the Lambda event edge alike.
//!
//! A frame is parsed once into a [`Request`], its command runs as one
//! service call with the caller the connection was authorised as, and the
//! result becomes the response frame. Only a frame that does not parse is
//! read again, leniently, to echo its action and requestId and say what is
//! wrong.
//!
//! Each command is a [`Route`]: [`route`] runs one, reading only its own
//! command, so that a Lambda function serving one route links that
//! command's parser and service code and no other's. [`dispatch`] (the
//! local gateway's, every command) picks the route and runs the same code.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::domain::Caller;
use crate::error::Error;
use crate::protocol::{self, Action, Command, ErrorCode, Request, RequestId, RouteCommand, RouteRequest};
use crate::service::Courier;

/// The route of frames that name no known action.
pub const DEFAULT_ROUTE: &str = "$default";

/// Runs one client frame for `caller` and returns the frame that answers it,
/// or `None` when the answer was already pushed (a device removing itself
/// is answered before its connection closes).
pub async fn dispatch(courier: &Courier, caller: &Caller, frame: &str) -> Option<String> {
    let request: Request = match parse(frame) {
        Ok(request) => request,
        Err(refused) => return Some(refused),
    };
    let id = request.request_id.map(String::from);
    match request.command {
        Command::CreateChat(c) => c.run(courier, caller, id).await,
        Command::SendMessage(c) => c.run(courier, caller, id).await,
        Command::CreateAttachment(c) => c.run(courier, caller, id).await,
        Command::GetAttachment(c) => c.run(courier, caller, id).await,
        Command::ModifyChatParticipants(c) => c.run(courier, caller, id).await,
        Command::ListChats(c) => c.run(courier, caller, id).await,
        Command::Sync(c) => c.run(courier, caller, id).await,
        Command::Ack(c) => c.run(courier, caller, id).await,
        Command::RemoveDevice(c) => c.run(courier, caller, id).await,
        Command::UploadKeys(c) => c.run(courier, caller, id).await,
        Command::GetKeys(c) => c.run(courier, caller, id).await,
        Command::ListDevices(c) => c.run(courier, caller, id).await,
        Command::SendToDevices(c) => c.run(courier, caller, id).await,
        Command::MarkRead(c) => c.run(courier, caller, id).await,
        Command::GetReceipts(c) => c.run(courier, caller, id).await,
        Command::Typing(c) => c.run(courier, caller, id).await,
        Command::DeleteAccount(c) => c.run(courier, caller, id).await,
        Command::RegisterPush(c) => c.run(courier, caller, id).await,
        Command::UnregisterPush(c) => c.run(courier, caller, id).await,
    }
}

/// Runs one client frame on the route of `R`, as [`dispatch`] runs a frame
/// of `R`'s action. A frame that names another action is answered as
/// [`unrouted`] answers it, except that the other action's fields are not
/// read (that would link its parser): a frame API Gateway would not have
/// routed here gets UNKNOWN_ACTION even where `$default` would have said
/// BAD_REQUEST about its fields.
pub async fn route<R: Route>(courier: &Courier, caller: &Caller, frame: &str) -> Option<String> {
    match parse::<RouteRequest<R>>(frame) {
        Ok(request) => request.command.run(courier, caller, request.request_id.map(String::from)).await,
        Err(refused) => Some(refused),
    }
}

/// A command with its route: its one service call, and how its result
/// answers the frame.
pub trait Route: RouteCommand + Send {
    /// Runs the command for `caller` and returns the frame that answers it,
    /// echoing `request_id`, or `None` when the answer was already pushed.
    fn run(
        self,
        courier: &Courier,
        caller: &Caller,
        request_id: Option<String>,
    ) -> impl Future<Output = Option<String>> + Send;
}

/// The routes whose answer is their service call's result.
macro_rules! routes {
    ($($command:ident => |$courier:ident, $caller:ident, $c:ident| $call:expr;)*) => {$(
        impl Route for protocol::$command {
            async fn run(self, $courier: &Courier, $caller: &Caller, request_id: Option<String>) -> Option<String> {
                let $c = self;
                Some(respond(Self::ACTION.name(), request_id, to_value($call.await)))
            }
        }
    )*};
}

routes! {
    CreateChat => |courier, caller, c| courier.create_chat(caller, c);
    SendMessage => |courier, caller, c| courier.send_message(caller, c);
    CreateAttachment => |courier, caller, c| courier.create_attachment(caller, c);
    GetAttachment => |courier, caller, c| courier.get_attachment(caller, &c.attachment_id);
    ModifyChatParticipants => |courier, caller, c| courier.modify_chat_participants(caller, c);
    ListChats => |courier, caller, c| courier.list_chats(caller, c);
    Sync => |courier, caller, c| courier.sync(caller, c);
    Ack => |courier, caller, c| courier.ack(caller, c);
    UploadKeys => |courier, caller, c| courier.upload_keys(caller, c);
    GetKeys => |courier, caller, c| courier.get_keys(caller, c);
    ListDevices => |courier, caller, c| courier.list_devices(caller, c);
    SendToDevices => |courier, caller, c| courier.send_to_devices(caller, c);
    MarkRead => |courier, caller, c| courier.mark_read(caller, c);
    GetReceipts => |courier, caller, c| courier.get_receipts(caller, c);
    Typing => |courier, caller, c| courier.typing(caller, c);
    RegisterPush => |courier, caller, c| courier.register_push(caller, c);
    UnregisterPush => |courier, caller, c| courier.unregister_push(caller, c);
}

impl Route for protocol::DeleteAccount {
    async fn run(self, courier: &Courier, caller: &Caller, id: Option<String>) -> Option<String> {
        let action = Self::ACTION.name();
        match courier.delete_account(caller).await {
            // The caller's own connection is closed with the rest; the
            // answer goes out first where it still can.
            Ok(own) => {
                let frame = protocol::success(action, id, &protocol::Empty {});
                let push = &courier.ports().push;
                if let Err(e) = push.post(&caller.connection, &frame).await {
                    tracing::debug!(error = %e, "answering deleteAccount failed");
                }
                for connection in own {
                    if let Err(e) = push.close(&connection).await {
                        tracing::warn!(error = %e, "closing a deleted account's connection failed");
                    }
                }
                None
            }
            Err(e) => Some(respond(action, id, Err(e))),
        }
    }
}

impl Route for protocol::RemoveDevice {
    async fn run(self, courier: &Courier, caller: &Caller, id: Option<String>) -> Option<String> {
        let action = Self::ACTION.name();
        match courier.remove_device(caller, &self.device_id).await {
            Ok(None) => Some(respond(action, id, Ok(empty()))),
            // Removing the device that asks closes this very connection:
            // the answer goes out first, as a push (a Lambda's route
            // response would arrive after the close).
            Ok(Some(own)) => {
                let frame = protocol::success(action, id, &protocol::Empty {});
                let push = &courier.ports().push;
                if let Err(e) = push.post(&own, &frame).await {
                    tracing::warn!(error = %e, "answering removeDevice failed");
                }
                if let Err(e) = push.close(&own).await {
                    tracing::warn!(error = %e, "closing the removed device's connection failed");
                }
                None
            }
            Err(e) => Some(respond(action, id, Err(e))),
        }
    }
}

/// A command's result, serialised once for the frame.
type Outcome = Result<Box<serde_json::value::RawValue>, Error>;

fn to_value<T: Serialize>(result: Result<T, Error>) -> Outcome {
    result.and_then(|data| serde_json::value::to_raw_value(&data).map_err(Error::internal))
}

fn empty() -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&protocol::Empty {}).expect("{} serialises")
}

fn respond(action: &str, request_id: Option<String>, result: Outcome) -> String {
    match result {
        Ok(data) => protocol::success(action, request_id, &data),
        Err(e) => error_frame(action, request_id, &e),
    }
}

/// The FAILURE frame of an error, logging the ones the client cannot act on.
pub fn error_frame(action: &str, request_id: Option<String>, error: &Error) -> String {
    if matches!(error, Error::Internal(_) | Error::Unavailable(_)) {
        tracing::error!(action, error = %error, source = ?std::error::Error::source(error), "command failed");
    }
    if let Error::MismatchedDevices(devices) = error {
        return protocol::mismatched_devices(action, request_id, devices);
    }
    protocol::failure(action, request_id, error.code(), error.client_message())
}

/// What a frame is parsed into: any command's [`Request`], or one route's
/// [`RouteRequest`].
trait Frame: for<'de> Deserialize<'de> {
    /// Whether a frame of `action` reads as this.
    fn reads(action: Action) -> bool;
}

impl Frame for Request {
    fn reads(_: Action) -> bool {
        true
    }
}

impl<C: RouteCommand> Frame for RouteRequest<C> {
    fn reads(action: Action) -> bool {
        action == C::ACTION
    }
}

/// Parses a frame, or returns the FAILURE that answers it.
fn parse<F: Frame>(frame: &str) -> Result<F, String> {
    if let Ok(request) = serde_json::from_str::<F>(frame) {
        return Ok(request);
    }
    let head = match head(frame) {
        Ok(head) => head,
        Err(Refusal { request_id, code, message }) => {
            return Err(protocol::failure(DEFAULT_ROUTE, request_id, code, message.into()));
        }
    };
    let request_id = head.request_id.map(String::from);
    let Some(action) = Action::from_name(&head.action) else {
        let shown: String = head.action.chars().take(64).collect();
        return Err(protocol::failure(&shown, request_id, ErrorCode::UnknownAction, "unknown action".into()));
    };
    if !F::reads(action) {
        return Err(unserved(action, request_id));
    }
    // The action is known, so the command's own fields are wrong: say which
    // way, without quoting the client's values back.
    let message = match serde_json::from_str::<F>(frame) {
        Err(e) => field_error(&e),
        Ok(_) => "the frame is not a valid request".to_owned(),
    };
    Err(protocol::failure(action.name(), request_id, ErrorCode::BadRequest, message))
}

/// The FAILURE of a valid frame whose action no route here serves.
fn unserved(action: Action, request_id: Option<String>) -> String {
    protocol::failure(
        action.name(),
        request_id,
        ErrorCode::UnknownAction,
        "no route serves this action".into(),
    )
}

/// What a frame says before its command's fields are read.
struct Head {
    action: String,
    request_id: Option<RequestId>,
}

/// Why a frame is no request at all.
struct Refusal {
    request_id: Option<String>,
    code: ErrorCode,
    message: &'static str,
}

/// Reads the action and requestId of a frame, leniently.
fn head(frame: &str) -> Result<Head, Refusal> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw<'a> {
        #[serde(default)]
        action: Option<serde_json::Value>,
        #[serde(borrow, default)]
        request_id: Option<Cow<'a, serde_json::value::RawValue>>,
    }
    let refuse = |request_id, message| Refusal { request_id, code: ErrorCode::BadRequest, message };
    if !frame.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(frame) {
            Ok(_) => refuse(None, "a frame is one JSON object"),
            Err(_) => refuse(None, "the frame is not valid JSON"),
        });
    }
    let raw = match serde_json::from_str::<Raw>(frame) {
        Ok(raw) => raw,
        Err(_) => return Err(refuse(None, "the frame is not valid JSON")),
    };
    let request_id =
        match raw.request_id.as_deref().map(|r| serde_json::from_str::<Option<RequestId>>(r.get())) {
            None => None,
            Some(Ok(id)) => id,
            Some(Err(_)) => return Err(refuse(None, "requestId must be a string of at most 64 characters")),
        };
    match raw.action {
        Some(serde_json::Value::String(action)) => Ok(Head { action, request_id }),
        Some(_) => Err(refuse(request_id.map(String::from), "action must be a string")),
        None => Err(refuse(request_id.map(String::from), "the frame has no action")),
    }
}

/// serde's complaint, without the client's values (which serde quotes) and
/// without the line and column, which mean nothing to a client.
fn field_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = text.rfind(" at line ").map_or(text.as_str(), |i| &text[..i]);
    // "invalid type: string \"...\", expected u32" and its kin.
    for kind in ["invalid type", "invalid value", "unknown variant"] {
        if let Some(rest) = text.strip_prefix(kind) {
            let expected = rest.rfind(", expected ").map(|i| &rest[i + 2..]);
            return match expected {
                Some(expected) => format!("{kind}: {expected}"),
                None => kind.to_owned(),
            };
        }
    }
    text.to_owned()
}

/// The answer of the `$default` route: a frame that names no known action
/// (or one whose route is missing from the deployment).
pub fn unrouted(frame: &str) -> String {
    match parse::<Request>(frame) {
        Err(refused) => refused,
        Ok(request) => unserved(request.command.action(), request.request_id.map(String::from)),
    }
}

/// A FAILURE for a frame refused before it runs (too large, rate limited),
/// echoing the frame's action and requestId where it has them.
pub fn refusal(frame: &str, code: ErrorCode, message: &str) -> String {
    let (action, request_id) = match head(frame) {
        Ok(head) => (head.action.chars().take(64).collect(), head.request_id.map(String::from)),
        Err(refused) => (DEFAULT_ROUTE.to_owned(), refused.request_id),
    };
    protocol::failure(&action, request_id, code, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(frame: &str) -> Result<Command, serde_json::Value> {
        parse::<Request>(frame).map(|r| r.command).map_err(|f| serde_json::from_str(&f).unwrap())
    }

    #[test]
    fn a_frame_parses_into_its_command_once() {
        let c = parsed(r#"{"action":"sync","requestId":"r","limit":5}"#).unwrap();
        assert!(matches!(c, Command::Sync(protocol::Sync { limit: Some(5), cursor: None })));
        let c = parsed(r#"{"limit":5,"action":"listChats"}"#).unwrap();
        assert_eq!(c.action(), Action::ListChats);
    }

    #[test]
    fn a_route_refuses_what_is_not_its_own_as_default_does() {
        let routed = |frame| parse::<RouteRequest<protocol::Sync>>(frame).map(|r| r.command);
        let ok = routed(r#"{"requestId":"r","action":"sync","limit":3}"#).unwrap();
        assert_eq!(ok.limit, Some(3));
        for frame in [
            // Another action, valid: `$default`'s "no route serves this action".
            r#"{"action":"ack","requestId":"r1","messageIds":["a"]}"#,
            r#"{"action":"deleteAccount"}"#,
            // Its own action, but fields of the wrong type.
            r#"{"action":"sync","requestId":"r2","limit":"x"}"#,
            r#"{"limit":-1,"action":"sync"}"#,
            // No request at all.
            r#"{"action":"nope","requestId":"r3"}"#,
            r#"{"action":5}"#,
            r#"{"action":"sync","requestId":5}"#,
            r#"{"action":"sync","action":"ack"}"#,
            "[1]",
            "{",
        ] {
            assert_eq!(routed(frame).unwrap_err(), unrouted(frame), "{frame}");
        }
        // Where `$default` reads another action's fields, a route does not:
        // that would link the other command's parser.
        let f: serde_json::Value =
            serde_json::from_str(&routed(r#"{"action":"ack","messageIds":5}"#).unwrap_err()).unwrap();
        assert_eq!((&f["action"], &f["error"]["code"]), (&"ack".into(), &"UNKNOWN_ACTION".into()));
    }

    #[test]
    fn refusals_echo_what_they_can_and_quote_no_values() {
        let f = parsed(r#"{"action":"nope","requestId":"r1"}"#).unwrap_err();
        assert_eq!(f["action"], "nope");
        assert_eq!(f["requestId"], "r1");
        assert_eq!(f["error"]["code"], "UNKNOWN_ACTION");

        let secret = "\u{1}\u{2}\u{3}".repeat(1000);
        let frame = serde_json::json!({"action": "sync", "limit": secret}).to_string();
        let f = parsed(&frame).unwrap_err();
        assert_eq!(f["action"], "sync");
        assert_eq!(f["error"]["code"], "BAD_REQUEST");
        let message = f["error"]["message"].as_str().unwrap();
        assert!(message.contains("expected u32"), "{message}");
        assert!(!message.contains('\u{1}') && message.len() < 256, "{message}");

        let f = parsed(r#"{"action":"modifyChatParticipants","chatId":"c","userId":"u","operation":"EVIL"}"#)
            .unwrap_err();
        assert!(!f["error"]["message"].as_str().unwrap().contains("EVIL"));

        let f = parsed(r#"{"action":"createChat","participants":["bad user"],"name":"x"}"#).unwrap_err();
        assert!(!f["error"]["message"].as_str().unwrap().contains("bad user"));

        let f = parsed("[1]").unwrap_err();
        assert_eq!(f["action"], DEFAULT_ROUTE);
        let f = parsed(r#"{"action":"sync","requestId":5}"#).unwrap_err();
        assert_eq!(f["error"]["code"], "BAD_REQUEST");
        assert!(f.get("requestId").is_none());
    }
}
