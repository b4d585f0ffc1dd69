//! `pagoda devices`: every backend Pagoda knows, whether it is compiled in,
//! and each device it finds: name, description, memory and capabilities.

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::ValueEnum;
use pagoda::plan::human;
use pagoda_backend::{Backend, DType};
use serde_json::{Value, json};

use crate::backend::{
    BackendArg, BackendKind, BackendParser, KNOWN_BACKENDS, not_compiled, not_compiled_backends,
};

/// Flags of `pagoda devices`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this backend (default: every backend).
    #[arg(long, value_parser = BackendParser)]
    pub backend: Option<BackendArg>,
    /// CPU threads the CPU backend reports (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda devices`.
pub fn exec(a: Args) -> Result<()> {
    let kinds: Vec<BackendKind> = match a.backend {
        Some(b) => vec![b.kind()?],
        None => BackendKind::value_variants().to_vec(),
    };
    let mut backends = Vec::new();
    let mut found = 0;
    for kind in kinds {
        let probe = || -> Result<Value> { with_backend!(kind, a.threads, |b| describe(b)) };
        let mut entry = match probe() {
            Ok(dev) => {
                found += 1;
                json!({ "backend": kind.name(), "compiled": true, "devices": [dev] })
            }
            Err(e) => json!({
                "backend": kind.name(), "compiled": true, "devices": [], "error": format!("{e:#}")
            }),
        };
        #[cfg(feature = "wgpu")]
        if kind == BackendKind::Wgpu {
            // Every adapter wgpu sees, the names `--adapter` matches against.
            entry["adapters"] = pagoda_wgpu::adapter_infos()
                .into_iter()
                .map(|i| json!({"name": i.name, "backend": format!("{:?}", i.backend), "device_type": format!("{:?}", i.device_type)}))
                .collect();
        }
        backends.push(entry);
    }
    if a.backend.is_none() {
        for (name, feature) in not_compiled_backends() {
            backends.push(json!({
                "backend": name,
                "compiled": false,
                "devices": [],
                "error": not_compiled(name, feature).to_string(),
                "rebuild_with": format!("--features {feature}"),
            }));
        }
    }
    debug_assert_eq!(
        KNOWN_BACKENDS.len(),
        BackendKind::value_variants().len() + not_compiled_backends().count()
    );
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({ "backends": backends }))?
        );
    } else {
        for b in &backends {
            print_backend(b);
        }
    }
    if found == 0 {
        bail!("no device found on any compiled-in backend");
    }
    Ok(())
}

/// One device's facts as JSON.
fn describe<B: Backend>(b: Arc<B>) -> Result<Value> {
    let info = b.info();
    let mem = b.memory()?;
    let names = |v: &[DType]| v.iter().map(|d| d.name()).collect::<Vec<_>>();
    Ok(json!({
        "name": format!("{}:0", info.name),
        "index": 0,
        "device": info.device,
        "total_memory_bytes": mem.total_bytes,
        "free_memory_bytes": mem.free_bytes,
        "host_memory": info.host_memory,
        "weight_dtypes": names(&info.weight_dtypes),
        "kv_dtypes": names(&info.kv_dtypes),
        "can_grow_kv": info.can_grow_kv,
        "supports_graphs": info.supports_graphs,
        "alignment": info.alignment,
        "max_buffer_bytes": info.max_buffer_bytes,
        "max_binding_bytes": info.max_binding_bytes,
        "max_top_k": info.max_top_k,
        "kv_commit_granularity_bytes": info.kv_commit_granularity,
    }))
}

fn print_backend(b: &Value) {
    let name = b["backend"].as_str().unwrap_or("?");
    if b["compiled"] != true {
        println!(
            "{name}: not compiled in (rebuild with {})",
            b["rebuild_with"].as_str().unwrap_or("its cargo feature")
        );
        return;
    }
    let devices = b["devices"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if let Some(adapters) = b["adapters"].as_array() {
        let names: Vec<String> = adapters
            .iter()
            .map(|a| {
                format!(
                    "{} ({}, {})",
                    a["name"].as_str().unwrap_or("?"),
                    a["backend"].as_str().unwrap_or("?"),
                    a["device_type"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "{name} adapters (--adapter NAME picks one): {}",
            names.join("; ")
        );
    }
    if devices.is_empty() {
        println!(
            "{name}: no device ({})",
            b["error"].as_str().unwrap_or("none found")
        );
    }
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    for d in devices {
        let bytes = |k: &str| human(d[k].as_u64().unwrap_or(0));
        println!(
            "{}: {}",
            d["name"].as_str().unwrap_or("?"),
            d["device"].as_str().unwrap_or("?")
        );
        println!(
            "  memory: {} total, {} free{}",
            bytes("total_memory_bytes"),
            bytes("free_memory_bytes"),
            if d["host_memory"] == true {
                " (host RAM)"
            } else {
                ""
            }
        );
        println!("  weight dtypes: {}", list(&d["weight_dtypes"]));
        println!("  kv dtypes: {}", list(&d["kv_dtypes"]));
        println!(
            "  can_grow_kv: {}, supports_graphs: {}, alignment: {} bytes",
            d["can_grow_kv"], d["supports_graphs"], d["alignment"]
        );
        let limit = |k: &str| match d[k].as_u64() {
            Some(u64::MAX) | None => "none".to_string(),
            Some(b) => human(b),
        };
        println!(
            "  largest buffer: {}, largest binding: {}, device top-k: {}, KV commit granule: {}",
            limit("max_buffer_bytes"),
            limit("max_binding_bytes"),
            d["max_top_k"],
            limit("kv_commit_granularity_bytes")
        );
    }
}
