//! The push gateway sender against a gateway that keeps the documented contract, started on port 0.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{Platform, PushRegistration, Wakeups, Woken};
use courier_wake::{GatewayOptions, GatewaySender, Wakers, collapse_key};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(2);

type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// Answers by the token's prefix, as a gateway relays what FCM or APNs said.
async fn gateway(State(seen): State<Seen>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let bearer = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
    seen.lock().unwrap().push((bearer, body.clone()));
    let token = body["token"].as_str().unwrap_or_default();
    let prefix = token.split('-').next().unwrap_or_default();
    match prefix {
        "gone" => StatusCode::GONE.into_response(),
        "missing" => StatusCode::NOT_FOUND.into_response(),
        // A gateway that relays the platform's verdict in a 200.
        "unregistered" => Json(json!({"unregistered": true})).into_response(),
        "throttled" => StatusCode::TOO_MANY_REQUESTS.into_response(),
        "fail" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "bad" => (StatusCode::BAD_REQUEST, "token quoted back: bad-1").into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::OK.into_response()
        }
        _ => Json(json!({"unregistered": false})).into_response(),
    }
}

async fn start() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new().route("/wake", axum::routing::post(gateway)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wake", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn sender(url: &str, bearer: Option<&str>) -> GatewaySender {
    GatewaySender::new(url, GatewayOptions { bearer: bearer.map(str::to_owned), timeout: TIMEOUT }).unwrap()
}

#[tokio::test]
async fn a_wake_up_is_the_documented_json_and_nothing_more() {
    let (url, seen) = start().await;
    let sender = sender(&url, Some("s3cret"));
    assert_eq!(sender.send(Platform::ApnsSandbox, "device-token-1").await.unwrap(), Woken::Sent);

    let seen = seen.lock().unwrap();
    let (bearer, body) = &seen[0];
    assert_eq!(bearer.as_deref(), Some("Bearer s3cret"));
    assert_eq!(
        body,
        &json!({
            "platform": "apns-sandbox",
            "token": "device-token-1",
            "priority": "high",
            "collapseKey": collapse_key("device-token-1"),
        })
    );
}

#[tokio::test]
async fn gateway_answers_map_to_gone_and_retryable_errors() {
    let (url, _) = start().await;
    let sender = sender(&url, None);
    for token in ["gone-1", "missing-1", "unregistered-1"] {
        assert_eq!(sender.send(Platform::Fcm, token).await.unwrap(), Woken::Gone, "{token}");
    }
    for token in ["throttled-1", "fail-1"] {
        let e = sender.send(Platform::Fcm, token).await.unwrap_err();
        assert!(e.is_retryable(), "{token}: {e}");
    }
    let e = sender.send(Platform::Fcm, "bad-1").await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(!e.to_string().contains("bad-1"), "the token stays out of errors: {e}");

    let started = Instant::now();
    let e = sender.send(Platform::Apns, "hang-1").await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(3), "gave up after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_gateway_that_is_down_is_a_retryable_failure() {
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e =
        sender(&format!("http://127.0.0.1:{port}/wake"), None).send(Platform::Fcm, "t").await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test]
async fn wakers_route_tokens_to_the_gateway() {
    let (url, seen) = start().await;
    let wakers = Wakers::new(None, Some(sender(&url, None)));
    assert!(
        wakers.serves(Platform::Fcm) && wakers.serves(Platform::Apns) && wakers.serves(Platform::ApnsSandbox)
    );
    assert!(!wakers.serves(Platform::WebPush));

    let registration =
        PushRegistration { platform: Platform::Fcm, address: "token-9".into(), keys: None, endpoint: None };
    let registration = wakers.prepare(registration, None).await.unwrap();
    let (user, device) = (UserId::try_from("bob").unwrap(), DeviceId::try_from("phone").unwrap());
    assert_eq!(wakers.wake(&user, &device, &registration).await.unwrap(), Woken::Sent);
    assert_eq!(seen.lock().unwrap()[0].1["platform"], "fcm");

    let long = PushRegistration { address: "x".repeat(4097), ..registration.clone() };
    assert!(matches!(wakers.prepare(long, None).await, Err(courier_core::Error::BadRequest(_))));
    let empty = PushRegistration { address: String::new(), ..registration };
    assert!(matches!(wakers.prepare(empty, None).await, Err(courier_core::Error::BadRequest(_))));
}
