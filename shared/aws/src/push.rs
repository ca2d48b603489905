//! `ApiGatewayPush`: pushes through the API Gateway Management API.
//!
//! A 410 (GoneException) is the connection's own news, not an error: the
//! service unbinds that connection. Throttling and 5xx are retryable.

use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::primitives::Blob;

use courier_core::error::Result;
use courier_core::ids::ConnectionId;
use courier_core::ports::{Posted, Push};

#[derive(Clone)]
pub struct ApiGatewayPush {
    client: aws_sdk_apigatewaymanagement::Client,
}

impl ApiGatewayPush {
    pub fn new(client: aws_sdk_apigatewaymanagement::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl Push for ApiGatewayPush {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> Result<Posted> {
        let sent = self
            .client
            .post_to_connection()
            .connection_id(connection.as_str())
            .data(Blob::new(frame.as_bytes()))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Posted::Sent),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_gone_exception()) => Ok(Posted::Gone),
            Err(e) => Err(super::sdk_error(e)),
        }
    }

    async fn close(&self, connection: &ConnectionId) -> Result<()> {
        match self.client.delete_connection().connection_id(connection.as_str()).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_gone_exception()) => Ok(()),
            Err(e) => Err(super::sdk_error(e)),
        }
    }
}
