//! The $connect REQUEST authorizer: a valid token allows the connection and
//! passes userId and deviceId on; anything else is API Gateway's 401.

use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use courier_aws::lambda;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    courier_functions::init_tracing();
    let verifier: &'static _ = Box::leak(Box::new(courier_functions::verifier().await?));
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ApiGatewayCustomAuthorizerRequestTypeRequest>| async move {
            lambda::authorizer(verifier, &event.payload).map_err(|e| {
                tracing::info!(reason = %e, "connection refused");
                // API Gateway answers 401 when the authorizer fails with exactly this message.
                Diagnostic { error_type: "Unauthorized".into(), error_message: "Unauthorized".into() }
            })
        },
    ))
    .await
}
