//! The commands behind the CLI.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use pagoda::chat::Message;
use pagoda::engine::{Engine, EngineConfig, GenerationParams};
use pagoda::gguf::GgufFile;
use pagoda::model::{LlamaConfig, LlamaWeights};
use pagoda::perplexity::{log_sum_exp, perplexity_config};
use pagoda::plan::{Budget, PlanRequest, human, parse_bytes, plan, table};
use pagoda::sampler::SamplingParams;
use pagoda::sequence::FinishReason;
use pagoda::tokenizer::Tokenizer;
use pagoda_backend::{Backend, DType};
use pagoda_cpu::CpuBackend;
use serde_json::json;

use crate::cli::{
    BackendKind, Cli, Command, Common, GenPrompt, MemoryArgs, PromptArgs, SamplingArgs,
};

type Cpu = CpuBackend;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            common,
            prompt,
            max_tokens,
            sampling,
            stop,
            parallel,
            trace,
            memory,
            json,
        } => generate(
            &common, &prompt, max_tokens, &sampling, stop, parallel, trace, &memory, json,
        ),
        Command::Chat {
            common,
            message,
            system,
            max_tokens,
            sampling,
            memory,
            json,
        } => chat(
            &common, message, system, max_tokens, &sampling, &memory, json,
        ),
        Command::Tokenize {
            common,
            prompt,
            no_parse_special,
        } => tokenize(&common, &prompt, no_parse_special),
        Command::Logits {
            common,
            prompt,
            memory,
            json: _,
        } => logits(&common, &prompt, &memory),
        Command::Perplexity {
            common,
            file,
            ctx,
            kv_dtype,
            json,
        } => perplexity(&common, &file, ctx, &kv_dtype, json),
        Command::Bench {
            common,
            prompt_len,
            gen_len,
            reps,
            kv_dtype,
            json,
        } => bench(&common, prompt_len, gen_len, reps, &kv_dtype, json),
        Command::Plan {
            common,
            memory,
            max_batched_tokens,
            json,
        } => plan_cmd(&common, &memory, max_batched_tokens, json),
    }
}

fn model_path(common: &Common) -> Result<PathBuf> {
    match &common.model {
        Some(p) => {
            if !p.exists() {
                bail!("model file {} does not exist", p.display());
            }
            Ok(p.clone())
        }
        None => Ok(pagoda::fetch::default_model_path()?),
    }
}

fn backend(common: &Common) -> Result<Arc<Cpu>> {
    match common.backend {
        BackendKind::Cpu => Ok(Arc::new(CpuBackend::new(common.threads)?)),
    }
}

fn kv_dtype(name: &str) -> Result<DType> {
    match DType::from_name(name) {
        Some(d @ (DType::F32 | DType::F16 | DType::Q8_0)) => Ok(d),
        _ => bail!("unknown KV dtype `{name}` (expected f32, f16 or q8_0)"),
    }
}

fn budget(m: &MemoryArgs) -> Result<Budget> {
    if let Some(b) = &m.memory_budget {
        let bytes = parse_bytes(b)
            .ok_or_else(|| anyhow!("cannot parse memory budget `{b}` (try 8GiB or 512MiB)"))?;
        return Ok(Budget::Bytes(bytes));
    }
    let u = m.gpu_memory_utilization.unwrap_or(0.9);
    if !(u > 0.0 && u <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1], got {u}");
    }
    Ok(Budget::Utilization(u))
}

fn swap_space(m: &MemoryArgs) -> Result<u64> {
    match &m.swap_space {
        None => Ok(0),
        Some(s) => parse_bytes(s)
            .ok_or_else(|| anyhow!("cannot parse swap space `{s}` (try 4GiB or 512MiB)")),
    }
}

