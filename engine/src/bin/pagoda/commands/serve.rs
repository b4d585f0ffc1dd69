//! `pagoda serve`: the engine behind an OpenAI-compatible HTTP server
//! (`crate::server`), on any backend.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use pagoda::EngineHandle;
use pagoda::plan::parse_bytes;
use pagoda_backend::Backend;

use crate::cli::{Common, MemoryArgs};
use crate::server::{DEFAULT_BODY_LIMIT, ServerConfig};
use crate::setup::{ModelSource, build, engine_config, model_source};

/// Flags of `pagoda serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route (/metrics and
    /// /v1/telemetry included).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait beyond the --max-seqs the engine runs at once;
    /// more get a 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body (a larger one gets a 413), e.g. 4MiB.
    #[arg(long)]
    pub max_body: Option<String>,
    /// Seconds in-flight requests may go on after SIGINT/SIGTERM before they
    /// are cancelled.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub shutdown_timeout: f64,
    /// The model name clients use (default: the model file's stem, or the
    /// dummy shape's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
}

/// Runs `pagoda serve`.
pub fn exec(a: Args) -> Result<()> {
    ignore_sigpipe();
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        bail!(
            "--shutdown-timeout must be a number of seconds >= 0, got {}",
            a.shutdown_timeout
        );
    }
    let body_limit = match &a.max_body {
        None => DEFAULT_BODY_LIMIT,
        Some(s) => parse_bytes(s)
            .ok_or_else(|| anyhow!("cannot parse --max-body `{s}` (try 4MiB or 65536)"))?
            as usize,
    };
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key cannot be empty");
    }
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    let cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        max_queue: a.max_queue,
        body_limit,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        model_name: a
            .served_model_name
            .clone()
            .unwrap_or_else(|| model_name(&source)),
    };
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b, cfg))
}

/// Makes SIGPIPE ignored again (`main` gives it its default action for the
/// CLI's stdout). The HTTP stack writes to sockets with `writev`, which,
/// unlike std's `send`, has no `MSG_NOSIGNAL`: a client that hung up would
/// kill the whole server. Ignored, such a write is an EPIPE error that ends
/// that connection only.
fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called before the server's and the engine's threads start; setting SIGPIPE's disposition to SIG_IGN has no other precondition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The model file's stem, or the dummy shape's name.
fn model_name(source: &ModelSource) -> String {
    match source {
        ModelSource::File(p) => p
            .file_stem()
            .map_or_else(|| source.name(), |s| s.to_string_lossy().into_owned()),
        ModelSource::Dummy { name, .. } => name.clone(),
    }
}

fn run<B: Backend>(
    a: &Args,
    source: &ModelSource,
    backend: Arc<B>,
    cfg: ServerConfig,
) -> Result<()> {
    // The settings generate/chat/plan take from the same flags.
    let engine = build(source, backend, engine_config(&a.memory, 1)?)?;
    let handle = EngineHandle::spawn(engine)?;
    let model = cfg.model_name.clone();
    let seqs = handle.info().memory_plan.max_seqs;
    crate::server::run(handle, cfg, |addr| {
        eprintln!("pagoda: serving {model} on http://{addr} ({seqs} sequence(s) at once)");
    })?;
    eprintln!("pagoda: server stopped");
    Ok(())
}
