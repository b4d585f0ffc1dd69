//! Graph memory: what a backend that captures decode steps as graphs (CUDA
//! graphs) needs to say how much memory they will take, so the memory plan
//! counts it before anything is loaded.
//!
//! Decode steps are captured for a bounded set of padded batch sizes
//! ([`decode_graph_batch_sizes`]), all replaying on one static workspace; the
//! graphs' own memory (executable objects, private pools) is what
//! [`crate::Backend::graph_memory_bytes`] reports for a [`GraphPlanInput`].
//! A backend without graphs reports 0.

/// What the engine will capture, for [`crate::Backend::graph_memory_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPlanInput {
    /// Padded decode batch sizes, one graph each, ascending.
    pub batch_sizes: Vec<usize>,
    /// Tokens per step the workspace holds (prefill steps are not captured).
    pub max_tokens: usize,
    /// Transformer blocks per forward pass (kernel nodes scale with it).
    pub num_layers: usize,
    /// Bytes of the static activation workspace every graph replays on.
    pub workspace_bytes: u64,
}

/// Padded batch sizes captured for up to `max_seqs` sequences: 1, 2, 4, 8,
/// ... below `max_seqs`, then `max_seqs` itself. Empty for 0.
pub fn decode_graph_batch_sizes(max_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |&b| b.checked_mul(2))
        .take_while(|&b| b < max_seqs)
        .collect();
    if max_seqs > 0 {
        sizes.push(max_seqs);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_are_powers_of_two_then_the_max() {
        assert_eq!(decode_graph_batch_sizes(0), Vec::<usize>::new());
        assert_eq!(decode_graph_batch_sizes(1), vec![1]);
        assert_eq!(decode_graph_batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(decode_graph_batch_sizes(12), vec![1, 2, 4, 8, 12]);
    }
}
