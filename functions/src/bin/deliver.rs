//! The job queue consumer: pushes and delayed fan-out checks, with partial batch failures.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use courier_aws::lambda;
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    courier_functions::init_tracing();
    let courier = courier_functions::courier().await?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, Error>(lambda::deliver(courier, event.payload).await)
    }))
    .await
}
