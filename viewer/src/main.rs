//! `pagoda-viewer`: desktop chat with a live picture of the device's memory.
//!
//! Sources, picked by flags: an in-process engine (default; `--model`,
//! `--backend`), a running `pagoda serve` (`--attach URL`), or a recorded
//! trace (`--replay FILE`). See `notes/viewer.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use pagoda_viewer::app::{Local, Source, ViewerApp, read_prompts};
use pagoda_viewer::source::attach::Attach;
use pagoda_viewer::source::in_process::{BackendChoice, EngineOptions, load};
use pagoda_viewer::source::replay::Replay;

/// Backends compiled into this binary.
const COMPILED: &[&str] = &[
    "cpu",
    #[cfg(feature = "cuda")]
    "cuda",
    #[cfg(feature = "wgpu")]
    "wgpu",
];

/// Desktop chat with a live picture of the device's memory.
#[derive(Debug, Parser)]
#[command(name = "pagoda-viewer", version)]
struct Args {
    /// Replay a trace recorded with `pagoda generate --trace FILE`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["attach", "model", "demo_prompts"])]
    replay: Option<PathBuf>,
    /// Attach to a running `pagoda serve` (its /v1/telemetry stream), e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL", conflicts_with_all = ["model", "demo_prompts"])]
    attach: Option<String>,
    /// API key of the server (`pagoda serve --api-key`).
    #[arg(long, requires = "attach")]
    api_key: Option<String>,
    /// GGUF model of the in-process engine (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backend of the in-process engine: cpu, cuda or wgpu (as compiled in).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Context length per sequence.
    #[arg(long, default_value_t = 1024)]
    ctx: usize,
    /// Sequences at once (chats generating together).
    #[arg(long, default_value_t = 4)]
    max_seqs: usize,
    /// Memory budget, e.g. 2GiB (default: 90 % of the device).
    #[arg(long)]
    memory_budget: Option<String>,
    /// Start one chat per line of this file as soon as the engine runs.
    #[arg(long, value_name = "FILE")]
    demo_prompts: Option<PathBuf>,
    /// Replay: start at the last memory event at or before this step.
    #[arg(long, requires = "replay")]
    start_at: Option<u64>,
    /// Replay: start paused.
    #[arg(long, requires = "replay")]
    paused: bool,
    /// Replay: trace seconds per second.
    #[arg(long, default_value_t = 1.0, requires = "replay")]
    speed: f32,
    /// Replay: start again at the end.
    #[arg(long = "loop", requires = "replay")]
    looping: bool,
    /// Light theme (default dark).
    #[arg(long)]
    light: bool,
    /// Window size, e.g. 1280x800.
    #[arg(long, default_value = "1280x800")]
    size: String,
    /// Close the window after this many seconds (smoke tests, screenshots).
    #[arg(long, value_name = "SECS")]
    exit_after: Option<f64>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let (w, h) = a
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<f32>().ok()?, h.parse::<f32>().ok()?)))
        .ok_or_else(|| anyhow!("--size takes WIDTHxHEIGHT, e.g. 1280x800"))?;
    let source = if let Some(path) = &a.replay {
        let mut r = Replay::open(path)?;
        r.speed = a.speed.max(0.01);
        r.looping = a.looping;
        r.playing = !a.paused;
        Source::Replay(Box::new(r))
    } else if let Some(url) = &a.attach {
        Source::Attach(
            Attach::start(url, a.api_key.clone(), || {}).context("cannot start the reader")?,
        )
    } else {
        let backend = BackendChoice::parse(&a.backend).ok_or_else(|| {
            anyhow!(
                "unknown backend `{}` (expected cpu, cuda or wgpu)",
                a.backend
            )
        })?;
        if !COMPILED.contains(&backend.name()) {
            bail!(
                "the {0} backend is not compiled into this binary (rebuild with --features {0})",
                backend.name()
            );
        }
        let memory_budget = match &a.memory_budget {
            Some(s) => Some(
                pagoda::plan::parse_bytes(s)
                    .ok_or_else(|| anyhow!("cannot parse memory budget `{s}` (try 2GiB)"))?,
            ),
            None => None,
        };
        let prompts = match &a.demo_prompts {
            Some(p) => read_prompts(p)
                .with_context(|| format!("cannot read prompts file {}", p.display()))?,
            None => Vec::new(),
        };
        let opts = EngineOptions {
            model: a.model.clone(),
            backend,
            threads: a.threads,
            ctx: Some(a.ctx),
            max_seqs: a.max_seqs,
            memory_budget,
        };
        let model = a.model.as_ref().map_or_else(
            || "SmolLM2-135M-Instruct".to_string(),
            |p| p.display().to_string(),
        );
        Source::Local(Box::new(Local::new(
            format!("{model} on {}", backend.name()),
            load(opts),
            prompts,
        )))
    };
    let mut app = ViewerApp::new(source, !a.light);
    if let (Source::Replay(r), Some(step)) = (&mut app.source, a.start_at) {
        let frame = r
            .frames()
            .partition_point(|f| f.step_id <= step)
            .saturating_sub(1);
        r.seek(frame, &mut app.timeline);
    }
    app.exit_after = a.exit_after.map(Duration::from_secs_f64);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([w, h])
            .with_title("Pagoda viewer"),
        ..Default::default()
    };
    eframe::run_native("Pagoda viewer", options, Box::new(|_cc| Ok(Box::new(app))))
        .map_err(|e| anyhow!("the window failed: {e}"))
}
