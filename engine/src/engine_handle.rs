//! A handle to an engine running on its own thread, for servers and UIs.
//!
//! [`EngineHandle::spawn`] moves an [`Engine`] onto a thread of its own (the
//! engine is `Send`; nothing in it is shared behind a lock). The handle is
//! cheap to clone and `Send + Sync`: any thread submits requests, aborts them,
//! reads a stats snapshot, subscribes to telemetry and tokenizes (the
//! [`Tokenizer`] and the chat template are shared read-only through `Arc`s).
//!
//! # The loop
//!
//! 1. **Idle: block.** When the engine has no unfinished request, the thread
//!    blocks on its command channel (`recv`): no spinning, no sleep-polling.
//!    An idle engine costs nothing and wakes at the first command.
//! 2. **Drain.** Every queued command is handled before the next step:
//!    `Submit` validates and queues (the validation error, or the id and the
//!    stream, goes back to the submitter at once through a one-shot reply),
//!    `Abort` ends a request now (its stream gets `finished: Aborted`),
//!    `Subscribe` adds a telemetry subscriber, `Shutdown` stops the loop.
//! 3. **Step.** While any request is unfinished, one [`Engine::step`] runs,
//!    its events going to the requests' streams. A failed step is contained by
//!    the engine (it ends the requests of that step with
//!    [`FinishReason::Error`]); should `step` itself return an error, every
//!    unfinished request ends with that error. Either way the loop goes on
//!    serving.
//! 4. **Clean up.** Finished requests are removed
//!    ([`Engine::remove_finished`]), so the engine's memory does not grow with
//!    the number of requests served.
//! 5. **Publish.** The stats snapshot is refreshed, then back to 1.
//!
//! A dropped stream receiver aborts its request at its next event (the
//! engine's rule for streams). On shutdown (an explicit
//! [`EngineHandle::shutdown`], or the last clone dropped) every unfinished
//! request ends with `Aborted`, its stream gets that final event, and the
//! thread is joined.
//!
//! # Invariants (tested)
//!
//! - Idle means asleep: no loop iteration and no step runs while nothing is
//!   unfinished and no command arrives.
//! - After every request has finished, the engine holds no request state and
//!   the scheduler no sequence.
//! - Every stream ends with exactly one event whose `finished` is set, unless
//!   the engine thread dies (then the stream is disconnected).
//!
//! # Costs
//!
//! A command is one channel send plus, for `submit` and `abort`, one reply:
//! it waits at most for the step in flight. [`EngineHandle::stats`] is one
//! uncontended mutex lock and a copy of about a kilobyte (six small heap
//! blocks: the memory totals' per-tag list), no round trip to
//! the engine thread. The snapshot is refreshed once per loop iteration
//! (`O(segments + free pool blocks + running requests)`, and a device
//! memory reading at most every 100 ms).

use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagoda_backend::{Backend, DeviceMemory, PoolStats};

use crate::chat::{ChatTemplate, Message};
use crate::engine::{Engine, GenerationParams, RequestOutput};
use crate::error::{EngineError, Result};
use crate::model::LlamaConfig;
use crate::plan::MemoryPlan;
use crate::scheduler::SchedulerStats;
use crate::sequence::{FinishReason, SeqId};
use crate::telemetry::{MemoryTotals, TelemetryEvent};
use crate::tokenizer::Tokenizer;

/// A prompt: token ids, or text tokenized on the submitting thread the way
/// [`Engine::tokenize`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Token ids, used as given.
    Tokens(Vec<u32>),
    /// Text: control-token text parsed, BOS when the model asks.
    Text(String),
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Tokens(ids)
    }
}

impl From<&[u32]> for Prompt {
    fn from(ids: &[u32]) -> Self {
        Prompt::Tokens(ids.to_vec())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_string())
    }
}

