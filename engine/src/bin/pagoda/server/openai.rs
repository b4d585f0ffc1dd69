//! The OpenAI request bodies, read field by field: what each field may hold,
//! the 400 that names a field of the wrong type or range, and the known
//! fields whose values Pagoda does not support (also a 400 naming the field).
//! Unknown fields are ignored: the official client sends many.
//!
//! Defaults follow OpenAI's: temperature 1, top-p 1, no top-k, no min-p;
//! `max_tokens` 16 for `/v1/completions` and what the context leaves for
//! chat. Extensions (as vLLM names them): `top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`.

use pagoda::MAX_TOP_LOGPROBS;
use pagoda::chat::Message;
use pagoda::sampler::SamplingParams;
use serde_json::{Map, Value};

use crate::server::error::ApiError;

/// Most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// Most stop strings.
pub const MAX_STOP: usize = 16;

/// Which route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

/// One prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text (chat: the rendered template).
    Text(String),
    /// Token ids (`/v1/completions` only).
    Tokens(Vec<u32>),
}

/// A parsed, checked generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The route.
    pub endpoint: Endpoint,
    /// `model`, if given.
    pub model: Option<String>,
    /// Chat messages (chat only).
    pub messages: Vec<Message>,
    /// Prompts (completions only; chat fills one after rendering).
    pub prompts: Vec<PromptInput>,
    /// `max_completion_tokens` / `max_tokens`, if given.
    pub max_tokens: Option<usize>,
    /// The name of the field it came from.
    pub max_tokens_param: &'static str,
    /// Choices per prompt.
    pub n: usize,
    /// Server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling (seed filled in when none was given).
    pub sampling: SamplingParams,
    /// Whether `seed` was given.
    pub seed: Option<u64>,
    /// Alternatives per token when log-probabilities are wanted.
    pub logprobs: Option<usize>,
    /// Keep generating after end-of-generation tokens (extension).
    pub ignore_eos: bool,
}

/// A JSON object's fields, read with messages that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// The value, `None` when absent or `null`.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn f64(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a number, got {v}"))),
        }
    }

    fn uint(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(k, format!("`{k}` must be a non-negative integer, got {v}"))
            }),
        }
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a boolean, got {v}"))),
        }
    }

    fn str(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a string, got {v}"))),
        }
    }
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(
        param,
        format!("`{param}`: {what} is not supported by this server"),
    )
    .with_code("unsupported_value")
}

