// matmul_f16.wgsl — matmul.wgsl's coalesced `matmul_co` for f16 weights, read as f16
// (SHADER_F16 devices: src/kernels.rs puts `enable f16;` first): out (n, out_stride) =
// x (n, k) · w (m, k)ᵀ, or out +=. The same products and the same summation order as
// matmul_co's f16 path (which reads the halves with unpack2x16float), so the results are
// bit-identical with SHADER_F16 on or masked; arithmetic is f32.
//
// Bindings: 1 X: array<f32> (n, k); 2 WH: array<vec2<f16>> (m · k / 2 words: the row-major
//   f16 weight piece, element e in word e / 2, low half first); 3 OUT: array<f32>
//   (n, out_stride), columns 0 .. m written.
// Params: 0 n, 1 k, 2 m, 3 out_stride, 4 accumulate (0/1) (5, 6 unused).
// Constants: override TOK, tokens a workgroup takes (8 or 32).
// Workgroups: as matmul_co: one per (row, group of TOK tokens), rows fastest:
//   m · ceil(n / TOK); invocation l takes elements l, l + 64, … of the row, one partial sum per
//   token; the 64 partials of a token by subgroupAdd and the subgroups' sums in subgroup_id
//   order (subgroup variant), or in invocation order from workgroup memory (fallback).
// Dtypes: x, out f32; w f16.

@group(0) @binding(1) var<storage, read_write> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> WH: array<vec2<f16>>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;

override TOK: u32 = 8u;
const MAX_TOK: u32 = 32u;
const CO: u32 = 64u;
var<workgroup> RED: array<f32, 2048>; // MAX_TOK · CO

@compute @workgroup_size(64)
fn matmul_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
//#if subgroup
              @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) sg_count: u32,
              @builtin(subgroup_invocation_id) sg_lane: u32,
//#endif
              @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u); let k = pu(1u); let m = pu(2u); let out_stride = pu(3u);
    let accumulate = pu(4u) != 0u;
    let g = wg_index(wid, nwg);
    let j = g % m;
    let t0 = (g / m) * TOK;
    if (t0 >= n) { return; }
    let nt = min(TOK, n - t0);
    let xb = off(0u); let wb = off(1u); let ob = off(2u);
    var acc: array<f32, MAX_TOK>;
    for (var t = 0u; t < TOK; t++) { acc[t] = 0.0; }
    for (var e = lid; e < k; e += CO) {
        let idx = j * k + e;
        let pair = WH[wb + idx / 2u];
        let w = f32(select(pair.x, pair.y, (idx & 1u) == 1u));
        for (var t = 0u; t < TOK; t++) {
            if (t < nt) { acc[t] = fma(w, X[xb + (t0 + t) * k + e], acc[t]); }
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
