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
    /// `data:` payloads ready to send.
    pending: VecDeque<String>,
    done: bool,
    phase: watch::Receiver<Phase>,
}

fn data(v: &serde_json::Value) -> String {
    v.to_string()
}

impl State {
    fn chunk(
        &self,
        index: usize,
        role: bool,
        text: &str,
        lp: Option<(&[(u32, pagoda::TokenLogprobs)], usize)>,
        finish: Option<&str>,
    ) -> String {
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
                        self.pending.push_back("[DONE]".to_string());
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
    use futures_util::StreamExt;
    Sse::new(payloads(spec, sub, phase).map(|d| Ok(Event::default().data(d))))
}

/// The `data:` payloads of a streamed generation, in order.
pub fn payloads(
    spec: StreamSpec,
    sub: Submitted,
    phase: watch::Receiver<Phase>,
) -> impl Stream<Item = String> {
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
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((ev, st));
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
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pagoda::engine::RequestOutput;
    use pagoda::model::synthetic::SyntheticSpec;
    use pagoda::tokenizer::Tokenizer;
    use pagoda::{FinishReason, SeqId};
    use serde_json::Value;

    use super::*;
    use crate::server::generation::{Admissions, Choice};
    use crate::server::openai::Endpoint;
    use crate::server::shutdown::Shutdown;

    fn spec(endpoint: Endpoint, n: usize) -> StreamSpec {
        let gguf = SyntheticSpec::tiny().header_file().unwrap();
        StreamSpec {
            meta: ResponseMeta {
                id: "x-1".into(),
                created: 0,
                model: "tiny".into(),
                endpoint,
            },
            tokenizer: Arc::new(Tokenizer::from_gguf(&gguf).unwrap()),
            n,
            include_usage: true,
            logprobs: false,
        }
    }

    fn ev(token: Option<u32>, text: &str, finished: Option<FinishReason>) -> RequestOutput {
        RequestOutput {
            id: SeqId(0),
            token,
            text: text.into(),
            finished,
            logprobs: None,
        }
    }

    /// Runs a stream over `events` (sent before it starts) to its end; the
    /// engine's side of the channel closes after them when `close`.
    fn run(
        endpoint: Endpoint,
        choices: usize,
        events: Vec<(usize, RequestOutput)>,
        shutdown: &Shutdown,
        close: bool,
    ) -> Vec<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for e in events {
            tx.send(e).unwrap();
        }
        let _open = (!close).then_some(tx);
        let admissions = Arc::new(Admissions::new(choices));
        let sub = Submitted::for_test(
            vec![Choice { prompt_tokens: 3 }; choices],
            rx,
            admissions.admit(choices).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            use futures_util::StreamExt;
            payloads(spec(endpoint, choices), sub, shutdown.watch())
                .collect::<Vec<String>>()
                .await
        });
        assert_eq!(admissions.held(), 0, "the stream's places are given back");
        out
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn two_choices_then_usage_then_done() {
        let out = run(
            Endpoint::Chat,
            2,
            vec![
                (1, ev(Some(5), "b", None)),
                (0, ev(Some(6), "a", Some(FinishReason::Length))),
                (1, ev(Some(7), "", Some(FinishReason::Eog))),
            ],
            &Shutdown::default(),
            true,
        );
        // Two role chunks, b, a, a's finish, b's finish, usage, [DONE].
        assert_eq!(out.len(), 8, "{out:#?}");
        assert_eq!(json(&out[0])["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(json(&out[2])["choices"][0]["delta"]["content"], "b");
        assert_eq!(json(&out[4])["choices"][0]["finish_reason"], "length");
        assert_eq!(json(&out[5])["choices"][0]["finish_reason"], "stop");
        let usage = json(&out[6]);
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(
            usage["usage"]["prompt_tokens"], 3,
            "once per prompt, not per choice"
        );
        assert_eq!(out[7], "[DONE]");
    }

    #[test]
    fn a_failed_request_ends_the_stream_with_an_error_and_no_done() {
        let out = run(
            Endpoint::Completion,
            1,
            vec![
                (0, ev(Some(5), "x", None)),
                (0, ev(None, "", Some(FinishReason::Error("boom".into())))),
            ],
            &Shutdown::default(),
            true,
        );
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(json(&out[0])["choices"][0]["text"], "x");
        let e = json(&out[1]);
        assert!(
            e["error"]["message"].as_str().unwrap().contains("boom"),
            "{e}"
        );
        assert_eq!(e["error"]["type"], "server_error");
    }

    #[test]
    fn a_vanished_engine_or_a_cancel_ends_the_stream_with_an_error() {
        // The engine's side closed before the request finished.
        let out = run(
            Endpoint::Completion,
            1,
            vec![(0, ev(Some(5), "x", None))],
            &Shutdown::default(),
            true,
        );
        assert_eq!(json(out.last().unwrap())["error"]["code"], "unavailable");
        // Cancelled at shutdown: the error event names it.
        let shutdown = Shutdown::default();
        shutdown.set(Phase::Cancelled);
        let out = run(Endpoint::Completion, 1, vec![], &shutdown, false);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(json(&out[0])["error"]["code"], "server_shutdown");
    }
}
