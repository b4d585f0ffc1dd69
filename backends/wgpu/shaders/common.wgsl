// common.wgsl — prepended to every shader of this backend (src/kernels.rs).
//
// Bindings: @binding(0) P: array<u32>, read-only storage, the dispatch's parameters;
//   bindings 1.. are the op's buffers, each a 256-byte-aligned window of a pool segment,
//   declared read_write (one segment may back several arguments of one dispatch, and equal
//   usages do not conflict).
// P layout: P[i] for i < 80 = word offset of binding i + 1 inside its window; P[80 + j] =
//   the op's j-th parameter (u32, or f32 bits: pf(j)).
// Workgroups: dispatches larger than 65535 groups are 2D (x, y); `wg_index` linearises them.
// Dtype codes: DT_* below (the CUDA kernels' codes; 6 .. 10 are new here).
// Variants: lines between `//#if f16` / `//#if subgroup`, `//#else` and `//#endif` are kept
//   or dropped per the device's features when a module is built (src/kernels.rs
//   `specialise`; `enable f16;` goes first when f16 is on): the subgroup path reduces with
//   subgroupAdd (never assuming a subgroup size: subgroup_id / num_subgroups builtins).

@group(0) @binding(0) var<storage, read> P: array<u32>;

const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;
const DT_Q8_0: u32 = 3u;
const DT_Q4_0: u32 = 4u;
const DT_Q4_1: u32 = 5u;
const DT_Q5_0: u32 = 6u;
const DT_Q5_1: u32 = 7u;
const DT_Q4_K: u32 = 8u;
const DT_Q5_K: u32 = 9u;
const DT_Q6_K: u32 = 10u;

fn off(i: u32) -> u32 { return P[i]; }
fn pu(j: u32) -> u32 { return P[80u + j]; }
fn pf(j: u32) -> f32 { return bitcast<f32>(P[80u + j]); }

fn wg_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.x + wid.y * nwg.x; }

// Low / high 16 bits of a word as f16 -> f32 (exact). (naga 30 types `bitcast<vec2<f16>>`
// of a u32 as a scalar, so f16 loads bind f16 arrays instead: matmul_f16.wgsl.)
fn half2(w: u32) -> vec2<f32> { return unpack2x16float(w); }
fn half_lo(w: u32) -> f32 { return half2(w).x; }
fn half_hi(w: u32) -> f32 { return half2(w).y; }
fn half_at(w: u32, hi: bool) -> f32 { let h = half2(w); return select(h.x, h.y, hi); }
// bfloat16 bits (in the low 16 bits of b) -> f32 (exact).
fn bf16_to_f32(b: u32) -> f32 { return bitcast<f32>((b & 0xFFFFu) << 16u); }

// f32 -> f16 bits, round to nearest even, as half::f16::from_f32 (the CPU's conversion):
// overflow to infinity, subnormals rounded, NaN kept quiet with the top mantissa bits.
fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let exp = (b >> 23u) & 0xFFu;
    let man = b & 0x7FFFFFu;
    if (exp == 0xFFu) {
        // inf or NaN
        return sign | 0x7C00u | select(0u, 0x0200u | (man >> 13u), man != 0u);
    }
    let e = i32(exp) - 127 + 15;
    if (e >= 31) { return sign | 0x7C00u; }
    if (e <= 0) {
        if (e < -10) { return sign; }
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        let half_ulp = 1u << (shift - 1u);
        var r = m >> shift;
        let rem = m & ((1u << shift) - 1u);
        if (rem > half_ulp || (rem == half_ulp && (r & 1u) == 1u)) { r = r + 1u; }
        return sign | r;
    }
    var r = (u32(e) << 10u) | (man >> 13u);
    let rem = man & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u) == 1u)) { r = r + 1u; }
    return sign | r;
}

// f32 -> bf16 bits, as half::bf16::from_f32: NaN kept quiet, else round to nearest even.
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) { return (b >> 16u) | 0x0040u; }
    return (b + 0x7FFFu + ((b >> 16u) & 1u)) >> 16u;
}

// Rust's f32::round: half away from zero, exact for every f32.
fn round_away(v: f32) -> f32 {
    let a = abs(v);
    var r = floor(a);
    if (a - r >= 0.5) { r = r + 1.0; }
    return select(r, -r, v < 0.0);
}
