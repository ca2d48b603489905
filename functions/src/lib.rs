//! What every Courier Lambda shares: logging, and the service context built
//! once at cold start from the environment `template.yaml` sets.

use std::sync::Arc;
use std::time::Duration;

use courier_aws::Aws;
use courier_core::auth::Verifier;
use courier_core::ports::SystemClock;
use courier_core::{Courier, Error, Ports};

/// JSON logs for CloudWatch, filtered by `RUST_LOG` (default `info`): a level,
/// or `target=level` pairs such as `courier_core=debug,info`. A `Targets`
/// filter rather than `EnvFilter`, whose span and field filters would link a
/// regex engine into every bootstrap.
pub fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let spec = std::env::var("RUST_LOG").ok();
    let (filter, bad) = match spec.as_deref().map(str::parse::<Targets>) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (Targets::new().with_default(tracing::Level::INFO), Some(e)),
        None => (Targets::new().with_default(tracing::Level::INFO), None),
    };
    // No timestamps: CloudWatch stamps each line.
    let format = tracing_subscriber::fmt::layer().json().with_current_span(false).without_time();
    tracing_subscriber::registry().with(format).with(filter).init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, rust_log = spec, "RUST_LOG is not a level or target=level list; logging at info");
    }
}

/// The service over the AWS adapters, alive for the whole execution
/// environment, with the ports every command calls: the tables, the job
/// queues and pushes to connections. S3 and the push services are left
/// out ([`courier_core::ports::Unwired`]): the functions that call them
/// take [`courier_with_blobs`] or [`courier_with_wakeups`]. An adapter is a
/// trait object that links every method of its SDK client, so wiring only
/// what a function calls keeps its bootstrap under the 8 MB budget.
pub async fn courier() -> Result<&'static Courier, Error> {
    wired(|_, ports| ports).await
}

/// [`courier`] with the media bucket: the functions that presign, check
/// or delete uploads (createAttachment, getAttachment, sendMessage with
/// attachments, deleteAccount).
pub async fn courier_with_blobs() -> Result<&'static Courier, Error> {
    wired(|aws, ports| Ports { blobs: aws.blobs(), ..ports }).await
}

/// [`courier`] with the scans that expire messages: the clean-up's alone.
pub async fn courier_for_cleanup() -> Result<&'static Courier, Error> {
    wired(|aws, ports| Ports { retention: aws.tables(), ..ports }).await
}

/// [`courier`] with SNS and Web Push: `wake`, which sends wake-ups and
/// releases SNS endpoints, and registerPush, which makes them.
pub async fn courier_with_wakeups() -> Result<&'static Courier, Error> {
    wired(|aws, ports| Ports { wakeups: aws.wakeups(), ..ports }).await
}

async fn wired(wire: impl FnOnce(&Aws, Ports) -> Ports) -> Result<&'static Courier, Error> {
    let aws = Aws::from_env().await?;
    let ports = wire(&aws, aws.tables_ports(Arc::new(SystemClock)));
    Ok(Box::leak(Box::new(Courier::new(ports, Default::default()))))
}

/// The token verifier of the authorizer: RS256/ES256 keys from the JWKS at
/// `COURIER_JWKS_URL` (a Cognito user pool's, say), fetched once at cold
/// start, or else an HS256 secret from `COURIER_JWT_SECRET`; with
/// `COURIER_JWT_ISSUER` and `COURIER_JWT_AUDIENCE` checked when set.
pub async fn verifier() -> Result<Verifier, Error> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut verifier = match (env("COURIER_JWKS_URL"), env("COURIER_JWT_SECRET")) {
        (Some(url), _) => {
            let fetch = async { reqwest::get(&url).await?.error_for_status()?.text().await };
            let jwks = fetch.await.map_err(|e| Error::internal(format!("fetching the JWKS failed: {e}")))?;
            Verifier::from_jwks(&jwks)?
        }
        (None, Some(secret)) => Verifier::hs256(secret.as_bytes())?,
        (None, None) => {
            return Err(Error::internal("set COURIER_JWKS_URL or COURIER_JWT_SECRET for the authorizer"));
        }
    };
    if let Some(iss) = env("COURIER_JWT_ISSUER") {
        verifier = verifier.with_issuer(&iss);
    }
    if let Some(aud) = env("COURIER_JWT_AUDIENCE") {
        verifier = verifier.with_audience(&aud);
    }
    Ok(verifier)
}

/// How long `fanout` waits before checking a message the send path has not
/// marked: longer than sendMessage's timeout (`COURIER_FANOUT_CHECK_SECONDS`).
pub fn fanout_check_delay() -> Duration {
    let secs = std::env::var("COURIER_FANOUT_CHECK_SECONDS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(60))
}

/// An error as the Lambda runtime reports it: `Retryable` when trying the
/// same event again may succeed, `NonRetryable` otherwise.
pub fn diagnostic(e: Error) -> lambda_runtime::Diagnostic {
    let kind = if e.is_retryable() { "Retryable" } else { "NonRetryable" };
    lambda_runtime::Diagnostic { error_type: kind.to_owned(), error_message: e.to_string() }
}
