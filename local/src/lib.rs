//! courier-local: Courier in one process, for newcomers, client developers and tests.
//!
//! It plays API Gateway's part in front of the shared handlers: the WebSocket
//! API with its authorizer, routes and limits ([`gateway`]), the
//! `@connections` management API ([`management`]) and the presigned blob URLs
//! ([`blobs`]), over the embedded adapters (SQLite, files, in-process queue
//! and feed). `serve` takes a bound listener, so tests start it on port 0.

pub mod blobs;
pub mod config;
pub mod gateway;
pub mod management;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, put};
use courier_shared::auth::Verifier;
use courier_shared::embedded::{self, FileBlobs, SqliteStore};
use courier_shared::ports::{Clock, SystemClock};
use courier_shared::{Courier, Ports};

pub use config::Config;
use gateway::{Connections, Gateway};

/// How long the feed leaves a message to its send path before finishing its fan-out.
const FEED_GRACE: Duration = Duration::from_secs(2);
const CLEANUP_EVERY: Duration = Duration::from_secs(600);

/// Serves Courier on `listener` until `shutdown` resolves, then closes every
/// connection and lets the store commit what it holds.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&config.data_dir)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = SqliteStore::open(&config.data_dir.join("courier.db"), config.durability, clock.clone())?;
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let files = FileBlobs::open(&config.data_dir.join("blobs"), &public_url)?;
    let connections = Arc::new(Connections::default());
    let ports = Ports {
        chats: Arc::new(store.clone()),
        devices: Arc::new(store.clone()),
        messages: Arc::new(store.clone()),
        attachments: Arc::new(store.clone()),
        blobs: Arc::new(files.clone()),
        push: connections.clone(),
        jobs: Arc::new(store.clone()),
        clock: clock.clone(),
    };
    let courier = Arc::new(Courier::new(ports, config.limits.clone()));
    let verifier = Verifier::hs256(config.jwt_secret.as_bytes())?;
    let gateway = Arc::new(Gateway::new(courier.clone(), verifier, connections.clone(), config.clone()));

    let background = [
        embedded::spawn_job_runner(store.clone(), courier.clone(), clock.clone()),
        embedded::spawn_feed(store.clone(), courier.clone(), clock.clone(), FEED_GRACE),
        embedded::spawn_cleanup(courier.clone(), Some(files.clone()), CLEANUP_EVERY),
    ];

    let app = Router::new()
        .route("/", get(gateway::upgrade).with_state(gateway.clone()))
        .route(
            "/@connections/{id}",
            get(management::get_connection)
                .post(management::post_to_connection)
                .delete(management::delete_connection)
                .with_state(connections.clone()),
        )
        .route(
            "/blobs/{id}",
            put(blobs::upload)
                .get(blobs::download)
                .with_state(blobs::BlobState { courier: courier.clone(), files }),
        );

    tracing::info!(%addr, data_dir = %config.data_dir.display(), "courier-local listening");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await?;

    tracing::info!("shutting down");
    connections.close_all(1001, "server shutting down");
    // Give the socket tasks a moment to run their $disconnect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for task in background {
        task.abort();
    }
    store.close();
    Ok(())
}
