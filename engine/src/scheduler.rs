//! Continuous batching: which tokens of which sequences run in the next step.
//!
//! The [`Scheduler`] owns every [`Sequence`] (waiting, running and finished)
//! and the [`BlockManager`]. One engine step is
//! `schedule() -> runner executes the StepPlan -> postprocess()`.
//!
//! ## Policy (vLLM v1 style)
//! Each step has a budget of `max_num_batched_tokens` token rows. "Free
//! pages" below means pages available in committed memory; before any
//! decision that pages are short, the block manager *grows* (commits KV
//! units, see [`crate::block_manager`]) up to the reservation.
//! 1. **Decode first.** Every running sequence that has its whole context
//!    computed but for the last sampled token gets one row, oldest first. When
//!    it needs a page and none is free (even after growing), the most
//!    recently arrived running sequence not yet scheduled this step is
//!    *preempted* (swap or recompute, see below); when no newer sequence is
//!    left, the sequence preempts itself. A sequence that cannot get a page
//!    even when it holds the only pages fails: with the committer's error when
//!    a grow was refused (nothing else holds pages it could wait for), else
//!    with [`EngineError::OutOfKvPages`] (unreachable when `add` accepted it,
//!    kept as a clear answer).
//! 2. **Chunked prefill of running sequences**, oldest first: as many prompt
//!    (or recompute) tokens as the budget and the free pages allow, preempting
//!    newer unscheduled sequences when not even one token fits. A sequence
//!    whose newer rivals are already scheduled waits (it keeps its pages).
//! 3. **Resumption** of swapped sequences in arrival order, unless a
//!    sequence was preempted or left waiting for pages this step: fresh pages
//!    for every host slot (copied back by `swap_in` before the forward) and
//!    for its next tokens; the first that does not fit stops resumption.
//! 4. **Admission** of waiting sequences in arrival order while the budget,
//!    `max_num_seqs` and the free pages allow, unless a running sequence was
//!    preempted or left waiting for pages this step or a swapped sequence is
//!    left (newcomers must not take pages older sequences need). Admission
//!    consults the prefix cache: cached full pages are claimed (shared,
//!    refcount > 1) and only the suffix is computed. The first waiting
//!    sequence that does not fit stops admission (first come, first served);
//!    one whose grow is refused while nothing runs fails with that error.
//!
//! ## Preemption: swap or recompute
//! A preempted sequence with `t` computed tokens in `n = ceil(t / page_size)`
//! pages is *swapped* when swap space is configured
//! ([`SchedulerConfig::swap`]), `n` host slots are free, and
//! ```text
//! 2 * (latency + n * page_bytes / bandwidth)   <   t / recompute_tokens_per_s
//! ```
//! (copy out and back in, versus prefilling its tokens again); otherwise it
//! is *recomputed* (pages freed, `num_computed_tokens` reset to 0, back to
//! the waiting queue in arrival order). vLLM's reasoning, with numbers: the
//! defaults (10 GB/s, 1 ms per transfer, 4096 tokens/s) on a SmolLM2-135M f32
//! page of 16 tokens (720 KiB) recompute up to 8 tokens and swap from 9 on;
//! a GPU with a fast prefill should set its measured `recompute_tokens_per_s`.
//! A swapped sequence keeps `num_computed_tokens`, holds host slots and no
//! device page, and waits in the swapped queue. Its pages are freed at once
//! and may be reused in the same step: the plan's `swap_out` copies run first
//! (the runner's order is `swap_out`, `copy_pages`, `swap_in`, forward), and
//! a host slot freed by a resume is reusable only from the next step (its
//! `swap_in` may not have run yet). Commit units emptied in a step are
//! released only at the end of `postprocess`, after the plan ran. A plan may
//! carry only swap-out copies and no token rows (a sequence swapped itself
//! out and nothing else ran); the runner must still execute it.
//!
//! A fault (`BackendError::FaultInjected`) or `OutOfKvPages` while taking
//! pages for a sequence ends *that* sequence with [`FinishReason::Error`],
//! frees its pages and reports it in [`ScheduleOutput::failed`]; the step goes
//! on for the others. A fault at a *grow* only makes pages short: the
//! scheduler preempts or waits as above.
//!
//! ## Invariants
//! - `running`, `waiting` and `swapped` are sorted by arrival and disjoint;
//!   finished sequences are in none. Waiting and swapped sequences hold no
//!   device pages; a swapped sequence holds one host slot per computed page,
//!   and every host slot is free or held by exactly one swapped sequence.
//! - Each page's refcount equals the number of running block tables holding it;
//!   a page in two block tables is a full, registered prefix-cache page.
//! - No step writes a slot of a page with refcount > 1, of a page registered
//!   in the prefix cache (cached pages are immutable), or of an uncommitted
//!   page.
//! - When nothing is unfinished, every page and host slot is free, and every
//!   unit still committed holds only cached free pages.
//!
//! ## Costs
//! `schedule`: O(num_running + scheduled tokens + pages taken), plus
//! O(page_size) per prefix-cache hit page and O(pages_per_unit) per unit
//! committed. `postprocess`: O(num_seqs in the plan + page_size per newly
//! full page + pages_per_unit per unit released). Preemption and finishing:
//! O(num_running + pages of the sequence); a swap adds one host slot per page.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use pagoda_backend::FaultInjector;

