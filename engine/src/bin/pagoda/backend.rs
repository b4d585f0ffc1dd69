//! Which backend runs: the one place the CLI names a backend.
//!
//! The engine is generic over `B: Backend`; this file turns `--backend NAME`
//! into a concrete backend with one `match` ([`with_backend!`]). Every
//! backend Pagoda knows is in [`KNOWN_BACKENDS`]; only those compiled into
//! this binary are [`BackendKind`] variants, so `--help` lists just those,
//! and naming a known backend that is not compiled in is one clear error
//! (`the cuda backend is not compiled into this binary (rebuild with
//! --features cuda)`), not clap's list of possible values.
//!
//! Adding a backend (as CUDA was): a `cuda = ["dep:pagoda-cuda"]` feature in
//! `engine/Cargo.toml`, a `#[cfg(feature = "cuda")] Cuda` variant below (and
//! in [`BackendKind::value_variants`]), and one arm in [`with_backend!`].

use clap::ValueEnum;
use clap::builder::{EnumValueParser, PossibleValue, TypedValueParser};

/// Every backend Pagoda knows, compiled in or not: (name, cargo feature).
pub const KNOWN_BACKENDS: &[(&str, &str)] = &[("cpu", "cpu"), ("cuda", "cuda"), ("wgpu", "wgpu")];

/// A backend compiled into this binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference backend (always compiled in).
    Cpu,
    /// The CUDA backend (feature `cuda`, on by default).
    #[cfg(feature = "cuda")]
    Cuda,
    /// The wgpu backend (feature `wgpu`, on by default).
    #[cfg(feature = "wgpu")]
    Wgpu,
}

impl BackendKind {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => "cuda",
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => "wgpu",
        }
    }
}

impl ValueEnum for BackendKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            BackendKind::Cpu,
            #[cfg(feature = "cuda")]
            BackendKind::Cuda,
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            BackendKind::Cpu => PossibleValue::new("cpu").help("the CPU reference backend"),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                PossibleValue::new("cuda").help("an NVIDIA GPU through CUDA (device 0)")
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => PossibleValue::new("wgpu")
                .help("any GPU through wgpu (Vulkan, Metal, DX12); --adapter picks one"),
        })
    }
}

/// What `--backend` named: a compiled-in backend, or a known one that is not
/// compiled in (an error when a command needs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendArg {
    /// Compiled in.
    Compiled(BackendKind),
    /// Known but not compiled in.
    NotCompiled {
        /// Its name.
        name: &'static str,
        /// The cargo feature that compiles it in.
        feature: &'static str,
    },
}

impl BackendArg {
    /// The compiled-in backend, or the error that says how to get it.
    pub fn kind(self) -> anyhow::Result<BackendKind> {
        match self {
            BackendArg::Compiled(k) => Ok(k),
            BackendArg::NotCompiled { name, feature } => Err(not_compiled(name, feature)),
        }
    }
}

/// The error for a known backend that is not compiled in.
pub fn not_compiled(name: &str, feature: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the {name} backend is not compiled into this binary (rebuild with --features {feature})"
    )
}

/// Known backends that are not compiled in: (name, feature).
pub fn not_compiled_backends() -> impl Iterator<Item = (&'static str, &'static str)> {
    KNOWN_BACKENDS
        .iter()
        .copied()
        .filter(|(n, _)| !BackendKind::value_variants().iter().any(|k| k.name() == *n))
}

/// Parses `--backend`: compiled-in names through clap's enum parser (so
/// unknown names get clap's usual error), known-but-absent ones to
/// [`BackendArg::NotCompiled`].
#[derive(Debug, Clone, Copy)]
pub struct BackendParser;

impl TypedValueParser for BackendParser {
    type Value = BackendArg;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<BackendArg, clap::Error> {
        if let Some(text) = value.to_str()
            && let Some((name, feature)) =
                not_compiled_backends().find(|(n, _)| n.eq_ignore_ascii_case(text))
        {
            return Ok(BackendArg::NotCompiled { name, feature });
        }
        EnumValueParser::<BackendKind>::new()
            .parse_ref(cmd, arg, value)
            .map(BackendArg::Compiled)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            BackendKind::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}

/// Runs `$body` with `$b` bound to an `Arc` of the backend `$kind` names,
/// built with `$threads` CPU threads. The one `match` on the backend; `$body`
/// is compiled once per backend (it is generic code over `B: Backend`).
/// Needs a function returning `anyhow::Result`.
macro_rules! with_backend {
    ($kind:expr, $threads:expr, |$b:ident| $body:expr) => {
        match $kind {
            $crate::backend::BackendKind::Cpu => {
                let $b = ::std::sync::Arc::new(::pagoda_cpu::CpuBackend::new($threads)?);
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => {
                let $b = ::std::sync::Arc::new($crate::backend::cuda_backend()?);
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::BackendKind::Wgpu => {
                let $b = ::std::sync::Arc::new($crate::backend::wgpu_backend()?);
                $body
            }
        }
    };
}

/// `--adapter`: a case-insensitive substring of the wgpu adapter's name (set once by
/// `main`).
pub static ADAPTER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The wgpu backend on the adapter `--adapter` names (or wgpu's preferred one), with the
/// features `PAGODA_WGPU_MASK` leaves on, or why there is none.
#[cfg(feature = "wgpu")]
pub fn wgpu_backend() -> anyhow::Result<pagoda_wgpu::WgpuBackend> {
    let opts = pagoda_wgpu::WgpuOptions {
        adapter: ADAPTER.get().cloned().flatten(),
        ..pagoda_wgpu::WgpuOptions::from_env()
    };
    let b = pagoda_wgpu::WgpuBackend::new(&opts)
        .map_err(|e| anyhow::anyhow!("the wgpu backend has no device: {e}"))?;
    b.warm_up()
        .map_err(|e| anyhow::anyhow!("the wgpu backend cannot build its pipelines: {e}"))?;
    Ok(b)
}

/// The CUDA backend of device 0, or why there is none (no driver, no GPU,
/// no NVRTC) as one error.
#[cfg(feature = "cuda")]
pub fn cuda_backend() -> anyhow::Result<pagoda_cuda::CudaBackend> {
    pagoda_cuda::CudaBackend::new(0)
        .map_err(|e| anyhow::anyhow!("the cuda backend has no device: {e}"))
}
