//! The plan of one engine step: everything the model runner sees.
//!
//! A [`StepPlan`] is a value of flat arrays (no device handles, no references
//! into the scheduler), built by [`crate::scheduler::Scheduler::schedule`] and
//! read by the model runner and by
//! [`crate::scheduler::Scheduler::postprocess`]. Kernels index K/V only through
//! `slot_mapping`, `block_tables` and `context_lens` (layout in
//! `pagoda_backend::kv_cache`).
//!
//! Token rows are grouped by sequence: sequence `i` owns rows
//! `query_start_locs[i] .. query_start_locs[i + 1]`, decoding sequences first,
//! then prefill chunks.
//!
//! Invariants (checked by [`StepPlan::validate`]):
//! - every per-token array has `num_tokens()` entries, every per-sequence array
//!   `num_seqs()`, `query_start_locs` `num_seqs() + 1`, starting at 0 and
//!   nondecreasing;
//! - positions of one sequence are consecutive and end at `context_lens[i] - 1`;
//! - slots are unique within a step;
//! - `logits_indices` is strictly increasing and `sample_rows[i]` points at the
//!   last row of sequence `i`.
//!
//! Page copies run before the forward pass in this order: `swap_out`
//! (device page -> host slot), `copy_pages` (copy-on-write), `swap_in`
//! (host slot -> device page). A page freed by swap-out or copy-on-write may
//! be the destination of a later copy or a write in the same step, so every
//! read comes before any write to it. A plan may hold copies and no token
//! rows (a sequence swapped itself out and nothing else ran).
//!
//! Cost: building is O(num_tokens + num_seqs * max_blocks_per_seq).

use crate::sequence::{PageId, SeqId, TokenId};

/// One step's work for the model runner. Shapes beside each field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Token ids to run. (num_tokens)
    pub input_ids: Vec<TokenId>,
    /// Position of each token in its sequence. (num_tokens)
    pub positions: Vec<u32>,
    /// KV slot each token's K/V is written to: `page * page_size + offset`. (num_tokens)
    pub slot_mapping: Vec<u32>,
    /// Page ids of each sequence, row-major, padded with 0 past the
    /// sequence's pages (kernels never read past `context_lens`).
    /// (num_seqs, max_blocks_per_seq)
    pub block_tables: Vec<u32>,
    /// Width of a `block_tables` row: the most pages of any sequence here.
    pub max_blocks_per_seq: usize,
    /// Tokens in each sequence's KV after this step. (num_seqs)
    pub context_lens: Vec<u32>,
    /// First token row of each sequence, then `num_tokens`. (num_seqs + 1)
    pub query_start_locs: Vec<u32>,
    /// The sequence of each block-table row. (num_seqs)
    pub seq_ids: Vec<SeqId>,
    /// Token rows whose logits the runner must return, in order. (num_logits)
    pub logits_indices: Vec<u32>,
    /// Per sequence: index into `logits_indices` of the row to sample the next
    /// token from; `None` while a chunked prefill is unfinished. (num_seqs)
    pub sample_rows: Vec<Option<u32>>,
    /// Copy-on-write page copies `(src, dst)` to do, in order, before the
    /// forward pass writes any K/V. (num_copies)
    pub copy_pages: Vec<(u32, u32)>,
    /// Swap-out copies `(device page, host slot)`: every layer's K/V of the
    /// page goes to the host slot. Done first in the step, before
    /// `copy_pages`, `swap_in` and the forward, because the page is already
    /// free in the block manager and may be reused by this very step.
    /// (num_swap_out)
    pub swap_out: Vec<(u32, u32)>,
    /// Swap-in copies `(host slot, device page)`: the host slot's K/V goes
    /// back to a fresh device page. Done after `swap_out` and `copy_pages`,
    /// before the forward reads it. (num_swap_in)
    pub swap_in: Vec<(u32, u32)>,
    /// Token rows belonging to prefill chunks.
    pub num_prefill_tokens: usize,
    /// Token rows belonging to decoding sequences (one each).
    pub num_decode_tokens: usize,
}

/// Row-major `(rows.len(), width)` block table, rows padded with page 0.
/// Rows longer than `width` are truncated (never happens for a plan's own
/// width).
pub fn pad_block_tables(rows: &[&[PageId]], width: usize) -> Vec<u32> {
    let mut out = vec![0u32; rows.len() * width];
    for (dst, row) in out.chunks_exact_mut(width.max(1)).zip(rows) {
        for (d, p) in dst.iter_mut().zip(row.iter()) {
            *d = p.0;
        }
    }
    out
}

impl StepPlan {
    /// Token rows in the step.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Sequences in the step.
    pub fn num_seqs(&self) -> usize {
        self.seq_ids.len()
    }

