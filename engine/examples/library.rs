//! The library API in a few lines (the README's example, compiled by `cargo test`).
//!
//! `cargo run --release --example library`

use std::sync::Arc;

use pagoda::sampler::SamplingParams;
use pagoda::{Engine, EngineConfig, GenerationParams};
use pagoda_cpu::CpuBackend;

fn main() -> anyhow::Result<()> {
    let mut engine = Engine::builder()
        .model(pagoda::fetch::default_model_path()?)
        .backend(Arc::new(CpuBackend::new(0)?))
        .config(EngineConfig::default())
        .build()?; // plans memory, then loads

    // Many requests at once; one forward pass per step over all of them.
    let prompts = vec![
        engine.tokenize("Once upon a time"),
        engine.tokenize("The sea"),
    ];
    let params = GenerationParams {
        max_tokens: 32,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    for c in engine.generate(prompts, params.clone())? {
        println!("{:?}: {}", c.finish_reason, c.text);
    }

    // Or drive it yourself: add requests any time, step, stream, abort.
    let (_id, rx) = engine.add_request_stream(engine.tokenize("Hello"), params)?;
    while engine.has_unfinished() {
        engine.step()?;
        for out in rx.try_iter() {
            print!("{}", out.text);
        }
    }
    println!();
    Ok(())
}
