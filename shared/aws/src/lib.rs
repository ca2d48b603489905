//! Adapters for the deployed shape: DynamoDB tables, SQS jobs, S3 blobs,
//! API Gateway Management pushes and wake-ups through SNS and Web Push,
//! behind the same ports as the embedded ones.
//!
//! Every Lambda builds one [`Aws`] at cold start from its environment (the
//! names `template.yaml` sets) and hands the service the ports its command
//! calls: [`Aws::tables_ports`] plus the S3, SNS or Web Push adapters where
//! it uses them ([`Aws::blobs`], [`Aws::wakeups`]). Each adapter is a trait
//! object that links all its methods, so a function linking only what it
//! calls is what keeps bootstraps small.

mod dynamo;
pub mod lambda;
mod push;
mod s3;
pub mod schema;
mod sqs;
mod wake;

use std::sync::Arc;

pub use aws_sdk_dynamodb::config::SharedInterceptor;

pub use dynamo::{DynamoTables, LATE_ROW_MS};
pub use push::ApiGatewayPush;
pub use s3::S3Blobs;
pub use sqs::{SqsJobs, done_receipts, lambda_event};
pub use wake::{
    APNS_APPLICATION_ENV, APNS_SANDBOX_APPLICATION_ENV, APNS_WAKE_LOC_KEY, FCM_APPLICATION_ENV,
    PUSH_SUBJECT_ENV, SnsWakeups, VAPID_PARAMETER_ENV, WakeSettings,
};
/// The SDK crates, for callers that create resources or build clients.
pub use {
    aws_config, aws_sdk_apigatewaymanagement, aws_sdk_dynamodb, aws_sdk_s3, aws_sdk_sns, aws_sdk_sqs,
    aws_sdk_ssm,
};

use courier_core::error::{Error, Result};
use courier_core::ports::{Clock, SystemClock, Unwired};
use courier_core::service::Ports;

/// The names of the deployed resources, as `template.yaml` passes them in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub chats_table: String,
    pub participants_table: String,
    pub devices_table: String,
    pub connections_table: String,
    pub messages_table: String,
    pub inbox_table: String,
    pub attachments_table: String,
    pub keys_table: String,
    pub receipts_table: String,
    pub jobs_queue_url: String,
    /// Wake-ups and push releases: their own queue, so a slow push service
    /// holds up no delivery.
    pub wakes_queue_url: String,
    pub media_bucket: String,
    /// The Management API endpoint, `https://{api}.execute-api.{region}.amazonaws.com/{stage}`.
    pub connections_endpoint: String,
}

/// Every environment variable [`Aws::from_env`] reads: [`Names::from_env`]'s
/// thirteen, then [`WakeSettings::from_env`]'s five. The template test checks
/// the template sets each.
pub const ENV_VARS: [&str; 18] = [
    "COURIER_CHATS_TABLE",
    "COURIER_PARTICIPANTS_TABLE",
    "COURIER_DEVICES_TABLE",
    "COURIER_CONNECTIONS_TABLE",
    "COURIER_MESSAGES_TABLE",
    "COURIER_INBOX_TABLE",
    "COURIER_ATTACHMENTS_TABLE",
    "COURIER_KEYS_TABLE",
    "COURIER_RECEIPTS_TABLE",
    "COURIER_JOBS_QUEUE_URL",
    "COURIER_WAKES_QUEUE_URL",
    "COURIER_MEDIA_BUCKET",
    "COURIER_CONNECTIONS_ENDPOINT",
    FCM_APPLICATION_ENV,
    APNS_APPLICATION_ENV,
    APNS_SANDBOX_APPLICATION_ENV,
    VAPID_PARAMETER_ENV,
    PUSH_SUBJECT_ENV,
];