    /// The decode-only marker: every row is one decoding sequence's next
    /// token (no prefill chunk), so the runner may pad the step to a batch
    /// bucket and replay a captured graph for it.
    pub fn is_decode_only(&self) -> bool {
        self.num_seqs() > 0
            && self.num_prefill_tokens == 0
            && self.num_decode_tokens == self.num_seqs()
            && self.num_tokens() == self.num_seqs()
    }

    /// Token rows of sequence `i`.
    pub fn rows(&self, i: usize) -> std::ops::Range<usize> {
        self.query_start_locs[i] as usize..self.query_start_locs[i + 1] as usize
    }

    /// Number of new tokens of sequence `i` in this step.
    pub fn num_new_tokens(&self, i: usize) -> usize {
        self.rows(i).len()
    }

    /// Block-table row of sequence `i`. (max_blocks_per_seq)
    pub fn block_table(&self, i: usize) -> &[u32] {
        let w = self.max_blocks_per_seq;
        &self.block_tables[i * w..(i + 1) * w]
    }

    /// Checks the invariants listed in the module docs; returns the first
    /// violation. O(num_tokens + num_seqs).
    pub fn validate(&self, page_size: usize) -> Result<(), String> {
        let (n, s) = (self.num_tokens(), self.num_seqs());
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return Err(format!(
                "per-token arrays disagree: {n} ids, {} positions, {} slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        if self.context_lens.len() != s
            || self.sample_rows.len() != s
            || self.query_start_locs.len() != s + 1
        {
            return Err("per-sequence arrays disagree with seq_ids".into());
        }
        if self.block_tables.len() != s * self.max_blocks_per_seq {
            return Err("block_tables is not (num_seqs, max_blocks_per_seq)".into());
        }
        if self.query_start_locs.first() != Some(&0)
            || self.query_start_locs.last().map(|&x| x as usize) != Some(n)
        {
            return Err("query_start_locs must run from 0 to num_tokens".into());
        }
        if self.num_prefill_tokens + self.num_decode_tokens != n {
            return Err("prefill + decode tokens != num_tokens".into());
        }
        let mut slots = self.slot_mapping.clone();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) {
            return Err("a slot is written twice in one step".into());
        }
        if self.logits_indices.windows(2).any(|w| w[0] >= w[1])
            || self.logits_indices.iter().any(|&r| r as usize >= n)
        {
            return Err("logits_indices must be increasing token rows".into());
        }
        for i in 0..s {
            if self.query_start_locs[i] > self.query_start_locs[i + 1] {
                return Err(format!("query_start_locs decreases at {i}"));
            }
            let rows = self.rows(i);
            if rows.is_empty() {
                return Err(format!("sequence {i} has no tokens"));
            }
            let ctx = self.context_lens[i] as usize;
            if ctx < rows.len() {
                return Err(format!(
                    "sequence {i}: context {ctx} shorter than its {} new tokens",
                    rows.len()
                ));
            }
            let table = self.block_table(i);
            for (k, r) in rows.clone().enumerate() {
                let pos = ctx - rows.len() + k;
                if self.positions[r] as usize != pos {
                    return Err(format!("row {r}: position {} != {pos}", self.positions[r]));
                }
                let page = table.get(pos / page_size).copied().unwrap_or(u32::MAX);
                if self.slot_mapping[r] as usize != page as usize * page_size + pos % page_size {
                    return Err(format!(
                        "row {r}: slot {} disagrees with the block table",
                        self.slot_mapping[r]
                    ));
                }
            }
            if let Some(j) = self.sample_rows[i]
                && self.logits_indices.get(j as usize).map(|&x| x as usize) != Some(rows.end - 1)
            {
                return Err(format!(
                    "sequence {i} samples from a row that is not its last"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tables_are_padded_with_zero() {
        let a = [PageId(3), PageId(5)];
        let b = [PageId(7)];
        assert_eq!(pad_block_tables(&[&a, &b], 3), vec![3, 5, 0, 7, 0, 0]);
        assert_eq!(pad_block_tables(&[], 3), Vec::<u32>::new());
        assert_eq!(pad_block_tables(&[&[], &[]], 0), Vec::<u32>::new());
    }

    #[test]
    fn validate_catches_a_slot_that_disagrees_with_the_block_table() {
        let mut plan = StepPlan {
            input_ids: vec![1, 2],
            positions: vec![0, 1],
            slot_mapping: vec![8, 9],
            block_tables: vec![2],
            max_blocks_per_seq: 1,
            context_lens: vec![2],
            query_start_locs: vec![0, 2],
            seq_ids: vec![SeqId(0)],
            logits_indices: vec![1],
            sample_rows: vec![Some(0)],
            copy_pages: vec![],
            swap_out: vec![],
            swap_in: vec![],
            num_prefill_tokens: 2,
            num_decode_tokens: 0,
        };
        assert_eq!(plan.validate(4), Ok(()));
        plan.slot_mapping[1] = 10;
        assert!(plan.validate(4).is_err());
        plan.slot_mapping[1] = 8;
        assert!(plan.validate(4).unwrap_err().contains("slot"));
    }
}