/// Parses a request body: malformed JSON and a body that is not an object
/// are 400s, as is every field of the wrong type or range.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<GenRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not valid JSON: {e}"),
            Some("invalid_json"),
        )
    })?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
            Some("invalid_json"),
        ));
    };
    let f = Fields(map);
    refuse_unsupported(&f, endpoint)?;

    let model = f.str("model")?.map(str::to_string);
    let (messages, prompts) = match endpoint {
        Endpoint::Chat => (parse_messages(f.get("messages"))?, Vec::new()),
        Endpoint::Completion => (Vec::new(), parse_prompt(f.get("prompt"))?),
    };

    let (max_tokens, max_tokens_param) = match f.uint("max_completion_tokens")? {
        Some(v) => (Some(v), "max_completion_tokens"),
        None => (f.uint("max_tokens")?, "max_tokens"),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            max_tokens_param,
            format!("`{max_tokens_param}` must be at least 1"),
        ));
    }
    let n = f.uint("n")?.unwrap_or(1);
    if !(1..=MAX_N as u64).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in 1..={MAX_N}, got {n}"),
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|e| ApiError {
                param: Some("stream_options.include_usage".into()),
                ..e
            })?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, got {v}"),
            ));
        }
    };

    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("stop", format!("`stop` entries must be strings, got {v}"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` must be a string or an array of strings, got {v}"),
            ));
        }
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop string cannot be empty"));
    }

    let temperature = f.f64("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.f64("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match f.get("top_k").and_then(Value::as_i64) {
        // vLLM's convention: -1 means off.
        Some(-1) => 0,
        _ => f.uint("top_k")?.unwrap_or(0) as usize,
    };
    let min_p = f.f64("min_p")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("`min_p` must be in [0, 1], got {min_p}"),
        ));
    }
    let repeat_penalty = f.f64("repetition_penalty")?.unwrap_or(1.0);
    if !(repeat_penalty.is_finite() && repeat_penalty > 0.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be > 0, got {repeat_penalty}"),
        ));
    }
    let seed = match f.get("seed") {
        None => None,
        // Negative seeds (the client allows them) are taken bit for bit.
        Some(v) => Some(v.as_i64().map(|s| s as u64).or(v.as_u64()).ok_or_else(|| {
            ApiError::invalid("seed", format!("`seed` must be an integer, got {v}"))
        })?),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        min_p: min_p as f32,
        repeat_penalty: repeat_penalty as f32,
        repeat_last_n: SamplingParams::default().repeat_last_n,
        seed: seed.unwrap_or(0),
    };

    let logprobs = match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.uint("top_logprobs")?;
            match (on, top) {
                (false, Some(_)) => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs` set to true",
                    ));
                }
                (false, None) => None,
                (true, t) => Some(t.unwrap_or(0)),
            }
        }
        Endpoint::Completion => f.uint("logprobs")?,
    };
    if let Some(k) = logprobs
        && k > MAX_TOP_LOGPROBS as u64
    {
        let param = match endpoint {
            Endpoint::Chat => "top_logprobs",
            Endpoint::Completion => "logprobs",
        };
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be at most {MAX_TOP_LOGPROBS}, got {k}"),
        ));
    }
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);

    Ok(GenRequest {
        endpoint,
        model,
        messages,
        prompts,
        max_tokens: max_tokens.map(|m| m.min(usize::MAX as u64) as usize),
        max_tokens_param,
        n: n as usize,
        stream,
        include_usage,
        stop,
        sampling,
        seed,
        logprobs: logprobs.map(|k| k as usize),
        ignore_eos,
    })
}

