//! The in-process source: an engine on its own thread ([`EngineHandle`]),
//! built here from `--model` / `--backend` and the memory flags.
//!
//! # Policy
//!
//! 1. A loader thread plans first: the memory plan (weights, activations,
//!    KV, graphs, headroom against the budget) is computed without reading
//!    a weight and sent to the UI at once, so it is on screen *before* the
//!    model loads (and stays there). A plan that does not fit is an error
//!    shown in its place, before anything is loaded.
//! 2. It then loads the model, spawns the engine thread and sends the
//!    handle. The UI subscribes to telemetry with memory events (a keyframe
//!    of the idle engine at once, then a step and a delta per step) through
//!    a bounded channel the engine never waits on, and drains it every frame.
//! 3. The backend is picked by one `match` here, the only place the viewer
//!    names a backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use pagoda::EngineHandle;
use pagoda::engine::{Engine, EngineConfig};
use pagoda::plan::{Budget, MemoryPlan};
use pagoda::telemetry::TelemetryEvent;
use pagoda_backend::Backend;

use crate::error::ViewerError;

/// Telemetry events the viewer's channel holds before the engine drops
/// events for it (the next memory event is then a keyframe).
pub const TELEMETRY_CAPACITY: usize = 4096;

/// Which backend runs the in-process engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The CPU reference backend.
    Cpu,
    /// CUDA (device 0).
    Cuda,
    /// wgpu (Vulkan, Metal, DX12).
    Wgpu,
}

impl BackendChoice {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Cpu => "cpu",
            BackendChoice::Cuda => "cuda",
            BackendChoice::Wgpu => "wgpu",
        }
    }

    /// Parses `cpu`, `cuda` or `wgpu`.
    pub fn parse(s: &str) -> Option<BackendChoice> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Some(BackendChoice::Cpu),
            "cuda" => Some(BackendChoice::Cuda),
            "wgpu" => Some(BackendChoice::Wgpu),
            _ => None,
        }
    }
}

/// How to build the in-process engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// GGUF file; `None` = the default model (fetched on first use).
    pub model: Option<PathBuf>,
    /// The backend.
    pub backend: BackendChoice,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Context length per sequence.
    pub ctx: Option<usize>,
    /// Sequences at once (the chats that run together).
    pub max_seqs: usize,
    /// Memory budget in bytes (`None`: 90 % of the device).
    pub memory_budget: Option<u64>,
}

impl EngineOptions {
    /// The engine settings these options give.
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            ctx: self.ctx,
            max_seqs: Some(self.max_seqs.max(1)),
            max_logits_rows: self.max_seqs.max(1),
            budget: match self.memory_budget {
                Some(b) => Budget::Bytes(b),
                None => Budget::Utilization(0.9),
            },
            ..EngineConfig::default()
        }
    }
}

/// What the loader thread reports, in order.
#[derive(Debug)]
pub enum LoadEvent {
    /// What it is doing now (fetching the default model, planning, loading).
    Status(String),
    /// The plan, before any weight is loaded.
    Planned(Box<MemoryPlan>),
    /// The engine runs.
    Ready(EngineHandle),
    /// Loading failed (the plan does not fit, no device, a bad file).
    Failed(String),
}

/// Starts the loader thread.
pub fn load(opts: EngineOptions) -> Receiver<LoadEvent> {
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new()
        .name("pagoda-viewer-load".into())
        .spawn({
            let tx = tx.clone();
            move || {
                if let Err(e) = load_on_thread(&opts, &tx) {
                    let _ = tx.send(LoadEvent::Failed(e.to_string()));
                }
            }
        });
    if let Err(e) = spawned {
        let _ = tx.send(LoadEvent::Failed(format!(
            "cannot start the loader thread: {e}"
        )));
    }
    rx
}

fn load_on_thread(opts: &EngineOptions, tx: &Sender<LoadEvent>) -> Result<(), ViewerError> {
    let model = match &opts.model {
        Some(p) => p.clone(),
        None => {
            let _ = tx.send(LoadEvent::Status(
                "fetching the default model (first use only)".into(),
            ));
            pagoda::fetch::default_model_path().map_err(|e| ViewerError::Fetch(e.to_string()))?
        }
    };
    let _ = tx.send(LoadEvent::Status(format!(
        "starting the {} backend",
        opts.backend.name()
    )));
    match opts.backend {
        BackendChoice::Cpu => {
            let b =
                pagoda_cpu::CpuBackend::new(opts.threads).map_err(|e| ViewerError::Backend {
                    name: "cpu",
                    message: e.to_string(),
                })?;
            build(Arc::new(b), model, opts, tx)
        }
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => {
            let b = pagoda_cuda::CudaBackend::new(0).map_err(|e| ViewerError::Backend {
                name: "cuda",
                message: e.to_string(),
            })?;
            build(Arc::new(b), model, opts, tx)
        }
        #[cfg(feature = "wgpu")]
        BackendChoice::Wgpu => {
            let err = |e: pagoda_backend::BackendError| ViewerError::Backend {
                name: "wgpu",
                message: e.to_string(),
            };
            let b = pagoda_wgpu::WgpuBackend::new(&pagoda_wgpu::WgpuOptions::from_env())
                .map_err(err)?;
            b.warm_up().map_err(err)?;
            build(Arc::new(b), model, opts, tx)
        }
        #[allow(unreachable_patterns)]
        other => Err(ViewerError::NotCompiled(other.name())),
    }
}

fn build<B: Backend>(
    backend: Arc<B>,
    model: PathBuf,
    opts: &EngineOptions,
    tx: &Sender<LoadEvent>,
) -> Result<(), ViewerError> {
    let _ = tx.send(LoadEvent::Status("planning memory".into()));
    let builder = Engine::builder()
        .backend(backend)
        .config(opts.config())
        .model(&model);
    let plan = builder.plan()?;
    let _ = tx.send(LoadEvent::Planned(Box::new(plan)));
    let _ = tx.send(LoadEvent::Status(format!("loading {}", model.display())));
    let engine = builder.build()?;
    let handle = EngineHandle::spawn(engine)?;
    let _ = tx.send(LoadEvent::Ready(handle));
    Ok(())
}

/// A running in-process engine with its telemetry subscription.
#[derive(Debug)]
pub struct InProcess {
    /// The engine.
    pub handle: EngineHandle,
    telemetry: Receiver<TelemetryEvent>,
}

impl InProcess {
    /// Subscribes to the engine's telemetry (a keyframe at once).
    pub fn new(handle: EngineHandle) -> Result<InProcess, ViewerError> {
        let telemetry = handle.subscribe_telemetry(TELEMETRY_CAPACITY, true)?;
        Ok(InProcess { handle, telemetry })
    }

    /// Events received since the last call.
    pub fn drain(&self) -> impl Iterator<Item = TelemetryEvent> + '_ {
        self.telemetry.try_iter()
    }
}
