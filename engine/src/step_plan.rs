//! The value the scheduler hands the model runner each step.

/// Identifier of a request/sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Everything the model runner needs for one forward pass: plain arrays, no
/// device handles, no global context.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// (num_tokens) token ids of every scheduled token, sequences back to back.
    pub input_ids: Vec<u32>,
    /// (num_tokens) position of each token in its sequence.
    pub positions: Vec<u32>,
    /// (num_tokens) KV slot of each token: `page * page_size + offset`.
    pub slot_mapping: Vec<u32>,
    /// (num_seqs, max_blocks_per_seq) page ids, row-major, padded with 0.
    pub block_tables: Vec<u32>,
    /// Width of a `block_tables` row.
    pub max_blocks_per_seq: usize,
    /// (num_seqs) tokens in KV for each sequence after this step.
    pub context_lens: Vec<u32>,
    /// (num_seqs + 1) start row of each sequence's tokens.
    pub query_start_locs: Vec<u32>,
    /// (num_seqs) the sequences, in row order.
    pub seq_ids: Vec<SeqId>,
    /// (num_logits) token rows whose logits the runner returns, in order.
    pub logits_indices: Vec<u32>,
    /// (num_seqs) index into `logits_indices` of the row to sample from, or
    /// `None` while the sequence's prefill is unfinished.
    pub sample_rows: Vec<Option<u32>>,
    /// Page copies `(src, dst)` to perform before the forward (copy-on-write).
    pub copy_pages: Vec<(u32, u32)>,
    /// Tokens of prefilling sequences.
    pub num_prefill_tokens: usize,
    /// Tokens of decoding sequences.
    pub num_decode_tokens: usize,
}

impl StepPlan {
    /// Tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
    /// Sequences in the step.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }
}
