//! The CPU forward pass against the reference fixtures (exact_f64 and
//! llama.cpp); the bodies are in `pagoda_tests::reference`, shared with
//! `cuda_reference.rs`.

use pagoda_tests::{cpu_backend, reference};

/// Last logits within 1e-3 of exact f64; argmax equal to llama.cpp's.
#[test]
fn last_logits_match_exact_f64_within_1e3() {
    reference::last_logits_match_exact_f64(cpu_backend());
}

/// Argmax at every position vs exact f64 (clear margins) and llama.cpp (margin >= 0.3).
#[test]
fn argmax_at_every_position_matches_references() {
    reference::argmax_at_every_position(cpu_backend());
}

/// Shuffled and interleaved pages: bit-identical logits.
#[test]
fn shuffled_interleaved_pages_give_bit_identical_logits() {
    reference::shuffled_and_interleaved_pages_are_bit_identical(cpu_backend());
}