fn engine_config(m: &MemoryArgs) -> Result<EngineConfig> {
    let budget = budget(m)?;
    let derive = matches!(budget, Budget::Bytes(_)) && m.max_seqs.is_none();
    Ok(EngineConfig {
        ctx: m.ctx,
        max_seqs: if derive {
            None
        } else {
            Some(m.max_seqs.unwrap_or(8))
        },
        kv_dtype: kv_dtype(&m.kv_dtype)?,
        budget,
        swap_space_bytes: swap_space(m)?,
        ..EngineConfig::default()
    })
}

fn build(common: &Common, cfg: EngineConfig) -> Result<Engine<Cpu>> {
    let path = model_path(common)?;
    let t = Instant::now();
    let engine = Engine::builder()
        .model(&path)
        .backend(backend(common)?)
        .config(cfg)
        .build()?;
    let p = engine.memory_plan();
    eprintln!(
        "pagoda: loaded {} in {:.2}s ({} backend: {})",
        path.display(),
        t.elapsed().as_secs_f64(),
        engine.runner().backend().info().name,
        engine.runner().backend().info().device
    );
    eprintln!(
        "pagoda: memory plan: weights {} + activations {} + KV {} ({} pages of {} tokens, {}) + headroom {} = {} of {} budget",
        human(p.weights_bytes),
        human(p.workspace_bytes),
        human(p.kv_bytes),
        p.num_pages,
        p.page_size,
        p.kv_dtype,
        human(p.headroom_bytes),
        human(p.total_bytes),
        human(p.budget_bytes)
    );
    Ok(engine)
}

fn read_prompt(p: &PromptArgs) -> Result<String> {
    read_prompt_parts(p.prompt.as_deref(), p.file.as_deref())
}

fn read_prompt_parts(prompt: Option<&str>, file: Option<&Path>) -> Result<String> {
    match (prompt, file) {
        (Some(t), _) => Ok(t.to_string()),
        (None, Some(f)) => {
            let bytes = std::fs::read(f)
                .with_context(|| format!("cannot read prompt file {}", f.display()))?;
            String::from_utf8(bytes)
                .map_err(|e| anyhow!("prompt file {} is not UTF-8: {e}", f.display()))
        }
        (None, None) => bail!("give --prompt or --file"),
    }
}

fn sampling(s: &SamplingArgs) -> SamplingParams {
    if s.greedy {
        return SamplingParams {
            seed: s.seed,
            repeat_penalty: s.repeat_penalty.unwrap_or(1.0),
            ..SamplingParams::greedy()
        };
    }
    let d = SamplingParams::default();
    SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: s.top_k.unwrap_or(d.top_k),
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        repeat_penalty: s.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: d.repeat_last_n,
        seed: s.seed,
    }
}

fn reason_str(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eog => "eog",
        FinishReason::Stop => "stop",
        FinishReason::Aborted => "aborted",
        FinishReason::Error(_) => "error",
    }
}

