//! Courier's test kit: what the tests of every crate share, and nothing a
//! deployed or local server runs.
//!
//! | module | what it holds |
//! |---|---|
//! | [`contract`] | the table ports' contract suite, run against SQLite and DynamoDB |
//! | [`moto`] | moto's server on a free port, shared by a test binary |
//! | [`meter`] | counts what the AWS clients send, the way the bill counts it, and names each request |
//! | [`template`] | reads template.yaml as CloudFormation does |
//! | [`client`] | a typed WebSocket client for the end-to-end tests and the bench |
//! | [`FakeClock`] | a clock tests move by hand |
//!
//! Two binaries serve scripts/lambda-invoke-check: `courier-template` prints
//! template.yaml as [`template`] reads it, and `courier-recorder` records the
//! Lambda processes' AWS requests by [`meter::request_name`].

pub mod client;
pub mod contract;
pub mod meter;
pub mod moto;
pub mod template;

pub use meter::{Meter, Usage};

use courier_core::domain::Millis;
use courier_core::ports::Clock;

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct FakeClock(std::sync::atomic::AtomicI64);

impl FakeClock {
    pub fn at(ms: Millis) -> Self {
        Self(ms.into())
    }

    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Millis {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
