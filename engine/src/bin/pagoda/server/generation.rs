//! From an HTTP request to engine requests and back: admission against the
//! queue limit, prompt checks against the context, submission through the
//! [`EngineHandle`], and one bridge thread per engine request that moves its
//! events from the engine's channel into the async world.
//!
//! Cancellation: a [`Submitted`] owns an abort guard per engine request.
//! Dropping it (a client that went away drops the response body, and with it
//! this) aborts every unfinished request at once, so its KV pages are free
//! before the engine's next step. The bridge thread would also abort at the
//! next event; the guard makes it immediate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use pagoda::engine::{GenerationParams, RequestOutput};
use pagoda::{EngineError, EngineHandle, SeqId};
use tokio::sync::mpsc;

use crate::server::error::ApiError;
use crate::server::metrics::Metrics;
use crate::server::openai::{Endpoint, GenRequest, PromptInput};

/// Engine requests the server holds (submitted, response not yet done),
/// checked against a limit when new ones arrive.
#[derive(Debug)]
pub struct Admissions {
    held: AtomicUsize,
    limit: usize,
}

impl Admissions {
    /// At most `limit` engine requests at once.
    pub fn new(limit: usize) -> Self {
        Admissions {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Engine requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `k` slots, or the 429 when they would pass the limit.
    pub fn admit(self: &Arc<Self>, k: usize) -> Result<Admission, ApiError> {
        let mut cur = self.held.load(Ordering::SeqCst);
        loop {
            if cur + k > self.limit {
                return Err(ApiError::queue_full(cur, self.limit));
            }
            match self
                .held
                .compare_exchange(cur, cur + k, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    return Ok(Admission {
                        admissions: self.clone(),
                        k,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// Slots taken by one HTTP request; given back when it is dropped (the
/// response finished or the client went away).
#[derive(Debug)]
pub struct Admission {
    admissions: Arc<Admissions>,
    k: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admissions.held.fetch_sub(self.k, Ordering::SeqCst);
    }
}

/// Aborts its engine request when dropped, unless the request finished.
#[derive(Debug)]
struct AbortOnDrop {
    handle: EngineHandle,
    id: SeqId,
    live: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.live {
            let (handle, id) = (self.handle.clone(), self.id);
            // `abort` waits for the step in flight: not on an async worker.
            let _ = std::thread::Builder::new()
                .name("pagoda-abort".into())
                .spawn(move || {
                    let _ = handle.abort(id);
                });
        }
    }
}

/// One choice of a response (index `prompt * n + j`): its prompt's token count.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Prompt tokens.
    pub prompt_tokens: usize,
}

/// The engine requests of one HTTP request, their events arriving on one channel.
#[derive(Debug)]
pub struct Submitted {
    /// The choices, by index.
    pub choices: Vec<Choice>,
    /// `(choice index, event)`, in the order the engine produced them.
    pub events: mpsc::UnboundedReceiver<(usize, RequestOutput)>,
    guards: Vec<AbortOnDrop>,
    _admission: Admission,
}

impl Submitted {
    /// A submission of `choices` whose events come from `events`, with no
    /// engine requests behind it (for the stream's tests).
    #[cfg(test)]
    pub fn for_test(
        choices: Vec<Choice>,
        events: mpsc::UnboundedReceiver<(usize, RequestOutput)>,
        admission: Admission,
    ) -> Self {
        Submitted {
            choices,
            events,
            guards: Vec::new(),
            _admission: admission,
        }
    }

    /// Marks a choice finished (its guard no longer aborts).
    pub fn finished(&mut self, index: usize) {
        if let Some(g) = self.guards.get_mut(index) {
            g.live = false;
        }
    }
}

/// Tokenizes, checks against the context, and submits every choice of `req`
/// (`n` per prompt, seeds `seed + j`). Blocking: run it off the async workers.
pub fn submit(
    handle: &EngineHandle,
    req: &GenRequest,
    admission: Admission,
    metrics: &Arc<Metrics>,
    arrived: Instant,
) -> Result<Submitted, ApiError> {
    let ctx = handle.info().ctx;
    let prompt_param = match req.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for p in &req.prompts {
        let ids = match p {
            PromptInput::Text(t) => handle.tokenize(t),
            PromptInput::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
        }
        if ids.len() >= ctx {
            return Err(ApiError::invalid(
                prompt_param,
                format!(
                    "the prompt has {} tokens; the context holds {ctx}, including at least one generated token",
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let left = ctx - ids.len();
        let max_tokens = match req.max_tokens {
            Some(m) if m > left => {
                return Err(ApiError::invalid(
                    req.max_tokens_param,
                    format!(
                        "`{}` is {m}, but the context of {ctx} tokens leaves {left} after the prompt's {}",
                        req.max_tokens_param,
                        ids.len()
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            Some(m) => m,
            None => match req.endpoint {
                Endpoint::Chat => left,
                Endpoint::Completion => left.min(16),
            },
        };
        prompts.push((ids, max_tokens));
    }

    let (tx, rx) = mpsc::unbounded_channel();
    let mut choices = Vec::new();
    let mut guards = Vec::new();
    for (p, (ids, max_tokens)) in prompts.iter().enumerate() {
        for j in 0..req.n {
            let index = p * req.n + j;
            let mut sampling = req.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(j as u64);
            let params = GenerationParams {
                max_tokens: *max_tokens,
                sampling,
                stop: req.stop.clone(),
                ignore_eog: req.ignore_eos,
                logprobs: req.logprobs,
                ..GenerationParams::default()
            };
            // Requests already submitted are aborted by their guards on error.
            let (id, stream) = handle.submit(ids.clone(), params).map_err(engine_error)?;
            guards.push(AbortOnDrop {
                handle: handle.clone(),
                id,
                live: true,
            });
            choices.push(Choice {
                prompt_tokens: ids.len(),
            });
            let tx = tx.clone();
            let handle = handle.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("pagoda-bridge".into())
                .spawn(move || bridge(handle, id, index, stream, tx, metrics, arrived))
                .map_err(|e| ApiError::internal(format!("cannot start a stream thread: {e}")))?;
        }
    }
    Ok(Submitted {
        choices,
        events: rx,
        guards,
        _admission: admission,
    })
}

/// Moves one request's events to the async side, timing its tokens.
fn bridge(
    handle: EngineHandle,
    id: SeqId,
    index: usize,
    stream: std::sync::mpsc::Receiver<RequestOutput>,
    tx: mpsc::UnboundedSender<(usize, RequestOutput)>,
    metrics: Arc<Metrics>,
    arrived: Instant,
) {
    let mut last: Option<Instant> = None;
    for ev in stream {
        if ev.token.is_some() {
            let now = Instant::now();
            match last {
                None => metrics.ttft.observe((now - arrived).as_secs_f64()),
                Some(t) => metrics.itl.observe((now - t).as_secs_f64()),
            }
            last = Some(now);
        }
        let done = ev.finished.is_some();
        if tx.send((index, ev)).is_err() {
            // Nobody reads the response any more.
            if !done {
                let _ = handle.abort(id);
            }
            return;
        }
        if done {
            return;
        }
    }
}

/// An engine refusal as the client's error: bad input is a 400, a stopped
/// engine a 503.
pub fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Stopped(_) => ApiError::unavailable(e.to_string()),
        EngineError::InvalidInput(_)
        | EngineError::EmptyPrompt
        | EngineError::TooLong { .. }
        | EngineError::ZeroMaxTokens
        | EngineError::ExceedsKvCache { .. } => ApiError::bad_request(e.to_string(), None),
        other => ApiError::internal(other.to_string()),
    }
}
