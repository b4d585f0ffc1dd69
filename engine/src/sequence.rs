//! One request's tokens and its place in the KV cache.
//!
//! A [`Sequence`] is plain data owned by the [`crate::scheduler::Scheduler`]
//! (never shared behind a lock): the prompt and the tokens generated so far,
//! how many of them already have their K/V written, the pages that hold them,
//! and the request's stopping rules.
//!
//! Invariants (checked by the scheduler's tests):
//! - `num_prompt_tokens <= tokens.len()`, and the prompt is never empty.
//! - While running: `num_computed_tokens < tokens.len()` (the last token's K/V
//!   is written by the step that samples the next one), and
//!   `block_table.len() * page_size >= num_computed_tokens`.
//! - While waiting: `block_table` is empty and `num_computed_tokens == 0`.
//! - While swapped: `block_table` is empty, `num_computed_tokens > 0` and
//!   `host_slots` holds `ceil(num_computed_tokens / page_size)` host slots
//!   (the K/V of those tokens, page by page); otherwise `host_slots` is empty.
//! - `page_hashes.len() == tokens.len() / page_size`: the prefix-cache hash of
//!   every *full* page of `tokens`, whether its K/V is computed or not, kept up
//!   to date in O(page_size) per appended page (see
//!   [`crate::prefix_hash::hash_page`]).

use std::fmt;

use crate::prefix_hash::hash_page;

/// A token id of the model's vocabulary.
pub type TokenId = u32;

/// Identifies one request for its whole life. Ids are handed out in arrival
/// order and never reused by one scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// Index of one KV page (`0..num_pages`). Slot of a token =
/// `page * page_size + offset_in_page` (see `pagoda_backend::kv_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(pub u32);

impl PageId {
    /// The page index as `usize`, for indexing per-page arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page#{}", self.0)
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated `max_tokens` tokens.
    Length,
    /// It sampled an end-of-generation token (its id is kept in the
    /// generated tokens; it adds no text).
    Eog,
    /// The engine matched a stop string.
    Stop,
    /// The caller cancelled it.
    Aborted,
    /// It failed (an injected fault, no KV page could ever be found, ...).
    Error(String),
}

/// Where a sequence is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued (new, or preempted and waiting to be recomputed); holds no pages.
    Waiting,
    /// Admitted: holds pages and is scheduled step by step.
    Running,
    /// Preempted by swapping: its computed K/V lives in host slots
    /// (`host_slots`), it holds no device page, and it resumes (pages copied
    /// back) before newer sequences are admitted.
    Swapped,
    /// Done; its pages are released.
    Finished(FinishReason),
}

/// Stopping and output rules of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqParams {
    /// Tokens to generate at most (at least 1).
    pub max_tokens: usize,
    /// End-of-generation token ids.
    pub eog_ids: Vec<TokenId>,
    /// Keep generating after an end-of-generation token (benchmarks).
    pub ignore_eog: bool,
    /// Return logits for every prompt position (perplexity), not just the
    /// rows that are sampled.
    pub want_all_logits: bool,
}

impl SeqParams {
    /// Generate up to `max_tokens` tokens, stopping at none of the ids.
    pub fn with_max_tokens(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            eog_ids: Vec::new(),
            ignore_eog: false,
            want_all_logits: false,
        }
    }
}

/// One request: its tokens, its pages and its status.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// The request's id.
    pub id: SeqId,
    /// Prompt followed by the generated tokens. (len)
    pub tokens: Vec<TokenId>,
    /// Length of the prompt at the start of `tokens`.
    pub num_prompt_tokens: usize,
    /// Leading tokens whose K/V is written in the pages of `block_table`.
    pub num_computed_tokens: usize,
    /// Tokens found in the prefix cache at the last admission.
    pub num_cached_tokens: usize,
    /// Pages holding the K/V of `tokens`, in position order. (ceil(num_kv_tokens / page_size))
    pub block_table: Vec<PageId>,
    /// Where it is in its life.
    pub status: SeqStatus,
    /// Its stopping rules.
    pub params: SeqParams,
    /// Arrival order (smaller arrived earlier); decides preemption victims.
    pub arrival: u64,
    /// Prefix-cache hash of every full page of `tokens`. (len / page_size)
    pub page_hashes: Vec<u64>,
    /// While swapped out: the host slot holding each of the first
    /// `ceil(num_computed_tokens / page_size)` pages' K/V, in position order.
    /// Empty otherwise. (ceil(num_computed_tokens / page_size))
    pub host_slots: Vec<u32>,
    /// Leading pages of `block_table` already offered to the prefix cache.
    pub(crate) num_registered_pages: usize,
    page_size: usize,
}

