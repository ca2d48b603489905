//! The `@connections` management API of courier-local, in API Gateway's shapes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_tests::http::{self, Response};
use courier_tests::{QUIET, Server, WAIT};
use serde_json::json;

fn connection_url(server: &Server, id: &str) -> String {
    format!("{}/@connections/{id}", server.http)
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
    let response = http::post(&connection_url(&server, &id), body.to_string().as_bytes()).await.unwrap();
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

    let response = http::get(&url).await.unwrap();
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
    let info = http::get(&url).await.unwrap().json();
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

    let response = http::delete(&url).await.unwrap();
    assert_eq!(response.status, 204, "{}", response.text());
    assert!(response.body.is_empty());
    assert_eq!(bob.closed(WAIT).await, Some(1000), "the client sees its connection closed");

    assert_gone(&http::post(&url, b"{}").await.unwrap(), "POST after DELETE");
    assert_gone(&http::get(&url).await.unwrap(), "GET after DELETE");
    assert_gone(&http::delete(&url).await.unwrap(), "DELETE after DELETE");

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
    let mut response = http::get(&url).await.unwrap();
    while response.status != 410 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        response = http::get(&url).await.unwrap();
    }
    assert_gone(&response, "GET after the client closed");
    assert_gone(&http::post(&url, b"{}").await.unwrap(), "POST after the client closed");
}

#[tokio::test]
async fn an_unknown_connection_is_gone() {
    let server = Server::start().await;
    let _alice = server.connect("alice", "phone").await;
    let url = connection_url(&server, "bm90LWEtY29ubg=");
    assert_gone(&http::post(&url, b"{}").await.unwrap(), "POST");
    assert_gone(&http::get(&url).await.unwrap(), "GET");
    assert_gone(&http::delete(&url).await.unwrap(), "DELETE");
}
