// rms_norm.wgsl — out[i] = x[i] · (1 / sqrt(mean(x[i]²) + eps)) · weight (reference:
// backends/cpu/src/rms_norm.rs, which sums the squares in f64; here f32 in a fixed tree).
//
// Bindings: 1 X: array<f32> (n, dim); 2 WT: array<f32> (dim); 3 OUT: array<f32> (n, dim).
// Params: 0 n, 1 dim, 2 eps (f32).
// Workgroups: one per row, 256 invocations: strided partial sums; their total by
//   subgroupAdd, then the subgroups' sums in subgroup_id order (subgroup variant), or a tree
//   in workgroup memory (fallback); then each invocation writes elements l, l + 256, ….

@group(0) @binding(1) var<storage, read_write> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> WT: array<f32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<f32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
//#if subgroup
            @builtin(subgroup_id) sg_id: u32, @builtin(num_subgroups) sg_count: u32,
            @builtin(subgroup_invocation_id) sg_lane: u32,
//#endif
            @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u); let dim = pu(1u); let eps = pf(2u);
    let row = wg_index(wid, nwg);
    if (row >= n) { return; }
    let x0 = off(0u) + row * dim;
    var s = 0.0;
    for (var e = lid; e < dim; e += 256u) { let v = X[x0 + e]; s = fma(v, v, s); }
//#if subgroup
    let ss = subgroupAdd(s);
    if (sg_lane == 0u) { red[sg_id] = ss; }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < sg_count; i++) { total += red[i]; }
//#else
    red[lid] = s;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h / 2u) {
        if (lid < h) { red[lid] += red[lid + h]; }
        workgroupBarrier();
    }
    let total = red[0];
//#endif
    let scale = 1.0 / sqrt(total / f32(dim) + eps);
    let o0 = off(2u) + row * dim;
    for (var e = lid; e < dim; e += 256u) { OUT[o0 + e] = X[x0 + e] * scale * WT[off(1u) + e]; }
}