/// A snapshot of the engine, refreshed once per loop iteration: what a
/// server's `/metrics` and a viewer's status line want.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Requests admitted and holding KV pages.
    pub num_running: usize,
    /// Requests queued for admission.
    pub num_waiting: usize,
    /// Preempted requests whose KV pages are swapped out to host memory.
    pub num_swapped: usize,
    /// Token positions whose K/V the running requests hold, summed over
    /// requests (a prefix page shared by two requests counts twice).
    pub num_kv_tokens: usize,
    /// Request states the engine holds (finished ones are removed every
    /// iteration, so this is `num_running + num_waiting` between iterations).
    pub num_requests_held: usize,
    /// Sequences the scheduler holds, in any state.
    pub num_sequences_held: usize,
    /// KV pages in the cache.
    pub num_kv_pages: usize,
    /// KV pages free (including free pages that still hold cached prefixes).
    pub num_kv_pages_free: usize,
    /// Free KV pages that still hold a cached prefix.
    pub num_kv_pages_cached: usize,
    /// Loop iterations: each wake-up for a command or a step.
    pub num_iterations: u64,
    /// Engine steps run.
    pub num_steps: u64,
    /// Tokens generated, all requests.
    pub num_generated_tokens: u64,
    /// Prompt tokens of accepted requests.
    pub num_prompt_tokens: u64,
    /// Requests accepted.
    pub num_requests_submitted: u64,
    /// Requests refused at submission (validation errors).
    pub num_requests_refused: u64,
    /// Requests that ended by length, end-of-generation or a stop string.
    pub num_requests_completed: u64,
    /// Requests aborted (by the caller, a dropped stream, or shutdown).
    pub num_requests_aborted: u64,
    /// Requests that ended with an error.
    pub num_requests_failed: u64,
    /// Scheduler totals (preemptions, prefix-cache hits).
    pub scheduler: SchedulerStats,
    /// Pool totals (reserved, allocated, per tag, per size class, fragmentation).
    pub pool: PoolStats,
    /// Device memory, pool, KV arena and graph totals: the telemetry
    /// stream's `totals` (`docs/trace-schema.md`); the device memory
    /// reading is at most 100 ms old.
    pub memory: MemoryTotals,
    /// Whether the engine thread has stopped.
    pub stopped: bool,
}

/// Facts fixed when the engine was built.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The model's hyper-parameters.
    pub model_config: LlamaConfig,
    /// The memory plan the engine was built with.
    pub memory_plan: MemoryPlan,
    /// Context length per sequence.
    pub ctx: usize,
    /// Backend name.
    pub backend: String,
    /// Backend device description.
    pub device: String,
}

type SubmitReply = Result<(SeqId, Receiver<RequestOutput>)>;

enum Command {
    Submit {
        prompt: Vec<u32>,
        params: GenerationParams,
        reply: Sender<SubmitReply>,
    },
    Abort {
        id: SeqId,
        reply: Sender<Result<()>>,
    },
    Subscribe {
        capacity: usize,
        snapshots: bool,
        reply: Sender<Receiver<TelemetryEvent>>,
    },
    Shutdown,
}

struct Inner {
    commands: Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<EngineStats>>,
    tokenizer: Arc<Tokenizer>,
    chat: Option<Arc<ChatTemplate>>,
    info: EngineInfo,
}

impl Inner {
    /// Stops the loop and joins the thread; `Err` when the thread panicked.
    fn stop(&self) -> Result<()> {
        let _ = self.commands.send(Command::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match thread.map(JoinHandle::join) {
            Some(Err(panic)) => Err(EngineError::Stopped(format!(
                "the engine thread panicked: {}",
                panic_message(panic.as_ref())
            ))),
            _ => Ok(()),
        }
    }
}

impl Drop for Inner {
    /// The last handle is gone: stop the engine and wait for its thread.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A handle to an engine on its own thread. Clone it freely; the engine stops
/// when [`EngineHandle::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("backend", &self.inner.info.backend)
            .field("ctx", &self.inner.info.ctx)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Moves `engine` onto a new thread (`pagoda-engine`) and returns a handle to it.
    pub fn spawn<B: Backend>(engine: Engine<B>) -> Result<EngineHandle> {
        let info = EngineInfo {
            model_config: engine.model_config().clone(),
            memory_plan: engine.memory_plan().clone(),
            ctx: engine.ctx(),
            backend: engine.runner().backend().info().name.clone(),
            device: engine.runner().backend().info().device.clone(),
        };
        let tokenizer = engine.shared_tokenizer();
        let chat = engine.shared_chat_template();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (tx, rx) = channel();
        let mut worker = Worker {
            engine,
            commands: rx,
            stats: stats.clone(),
            counters: EngineStats::default(),
            device: None,
        };
        worker.publish();
        let thread = std::thread::Builder::new()
            .name("pagoda-engine".into())
            .spawn(move || worker.run())
            .map_err(EngineError::Thread)?;
        Ok(EngineHandle {
            inner: Arc::new(Inner {
                commands: tx,
                thread: Mutex::new(Some(thread)),
                stats,
                tokenizer,
                chat,
                info,
            }),
        })
    }