#[allow(clippy::too_many_arguments)]
fn generate(
    common: &Common,
    prompt: &GenPrompt,
    max_tokens: usize,
    s: &SamplingArgs,
    stop: Vec<String>,
    parallel: usize,
    trace: Option<PathBuf>,
    memory: &MemoryArgs,
    json_out: bool,
) -> Result<()> {
    if max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let prompts: Vec<String> = match &prompt.prompts {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read prompts file {}", f.display()))?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                bail!("prompts file {} has no prompts", f.display());
            }
            lines
        }
        None => {
            let p = read_prompt_parts(prompt.prompt.as_deref(), prompt.file.as_deref())?;
            vec![p; parallel]
        }
    };
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("the prompt is empty");
    }
    let mut cfg = engine_config(memory)?;
    if cfg.max_seqs.is_some() && memory.max_seqs.is_none() {
        cfg.max_seqs = Some(prompts.len().max(1));
    }
    cfg.max_logits_rows = cfg.max_seqs.unwrap_or(prompts.len()).max(prompts.len());
    let mut engine = build(common, cfg)?;
    let mut trace_rx = trace
        .as_ref()
        .map(|_| engine.telemetry().subscribe(1 << 16, true));
    let mut trace_file = match &trace {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create trace file {}", p.display()))?,
        )),
        None => None,
    };
    let params = GenerationParams {
        max_tokens,
        sampling: sampling(s),
        stop,
        ..GenerationParams::default()
    };
    let mut ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let toks = engine.tokenize(p);
        let mut params = params.clone();
        params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
        ids.push(engine.add_request(toks, params)?);
    }
    let stream = !json_out && ids.len() == 1;
    let t0 = Instant::now();
    let mut first_token_at = None;
    let mut stdout = std::io::stdout().lock();
    while engine.has_unfinished() {
        let events = engine.step()?;
        for ev in &events {
            if ev.token.is_some() && first_token_at.is_none() {
                first_token_at = Some(t0.elapsed());
            }
            if stream && !ev.text.is_empty() {
                write!(stdout, "{}", ev.text)?;
                stdout.flush()?;
            }
        }
        if let (Some(rx), Some(f)) = (trace_rx.as_mut(), trace_file.as_mut()) {
            for ev in rx.try_iter() {
                serde_json::to_writer(&mut *f, &ev)?;
                writeln!(f)?;
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(f) = trace_file.as_mut() {
        f.flush()?;
    }
    let mut completions = Vec::new();
    for id in ids {
        completions.push(
            engine
                .take_completion(id)
                .ok_or_else(|| anyhow!("request {id:?} did not finish"))?,
        );
    }
    for c in &completions {
        if let FinishReason::Error(e) = &c.finish_reason {
            bail!("request {} failed: {e}", c.id.0);
        }
    }
    let total_gen: usize = completions.iter().map(|c| c.generated_tokens.len()).sum();
    let ttft = first_token_at.map_or(0.0, |d| d.as_secs_f64());
    let decode_time = (elapsed - ttft).max(1e-9);
    let decode_tokens = total_gen.saturating_sub(completions.len());
    let tps = total_gen as f64 / elapsed.max(1e-9);
    let stats = engine.scheduler().stats();
    if json_out {
        let c = &completions[0];
        let mut doc = json!({
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "text": c.text,
            "stop_reason": reason_str(&c.finish_reason),
            "tokens_per_s": tps,
        });
        if completions.len() > 1 {
            doc["requests"] = json!(
                completions
                    .iter()
                    .map(|c| json!({
                        "prompt_tokens": c.prompt_tokens,
                        "generated_tokens": c.generated_tokens,
                        "text": c.text,
                        "stop_reason": reason_str(&c.finish_reason),
                    }))
                    .collect::<Vec<_>>()
            );
            doc["num_requests"] = json!(completions.len());
            doc["aggregate_tokens_per_s"] = json!(tps);
            doc["aggregate_decode_tokens_per_s"] = json!(decode_tokens as f64 / decode_time);
            doc["preemptions"] = json!(stats.num_preemptions);
            doc["prefix_cache_hit_tokens"] = json!(stats.num_prefix_cache_hit_tokens);
        }
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        if !stream {
            for (i, c) in completions.iter().enumerate() {
                println!(
                    "--- request {i} ({}) ---\n{}",
                    reason_str(&c.finish_reason),
                    c.text
                );
            }
        } else {
            println!();
        }
        eprintln!(
            "pagoda: {} request(s), {total_gen} tokens in {elapsed:.2}s: {tps:.1} tokens/s overall, {:.1} decode tokens/s, first token after {:.0} ms, {} preemption(s)",
            completions.len(),
            decode_tokens as f64 / decode_time,
            ttft * 1000.0,
            stats.num_preemptions
        );
    }
    Ok(())
}

fn chat(
    common: &Common,
    message: Option<String>,
    system: Option<String>,
    max_tokens: usize,
    s: &SamplingArgs,
    memory: &MemoryArgs,
    json_out: bool,
) -> Result<()> {
    let mut engine = build(common, engine_config(memory)?)?;
    let mut history: Vec<Message> = Vec::new();
    if let Some(sys) = system {
        history.push(Message::new("system", &sys));
    }
    let params = GenerationParams {
        max_tokens,
        sampling: sampling(s),
        ..GenerationParams::default()
    };
    let turn = |engine: &mut Engine<Cpu>,
                history: &mut Vec<Message>,
                text: String,
                print: bool|
     -> Result<String> {
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
        let mut answer = c.text;
        for e in eog {
            if let Some(stripped) = answer.strip_suffix(e.as_str()) {
                answer = stripped.to_string();
            }
        }
        history.push(Message::new("assistant", &answer));
        Ok(answer)
    };
    if let Some(m) = message {
        if m.is_empty() {
            bail!("the message is empty");
        }
        let answer = turn(&mut engine, &mut history, m, !json_out)?;
        if json_out {
            println!("{}", serde_json::to_string(&json!({ "reply": answer }))?);
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
            &mut history,
            line.trim_end_matches(['\n', '\r']).to_string(),
            true,
        )?;
        println!();
    }
    Ok(())
}

fn tokenize(common: &Common, p: &PromptArgs, no_parse_special: bool) -> Result<()> {
    let text = read_prompt(p)?;
    let f = GgufFile::open(model_path(common)?)?;
    let tok = Tokenizer::from_gguf(&f)?;
    let ids = tok.encode(&text, !no_parse_special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// `{argmax, top20, logsumexp, logits_0_63}` of one logits row.
fn summary(logits: &[f32]) -> serde_json::Value {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let lse = log_sum_exp(logits);
    json!({
        "argmax": idx[0],
        "top20": idx.iter().take(20).map(|&i| json!([i, logits[i]])).collect::<Vec<_>>(),
        "logsumexp": lse,
        "logits_0_63": logits.iter().take(64).collect::<Vec<_>>(),
    })
}

fn logits(common: &Common, p: &PromptArgs, memory: &MemoryArgs) -> Result<()> {
    let text = read_prompt(p)?;
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let mut cfg = engine_config(memory)?;
    cfg.max_seqs = Some(1);
    let mut engine = build(common, cfg)?;
    let toks = engine.tokenize(&text);
    let params = GenerationParams {
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        want_first_logits: true,
        ..Default::default()
    };
    let c = engine
        .generate(vec![toks], params)?
        .pop()
        .ok_or_else(|| anyhow!("no result"))?;
    if let FinishReason::Error(e) = &c.finish_reason {
        bail!("{e}");
    }
    let last = c
        .first_logits
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("no logits returned"))?;
    println!("{}", serde_json::to_string(&summary(&last))?);
    Ok(())
}

fn perplexity(common: &Common, file: &Path, ctx: usize, kv: &str, json_out: bool) -> Result<()> {
    if ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow!("{} is not UTF-8: {e}", file.display()))?;
    let cfg = EngineConfig {
        kv_dtype: kv_dtype(kv)?,
        ..perplexity_config(ctx)
    };
    let mut engine = build(common, cfg)?;
    let toks = engine.tokenize(&text);
    let r = engine.perplexity(&toks, ctx)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string(
                &json!({ "ppl": r.ppl, "n_chunks": r.n_chunks, "chunk_ppl": r.chunk_ppl })
            )?
        );
    } else {
        for (i, p) in r.chunk_ppl.iter().enumerate() {
            eprintln!("pagoda: chunk {} of {}: ppl {p:.4}", i + 1, r.n_chunks);
        }
        println!(
            "perplexity over {} chunks of {ctx} tokens: {:.4}",
            r.n_chunks, r.ppl
        );
    }
    Ok(())
}

