//! The `@connections` management API of courier-local, in API Gateway's
//! shapes, open only to requests signed with the configured access key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_aws::aws_config::{BehaviorVersion, Region};
use courier_aws::aws_sdk_apigatewaymanagement as management;
use courier_tests::http::{self, Response};
use courier_tests::{QUIET, Server, WAIT, sigv4_headers};
use serde_json::json;

fn connection_url(server: &Server, id: &str) -> String {
    format!("{}/@connections/{id}", server.http)
}

fn key(server: &Server) -> (&str, &str) {
    (&server.config.management_key_id, &server.config.management_secret)
}

/// Sends `sent`, signed (by the test kit's own signer) as if the body were `signed_body`.
async fn send_signed(
    method: &str,
    url: &str,
    signed_body: &[u8],
    sent: &[u8],
    key: (&str, &str),
    at: SystemTime,
) -> Response {
    let headers = sigv4_headers(method, url, signed_body, key, at);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    http::request(method, url, &headers, sent).await.unwrap()
}

/// A request signed now with the server's key.
async fn signed(server: &Server, method: &str, url: &str, body: &[u8]) -> Response {
    send_signed(method, url, body, body, key(server), SystemTime::now()).await
}

/// The AWS SDK's client for the management API, aimed at `server` with `key`.
fn sdk_client(server: &Server, key: (&str, &str)) -> management::Client {
    let config = management::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-3"))
        .endpoint_url(&server.http)
        .credentials_provider(management::config::Credentials::new(key.0, key.1, None, None, "test"))
        .build();
    management::Client::from_conf(config)
}

#[track_caller]
fn assert_forbidden(response: &Response, what: &str) {
    assert_eq!(response.status, 403, "{what}: {}", response.text());
    assert_eq!(response.json(), json!({ "message": "Forbidden" }), "{what}");
}

/// Milliseconds since the epoch of an ISO 8601 UTC time as API Gateway
/// writes them (`2024-02-29T12:34:56.123Z`), checking the format on the way.
fn iso_ms(text: &str) -> i64 {
    let b = text.as_bytes();
    let shape_ok = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape_ok, "not an ISO 8601 UTC time with milliseconds: {text:?}");
    let n = |from: usize, to: usize| text[from..to].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant), inverted independently of the server's code.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000 + n(20, 23)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[track_caller]
fn assert_gone(response: &Response, what: &str) {
    assert_eq!(response.status, 410, "{what}: {}", response.text());
    assert_eq!(response.header("x-amzn-ErrorType"), Some("GoneException"), "{what}: {:?}", response.headers);
    assert!(response.json()["message"].is_string(), "{what}: {}", response.text());
}

#[test]
fn iso_times_are_read_correctly() {
    assert_eq!(iso_ms("1970-01-01T00:00:00.000Z"), 0);
    assert_eq!(iso_ms("2024-02-29T12:34:56.123Z"), 1_709_210_096_123);
}

#[tokio::test]
async fn post_delivers_the_body_as_one_frame_to_that_connection() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let mut alice_laptop = server.connect("alice", "laptop").await;
    let id = server.connection_id("alice", "phone").expect("alice's phone is connected");

    let body = json!({ "type": "custom", "note": "from the management API", "n": [1, 2, 3] });
    let response = signed(&server, "POST", &connection_url(&server, &id), body.to_string().as_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(alice.next_frame(WAIT).await, Some(body), "the body arrives as is");
    assert!(alice_laptop.next_frame(QUIET).await.is_none(), "only on that connection");
    alice.list_chats().await.expect("and the connection goes on");
}

#[tokio::test]
async fn get_describes_the_connection() {
    let server = Server::start().await;
    let before = now_ms();
    let alice = server.connect("alice", "phone").await;
    let after = now_ms();
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());

    let response = signed(&server, "GET", &url, b"").await;
    assert_eq!(response.status, 200, "{}", response.text());
    let info = response.json();
    let connected_at = iso_ms(info["connectedAt"].as_str().expect("connectedAt"));
    assert!((before..=after).contains(&connected_at), "connectedAt {connected_at} not in {before}..={after}");
    let first_active = iso_ms(info["lastActiveAt"].as_str().expect("lastActiveAt"));
    assert!(first_active >= connected_at);
    assert_eq!(info["identity"]["sourceIp"], "127.0.0.1", "{info}");
    assert!(info["identity"]["userAgent"].is_string(), "{info}");

    // A frame makes the connection active again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let spoke = now_ms();
    alice.list_chats().await.unwrap();
    let info = signed(&server, "GET", &url, b"").await.json();
    let last_active = iso_ms(info["lastActiveAt"].as_str().unwrap());
    assert!(last_active >= spoke, "lastActiveAt {last_active} is before the frame at {spoke}");
    assert_eq!(iso_ms(info["connectedAt"].as_str().unwrap()), connected_at, "connectedAt does not move");
}

