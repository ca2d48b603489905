//! Courier's core: what every shape shares, with no AWS SDK and no storage engine.
//!
//! | module | what it holds |
//! |---|---|
//! | [`protocol`] | wire types: commands, responses, pushes, error codes |
//! | [`ids`], [`domain`] | identifiers, chats, inboxes and the rules on them |
//! | [`ports`] | the traits the services use to reach storage, queues, pushes and blobs |
//! | [`service`] | [`service::Courier`]: one method per command |
//! | [`dispatch`] | one frame in, one reply out: the path both shapes run |
//! | [`auth`] | JWT verification for $connect |
//! | [`ratelimit`] | the per-connection token bucket |
//!
//! The crates around it: `courier-aws` (DynamoDB, SQS, S3, API Gateway and
//! the Lambda event edge), `courier-embedded` (SQLite, files, in-process
//! runners) and `courier-testkit` (contract suite, moto, meter, fakes).

pub mod auth;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod ids;
pub mod ports;
pub mod protocol;
pub mod ratelimit;
pub mod service;

pub use error::{Error, Result};
pub use service::{Courier, Ports};
