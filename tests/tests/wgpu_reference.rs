//! The model fixture tests on the wgpu backend (CI: Mesa lavapipe), run twice: on the
//! adapter as it is and with `SHADER_F16` and `SUBGROUP` masked off. The check bodies are
//! `pagoda_tests::reference`'s, shared with the CPU and CUDA runs.

use std::sync::Arc;

use pagoda_tests::reference;
use pagoda_wgpu::{WgpuBackend, WgpuOptions};

fn wgpu(masked: bool) -> Arc<WgpuBackend> {
    // `PAGODA_WGPU_MATMUL=coalesced` runs the fixtures on the coalesced matmul (CI: the
    // adapter's own, lane per row on lavapipe).
    let opts = WgpuOptions {
        mask_shader_f16: masked,
        mask_subgroup: masked,
        matmul: WgpuOptions::from_env().matmul,
        ..WgpuOptions::default()
    };
    Arc::new(WgpuBackend::new(&opts).expect(
        "a wgpu adapter (CI: Mesa lavapipe, `apt-get install mesa-vulkan-drivers libvulkan1`)",
    ))
}

macro_rules! both {
    ($name:ident, $masked:ident, $check:path) => {
        #[test]
        fn $name() {
            $check(wgpu(false));
        }
        #[test]
        fn $masked() {
            $check(wgpu(true));
        }
    };
}

both!(
    last_logits_match_exact_f64_within_1e3,
    last_logits_match_exact_f64_within_1e3_masked,
    reference::last_logits_match_exact_f64
);
both!(
    argmax_at_every_position_matches_references,
    argmax_at_every_position_matches_references_masked,
    reference::argmax_at_every_position
);
both!(
    shuffled_interleaved_pages_give_bit_identical_logits,
    shuffled_interleaved_pages_give_bit_identical_logits_masked,
    reference::shuffled_and_interleaved_pages_are_bit_identical
);
both!(
    greedy_generation_matches_llama_cpp_up_to_low_margin_steps,
    greedy_generation_matches_llama_cpp_up_to_low_margin_steps_masked,
    reference::greedy_matches_llama_cpp_batched
);
both!(
    perplexity_of_the_first_chunk_matches_the_exact_reference,
    perplexity_of_the_first_chunk_matches_the_exact_reference_masked,
    reference::first_chunk_perplexity_matches_exact
);