    /// Queues a request. Text is tokenized here, on the caller's thread.
    /// Returns its id and the stream of its outputs (the last has `finished`
    /// set); a request the engine refuses (empty prompt, too long, bad
    /// sampling settings, ...) is an error here, nothing is queued. Dropping
    /// the receiver aborts the request. Streams carry tokens and text, not
    /// logits: for `want_all_logits` / `want_first_logits`, drive an
    /// [`Engine`] directly and take its [`crate::Completion`].
    pub fn submit(
        &self,
        prompt: impl Into<Prompt>,
        params: GenerationParams,
    ) -> Result<(SeqId, Receiver<RequestOutput>)> {
        let prompt = match prompt.into() {
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => self.inner.tokenizer.encode_prompt(&text),
        };
        let (reply, answer) = channel();
        self.send(Command::Submit {
            prompt,
            params,
            reply,
        })?;
        answer.recv().map_err(|_| stopped())?
    }

    /// Cancels a request: it ends at once with `Aborted` (its stream gets that
    /// final event) and its pages are freed. A request that already finished
    /// keeps its reason; an id the engine no longer holds (finished and
    /// cleaned up, or never issued) is [`EngineError::UnknownSequence`].
    pub fn abort(&self, id: SeqId) -> Result<()> {
        let (reply, answer) = channel();
        self.send(Command::Abort { id, reply })?;
        answer.recv().map_err(|_| stopped())?
    }

    /// A telemetry subscriber: `StepStats` every step, plus memory events
    /// when `snapshots`, the first a keyframe of the state at subscription
    /// (sent at once, also to an idle engine), then deltas. Never slows the
    /// engine: a full channel of `capacity` events drops new ones.
    pub fn subscribe_telemetry(
        &self,
        capacity: usize,
        snapshots: bool,
    ) -> Result<Receiver<TelemetryEvent>> {
        let (reply, answer) = channel();
        self.send(Command::Subscribe {
            capacity,
            snapshots,
            reply,
        })?;
        answer.recv().map_err(|_| stopped())
    }

    /// The latest stats snapshot (no round trip to the engine thread).
    pub fn stats(&self) -> EngineStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The tokenizer, usable from any thread.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    /// Tokenizes prompt text like [`Engine::tokenize`].
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.inner.tokenizer.encode_prompt(text)
    }

    /// Renders chat messages with the model's template, on the caller's thread.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let t =
            self.inner.chat.as_ref().ok_or_else(|| {
                EngineError::InvalidInput("the model has no chat template".into())
            })?;
        t.render(messages, true)
    }

    /// Facts fixed at build time (model, plan, context, backend).
    pub fn info(&self) -> &EngineInfo {
        &self.inner.info
    }

    /// Stops the engine for every clone: unfinished requests end with
    /// `Aborted`, the thread is joined. Later calls on any clone fail with
    /// [`EngineError::Stopped`]; calling `shutdown` again is `Ok`. `Err` when
    /// the engine thread had panicked.
    pub fn shutdown(&self) -> Result<()> {
        self.inner.stop()
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.inner.commands.send(cmd).map_err(|_| stopped())
    }
}

