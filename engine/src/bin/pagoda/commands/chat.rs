//! `pagoda chat`: turns with the model's chat template, one (`--message`) or
//! interactive.

use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use pagoda::chat::Message;
use pagoda::engine::{Completion, Engine, GenerationParams};
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs, SamplingArgs};
use crate::setup::{ModelSource, build, engine_config, model_source, reason_str, sampling};

/// Flags of `pagoda chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// One user turn, answered, then exit.
    #[arg(long)]
    pub message: Option<String>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Print one JSON document (with --message).
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda chat`.
pub fn exec(a: Args) -> Result<()> {
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, backend: Arc<B>) -> Result<()> {
    let mut engine = build(source, backend, engine_config(&a.memory, 1)?)?;
    let mut history: Vec<Message> = Vec::new();
    if let Some(sys) = &a.system {
        history.push(Message::new("system", sys));
    }
    let params = GenerationParams {
        max_tokens: a.max_tokens,
        sampling: sampling(&a.sampling),
        ..GenerationParams::default()
    };
    if let Some(m) = &a.message {
        if m.is_empty() {
            bail!("the message is empty");
        }
        let (answer, c) = turn(&mut engine, &params, &mut history, m.clone(), !a.json)?;
        if a.json {
            let doc = json!({
                "reply": answer,
                "stop_reason": reason_str(&c.finish_reason),
                "prompt_tokens": c.prompt_tokens.len(),
                "generated_tokens": c.generated_tokens.len(),
                "seed": params.sampling.seed,
            });
            println!("{}", serde_json::to_string(&doc)?);
        } else {
            println!();
        }
        return Ok(());
    }
    eprintln!("pagoda chat: type a message, empty line or Ctrl-D to quit");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        turn(
            &mut engine,
            &params,
            &mut history,
            line.trim_end_matches(['\n', '\r']).to_string(),
            true,
        )?;
        println!();
    }
    Ok(())
}

/// One user turn: appends it and the answer (end-of-generation text
/// stripped) to `history`, streaming the answer to stdout when `print`.
/// Returns the answer and the request's completion.
fn turn<B: Backend>(
    engine: &mut Engine<B>,
    params: &GenerationParams,
    history: &mut Vec<Message>,
    text: String,
    print: bool,
) -> Result<(String, Completion)> {
    history.push(Message::new("user", &text));
    let prompt = engine.render_chat(history)?;
    let id = engine.add_request(engine.tokenize(&prompt), params.clone())?;
    let mut out = std::io::stdout().lock();
    while engine.has_unfinished() {
        for ev in engine.step()? {
            if ev.id == id && print && !ev.text.is_empty() {
                // The end-of-turn token's text is not part of the answer.
                let t = ev.text.replace("<|im_end|>", "");
                write!(out, "{t}")?;
                out.flush()?;
            }
        }
    }
    let c = engine
        .take_completion(id)
        .ok_or_else(|| anyhow!("chat turn did not finish"))?;
    if let FinishReason::Error(e) = &c.finish_reason {
        bail!("chat turn failed: {e}");
    }
    let eog: Vec<String> = engine
        .tokenizer()
        .eog_ids()
        .iter()
        .map(|&t| String::from_utf8_lossy(engine.tokenizer().token_bytes(t)).into_owned())
        .collect();
    let mut answer = c.text.clone();
    for e in eog {
        if let Some(stripped) = answer.strip_suffix(e.as_str()) {
            answer = stripped.to_string();
        }
    }
    history.push(Message::new("assistant", &answer));
    Ok((answer, c))
}
