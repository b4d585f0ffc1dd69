//! Pagoda's HTTP server: an OpenAI-compatible API over an [`EngineHandle`],
//! Prometheus metrics and the telemetry stream (`pagoda serve`).
//!
//! One concept a file: [`openai`] reads request bodies, [`responses`] writes
//! response bodies, [`generation`] admits, submits and bridges engine
//! requests, [`stream`] streams generations as SSE, [`routes`] holds the
//! handlers, [`metrics`] the Prometheus text, [`telemetry`] the telemetry
//! SSE, [`auth`] the API key, [`shutdown`] the graceful shutdown, [`error`]
//! the error bodies.
//!
//! The engine runs on its own thread behind the handle; the server runs on a
//! tokio runtime and never blocks its workers on the engine: submissions and
//! aborts go through `spawn_blocking` or a short-lived thread, and each
//! engine request's events reach the async side through a bridge thread.
//!
//! It lives in the binary, not in a crate of its own: a `pagoda-server`
//! library would depend on the `pagoda` library, and the `pagoda` package
//! (whose binary runs `serve`) would depend on it: a package cycle Cargo
//! refuses.

pub mod auth;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod openai;
pub mod responses;
pub mod routes;
pub mod shutdown;
pub mod stream;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pagoda::EngineHandle;
use tokio::net::TcpListener;

pub use error::ServerError;

use crate::server::generation::Admissions;
use crate::server::routes::{AppState, router};
use crate::server::shutdown::Shutdown;

/// Default largest request body: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (default 127.0.0.1).
    pub host: String,
    /// Port (0: any free one; the bound address is printed).
    pub port: u16,
    /// When set, every route wants `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Engine requests that may wait beyond those the engine runs at once
    /// (its `max_seqs`); more get a 429.
    pub max_queue: usize,
    /// Largest request body, bytes (a larger one gets a 413).
    pub body_limit: usize,
    /// How long in-flight generations may go on after SIGINT/SIGTERM.
    pub shutdown_timeout: Duration,
    /// The model name `/v1/models` lists.
    pub model_name: String,
}

/// Serves on `listener` until `stop` resolves, then shuts down gracefully:
/// no new connections, in-flight generations get `shutdown_timeout` to
/// finish, then are cancelled. The engine is left running (the caller owns
/// the handle).
pub async fn serve(
    handle: EngineHandle,
    cfg: ServerConfig,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let limit = handle.info().memory_plan.max_seqs + cfg.max_queue;
    let shutdown = Arc::new(Shutdown::default());
    let state = Arc::new(AppState::new(
        handle,
        cfg.model_name.clone(),
        Arc::new(Admissions::new(limit)),
        shutdown.watch(),
        cfg.body_limit,
    ));
    let app = router(state, cfg.api_key.as_deref().map(auth::ApiKey::new));
    let timeout = cfg.shutdown_timeout;
    let mut phase = shutdown.watch();
    let drain = async move {
        stop.await;
        tokio::spawn(async move { shutdown.drain_then_cancel(timeout).await });
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(drain);
    tokio::select! {
        r = server => r.map_err(ServerError::Serve),
        // Cancelled streams end at once; a connection still open after
        // CANCEL_GRACE (a client that stopped reading, its socket full) is
        // dropped rather than holding the process.
        _ = async {
            shutdown::reached(&mut phase, shutdown::Phase::Cancelled).await;
            tokio::time::sleep(CANCEL_GRACE).await;
        } => Ok(()),
    }
}

/// How long connections may stay open after in-flight work was cancelled.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Binds `host:port`.
pub async fn bind(cfg: &ServerConfig) -> Result<TcpListener, ServerError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Runs the server on a runtime of its own until SIGINT or SIGTERM, then
/// shuts the engine down. `on_listen` gets the bound address (the caller
/// prints it).
pub fn run(
    handle: EngineHandle,
    cfg: ServerConfig,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pagoda-http")
        .build()
        .map_err(ServerError::Serve)?;
    let h = handle.clone();
    rt.block_on(async move {
        let listener = bind(&cfg).await?;
        on_listen(listener.local_addr().map_err(ServerError::Serve)?);
        serve(h, cfg, listener, shutdown::signal()).await
    })?;
    handle.shutdown()?;
    Ok(())
}
