//! The `registerPush` route of the WebSocket API.

use courier_aws::lambda::{self, WsEvent, WsResponse};
use courier_core::protocol::RegisterPush;
use lambda_runtime::{Error, LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    courier_functions::init_tracing();
    let courier = courier_functions::courier_with_wakeups().await?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<WsEvent>| async move {
        Ok::<WsResponse, Error>(lambda::command_for::<RegisterPush>(courier, event.payload).await)
    }))
    .await
}
