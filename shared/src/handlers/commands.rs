//! One handler per command route: parse the frame, call the service, answer.

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{WsEvent, WsResponse, body_text, caller, error_reply, head, reply};
use crate::domain::Caller;
use crate::error::Result;
use crate::protocol::{self, Action, ErrorCode};
use crate::service::Courier;

/// A command of the protocol: its route and the service call it makes.
#[async_trait]
pub trait Command: DeserializeOwned + Send + 'static {
    const ACTION: Action;
    type Output: Serialize + Send;
    async fn run(self, courier: &Courier, caller: &Caller) -> Result<Self::Output>;
}

/// The requestId, the caller and the typed command of an event, or the
/// FAILURE that answers it.
fn parse<C: DeserializeOwned>(
    action: &str,
    event: &WsEvent,
) -> std::result::Result<(Option<String>, Caller, C), Box<WsResponse>> {
    let head = match head(body_text(event)) {
        Ok(head) => head,
        Err((request_id, message, code)) => {
            return Err(Box::new(reply(protocol::failure(action, request_id, code, message))));
        }
    };
    let request_id = head.request_id;
    let caller = match caller(event) {
        Ok(caller) => caller,
        Err(e) => return Err(Box::new(error_reply(action, request_id, &e))),
    };
    match serde_json::from_str(body_text(event).unwrap_or_default()) {
        Ok(command) => Ok((request_id, caller, command)),
        Err(e) => Err(Box::new(reply(protocol::failure(
            action,
            request_id,
            ErrorCode::BadRequest,
            field_error(&e),
        )))),
    }
}

/// The body of every command handler.
async fn handle<C: Command>(courier: &Courier, event: WsEvent) -> WsResponse {
    let action = C::ACTION.name();
    let (request_id, caller, command) = match parse::<C>(action, &event) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    match command.run(courier, &caller).await {
        Ok(data) => reply(protocol::success(action, request_id, &data)),
        Err(e) => error_reply(action, request_id, &e),
    }
}

/// serde's complaint without the line and column, which mean nothing to a client.
fn field_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

macro_rules! command {
    ($(#[$doc:meta])* $handler:ident, $cmd:ty, $action:ident, $output:ty, |$c:ident, $who:ident, $this:ident| $call:expr) => {
        #[async_trait]
        impl Command for $cmd {
            const ACTION: Action = Action::$action;
            type Output = $output;
            async fn run(self, $c: &Courier, $who: &Caller) -> Result<$output> {
                let $this = self;
                $call.await
            }
        }

        $(#[$doc])*
        pub async fn $handler(courier: &Courier, event: WsEvent) -> WsResponse {
            handle::<$cmd>(courier, event).await
        }
    };
}

command!(
    /// `createChat`
    create_chat, protocol::CreateChat, CreateChat, protocol::ChatCreated,
    |c, who, cmd| c.create_chat(who, cmd)
);
command!(
    /// `sendMessage`
    send_message, protocol::SendMessage, SendMessage, protocol::MessageSent,
    |c, who, cmd| c.send_message(who, cmd)
);
command!(
    /// `createAttachment`
    create_attachment, protocol::CreateAttachment, CreateAttachment, protocol::AttachmentCreated,
    |c, who, cmd| c.create_attachment(who, cmd)
);
command!(
    /// `getAttachment`
    get_attachment, protocol::GetAttachment, GetAttachment, protocol::AttachmentLink,
    |c, who, cmd| c.get_attachment(who, &cmd.attachment_id)
);
command!(
    /// `modifyChatParticipants`
    modify_chat_participants, protocol::ModifyChatParticipants, ModifyChatParticipants, protocol::Participants,
    |c, who, cmd| c.modify_chat_participants(who, cmd)
);
command!(
    /// `listChats`
    list_chats, protocol::ListChats, ListChats, protocol::ChatList,
    |c, who, _cmd| c.list_chats(who)
);
command!(
    /// `sync`
    sync, protocol::Sync, Sync, protocol::SyncPage,
    |c, who, cmd| c.sync(who, cmd)
);
command!(
    /// `ack`
    ack, protocol::Ack, Ack, protocol::Acked,
    |c, who, cmd| c.ack(who, cmd)
);
/// `removeDevice`. Removing the device that asks closes this very
/// connection, so the answer is pushed before the close rather than
/// returned (a Lambda's route response would arrive after it).
pub async fn remove_device(courier: &Courier, event: WsEvent) -> WsResponse {
    let action = Action::RemoveDevice.name();
    let (request_id, caller, command) = match parse::<protocol::RemoveDevice>(action, &event) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    match courier.remove_device(&caller, &command.device_id).await {
        Ok(None) => reply(protocol::success(action, request_id, &protocol::Empty {})),
        Ok(Some(own)) => {
            let frame = protocol::success(action, request_id, &protocol::Empty {});
            if let Err(e) = courier.ports().push.post(&own, &frame).await {
                tracing::warn!(error = %e, "answering removeDevice failed");
            }
            if let Err(e) = courier.ports().push.close(&own).await {
                tracing::warn!(error = %e, "closing the removed device's connection failed");
            }
            super::status(200)
        }
        Err(e) => error_reply(action, request_id, &e),
    }
}
