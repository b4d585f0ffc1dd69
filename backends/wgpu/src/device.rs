//! Picking an adapter and opening a device on it: the features the shaders may use and
//! the limits the engine must respect.

use pagoda_backend::{BackendError, Result};

/// How to open the device.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// A case-insensitive substring of the adapter's name (`pagoda devices` prints them);
    /// `None`: the adapter wgpu prefers.
    pub adapter: Option<String>,
    /// Leave `SHADER_F16` off even when the adapter has it (tests the fallback).
    pub mask_shader_f16: bool,
    /// Leave `SUBGROUP` off even when the adapter has it (tests the fallback).
    pub mask_subgroup: bool,
    /// The matmul shader; `None`: by adapter type ([`MatmulPath::for_adapter`]).
    pub matmul: Option<MatmulPath>,
}

/// Which matmul entry point of `shaders/matmul.wgsl` the backend dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPath {
    /// `matmul`: one invocation per output row (lavapipe's fastest: no barrier).
    Rows,
    /// `matmul_co`: 64 invocations per row reading consecutive words, a subgroup (or
    /// workgroup-memory) reduction (real GPUs).
    Coalesced,
}

impl MatmulPath {
    /// Rows on a CPU adapter (lavapipe), coalesced on every other.
    pub fn for_adapter(device_type: wgpu::DeviceType) -> MatmulPath {
        if device_type == wgpu::DeviceType::Cpu {
            MatmulPath::Rows
        } else {
            MatmulPath::Coalesced
        }
    }

    /// `rows` / `coalesced`.
    pub fn from_name(name: &str) -> Option<MatmulPath> {
        match name.trim().to_ascii_lowercase().as_str() {
            "rows" => Some(MatmulPath::Rows),
            "coalesced" => Some(MatmulPath::Coalesced),
            _ => None,
        }
    }

    /// The name `pagoda devices` / `plan` / `compare` report.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPath::Rows => "rows",
            MatmulPath::Coalesced => "coalesced",
        }
    }
}

/// The environment variable choosing the matmul shader (`rows` or `coalesced`; unset: by
/// adapter type).
pub const MATMUL_ENV: &str = "PAGODA_WGPU_MATMUL";

/// The environment variable that masks features: a comma-separated list of `shader-f16`
/// and `subgroup` (the CI runs the tests once without and once with both masked).
pub const MASK_ENV: &str = "PAGODA_WGPU_MASK";

impl WgpuOptions {
    /// Options from [`MASK_ENV`] (no adapter named).
    pub fn from_env() -> WgpuOptions {
        let mask = std::env::var(MASK_ENV)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let has = |f: &str| mask.split(',').any(|m| m.trim() == f);
        WgpuOptions {
            adapter: None,
            mask_shader_f16: has("shader-f16"),
            mask_subgroup: has("subgroup"),
            matmul: std::env::var(MATMUL_ENV)
                .ok()
                .and_then(|v| MatmulPath::from_name(&v)),
        }
    }
}

/// An open device and what it offers.
pub struct Gpu {
    /// The adapter's description.
    pub adapter_info: wgpu::AdapterInfo,
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The limits the device was opened with (the adapter's own).
    pub limits: wgpu::Limits,
    /// `SHADER_F16` is enabled (the adapter has it and it is not masked).
    pub shader_f16: bool,
    /// `SUBGROUP` is enabled.
    pub subgroup: bool,
    /// The matmul shader in use.
    pub matmul: MatmulPath,
}

fn no_device(detail: String) -> BackendError {
    BackendError::Device {
        op: "wgpu device",
        detail,
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu finds (Vulkan, Metal, DX12), as `(name, backend, device type)`.
pub fn adapter_infos() -> Vec<wgpu::AdapterInfo> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

/// The adapter `opts` names (or wgpu's preference), then the device on it with the
/// adapter's own limits and the features we use.
pub fn open(opts: &WgpuOptions) -> Result<Gpu> {
    let inst = instance();
    let adapter = match &opts.adapter {
        Some(name) => {
            let want = name.to_ascii_lowercase();
            let all = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
            let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
            let mut hits: Vec<wgpu::Adapter> = all
                .into_iter()
                .filter(|a| a.get_info().name.to_ascii_lowercase().contains(&want))
                .collect();
            match hits.len() {
                0 => {
                    return Err(no_device(format!(
                        "no adapter's name contains `{name}` (adapters: {})",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
                1 => hits.remove(0),
                _ => {
                    let hit_names: Vec<String> = hits.iter().map(|a| a.get_info().name).collect();
                    return Err(no_device(format!(
                        "`{name}` matches several adapters ({}); name one of them more exactly",
                        hit_names.join(", ")
                    )));
                }
            }
        }
        None => pollster::block_on(inst.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| no_device(format!("no wgpu adapter (Vulkan, Metal or DX12): {e}")))?,
    };
    let info = adapter.get_info();
    let have = adapter.features();
    let shader_f16 = have.contains(wgpu::Features::SHADER_F16) && !opts.mask_shader_f16;
    let subgroup = have.contains(wgpu::Features::SUBGROUP) && !opts.mask_subgroup;
    let mut features = wgpu::Features::empty();
    if shader_f16 {
        features |= wgpu::Features::SHADER_F16;
    }
    if subgroup {
        features |= wgpu::Features::SUBGROUP;
    }
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("pagoda"),
        required_features: features,
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| no_device(format!("{}: cannot open the device: {e}", info.name)))?;
    let matmul = opts
        .matmul
        .unwrap_or_else(|| MatmulPath::for_adapter(info.device_type));
    Ok(Gpu {
        adapter_info: info,
        device,
        queue,
        limits,
        shader_f16,
        subgroup,
        matmul,
    })
}

impl Gpu {
    /// The features the shaders are specialised for.
    pub fn shader_features(&self) -> crate::kernels::ShaderFeatures {
        crate::kernels::ShaderFeatures {
            f16: self.shader_f16,
            subgroup: self.subgroup,
        }
    }

    /// The shader features in use, as `pagoda plan` / `devices` / `compare` report them.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.shader_f16 {
            v.push("shader-f16");
        }
        if self.subgroup {
            v.push("subgroup");
        }
        v
    }

    /// The shader paths in use, as reported beside the features: the matmul entry point and
    /// its reduction, the rms_norm reduction, how halves are read.
    pub fn paths(&self) -> String {
        let red = if self.subgroup {
            "subgroupAdd"
        } else {
            "workgroup memory"
        };
        let matmul = match self.matmul {
            MatmulPath::Rows => "matmul rows (lane per row)".to_string(),
            MatmulPath::Coalesced => format!(
                "matmul coalesced ({red}; f16 weights {})",
                if self.shader_f16 {
                    "as f16"
                } else {
                    "by unpack2x16float"
                }
            ),
        };
        format!("{matmul}, rms_norm {red}, f32 arithmetic")
    }
}
