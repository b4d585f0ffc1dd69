//! Streamed generations: OpenAI's server-sent events (`data: {chunk}` ...
//! `data: [DONE]`), built as the engine's events arrive.
//!
//! The stream owns the [`Submitted`] requests: when the client goes away,
//! hyper drops the stream, and with it the abort guards, so the engine
//! requests end at once. A failed request (or one cancelled at shutdown)
//! ends the stream with an `{"error": ...}` event and no `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use futures_util::Stream;
use pagoda::tokenizer::Tokenizer;
use tokio::sync::watch;

use crate::server::generation::Submitted;
use crate::server::responses::{self, ChoiceState, ResponseMeta, finish_reason};
use crate::server::shutdown::{Phase, reached};

/// What the stream needs to build its chunks.
#[derive(Debug)]
pub struct StreamSpec {
    /// Names of the response.
    pub meta: ResponseMeta,
    /// For token strings in log-probabilities.
    pub tokenizer: Arc<Tokenizer>,
    /// Choices per prompt.
    pub n: usize,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whether log-probabilities were asked for.
    pub logprobs: bool,
}

struct State {
    spec: StreamSpec,
    sub: Submitted,
    choices: Vec<ChoiceState>,
    open: usize,
    pending: VecDeque<Event>,
    done: bool,
    phase: watch::Receiver<Phase>,
}

fn data(v: &serde_json::Value) -> Event {
    Event::default().data(v.to_string())
}

impl State {
    fn chunk(
        &self,
        index: usize,
        role: bool,
        text: &str,
        lp: Option<(&[(u32, pagoda::TokenLogprobs)], usize)>,
        finish: Option<&str>,
    ) -> Event {
        data(&responses::chunk(
            &self.spec.meta,
            &self.spec.tokenizer,
            index,
            role,
            text,
            lp,
            finish,
            self.spec.include_usage,
        ))
    }

    fn fail(&mut self, e: crate::server::error::ApiError) {
        self.pending.push_back(data(&e.body()));
        self.done = true;
    }

    fn on_event(&mut self, index: usize, ev: pagoda::RequestOutput) {
        let Some(c) = self.choices.get_mut(index) else {
            return;
        };
        let offset = c.text.len();
        let added = c.push(&ev);
        let finish = c.finish.clone();
        if !ev.text.is_empty() || added.is_some() {
            let lp = added.map(|a| vec![a]);
            let ev = self.chunk(
                index,
                false,
                &ev.text,
                lp.as_deref()
                    .filter(|_| self.spec.logprobs)
                    .map(|l| (l, offset)),
                None,
            );
            self.pending.push_back(ev);
        }
        if let Some(f) = finish {
            self.sub.finished(index);
            match finish_reason(&f) {
                Ok(reason) => {
                    let ev = self.chunk(index, false, "", None, Some(reason));
                    self.pending.push_back(ev);
                    self.open -= 1;
                    if self.open == 0 {
                        if self.spec.include_usage {
                            let u =
                                responses::usage_chunk(&self.spec.meta, &self.choices, self.spec.n);
                            self.pending.push_back(data(&u));
                        }
                        self.pending.push_back(Event::default().data("[DONE]"));
                        self.done = true;
                    }
                }
                Err(e) => self.fail(e),
            }
        }
    }
}

/// The SSE response of a streamed generation.
pub fn sse(
    spec: StreamSpec,
    sub: Submitted,
    phase: watch::Receiver<Phase>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let choices = ChoiceState::for_choices(&sub.choices);
    let mut st = State {
        open: choices.len(),
        choices,
        spec,
        sub,
        pending: VecDeque::new(),
        done: false,
        phase,
    };
    if st.spec.meta.endpoint == crate::server::openai::Endpoint::Chat {
        for i in 0..st.choices.len() {
            let ev = st.chunk(i, true, "", None, None);
            st.pending.push_back(ev);
        }
    }
    let s = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let got = tokio::select! {
                got = st.sub.events.recv() => got,
                _ = reached(&mut st.phase, Phase::Cancelled) => {
                    st.fail(crate::server::error::ApiError::unavailable(
                        "the request was cancelled: the server is shutting down",
                    ).with_code("server_shutdown"));
                    continue;
                }
            };
            match got {
                Some((index, ev)) => st.on_event(index, ev),
                None => st.fail(crate::server::error::ApiError::unavailable(
                    "the engine has stopped",
                )),
            }
        }
    });
    Sse::new(s)
}