fn bench(
    common: &Common,
    prompt_len: usize,
    gen_len: usize,
    reps: usize,
    kv: &str,
    json_out: bool,
) -> Result<()> {
    if prompt_len == 0 || gen_len == 0 || reps == 0 {
        bail!("--prompt-len, --gen-len and --reps must be at least 1");
    }
    let cfg = EngineConfig {
        ctx: Some((prompt_len + gen_len + 1).next_multiple_of(16)),
        max_seqs: Some(1),
        max_num_batched_tokens: prompt_len.max(16),
        max_logits_rows: 1,
        kv_dtype: kv_dtype(kv)?,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let mut engine = build(common, cfg)?;
    let vocab = engine.model_config().vocab_size as u32;
    // A fixed pseudo-random prompt of ordinary tokens (ids >= 17 skip control tokens).
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 17 + (i.wrapping_mul(2654435761) % (vocab - 17)))
        .collect();
    let params = GenerationParams {
        max_tokens: gen_len,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..Default::default()
    };
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    let bar = indicatif::ProgressBar::new(reps as u64 + 1);
    for rep in 0..=reps {
        let id = engine.add_request(prompt.clone(), params.clone())?;
        let t0 = Instant::now();
        engine.step()?; // the whole prompt (fits the step budget) + first token
        let t_prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        while engine.has_unfinished() {
            engine.step()?;
        }
        let t_decode = t1.elapsed().as_secs_f64();
        let c = engine
            .take_completion(id)
            .ok_or_else(|| anyhow!("bench request did not finish"))?;
        if rep > 0 {
            pp.push(prompt_len as f64 / t_prefill);
            tg.push((c.generated_tokens.len() - 1) as f64 / t_decode.max(1e-9));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (pps, tgs) = (median(&mut pp), median(&mut tg));
    let info = engine.runner().backend().info().clone();
    let doc = json!({
        "backend": info.name,
        "device": info.device,
        "threads": engine.runner().backend().as_ref().num_threads(),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "reps": reps,
        "kv_dtype": kv,
        "prefill_tokens_per_s": pps,
        "decode_tokens_per_s": tgs,
        "prefill_runs": pp,
        "decode_runs": tg,
    });
    if json_out {
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        println!(
            "pp{prompt_len}: {pps:.1} tokens/s   tg{gen_len}: {tgs:.1} tokens/s   ({}, median of {reps})",
            info.device
        );
    }
    Ok(())
}

fn plan_cmd(
    common: &Common,
    m: &MemoryArgs,
    max_batched_tokens: usize,
    json_out: bool,
) -> Result<()> {
    let path = model_path(common)?;
    let f = GgufFile::open(&path)?;
    let cfg = LlamaConfig::from_gguf(&f)?;
    let weights = LlamaWeights::planned_bytes(&f, &cfg)?;
    let backend = backend(common)?;
    let budget = budget(m)?;
    let req = PlanRequest {
        ctx: Some(m.ctx.unwrap_or(cfg.context_len)),
        max_seqs: match (budget, m.max_seqs) {
            (Budget::Bytes(_), None) => None,
            (_, s) => Some(s.unwrap_or(8)),
        },
        kv_dtype: kv_dtype(&m.kv_dtype)?,
        page_size: 16,
        max_num_batched_tokens: max_batched_tokens,
        max_logits_rows: m.max_seqs.unwrap_or(8),
        budget,
    };
    if let Some(c) = m.ctx
        && c > cfg.context_len
    {
        bail!(
            "--ctx {c} is longer than the model's training context {}",
            cfg.context_len
        );
    }
    let swap_bytes = swap_space(m)?;
    match plan(&cfg, weights, &req, backend.memory()?, backend.info()) {
        Ok(mut p) => {
            p.set_swap_space(swap_bytes);
            if json_out {
                let mut doc = serde_json::to_value(&p)?;
                doc["fits"] = json!(true);
                println!("{}", serde_json::to_string(&doc)?);
            } else {
                println!(
                    "memory plan for {} on {} ({}):\n{}",
                    path.display(),
                    p.backend,
                    backend.info().device,
                    table(&p)
                );
            }
            Ok(())
        }
        Err(e) => {
            if json_out {
                let mut doc = serde_json::to_value(&*e.plan)?;
                doc["fits"] = json!(false);
                doc["error"] = json!(e.message);
                println!("{}", serde_json::to_string(&doc)?);
            }
            Err(anyhow!(e.message))
        }
    }
}
