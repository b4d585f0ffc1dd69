// weights.wgsl — decoding weights, prepended to matmul.wgsl and embedding.wgsl (which bind
// the weight piece as `W: array<u32>`).
//
// Layout (pagoda_backend::weight_layout, the CUDA kernels' too): a quantized piece of
// `nblocks` blocks holds one region per block field, `[nblocks][len]` bytes each, the quants
// first (every region starts on a word):
//   Q8_0 (32)  qs 32 | d 2              Q4_0 (32)  qs 16 | d 2       Q4_1 (32) qs 16 | d,m 4
//   Q5_0 (32)  qs 16 | qh 4 | d 2       Q5_1 (32)  qs 16 | qh 4 | d,m 4
//   Q4_K (256) qs 128 | d,dmin,scales[12] 16
//   Q5_K (256) qh[32],qs[128] 160 | d,dmin,scales[12] 16
//   Q6_K (256) ql[128],qh[64] 192 | scales (i8) 16 | d 2
// Float weights are row-major f32, f16 or bf16.
// Values (the CPU's decode_block / pagoda_backend::kquant, bit for bit): Q8_0 q·d;
// Q4_0 (q − 8)·d; Q4_1 fma(q, d, m) (a Q4 element j < 16 is the low nibble of quant byte j,
// j ≥ 16 the high nibble of byte j − 16); Q5_0 (q − 16)·d and Q5_1 q·d + m with the fifth bit
// of element j in bit j of qh; Q4_K / Q5_K (d·sc)·q − dmin·m (scale_min_k4's 6-bit pairs);
// Q6_K (d·sc)·(q − 32). Where the CPU rounds a product before an add, the product goes
// through `unfused`, so no compiler contracts the pair into an fma.
// The K-quants are decoded 32 elements (one sub-block: block i = 8 · super-block + sub) at a
// time, so matmul and embedding index every quantized type by 32-element blocks.

// Byte c (0..4) of word w.
fn byte_of(w: u32, c: u32) -> u32 { return (w >> (8u * c)) & 0xFFu; }
// Byte idx (0..12) of the three words a, b, c (a K-quant block's 12 scale bytes).
fn byte12(a: u32, b: u32, c: u32, idx: u32) -> u32 {
    let w = select(select(c, b, idx < 8u), a, idx < 4u);
    return byte_of(w, idx & 3u);
}
// x as it is, through an OR with `z` = 0 read from the parameter buffer (P[79], the window
// offset of binding 80, which no shader has): the compiler cannot see the product, so it
// cannot fuse it with the add that follows (the CPU rounds it first).
fn unfused(x: f32, z: u32) -> f32 { return bitcast<f32>(bitcast<u32>(x) | z); }

// 32 elements of quantized block `i` (= row · k / 32 + b; `nblocks`: the piece's blocks,
// super-blocks for the K-quants) of the piece whose words start at W[base].
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
        case 6u, 7u: { // Q5_0, Q5_1
            let qh = W[base + nblocks * 4u + i];
            let sb = base + nblocks * 5u;
            var d: f32;
            var m: f32 = 0.0;
            if (dt == DT_Q5_0) {
                d = half_at(W[sb + i / 2u], (i & 1u) == 1u);
            } else {
                let sw = W[sb + i];
                d = half_lo(sw);
                m = half_hi(sw);
            }
            let z = P[79];
            let q0 = base + i * 4u;
            for (var w = 0u; w < 4u; w++) {
                let word = W[q0 + w];
                for (var c = 0u; c < 4u; c++) {
                    let j = 4u * w + c;
                    let byte = byte_of(word, c);
                    let lo = (byte & 15u) | (((qh >> j) & 1u) << 4u);
                    let hi = (byte >> 4u) | (((qh >> (j + 16u)) & 1u) << 4u);
                    if (dt == DT_Q5_0) {
                        (*out)[j] = f32(i32(lo) - 16) * d;
                        (*out)[j + 16u] = f32(i32(hi) - 16) * d;
                    } else {
                        (*out)[j] = unfused(f32(lo) * d, z) + m;
                        (*out)[j + 16u] = unfused(f32(hi) * d, z) + m;
                    }
                }
            }
        }
        case 8u, 9u: { // Q4_K, Q5_K: sub-block j of super-block s
            let s = i / 8u;
            let j = i % 8u;
            let k5 = dt == DT_Q5_K;
            let sbw = select(32u, 40u, k5); // words of region 0 a super-block
            let hb = base + nblocks * sbw + s * 4u;
            let dm = W[hb];
            let a = W[hb + 1u];
            let b = W[hb + 2u];
            let c3 = W[hb + 3u];
            var sc: u32;
            var mn: u32;
            if (j < 4u) {
                sc = byte12(a, b, c3, j) & 63u;
                mn = byte12(a, b, c3, j + 4u) & 63u;
            } else {
                sc = (byte12(a, b, c3, j + 4u) & 15u) | ((byte12(a, b, c3, j - 4u) >> 6u) << 4u);
                mn = (byte12(a, b, c3, j + 4u) >> 4u) | ((byte12(a, b, c3, j) >> 6u) << 4u);
            }
            let d1 = half_lo(dm) * f32(sc);
            let mn1 = half_hi(dm) * f32(mn);
            let s0 = base + s * sbw;
            let q0 = s0 + select(0u, 8u, k5) + (j / 2u) * 8u;
            let shift = 4u * (j & 1u);
            let z = P[79];
            for (var w = 0u; w < 8u; w++) {
                let word = W[q0 + w];
                var hw = 0u;
                if (k5) { hw = W[s0 + w]; }
                for (var c = 0u; c < 4u; c++) {
                    let q = ((byte_of(word, c) >> shift) & 15u) | (((byte_of(hw, c) >> j) & 1u) << 4u);
                    (*out)[4u * w + c] = unfused(d1 * f32(q), z) - mn1;
                }
            }
        }
        case 10u: { // Q6_K: quarter q4 of half h of super-block s
            let s = i / 8u;
            let j = i % 8u;
            let h = j / 4u;
            let q4 = j % 4u;
            let s0 = base + s * 48u;
            let ql0 = s0 + 16u * h + 8u * (q4 & 1u);
            let qh0 = s0 + 32u + 8u * h;
            let si = 8u * h + 2u * q4; // even: both scales in one word
            let sword = W[base + nblocks * 48u + s * 4u + si / 4u];
            let d = half_at(W[base + nblocks * 52u + s / 2u], (s & 1u) == 1u);
            let sc0 = f32(i32(byte_of(sword, si & 3u) << 24u) >> 24u);
            let sc1 = f32(i32(byte_of(sword, (si & 3u) + 1u) << 24u) >> 24u);
            let ds0 = d * sc0;
            let ds1 = d * sc1;
            let lsh = 4u * (q4 >> 1u);
            let hsh = 2u * q4;
            for (var w = 0u; w < 8u; w++) {
                let lw = W[ql0 + w];
                let hw = W[qh0 + w];
                let ds = select(ds0, ds1, w >= 4u);
                for (var c = 0u; c < 4u; c++) {
                    let q = ((byte_of(lw, c) >> lsh) & 15u) | (((byte_of(hw, c) >> hsh) & 3u) << 4u);
                    (*out)[4u * w + c] = ds * f32(i32(q) - 32);
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
