//! The fuzz targets' code (`harness.rs`), and the Lambda edge it drives.
//!
//! The edge is courier-aws's own source, compiled in here: it needs only
//! the core, aws_lambda_events and serde, while the courier-aws crate would
//! bring the AWS SDK into every fuzz build. The replay test
//! (functions/tests/fuzz_regressions.rs) runs the same inputs through the
//! courier-aws crate itself. Should the edge come to use anything else of
//! courier-aws, depend on courier-aws here instead.

#[path = "../../shared/aws/src/lambda/mod.rs"]
pub mod lambda;

mod harness;

pub use harness::*;
