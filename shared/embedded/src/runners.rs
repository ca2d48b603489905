//! The background work of the local shape: the job queue's consumer, the
//! change feed that backs up fan-out, and the periodic clean-up.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::SqliteStore;
use courier_core::ports::Clock;
use courier_core::service::Courier;

/// Tries before a job is set aside as dead (SQS's maxReceiveCount).
const MAX_ATTEMPTS: u32 = 5;

/// Runs queued jobs as they come due, retrying with backoff; the `deliver`
/// Lambda does this on SQS when deployed.
pub fn spawn_job_runner(store: SqliteStore, courier: Arc<Courier>, clock: Arc<dyn Clock>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let jobs = match store.due_jobs(64).await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, "reading the job queue failed");
                    Vec::new()
                }
            };
            if jobs.is_empty() {
                store.jobs_queued(Duration::from_millis(500)).await;
                continue;
            }
            for (id, attempts, job) in jobs {
                let outcome = courier.run_job(&job).await;
                let step = match outcome {
                    Ok(()) => store.complete_job(id).await,
                    Err(e) if e.is_retryable() && attempts + 1 < MAX_ATTEMPTS => {
                        let backoff = 100i64 << attempts.min(10);
                        tracing::warn!(job = id, attempts, error = %e, "job will be retried");
                        store.retry_job(id, clock.now() + backoff).await
                    }
                    Err(e) => {
                        tracing::error!(job = id, attempts, error = %e, "job failed for good");
                        store.bury_job(id).await
                    }
                };
                if let Err(e) = step {
                    tracing::error!(job = id, error = %e, "updating the job queue failed");
                }
            }
        }
    })
}

/// The change feed: finds messages whose fan-out was never marked done
/// (the sender's process died, or a push kept failing) and finishes them.
/// Deployed, DynamoDB Streams and the `fanout` Lambda do this. A message is
/// left alone for `grace` so the send path can finish it first.
pub fn spawn_feed(
    store: SqliteStore,
    courier: Arc<Courier>,
    clock: Arc<dyn Clock>,
    grace: Duration,
) -> JoinHandle<()> {
    use courier_core::ports::MessageStore;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(grace.max(Duration::from_millis(100)) / 2);
        loop {
            tick.tick().await;
            let before = clock.now() - grace.as_millis() as i64;
            let pending = match store.unfinished(before, 256).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "reading the feed failed");
                    continue;
                }
            };
            for (chat, message) in pending {
                if let Err(e) = courier.finish_fanout(&chat, &message).await {
                    tracing::warn!(%chat, %message, error = %e, "finishing a fan-out failed; will retry");
                }
            }
        }
    })
}

/// Runs the clean-up at start and then every `every`.
pub fn spawn_cleanup(
    courier: Arc<Courier>,
    blobs: Option<super::FileBlobs>,
    every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = courier.cleanup().await {
                tracing::error!(error = %e, "cleanup failed");
            }
            if let Some(blobs) = &blobs {
                let retention = Duration::from_millis(courier.limits().retention_ms as u64);
                let before = std::time::SystemTime::now() - retention;
                if let Err(e) = blobs.expire(before) {
                    tracing::error!(error = %e, "expiring blobs failed");
                }
            }
        }
    })
}
