//! The scheduled clean-up: devices unseen for 30 days, and what TTL leaves behind.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use courier_aws::lambda;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    courier_functions::init_tracing();
    let courier = courier_functions::courier_for_cleanup().await?;
    lambda_runtime::run(service_fn(move |_: LambdaEvent<EventBridgeEvent>| async move {
        lambda::cleanup(courier).await.map_err(courier_functions::diagnostic)
    }))
    .await
}
