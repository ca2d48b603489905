//! The Messages stream consumer: the fan-out safety net.

use aws_lambda_events::dynamodb::Event;
use aws_lambda_events::streams::DynamoDbEventResponse;
use courier_aws::lambda;
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    courier_functions::init_tracing();
    let courier = courier_functions::courier().await?;
    let delay = courier_functions::fanout_check_delay();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        Ok::<DynamoDbEventResponse, Error>(lambda::fanout(courier, event.payload, delay).await)
    }))
    .await
}