use crate::block_manager::{BlockManager, KvCommitStats};
use crate::error::{EngineError, Result};
use crate::kv_commit::KvCommit;
use crate::sequence::{FinishReason, PageId, SeqId, SeqParams, SeqStatus, Sequence, TokenId};
use crate::step_plan::{StepPlan, pad_block_tables};

/// Sizes and switches of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Token positions per KV page.
    pub page_size: usize,
    /// KV pages in the cache.
    pub num_pages: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most token rows in one step (the per-step token budget).
    pub max_num_batched_tokens: usize,
    /// The model's context length: prompt + generated tokens at most.
    pub max_model_len: usize,
    /// Share full pages between sequences with the same prefix.
    pub enable_prefix_caching: bool,
    /// Swap-to-host preemption (off by default).
    pub swap: SwapConfig,
}

/// Swap-to-host preemption: the host tier's size and the constants of the
/// swap-or-recompute rule (see the module docs). Swap is off when
/// `space_bytes` or `page_bytes` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapConfig {
    /// Host bytes for swapped-out KV pages (`--swap-space`); 0 = recompute only.
    pub space_bytes: u64,
    /// Bytes of one KV page over all layers: what one host slot holds.
    pub page_bytes: u64,
    /// Host <-> device copy bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// Fixed cost of one swap transfer (out or in), microseconds.
    pub latency_us: u64,
    /// Prefill throughput when recomputing a preempted sequence, tokens per second.
    pub recompute_tokens_per_s: u64,
}

/// Default host copy bandwidth: 10 GB/s (a host memcpy; pinned PCIe 4 x16
/// is about 25 GB/s).
pub const DEFAULT_SWAP_BANDWIDTH_BYTES_PER_S: u64 = 10_000_000_000;
/// Default fixed cost of one swap transfer: 1 ms (one blocking copy round in
/// the step, plus bookkeeping).
pub const DEFAULT_SWAP_LATENCY_US: u64 = 1_000;
/// Default recompute (prefill) throughput: 4096 tokens/s, a CPU-backend
/// figure for a small model; set the measured one for a GPU.
pub const DEFAULT_RECOMPUTE_TOKENS_PER_S: u64 = 4_096;

impl Default for SwapConfig {
    fn default() -> Self {
        Self {
            space_bytes: 0,
            page_bytes: 0,
            bandwidth_bytes_per_s: DEFAULT_SWAP_BANDWIDTH_BYTES_PER_S,
            latency_us: DEFAULT_SWAP_LATENCY_US,
            recompute_tokens_per_s: DEFAULT_RECOMPUTE_TOKENS_PER_S,
        }
    }
}

impl SwapConfig {
    /// Host page slots: `space_bytes / page_bytes` (0 when off).
    pub fn num_slots(&self) -> usize {
        if self.page_bytes == 0 {
            return 0;
        }
        usize::try_from(self.space_bytes / self.page_bytes).unwrap_or(usize::MAX)
    }

    /// Whether swapping can happen at all.
    pub fn is_enabled(&self) -> bool {
        self.num_slots() > 0
    }

    /// Nanoseconds to copy `num_pages` pages out and back in:
    /// `2 * (latency + num_pages * page_bytes / bandwidth)`.
    pub fn swap_cost_ns(&self, num_pages: usize) -> u128 {
        let bytes = num_pages as u128 * u128::from(self.page_bytes);
        let copy = bytes * 1_000_000_000 / u128::from(self.bandwidth_bytes_per_s.max(1));
        2 * (u128::from(self.latency_us) * 1_000 + copy)
    }

    /// Nanoseconds to recompute `num_tokens` tokens of K/V:
    /// `num_tokens / recompute_tokens_per_s`.
    pub fn recompute_cost_ns(&self, num_tokens: usize) -> u128 {
        num_tokens as u128 * 1_000_000_000 / u128::from(self.recompute_tokens_per_s.max(1))
    }

    /// The rule: swap a preempted sequence with `num_tokens` computed tokens
    /// in `num_pages` pages when swapping is on and copying its pages out and
    /// back costs less than recomputing its tokens.
    pub fn prefers_swap(&self, num_tokens: usize, num_pages: usize) -> bool {
        self.is_enabled()
            && num_pages > 0
            && self.swap_cost_ns(num_pages) < self.recompute_cost_ns(num_tokens)
    }
}

