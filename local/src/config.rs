//! The local server's settings: where it listens, keeps data and what limits it applies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use courier_core::domain::Limits;
use courier_core::ratelimit::RateLimit;
use courier_embedded::Durability;

/// What the handlers run on.
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// SQLite, files and in-process queues under the data dir.
    #[default]
    Embedded,
    /// The deployed adapters, with resources named `{prefix}-chats`,
    /// `{prefix}-jobs`... The SDK config comes from the environment
    /// (`AWS_ENDPOINT_URL` pointing at moto, say) unless one is given.
    #[cfg(feature = "aws")]
    Aws { prefix: String, sdk: Option<Box<courier_aws::aws_config::SdkConfig>> },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub backend: Backend,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub jwt_secret: String,
    /// The access key every management API request must be signed with
    /// (SigV4, service `execute-api`); `test`/`test` by default, as local
    /// AWS emulators take.
    pub management_key_id: String,
    pub management_secret: String,
    /// Base of the blob URLs handed to clients; defaults to `http://{addr}`.
    pub public_url: Option<String>,
    pub durability: Durability,
    /// API Gateway closes a connection idle this long (10 minutes).
    pub idle_timeout: Duration,
    /// API Gateway closes any connection after this long (2 hours).
    pub max_connection: Duration,
    /// Client frames up to this size are processed (API Gateway: 32 KiB).
    pub max_frame_bytes: usize,
    /// Frames past this are not even read: the connection closes with 1009.
    pub hard_frame_bytes: usize,
    pub rate_limit: RateLimit,
    pub limits: Limits,
    /// On the AWS backend, sees every request the AWS clients make (the
    /// cost tests put the test kit's meter here).
    #[cfg(feature = "aws")]
    pub watcher: Option<std::sync::Arc<dyn courier_aws::Watcher>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            addr: ([127, 0, 0, 1], 3001).into(),
            data_dir: PathBuf::from(".courier"),
            jwt_secret: courier_core::auth::DEV_SECRET.to_owned(),
            management_key_id: "test".to_owned(),
            management_secret: "test".to_owned(),
            public_url: None,
            durability: Durability::default(),
            idle_timeout: Duration::from_secs(600),
            max_connection: Duration::from_secs(2 * 60 * 60),
            max_frame_bytes: 32 * 1024,
            hard_frame_bytes: 1024 * 1024,
            rate_limit: RateLimit::default(),
            limits: Limits::default(),
            #[cfg(feature = "aws")]
            watcher: None,
        }
    }
}
