// paged_attention.wgsl — causal, ragged, GQA attention reading K/V only through block tables
// (reference: backends/cpu/src/paged_attention.rs).
//
// Bindings: 1 Q: (num_tokens, num_heads, head_dim) f32; 2 O: out, same shape;
//   3 POS: positions (num_tokens) u32; 4 BT: block_tables (num_seqs, max_blocks) u32;
//   5 CTX: context_lens (num_seqs) u32; 6 QSL: query_start_locs (num_seqs + 1) u32;
//   7 PT, 8.. pieces (kv.wgsl).
// Params: 0 num_tokens, 1 num_seqs, 2 num_heads, 3 max_blocks, 4 scale (f32),
//   5 page_size, 6 kv_heads, 7 head_dim, 8 row_bytes, 9 page_bytes, 10 dtype (the same as
//   the pipeline's KV_DT).
// Workgroups: one per (token, KV head), KV head fastest; 64 invocations. A workgroup serves
//   the GROUP query heads kv_head · GROUP + g of its token, so every K/V element it reads is
//   decoded once for all of them. Keys 0 ..= min(pos, context_len − 1) go in tiles of 64:
//   (1) invocation i scores key j0 + i against every head of the group (a whole dot
//   product, elements in order); (2) every invocation takes the tile's max per head,
//   invocation i turns its key's scores into exp(s − m_new) and stores its V row's place;
//   (3) invocation l owns output elements e = l, l + 64 (< head_dim) of every head: it
//   rescales its running sums and adds p · v over the tile's keys in key order. Two
//   barriers a tile; workgroup memory 6.5 KiB. A row's arithmetic depends only on its query
//   and the keys and values it reads — never on the other tokens, heads or sequences of
//   the launch — so a token's output is bit-identical alone or in any batch.
// Constants: override HEAD_DIM (the layout's head_dim, ≤ 128), GROUP (query heads per KV
//   head, ≤ 8) and KV_DT (the KV dtype code, kv.wgsl), all checked by the host, so the loops
//   have constant trip counts, the per-invocation state stays in registers and the row
//   decoder's dtype switch folds away.
// Dtypes: Q, O f32; K/V rows f32, f16, bf16 or Q8_0 (kv.wgsl); all arithmetic f32.

@group(0) @binding(1) var<storage, read_write> Q: array<f32>;
@group(0) @binding(2) var<storage, read_write> O: array<f32>;
@group(0) @binding(3) var<storage, read_write> POS: array<u32>;
@group(0) @binding(4) var<storage, read_write> BT: array<u32>;
@group(0) @binding(5) var<storage, read_write> CTX: array<u32>;
@group(0) @binding(6) var<storage, read_write> QSL: array<u32>;

override HEAD_DIM: u32 = 64u;
override GROUP: u32 = 1u;
override KV_DT: u32 = 0u;
const LANES: u32 = 64u;
const TILE: u32 = 64u;
const MAX_HD: u32 = 128u;
const MAX_GROUP: u32 = 8u;
// Output elements an invocation owns per head: ceil(MAX_HD / LANES).
const MAX_OWN: u32 = 2u;

var<workgroup> q_s: array<f32, 1024>; // MAX_GROUP · MAX_HD: the group's query rows
var<workgroup> s_s: array<f32, 512>; // MAX_GROUP · TILE: the tile's scores
var<workgroup> p_s: array<f32, 512>; // MAX_GROUP · TILE: the tile's exp(s − m_new)
var<workgroup> v_s: array<vec2<u32>, 64>; // TILE: V row locations (piece, byte)

