// paged_attention.wgsl — causal, ragged, GQA attention reading K/V only through block tables
// (reference: backends/cpu/src/paged_attention.rs).
//
// Bindings: 1 Q: (num_tokens, num_heads, head_dim) f32; 2 O: out, same shape;
//   3 POS: positions (num_tokens) u32; 4 BT: block_tables (num_seqs, max_blocks) u32;
//   5 CTX: context_lens (num_seqs) u32; 6 QSL: query_start_locs (num_seqs + 1) u32;
//   7 PT, 8.. pieces (kv.wgsl).
// Params: 0 num_tokens, 1 num_seqs, 2 num_heads, 3 max_blocks, 4 scale (f32),
//   5 page_size, 6 kv_heads, 7 head_dim, 8 row_bytes, 9 page_bytes, 10 dtype.
// Workgroups: one per (token, head), head fastest; 32 invocations. Invocation l takes keys
//   l, l + 32, … of positions 0 ..= min(pos, context_len − 1) with its own running max, sum
//   and output row (online softmax); the 32 partial states are merged in workgroup memory.
// Constants: override HEAD_DIM (the layout's head_dim, ≤ 128, checked by the host), so the
//   per-key loops have constant trip counts.

@group(0) @binding(1) var<storage, read_write> Q: array<f32>;
@group(0) @binding(2) var<storage, read_write> O: array<f32>;
@group(0) @binding(3) var<storage, read_write> POS: array<u32>;
@group(0) @binding(4) var<storage, read_write> BT: array<u32>;
@group(0) @binding(5) var<storage, read_write> CTX: array<u32>;
@group(0) @binding(6) var<storage, read_write> QSL: array<u32>;

override HEAD_DIM: u32 = 64u;
const LANES: u32 = 32u;
const MAX_HD: u32 = 128u;

var<workgroup> q_row: array<f32, 128>;
var<workgroup> part_m: array<f32, 32>;
var<workgroup> part_l: array<f32, 32>;
var<workgroup> part_acc: array<f32, 4096>; // LANES · MAX_HD

@compute @workgroup_size(32)
fn paged_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let ntok = pu(0u); let nseq = pu(1u); let heads = pu(2u); let max_blocks = pu(3u);
    let scale = pf(4u);
    let kv = Kv(pu(5u), pu(6u), pu(7u), pu(8u), pu(9u), pu(10u));
    let g = wg_index(wid, nwg);
    let t = g / heads;
    let h = g % heads;
    if (t >= ntok) { return; }
    let hd = HEAD_DIM;
    // The sequence of token t: the last s with query_start_locs[s] <= t.
    var s = 0u;
    for (var i = 1u; i < nseq; i++) {
        if (QSL[off(5u) + i] <= t) { s = i; }
    }
    let ctx = CTX[off(4u) + s];
    // Keys 0 ..= min(pos, ctx − 1); none for an empty sequence (its rows come out zero).
    let nkeys = select(0u, min(POS[off(2u) + t], ctx - 1u) + 1u, ctx > 0u);
    let kvh = h / (heads / kv.kv_heads);
    let q0 = off(0u) + (t * heads + h) * hd;
    for (var e = lid; e < hd; e += LANES) { q_row[e] = Q[q0 + e]; }
    workgroupBarrier();

    var m = -bitcast<f32>(0x7F800000u);
    var l = 0.0;
    var acc: array<f32, 128>;
    for (var e = 0u; e < hd; e++) { acc[e] = 0.0; }
    for (var j = lid; j < nkeys; j += LANES) {
        let page = BT[off(3u) + s * max_blocks + j / kv.page_size];
        let tok = j % kv.page_size;
        let kl = kv_loc(kv, page, 0u, tok, kvh);
        var dot = 0.0;
        for (var e = 0u; e < hd; e++) { dot = fma(q_row[e], kv_read(kv, kl, e), dot); }
        let score = dot * scale;
        let m_new = max(m, score);
        let corr = exp(m - m_new);
        let p = exp(score - m_new);
        l = l * corr + p;
        let vl = kv_loc(kv, page, 1u, tok, kvh);
        for (var e = 0u; e < hd; e++) { acc[e] = fma(p, kv_read(kv, vl, e), acc[e] * corr); }
        m = m_new;
    }
    part_m[lid] = m;
    part_l[lid] = l;
    for (var e = 0u; e < hd; e++) { part_acc[lid * MAX_HD + e] = acc[e]; }
    workgroupBarrier();
    var mm = part_m[0];
    for (var i = 1u; i < LANES; i++) { mm = max(mm, part_m[i]); }
    var ll = 0.0;
    for (var i = 0u; i < LANES; i++) {
        if (part_l[i] > 0.0) { ll += part_l[i] * exp(part_m[i] - mm); }
    }
    let o0 = off(1u) + (t * heads + h) * hd;
    for (var e = lid; e < hd; e += LANES) {
        var v = 0.0;
        for (var i = 0u; i < LANES; i++) {
            if (part_l[i] > 0.0) { v += part_acc[i * MAX_HD + e] * exp(part_m[i] - mm); }
        }
        O[o0 + e] = select(0.0, v / ll, ll > 0.0);
    }
}
