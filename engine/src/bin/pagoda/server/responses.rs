//! The OpenAI response bodies: whole responses, stream chunks, usage and
//! log-probabilities, for both routes.

use pagoda::FinishReason;
use pagoda::engine::{RequestOutput, TokenLogprobs};
use pagoda::tokenizer::Tokenizer;
use serde_json::{Value, json};

use crate::server::error::ApiError;
use crate::server::openai::Endpoint;

/// What a response names itself with.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `chatcmpl-N` / `cmpl-N`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The route.
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }
}

/// One choice as it accumulates.
#[derive(Debug, Clone, Default)]
pub struct ChoiceState {
    /// Text so far.
    pub text: String,
    /// Tokens generated (the end-of-generation token included).
    pub tokens: usize,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// `(token, its log-probabilities)` per generated token that is text.
    pub logprobs: Vec<(u32, TokenLogprobs)>,
    /// Set at the end.
    pub finish: Option<FinishReason>,
}

impl ChoiceState {
    /// Empty states for the choices of a submission.
    pub fn for_choices(choices: &[crate::server::generation::Choice]) -> Vec<ChoiceState> {
        choices
            .iter()
            .map(|c| ChoiceState {
                prompt_tokens: c.prompt_tokens,
                ..ChoiceState::default()
            })
            .collect()
    }

    /// Adds one event; returns the log-probabilities entry it added, if any.
    pub fn push(&mut self, ev: &RequestOutput) -> Option<(u32, TokenLogprobs)> {
        self.text.push_str(&ev.text);
        let mut added = None;
        if let Some(t) = ev.token {
            self.tokens += 1;
            // The end-of-generation token is not text: OpenAI lists no entry for it.
            if ev.finished != Some(FinishReason::Eog)
                && let Some(lp) = &ev.logprobs
            {
                self.logprobs.push((t, lp.clone()));
                added = Some((t, lp.clone()));
            }
        }
        if ev.finished.is_some() {
            self.finish = ev.finished.clone();
        }
        added
    }
}

/// OpenAI's finish reason, or the error a failed or cancelled request answers with.
pub fn finish_reason(r: &FinishReason) -> Result<&'static str, ApiError> {
    match r {
        FinishReason::Length => Ok("length"),
        FinishReason::Eog | FinishReason::Stop => Ok("stop"),
        FinishReason::Aborted => Err(ApiError::unavailable(
            "the request was cancelled: the server is shutting down",
        )
        .with_code("server_shutdown")),
        FinishReason::Error(e) => Err(ApiError::internal(format!(
            "the engine failed the request: {e}"
        ))),
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id).to_vec();
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// The chat form of log-probabilities: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tok: &Tokenizer, entries: &[(u32, TokenLogprobs)]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|(t, lp)| {
            let (s, b) = token_text(tok, *t);
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|(id, l)| {
                    let (s, b) = token_text(tok, *id);
                    json!({"token": s, "logprob": l, "bytes": b})
                })
                .collect();
            json!({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy form: `{tokens, token_logprobs, top_logprobs, text_offset}`.
fn completion_logprobs(tok: &Tokenizer, entries: &[(u32, TokenLogprobs)], offset0: usize) -> Value {
    let mut offset = offset0;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (t, lp) in entries {
        let (s, _) = token_text(tok, *t);
        offsets.push(offset);
        offset += s.len();
        tokens.push(s);
        lps.push(lp.logprob);
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|(id, l)| (token_text(tok, *id).0, json!(l)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn logprobs_json(
    endpoint: Endpoint,
    tok: &Tokenizer,
    entries: &[(u32, TokenLogprobs)],
    offset0: usize,
) -> Value {
    match endpoint {
        Endpoint::Chat => chat_logprobs(tok, entries),
        Endpoint::Completion => completion_logprobs(tok, entries, offset0),
    }
}

/// `usage` over all choices (prompt tokens counted once per prompt, as OpenAI does).
pub fn usage(choices: &[ChoiceState], n: usize) -> Value {
    let prompt: usize = choices
        .iter()
        .step_by(n.max(1))
        .map(|c| c.prompt_tokens)
        .sum();
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// A whole (non-streamed) response; a failed choice fails it.
pub fn full(
    meta: &ResponseMeta,
    tok: &Tokenizer,
    choices: &[ChoiceState],
    n: usize,
    want_logprobs: bool,
) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(choices.len());
    for (i, c) in choices.iter().enumerate() {
        let reason = finish_reason(c.finish.as_ref().unwrap_or(&FinishReason::Aborted))?;
        let lp = if want_logprobs {
            logprobs_json(meta.endpoint, tok, &c.logprobs, 0)
        } else {
            Value::Null
        };
        out.push(match meta.endpoint {
            Endpoint::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": null},
                "logprobs": lp,
                "finish_reason": reason,
            }),
            Endpoint::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": lp,
                "finish_reason": reason,
            }),
        });
    }
    let mut v = meta.envelope(false, Value::Array(out));
    v["usage"] = usage(choices, n);
    Ok(v)
}

/// A stream chunk for one choice: `text` (and, for chat, `role` in the first),
/// its log-probabilities, and the finish reason at the end.
#[allow(clippy::too_many_arguments)]
pub fn chunk(
    meta: &ResponseMeta,
    tok: &Tokenizer,
    index: usize,
    role: bool,
    text: &str,
    logprobs: Option<(&[(u32, TokenLogprobs)], usize)>,
    finish: Option<&str>,
    with_usage_field: bool,
) -> Value {
    let lp = logprobs.map_or(Value::Null, |(e, off)| {
        logprobs_json(meta.endpoint, tok, e, off)
    });
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if role || !text.is_empty() {
                delta.insert("content".into(), json!(text));
            }
            json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
        }
        Endpoint::Completion => {
            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
        }
    };
    let mut v = meta.envelope(true, json!([choice]));
    if with_usage_field {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(meta: &ResponseMeta, choices: &[ChoiceState], n: usize) -> Value {
    let mut v = meta.envelope(true, json!([]));
    v["usage"] = usage(choices, n);
    v
}