impl Names {
    /// Reads the names from the environment; a missing one fails by name.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| Error::internal(format!("environment variable {name} is not set")))
        };
        Ok(Self {
            chats_table: var(ENV_VARS[0])?,
            participants_table: var(ENV_VARS[1])?,
            devices_table: var(ENV_VARS[2])?,
            connections_table: var(ENV_VARS[3])?,
            messages_table: var(ENV_VARS[4])?,
            inbox_table: var(ENV_VARS[5])?,
            attachments_table: var(ENV_VARS[6])?,
            keys_table: var(ENV_VARS[7])?,
            receipts_table: var(ENV_VARS[8])?,
            jobs_queue_url: var(ENV_VARS[9])?,
            wakes_queue_url: var(ENV_VARS[10])?,
            media_bucket: var(ENV_VARS[11])?,
            connections_endpoint: var(ENV_VARS[12])?,
        })
    }

    /// Names with a common prefix, for tests and the local AWS topology.
    /// Wake-ups share the jobs queue unless [`Names::wakes_queue_url`] is set after.
    pub fn prefixed(prefix: &str, jobs_queue_url: &str, connections_endpoint: &str) -> Self {
        Self {
            chats_table: format!("{prefix}-chats"),
            participants_table: format!("{prefix}-participants"),
            devices_table: format!("{prefix}-devices"),
            connections_table: format!("{prefix}-connections"),
            messages_table: format!("{prefix}-messages"),
            inbox_table: format!("{prefix}-inbox"),
            attachments_table: format!("{prefix}-attachments"),
            keys_table: format!("{prefix}-keys"),
            receipts_table: format!("{prefix}-receipts"),
            jobs_queue_url: jobs_queue_url.to_owned(),
            wakes_queue_url: jobs_queue_url.to_owned(),
            media_bucket: format!("{prefix}-media"),
            connections_endpoint: connections_endpoint.to_owned(),
        }
    }
}

/// Sees every request the clients send: an SDK interceptor for one set of resources.
pub trait Watcher: Send + Sync + std::fmt::Debug {
    fn interceptor(&self, names: &Names) -> SharedInterceptor;
}

/// The SDK clients, built once and shared by every request.
#[derive(Clone)]
pub struct Aws {
    pub names: Names,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub management: aws_sdk_apigatewaymanagement::Client,
    /// Which push platforms [`Aws::wakeups`] wakes devices through: all off
    /// but from [`Aws::from_env`].
    pub wake: WakeSettings,
    /// What the S3, SNS and SSM clients are built from, when a function
    /// asks for their adapter: only the functions that use them link them.
    config: aws_config::SdkConfig,
    interceptor: Option<SharedInterceptor>,
}

impl Aws {
    /// Builds the clients from an SDK config (which honours `AWS_ENDPOINT_URL`).
    pub fn new(config: &aws_config::SdkConfig, names: Names) -> Self {
        Self::build(config, names, None)
    }

    /// [`Aws::new`], with `watcher` seeing every request of every client
    /// (the test kit's request meter, or an operator's per-invocation usage).
    pub fn watched(config: &aws_config::SdkConfig, names: Names, watcher: &dyn Watcher) -> Self {
        let interceptor = watcher.interceptor(&names);
        Self::build(config, names, Some(interceptor))
    }

    fn build(config: &aws_config::SdkConfig, names: Names, interceptor: Option<SharedInterceptor>) -> Self {
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(config);
        let mut sqs = aws_sdk_sqs::config::Builder::from(config);
        let mut management = aws_sdk_apigatewaymanagement::config::Builder::from(config)
            .endpoint_url(&names.connections_endpoint);
        if let Some(interceptor) = &interceptor {
            dynamodb.push_interceptor(interceptor.clone());
            sqs.push_interceptor(interceptor.clone());
            management.push_interceptor(interceptor.clone());
        }
        Self {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
            management: aws_sdk_apigatewaymanagement::Client::from_conf(management.build()),
            names,
            wake: WakeSettings::default(),
            config: config.clone(),
            interceptor,
        }
    }

    /// Loads the SDK config, the names and the wake-up settings from the environment.
    pub async fn from_env() -> Result<Self> {
        let names = Names::from_env()?;
        let wake = WakeSettings::from_env()?;
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Ok(Self { wake, ..Self::new(&config, names) })
    }

    /// An S3 client of this config, watched as the others are.
    pub fn s3(&self) -> aws_sdk_s3::Client {
        // Path-style URLs, so presigned URLs work against emulators and dotted bucket names.
        let mut s3 = aws_sdk_s3::config::Builder::from(&self.config).force_path_style(true);
        if let Some(interceptor) = &self.interceptor {
            s3.push_interceptor(interceptor.clone());
        }
        aws_sdk_s3::Client::from_conf(s3.build())
    }

    /// The DynamoDB tables, behind every table port.
    pub fn tables(&self) -> Arc<DynamoTables> {
        Arc::new(DynamoTables::new(self.dynamodb.clone(), self.names.clone()))
    }

    /// The media bucket.
    pub fn blobs(&self) -> Arc<S3Blobs> {
        Arc::new(S3Blobs::new(self.s3(), self.names.media_bucket.clone()))
    }