#[tokio::test]
async fn delete_closes_the_connection_and_then_it_is_gone() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let url = connection_url(&server, &server.connection_id("bob", "phone").unwrap());

    let response = signed(&server, "DELETE", &url, b"").await;
    assert_eq!(response.status, 204, "{}", response.text());
    assert!(response.body.is_empty());
    assert_eq!(bob.closed(WAIT).await, Some(1000), "the client sees its connection closed");

    assert_gone(&signed(&server, "POST", &url, b"{}").await, "POST after DELETE");
    assert_gone(&signed(&server, "GET", &url, b"").await, "GET after DELETE");
    assert_gone(&signed(&server, "DELETE", &url, b"").await, "DELETE after DELETE");

    // The device is offline now: what is sent waits for its next sync.
    let sent = alice.send_message(&chat, "while closed").await.unwrap();
    let bob = server.connect("bob", "phone").await;
    let inbox = bob.sync_all().await.unwrap();
    assert_eq!(inbox.last().map(|m| &m.message_id), Some(&sent.message_id));
}

#[tokio::test]
async fn a_connection_closed_by_its_client_is_gone() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());
    alice.close();
    // The server forgets it once it has read the close.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut response = signed(&server, "GET", &url, b"").await;
    while response.status != 410 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        response = signed(&server, "GET", &url, b"").await;
    }
    assert_gone(&response, "GET after the client closed");
    assert_gone(&signed(&server, "POST", &url, b"{}").await, "POST after the client closed");
}

#[tokio::test]
async fn an_unknown_connection_is_gone() {
    let server = Server::start().await;
    let _alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, "bm90LWEtY29ubg=");
    assert_gone(&signed(&server, "POST", &url, b"{}").await, "POST");
    assert_gone(&signed(&server, "GET", &url, b"").await, "GET");
    assert_gone(&signed(&server, "DELETE", &url, b"").await, "DELETE");
}

#[tokio::test]
async fn the_rust_sdk_signs_as_the_server_expects_and_a_wrong_secret_is_forbidden() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let id = server.connection_id("alice", "phone").unwrap();
    let sdk = sdk_client(&server, key(&server));

    sdk.post_to_connection()
        .connection_id(&id)
        .data(management::primitives::Blob::new(r#"{"type":"fromSdk"}"#))
        .send()
        .await
        .expect("a post signed by the SDK");
    assert_eq!(alice.next_frame(WAIT).await.unwrap()["type"], "fromSdk");
    let info = sdk.get_connection().connection_id(&id).send().await.expect("a get signed by the SDK");
    assert_eq!(info.identity().and_then(|i| i.source_ip()), Some("127.0.0.1"));

    let forger = sdk_client(&server, (key(&server).0, "not the secret"));
    let err = forger
        .post_to_connection()
        .connection_id(&id)
        .data(management::primitives::Blob::new(r#"{"type":"forged"}"#))
        .send()
        .await
        .expect_err("a post signed with the wrong secret");
    assert!(err.into_service_error().is_forbidden_exception(), "403 is the SDK's ForbiddenException");
    let err = forger.delete_connection().connection_id(&id).send().await.expect_err("a forged delete");
    assert!(err.into_service_error().is_forbidden_exception());
    assert!(alice.next_frame(QUIET).await.is_none(), "nothing forged arrives, and the connection stays");

    sdk.delete_connection().connection_id(&id).send().await.expect("a delete signed by the SDK");
    assert_eq!(alice.closed(WAIT).await, Some(1000));
}

#[tokio::test]
async fn unsigned_requests_are_forbidden_and_do_nothing() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());

    assert_forbidden(&http::post(&url, br#"{"type":"forged"}"#).await.unwrap(), "unsigned POST");
    assert_forbidden(&http::get(&url).await.unwrap(), "unsigned GET");
    assert_forbidden(&http::delete(&url).await.unwrap(), "unsigned DELETE");
    // Presigned query-string auth is not taken either.
    let presigned = format!("{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=00");
    assert_forbidden(&http::delete(&presigned).await.unwrap(), "DELETE with a query signature");

    assert!(alice.next_frame(QUIET).await.is_none(), "no frame delivered, no close");
    alice.list_chats().await.expect("the connection is still open");
    assert_eq!(signed(&server, "GET", &url, b"").await.status, 200, "and still there");
}

#[tokio::test]
async fn an_unknown_connection_is_forbidden_too_when_unsigned() {
    let server = Server::start().await;
    let url = connection_url(&server, "bm90LWEtY29ubg=");
    // The same 403 as for a live connection: no way to probe which ids exist.
    assert_forbidden(&http::post(&url, b"{}").await.unwrap(), "POST");
    assert_forbidden(&http::get(&url).await.unwrap(), "GET");
    assert_forbidden(&http::delete(&url).await.unwrap(), "DELETE");
}

#[tokio::test]
async fn a_wrong_secret_or_access_key_is_forbidden() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());
    let body = br#"{"type":"forged"}"#;
    let (id, secret) = key(&server);

    for (key, what) in [((id, "wrong"), "wrong secret"), (("someone", secret), "another key id")] {
        let response = send_signed("POST", &url, body, body, key, SystemTime::now()).await;
        assert_forbidden(&response, what);
        let response = send_signed("DELETE", &url, b"", b"", key, SystemTime::now()).await;
        assert_forbidden(&response, what);
    }
    assert!(alice.next_frame(QUIET).await.is_none(), "nothing delivered, nothing closed");
}

#[tokio::test]
async fn a_signature_over_another_body_is_forbidden() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());

    let tampered = send_signed(
        "POST",
        &url,
        br#"{"type":"hello"}"#,
        br#"{"type":"forged"}"#,
        key(&server),
        SystemTime::now(),
    )
    .await;
    assert_forbidden(&tampered, "a body other than the signed one");
    assert!(alice.next_frame(QUIET).await.is_none(), "the tampered body is not delivered");
}

