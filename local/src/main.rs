//! The `courier-local` command: serve Courier on one machine, or mint a dev token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use courier_core::ratelimit::RateLimit;
use courier_embedded::Durability;
use courier_local::{Backend, Config, PushConfig};

// Every frame allocates (event, JSON, strings) on one worker and frees on
// another; glibc's malloc spent a third of the workers' time doing that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Courier on one machine: the WebSocket API, its management API and blob URLs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `embedded` (SQLite and files) or `aws` (the deployed adapters against
    /// AWS_ENDPOINT_URL, e.g. moto; needs the `aws` cargo feature).
    #[arg(long, env = "COURIER_BACKEND", value_enum, default_value = "embedded")]
    backend: BackendArg,
    /// With `--backend aws`: the prefix of the tables, queues and bucket.
    #[arg(long, env = "COURIER_AWS_PREFIX", default_value = "courier-local")]
    aws_prefix: String,
    #[arg(long, env = "COURIER_ADDR", default_value = "127.0.0.1:3001")]
    addr: SocketAddr,
    #[arg(long, env = "COURIER_DATA_DIR", default_value = ".courier")]
    data_dir: PathBuf,
    /// HS256 secret that tokens are verified with.
    #[arg(long, env = "COURIER_JWT_SECRET", default_value = courier_core::auth::DEV_SECRET, hide_default_value = true)]
    jwt_secret: String,
    /// Access key id that management API requests must be signed with (SigV4, service execute-api).
    #[arg(long, env = "COURIER_MANAGEMENT_KEY_ID", default_value = "test")]
    management_key_id: String,
    /// Secret of that access key.
    #[arg(long, env = "COURIER_MANAGEMENT_SECRET", default_value = "test", hide_default_value = true)]
    management_secret: String,
    /// Base URL of the blob links handed to clients (default: http://ADDR).
    #[arg(long, env = "COURIER_PUBLIC_URL")]
    public_url: Option<String>,
    /// `process`: a commit survives the process dying; `disk`: it is fsynced, surviving power loss too.
    #[arg(long, env = "COURIER_DURABILITY", value_enum, default_value = "process")]
    durability: DurabilityArg,
    /// Seconds without a frame before a connection is closed.
    #[arg(long, env = "COURIER_IDLE_TIMEOUT", default_value_t = 600)]
    idle_timeout: u64,
    /// Seconds a connection may last at most.
    #[arg(long, env = "COURIER_MAX_CONNECTION", default_value_t = 7200)]
    max_connection: u64,
    /// Frames a connection may send in a burst.
    #[arg(long, env = "COURIER_RATE_BURST", default_value_t = 50.0)]
    rate_burst: f64,
    /// Frames a second a connection may send, sustained.
    #[arg(long, env = "COURIER_RATE_PER_SECOND", default_value_t = 20.0)]
    rate_per_second: f64,
    /// Live WebSocket connections at most; past it an upgrade gets 503.
    #[arg(long, env = "COURIER_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Sockets not yet upgraded (or on the HTTP routes) at most; past it a new one is closed.
    #[arg(long, env = "COURIER_MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    max_pending_connections: usize,
    /// Contact for push services about this server's wake-ups (VAPID `sub`): mailto: or https:.
    #[arg(long, env = "COURIER_PUSH_SUBJECT", default_value = courier_local::config::DEFAULT_PUSH_SUBJECT)]
    push_subject: String,
    /// Push gateway that FCM and APNs wake-ups go to (off when unset: registerPush refuses them).
    #[arg(long, env = "COURIER_PUSH_GATEWAY_URL")]
    push_gateway_url: Option<String>,
    /// Sent to the push gateway as a bearer token.
    #[arg(long, env = "COURIER_PUSH_GATEWAY_SECRET", hide_env_values = true)]
    push_gateway_secret: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Print a token for USER signed with the server's secret.
    Token {
        user: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 24 * 60 * 60)]
        ttl: i64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Embedded,
    Aws,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Process,
    Disk,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Token { user, ttl }) = &cli.command {
        courier_core::ids::UserId::try_from(user.as_str()).map_err(anyhow::Error::msg)?;
        println!("{}", courier_core::auth::mint(cli.jwt_secret.as_bytes(), user, *ttl));
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let backend = match cli.backend {
        BackendArg::Embedded => Backend::Embedded,
        #[cfg(feature = "aws")]
        BackendArg::Aws => Backend::Aws { prefix: cli.aws_prefix, sdk: None },
        #[cfg(not(feature = "aws"))]
        BackendArg::Aws => {
            let _ = cli.aws_prefix;
            anyhow::bail!(
                "this build has no AWS backend: cargo run -p courier-local --features aws -- --backend aws"
            )
        }
    };
    let config = Config {
        backend,
        addr: cli.addr,
        data_dir: cli.data_dir,
        jwt_secret: cli.jwt_secret,
        management_key_id: cli.management_key_id,
        management_secret: cli.management_secret,
        public_url: cli.public_url,
        durability: match cli.durability {
            DurabilityArg::Process => Durability::Process,
            DurabilityArg::Disk => Durability::Disk,
        },
        idle_timeout: Duration::from_secs(cli.idle_timeout),
        max_connection: Duration::from_secs(cli.max_connection),
        rate_limit: RateLimit { capacity: cli.rate_burst, per_second: cli.rate_per_second },
        max_connections: cli.max_connections,
        max_pending_connections: cli.max_pending_connections,
        push: PushConfig {
            subject: cli.push_subject,
            gateway_url: cli.push_gateway_url,
            gateway_secret: cli.push_gateway_secret,
            ..PushConfig::default()
        },
        ..Config::default()
    };
    courier_local::listener::raise_fd_limit(&config);
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    courier_local::serve(config, listener, shutdown_signal()).await
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