    /// Wake-ups through SNS and Web Push, over clients of this config
    /// (watched as the others are).
    pub fn wakeups(&self) -> Arc<SnsWakeups> {
        Arc::new(SnsWakeups::new(&self.config, self.interceptor.clone(), self.wake.clone()))
    }

    /// What every command calls: the tables, the queues and pushes to
    /// connections. Blobs and wake-ups are [`Unwired`]: a function whose
    /// command uses them sets them.
    pub fn tables_ports(&self, clock: Arc<dyn Clock>) -> Ports {
        let tables = self.tables();
        let names = &self.names;
        Ports {
            chats: tables.clone(),
            devices: tables.clone(),
            messages: tables.clone(),
            // The clean-up's alone: see `with_retention`.
            retention: Arc::new(Unwired),
            attachments: tables.clone(),
            quotas: tables.clone(),
            keys: tables.clone(),
            receipts: tables,
            wakeups: Arc::new(Unwired),
            blobs: Arc::new(Unwired),
            push: Arc::new(ApiGatewayPush::new(self.management.clone())),
            jobs: Arc::new(SqsJobs::new(
                self.sqs.clone(),
                names.jobs_queue_url.clone(),
                names.wakes_queue_url.clone(),
                clock.clone(),
            )),
            clock,
        }
    }

    /// Every adapter of the deployed shape: for one process serving every
    /// command (courier-local's `--backend aws`, the tests).
    pub fn ports(&self) -> Ports {
        self.ports_with_clock(Arc::new(SystemClock))
    }

    pub fn ports_with_clock(&self, clock: Arc<dyn Clock>) -> Ports {
        Ports {
            blobs: self.blobs(),
            wakeups: self.wakeups(),
            retention: self.tables(),
            ..self.tables_ports(clock)
        }
    }
}

/// Maps an SDK error: throttling, timeouts and 5xx are worth a retry, the rest is a bug.
pub(crate) fn sdk_error<E>(e: SdkError<E>) -> Error
where
    E: std::error::Error + Send + Sync + aws_sdk_dynamodb::error::ProvideErrorMetadata + 'static,
{
    let retryable = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or_default();
            status >= 500
                || status == 429
                || code.contains("Throttl")
                || code.contains("ProvisionedThroughputExceeded")
                || code == "RequestLimitExceeded"
                || code == "TransactionConflict"
        }
        _ => false,
    };
    let e = SdkFailure(e);
    if retryable { Error::unavailable(e) } else { Error::internal(e) }
}

/// Any SDK client's error, from any operation.
type SdkError<E> = aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>;

/// An SDK error kept whole, so the source chain reaches the service's own
/// error. It displays with its context, because the SDK's own display is
/// only "service error" and most logs show just the display.
#[derive(Debug)]
pub(crate) struct SdkFailure<E>(pub(crate) SdkError<E>);

impl<E: std::error::Error + 'static> std::fmt::Display for SdkFailure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        aws_sdk_dynamodb::error::DisplayErrorContext(&self.0).fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for SdkFailure<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use aws_sdk_dynamodb::operation::get_item::GetItemError;

    use super::*;

    /// The first error of type `T` in `e`'s source chain, `e` included.
    fn in_chain<'a, T: std::error::Error + 'static>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> Option<&'a T> {
        std::iter::successors(Some(e), |&e| e.source()).find_map(|e| e.downcast_ref::<T>())
    }

    #[test]
    fn mapped_sdk_errors_keep_their_source() {
        let e = sdk_error(SdkError::<GetItemError>::timeout_error(std::io::Error::other("read timed out")));
        assert!(e.is_retryable());
        assert!(e.source().is_some_and(|s| s.is::<SdkFailure<GetItemError>>()), "{e:?}");
        let sdk = in_chain::<SdkError<GetItemError>>(&e).expect("the SDK's error is in the chain");
        assert!(matches!(sdk, SdkError::TimeoutError(_)), "{sdk:?}");
        let original = in_chain::<std::io::Error>(&e).expect("the chain reaches the original error");
        assert_eq!(original.to_string(), "read timed out");
        // The SDK's own display is just "timeout"; the log line gets the cause.
        assert!(e.to_string().contains("read timed out"), "{e}");

        let e = sdk_error(SdkError::<GetItemError>::construction_failure("no region"));
        assert!(!e.is_retryable());
        assert!(in_chain::<SdkError<GetItemError>>(&e).is_some(), "{e:?}");
    }
}
