// sampling.wgsl — argmax_rows and top_k_rows (reference: backends/cpu/src/sampling.rs).
//
// Bindings per entry point:
// argmax_rows: 1 L: logits (rows, vocab) f32; 2 IDS: (rows) u32. Params: 0 rows, 1 vocab.
//   The host's greedy pick: the first index whose value is greater than every earlier one
//   (`v > best` from index 0: ties to the lower id, NaN never wins, a NaN at index 0 stays).
// top_k_rows: 1 L: logits; 2 IDS: (rows, k) u32; 3 VALS: (rows, k) f32.
//   Params: 0 rows, 1 vocab, 2 k. Order: f32::total_cmp descending, ties to the lower id;
//   k rounds, each the largest element after the previous round's in that order.
// Workgroups: one per row, 256 invocations; strided scans, then a tree in workgroup memory.

@group(0) @binding(1) var<storage, read_write> L: array<f32>;
@group(0) @binding(2) var<storage, read_write> IDS: array<u32>;
@group(0) @binding(3) var<storage, read_write> VALS: array<f32>;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_k: array<u32, 256>;
var<workgroup> best_i: array<u32, 256>;

const NONE: u32 = 0xFFFFFFFFu;

@compute @workgroup_size(256)
fn argmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let rows = pu(0u); let vocab = pu(1u);
    let row = wg_index(wid, nwg);
    if (row >= rows) { return; }
    let l0 = off(0u) + row * vocab;
    var bv = -bitcast<f32>(0x7F800000u);
    var bi = NONE;
    for (var i = lid; i < vocab; i += 256u) {
        let v = L[l0 + i];
        if (v > bv || (v == bv && bi == NONE)) { bv = v; bi = i; }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h / 2u) {
        if (lid < h) {
            let ov = best_v[lid + h];
            let oi = best_i[lid + h];
            let mi = best_i[lid];
            if (oi != NONE && (mi == NONE || ov > best_v[lid] || (ov == best_v[lid] && oi < mi))) {
                best_v[lid] = ov;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var id = best_i[0];
        // Nothing beats a NaN at index 0; a row of NaNs picks 0 too.
        let first = L[l0];
        if (first != first || id == NONE) { id = 0u; }
        IDS[off(1u) + row] = id;
    }
}

// A u32 whose order is f32::total_cmp's.
fn total_key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b ^ 0x80000000u, ~b, (b >> 31u) == 1u);
}

@compute @workgroup_size(256)
fn top_k_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let rows = pu(0u); let vocab = pu(1u); let k = pu(2u);
    let row = wg_index(wid, nwg);
    if (row >= rows) { return; }
    let l0 = off(0u) + row * vocab;
    // The previous pick (key, id); the first round takes anything.
    var pk = 0xFFFFFFFFu;
    var pi = NONE;
    var first = true;
    for (var r = 0u; r < k; r++) {
        var bk = 0u;
        var bi = NONE;
        for (var i = lid; i < vocab; i += 256u) {
            let key = total_key(L[l0 + i]);
            let after = first || key < pk || (key == pk && i > pi);
            if (after && (bi == NONE || key > bk)) { bk = key; bi = i; }
        }
        best_k[lid] = bk;
        best_i[lid] = bi;
        workgroupBarrier();
        for (var h = 128u; h > 0u; h = h / 2u) {
            if (lid < h) {
                let ok = best_k[lid + h];
                let oi = best_i[lid + h];
                let mi = best_i[lid];
                if (oi != NONE && (mi == NONE || ok > best_k[lid] || (ok == best_k[lid] && oi < mi))) {
                    best_k[lid] = ok;
                    best_i[lid] = oi;
                }
            }
            workgroupBarrier();
        }
        pk = best_k[0];
        pi = best_i[0];
        first = false;
        if (lid == 0u) {
            IDS[off(1u) + row * k + r] = pi;
            VALS[off(2u) + row * k + r] = L[l0 + pi];
        }
        workgroupBarrier();
    }
}
