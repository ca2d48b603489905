//! The wake-up queue consumer: content-free wake-ups through SNS and Web Push, and SNS endpoint releases.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use courier_aws::lambda;
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    courier_functions::init_tracing();
    let courier = courier_functions::courier_with_wakeups().await?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(lambda::wake(courier, event.payload).await)
    }))
    .await
}
