//! The `@connections` management API on the gateway's port, in API Gateway's
//! shapes, so the AWS SDKs' ApiGatewayManagementApi clients work against it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use courier_core::ids::ConnectionId;

use crate::gateway::{Connections, Outbound};
use crate::sigv4::Verifier;

/// API Gateway's limit on a management request's payload; held to it before
/// the signature is checked, so an unsigned request cannot make the server
/// buffer more.
const MAX_BODY: usize = 128 * 1024;

/// What the signature check needs: the key, and how long the body may take.
pub struct Gate {
    pub verifier: Verifier,
    /// The whole body must have arrived this long after the handler starts
    /// reading it (the header timeout): the signature covers the body, so it
    /// is read before anyone is known, and an unsigned client trickling it
    /// byte by byte must not hold its socket past this.
    pub body_deadline: Duration,
}

/// Lets through only requests signed with the configured key. It runs before
/// the handlers look anything up, so a refused request changes nothing and
/// learns nothing, not even whether the connection exists.
pub async fn require_signature(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(gate.body_deadline, axum::body::to_bytes(body, MAX_BODY));
    let Ok(body) = read.await else {
        return (
            StatusCode::REQUEST_TIMEOUT,
            [("content-type", "application/json"), ("connection", "close")],
            r#"{"message":"Request Timeout"}"#,
        )
            .into_response();
    };
    let Ok(body) = body else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [("x-amzn-ErrorType", "PayloadTooLargeException"), ("content-type", "application/json")],
            r#"{"message":"Request Too Long"}"#,
        )
            .into_response();
    };
    if let Err(refused) =
        gate.verifier.verify(&parts.method, &parts.uri, &parts.headers, &body, SystemTime::now())
    {
        tracing::warn!(reason = refused.0, method = %parts.method, "management API request refused");
        return (
            StatusCode::FORBIDDEN,
            [("x-amzn-ErrorType", "ForbiddenException"), ("content-type", "application/json")],
            r#"{"message":"Forbidden"}"#,
        )
            .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// API Gateway's answer for an unknown or closed connection.
fn gone() -> Response {
    (
        StatusCode::GONE,
        [("x-amzn-ErrorType", "GoneException"), ("content-type", "application/json")],
        r#"{"message":"the connection is gone"}"#,
    )
        .into_response()
}

fn parse(id: String) -> Option<ConnectionId> {
    ConnectionId::try_from(id).ok()
}

/// `POST /@connections/{id}`: pushes the body to the client as one frame.
pub async fn post_to_connection(
    State(connections): State<Arc<Connections>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = parse(id) else { return gone() };
    let frame = match String::from_utf8(body.to_vec()) {
        Ok(text) => Outbound::Text(text),
        Err(e) => Outbound::Binary(e.into_bytes()),
    };
    if connections.send(&id, frame) { StatusCode::OK.into_response() } else { gone() }
}

/// `GET /@connections/{id}`: when it connected, when it last spoke, and from where.
pub async fn get_connection(State(connections): State<Arc<Connections>>, Path(id): Path<String>) -> Response {
    let Some(connection) = parse(id).and_then(|id| connections.get(&id)) else {
        return gone();
    };
    let body = serde_json::json!({
        "connectedAt": iso8601(connection.connected_at),
        "lastActiveAt": iso8601(connection.last_active_at.load(Ordering::Relaxed)),
        "identity": { "sourceIp": connection.source_ip, "userAgent": connection.user_agent },
    });
    axum::Json(body).into_response()
}

/// `DELETE /@connections/{id}`: closes the connection.
pub async fn delete_connection(
    State(connections): State<Arc<Connections>>,
    Path(id): Path<String>,
) -> Response {
    match parse(id) {
        Some(id) if connections.close(&id, 1000, "closed through the management API") => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => gone(),
    }
}

/// Milliseconds since the epoch as an ISO 8601 UTC timestamp, as API Gateway writes them.
pub fn iso8601(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::iso8601(1_709_210_096_123), "2024-02-29T12:34:56.123Z");
        assert_eq!(super::iso8601(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }
}