@compute @workgroup_size(64)
fn paged_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let ntok = pu(0u); let nseq = pu(1u); let heads = pu(2u); let max_blocks = pu(3u);
    let scale = pf(4u);
    let kv = Kv(pu(5u), pu(6u), pu(7u), pu(8u), pu(9u), KV_DT);
    let g_id = wg_index(wid, nwg);
    let t = g_id / kv.kv_heads;
    let kvh = g_id % kv.kv_heads;
    if (t >= ntok) { return; }
    let hd = HEAD_DIM;
    let own = (HEAD_DIM + LANES - 1u) / LANES;
    // The sequence of token t: the last s with query_start_locs[s] <= t.
    var s = 0u;
    for (var i = 1u; i < nseq; i++) {
        if (QSL[off(5u) + i] <= t) { s = i; }
    }
    let ctx = CTX[off(4u) + s];
    // Keys 0 ..= min(pos, ctx − 1); none for an empty sequence (its rows come out zero).
    let nkeys = select(0u, min(POS[off(2u) + t], ctx - 1u) + 1u, ctx > 0u);
    let bt0 = off(3u) + s * max_blocks;
    // Row (t, kvh · GROUP + g) of Q and O starts at row0 + g · hd.
    let row0 = (t * heads + kvh * GROUP) * hd;
    for (var i = lid; i < GROUP * hd; i += LANES) { q_s[i] = Q[off(0u) + row0 + i]; }

    var m: array<f32, 8>; // MAX_GROUP: running max per head (the same in every invocation)
    var l: array<f32, 8>; // running sum of exp(s − m) per head
    var acc: array<f32, 16>; // MAX_GROUP · MAX_OWN: running Σ p·v of the owned elements
    for (var g = 0u; g < GROUP; g++) {
        m[g] = -bitcast<f32>(0x7F800000u);
        l[g] = 0.0;
        for (var k = 0u; k < own; k++) { acc[g * MAX_OWN + k] = 0.0; }
    }
    workgroupBarrier();
    for (var j0 = 0u; j0 < nkeys; j0 += TILE) {
        let n = min(TILE, nkeys - j0);
        // (1) Scores of key j0 + lid.
        var vl = vec2<u32>(0u, 0u);
        if (lid < n) {
            let j = j0 + lid;
            let page = BT[bt0 + j / kv.page_size];
            let tok = j % kv.page_size;
            let kl = kv_loc(kv, page, 0u, tok, kvh);
            var dot: array<f32, 8>;
            for (var g = 0u; g < GROUP; g++) { dot[g] = 0.0; }
            for (var e = 0u; e < hd; e++) {
                let k = kv_read(kv, kl, e);
                for (var g = 0u; g < GROUP; g++) { dot[g] = fma(q_s[g * hd + e], k, dot[g]); }
            }
            for (var g = 0u; g < GROUP; g++) { s_s[g * TILE + lid] = dot[g] * scale; }
            vl = kv_loc(kv, page, 1u, tok, kvh);
        }
        workgroupBarrier();
        // (2) The tile's max per head; rescale factors; probabilities and V row of key
        // j0 + lid (v_s is written here, not in (1): the previous tile's (3) reads it).
        if (lid < n) { v_s[lid] = vl; }
        var corr: array<f32, 8>;
        for (var g = 0u; g < GROUP; g++) {
            var mt = m[g];
            for (var i = 0u; i < n; i++) { mt = max(mt, s_s[g * TILE + i]); }
            corr[g] = exp(m[g] - mt);
            m[g] = mt;
            if (lid < n) { p_s[g * TILE + lid] = exp(s_s[g * TILE + lid] - mt); }
        }
        workgroupBarrier();
        // (3) Running sums, keys in order.
        for (var g = 0u; g < GROUP; g++) {
            var ls = l[g] * corr[g];
            for (var i = 0u; i < n; i++) { ls += p_s[g * TILE + i]; }
            l[g] = ls;
            for (var k = 0u; k < own; k++) { acc[g * MAX_OWN + k] *= corr[g]; }
        }
        for (var k = 0u; k < own; k++) {
            let e = lid + k * LANES;
            if (e < hd) {
                for (var i = 0u; i < n; i++) {
                    let v = kv_read(kv, v_s[i], e);
                    for (var g = 0u; g < GROUP; g++) {
                        acc[g * MAX_OWN + k] = fma(p_s[g * TILE + i], v, acc[g * MAX_OWN + k]);
                    }
                }
            }
        }
    }
    for (var k = 0u; k < own; k++) {
        let e = lid + k * LANES;
        if (e < hd) {
            for (var g = 0u; g < GROUP; g++) {
                O[off(1u) + row0 + g * hd + e] =
                    select(0.0, acc[g * MAX_OWN + k] / l[g], l[g] > 0.0);
            }
        }
    }
}