impl SchedulerConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(EngineError::InvalidConfig(msg));
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens must be at least 1".into());
        }
        if self.max_model_len < 2 {
            return bad(format!(
                "max_model_len {} leaves no room for a prompt and a token",
                self.max_model_len
            ));
        }
        if u32::try_from(self.max_model_len).is_err()
            || u32::try_from(self.max_num_batched_tokens).is_err()
        {
            return bad("max_model_len and max_num_batched_tokens must fit in u32".into());
        }
        let swap = &self.swap;
        if swap.is_enabled() {
            if swap.bandwidth_bytes_per_s == 0 || swap.recompute_tokens_per_s == 0 {
                return bad("swap needs a positive host bandwidth and recompute throughput".into());
            }
            if u32::try_from(swap.num_slots()).is_err() {
                return bad(format!(
                    "swap space of {} bytes holds more page slots than fit in u32",
                    swap.space_bytes
                ));
            }
        }
        Ok(())
    }
}

/// Running totals since the scheduler was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences preempted (each preemption counted).
    pub num_preemptions: u64,
    /// Tokens found in the prefix cache at admissions.
    pub num_prefix_cache_hit_tokens: u64,
    /// Tokens looked up in the prefix cache at admissions.
    pub num_prefix_cache_queried_tokens: u64,
    /// Sequences failed while taking pages.
    pub num_failed: u64,
    /// Steps that produced a plan.
    pub num_steps: u64,
    /// Preemptions that swapped the sequence to host slots (also counted in
    /// `num_preemptions`); the rest recompute.
    pub num_swap_preemptions: u64,
    /// Swapped sequences resumed (pages copied back).
    pub num_swap_resumes: u64,
    /// Pages copied device -> host.
    pub num_swap_out_pages: u64,
    /// Pages copied host -> device.
    pub num_swap_in_pages: u64,
}

/// A sequence that failed while the step was being scheduled.
#[derive(Debug)]
pub struct SeqFailure {
    /// The failed sequence (finished with [`FinishReason::Error`]).
    pub seq_id: SeqId,
    /// Why.
    pub error: EngineError,
}

/// What [`Scheduler::schedule`] decided.
#[derive(Debug, Default)]
pub struct ScheduleOutput {
    /// The work of this step; `None` when nothing can run.
    pub plan: Option<StepPlan>,
    /// Sequences preempted this step (back in the waiting queue).
    pub preempted: Vec<SeqId>,
    /// Sequences that failed this step (finished, pages freed).
    pub failed: Vec<SeqFailure>,
}

/// What happened to one planned sequence in [`Scheduler::postprocess`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqUpdate {
    /// The sequence.
    pub seq_id: SeqId,
    /// The token appended this step (`None` for an unfinished prefill chunk).
    pub new_token: Option<TokenId>,
    /// Set when the sequence finished this step.
    pub finished: Option<FinishReason>,
}

/// One KV page for telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPageInfo {
    /// The page.
    pub page: PageId,
    /// Running sequences whose block table holds it, by arrival.
    pub owners: Vec<SeqId>,
    /// Its index in each owner's block table (parallel to `owners`): the
    /// order in which a sequence's pages hold its tokens.
    pub positions: Vec<u32>,
    /// Tokens of the page whose K/V is written (cached free pages count as full).
    pub tokens_used: usize,
    /// Refcount.
    pub refcount: u32,
    /// Held by more than one sequence.
    pub shared: bool,
    /// Registered in the prefix cache.
    pub cached: bool,
}

/// One sequence's share of a step, before the plan is built.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: SeqId,
    /// First position computed this step.
    start: usize,
    num_new: usize,
    decode: bool,
}

/// How scheduling a running sequence turned out.
enum RunOutcome {
    Scheduled(Entry, Option<(u32, u32)>),
    /// Preempted itself, or waits with its pages for older sequences.
    Blocked,
    Failed,
}

/// How resuming a swapped sequence turned out.
enum Resume {
    Scheduled(Entry),
    /// Not enough pages: it stays swapped (and blocks admission).
    NoRoom,
    Failed,
}

