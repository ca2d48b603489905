//! Courier's library: everything but the process wiring.
//!
//! | module | what it holds |
//! |---|---|
//! | [`protocol`] | wire types: commands, responses, pushes, error codes |
//! | [`ids`], [`domain`] | identifiers, chats, inboxes and the rules on them |
//! | [`ports`] | the traits the services use to reach storage, queues, pushes and blobs |
//! | [`service`] | [`service::Courier`]: one method per command |
//! | [`handlers`] | API Gateway events in, route responses out: what the Lambdas and the local gateway run |
//! | [`auth`] | JWT verification for $connect |
//! | [`ratelimit`] | the per-connection token bucket |
//! | [`embedded`] | adapters for one machine: SQLite tables, files, an in-process queue and feed |
//! | `aws` | adapters for the deployed shape: DynamoDB, SQS, S3, API Gateway Management (feature `aws`) |
//! | `client` | a typed WebSocket client for tests and the bench (feature `client`) |

pub mod auth;
#[cfg(feature = "aws")]
pub mod aws;
pub mod domain;
pub mod embedded;
pub mod error;
pub mod handlers;
pub mod ids;
pub mod ports;
pub mod protocol;
pub mod ratelimit;
pub mod service;

#[cfg(feature = "client")]
pub mod client;

/// The table ports' contract suite, for adapters' tests.
#[cfg(any(test, feature = "contract"))]
pub mod contract;

pub use error::{Error, Result};
pub use service::{Courier, Ports};
