// rope.wgsl — rotary embedding in place, llama.cpp NORM mode: pair (2i, 2i+1) of each head
// rotates by θ_i = pos · base^(−2i / rope_dim) (reference: backends/cpu/src/rope.rs, which
// takes cos and sin of the angle in f64).
//
// Bindings: 1 X: array<f32> (num_tokens, num_heads, head_dim), in place;
//   2 POS: array<u32> (num_tokens).
// Params: 0 num_tokens, 1 num_heads, 2 head_dim, 3 pairs (= rope_dim / 2), then for pair i
//   the f64 frequency base^(−2i/rope_dim) split in three f32 at 4 + 3i: two of 8 significant
//   bits (so pos · c is exact for positions below 2^16) and the rest.
// Workgroups: ceil(num_tokens · num_heads · pairs / 256) of 256, one pair each.
// Accuracy: the angle is kept as an unevaluated sum a0 + a1 + a2 (a0, a1 exact products),
//   reduced by π/2 with a three-part π/2 (Cody–Waite) before the small parts are added, and
//   rotated with minimax sin/cos on [−π/4, π/4] (Cephes), not the device's sin/cos (Vulkan
//   allows 2^−11 absolute error); no step relies on fused multiply-adds.

@group(0) @binding(1) var<storage, read_write> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> POS: array<u32>;

// cos and sin of (a0 + a1 + a2) radians, |a0| the largest, up to a few 10^4.
fn cos_sin(a0: f32, a1: f32, a2: f32) -> vec2<f32> {
    let q = round((a0 + a1 + a2) * 0.63661977236758134);   // 2/π
    var r = a0 - q * 1.5703125;
    r = r + a1;
    r = r - q * 4.837512969970703125e-4;
    r = r - q * 7.54978995489188216e-8;
    r = r + a2;
    let z = r * r;
    let s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
    let c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
    let quad = i32(q) & 3;
    switch quad {
        case 0: { return vec2<f32>(c, s); }
        case 1: { return vec2<f32>(-s, c); }
        case 2: { return vec2<f32>(-c, -s); }
        default: { return vec2<f32>(s, -c); }
    }
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let nt = pu(0u); let heads = pu(1u); let hd = pu(2u); let pairs = pu(3u);
    let i = wg_index(wid, nwg) * 256u + lid;
    if (i >= nt * heads * pairs) { return; }
    let p = i % pairs;
    let h = (i / pairs) % heads;
    let t = i / (pairs * heads);
    let pos = f32(POS[off(1u) + t]);
    let cs = cos_sin(pos * pf(4u + 3u * p), pos * pf(5u + 3u * p), pos * pf(6u + 3u * p));
    let x0 = off(0u) + (t * heads + h) * hd + 2u * p;
    let a = X[x0];
    let b = X[x0 + 1u];
    X[x0] = a * cs.x - b * cs.y;
    X[x0 + 1u] = a * cs.y + b * cs.x;
}
