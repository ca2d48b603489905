//! The deployed push adapter, `ApiGatewayPush`, with the real
//! aws-sdk-apigatewaymanagement client: against courier-local's
//! `@connections` endpoint (moto's never answers 410), and against an
//! endpoint that fails, for the retryable answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use courier_aws::aws_config::{BehaviorVersion, Region};
use courier_aws::{ApiGatewayPush, aws_sdk_apigatewaymanagement as management};
use courier_core::ids::ConnectionId;
use courier_core::ports::{Posted, Push};
use courier_tests::{Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn push_to(endpoint: &str) -> ApiGatewayPush {
    let config = management::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        // courier-local's default management key.
        .credentials_provider(management::config::Credentials::new("test", "test", None, None, "test"))
        .build();
    ApiGatewayPush::new(management::Client::from_conf(config))
}

#[tokio::test]
async fn posts_reach_the_client_and_a_closed_connection_is_gone() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let id = ConnectionId::try_from(server.connection_id("alice", "phone").unwrap()).unwrap();
    let push = push_to(&server.http);

    assert_eq!(push.post(&id, r#"{"type":"ping"}"#).await.unwrap(), Posted::Sent);
    assert_eq!(alice.next_frame(WAIT).await.unwrap()["type"], "ping");

    push.close(&id).await.unwrap();
    assert_eq!(alice.closed(WAIT).await, Some(1000));
    assert_eq!(push.post(&id, "{}").await.unwrap(), Posted::Gone, "410 is Gone, not an error");
    push.close(&id).await.expect("closing a gone connection is no error");
    let unknown = ConnectionId::try_from("AAAAAAAAAAAAAAA=").unwrap();
    assert_eq!(push.post(&unknown, "{}").await.unwrap(), Posted::Gone);
}

/// Answers every request with `status` and API Gateway's error header; counts requests.
async fn failing_endpoint(status: u16, error_type: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut buf).await;
            let body = format!(r#"{{"message":"{error_type}"}}"#);
            let response = format!(
                "HTTP/1.1 {status} Error\r\nx-amzn-ErrorType: {error_type}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (url, requests)
}

#[tokio::test]
async fn server_errors_and_throttling_are_retryable() {
    let id = ConnectionId::try_from("AAAAAAAAAAAAAAA=").unwrap();
    for (status, kind) in [(500, "InternalServerErrorException"), (429, "LimitExceededException")] {
        let (url, requests) = failing_endpoint(status, kind).await;
        let err = push_to(&url).post(&id, "{}").await.unwrap_err();
        assert!(err.is_retryable(), "{status} must be worth a retry, got {err}");
        assert!(requests.load(Ordering::SeqCst) >= 1);
    }
    let (url, _) = failing_endpoint(403, "ForbiddenException").await;
    let err = push_to(&url).post(&id, "{}").await.unwrap_err();
    assert!(!err.is_retryable(), "a 403 is a configuration error: {err}");
}
