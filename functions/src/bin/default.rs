//! The `$default` route: frames that name no known action.

use courier_aws::lambda::{self, WsEvent, WsResponse};
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    courier_functions::init_tracing();
    lambda_runtime::run(service_fn(|event: LambdaEvent<WsEvent>| async move {
        Ok::<WsResponse, Error>(lambda::default(event.payload))
    }))
    .await
}
