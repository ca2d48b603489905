//! The Lambda event edge: API Gateway, DynamoDB Streams, SQS and schedule
//! events in, the core's typed path through, the responses Lambda returns out.
//!
//! A command route's function reads the caller from the authorizer context
//! and hands the frame to its route, [`courier_core::dispatch::route`],
//! after the frame-size and rate checks the local gateway makes too: the
//! same answers as the local gateway's [`courier_core::dispatch::dispatch`],
//! while its binary links only its own command. Every `events/` file runs
//! through here in the tests.

mod connection;
mod events;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Instant;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use courier_core::Courier;
use courier_core::dispatch::{self, DEFAULT_ROUTE, Route};
use courier_core::domain::Caller;
use courier_core::ids::{ConnectionId, DeviceId, UserId};
use courier_core::protocol::{self, Action, ErrorCode};
use courier_core::ratelimit::{RateLimit, TokenBucket};
use serde_json::Value;

pub use connection::{
    AUTHORIZER_DEVICE, AUTHORIZER_USER, authorizer, authorizer_context, connect, disconnect,
};
pub use events::{cleanup, deliver, fanout, wake};

pub type WsEvent = ApiGatewayWebsocketProxyRequest;
pub type WsResponse = ApiGatewayProxyResponse;

/// The route keys besides the actions.
pub const CONNECT: &str = "$connect";
pub const DISCONNECT: &str = "$disconnect";
pub const DEFAULT: &str = DEFAULT_ROUTE;

/// The largest client frame that is processed: API Gateway's frame size,
/// which the local gateway applies too. API Gateway itself passes messages
/// of up to 128 KB, so the edge checks.
pub const MAX_FRAME_BYTES: usize = 32 * 1024;

/// Runs the event as its route's function would: a command route key runs
/// its typed route ([`command_for`]); one that names no command, every
/// command ([`command`]).
pub async fn route(courier: &Courier, event: WsEvent) -> WsResponse {
    let key = event.request_context.route_key.as_deref().unwrap_or_default();
    match key {
        CONNECT => connect(courier, event).await,
        DISCONNECT => disconnect(courier, event).await,
        DEFAULT => default(event),
        _ => match Action::from_name(key) {
            Some(action) => command_on(action, courier, event).await,
            None => command(courier, event).await,
        },
    }
}

/// The route of `action`, as its function runs it.
async fn command_on(action: Action, courier: &Courier, event: WsEvent) -> WsResponse {
    match action {
        Action::CreateChat => command_for::<protocol::CreateChat>(courier, event).await,
        Action::SendMessage => command_for::<protocol::SendMessage>(courier, event).await,
        Action::CreateAttachment => command_for::<protocol::CreateAttachment>(courier, event).await,
        Action::GetAttachment => command_for::<protocol::GetAttachment>(courier, event).await,
        Action::ModifyChatParticipants => {
            command_for::<protocol::ModifyChatParticipants>(courier, event).await
        }
        Action::ListChats => command_for::<protocol::ListChats>(courier, event).await,
        Action::Sync => command_for::<protocol::Sync>(courier, event).await,
        Action::Ack => command_for::<protocol::Ack>(courier, event).await,
        Action::RemoveDevice => command_for::<protocol::RemoveDevice>(courier, event).await,
        Action::UploadKeys => command_for::<protocol::UploadKeys>(courier, event).await,
        Action::GetKeys => command_for::<protocol::GetKeys>(courier, event).await,
        Action::ListDevices => command_for::<protocol::ListDevices>(courier, event).await,
        Action::SendToDevices => command_for::<protocol::SendToDevices>(courier, event).await,
        Action::MarkRead => command_for::<protocol::MarkRead>(courier, event).await,
        Action::GetReceipts => command_for::<protocol::GetReceipts>(courier, event).await,
        Action::Typing => command_for::<protocol::Typing>(courier, event).await,
        Action::DeleteAccount => command_for::<protocol::DeleteAccount>(courier, event).await,
        Action::RegisterPush => command_for::<protocol::RegisterPush>(courier, event).await,
        Action::UnregisterPush => command_for::<protocol::UnregisterPush>(courier, event).await,
    }
}

/// A frame of any command, through the core's dispatch, as the caller the
/// authorizer named, unless [`refused`] first. It links every command; a
/// deployed route's function uses [`command_for`].
pub async fn command(courier: &Courier, event: WsEvent) -> WsResponse {
    let frame = event.body.as_deref().unwrap_or_default();
    match admit(&event, frame) {
        Ok(caller) => answered(dispatch::dispatch(courier, &caller, frame).await),
        Err(refusal) => reply(refusal),
    }
}

/// The route of command `R`: as [`command`] for a frame of `R`'s action,
/// and `$default`'s answer for any other, linking `R`'s code only.
pub async fn command_for<R: Route>(courier: &Courier, event: WsEvent) -> WsResponse {
    let frame = event.body.as_deref().unwrap_or_default();
    match admit(&event, frame) {
        Ok(caller) => answered(dispatch::route::<R>(courier, &caller, frame).await),
        Err(refusal) => reply(refusal),
    }
}

