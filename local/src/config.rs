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
    /// A request whose headers have not all arrived this long after the
    /// socket was accepted is dropped (10 s); so is a management API request
    /// whose body has not arrived this long after its headers.
    pub header_read_timeout: Duration,
    /// Sockets still in their HTTP phase (not yet upgraded, or serving the
    /// management API and blob URLs); past it a new socket is closed at once.
    pub max_pending_connections: usize,
    /// Live WebSocket connections; past it an upgrade gets 503.
    pub max_connections: usize,
    /// A connection whose queued outbound frames pass this many bytes is cut
    /// off (1 MiB): it syncs what it missed when it reconnects.
    pub max_queued_bytes: usize,
    /// A connection whose writer makes no progress for this long is cut off
    /// (30 s): its oldest queued frame has waited that long. A socket still
    /// in its HTTP phase (a blob transfer, say) that moves no byte either way
    /// for this long is dropped.
    pub stall_timeout: Duration,
    pub limits: Limits,
    /// Wake-ups for devices that are not connected (`registerPush`).
    pub push: PushConfig,
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
            management_key_id: DEFAULT_MANAGEMENT_KEY_ID.to_owned(),
            management_secret: DEFAULT_MANAGEMENT_SECRET.to_owned(),
            public_url: None,
            durability: Durability::default(),
            idle_timeout: Duration::from_secs(600),
            max_connection: Duration::from_secs(2 * 60 * 60),
            max_frame_bytes: 32 * 1024,
            hard_frame_bytes: 1024 * 1024,
            rate_limit: RateLimit::default(),
            header_read_timeout: Duration::from_secs(10),
            max_pending_connections: 1024,
            max_connections: 100_000,
            max_queued_bytes: 1024 * 1024,
            stall_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            push: PushConfig::default(),
            #[cfg(feature = "aws")]
            watcher: None,
        }
    }
}

/// How courier-local wakes devices that are not connected: Web Push
/// directly, signed with a VAPID key kept in the data dir (made on the first
/// start), and FCM and APNs through an HTTP push gateway when one is set.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// The contact push services may write to about this server's wake-ups
    /// (the VAPID `sub`): a `mailto:` address or an `https:` URL.
    pub subject: String,
    /// Where FCM and APNs wake-ups go (courier-wake's push gateway
    /// contract); `None` turns those platforms off, so `registerPush` refuses them.
    pub gateway_url: Option<String>,
    /// Sent to the gateway as `Authorization: Bearer <secret>`.
    pub gateway_secret: Option<String>,
    /// How long one request to a push service or the gateway may take
    /// before it is abandoned and retried.
    pub timeout: Duration,
}

/// The VAPID contact unless one is set: a reserved domain (RFC 2606), so
/// mail about a development server goes nowhere rather than to a stranger.
pub const DEFAULT_PUSH_SUBJECT: &str = "mailto:courier-local@example.com";

/// The file in the data dir that keeps the VAPID private key (base64url).
pub const VAPID_KEY_FILE: &str = "vapid-private-key";

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            subject: DEFAULT_PUSH_SUBJECT.to_owned(),
            gateway_url: None,
            gateway_secret: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The management API's default access key: the convention of local AWS
/// emulators, so the SDKs work with `test`/`test` out of the box.
pub const DEFAULT_MANAGEMENT_KEY_ID: &str = "test";
pub const DEFAULT_MANAGEMENT_SECRET: &str = "test";

impl Config {
    /// Refuses to serve on `addr` with settings only fit for one machine: the
    /// dev JWT secret is public, so anyone who can reach a socket off
    /// loopback could sign tokens as any user; the default management key
    /// (`test`/`test`) is public too, and opens every connection to pushes,
    /// reads and closes by whoever knows it.
    pub fn check_exposure(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if addr.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        if self.jwt_secret == courier_core::auth::DEV_SECRET {
            anyhow::bail!(
                "refusing to listen on {addr} with the development JWT secret, which anyone can \
                 sign tokens with: set COURIER_JWT_SECRET (or --jwt-secret) to a secret of your own, \
                 or listen on 127.0.0.1"
            );
        }
        if self.management_secret == DEFAULT_MANAGEMENT_SECRET {
            anyhow::bail!(
                "refusing to listen on {addr} with the default management API secret, which anyone \
                 can sign requests with: set COURIER_MANAGEMENT_SECRET (or --management-secret) to a \
                 secret of your own, or listen on 127.0.0.1"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn the_dev_secret_serves_on_loopback_only() {
        let dev = Config::default();
        for addr in ["127.0.0.1:3001", "127.1.2.3:0", "[::1]:3001", "[::ffff:127.0.0.1]:3001"] {
            assert!(dev.check_exposure(addr.parse().unwrap()).is_ok(), "{addr}");
        }
        for addr in ["0.0.0.0:3001", "[::]:3001", "10.0.0.5:3001", "[::ffff:10.0.0.5]:3001"] {
            let refused = dev.check_exposure(addr.parse().unwrap()).expect_err(addr).to_string();
            assert!(refused.contains("COURIER_JWT_SECRET"), "{refused}");
        }
        let own = Config { jwt_secret: "a secret of our own".into(), ..Config::default() };
        let refused = own.check_exposure("0.0.0.0:3001".parse().unwrap()).expect_err("default key");
        assert!(refused.to_string().contains("COURIER_MANAGEMENT_SECRET"), "{refused}");
        assert!(own.check_exposure("127.0.0.1:3001".parse().unwrap()).is_ok());
        let own = Config { management_secret: "another of our own".into(), ..own };
        assert!(own.check_exposure("0.0.0.0:3001".parse().unwrap()).is_ok());
    }
}
