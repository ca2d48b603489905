//! Adapters for one machine: SQLite for every table, files for blobs, and an
//! in-process job queue and change feed that live in the same database, so a
//! restart loses nothing.

mod cache;
mod files;
mod runners;
mod sqlite;

pub use files::{CHECKSUM_HEADER, FileBlobs, Upload, UploadError};
pub use runners::{spawn_cleanup, spawn_feed, spawn_job_runner};
pub use sqlite::{Durability, SqliteStore};