/// The caller of a command frame, or the FAILURE that refuses the frame
/// before any work.
fn admit(event: &WsEvent, frame: &str) -> Result<Caller, String> {
    if let Some(refusal) = refused(event, frame) {
        return Err(refusal);
    }
    caller(event).ok_or_else(|| {
        dispatch::refusal(frame, ErrorCode::Unauthorized, "the connection carries no verified identity")
    })
}

/// The route response of a command's answer: the frame, or a bare 200 when
/// the answer was pushed.
fn answered(answer: Option<String>) -> WsResponse {
    match answer {
        Some(answer) => reply(answer),
        None => status(200),
    }
}

/// `$default`: frames that name no known action (they cost a token too).
pub fn default(event: WsEvent) -> WsResponse {
    let frame = event.body.as_deref().unwrap_or_default();
    reply(refused(&event, frame).unwrap_or_else(|| dispatch::unrouted(frame)))
}

/// The FAILURE for a frame refused before any work, as the local gateway
/// words it: the connection's bucket is empty, or the frame is too large.
fn refused(event: &WsEvent, frame: &str) -> Option<String> {
    let connection = event.request_context.connection_id.as_deref().unwrap_or_default();
    if !take_token(connection) {
        Some(dispatch::refusal(frame, ErrorCode::RateLimited, "rate limit reached: slow down"))
    } else if frame.len() > MAX_FRAME_BYTES {
        let message = format!("a frame is at most {MAX_FRAME_BYTES} bytes");
        Some(dispatch::refusal(frame, ErrorCode::LimitExceeded, &message))
    } else {
        None
    }
}

/// Connections whose buckets one execution environment keeps at most
/// (about 100 bytes each).
const MAX_BUCKETS: usize = 10_000;

/// The protocol's per-connection rate limit, at no database write per
/// frame: a token bucket per connection id in the memory of this execution
/// environment, which lives as long as the environment stays warm.
///
/// Its limits: each environment counts only the frames it sees. Each route
/// is its own function, and a function runs in as many environments as its
/// concurrency needs, so a connection whose frames spread over N
/// environments gets up to N times the rate; a cold start begins with full
/// buckets. API Gateway's stage and route throttling (template.yaml) bound
/// the total. At [`MAX_BUCKETS`] connections the buckets that have refilled
/// are forgotten (a new one is the same), and if too many are still in use,
/// all are: a burst then gets a fresh bucket.
static BUCKETS: LazyLock<Mutex<HashMap<String, TokenBucket>>> = LazyLock::new(Default::default);

/// Takes a token from the connection's bucket, if it has one.
fn take_token(connection: &str) -> bool {
    take_from(&mut BUCKETS.lock().unwrap_or_else(PoisonError::into_inner), connection)
}

fn take_from(buckets: &mut HashMap<String, TokenBucket>, connection: &str) -> bool {
    if let Some(bucket) = buckets.get_mut(connection) {
        return bucket.take();
    }
    if buckets.len() >= MAX_BUCKETS {
        let now = Instant::now();
        buckets.retain(|_, bucket| !bucket.is_full_at(now));
        // Half empty at least, so that the next sweep is many frames away.
        if buckets.len() > MAX_BUCKETS / 2 {
            buckets.clear();
        }
    }
    let mut bucket = TokenBucket::new(RateLimit::default());
    let taken = bucket.take();
    buckets.insert(connection.to_owned(), bucket);
    taken
}

/// Who sent the event, from the authorizer context and the connection id.
fn caller(event: &WsEvent) -> Option<Caller> {
    let ctx = &event.request_context;
    let field = |name: &str| ctx.authorizer.fields.get(name).and_then(Value::as_str).unwrap_or_default();
    Some(Caller {
        user: UserId::try_from(field(AUTHORIZER_USER)).ok()?,
        device: DeviceId::try_from(field(AUTHORIZER_DEVICE)).ok()?,
        connection: ConnectionId::try_from(ctx.connection_id.clone().unwrap_or_default()).ok()?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buckets_stay_bounded_and_forget_full_ones_first() {
        let mut buckets = HashMap::new();
        let drained = |buckets: &mut HashMap<String, TokenBucket>, connection: &str| {
            while take_from(buckets, connection) {}
        };
        // Every bucket is drained (and takes 2.5 s to refill): none can be forgotten for free.
        drained(&mut buckets, "busy");
        for i in 1..MAX_BUCKETS {
            drained(&mut buckets, &format!("c{i}"));
        }
        assert_eq!(buckets.len(), MAX_BUCKETS);
        assert!(take_from(&mut buckets, "new"));
        assert_eq!(buckets.len(), 1, "all were cleared for the newcomer");
        assert!(take_from(&mut buckets, "busy"), "a cleared connection starts over");

        // Full buckets are forgotten before any in use.
        buckets.clear();
        drained(&mut buckets, "busy");
        for i in 1..MAX_BUCKETS {
            buckets.insert(format!("c{i}"), TokenBucket::new(RateLimit::default()));
        }
        assert!(take_from(&mut buckets, "new"));
        assert_eq!(buckets.len(), 2, "the full buckets went");
        assert!(buckets.contains_key("busy"), "the drained one is still counted");
    }
}
