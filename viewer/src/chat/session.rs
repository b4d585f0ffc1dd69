//! One conversation: its messages, the reply streaming in, and the engine
//! request behind it.
//!
//! Submitting and aborting go through [`EngineHandle`], whose calls wait
//! for the step in flight; both run on short-lived threads so the UI never
//! waits for the engine. Tokens arrive on the request's stream and are
//! drained every frame ([`ChatSession::poll`]).

use std::sync::mpsc::{Receiver, TryRecvError, channel};

use pagoda::chat::Message;
use pagoda::engine::RequestOutput;
use pagoda::{EngineHandle, FinishReason, SeqId};

use crate::chat::settings::ChatSettings;

type Submitted = pagoda::Result<(SeqId, Receiver<RequestOutput>)>;

/// Where the conversation's current request is.
#[derive(Debug, Default)]
enum Request {
    /// No request.
    #[default]
    Idle,
    /// Submitted; waiting for the engine's answer.
    Submitting(Receiver<Submitted>),
    /// Streaming.
    Streaming {
        id: SeqId,
        stream: Receiver<RequestOutput>,
    },
}

/// One chat tab.
#[derive(Debug)]
pub struct ChatSession {
    /// Tab title.
    pub title: String,
    /// The conversation; the last assistant message grows while streaming.
    pub messages: Vec<Message>,
    /// The text being typed.
    pub input: String,
    /// Sampling settings.
    pub settings: ChatSettings,
    request: Request,
    /// The engine sequence of the latest reply (its colour in every view).
    pub seq: Option<SeqId>,
    /// How the latest reply ended, or an error.
    pub status: String,
    /// Tokens of the latest reply so far.
    pub reply_tokens: usize,
}

impl ChatSession {
    /// An empty chat.
    pub fn new(title: String, settings: ChatSettings) -> ChatSession {
        ChatSession {
            title,
            messages: Vec::new(),
            input: String::new(),
            settings,
            request: Request::Idle,
            seq: None,
            status: String::new(),
            reply_tokens: 0,
        }
    }

    /// Whether a reply is being generated (or submitted).
    pub fn busy(&self) -> bool {
        !matches!(self.request, Request::Idle)
    }

    /// Sends `text` as the user's next message and starts the reply.
    pub fn send(&mut self, handle: &EngineHandle, text: String) {
        if self.busy() || text.trim().is_empty() {
            return;
        }
        self.messages.push(Message::new("user", &text));
        let mut convo = Vec::new();
        if !self.settings.system.trim().is_empty() {
            convo.push(Message::new("system", &self.settings.system));
        }
        convo.extend(self.messages.iter().cloned());
        let prompt = match handle.render_chat(&convo) {
            Ok(p) => p,
            // A model without a chat template: the plain text.
            Err(_) => text,
        };
        self.messages.push(Message::new("assistant", ""));
        self.reply_tokens = 0;
        self.status = "submitting".into();
        let (tx, rx) = channel();
        let h = handle.clone();
        let params = self.settings.params();
        let spawned = std::thread::Builder::new()
            .name("pagoda-viewer-submit".into())
            .spawn(move || {
                let _ = tx.send(h.submit(prompt, params));
            });
        match spawned {
            Ok(_) => self.request = Request::Submitting(rx),
            Err(e) => self.status = format!("cannot submit: {e}"),
        }
    }

    /// Stops the reply being generated (its pages are freed at once).
    pub fn stop(&mut self, handle: &EngineHandle) {
        if let Request::Streaming { id, .. } = &self.request {
            let (h, id) = (handle.clone(), *id);
            let _ = std::thread::Builder::new()
                .name("pagoda-viewer-abort".into())
                .spawn(move || {
                    let _ = h.abort(id);
                });
            self.status = "stopping".into();
        }
    }

    /// Takes what arrived: the engine's answer to a submission, tokens.
    /// Returns whether anything changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        if let Request::Submitting(rx) = &self.request {
            match rx.try_recv() {
                Ok(Ok((id, stream))) => {
                    self.seq = Some(id);
                    self.status = "generating".into();
                    self.request = Request::Streaming { id, stream };
                    changed = true;
                }
                Ok(Err(e)) => {
                    self.status = format!("refused: {e}");
                    self.messages.pop();
                    self.request = Request::Idle;
                    return true;
                }
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => {
                    self.status = "the engine stopped".into();
                    self.request = Request::Idle;
                    return true;
                }
            }
        }
        let Request::Streaming { stream, .. } = &self.request else {
            return changed;
        };
        let mut finished = None;
        let mut gone = false;
        loop {
            match stream.try_recv() {
                Ok(out) => {
                    changed = true;
                    if out.token.is_some() {
                        self.reply_tokens += 1;
                    }
                    if let Some(m) = self.messages.last_mut() {
                        m.content.push_str(&out.text);
                    }
                    if let Some(f) = out.finished {
                        finished = Some(f);
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        if let Some(f) = finished {
            self.status = match f {
                FinishReason::Error(e) => format!("failed: {e}"),
                other => format!("{} tokens · {}", self.reply_tokens, finish_name(&other)),
            };
            self.request = Request::Idle;
        } else if gone {
            self.status = "the engine stopped".into();
            self.request = Request::Idle;
            changed = true;
        }
        changed
    }
}

fn finish_name(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "max tokens reached",
        FinishReason::Eog => "done",
        FinishReason::Stop => "stop string",
        FinishReason::Aborted => "stopped",
        FinishReason::Error(_) => "failed",
    }
}
