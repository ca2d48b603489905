//! courier-local: Courier in one process, for newcomers, client developers and tests.
//!
//! It plays API Gateway's part in front of the shared handlers: the WebSocket
//! API with its authorizer, routes and limits ([`gateway`]), the
//! `@connections` management API ([`management`]) and the presigned blob URLs
//! ([`blobs`]), over the embedded adapters (SQLite, files, in-process queue
//! and feed), behind its own accept loop ([`listener`]). It wakes devices
//! that are not connected through Web Push and a push gateway, and serves a
//! page that subscribes a browser ([`wake`]). `serve` takes a bound
//! listener, so tests start it on port 0.

#[cfg(feature = "aws")]
pub mod aws;
pub mod blobs;
pub mod config;
pub mod gateway;
pub mod listener;
pub mod management;
pub mod sigv4;
pub mod wake;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, put};
use courier_core::Courier;
use courier_core::auth::Verifier;
use courier_core::domain::Limits;
use courier_core::ports::{Clock, SystemClock, Wakeups};
use courier_embedded::{self as embedded, FileBlobs, SqliteStore};
use tokio::task::JoinHandle;

pub use config::{Backend, Config, PushConfig};
pub use gateway::Connections;
use gateway::Gateway;

/// How long the feed leaves a message to its send path before finishing its fan-out.
const FEED_GRACE: Duration = Duration::from_secs(2);
const CLEANUP_EVERY: Duration = Duration::from_secs(600);

/// The service and what runs beside it, for one backend.
struct Started {
    courier: Arc<Courier>,
    tasks: Vec<JoinHandle<()>>,
    /// Routes only this backend serves (the embedded blob URLs).
    routes: Router,
    store: Option<SqliteStore>,
}

/// The embedded backend: SQLite, files, the in-process queue and feed.
fn embedded(
    config: &Config,
    public_url: &str,
    push: Arc<Connections>,
    wakeups: Arc<dyn Wakeups>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Started> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = SqliteStore::open(&config.data_dir.join("courier.db"), config.durability, clock.clone())?;
    let files = FileBlobs::open(&config.data_dir.join("blobs"), public_url)?;
    let ports = embedded::ports(&store, &files, push, wakeups, clock.clone());
    // Pushes here go to in-process channels, not HTTP posts, to connections
    // that die with this process: no fan-out is worth a trip through the job
    // queue, and none is left for the feed to finish.
    let limits =
        Limits { inline_push_limit: usize::MAX, connections_in_process: true, ..config.limits.clone() };
    let courier = Arc::new(Courier::new(ports, limits));
    let tasks = vec![
        embedded::spawn_job_runner(store.clone(), courier.clone(), clock.clone()),
        embedded::spawn_feed(store.clone(), courier.clone(), clock, FEED_GRACE),
        embedded::spawn_cleanup(courier.clone(), Some(files.clone()), CLEANUP_EVERY),
    ];
    let routes = Router::new().route(
        "/blobs/{id}",
        put(blobs::upload)
            .get(blobs::download)
            .with_state(blobs::BlobState { courier: courier.clone(), files }),
    );
    Ok(Started { courier, tasks, routes, store: Some(store) })
}

/// The AWS backend: the deployed adapters, with this process as API Gateway,
/// the stream's and the queue's event source mappings.
#[cfg(feature = "aws")]
async fn on_aws(
    config: &Config,
    prefix: &str,
    sdk: Option<courier_aws::aws_config::SdkConfig>,
    addr: std::net::SocketAddr,
    wakeups: Arc<dyn Wakeups>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Started> {
    use courier_aws::aws_config;
    let sdk = match sdk {
        Some(sdk) => sdk,
        None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
    };
    let endpoint = format!("http://{addr}");
    let backend = aws::Backend::provision(
        &sdk,
        prefix,
        &endpoint,
        (&config.management_key_id, &config.management_secret),
        config.watcher.as_deref(),
    )
    .await?;
    // Wake-ups leave from this machine as on the embedded backend: the
    // deployed shape's SNS platform applications do not exist here.
    let ports = courier_core::Ports { wakeups, ..backend.ports(clock) };
    let courier = Arc::new(Courier::new(ports, config.limits.clone()));
    let mut tasks = Vec::from(backend.spawn(courier.clone()));
    tasks.push(embedded::spawn_cleanup(courier.clone(), None, CLEANUP_EVERY));
    Ok(Started { courier, tasks, routes: Router::new(), store: None })
}

/// Serves Courier on `listener` until `shutdown` resolves, then closes every
/// connection and lets the store commit what it holds.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(config, listener, Arc::default(), shutdown).await
}

/// [`serve`], keeping its live connections in `connections`, which the
/// caller may read (tests look up connection ids there).
pub async fn serve_with(
    config: Config,
    listener: tokio::net::TcpListener,
    connections: Arc<Connections>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    config.check_exposure(addr)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let wake = wake::senders(&config, addr)?;
    let wakeups: Arc<dyn Wakeups> = wake.wakers;
    let started = match &config.backend {
        Backend::Embedded => embedded(&config, &public_url, connections.clone(), wakeups, clock)?,
        #[cfg(feature = "aws")]
        Backend::Aws { prefix, sdk } => {
            on_aws(&config, prefix, sdk.as_deref().cloned(), addr, wakeups, clock).await?
        }
    };
    let verifier = Verifier::hs256(config.jwt_secret.as_bytes())?;
    let gateway =
        Arc::new(Gateway::new(started.courier.clone(), verifier, connections.clone(), config.clone()));

    let app = Router::new()
        .route("/", get(gateway::upgrade).with_state(gateway))
        .route(
            "/@connections/{id}",
            get(management::get_connection)
                .post(management::post_to_connection)
                .delete(management::delete_connection)
                .with_state(connections.clone())
                .layer(axum::middleware::from_fn_with_state(
                    Arc::new(management::Gate {
                        verifier: sigv4::Verifier::new(&config.management_key_id, &config.management_secret),
                        body_deadline: config.header_read_timeout,
                    }),
                    management::require_signature,
                )),
        )
        .merge(wake::routes(wake.public_key))
        .merge(started.routes);

    tracing::info!(%addr, backend = ?config.backend, data_dir = %config.data_dir.display(), "courier-local listening");
    listener::serve(listener, app, &config, shutdown).await?;

    tracing::info!("shutting down");
    connections.close_all(1001, "server shutting down");
    // Give the socket tasks a moment to run their $disconnect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for task in started.tasks {
        task.abort();
    }
    if let Some(store) = started.store {
        store.close();
    }
    Ok(())
}