/// Known fields whose values this server cannot honour: a 400 naming the
/// field rather than a silently different answer.
fn refuse_unsupported(f: &Fields, endpoint: Endpoint) -> Result<(), ApiError> {
    let nonempty = |k: &str| match f.get(k) {
        None => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    for k in ["tools", "functions", "logit_bias", "audio", "prediction"] {
        if nonempty(k) {
            return Err(unsupported(k, "a non-empty value"));
        }
    }
    if let Some(v) = f.get("tool_choice")
        && v.as_str() != Some("none")
        && v.as_str() != Some("auto")
    {
        return Err(unsupported("tool_choice", "forcing a tool"));
    }
    if let Some(v) = f.get("function_call")
        && v.as_str() != Some("none")
        && v.as_str() != Some("auto")
    {
        return Err(unsupported("function_call", "forcing a function"));
    }
    if let Some(v) = f.get("response_format") {
        let ty = v.get("type").and_then(Value::as_str);
        if ty != Some("text") {
            return Err(unsupported(
                "response_format",
                "a response format other than {\"type\": \"text\"}",
            ));
        }
    }
    if let Some(v) = f.get("modalities")
        && v.as_array()
            .is_none_or(|a| a.iter().any(|m| m.as_str() != Some("text")))
    {
        return Err(unsupported("modalities", "an output other than text"));
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = f.f64(k)?
            && v != 0.0
        {
            return Err(unsupported(k, "a non-zero value"));
        }
    }
    if endpoint == Endpoint::Completion {
        if f.bool("echo")? == Some(true) {
            return Err(unsupported("echo", "echoing the prompt"));
        }
        if nonempty("suffix") {
            return Err(unsupported("suffix", "a suffix"));
        }
        if let Some(b) = f.uint("best_of")? {
            let n = f.uint("n")?.unwrap_or(1);
            if b != n {
                return Err(unsupported("best_of", "a value other than `n`"));
            }
        }
    }
    Ok(())
}

/// `messages`: a non-empty array of `{role, content}`; content is a string
/// or an array of text parts.
fn parse_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(v) = v else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    let Some(list) = v.as_array() else {
        return Err(ApiError::invalid(
            "messages",
            format!("`messages` must be an array, got {v}"),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}]{field}");
            let Some(obj) = m.as_object() else {
                return Err(ApiError::invalid(
                    at(""),
                    format!("a message must be an object, got {m}"),
                ));
            };
            let role = match obj.get("role") {
                Some(Value::String(r)) => r.clone(),
                Some(r) => {
                    return Err(ApiError::invalid(
                        at(".role"),
                        format!("`role` must be a string, got {r}"),
                    ));
                }
                None => {
                    return Err(ApiError::invalid(
                        at(".role"),
                        "every message needs a `role`",
                    ));
                }
            };
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let kind = p.get("type").and_then(Value::as_str);
                        match (kind, p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(unsupported(
                                    &at(&format!(".content[{j}]")),
                                    "a content part other than {\"type\": \"text\", \"text\": ...}",
                                ));
                            }
                        }
                    }
                    text
                }
                Some(c) => {
                    return Err(ApiError::invalid(
                        at(".content"),
                        format!("`content` must be a string or an array of parts, got {c}"),
                    ));
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// `prompt`: a string, an array of strings, an array of token ids, or an
/// array of arrays of token ids.
fn parse_prompt(v: Option<&Value>) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
        )
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let prompts = match v {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(|s| PromptInput::Text(s.to_string()))
                        .ok_or_else(bad)
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![PromptInput::Tokens(ids(a)?)],
            Value::Array(_) => a
                .iter()
                .map(|p| {
                    p.as_array()
                        .ok_or_else(bad)
                        .and_then(|p| ids(p))
                        .map(PromptInput::Tokens)
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if prompts.len() > MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {MAX_N} prompts in one request, got {}",
                prompts.len()
            ),
        ));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<GenRequest, ApiError> {
        parse(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_are_openais() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"x","store":false,"metadata":{"a":1}}"#).unwrap();
        assert_eq!(r.messages, vec![Message::new("user", "hi")]);
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.sampling.top_k, 0);
        assert_eq!(r.sampling.min_p, 0.0);
        assert_eq!((r.n, r.stream, r.max_tokens), (1, false, None));
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (extra, param) in [
            (r#""temperature":"hot""#, "temperature"),
            (r#""temperature":3"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""max_tokens":-1"#, "max_tokens"),
            (r#""max_completion_tokens":0"#, "max_completion_tokens"),
            (r#""n":0"#, "n"),
            (r#""stream":"yes""#, "stream"),
            (r#""stop":[1]"#, "stop"),
            (r#""seed":1.5"#, "seed"),
            (r#""top_logprobs":3"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#""tools":[{"type":"function"}]"#, "tools"),
            (
                r#""response_format":{"type":"json_object"}"#,
                "response_format",
            ),
            (r#""presence_penalty":0.5"#, "presence_penalty"),
            (
                r#""stream_options":{"include_usage":1}"#,
                "stream_options.include_usage",
            ),
        ] {
            let e = chat(&format!("{{{m},{extra}}}")).unwrap_err();
            assert_eq!(e.status, 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {e}");
        }
        assert_eq!(
            chat(r#"{"messages":[]}"#).unwrap_err().param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].content[0]")
        );
        assert_eq!(chat("{").unwrap_err().code, Some("invalid_json"));
        assert_eq!(chat("[1]").unwrap_err().code, Some("invalid_json"));
    }

    #[test]
    fn prompts_of_every_shape() {
        let p = |b: &str| parse(Endpoint::Completion, b.as_bytes()).map(|r| r.prompts);
        assert_eq!(
            p(r#"{"prompt":"a"}"#).unwrap(),
            vec![PromptInput::Text("a".into())]
        );
        assert_eq!(
            p(r#"{"prompt":[1,2]}"#).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(p(r#"{"prompt":[[1],[2]]}"#).unwrap().len(), 2);
        assert_eq!(p(r#"{"prompt":["a","b"]}"#).unwrap().len(), 2);
        assert!(p(r#"{"prompt":[1,"a"]}"#).is_err());
        assert!(p(r#"{"prompt":{}}"#).is_err());
        assert!(p(r#"{"prompt":"a","echo":true}"#).is_err());
        let r = parse(
            Endpoint::Completion,
            br#"{"prompt":"a","logprobs":5,"seed":-1}"#,
        )
        .unwrap();
        assert_eq!((r.logprobs, r.seed), (Some(5), Some(u64::MAX)));
    }
}