impl Sequence {
    /// A waiting sequence. `page_size` must be the block manager's (> 0).
    pub fn new(
        id: SeqId,
        prompt: Vec<TokenId>,
        params: SeqParams,
        arrival: u64,
        page_size: usize,
    ) -> Self {
        debug_assert!(page_size > 0, "page_size must be positive");
        let mut seq = Self {
            id,
            num_prompt_tokens: prompt.len(),
            tokens: Vec::with_capacity(prompt.len() + params.max_tokens),
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            block_table: Vec::new(),
            status: SeqStatus::Waiting,
            params,
            arrival,
            page_hashes: Vec::new(),
            host_slots: Vec::new(),
            num_registered_pages: 0,
            page_size: page_size.max(1),
        };
        for t in prompt {
            seq.push_token(t);
        }
        seq
    }

    /// Appends one token, hashing the page it completes. O(page_size) when a
    /// page becomes full, O(1) otherwise.
    pub(crate) fn push_token(&mut self, token: TokenId) {
        self.tokens.push(token);
        let ps = self.page_size;
        if self.tokens.len().is_multiple_of(ps) {
            let start = self.tokens.len() - ps;
            let parent = self.page_hashes.last().copied();
            self.page_hashes
                .push(hash_page(parent, &self.tokens[start..]));
        }
    }

    /// Number of tokens (prompt + generated).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a sequence has a non-empty prompt.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The prompt tokens.
    pub fn prompt(&self) -> &[TokenId] {
        &self.tokens[..self.num_prompt_tokens]
    }

    /// The generated tokens (an end-of-generation token included).
    pub fn output(&self) -> &[TokenId] {
        &self.tokens[self.num_prompt_tokens..]
    }

    /// Number of generated tokens.
    pub fn num_generated_tokens(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }

    /// Tokens still to compute before the next token can be sampled.
    pub fn num_uncomputed_tokens(&self) -> usize {
        self.tokens.len().saturating_sub(self.num_computed_tokens)
    }

    /// Whether the sequence is decoding: all tokens but the last sampled one
    /// have K/V, and it has generated at least one token.
    pub fn is_decoding(&self) -> bool {
        self.num_generated_tokens() > 0 && self.num_computed_tokens + 1 == self.tokens.len()
    }

    /// Whether it has finished (for any reason).
    pub fn is_finished(&self) -> bool {
        matches!(self.status, SeqStatus::Finished(_))
    }

    /// The reason it finished, if it has.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        match &self.status {
            SeqStatus::Finished(r) => Some(r),
            _ => None,
        }
    }

    /// Page size the sequence hashes its pages with.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pages_are_hashed_as_tokens_arrive() {
        let mut s = Sequence::new(
            SeqId(0),
            vec![1, 2, 3, 4, 5],
            SeqParams::with_max_tokens(4),
            0,
            2,
        );
        assert_eq!(s.page_hashes.len(), 2);
        assert_eq!(s.page_hashes[0], hash_page(None, &[1, 2]));
        assert_eq!(s.page_hashes[1], hash_page(Some(s.page_hashes[0]), &[3, 4]));
        s.push_token(6);
        assert_eq!(s.page_hashes.len(), 3);
        assert_eq!(s.page_hashes[2], hash_page(Some(s.page_hashes[1]), &[5, 6]));
        assert_eq!(s.output(), &[6]);
        assert_eq!(s.prompt(), &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn same_page_tokens_under_different_parents_hash_differently() {
        let a = Sequence::new(
            SeqId(0),
            vec![1, 2, 9, 9],
            SeqParams::with_max_tokens(1),
            0,
            2,
        );
        let b = Sequence::new(
            SeqId(1),
            vec![3, 4, 9, 9],
            SeqParams::with_max_tokens(1),
            1,
            2,
        );
        assert_ne!(a.page_hashes[1], b.page_hashes[1]);
    }

    #[test]
    fn decoding_means_one_token_left_after_a_generated_token() {
        let mut s = Sequence::new(SeqId(0), vec![1, 2, 3], SeqParams::with_max_tokens(4), 0, 4);
        assert!(!s.is_decoding());
        s.num_computed_tokens = 3;
        s.push_token(7);
        assert!(s.is_decoding());
        assert_eq!(s.num_uncomputed_tokens(), 1);
    }
}
