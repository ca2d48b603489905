//! The background work of the local shape: the job queue's consumer, the
//! change feed that backs up fan-out, and the periodic clean-up.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};

use super::SqliteStore;
use courier_core::ports::Clock;
use courier_core::service::Courier;

/// Tries before a job is set aside as dead (SQS's maxReceiveCount).
const MAX_ATTEMPTS: u32 = 5;
/// Jobs running at once. A wake-up to a push service that hangs holds one
/// for its timeout; run one at a time, it would hold up every job behind
/// it, other devices' wake-ups and retried pushes alike (deployed, each
/// SQS batch gets a Lambda of its own).
const CONCURRENT_JOBS: usize = 32;
/// Due jobs read at once, beyond those already running.
const BATCH: usize = 64;
/// The longest the runner sleeps with nothing due: enqueueing wakes it
/// sooner, and so does the next retry coming due.
const IDLE: Duration = Duration::from_millis(500);

/// Runs queued jobs as they come due, up to [`CONCURRENT_JOBS`] at once,
/// retrying with backoff; the `deliver` Lambda does this on SQS when
/// deployed. A job stays in its table until its outcome is written, so one
/// running is skipped, not started twice.
pub fn spawn_job_runner(store: SqliteStore, courier: Arc<Courier>, clock: Arc<dyn Clock>) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Dropped with this task, which aborts the jobs still running.
        let mut tasks = JoinSet::new();
        let running: Arc<Mutex<HashSet<i64>>> = Arc::default();
        loop {
            while let Some(ended) = tasks.try_join_next() {
                reap(ended);
            }
            // Taken before the read: a job that settles after it is still
            // skipped, though the read may have seen its row.
            let skip = lock(&running).clone();
            let jobs = match store.due_jobs(BATCH + skip.len()).await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, "reading the job queue failed");
                    Vec::new()
                }
            };
            let fresh: Vec<_> = jobs.into_iter().filter(|(id, _, _)| !skip.contains(id)).collect();
            if fresh.is_empty() {
                let now = clock.now();
                let next = store.next_job_at(now).await.unwrap_or(None);
                let wait = next.map_or(IDLE, |at| Duration::from_millis((at - now).max(1) as u64).min(IDLE));
                // A job that ends may have set itself a retry sooner than `wait`.
                tokio::select! {
                    () = store.jobs_queued(wait) => {}
                    Some(ended) = tasks.join_next(), if !tasks.is_empty() => reap(ended),
                }
                continue;
            }
            for (id, attempts, job) in fresh {
                while tasks.len() >= CONCURRENT_JOBS {
                    if let Some(ended) = tasks.join_next().await {
                        reap(ended);
                    }
                }
                lock(&running).insert(id);
                let (store, courier, clock, running) =
                    (store.clone(), courier.clone(), clock.clone(), running.clone());
                tasks.spawn(async move {
                    let outcome = courier.run_job(&job).await;
                    settle(&store, clock.as_ref(), id, attempts, outcome).await;
                    lock(&running).remove(&id);
                });
            }
        }
    })
}

/// Writes a job's outcome: done, due again after a backoff, or dead.
async fn settle(
    store: &SqliteStore,
    clock: &dyn Clock,
    id: i64,
    attempts: u32,
    outcome: courier_core::Result<()>,
) {
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

/// A job whose task panicked wrote no outcome and stays in `running`: it
/// is skipped until the process restarts, rather than run again at once.
fn reap(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        tracing::error!(error = %e, "a job's task ended without an outcome; it runs again after a restart");
    }
}

fn lock(running: &Mutex<HashSet<i64>>) -> std::sync::MutexGuard<'_, HashSet<i64>> {
    running.lock().unwrap_or_else(|e| e.into_inner())
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
