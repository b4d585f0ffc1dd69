//! Picking tokens from logits rows: `argmax_rows` and `top_k_rows`, the
//! reference for `kernels/sampling.cu` and `shaders/sampling.wgsl`.
//!
//! Orders match the host sampler exactly: argmax keeps the first maximum
//! (`v > best`, so ties go to the lower id and NaN never wins); top-k orders
//! by `f32::total_cmp` descending, ties to the lower id.

use std::cell::RefCell;
use std::cmp::Ordering;

/// Index of the largest value of `row`; ties to the lower index.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The host sampler's candidate order: larger logit first, then lower id.
pub fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

thread_local! {
    /// Candidate scratch, reused between calls (no allocation per token).
    static CAND: RefCell<Vec<(u32, f32)>> = const { RefCell::new(Vec::new()) };
}

/// The `k` best `(id, logit)` of `row` in [`by_logit`] order, written to
/// `values` and `ids` (k each). `k <= row.len()`.
pub fn top_k(row: &[f32], k: usize, values: &mut [f32], ids: &mut [u32]) {
    CAND.with_borrow_mut(|cand| {
        cand.clear();
        cand.extend(row.iter().enumerate().map(|(i, &v)| (i as u32, v)));
        if k == 0 {
            return;
        }
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit);
            cand.truncate(k);
        }
        cand.sort_unstable_by(by_logit);
        for (i, &(id, v)) in cand.iter().enumerate() {
            values[i] = v;
            ids[i] = id;
        }
    });
}
