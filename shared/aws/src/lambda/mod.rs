//! The Lambda event edge: API Gateway, DynamoDB Streams, SQS and schedule
//! events in, the core's typed path through, the responses Lambda returns out.
//!
//! A command route's function reads the caller from the authorizer context
//! and hands the frame to [`courier_core::dispatch::dispatch`], as the
//! local gateway does; every `events/` file runs through here in the tests.

mod connection;
mod events;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use courier_core::Courier;
use courier_core::dispatch::{self, DEFAULT_ROUTE};
use courier_core::domain::Caller;
use courier_core::ids::{ConnectionId, DeviceId, UserId};
use courier_core::protocol::ErrorCode;
use serde_json::Value;

pub use connection::{
    AUTHORIZER_DEVICE, AUTHORIZER_USER, authorizer, authorizer_context, connect, disconnect,
};
pub use events::{cleanup, deliver, fanout};

pub type WsEvent = ApiGatewayWebsocketProxyRequest;
pub type WsResponse = ApiGatewayProxyResponse;

/// The route keys besides the actions.
pub const CONNECT: &str = "$connect";
pub const DISCONNECT: &str = "$disconnect";
pub const DEFAULT: &str = DEFAULT_ROUTE;

/// Runs the event as its route's function would.
pub async fn route(courier: &Courier, event: WsEvent) -> WsResponse {
    match event.request_context.route_key.as_deref().unwrap_or_default() {
        CONNECT => connect(courier, event).await,
        DISCONNECT => disconnect(courier, event).await,
        DEFAULT => default(event),
        _ => command(courier, event).await,
    }
}

/// A command route: the frame through the core's dispatch, as the caller
/// the authorizer named.
pub async fn command(courier: &Courier, event: WsEvent) -> WsResponse {
    let frame = event.body.as_deref().unwrap_or_default();
    match caller(&event) {
        Some(caller) => match dispatch::dispatch(courier, &caller, frame).await {
            Some(answer) => reply(answer),
            None => status(200),
        },
        None => reply(dispatch::refusal(
            frame,
            ErrorCode::Unauthorized,
            "the connection carries no verified identity",
        )),
    }
}

/// `$default`: frames that name no known action.
pub fn default(event: WsEvent) -> WsResponse {
    reply(dispatch::unrouted(event.body.as_deref().unwrap_or_default()))
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
