// matmul.wgsl — out (n, out_stride) = x (n, k) · w (m, k)ᵀ, or out += (reference:
// backends/cpu/src/matmul.rs; the fused rms_norm_matmul is rms_norm.wgsl then this).
//
// Bindings: 1 X: array<f32> (n, k); 2 W: array<u32>, the weight piece (weights.wgsl's
//   layout); 3 OUT: array<f32> (n, out_stride), columns 0 .. m written.
// Params: 0 n, 1 k, 2 m, 3 out_stride, 4 accumulate (0/1), 5 dtype, 6 blocks in the piece.
// Constants: override TOK, tokens a workgroup takes (8, or 32 for prefill-sized n: each
//   weight block is then decoded once per 32 tokens); override DT, the weight dtype code
//   (the host sets it to param 5), so the decoder's dtype switch folds at pipeline creation.
// Two entry points, chosen by the host per adapter (src/lib.rs `MatmulPath`):
// - `matmul` (lane per row, CPU adapters: lavapipe runs barriers and private arrays badly).
//   Workgroups: one per (64 rows, group of TOK tokens), rows fastest: ceil(m / 64) ·
//   ceil(n / TOK) in all; invocation l owns row j = 64 · (group % row groups) + l and the
//   group's tokens, one accumulator per token, fed block by block (quantized) or element by
//   element (float) in row order (no reduction across invocations, no barrier).
// - `matmul_co` (coalesced, GPUs): Workgroups: one per (row, group of TOK tokens), rows
//   fastest: m · ceil(n / TOK); 64 invocations read the row's consecutive blocks (quantized:
//   block b goes to invocation b % 64) or elements (float: e % 64), so neighbouring
//   invocations read neighbouring words; each keeps one partial sum per token in block order,
//   then the 64 partials of a token are added: subgroupAdd, then the subgroups' sums in
//   subgroup_id order (subgroup variant), or in invocation order from workgroup memory
//   (fallback).
// Either way every output has one summation order, whatever the batch or the other rows.
// Dtypes: x, out f32; w any weight dtype (weights.wgsl).

@group(0) @binding(1) var<storage, read_write> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> W: array<u32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;

override TOK: u32 = 8u;
override DT: u32 = 0u;
const MAX_TOK: u32 = 32u;
const WG: u32 = 64u;

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u); let k = pu(1u); let m = pu(2u); let out_stride = pu(3u);
    let accumulate = pu(4u) != 0u; let dt = DT; let nblocks = pu(6u);
    let g = wg_index(wid, nwg);
    let row_groups = (m + WG - 1u) / WG;
    let j = (g % row_groups) * WG + lid;
    let t0 = (g / row_groups) * TOK;
    if (j >= m || t0 >= n) { return; }
    let nt = min(TOK, n - t0);
    let xb = off(0u); let wb = off(1u); let ob = off(2u);
    var acc: array<f32, MAX_TOK>;
    for (var t = 0u; t < TOK; t++) { acc[t] = 0.0; }
    if (dt >= DT_Q8_0) {
        let nb = k / 32u;
        var blk: array<f32, 32>;
        for (var b = 0u; b < nb; b++) {
            w_block(wb, dt, j * nb + b, nblocks, &blk);
            for (var t = 0u; t < TOK; t++) {
                if (t < nt) {
                    let x0 = xb + (t0 + t) * k + b * 32u;
                    var s = acc[t];
                    for (var e = 0u; e < 32u; e++) { s = fma(blk[e], X[x0 + e], s); }
                    acc[t] = s;
                }
            }
        }
    } else {
        for (var e = 0u; e < k; e++) {
            let w = w_elem(wb, dt, j * k + e);
            for (var t = 0u; t < TOK; t++) {
                if (t < nt) { acc[t] = fma(w, X[xb + (t0 + t) * k + e], acc[t]); }
            }
        }
    }
    for (var t = 0u; t < TOK; t++) {
        if (t < nt) {
            let o = ob + (t0 + t) * out_stride + j;
            OUT[o] = select(acc[t], OUT[o] + acc[t], accumulate);
        }
    }
}

const CO: u32 = 64u;
var<workgroup> RED: array<f32, 2048>; // MAX_TOK · CO

@compute @workgroup_size(64)
fn matmul_co(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
//#if subgroup
             @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) sg_count: u32,
             @builtin(subgroup_invocation_id) sg_lane: u32,
//#endif
             @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u); let k = pu(1u); let m = pu(2u); let out_stride = pu(3u);
    let accumulate = pu(4u) != 0u; let dt = DT; let nblocks = pu(6u);
    let g = wg_index(wid, nwg);
    let j = g % m;
    let t0 = (g / m) * TOK;
    // The same for the whole workgroup: the barrier below stays in uniform control flow.
    if (t0 >= n) { return; }
    let nt = min(TOK, n - t0);
    let xb = off(0u); let wb = off(1u); let ob = off(2u);
    var acc: array<f32, MAX_TOK>;
    for (var t = 0u; t < TOK; t++) { acc[t] = 0.0; }
    if (dt >= DT_Q8_0) {
        let nb = k / 32u;
        var blk: array<f32, 32>;
        for (var b = lid; b < nb; b += CO) {
            w_block(wb, dt, j * nb + b, nblocks, &blk);
            for (var t = 0u; t < TOK; t++) {
                if (t < nt) {
                    let x0 = xb + (t0 + t) * k + b * 32u;
                    var s = acc[t];
                    for (var e = 0u; e < 32u; e++) { s = fma(blk[e], X[x0 + e], s); }
                    acc[t] = s;
                }
            }
        }
    } else {
        for (var e = lid; e < k; e += CO) {
            let w = w_elem(wb, dt, j * k + e);
            for (var t = 0u; t < TOK; t++) {
                if (t < nt) { acc[t] = fma(w, X[xb + (t0 + t) * k + e], acc[t]); }
            }
        }
    }
//#if subgroup
    for (var t = 0u; t < TOK; t++) {
        let s = subgroupAdd(acc[t]);
        if (sg_lane == 0u) { RED[t * CO + sg_id] = s; }
    }
    let parts = sg_count;
//#else
    for (var t = 0u; t < TOK; t++) { RED[t * CO + lid] = acc[t]; }
    let parts = CO;
//#endif
    workgroupBarrier();
    if (lid < nt) {
        var s = 0.0;
        for (var i = 0u; i < parts; i++) { s += RED[lid * CO + i]; }
        let o = ob + (t0 + lid) * out_stride + j;
        OUT[o] = select(s, OUT[o] + s, accumulate);
    }
}
