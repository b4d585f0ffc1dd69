// weights.wgsl — decoding weights, prepended to matmul.wgsl and embedding.wgsl (which bind
// the weight piece as `W: array<u32>`).
//
// Layout (pagoda_backend::weight_layout, the CUDA kernels' too): a quantized piece of
// `nblocks` 32-element blocks holds every block's quants first ([nblocks][QB] bytes:
// QB = 32 for Q8_0, 16 for Q4_0 / Q4_1), then every block's scales ([nblocks][SB] bytes:
// SB = 2, d as f16, for Q8_0 / Q4_0; SB = 4, d then m, for Q4_1). Float weights are
// row-major f32, f16 or bf16.
// Values (the CPU's decode_block): Q8_0 q·d; Q4_0 (q − 8)·d; Q4_1 fma(q, d, m), where a Q4
// element j < 16 is the low nibble of quant byte j and j ≥ 16 the high nibble of byte j − 16.

// 32 elements of quantized block `i` (= row · blocks_per_row + b) of the piece whose words start at W[base].
fn w_block(base: u32, dt: u32, i: u32, nblocks: u32, out: ptr<function, array<f32, 32>>) {
    switch dt {
        case 3u: { // Q8_0
            let sw = W[base + (nblocks * 32u) / 4u + i / 2u];
            let d = half_at(sw, (i & 1u) == 1u);
            let q0 = base + i * 8u;
            for (var w = 0u; w < 8u; w++) {
                let word = W[q0 + w];
                for (var c = 0u; c < 4u; c++) {
                    let byte = (word >> (8u * c)) & 0xFFu;
                    let q = f32(i32(byte << 24u) >> 24u);
                    (*out)[4u * w + c] = q * d;
                }
            }
        }
        case 4u, 5u: { // Q4_0, Q4_1
            let sb = base + (nblocks * 16u) / 4u;
            var d: f32;
            var m: f32 = 0.0;
            if (dt == 4u) {
                d = half_at(W[sb + i / 2u], (i & 1u) == 1u);
            } else {
                let sw = W[sb + i];
                d = half_lo(sw);
                m = half_hi(sw);
            }
            let q0 = base + i * 4u;
            for (var w = 0u; w < 4u; w++) {
                let word = W[q0 + w];
                for (var c = 0u; c < 4u; c++) {
                    let byte = (word >> (8u * c)) & 0xFFu;
                    let lo = f32(byte & 15u);
                    let hi = f32(byte >> 4u);
                    if (dt == 4u) {
                        (*out)[4u * w + c] = (lo - 8.0) * d;
                        (*out)[16u + 4u * w + c] = (hi - 8.0) * d;
                    } else {
                        (*out)[4u * w + c] = fma(lo, d, m);
                        (*out)[16u + 4u * w + c] = fma(hi, d, m);
                    }
                }
            }
        }
        default: {}
    }
}

// Element `idx` (= row · k + column) of a float weight piece whose words start at W[base].
fn w_elem(base: u32, dt: u32, idx: u32) -> f32 {
    switch dt {
        case 0u: { return bitcast<f32>(W[base + idx]); }
        case 1u: { return half_at(W[base + idx / 2u], (idx & 1u) == 1u); }
        default: { return bf16_to_f32(W[base + idx / 2u] >> (16u * (idx & 1u))); }
    }
}
