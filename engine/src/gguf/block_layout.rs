//! Block layouts of the standard ggml tensor types: how many elements one
//! block holds and how many bytes it takes (ggml's `type_traits`
//! `blck_size` and `type_size`), so that the reader can size every tensor
//! of a file, whatever its type, and the loader decides what it supports.

/// `(elements per block, bytes per block)` of ggml type `id`, or `None` for
/// an id ggml does not define (or has removed: 4, 5, 31–33, 36–38).
pub fn ggml_block_layout(id: u32) -> Option<(usize, usize)> {
    // Super-block size of the K-quants and most IQ types (ggml's QK_K).
    const QK_K: usize = 256;
    Some(match id {
        0 => (1, 4),                       // F32
        1 => (1, 2),                       // F16
        2 => (32, 2 + 16),                 // Q4_0: d, 32 nibbles
        3 => (32, 4 + 16),                 // Q4_1: d, m, 32 nibbles
        6 => (32, 2 + 4 + 16),             // Q5_0: d, high bits, nibbles
        7 => (32, 4 + 4 + 16),             // Q5_1: d, m, high bits, nibbles
        8 => (32, 2 + 32),                 // Q8_0: d, 32 bytes
        9 => (32, 4 + 32),                 // Q8_1: d, s, 32 bytes
        10 => (QK_K, 16 + 64 + 4),         // Q2_K: scales, quants, d, dmin
        11 => (QK_K, 32 + 64 + 12 + 2),    // Q3_K: hmask, quants, scales, d
        12 => (QK_K, 4 + 12 + 128),        // Q4_K: d, dmin, scales, quants
        13 => (QK_K, 4 + 12 + 32 + 128),   // Q5_K: d, dmin, scales, qh, qs
        14 => (QK_K, 128 + 64 + 16 + 2),   // Q6_K: ql, qh, scales, d
        15 => (QK_K, 4 + 256 + 32),        // Q8_K: d (f32), quants, bsums
        16 => (QK_K, 2 + 64),              // IQ2_XXS
        17 => (QK_K, 2 + 64 + 8),          // IQ2_XS
        18 => (QK_K, 2 + 96),              // IQ3_XXS
        19 => (QK_K, 2 + 32 + 16),         // IQ1_S
        20 => (32, 2 + 16),                // IQ4_NL
        21 => (QK_K, 2 + 64 + 8 + 32 + 4), // IQ3_S
        22 => (QK_K, 2 + 64 + 8 + 8),      // IQ2_S
        23 => (QK_K, 2 + 2 + 4 + 128),     // IQ4_XS
        24 => (1, 1),                      // I8
        25 => (1, 2),                      // I16
        26 => (1, 4),                      // I32
        27 => (1, 8),                      // I64
        28 => (1, 8),                      // F64
        29 => (QK_K, 32 + 16 + 8),         // IQ1_M
        30 => (1, 2),                      // BF16
        34 => (QK_K, 48 + 4 + 2),          // TQ1_0
        35 => (QK_K, 64 + 2),              // TQ2_0
        39 => (32, 1 + 16),                // MXFP4: e8m0 scale, 32 nibbles
        _ => return None,
    })
}
