// embedding.wgsl — out[i, :] = table[ids[i], :] as f32 for the ids this piece holds
// (reference: backends/cpu/src/embedding.rs).
//
// Bindings: 1 W: array<u32>, the table piece (num_rows, dim) in weights.wgsl's layout;
//   2 IDS: array<u32> (n); 3 OUT: array<f32> (n, dim).
// Params: 0 n, 1 dim, 2 dtype, 3 first_row, 4 num_rows, 5 blocks in the piece.
// Workgroups: ceil(n · dim / 256) of 256 invocations, one output element each; elements of
//   ids outside first_row .. first_row + num_rows are left as they are.

@group(0) @binding(1) var<storage, read_write> W: array<u32>;
@group(0) @binding(2) var<storage, read_write> IDS: array<u32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;

@compute @workgroup_size(256)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u); let dim = pu(1u); let dt = pu(2u);
    let first = pu(3u); let rows = pu(4u); let nblocks = pu(5u);
    let idx = wg_index(wid, nwg) * 256u + lid;
    if (idx >= n * dim) { return; }
    let t = idx / dim;
    let e = idx % dim;
    let id = IDS[off(1u) + t];
    if (id < first || id >= first + rows) { return; }
    let r = id - first;
    var v: f32;
    if (dt >= DT_Q8_0) {
        var blk: array<f32, 32>;
        w_block(off(0u), dt, r * (dim / 32u) + e / 32u, nblocks, &blk);
        v = blk[e % 32u];
    } else {
        v = w_elem(off(0u), dt, r * dim + e);
    }
    OUT[off(2u) + idx] = v;
}