/// Owner of all sequences; decides every step. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    block_manager: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Sorted by arrival.
    waiting: VecDeque<SeqId>,
    /// Sorted by arrival.
    running: Vec<SeqId>,
    /// Swapped out, sorted by arrival; resumed before admission.
    swapped: VecDeque<SeqId>,
    /// Free host slots (pop = lowest).
    host_free: Vec<u32>,
    /// Host slots freed during this step (their swap-in may not have run
    /// yet); free for the next step.
    host_freed: Vec<u32>,
    /// Swap copies of the step being scheduled.
    step_swap_out: Vec<(u32, u32)>,
    step_swap_in: Vec<(u32, u32)>,
    next_id: u64,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler with an empty KV cache, every page committed. `faults`
    /// is shared with the block manager (every fresh page is a fault site).
    pub fn new(config: SchedulerConfig, faults: FaultInjector) -> Result<Self> {
        Self::with_kv_commit(config, faults, None)
    }

    /// A scheduler whose `config.num_pages` pages are a reservation backed
    /// by `commit` (growable KV, see the module docs); `None` = every page
    /// committed from the start.
    pub fn with_kv_commit(
        config: SchedulerConfig,
        faults: FaultInjector,
        commit: Option<Arc<dyn KvCommit>>,
    ) -> Result<Self> {
        config.validate()?;
        let block_manager = BlockManager::with_commit(
            config.num_pages,
            config.page_size,
            config.enable_prefix_caching,
            faults,
            commit,
        )?;
        let num_slots = config.swap.num_slots() as u32;
        Ok(Self {
            config,
            block_manager,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            swapped: VecDeque::new(),
            host_free: (0..num_slots).rev().collect(),
            host_freed: Vec::new(),
            step_swap_out: Vec::new(),
            step_swap_in: Vec::new(),
            next_id: 0,
            stats: SchedulerStats::default(),
        })
    }

    /// Queues a request. Refuses an empty prompt, `max_tokens == 0`, a prompt
    /// plus `max_tokens` longer than `max_model_len`, and a request whose K/V
    /// (prompt + max_tokens - 1 tokens) could never fit in the whole cache.
    pub fn add(&mut self, prompt: Vec<TokenId>, params: SeqParams) -> Result<SeqId> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if params.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        let max_model_len = self.config.max_model_len;
        let total = prompt.len().saturating_add(params.max_tokens);
        if total > max_model_len {
            return Err(EngineError::TooLong {
                prompt_len: prompt.len(),
                max_tokens: params.max_tokens,
                max_model_len,
            });
        }
        let ps = self.config.page_size;
        let num_tokens = total - 1;
        let needed_pages = num_tokens.div_ceil(ps);
        if needed_pages > self.config.num_pages {
            return Err(EngineError::ExceedsKvCache {
                num_tokens,
                needed_pages,
                page_size: ps,
                num_pages: self.config.num_pages,
            });
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs
            .insert(id, Sequence::new(id, prompt, params, id.0, ps));
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Decides the next step. See the module docs for the policy.
    pub fn schedule(&mut self) -> ScheduleOutput {
        let mut out = ScheduleOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut entries: Vec<Entry> = Vec::new();
        let mut copies: Vec<(u32, u32)> = Vec::new();
        let mut scheduled: HashSet<SeqId> = HashSet::new();
        let mut blocked = false;
        // Host slots whose swap-in ran in an earlier step are free again.
        self.host_free.append(&mut self.host_freed);
        self.host_free.sort_unstable_by(|a, b| b.cmp(a));
        self.step_swap_out.clear();
        self.step_swap_in.clear();

        // 1 and 2: running sequences, decodes first, then prefill chunks.
        let order = self.running.clone();
        for decode_phase in [true, false] {
            for &id in &order {
                if budget == 0 {
                    break;
                }
                let Some(seq) = self.seqs.get(&id) else {
                    continue;
                };
                if seq.status != SeqStatus::Running
                    || scheduled.contains(&id)
                    || seq.is_decoding() != decode_phase
                {
                    continue;
                }
                let wanted = seq.num_uncomputed_tokens().min(budget);
                match self.schedule_running(id, wanted, decode_phase, &scheduled, &mut out) {
                    RunOutcome::Scheduled(entry, copy) => {
                        budget -= entry.num_new;
                        scheduled.insert(id);
                        entries.push(entry);
                        copies.extend(copy);
                    }
                    RunOutcome::Blocked => blocked = true,
                    RunOutcome::Failed => {}
                }
            }
        }

        // 3a: resume swapped sequences, oldest first, unless older sequences
        // are short of pages.
        let mut blocked = blocked || !out.preempted.is_empty();
        while !blocked && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.swapped.front() else {
                break;
            };
            match self.resume(id, budget, &mut out) {
                Resume::Scheduled(entry) => {
                    budget -= entry.num_new;
                    scheduled.insert(id);
                    entries.push(entry);
                }
                Resume::NoRoom => blocked = true,
                Resume::Failed => {}
            }
        }

        // 3b: admission, unless older sequences are short of pages or
        // swapped out.
        let blocked = blocked || !self.swapped.is_empty();
        while !blocked && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = self.seqs.get(&id) else {
                debug_assert!(false, "waiting {id} has no sequence");
                self.waiting.pop_front();
                continue;
            };
            let hit = self.block_manager.lookup_prefix(seq);
            let start = hit.num_cached_tokens;
            let num_new = (seq.len() - start).min(budget);
            let need = self.block_manager.num_pages_to_admit(seq, &hit, num_new);
            let grown = self.block_manager.grow_for(need);
            if !self.block_manager.can_allocate(need) {
                // A refused grow with nothing running can never be waited out.
                if let Err(e) = grown
                    && self.running.is_empty()
                {
                    self.fail(id, e, &mut out);
                    continue;
                }
                break;
            }
            self.stats.num_prefix_cache_hit_tokens += start as u64;
            if self.block_manager.prefix_caching_enabled() {
                self.stats.num_prefix_cache_queried_tokens += seq.len() as u64;
            }
            self.waiting.pop_front();
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            self.block_manager.admit(seq, hit);
            seq.status = SeqStatus::Running;
            let arrival = seq.arrival;
            let result = self.block_manager.allocate_slots(seq, num_new);
            self.insert_running(id, arrival);
            match result {
                Ok(copy) => {
                    budget -= num_new;
                    scheduled.insert(id);
                    entries.push(Entry {
                        id,
                        start,
                        num_new,
                        decode: false,
                    });
                    copies.extend(copy);
                }
                Err(e) => self.fail(id, e, &mut out),
            }
        }

        if !entries.is_empty() || !self.step_swap_out.is_empty() {
            self.stats.num_steps += 1;
            out.plan = Some(self.build_plan(&entries, copies));
        } else {
            // No plan will run: nothing can still read a freed page.
            self.block_manager.end_step();
        }
        out
    }

    /// Inserts `id` into `running`, keeping arrival order.
    fn insert_running(&mut self, id: SeqId, arrival: u64) {
        let pos = self
            .running
            .partition_point(|r| self.seqs.get(r).is_some_and(|s| s.arrival < arrival));
        self.running.insert(pos, id);
    }

    /// Resumes swapped `id` with up to `budget` tokens: fresh device pages
    /// for its host slots (copied back before the forward) and its next tokens.
    fn resume(&mut self, id: SeqId, budget: usize, out: &mut ScheduleOutput) -> Resume {
        let Some(seq) = self.seqs.get(&id) else {
            self.swapped.pop_front();
            return Resume::Failed;
        };
        let num_new = seq.num_uncomputed_tokens().min(budget);
        let need = self.block_manager.num_pages_to_allocate(seq, num_new);
        let grown = self.block_manager.grow_for(need);
        if !self.block_manager.can_allocate(need) {
            if let Err(e) = grown
                && self.running.is_empty()
            {
                self.fail(id, e, out);
                return Resume::Failed;
            }
            return Resume::NoRoom;
        }
        self.swapped.pop_front();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Resume::Failed;
        };
        let start = seq.num_computed_tokens;
        let arrival = seq.arrival;
        let result = self.block_manager.allocate_slots(seq, num_new);
        seq.status = SeqStatus::Running;
        if result.is_ok() {
            let slots = std::mem::take(&mut seq.host_slots);
            for (&slot, page) in slots.iter().zip(&seq.block_table) {
                self.step_swap_in.push((slot, page.0));
            }
            self.stats.num_swap_in_pages += slots.len() as u64;
            self.stats.num_swap_resumes += 1;
            self.host_freed.extend(slots);
        }
        self.insert_running(id, arrival);
        match result {
            Ok(copy) => {
                debug_assert!(copy.is_none(), "a resumed sequence holds no cached page");
                Resume::Scheduled(Entry {
                    id,
                    start,
                    num_new,
                    decode: false,
                })
            }
            Err(e) => {
                self.fail(id, e, out);
                Resume::Failed
            }
        }
    }

    /// Schedules up to `wanted` tokens of running sequence `id`: grows the
    /// KV first, then preempts newer unscheduled sequences when not one
    /// token fits.
    fn schedule_running(
        &mut self,
        id: SeqId,
        wanted: usize,
        decode_phase: bool,
        scheduled: &HashSet<SeqId>,
        out: &mut ScheduleOutput,
    ) -> RunOutcome {
        loop {
            let Some(seq) = self.seqs.get(&id) else {
                return RunOutcome::Failed;
            };
            let need = self.block_manager.num_pages_to_allocate(seq, wanted);
            let grow_error = self.block_manager.grow_for(need).err();
            let num_new = wanted.min(self.block_manager.max_new_tokens(seq));
            if num_new > 0 {
                let Some(seq) = self.seqs.get_mut(&id) else {
                    return RunOutcome::Failed;
                };
                let start = seq.num_computed_tokens;
                return match self.block_manager.allocate_slots(seq, num_new) {
                    Ok(copy) => RunOutcome::Scheduled(
                        Entry {
                            id,
                            start,
                            num_new,
                            decode: decode_phase,
                        },
                        copy,
                    ),
                    Err(e) => {
                        self.fail(id, e, out);
                        RunOutcome::Failed
                    }
                };
            }
            if let Some(victim) = self.pick_victim(id, scheduled) {
                self.preempt(victim, out);
                continue;
            }
            let alone = self
                .running
                .iter()
                .all(|r| *r == id || self.seqs.get(r).is_none_or(|s| s.block_table.is_empty()));
            if alone {
                // Nothing to wait for: a refused grow, or (unreachable when
                // `add` accepted it) a cache too small.
                let error = grow_error.unwrap_or_else(|| EngineError::OutOfKvPages {
                    requested: self.block_manager.num_pages_to_allocate(seq, wanted.max(1)),
                    free: self.block_manager.num_available_pages(),
                });
                self.fail(id, error, out);
                return RunOutcome::Failed;
            }
            if decode_phase {
                self.preempt(id, out);
            }
            return RunOutcome::Blocked;
        }
    }

    /// The most recently arrived running sequence that arrived after `id` and
    /// is not scheduled this step.
    fn pick_victim(&self, id: SeqId, scheduled: &HashSet<SeqId>) -> Option<SeqId> {
        let arrival = self.seqs.get(&id)?.arrival;
        self.running
            .iter()
            .rev()
            .take_while(|r| self.seqs.get(r).is_some_and(|s| s.arrival > arrival))
            .find(|r| !scheduled.contains(r))
            .copied()
    }

    /// Preempts running `id`: swaps it to host slots when the rule prefers
    /// it and the slots are there, else frees its pages and queues it for
    /// recomputation.
    fn preempt(&mut self, id: SeqId, out: &mut ScheduleOutput) {
        let ps = self.config.page_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let num_pages = seq.num_computed_tokens.div_ceil(ps);
        let swap = num_pages <= seq.block_table.len()
            && num_pages <= self.host_free.len()
            && self
                .config
                .swap
                .prefers_swap(seq.num_computed_tokens, num_pages);
        let arrival = seq.arrival;
        if swap {
            for &page in &seq.block_table[..num_pages] {
                let Some(slot) = self.host_free.pop() else {
                    break;
                };
                self.step_swap_out.push((page.0, slot));
                seq.host_slots.push(slot);
            }
            // Freed now; the copies run first in the step, before any reuse.
            self.block_manager.free(seq);
            seq.status = SeqStatus::Swapped;
            self.stats.num_swap_preemptions += 1;
            self.stats.num_swap_out_pages += num_pages as u64;
            let pos = self
                .swapped
                .partition_point(|w| self.seqs.get(w).is_some_and(|s| s.arrival < arrival));
            self.swapped.insert(pos, id);
        } else {
            self.block_manager.free(seq);
            seq.num_computed_tokens = 0;
            seq.num_cached_tokens = 0;
            seq.status = SeqStatus::Waiting;
            let pos = self
                .waiting
                .partition_point(|w| self.seqs.get(w).is_some_and(|s| s.arrival < arrival));
            self.waiting.insert(pos, id);
        }
        self.running.retain(|r| *r != id);
        self.stats.num_preemptions += 1;
        out.preempted.push(id);
    }

    /// Ends `id` with [`FinishReason::Error`] and reports it.
    fn fail(&mut self, id: SeqId, error: EngineError, out: &mut ScheduleOutput) {
        self.end(id, FinishReason::Error(error.to_string()));
        self.stats.num_failed += 1;
        out.failed.push(SeqFailure { seq_id: id, error });
    }

    /// Frees `id`'s pages and host slots, drops it from the queues and marks
    /// it finished.
    fn end(&mut self, id: SeqId, reason: FinishReason) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        self.block_manager.free(seq);
        self.host_freed.append(&mut seq.host_slots);
        seq.status = SeqStatus::Finished(reason);
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
        self.swapped.retain(|w| *w != id);
    }

    fn build_plan(&self, entries: &[Entry], copy_pages: Vec<(u32, u32)>) -> StepPlan {
        let ps = self.config.page_size;
        let num_tokens: usize = entries.iter().map(|e| e.num_new).sum();
        let mut plan = StepPlan {
            input_ids: Vec::with_capacity(num_tokens),
            positions: Vec::with_capacity(num_tokens),
            slot_mapping: Vec::with_capacity(num_tokens),
            query_start_locs: vec![0],
            copy_pages,
            swap_out: self.step_swap_out.clone(),
            swap_in: self.step_swap_in.clone(),
            ..StepPlan::default()
        };
        let mut tables: Vec<&[PageId]> = Vec::with_capacity(entries.len());
        for e in entries {
            let Some(seq) = self.seqs.get(&e.id) else {
                continue;
            };
            let end = e.start + e.num_new;
            for p in e.start..end {
                let row = plan.input_ids.len() as u32;
                plan.input_ids.push(seq.tokens[p]);
                plan.positions.push(p as u32);
                let page = seq.block_table.get(p / ps).map_or(0, |pg| pg.0);
                debug_assert!(
                    p / ps < seq.block_table.len(),
                    "{} has no page for position {p}",
                    seq.id
                );
                plan.slot_mapping.push(page * ps as u32 + (p % ps) as u32);
                let samples_here = p + 1 == seq.len();
                if samples_here || (seq.params.want_all_logits && p < seq.num_prompt_tokens) {
                    plan.logits_indices.push(row);
                }
            }
            plan.sample_rows
                .push((end == seq.len()).then(|| plan.logits_indices.len() as u32 - 1));
            plan.context_lens.push(end as u32);
            plan.query_start_locs.push(plan.input_ids.len() as u32);
            plan.seq_ids.push(e.id);
            if e.decode {
                plan.num_decode_tokens += e.num_new;
            } else {
                plan.num_prefill_tokens += e.num_new;
            }
            tables.push(&seq.block_table);
        }
        plan.max_blocks_per_seq = tables.iter().map(|t| t.len()).max().unwrap_or(0);
        plan.block_tables = pad_block_tables(&tables, plan.max_blocks_per_seq);
        plan
    }

    /// Applies the results of running `plan`: advances computed tokens,
    /// appends `sampled[i]` to plan sequence `i` when `plan.sample_rows[i]` is
    /// set, finishes sequences on an end-of-generation token (kept in the
    /// output, unless `ignore_eog`) or at `max_tokens`, frees the pages of
    /// finished sequences and registers newly full pages in the prefix cache.
    ///
    /// Returns one update per plan sequence still running at the call
    /// (sequences finished or aborted since `schedule` are skipped). A
    /// sampling row with no token ends its sequence with an error.
    pub fn postprocess(&mut self, plan: &StepPlan, sampled: &[Option<TokenId>]) -> Vec<SeqUpdate> {
        debug_assert_eq!(
            sampled.len(),
            plan.num_seqs(),
            "one sampled entry per plan sequence"
        );
        let n = plan.num_seqs();
        if plan.context_lens.len() != n
            || plan.sample_rows.len() != n
            || plan.query_start_locs.len() != n + 1
        {
            debug_assert!(false, "postprocess got a malformed plan");
            return Vec::new();
        }
        let mut updates = Vec::with_capacity(n);
        for (i, &id) in plan.seq_ids.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if seq.status != SeqStatus::Running {
                continue;
            }
            let num_new = plan.num_new_tokens(i);
            let end = plan.context_lens[i] as usize;
            if end != seq.num_computed_tokens + num_new || end > seq.len() {
                debug_assert!(
                    false,
                    "{id}: plan computes up to {end}, sequence has {} computed",
                    seq.num_computed_tokens
                );
                self.end(
                    id,
                    FinishReason::Error(format!("{id}: postprocess got a plan for another state")),
                );
                updates.push(SeqUpdate {
                    seq_id: id,
                    new_token: None,
                    finished: self.finish_reason_of(id),
                });
                continue;
            }
            // Telemetry: the pages whose written-token count moves.
            let ps = self.config.page_size;
            let moved = seq.num_computed_tokens / ps..end.div_ceil(ps).min(seq.block_table.len());
            for &page in seq.block_table.get(moved).unwrap_or(&[]) {
                self.block_manager.mark_dirty(page);
            }
            seq.num_computed_tokens = end;
            self.block_manager.register_full_pages(seq);
            let mut update = SeqUpdate {
                seq_id: id,
                new_token: None,
                finished: None,
            };
            if plan.sample_rows[i].is_some() {
                let reason = match sampled.get(i).copied().flatten() {
                    Some(token) => {
                        seq.push_token(token);
                        update.new_token = Some(token);
                        if !seq.params.ignore_eog && seq.params.eog_ids.contains(&token) {
                            Some(FinishReason::Eog)
                        } else if seq.num_generated_tokens() >= seq.params.max_tokens {
                            Some(FinishReason::Length)
                        } else {
                            None
                        }
                    }
                    None => Some(FinishReason::Error(format!(
                        "{id}: the runner returned no token for its sampling row"
                    ))),
                };
                if let Some(reason) = reason {
                    self.end(id, reason.clone());
                    update.finished = Some(reason);
                }
            }
            updates.push(update);
        }
        // The plan has run: units emptied in this step can be released.
        self.block_manager.end_step();
        updates
    }

    fn finish_reason_of(&self, id: SeqId) -> Option<FinishReason> {
        self.seqs.get(&id).and_then(|s| s.finish_reason().cloned())
    }

    /// Ends a waiting or running sequence now (stop strings, cancellation),
    /// freeing its pages. A finished sequence keeps its first reason.
    pub fn finish(&mut self, id: SeqId, reason: FinishReason) -> Result<()> {
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        if !seq.is_finished() {
            self.end(id, reason);
        }
        Ok(())
    }

    /// Cancels a sequence: `finish(id, FinishReason::Aborted)`.
    pub fn abort(&mut self, id: SeqId) -> Result<()> {
        self.finish(id, FinishReason::Aborted)
    }

    /// A sequence, in any state, until it is removed.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Removes a finished sequence and returns it.
    pub fn remove(&mut self, id: SeqId) -> Result<Sequence> {
        match self.seqs.get(&id) {
            None => Err(EngineError::UnknownSequence(id)),
            Some(s) if !s.is_finished() => Err(EngineError::NotFinished(id)),
            Some(_) => self
                .seqs
                .remove(&id)
                .ok_or(EngineError::UnknownSequence(id)),
        }
    }

    /// Removes and returns every finished sequence, by arrival. O(num sequences).
    pub fn take_finished(&mut self) -> Vec<Sequence> {
        let ids: Vec<SeqId> = self
            .seqs
            .values()
            .filter(|s| s.is_finished())
            .map(|s| s.id)
            .collect();
        let mut done: Vec<Sequence> = ids
            .into_iter()
            .filter_map(|id| self.seqs.remove(&id))
            .collect();
        done.sort_by_key(|s| s.arrival);
        done
    }

    /// Whether any sequence is waiting, swapped or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.swapped.is_empty()
    }

    /// Sequences swapped out to host slots.
    pub fn num_swapped(&self) -> usize {
        self.swapped.len()
    }

    /// Swapped sequences, by arrival.
    pub fn swapped_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.swapped.iter().copied()
    }

    /// Host page slots of the swap space (0 when swap is off).
    pub fn num_host_slots(&self) -> usize {
        self.config.swap.num_slots()
    }

    /// Host slots holding a swapped sequence's page.
    pub fn num_host_slots_in_use(&self) -> usize {
        self.num_host_slots() - self.host_free.len() - self.host_freed.len()
    }

    /// Host bytes holding swapped K/V: slots in use × page bytes.
    pub fn host_bytes_in_use(&self) -> u64 {
        self.num_host_slots_in_use() as u64 * self.config.swap.page_bytes
    }

    /// Growable-KV counters: reserved / committed / peak pages, grow and
    /// release events (see [`BlockManager::commit_stats`]).
    pub fn kv_commit_stats(&self) -> &KvCommitStats {
        self.block_manager.commit_stats()
    }

    /// Sequences held in any state (waiting, running, or finished and not
    /// yet removed).
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Sequences waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and holding pages.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Running sequences, by arrival.
    pub fn running_ids(&self) -> &[SeqId] {
        &self.running
    }

    /// Waiting sequences, by arrival.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Totals since creation.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV page allocator (balance checks, telemetry).
    pub fn block_manager(&self) -> &BlockManager {
        &self.block_manager
    }

    /// One KV page with its owners, use and sharing (what
    /// [`Scheduler::kv_page_map`] lists for it); `None` outside the cache.
    /// O(holders of the page).
    pub fn kv_page_info(&self, page: PageId) -> Option<KvPageInfo> {
        if page.index() >= self.block_manager.num_pages() {
            return None;
        }
        let ps = self.config.page_size;
        let bm = &self.block_manager;
        let cached = bm.is_cached(page);
        let refcount = bm.refcount(page);
        let holders = bm.holders(page);
        let mut tokens_used = if cached { ps } else { 0 };
        for &(id, index) in holders {
            if let Some(seq) = self.seqs.get(&id) {
                let used = seq
                    .num_computed_tokens
                    .saturating_sub(index as usize * ps)
                    .min(ps);
                tokens_used = tokens_used.max(used);
            }
        }
        Some(KvPageInfo {
            page,
            owners: holders.iter().map(|&(id, _)| id).collect(),
            positions: holders.iter().map(|&(_, index)| index).collect(),
            tokens_used,
            refcount,
            shared: refcount > 1,
            cached,
        })
    }

    /// Moves the KV pages changed since the last call (every page on the
    /// first call) into `out`, for telemetry deltas: read them with
    /// [`Scheduler::kv_page_info`]. O(pages changed).
    pub fn take_kv_changes(&mut self, out: &mut Vec<PageId>) {
        self.block_manager.take_dirty_pages(out);
    }

    /// Every KV page with its owners, use and sharing, in page order.
    /// O(num_pages + pages held by running sequences).
    pub fn kv_page_map(&self) -> Vec<KvPageInfo> {
        let ps = self.config.page_size;
        let mut map: Vec<KvPageInfo> = self
            .block_manager
            .page_states()
            .into_iter()
            .map(|s| KvPageInfo {
                page: s.page,
                owners: Vec::new(),
                positions: Vec::new(),
                tokens_used: if s.hash.is_some() { ps } else { 0 },
                refcount: s.refcount,
                shared: s.refcount > 1,
                cached: s.hash.is_some(),
            })
            .collect();
        for id in &self.running {
            let Some(seq) = self.seqs.get(id) else {
                continue;
            };
            for (i, page) in seq.block_table.iter().enumerate() {
                if let Some(info) = map.get_mut(page.index()) {
                    info.owners.push(*id);
                    info.positions.push(i as u32);
                    let used = seq.num_computed_tokens.saturating_sub(i * ps).min(ps);
                    info.tokens_used = info.tokens_used.max(used);
                }
            }
        }
        map
    }
}

#[cfg(test)]
mod tests;