#[tokio::test]
async fn a_date_more_than_15_minutes_off_is_forbidden() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, &server.connection_id("alice", "phone").unwrap());
    let minutes = |m: u64| Duration::from_secs(m * 60);
    let now = SystemTime::now();

    for (at, what) in [(now - minutes(16), "16 minutes old"), (now + minutes(16), "16 minutes ahead")] {
        let response = send_signed("POST", &url, b"{}", b"{}", key(&server), at).await;
        assert_forbidden(&response, what);
    }
    assert!(alice.next_frame(QUIET).await.is_none(), "nothing delivered");

    // Inside the window it is accepted: the clock alone refused those.
    let response =
        send_signed("POST", &url, br#"{"n":14}"#, br#"{"n":14}"#, key(&server), now - minutes(14)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(alice.next_frame(WAIT).await, Some(json!({ "n": 14 })));
}

#[tokio::test]
async fn the_access_key_is_the_configured_one() {
    let server = Server::start_with(|config| {
        config.management_key_id = "ops".into();
        config.management_secret = "an ops secret".into();
    })
    .await;
    let mut alice = server.connect("alice", "phone").await;
    let id = server.connection_id("alice", "phone").unwrap();
    let post = |key| {
        sdk_client(&server, key)
            .post_to_connection()
            .connection_id(&id)
            .data(management::primitives::Blob::new("{}"))
            .send()
    };

    let err = post(("test", "test")).await.expect_err("the default key is not this server's");
    assert!(err.into_service_error().is_forbidden_exception());
    assert!(alice.next_frame(QUIET).await.is_none());
    post(("ops", "an ops secret")).await.expect("signed with the configured key");
    assert_eq!(alice.next_frame(WAIT).await, Some(json!({})));
}

/// The Python used for boto3: COURIER_VENV's (what scripts/test installs), else python3 on PATH.
fn python() -> std::path::PathBuf {
    std::env::var_os("COURIER_VENV")
        .map(|venv| std::path::PathBuf::from(venv).join("bin").join("python"))
        .filter(|python| python.exists())
        .unwrap_or_else(|| "python3".into())
}

const BOTO3: &str = r#"
import sys, boto3, botocore.exceptions
endpoint, connection, key_id, secret = sys.argv[1:]
def client(secret):
    return boto3.client("apigatewaymanagementapi", endpoint_url=endpoint, region_name="ap-south-1",
                        aws_access_key_id=key_id, aws_secret_access_key=secret)
client(secret).post_to_connection(ConnectionId=connection, Data=b'{"type":"fromBoto3"}')
print(client(secret).get_connection(ConnectionId=connection)["Identity"]["SourceIp"])
try:
    client("wrong").post_to_connection(ConnectionId=connection, Data=b'{"type":"forged"}')
    print("forged post accepted")
except botocore.exceptions.ClientError as e:
    print(e.response["Error"]["Code"])
"#;

#[tokio::test]
async fn boto3_signs_as_the_server_expects() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let id = server.connection_id("alice", "phone").unwrap();
    assert!(id.ends_with('='), "an id that the path must encode: {id}");
    let (key_id, secret) = key(&server);

    let output = tokio::process::Command::new(python())
        .args(["-c", BOTO3, &server.http, &id, key_id, secret])
        .output()
        .await
        .expect("run python (scripts/test installs boto3 in COURIER_VENV)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout, "127.0.0.1\nForbiddenException\n");
    assert_eq!(alice.next_frame(WAIT).await.unwrap()["type"], "fromBoto3");
    assert!(alice.next_frame(QUIET).await.is_none(), "the forged post was not delivered");
}
