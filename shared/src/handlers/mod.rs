//! Handlers: API Gateway WebSocket events in, route responses out.
//!
//! A Lambda binary runs one of these for its route; the local gateway runs
//! the same ones through [`route`]. Each parses the event into a typed
//! command, makes one service call and maps the result to a frame.

mod commands;
mod connection;
#[cfg(feature = "aws")]
mod events;

use std::collections::HashMap;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use serde::Deserialize;
use serde_json::Value;

pub use commands::{
    Command, ack, create_attachment, create_chat, get_attachment, list_chats, modify_chat_participants,
    remove_device, send_message, sync,
};
pub use connection::{
    AUTHORIZER_DEVICE, AUTHORIZER_USER, authorizer, authorizer_context, connect, default, disconnect,
};
#[cfg(feature = "aws")]
pub use events::{cleanup, deliver, fanout};

use crate::domain::Caller;
use crate::error::Error;
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::protocol::{Action, ErrorCode, failure};
use crate::service::Courier;

pub type WsEvent = ApiGatewayWebsocketProxyRequest;
pub type WsResponse = ApiGatewayProxyResponse;

/// The route keys besides the actions.
pub const CONNECT: &str = "$connect";
pub const DISCONNECT: &str = "$disconnect";
pub const DEFAULT: &str = "$default";

/// Runs the handler of the event's route, as API Gateway would pick it.
pub async fn route(courier: &Courier, event: WsEvent) -> WsResponse {
    let key = event.request_context.route_key.clone().unwrap_or_default();
    match key.as_str() {
        CONNECT => connect(courier, event).await,
        DISCONNECT => disconnect(courier, event).await,
        other => match Action::from_name(other) {
            Some(Action::CreateChat) => create_chat(courier, event).await,
            Some(Action::SendMessage) => send_message(courier, event).await,
            Some(Action::CreateAttachment) => create_attachment(courier, event).await,
            Some(Action::GetAttachment) => get_attachment(courier, event).await,
            Some(Action::ModifyChatParticipants) => modify_chat_participants(courier, event).await,
            Some(Action::ListChats) => list_chats(courier, event).await,
            Some(Action::Sync) => sync(courier, event).await,
            Some(Action::Ack) => ack(courier, event).await,
            Some(Action::RemoveDevice) => remove_device(courier, event).await,
            None => default(event).await,
        },
    }
}

/// The route API Gateway selects for a frame (`$request.body.action`).
pub fn select_route(body: &str) -> &'static str {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        action: Option<std::borrow::Cow<'a, str>>,
    }
    match serde_json::from_str::<Head>(body) {
        Ok(Head { action: Some(a) }) => Action::from_name(&a).map_or(DEFAULT, Action::name),
        _ => DEFAULT,
    }
}

/// Builds the event API Gateway sends for one frame or connection event.
/// `authorizer` is the context the $connect authorizer returned.
pub fn ws_event(
    route_key: &str,
    connection: &ConnectionId,
    authorizer: &HashMap<String, Value>,
    body: Option<String>,
    now_ms: i64,
) -> WsEvent {
    let mut event = WsEvent::default();
    let ctx = &mut event.request_context;
    ctx.route_key = Some(route_key.to_owned());
    ctx.connection_id = Some(connection.to_string());
    ctx.event_type = Some(
        match route_key {
            CONNECT => "CONNECT",
            DISCONNECT => "DISCONNECT",
            _ => "MESSAGE",
        }
        .to_owned(),
    );
    ctx.message_direction = Some("IN".to_owned());
    ctx.stage = Some("local".to_owned());
    ctx.request_time_epoch = now_ms;
    ctx.connected_at = now_ms;
    ctx.authorizer.fields = authorizer.clone();
    event.body = body;
    event
}

/// Who sent the event, from the authorizer context and the connection id.
fn caller(event: &WsEvent) -> Result<Caller, Error> {
    let ctx = &event.request_context;
    let field = |name: &str| ctx.authorizer.fields.get(name).and_then(Value::as_str).unwrap_or_default();
    let unauthorized = || Error::Unauthorized("the connection carries no verified identity".into());
    Ok(Caller {
        user: UserId::try_from(field(AUTHORIZER_USER)).map_err(|_| unauthorized())?,
        device: DeviceId::try_from(field(AUTHORIZER_DEVICE)).map_err(|_| unauthorized())?,
        connection: ConnectionId::try_from(ctx.connection_id.clone().unwrap_or_default())
            .map_err(|_| unauthorized())?,
    })
}

/// A 200 route response that carries one frame back to the client.
fn reply(frame: String) -> WsResponse {
    let mut response = WsResponse::default();
    response.status_code = 200;
    response.body = Some(Body::Text(frame));
    response
}

/// A route response with only a status, as $connect and $disconnect answer.
fn status(code: i64) -> WsResponse {
    let mut response = WsResponse::default();
    response.status_code = code;
    response
}

fn error_reply(action: &str, request_id: Option<String>, error: &Error) -> WsResponse {
    if matches!(error, Error::Internal(_) | Error::Unavailable(_)) {
        tracing::error!(action, error = %error, source = ?std::error::Error::source(error), "command failed");
    }
    reply(failure(action, request_id, error.code(), error.client_message()))
}

/// The frame body of an event as text.
fn body_text(event: &WsEvent) -> Option<&str> {
    event.body.as_deref()
}

/// What a body says before the command's own fields are read.
struct Head {
    action: String,
    request_id: Option<String>,
}

/// Reads the action and requestId, or says why the frame is no request at all.
fn head(body: Option<&str>) -> Result<Head, (Option<String>, String, ErrorCode)> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        action: Option<Value>,
        request_id: Option<Value>,
    }
    let body = body.unwrap_or_default();
    // serde reads a struct from an array too; a frame must be an object.
    let parsed = if body.trim_start().starts_with('{') {
        serde_json::from_str::<Raw>(body)
    } else {
        serde_json::from_str::<serde::de::IgnoredAny>(body)
            .and_then(|_| Err(serde::de::Error::custom("not an object")))
    };
    let raw = match parsed {
        Ok(raw) => raw,
        Err(e) if e.is_data() => {
            return Err((None, "a frame is one JSON object".into(), ErrorCode::BadRequest));
        }
        Err(_) => {
            return Err((None, "the frame is not valid JSON".into(), ErrorCode::BadRequest));
        }
    };
    let request_id = match raw.request_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 64 => Some(s),
        Some(_) => {
            return Err((
                None,
                "requestId must be a string of at most 64 characters".into(),
                ErrorCode::BadRequest,
            ));
        }
    };
    match raw.action {
        Some(Value::String(action)) => Ok(Head { action, request_id }),
        Some(_) => Err((request_id, "action must be a string".into(), ErrorCode::BadRequest)),
        None => Err((request_id, "the frame has no action".into(), ErrorCode::BadRequest)),
    }
}

/// A FAILURE for a frame the gateway itself refuses (too large, rate
/// limited), echoing the frame's action and requestId where it has them.
pub fn refusal(body: &str, code: ErrorCode, message: &str) -> String {
    let (action, request_id) = match head(Some(body)) {
        Ok(head) => (head.action.chars().take(64).collect(), head.request_id),
        Err((request_id, _, _)) => (DEFAULT.to_owned(), request_id),
    };
    failure(&action, request_id, code, message.to_owned())
}
