//! The job queue on SQLite: `Jobs` for the producers, and the consumer side the job runner uses.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::SqliteStore;
use super::rows::json;
use courier_core::domain::Millis;
use courier_core::error::Result;
use courier_core::ports::{Job, Jobs};

#[async_trait]
impl Jobs for SqliteStore {
    async fn enqueue(&self, job: &Job, delay: Duration) -> Result<()> {
        let body = json(job);
        let run_at = self.now() + delay.as_millis() as Millis;
        self.write(move |c| {
            c.execute("INSERT INTO jobs (run_at, body) VALUES (?1, ?2)", params![run_at, body]).map(drop)
        })
        .await?;
        self.inner.jobs_queued.notify_one();
        Ok(())
    }
}

// The consumer side: the job runner (`runners.rs`) polls, runs, retries and buries.
impl SqliteStore {
    /// Waits until a job may be due: one was queued, or `timeout` passed.
    pub async fn jobs_queued(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.jobs_queued.notified()).await;
    }

    /// Jobs due now, with their ids and how often they were tried.
    pub async fn due_jobs(&self, limit: usize) -> Result<Vec<(i64, u32, Job)>> {
        let now = self.now();
        let rows: Vec<(i64, u32, String)> = self
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT job_id, attempts, body FROM jobs WHERE dead = 0 AND run_at <= ?1 ORDER BY run_at LIMIT ?2",
                )?;
                stmt.query_map(params![now, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
            })
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for (id, attempts, body) in rows {
            match serde_json::from_str(&body) {
                Ok(job) => jobs.push((id, attempts, job)),
                Err(e) => {
                    tracing::error!(job = id, error = %e, "unreadable job buried");
                    self.bury_job(id).await?;
                }
            }
        }
        Ok(jobs)
    }

    /// When the next job not yet due comes due (a retry waiting out its backoff).
    pub async fn next_job_at(&self, now: Millis) -> Result<Option<Millis>> {
        self.read(move |c| {
            c.prepare_cached("SELECT min(run_at) FROM jobs WHERE dead = 0 AND run_at > ?1")?
                .query_row([now], |r| r.get(0))
        })
        .await
    }

    pub async fn complete_job(&self, id: i64) -> Result<()> {
        self.write(move |c| c.execute("DELETE FROM jobs WHERE job_id = ?1", [id]).map(drop)).await
    }

    pub async fn retry_job(&self, id: i64, run_at: Millis) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE jobs SET attempts = attempts + 1, run_at = ?2 WHERE job_id = ?1",
                params![id, run_at],
            )
            .map(drop)
        })
        .await
    }

    /// Sets a job aside for good: the dead-letter queue of the local shape.
    pub async fn bury_job(&self, id: i64) -> Result<()> {
        self.write(move |c| c.execute("UPDATE jobs SET dead = 1 WHERE job_id = ?1", [id]).map(drop)).await
    }

    pub async fn dead_jobs(&self) -> Result<u64> {
        self.read(|c| c.query_row("SELECT count(*) FROM jobs WHERE dead = 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }
}