fn stopped() -> EngineError {
    EngineError::Stopped("it was shut down or its thread ended".into())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What runs on the engine thread.
struct Worker<B: Backend> {
    engine: Engine<B>,
    commands: Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    /// Running totals; the gauges are filled in by [`Worker::publish`].
    counters: EngineStats,
    /// The last device memory reading and when it was taken.
    device: Option<(Instant, DeviceMemory)>,
}

/// How old the stats' device memory reading may be.
const DEVICE_READING_INTERVAL: Duration = Duration::from_millis(100);

/// Whether the loop goes on after a command.
#[derive(PartialEq)]
enum Flow {
    Continue,
    Stop,
}

impl<B: Backend> Worker<B> {
    fn run(mut self) {
        loop {
            if !self.engine.has_unfinished() {
                // Idle: sleep until a command arrives (all senders gone = stop).
                let Ok(cmd) = self.commands.recv() else { break };
                if self.handle(cmd) == Flow::Stop {
                    break;
                }
            }
            if self.drain() == Flow::Stop {
                break;
            }
            self.counters.num_iterations += 1;
            if self.engine.has_unfinished() {
                self.step();
            }
            self.clean_up();
            self.publish();
        }
        self.engine.finish_all(FinishReason::Aborted);
        self.clean_up();
        self.counters.stopped = true;
        self.publish();
    }

    /// Handles every command already queued.
    fn drain(&mut self) -> Flow {
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => {
                    if self.handle(cmd) == Flow::Stop {
                        return Flow::Stop;
                    }
                }
                Err(TryRecvError::Empty) => return Flow::Continue,
                Err(TryRecvError::Disconnected) => return Flow::Stop,
            }
        }
    }

    fn handle(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Submit {
                prompt,
                params,
                reply,
            } => {
                let n = prompt.len() as u64;
                let res = self.engine.add_request_stream(prompt, params);
                match &res {
                    Ok(_) => {
                        self.counters.num_requests_submitted += 1;
                        self.counters.num_prompt_tokens += n;
                    }
                    Err(_) => self.counters.num_requests_refused += 1,
                }
                if let Err(std::sync::mpsc::SendError(Ok((id, _)))) = reply.send(res) {
                    // The submitter is gone before it saw its id: nobody can read the stream.
                    let _ = self.engine.abort(id);
                }
            }
            Command::Abort { id, reply } => {
                let _ = reply.send(self.engine.abort(id));
            }
            Command::Subscribe {
                capacity,
                snapshots,
                reply,
            } => {
                let _ = reply.send(self.engine.subscribe_telemetry_now(capacity, snapshots));
            }
            Command::Shutdown => return Flow::Stop,
        }
        Flow::Continue
    }

    fn step(&mut self) {
        self.counters.num_steps += 1;
        match self.engine.step() {
            Ok(events) => {
                self.counters.num_generated_tokens +=
                    events.iter().filter(|e| e.token.is_some()).count() as u64;
            }
            // The engine contains failures of the forward pass itself; an error
            // here means its state for these requests is not trustworthy.
            Err(e) => self
                .engine
                .finish_all(FinishReason::Error(format!("engine step failed: {e}"))),
        }
    }

    fn clean_up(&mut self) {
        for (_, reason) in self.engine.remove_finished() {
            match reason {
                FinishReason::Aborted => self.counters.num_requests_aborted += 1,
                FinishReason::Error(_) => self.counters.num_requests_failed += 1,
                _ => self.counters.num_requests_completed += 1,
            }
        }
    }

    fn publish(&mut self) {
        // A device memory reading (on the CPU, a read of /proc/meminfo) at
        // most every DEVICE_READING_INTERVAL, not every step.
        let device = match self.device {
            Some((at, d)) if at.elapsed() < DEVICE_READING_INTERVAL => d,
            _ => {
                let d = crate::telemetry::device_memory(self.engine.runner());
                self.device = Some((Instant::now(), d));
                d
            }
        };
        let s = self.engine.scheduler();
        let bm = s.block_manager();
        let pool = self.engine.runner().pool().stats();
        let num_kv_tokens = s
            .running_ids()
            .iter()
            .filter_map(|&id| s.get(id))
            .map(|q| q.num_computed_tokens)
            .sum();
        let snapshot = EngineStats {
            num_running: s.num_running(),
            num_waiting: s.num_waiting(),
            num_swapped: s.num_swapped(),
            num_kv_tokens,
            memory: crate::telemetry::totals_with(self.engine.runner(), s, &pool, device),
            num_requests_held: self.engine.num_requests(),
            num_sequences_held: s.num_sequences(),
            num_kv_pages: bm.num_pages(),
            num_kv_pages_free: bm.num_free_pages(),
            num_kv_pages_cached: bm.num_cached_free_pages(),
            scheduler: s.stats().clone(),
            pool,
            ..self.counters.clone()
        };
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }
}

/// Compile-time proof, for every backend, that the engine can move to its
/// own thread and that the handle and the tokenizer can be shared between
/// threads. (`spawn` needs the first; this states it where a reader looks.)
#[allow(dead_code)]
fn assert_thread_safety<B: Backend>() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Engine<B>>();
    send_sync::<EngineHandle>();
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU engine is `Send` (compile-time: this test fails to build otherwise).
    #[test]
    fn cpu_engine_is_send_and_the_handle_is_send_sync() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<Engine<pagoda_cpu::CpuBackend>>();
        send_sync::<EngineHandle>();
        send_sync::<Arc<Tokenizer>>();
        assert_thread_safety::<pagoda_cpu::CpuBackend>();
    }

    #[test]
    fn prompts_convert_from_ids_and_text() {
        assert_eq!(Prompt::from(vec![1, 2]), Prompt::Tokens(vec![1, 2]));
        assert_eq!(Prompt::from(&[3u32][..]), Prompt::Tokens(vec![3]));
        assert_eq!(Prompt::from("hi"), Prompt::Text("hi".into()));
    }
}
