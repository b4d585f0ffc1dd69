// kv_cache.wgsl — write_kv and copy_pages (reference: backends/cpu/src/kv_cache.rs; the fused
// rope_write_kv is rope.wgsl on q and k, then write_kv).
//
// Bindings per entry point:
// write_kv: 1 KS: k (num_tokens, kv_heads, head_dim) f32; 2 VS: v, same shape;
//   3 SLOTS: slot_mapping (num_tokens) u32 (page · page_size + offset); 7 PT; 8.. pieces.
//   Params: 0 num_tokens, 1 page_size, 2 kv_heads, 3 head_dim, 4 row_bytes, 5 page_bytes,
//   6 dtype. One invocation per word a destination row touches: (token, K|V, head, word);
//   the pieces are bound as atomic words, and a word shared with another row (Q8_0 rows of
//   an odd number of blocks are not whole words) is written byte-masked (atomicAnd/Or).
//   f16 / bf16 round to nearest even (as the half crate); Q8_0 as quant::quantize_row_q8_0
//   (d = amax / 127 stored as f16, q = round half away from zero of x / d, clamped to ±127).
// copy_pages: 3 PAIRS: (num_pairs, 2) u32 (src page, dst page); 7 PT; 8.. pieces.
//   Params: 0 num_pairs, 1 page_bytes. One invocation per word of a destination page.
// Workgroups: ceil(invocations / 256) of 256.

@group(0) @binding(1) var<storage, read_write> KS: array<f32>;
@group(0) @binding(2) var<storage, read_write> VS: array<f32>;
@group(0) @binding(3) var<storage, read_write> SLOTS: array<u32>;

fn src_val(which: u32, i: u32) -> f32 {
    if (which == 0u) { return KS[off(0u) + i]; }
    return VS[off(1u) + i];
}

// Byte `b` of the encoded row of `which` (K or V) for source row `src`.
fn row_byte(kv: Kv, which: u32, src: u32, b: u32) -> u32 {
    switch kv.dt {
        case 0u: { return (bitcast<u32>(src_val(which, src + b / 4u)) >> (8u * (b % 4u))) & 0xFFu; }
        case 1u: { return (f32_to_f16_bits(src_val(which, src + b / 2u)) >> (8u * (b % 2u))) & 0xFFu; }
        case 2u: { return (f32_to_bf16_bits(src_val(which, src + b / 2u)) >> (8u * (b % 2u))) & 0xFFu; }
        default: {
            let blk = b / 34u;
            let at = b % 34u;
            var amax = 0.0;
            for (var e = 0u; e < 32u; e++) { amax = max(amax, abs(src_val(which, src + blk * 32u + e))); }
            let d = amax / 127.0;
            if (at < 2u) { return (f32_to_f16_bits(d) >> (8u * at)) & 0xFFu; }
            let id = select(0.0, 1.0 / d, d != 0.0);
            let q = clamp(i32(round_away(src_val(which, src + blk * 32u + at - 2u) * id)), -127, 127);
            return u32(q) & 0xFFu;
        }
    }
}

@compute @workgroup_size(256)
fn write_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let nt = pu(0u);
    let kv = Kv(pu(1u), pu(2u), pu(3u), pu(4u), pu(5u), pu(6u));
    // Words a row can touch: its bytes may start anywhere in a word.
    let words = kv.row_bytes / 4u + 2u;
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= nt * 2u * kv.kv_heads * words) { return; }
    let w = i % words;
    let h = (i / words) % kv.kv_heads;
    let which = (i / (words * kv.kv_heads)) % 2u;
    let t = i / (words * kv.kv_heads * 2u);
    let slot = SLOTS[off(2u) + t];
    let loc = kv_loc(kv, slot / kv.page_size, which, slot % kv.page_size, h);
    let word = loc.y / 4u + w;
    let lo = max(word * 4u, loc.y);
    let hi = min(word * 4u + 4u, loc.y + kv.row_bytes);
    if (lo >= hi) { return; }
    let src = (t * kv.kv_heads + h) * kv.head_dim;
    var v = 0u;
    var mask = 0u;
    for (var b = lo; b < hi; b++) {
        let sh = 8u * (b % 4u);
        v = v | (row_byte(kv, which, src, b - loc.y) << sh);
        mask = mask | (0xFFu << sh);
    }
    if (mask == 0xFFFFFFFFu) {
        kv_st(loc.x, word, v);
    } else {
        kv_st_bytes(loc.x, word, v, mask);
    }
}

@compute @workgroup_size(256)
fn copy_pages(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let np = pu(0u); let page_bytes = pu(1u);
    let words = page_bytes / 4u;
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= np * words) { return; }
    let pair = i / words;
    let w = i % words;
    let pt = off(6u);
    let src = SLOTS[off(2u) + 2u * pair];
    let dst = SLOTS[off(2u) + 2u * pair + 1u];
    let sp = PT[pt + 2u * src];
    let sw = PT[pt + 2u * src + 1u] * words + w;
    let dp = PT[pt + 2u * dst];
    let dw = PT[pt + 2u * dst + 1u] * words + w;
    kv_st(dp, dw, kv_ld(sp, sw));
}
