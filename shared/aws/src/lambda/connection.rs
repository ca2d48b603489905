//! The connection routes: the $connect authorizer, $connect and $disconnect.

use std::collections::HashMap;

use aws_lambda_events::apigw::{
    ApiGatewayCustomAuthorizerPolicy, ApiGatewayCustomAuthorizerRequestTypeRequest,
    ApiGatewayCustomAuthorizerResponse,
};
use aws_lambda_events::iam::{IamPolicyEffect, IamPolicyStatement};
use serde_json::Value;

use courier_core::Courier;
use courier_core::auth::Verifier;
use courier_core::error::{Error, Result};
use courier_core::ids::{ConnectionId, DeviceId, UserId};

use super::{WsEvent, WsResponse, status};

/// The authorizer context keys that carry the caller into every route.
pub const AUTHORIZER_USER: &str = "userId";
pub const AUTHORIZER_DEVICE: &str = "deviceId";

/// The $connect REQUEST authorizer: a valid token allows the connection and
/// names the user; an `Err` is API Gateway's 401.
pub fn authorizer(
    verifier: &Verifier,
    request: &ApiGatewayCustomAuthorizerRequestTypeRequest,
) -> Result<ApiGatewayCustomAuthorizerResponse> {
    let query = &request.query_string_parameters;
    let token = query.first("token").ok_or_else(|| Error::Unauthorized("missing token".into()))?;
    let user = verifier.verify(token)?;
    // The deviceId is checked by $connect, which can answer 400 where an authorizer cannot.
    let device = query.first("deviceId").unwrap_or_default();

    let mut statement = IamPolicyStatement::default();
    statement.action = vec!["execute-api:Invoke".to_owned()];
    statement.effect = IamPolicyEffect::Allow;
    statement.resource = vec![request.method_arn.clone().unwrap_or_else(|| "*".to_owned())];
    let mut policy = ApiGatewayCustomAuthorizerPolicy::default();
    policy.version = Some("2012-10-17".to_owned());
    policy.statement = vec![statement];

    let mut response = ApiGatewayCustomAuthorizerResponse::default();
    response.principal_id = Some(user.to_string());
    response.policy_document = policy;
    response.context = serde_json::json!({ AUTHORIZER_USER: user.as_str(), AUTHORIZER_DEVICE: device });
    Ok(response)
}

/// The authorizer's context as API Gateway hands it to the routes.
pub fn authorizer_context(response: &ApiGatewayCustomAuthorizerResponse) -> HashMap<String, Value> {
    let mut context: HashMap<String, Value> = match &response.context {
        Value::Object(map) => map.clone().into_iter().collect(),
        _ => HashMap::new(),
    };
    if let Some(principal) = &response.principal_id {
        context.insert("principalId".to_owned(), Value::String(principal.clone()));
    }
    context
}

/// $connect: registers the device (400 for a malformed deviceId, 403 past the
/// device limit) and binds the connection to it.
pub async fn connect(courier: &Courier, event: WsEvent) -> WsResponse {
    let ctx = &event.request_context;
    let field = |name: &str| ctx.authorizer.fields.get(name).and_then(Value::as_str).unwrap_or_default();
    let Ok(user) = UserId::try_from(field(AUTHORIZER_USER)) else {
        return status(401);
    };
    let Ok(device) = DeviceId::try_from(field(AUTHORIZER_DEVICE)) else {
        return status(400);
    };
    let Ok(connection) = ConnectionId::try_from(ctx.connection_id.clone().unwrap_or_default()) else {
        return status(400);
    };
    match courier.connect(&user, &device, &connection).await {
        Ok(()) => status(200),
        Err(Error::LimitExceeded(_)) => status(403),
        Err(e) => {
            tracing::error!(error = %e, "connect failed");
            status(if e.is_retryable() { 503 } else { 500 })
        }
    }
}

/// $disconnect: unbinds the connection from its device.
pub async fn disconnect(courier: &Courier, event: WsEvent) -> WsResponse {
    let connection = event.request_context.connection_id.clone().unwrap_or_default();
    if let Ok(connection) = ConnectionId::try_from(connection)
        && let Err(e) = courier.disconnect(&connection).await
    {
        tracing::error!(error = %e, "disconnect failed");
        return status(500);
    }
    status(200)
}
