//! `pagoda plan`: the file's tensor types and counts, and the memory plan,
//! computed without loading (or generating) a single weight. A tensor type
//! the backend cannot use is refused here, naming the tensor and type.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use pagoda::EngineError;
use pagoda::plan::table;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs};
use crate::setup::{ModelSource, engine_config, model_source, planning_memory, print_warnings};

/// Flags of `pagoda plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Plan for `generate --parallel N` (the default of --max-seqs).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda plan`.
pub fn exec(a: Args) -> Result<()> {
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b))
}

/// `(type name, count)` pairs as one line: `F32 61, Q4_1 210`.
fn types_line(types: &[(String, usize)]) -> String {
    let parts: Vec<String> = types.iter().map(|(t, n)| format!("{t} {n}")).collect();
    format!("tensor types: {}", parts.join(", "))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, backend: Arc<B>) -> Result<()> {
    // The reader reads every tensor type; list them before the loader's
    // checks, which refuse a type the backend lacks.
    let types = source.header()?.type_counts();
    let types_json: serde_json::Map<String, serde_json::Value> =
        types.iter().map(|(t, n)| (t.clone(), json!(n))).collect();
    if !a.json {
        println!("{}", types_line(&types));
    }
    let (model_cfg, weights) = match source.shape(backend.as_ref()) {
        Ok(shape) => shape,
        Err(e) => {
            if a.json {
                let doc = json!({
                    "fits": false,
                    "error": format!("{e:#}"),
                    "tensor_types": types_json,
                });
                println!("{}", serde_json::to_string(&doc)?);
            }
            return Err(e);
        }
    };
    // The same settings and the same planning `generate` uses.
    let cfg = engine_config(&a.memory, a.parallel)?;
    let device = planning_memory(source, backend.as_ref())?;
    match cfg.plan(&model_cfg, weights, device, backend.as_ref()) {
        Ok(p) => {
            print_warnings(&p);
            if a.json {
                let mut doc = serde_json::to_value(&p)?;
                doc["fits"] = json!(true);
                doc["tensor_types"] = json!(types_json);
                println!("{}", serde_json::to_string(&doc)?);
            } else {
                println!(
                    "memory plan for {} on {} ({}):\n{}",
                    source.name(),
                    p.backend,
                    backend.info().device,
                    table(&p)
                );
            }
            Ok(())
        }
        Err(EngineError::Plan(e)) => {
            if a.json {
                let mut doc = serde_json::to_value(&*e.plan)?;
                doc["fits"] = json!(false);
                doc["tensor_types"] = json!(types_json);
                doc["error"] = json!(e.message);
                println!("{}", serde_json::to_string(&doc)?);
            }
            Err(anyhow!(e.message))
        }
        Err(e) => Err(e.into()),
    }
}
