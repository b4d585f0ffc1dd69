// elementwise.wgsl — silu_mul, add_assign, gather_rows (reference:
// backends/cpu/src/elementwise.rs and tensor_ops.rs).
//
// Bindings per entry point:
// silu_mul:    1 A: gate (len) f32; 2 B: up (len) f32; 3 C: out (len) f32.
//              out = gate / (1 + exp(−gate)) · up. Params: 0 len.
// add_assign:  1 A: x (len) f32, in place; 2 B: y (len) f32. Params: 0 len.
// gather_rows: 1 A: x (n, dim) f32; 2 IDX: indices (m) u32 (bound as B); 3 C: out (m, dim).
//              Params: 0 m, 1 dim, 2 rows of x (rows at or above it are skipped).
// copy_words:  2 B: source words; 4 D: destination words (bit-exact, any dtype).
//              Params: 0 words.
// Workgroups: ceil(elements / 256) of 256 invocations, one element each.

@group(0) @binding(1) var<storage, read_write> A: array<f32>;
@group(0) @binding(2) var<storage, read_write> B: array<u32>;
@group(0) @binding(3) var<storage, read_write> C: array<f32>;
@group(0) @binding(4) var<storage, read_write> D: array<u32>;

@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= pu(0u)) { return; }
    let g = A[off(0u) + i];
    let u = bitcast<f32>(B[off(1u) + i]);
    C[off(2u) + i] = g / (1.0 + exp(-g)) * u;
}

@compute @workgroup_size(256)
fn add_assign(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= pu(0u)) { return; }
    A[off(0u) + i] = A[off(0u) + i] + bitcast<f32>(B[off(1u) + i]);
}

@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let m = pu(0u); let dim = pu(1u);
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= m * dim) { return; }
    let r = i / dim;
    let src = B[off(1u) + r];
    if (src >= pu(2u)) { return; }
    C[off(2u) + i] = A[off(0u) + src * dim + i % dim];
}

@compute @workgroup_size(256)
fn copy_words(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= pu(0u)) { return; }
    D[off(3u) + i] = B[off(1u) + i];
}
