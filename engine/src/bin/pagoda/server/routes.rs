//! The routes and their handlers.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | a chat completion, or its SSE stream |
//! | `POST /v1/completions` | a text completion, or its SSE stream |
//! | `GET /v1/models` | the one served model |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/telemetry` | the telemetry SSE stream |
//!
//! Anything else is an OpenAI-shaped 404 (405 for a wrong method).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pagoda::EngineHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::server::auth::{ApiKey, require_key};
use crate::server::error::ApiError;
use crate::server::generation::{Admissions, Submitted, submit};
use crate::server::metrics::{self, Metrics};
use crate::server::openai::{self, Endpoint, PromptInput};
use crate::server::responses::{self, ChoiceState, ResponseMeta};
use crate::server::shutdown::{Phase, reached};
use crate::server::stream::{StreamSpec, sse};

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The engine.
    pub handle: EngineHandle,
    /// The model name `/v1/models` lists and requests may name.
    pub model: String,
    /// When the server started (Unix seconds): the model's `created`.
    pub started: u64,
    /// The queue limit and what is held.
    pub admissions: Arc<Admissions>,
    /// Latency histograms and counters.
    pub metrics: Arc<Metrics>,
    /// The shutdown phase.
    pub phase: watch::Receiver<Phase>,
    /// Largest request body, bytes.
    pub body_limit: usize,
    next_id: AtomicU64,
}

impl AppState {
    /// The shared state of a server.
    pub fn new(
        handle: EngineHandle,
        model: String,
        admissions: Arc<Admissions>,
        phase: watch::Receiver<Phase>,
        body_limit: usize,
    ) -> Self {
        AppState {
            handle,
            model,
            started: unix_now(),
            admissions,
            metrics: Arc::new(Metrics::default()),
            phase,
            body_limit,
            next_id: AtomicU64::new(1),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router, with `--api-key` checked on every route when given.
pub fn router(state: Arc<AppState>, key: Option<ApiKey>) -> Router {
    let limit = state.body_limit;
    let r = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/metrics", get(metrics_text))
        .route("/v1/telemetry", get(telemetry))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    match key {
        Some(k) => r.layer(axum::middleware::from_fn_with_state(
            Arc::new(k),
            require_key,
        )),
        None => r,
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such route (see /v1/chat/completions, /v1/completions, /v1/models, /metrics, /v1/telemetry)",
        None,
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::not_found("this route does not take that method", None)
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(st, Endpoint::Chat, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, Endpoint::Completion, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::bad_request(format!("cannot read the request body: {e}"), None)
    }
}

async fn generate(
    st: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(|e| body_error(e, st.body_limit))?;
    let mut req = openai::parse(endpoint, &body)?;
    if let Some(m) = &req.model
        && m != &st.model
    {
        return Err(ApiError::not_found(
            format!(
                "the model `{m}` does not exist; this server serves `{}`",
                st.model
            ),
            Some("model"),
        )
        .with_code("model_not_found"));
    }
    if *st.phase.borrow() != Phase::Running {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    if endpoint == Endpoint::Chat {
        let text = st
            .handle
            .render_chat(&req.messages)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        req.prompts = vec![PromptInput::Text(text)];
    }
    if req.seed.is_none() {
        req.sampling.seed = rand::random::<u32>() as u64;
    }
    let admission = st
        .admissions
        .admit(req.prompts.len() * req.n)
        .inspect_err(|_| {
            st.metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
        })?;
    let req = Arc::new(req);
    let (h, r, m) = (st.handle.clone(), req.clone(), st.metrics.clone());
    let sub = tokio::task::spawn_blocking(move || submit(&h, &r, admission, &m, arrived))
        .await
        .map_err(|e| ApiError::internal(format!("submission failed: {e}")))??;
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = ResponseMeta {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{n}"),
            Endpoint::Completion => format!("cmpl-{n}"),
        },
        created: unix_now(),
        model: st.model.clone(),
        endpoint,
    };
    if req.stream {
        let spec = StreamSpec {
            meta,
            tokenizer: st.handle.tokenizer().clone(),
            n: req.n,
            include_usage: req.include_usage,
            logprobs: req.logprobs.is_some(),
        };
        return Ok(sse(spec, sub, st.phase.clone()).into_response());
    }
    let choices = collect(sub, st.phase.clone()).await?;
    let v = responses::full(
        &meta,
        st.handle.tokenizer(),
        &choices,
        req.n,
        req.logprobs.is_some(),
    )?;
    Ok(axum::Json(v).into_response())
}

/// Waits for every choice of a non-streamed request.
async fn collect(
    mut sub: Submitted,
    mut phase: watch::Receiver<Phase>,
) -> Result<Vec<ChoiceState>, ApiError> {
    let mut choices = ChoiceState::for_choices(&sub.choices);
    let mut open = choices.len();
    while open > 0 {
        let got = tokio::select! {
            got = sub.events.recv() => got,
            _ = reached(&mut phase, Phase::Cancelled) => {
                return Err(ApiError::unavailable("the request was cancelled: the server is shutting down").with_code("server_shutdown"));
            }
        };
        let Some((i, ev)) = got else {
            return Err(ApiError::unavailable("the engine has stopped"));
        };
        if let Some(c) = choices.get_mut(i) {
            c.push(&ev);
            if ev.finished.is_some() {
                sub.finished(i);
                open -= 1;
            }
        }
    }
    Ok(choices)
}

fn model_json(st: &AppState) -> serde_json::Value {
    json!({"id": st.model, "object": "model", "created": st.started, "owned_by": "pagoda"})
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_json(&st)]})).into_response()
}

async fn model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == st.model {
        axum::Json(model_json(&st)).into_response()
    } else {
        ApiError::not_found(format!("the model `{id}` does not exist"), Some("model"))
            .with_code("model_not_found")
            .into_response()
    }
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let text = metrics::render(
        &st.handle.stats(),
        st.handle.info(),
        &st.metrics,
        st.admissions.held(),
        st.admissions.limit(),
    );
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn telemetry(State(st): State<Arc<AppState>>) -> Response {
    match crate::server::telemetry::stream(st.handle.clone(), st.phase.clone()).await {
        Ok(s) => s.into_response(),
        Err(e) => e.into_response(),
    }
}
