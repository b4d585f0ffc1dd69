// matmul.cu — out (n, m) = x (n, k) . w (m, k)^T (reference: backends/cpu/src/matmul.rs,
// and rms_norm_matmul.rs for the fused form). Weights are decoded in registers; nothing
// is dequantized to memory. Four kinds of kernel, one argument list:
//
// matmul_vec_q8_0_n1_r1, matmul_vec_q8_0_n1_r2, matmul_vec_q8_0_n8_r1,
// matmul_vec_q4_0_n1_r1, matmul_vec_q4_0_n1_r2, matmul_vec_q4_0_n8_r1,
// matmul_vec_q4_1_n1_r1, matmul_vec_q4_1_n1_r2, matmul_vec_q4_1_n8_r1,
// matmul_vec_q5_0_n1_r1, matmul_vec_q5_0_n1_r2, matmul_vec_q5_0_n8_r1,
// matmul_vec_q5_1_n1_r1, matmul_vec_q5_1_n1_r2, matmul_vec_q5_1_n8_r1,
// matmul_vec_q4_k_n1_r1, matmul_vec_q4_k_n1_r2, matmul_vec_q4_k_n8_r1,
// matmul_vec_q5_k_n1_r1, matmul_vec_q5_k_n1_r2, matmul_vec_q5_k_n8_r1,
// matmul_vec_q6_k_n1_r1, matmul_vec_q6_k_n1_r2, matmul_vec_q6_k_n8_r1,
// matmul_vec, matmul_t16, matmul_t32, matmul_t64, matmul_r8_t16, matmul_r8_t32,
// matmul_r8_t64, matmul_mma_t16, matmul_mma_t32, matmul_mma_t64, matmul_mma2_64x64,
// matmul_mma2_64x32, matmul_mma2_64x16, matmul_mma2_16x64, matmul_mma2_16x32, matmul — all
// (x, norm_w, eps, projs, n, k, accumulate):
//   x:      (n, k) f32, rows 16-byte aligned (k a multiple of 8; of 32 for quantized w)
//   norm_w: (k) f32 or 0. When given, x is RMS-normed on the fly
//           (x[e] * (1 / sqrt(mean(x^2) + eps)) * norm_w[e], as rms_norm.cu) — the fused
//           rms_norm_matmul; the normed rows are never written.
//   projs:  MmProjs by value, 1-4 projections sharing x: projection i has
//           w (m_i, k) in dtype_i, out (n, out_stride_i) f32 with columns 0 .. m_i written
//           (added to when accumulate != 0), and owns grid.x blocks
//           first_block_i .. first_block_{i+1}. One launch holds only quantized
//           projections (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, in the repacked
//           layout of common.cuh; k a multiple of 256 for the K-quants) or only float ones
//           (F32, F16, BF16, row-major).
//
// matmul_vec (quantized, n <= 8: decode). Launch: grid (sum of ceil(m_i / 8), 1), block 256 = 8
//   warps; shared: 8 floats, plus n x k floats of dynamic shared memory when the launch gives
//   them (then x, normed, is staged there once; the same values either way). Warp w owns row
//   j = (blockIdx.x - first_block) * 8 + w; lane l
//   takes the halves l, l + 32, ... of the row's 32-element units (16 values: common.cuh's
//   load_half / decode_half), MV_INFLIGHT (4) at a time, loaded before any arithmetic (the
//   first four even before waiting for the previous kernel and the norm scales), sums q * x per token with the scale applied once per
//   half (and the offset times sum(x) for Q4_1, Q5_1 and the K4 mins); a warp sum ends
//   each dot.
//
// matmul_vec_<type>_n<NT>_r<R> (quantized, one weight type a launch, n <= NT = 1 or 8):
//   matmul_vec's products and bits, persistent (grid <= what the device holds at once;
//   first_block counts virtual blocks of 8R rows), R = 1 or 2 rows a warp. See "persistent
//   GEMV" below.
//
// matmul_t<TN> / matmul_r8_t<TN> (quantized, n > 8; TN = 16, 32, 64 tokens; TM = 32 rows a
//   block, or 8 for the r8 kernels, which give small m more blocks). Launch: grid (sum of
//   ceil(m_i / TM), ceil(n / TN)), block 128; shared: a 32 x TM weight tile and a 32 x TN
//   x tile, both k-major (about 4.6 + 8.7 KB at TM = 32, TN = 64), TN floats of scales.
//   Each step of 32 (one unit of every row) the block decodes TM rows x 32 values
//   (threads 0 .. 2 TM: one row, one half of the unit, rounded as the CPU dequantizes)
//   and loads TN tokens x 32 values of x (normed on the fly) into shared memory, the next
//   step's global loads in flight during this step's products; thread (tx, ty) then accumulates rows ty*TM/8 .. + TM/8 x tokens
//   tx*TN/16 .. + TN/16.
//
// matmul (float weights). Launch: grid (sum of ceil(m_i / 4), ceil(n / 8)), block 128 = 4 warps;
//   shared: 8 floats. Warp w owns row j of its projection and tokens blockIdx.y * 8 .. + 8;
//   lane l decodes elements l*8 .. l*8+8 of every 256-element stretch of the row and keeps
//   one accumulator per token; a warp sum ends each dot product.

#define MM_WARPS 4
#define MM_TOKENS 8
#define MM_MAX_PROJS 4
#define MV_TOKENS 8
#define MT_ROWS 32
#define MT_THREADS 128

struct MmProj {
    u64 w;
    u64 out;
    int dtype;
    int m;
    int out_stride;
    int first_block;
};

struct MmProjs {
    MmProj p[MM_MAX_PROJS];
    int count;
};

// The projection owning block b (first_block counts blocks of that launch's kind).
__device__ __forceinline__ const MmProj& proj_of(const MmProjs& projs, int b) {
    int pi = 0;
#pragma unroll
    for (int i = 1; i < MM_MAX_PROJS; i++)
        if (i < projs.count && b >= projs.p[i].first_block) pi = i;
    return projs.p[pi];
}

// The projection owning this block (by blockIdx.x).
__device__ __forceinline__ const MmProj& proj_of_block(const MmProjs& projs) {
    return proj_of(projs, (int)blockIdx.x);
}

// s_scale[t] = 1 / sqrt(mean(x[t0 + t]^2) + eps) for t < nt, a warp a token (the same
// order whatever the tile, so a token's scale does not depend on its neighbours); every
// thread calls it before any returns; synchronises. 16-byte loads, unrolled.
__device__ __forceinline__ void token_scales(const float* x, int t0, int nt, int k, float eps,
                                             float* s_scale) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    int k4 = k / 4;
    for (int t = warp; t < nt; t += warps) {
        const float4* xr = (const float4*)(x + (u64)(t0 + t) * k);
        float s = 0.0f;
#pragma unroll 4
        for (int e = lane; e < k4; e += 32) {
            float4 v = xr[e];
            s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        s = warp_sum(s);
        if (lane == 0) s_scale[t] = 1.0f / sqrtf(s / (float)k + eps);
    }
    __syncthreads();
}

// Eight consecutive values of x row xr at e0 (16-byte aligned), normed when norm_w != 0.
__device__ __forceinline__ void load_x8(const float* xr, const float* norm_w, float sc, int e0,
                                        float v[8]) {
    const float4* p = (const float4*)(xr + e0);
    float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    if (norm_w != 0) {
        const float4* np = (const float4*)(norm_w + e0);
        float4 c = np[0], d = np[1];
        float nw[8] = {c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = v[i] * sc * nw[i];
    }
}

// acc[t] += the decoded half h . x[t] (x from element e0 = the unit's start) for t < nt:
// a * sum(q x) + b * sum(x), one rounding chain per token.
__device__ __forceinline__ void half_dot(const Half& h, const float* x, const float* norm_w,
                                         const float* s_scale, int nt, int k, int e0,
                                         float acc[MV_TOKENS]) {
    bool offset = h.b != 0.0f;
#pragma unroll
    for (int t = 0; t < MV_TOKENS; t++) {
        if (t >= nt) break;
        const float* xr = x + (u64)t * k;
        float sc = norm_w != 0 ? s_scale[t] : 1.0f;
        float va[8], vb[8];
        load_x8(xr, norm_w, sc, e0 + h.x0, va);
        load_x8(xr, norm_w, sc, e0 + h.x1, vb);
        float sq = 0.0f, sx = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sq = fmaf(h.q[i], va[i], sq);
            sx += va[i];
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sq = fmaf(h.q[8 + i], vb[i], sq);
            sx += vb[i];
        }
        acc[t] = fmaf(h.a, sq, acc[t]);
        if (offset) acc[t] = fmaf(h.b, sx, acc[t]);
    }
}

// Half hb of a row's halves (two per 32-element unit): its block, unit in the block, half.
struct HalfPos {
    u64 bi;
    int j, hh;
};

__device__ __forceinline__ HalfPos half_pos(u64 row0, u64 hb, int ups) {
    HalfPos p;
    u64 u = hb / 2;
    p.bi = row0 + u / (u64)ups;
    p.j = (int)(u % (u64)ups);
    p.hh = (int)(hb % 2);
    return p;
}

// Halves a lane has in flight (loads issued before the products of the previous ones).
#define MV_INFLIGHT 4
// Warps (= rows) of a matmul_vec block.
#define MV_WARPS 8

__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Norm scales and x staging of matmul_vec (every thread of the block calls it once).
// Returns whether x was staged in s_x.
__device__ __forceinline__ bool vec_prologue(const float* x, const float* norm_w, float eps,
                                             int nt, int k, float* s_scale, float* s_x) {
    pdl_begin();
    if (norm_w != 0) token_scales(x, 0, nt, k, eps, s_scale);
    if ((u64)dynamic_smem_bytes() < (u64)nt * k * 4) return false;
    int k4 = k / 4;
    for (int i = threadIdx.x; i < nt * k4; i += blockDim.x) {
        int t = i / k4, e = (i % k4) * 4;
        float4 a = *(const float4*)(x + (u64)t * k + e);
        if (norm_w != 0) {
            // load_x8's arithmetic, value by value.
            const float4 w = *(const float4*)(norm_w + e);
            float sc = s_scale[t];
            a.x = a.x * sc * w.x; a.y = a.y * sc * w.y;
            a.z = a.z * sc * w.z; a.w = a.w * sc * w.w;
        }
        *(float4*)(s_x + (u64)t * k + e) = a;
    }
    __syncthreads();
    return true;
}

// The body of matmul_vec for one weight type DT (a compile-time constant, so the decoders
// fold to that type's code and registers).
template <int DT>
__device__ __forceinline__ void matmul_vec_body(const float* x, const float* norm_w, float eps,
                                                const MmProj& p, int n, int k, int accumulate,
                                                float* s_scale, float* s_x) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int m = p.m;
    int j = ((int)blockIdx.x - p.first_block) * MV_WARPS + warp;
    int nt = min(MV_TOKENS, n);
    int ups = quant_block_elems(DT) / 32;  // 32-element units a block
    u64 nbr = (u64)(k / quant_block_elems(DT));
    u64 nh = (u64)(k / 32) * 2;  // halves of the row
    QLayout L = qlayout((const u8*)p.w, DT, (u64)m * nbr);
    u64 row0 = (u64)j * nbr;
    // Lane l takes halves l, l + 32, ...: MV_INFLIGHT of them loaded at a time, the first
    // ones before waiting for the previous kernel (weights are never written by kernels).
    u64 hb = lane;
    RawHalf r[MV_INFLIGHT];
    HalfPos ps[MV_INFLIGHT];
#pragma unroll
    for (int i = 0; i < MV_INFLIGHT; i++) {
        ps[i] = half_pos(row0, hb + 32 * i, ups);
        r[i] = load_half(L, DT, ps[i].bi, ps[i].j, ps[i].hh, j < m && hb + 32 * i < nh);
    }
    // x (normed when fused) staged once in shared memory when the launch gave room for it:
    // the same values load_x8 forms, so the bits do not change.
    bool staged = vec_prologue(x, norm_w, eps, nt, k, s_scale, s_x);
    const float* xs = staged ? s_x : x;
    const float* nw = staged ? 0 : norm_w;
    if (j >= m) return;
    float acc[MV_TOKENS];
#pragma unroll
    for (int t = 0; t < MV_TOKENS; t++) acc[t] = 0.0f;
    for (;;) {
#pragma unroll
        for (int i = 0; i < MV_INFLIGHT; i++)
            if (hb + 32 * i < nh)
                half_dot(decode_half(r[i], DT, ps[i].j, ps[i].hh), xs, nw, s_scale, nt, k,
                         (int)((hb + 32 * i) / 2) * 32, acc);
        hb += 32 * MV_INFLIGHT;
        if (hb >= nh) break;
#pragma unroll
        for (int i = 0; i < MV_INFLIGHT; i++) {
            ps[i] = half_pos(row0, hb + 32 * i, ups);
            r[i] = load_half(L, DT, ps[i].bi, ps[i].j, ps[i].hh, hb + 32 * i < nh);
        }
    }
    float* out = (float*)p.out;
#pragma unroll
    for (int t = 0; t < MV_TOKENS; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) {
            float* o = out + (u64)t * p.out_stride + j;
            *o = accumulate ? *o + s : s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)
matmul_vec(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    __shared__ float s_scale[MV_TOKENS];
    extern __shared__ __align__(16) float s_x[];
    const MmProj& p = proj_of_block(projs);
#define MV_CASE(D) matmul_vec_body<D>(x, norm_w, eps, p, n, k, accumulate, s_scale, s_x)
    switch (p.dtype) {
    case DT_Q8_0: MV_CASE(DT_Q8_0); break;
    case DT_Q4_0: MV_CASE(DT_Q4_0); break;
    case DT_Q4_1: MV_CASE(DT_Q4_1); break;
    case DT_Q5_0: MV_CASE(DT_Q5_0); break;
    case DT_Q5_1: MV_CASE(DT_Q5_1); break;
    case DT_Q4_K: MV_CASE(DT_Q4_K); break;
    case DT_Q5_K: MV_CASE(DT_Q5_K); break;
    default: MV_CASE(DT_Q6_K); break;
    }
#undef MV_CASE
}

// ---------------------------------------------------------------- persistent GEMV
// matmul_vec_<dtype>_n<NT>_r<R> (quantized, n <= NT: decode; NT = 1 or 8, R = 1 or 2 rows a
//   warp; dtype one of q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k, every projection of the launch
//   in it): matmul_vec's products with the same bits, one kernel per weight type and token
//   count so each gets only the registers it needs, and persistent. Launch: grid (g, 1),
//   g <= the virtual blocks (sum of ceil(m_i / (8 R)); first_block_i counts virtual blocks),
//   block 256 = 8 warps; shared and dynamic shared memory as matmul_vec. Block b takes virtual
//   blocks b, b + g, ...: the norm scales and the staged x are formed once a block, not once
//   per 8 rows. Warp w of virtual block v owns rows (v - first_block) * 8R + wR .. + R of its
//   projection; lane l takes the halves l, l + 32, ... of each row, MV_INFLIGHT at a time, in
//   matmul_vec's order (each output is the same chain of roundings), the 16 x values of a
//   half read once for the R rows. The first virtual block's weight loads are issued before
//   waiting for the previous kernel.

// Issues the loads of halves hb, hb + 32, ... (MV_INFLIGHT of them) of rows j0 .. j0 + R
// (zeros past m or the row's end); ps gets their positions in row j0.
template <int DT, int R>
__device__ __forceinline__ void vec_load_round(const QLayout& L, int j0, int m, u64 nbr, u64 nh,
                                               int ups, u64 hb, RawHalf r[R][MV_INFLIGHT],
                                               HalfPos ps[MV_INFLIGHT]) {
#pragma unroll
    for (int i = 0; i < MV_INFLIGHT; i++) {
        ps[i] = half_pos((u64)j0 * nbr, hb + 32 * i, ups);
#pragma unroll
        for (int q = 0; q < R; q++)
            r[q][i] = load_half(L, DT, ps[i].bi + (u64)q * nbr, ps[i].j, ps[i].hh,
                                j0 + q < m && hb + 32 * i < nh);
    }
}

template <int DT, int NT, int R>
__device__ __forceinline__ void vec_rows(const float* x, const float* norm_w, float eps,
                                         const MmProj& p, int vb, int n, int k, int accumulate,
                                         bool first, float* s_scale, float* s_x) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int m = p.m;
    int j0 = (vb - p.first_block) * MV_WARPS * R + warp * R;
    int nt = min(NT, n);
    const int ups = quant_block_elems(DT) / 32;
    u64 nbr = (u64)(k / quant_block_elems(DT));
    u64 nh = (u64)(k / 32) * 2;
    QLayout L = qlayout((const u8*)p.w, DT, (u64)m * nbr);
    u64 hb = lane;
    RawHalf r[R][MV_INFLIGHT];
    HalfPos ps[MV_INFLIGHT];  // of row j0 (block bi + q * nbr for row j0 + q)
    vec_load_round<DT, R>(L, j0, m, nbr, nh, ups, hb, r, ps);
    bool staged = first ? vec_prologue(x, norm_w, eps, nt, k, s_scale, s_x)
                        : (u64)dynamic_smem_bytes() >= (u64)nt * k * 4;
    const float* xs = staged ? s_x : x;
    const float* nw = staged ? 0 : norm_w;
    if (j0 >= m) return;
    float acc[R][NT];
#pragma unroll
    for (int q = 0; q < R; q++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[q][t] = 0.0f;
    for (;;) {
#pragma unroll
        for (int i = 0; i < MV_INFLIGHT; i++) {
            if (hb + 32 * i >= nh) continue;
            int e0 = (int)((hb + 32 * i) / 2) * 32;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t >= nt) break;
                const float* xr = xs + (u64)t * k;
                float sc = nw != 0 ? s_scale[t] : 1.0f;
                Half h0 = decode_half(r[0][i], DT, ps[i].j, ps[i].hh);
                float va[8], vb8[8];
                load_x8(xr, nw, sc, e0 + h0.x0, va);
                load_x8(xr, nw, sc, e0 + h0.x1, vb8);
                float sx = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) sx += va[e];
#pragma unroll
                for (int e = 0; e < 8; e++) sx += vb8[e];
#pragma unroll
                for (int q = 0; q < R; q++) {
                    Half h = q == 0 ? h0 : decode_half(r[q][i], DT, ps[i].j, ps[i].hh);
                    float sq = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) sq = fmaf(h.q[e], va[e], sq);
#pragma unroll
                    for (int e = 0; e < 8; e++) sq = fmaf(h.q[8 + e], vb8[e], sq);
                    acc[q][t] = fmaf(h.a, sq, acc[q][t]);
                    if (h.b != 0.0f) acc[q][t] = fmaf(h.b, sx, acc[q][t]);
                }
            }
        }
        hb += 32 * MV_INFLIGHT;
        if (hb >= nh) break;
        vec_load_round<DT, R>(L, j0, m, nbr, nh, ups, hb, r, ps);
    }
    float* out = (float*)p.out;
#pragma unroll
    for (int q = 0; q < R; q++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float s = warp_sum(acc[q][t]);
            if (lane == 0 && t < nt && j0 + q < m) {
                float* o = out + (u64)t * p.out_stride + j0 + q;
                *o = accumulate ? *o + s : s;
            }
        }
}

template <int DT, int NT, int R>
__device__ __forceinline__ void vec_persistent(const float* x, const float* norm_w, float eps,
                                               const MmProjs& projs, int n, int k,
                                               int accumulate, float* s_scale, float* s_x) {
    const int per = MV_WARPS * R;
    int total = 0;
#pragma unroll
    for (int i = 0; i < MM_MAX_PROJS; i++)
        if (i < projs.count) total = projs.p[i].first_block + (projs.p[i].m + per - 1) / per;
    bool first = true;
    for (int vb = (int)blockIdx.x; vb < total; vb += (int)gridDim.x) {
        vec_rows<DT, NT, R>(x, norm_w, eps, proj_of(projs, vb), vb, n, k, accumulate, first,
                            s_scale, s_x);
        first = false;
    }
}

#define VEC_KERNEL(NAME, DT, NT, R)                                                          \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                             \
    NAME(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,        \
         int accumulate) {                                                                   \
        __shared__ float s_scale[MV_TOKENS];                                                 \
        extern __shared__ __align__(16) float s_x[];                                         \
        vec_persistent<DT, NT, R>(x, norm_w, eps, projs, n, k, accumulate, s_scale, s_x);    \
    }
VEC_KERNEL(matmul_vec_q8_0_n1_r1, DT_Q8_0, 1, 1)
VEC_KERNEL(matmul_vec_q8_0_n1_r2, DT_Q8_0, 1, 2)
VEC_KERNEL(matmul_vec_q8_0_n8_r1, DT_Q8_0, 8, 1)
VEC_KERNEL(matmul_vec_q4_0_n1_r1, DT_Q4_0, 1, 1)
VEC_KERNEL(matmul_vec_q4_0_n1_r2, DT_Q4_0, 1, 2)
VEC_KERNEL(matmul_vec_q4_0_n8_r1, DT_Q4_0, 8, 1)
VEC_KERNEL(matmul_vec_q4_1_n1_r1, DT_Q4_1, 1, 1)
VEC_KERNEL(matmul_vec_q4_1_n1_r2, DT_Q4_1, 1, 2)
VEC_KERNEL(matmul_vec_q4_1_n8_r1, DT_Q4_1, 8, 1)
VEC_KERNEL(matmul_vec_q5_0_n1_r1, DT_Q5_0, 1, 1)
VEC_KERNEL(matmul_vec_q5_0_n1_r2, DT_Q5_0, 1, 2)
VEC_KERNEL(matmul_vec_q5_0_n8_r1, DT_Q5_0, 8, 1)
VEC_KERNEL(matmul_vec_q5_1_n1_r1, DT_Q5_1, 1, 1)
VEC_KERNEL(matmul_vec_q5_1_n1_r2, DT_Q5_1, 1, 2)
VEC_KERNEL(matmul_vec_q5_1_n8_r1, DT_Q5_1, 8, 1)
VEC_KERNEL(matmul_vec_q4_k_n1_r1, DT_Q4_K, 1, 1)
VEC_KERNEL(matmul_vec_q4_k_n1_r2, DT_Q4_K, 1, 2)
VEC_KERNEL(matmul_vec_q4_k_n8_r1, DT_Q4_K, 8, 1)
VEC_KERNEL(matmul_vec_q5_k_n1_r1, DT_Q5_K, 1, 1)
VEC_KERNEL(matmul_vec_q5_k_n1_r2, DT_Q5_K, 1, 2)
VEC_KERNEL(matmul_vec_q5_k_n8_r1, DT_Q5_K, 8, 1)
VEC_KERNEL(matmul_vec_q6_k_n1_r1, DT_Q6_K, 1, 1)
VEC_KERNEL(matmul_vec_q6_k_n1_r2, DT_Q6_K, 1, 2)
VEC_KERNEL(matmul_vec_q6_k_n8_r1, DT_Q6_K, 8, 1)
#undef VEC_KERNEL

template <int TM, int TN>
__device__ __forceinline__ void matmul_tiled(const float* x, const float* norm_w, float eps,
                                             const MmProjs& projs, int n, int k, int accumulate) {
    constexpr int TPT = TN / 16;                      // tokens per thread
    constexpr int RPT = TM / 8;                       // rows per thread
    constexpr int XF = TN * 8 / MT_THREADS;           // x float4 loads per thread a step
    __shared__ __align__(16) float s_w[32][TM + 4];
    __shared__ __align__(16) float s_x[32][TN + 4];
    __shared__ float s_scale[TN];
    int tid = threadIdx.x;
    const MmProj& p = proj_of_block(projs);
    int dtype = p.dtype, m = p.m;
    int r0 = ((int)blockIdx.x - p.first_block) * TM;
    int t0 = blockIdx.y * TN;
    int nt = min(TN, n - t0);
    if (norm_w != 0) token_scales(x, t0, nt, k, eps, s_scale);
    int ups = quant_block_elems(dtype) / 32;  // 32-element units a block
    u64 nbr = (u64)(k / quant_block_elems(dtype));
    u64 nu = (u64)(k / 32);  // units a row = steps
    QLayout L = qlayout((const u8*)p.w, dtype, (u64)m * nbr);
    // Loader roles: weight row r0 + lr, half lh of each unit (16 values; 2 * TM loaders).
    int lr = tid / 2, lh = tid % 2;
    bool wvalid = lr < TM && r0 + lr < m;
    u64 wrow = (u64)(r0 + lr) * nbr;
    // Compute roles.
    int tx = tid % 16, ty = tid / 16;
    float acc[RPT][TPT];
#pragma unroll
    for (int r = 0; r < RPT; r++)
#pragma unroll
        for (int i = 0; i < TPT; i++) acc[r][i] = 0.0f;

    // Raw loads of step (unit) b into registers.
    RawHalf wr;
    float4 xv[XF];
    auto load_step = [&](u64 b) {
        wr = load_half(L, dtype, wrow + b / (u64)ups, (int)(b % (u64)ups), lh, wvalid);
#pragma unroll
        for (int f = 0; f < XF; f++) {
            int idx = tid + MT_THREADS * f;
            int ft = idx / 8, fq = idx % 8;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (ft < nt) {
                int e = (int)b * 32 + fq * 4;
                v = *(const float4*)(x + (u64)(t0 + ft) * k + e);
                if (norm_w != 0) {
                    float4 w = *(const float4*)(norm_w + e);
                    float s = s_scale[ft];
                    v.x = v.x * s * w.x; v.y = v.y * s * w.y;
                    v.z = v.z * s * w.z; v.w = v.w * s * w.w;
                }
            }
            xv[f] = v;
        }
    };
    load_step(0);
    for (u64 b = 0; b < nu; b++) {
        __syncthreads();  // the previous step's products are done with the tiles
        if (lr < TM) {
            Half h = decode_half(wr, dtype, (int)(b % (u64)ups), lh);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                s_w[h.x0 + i][lr] = half_value(h, i);
                s_w[h.x1 + i][lr] = half_value(h, 8 + i);
            }
        }
        {
#pragma unroll
            for (int f = 0; f < XF; f++) {
                int idx = tid + MT_THREADS * f;
                int ft = idx / 8, fq = idx % 8;
                s_x[fq * 4 + 0][ft] = xv[f].x;
                s_x[fq * 4 + 1][ft] = xv[f].y;
                s_x[fq * 4 + 2][ft] = xv[f].z;
                s_x[fq * 4 + 3][ft] = xv[f].w;
            }
        }
        __syncthreads();
        if (b + 1 < nu) load_step(b + 1);  // in flight during the products below
#pragma unroll 8
        for (int e = 0; e < 32; e++) {
            float av[RPT], bv[TPT];
#pragma unroll
            for (int r = 0; r < RPT; r++) av[r] = s_w[e][ty * RPT + r];
#pragma unroll
            for (int i = 0; i < TPT; i++) bv[i] = s_x[e][tx * TPT + i];
#pragma unroll
            for (int r = 0; r < RPT; r++)
#pragma unroll
                for (int i = 0; i < TPT; i++) acc[r][i] = fmaf(av[r], bv[i], acc[r][i]);
        }
    }
    float* out = (float*)p.out;
#pragma unroll
    for (int r = 0; r < RPT; r++) {
        int row = r0 + ty * RPT + r;
        if (row >= m) continue;
#pragma unroll
        for (int i = 0; i < TPT; i++) {
            int t = tx * TPT + i;
            if (t >= nt) continue;
            float* o = out + (u64)(t0 + t) * p.out_stride + row;
            *o = accumulate ? *o + acc[r][i] : acc[r][i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_t16(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    pdl_begin();
    matmul_tiled<32, 16>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_t32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    pdl_begin();
    matmul_tiled<32, 32>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_t64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    pdl_begin();
    matmul_tiled<32, 64>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t16(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    pdl_begin();
    matmul_tiled<8, 16>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    pdl_begin();
    matmul_tiled<8, 32>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    pdl_begin();
    matmul_tiled<8, 64>(x, norm_w, eps, projs, n, k, accumulate);
}

// ---------------------------------------------------------------- tensor cores
// matmul_mma_t<TN> (quantized, n > 8; TN = 16, 32, 64 tokens a block, TM = 64 rows).
// Launch: grid (sum of ceil(m_i / 64), ceil(n / TN)), block 128 = 4 warps; shared: the
// unit's 64 x 32 weight quants (exact small integers as f32), their scales, x's hi / lo
// tf32 parts for TN tokens x 32 (about 9 + 2 x TN x 0.14 KB). Each step of 32 (one unit of
// every row): threads (row, half) decode the weights, every thread loads a quarter of a
// token's 32 x values (normed on the fly) and splits each into tf32 hi + lo (x - hi,
// rounded to tf32 again); the next unit's global loads are in flight during the products.
// Warp w computes rows 16w .. 16w+15 x all TN tokens with mma.sync m16n8k8 tf32: per
// 16-element group g of the unit, tmp = q . x_hi + q . x_lo (two k8 steps each, f32
// accumulation), acc += a_g * tmp; per unit acc += b * sum(x) (Q4_1, Q5_1, K4 mins).
// q is exact in tf32 and x = hi + lo to about 2^-21, so the products carry nearly f32
// precision. A token's outputs do not depend on the tile shape nor on the other tokens
// (every output is its own chain of the same instructions), so TN is free.

#define MMA_TM 64
#define MMA_THREADS 128
#define MMA_LD 36  // shared row stride (32 + 4): conflict-free fragment loads

__device__ __forceinline__ u32 tf32_rna(float f) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

// d += A (16x8, tf32, row) . B (8x8, tf32, col), f32 accumulators.
__device__ __forceinline__ void mma_tf32(float d[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int TN>
__device__ __forceinline__ void matmul_mma(const float* x, const float* norm_w, float eps,
                                           const MmProjs& projs, int n, int k, int accumulate) {
    constexpr int NT = TN / 8;                  // n-tiles of 8 tokens
    constexpr int XF = TN * 8 / MMA_THREADS;    // x float4 loads per thread a step
    __shared__ __align__(16) float s_w[MMA_TM][MMA_LD];  // q values [row][k]
    __shared__ float s_a[MMA_TM][2];                     // scale of each 16-element group
    __shared__ float s_b[MMA_TM];                        // offset (times sum x) of the unit
    __shared__ __align__(16) u32 s_xh[TN][MMA_LD];       // tf32 hi of x [token][k]
    __shared__ __align__(16) u32 s_xl[TN][MMA_LD];       // tf32 lo of x
    __shared__ float s_sx[TN];                           // sum of the unit's x a token
    __shared__ float s_scale[TN];
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int gid = lane >> 2, tig = lane & 3;
    const MmProj& p = proj_of_block(projs);
    int dtype = p.dtype, m = p.m;
    int r0 = ((int)blockIdx.x - p.first_block) * MMA_TM;
    int t0 = blockIdx.y * TN;
    int nt = min(TN, n - t0);
    if (norm_w != 0) token_scales(x, t0, nt, k, eps, s_scale);
    int ups = quant_block_elems(dtype) / 32;
    u64 nbr = (u64)(k / quant_block_elems(dtype));
    u64 nu = (u64)(k / 32);
    QLayout L = qlayout((const u8*)p.w, dtype, (u64)m * nbr);
    int lr = tid / 2, lh = tid % 2;  // loader: row r0 + lr, half lh
    bool wvalid = r0 + lr < m;
    u64 wrow = (u64)(r0 + lr) * nbr;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[j][c] = 0.0f;

    RawHalf wr;
    float4 xv[XF];
    auto load_step = [&](u64 b) {
        wr = load_half(L, dtype, wrow + b / (u64)ups, (int)(b % (u64)ups), lh, wvalid);
#pragma unroll
        for (int f = 0; f < XF; f++) {
            int idx = tid + MMA_THREADS * f;
            int ft = idx / 8, fq = idx % 8;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (ft < nt) {
                int e = (int)b * 32 + fq * 4;
                v = *(const float4*)(x + (u64)(t0 + ft) * k + e);
                if (norm_w != 0) {
                    float4 w = *(const float4*)(norm_w + e);
                    float s = s_scale[ft];
                    v.x = v.x * s * w.x; v.y = v.y * s * w.y;
                    v.z = v.z * s * w.z; v.w = v.w * s * w.w;
                }
            }
            xv[f] = v;
        }
    };
    load_step(0);
    for (u64 b = 0; b < nu; b++) {
        __syncthreads();  // the previous step's products are done with the tiles
        {
            Half h = decode_half(wr, dtype, (int)(b % (u64)ups), lh);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                s_w[lr][h.x0 + i] = h.q[i];
                s_w[lr][h.x1 + i] = h.q[8 + i];
            }
            s_a[lr][lh] = h.a;
            if (lh == 0) s_b[lr] = h.b;
        }
#pragma unroll
        for (int f = 0; f < XF; f++) {
            int idx = tid + MMA_THREADS * f;
            int ft = idx / 8, fq = idx % 8;
            float v[4] = {xv[f].x, xv[f].y, xv[f].z, xv[f].w};
#pragma unroll
            for (int c = 0; c < 4; c++) {
                u32 hi = tf32_rna(v[c]);
                s_xh[ft][fq * 4 + c] = hi;
                s_xl[ft][fq * 4 + c] = tf32_rna(v[c] - __uint_as_float(hi));
            }
            // sum of the token's 32 values: the 8 lanes of a token, in one order.
            float sx = ((v[0] + v[1]) + v[2]) + v[3];
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 4);
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 2);
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 1);
            if (fq == 0) s_sx[ft] = sx;
        }
        __syncthreads();
        if (b + 1 < nu) load_step(b + 1);  // in flight during the products below
        int wr0 = warp * 16 + gid;
#pragma unroll
        for (int g = 0; g < 2; g++) {
            float tmp[NT][4];
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) tmp[j][c] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 2; kk++) {
                int kb = 16 * g + 8 * kk;
                u32 a[4];
                a[0] = __float_as_uint(s_w[wr0][kb + tig]);
                a[1] = __float_as_uint(s_w[wr0 + 8][kb + tig]);
                a[2] = __float_as_uint(s_w[wr0][kb + tig + 4]);
                a[3] = __float_as_uint(s_w[wr0 + 8][kb + tig + 4]);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    int tok = j * 8 + gid;
                    mma_tf32(tmp[j], a, s_xh[tok][kb + tig], s_xh[tok][kb + tig + 4]);
                    mma_tf32(tmp[j], a, s_xl[tok][kb + tig], s_xl[tok][kb + tig + 4]);
                }
            }
            float a0 = s_a[wr0][g], a1 = s_a[wr0 + 8][g];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                acc[j][0] = fmaf(a0, tmp[j][0], acc[j][0]);
                acc[j][1] = fmaf(a0, tmp[j][1], acc[j][1]);
                acc[j][2] = fmaf(a1, tmp[j][2], acc[j][2]);
                acc[j][3] = fmaf(a1, tmp[j][3], acc[j][3]);
            }
        }
        float b0 = s_b[wr0], b1 = s_b[wr0 + 8];
        if (b0 != 0.0f || b1 != 0.0f) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float sx0 = s_sx[j * 8 + 2 * tig], sx1 = s_sx[j * 8 + 2 * tig + 1];
                acc[j][0] = fmaf(b0, sx0, acc[j][0]);
                acc[j][1] = fmaf(b0, sx1, acc[j][1]);
                acc[j][2] = fmaf(b1, sx0, acc[j][2]);
                acc[j][3] = fmaf(b1, sx1, acc[j][3]);
            }
        }
    }
    float* out = (float*)p.out;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int row = r0 + warp * 16 + gid + (c >= 2 ? 8 : 0);
            int t = j * 8 + 2 * tig + (c & 1);
            if (row >= m || t >= nt) continue;
            float* o = out + (u64)(t0 + t) * p.out_stride + row;
            *o = accumulate ? *o + acc[j][c] : acc[j][c];
        }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma_t16(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
               int accumulate) {
    pdl_begin();
    matmul_mma<16>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma_t32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
               int accumulate) {
    pdl_begin();
    matmul_mma<32>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma_t64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
               int accumulate) {
    pdl_begin();
    matmul_mma<64>(x, norm_w, eps, projs, n, k, accumulate);
}

// matmul_mma2_<TM>x<TN> (quantized, n > 8; PAGODA_CUDA_MMA=2): the arithmetic of matmul_mma
// — every output's chain is the same instructions in the same order (per unit: per 16-group
// tmp = q.x_hi + q.x_lo over two k8 steps, acc += a_g tmp; then acc += b sum(x) when an offset
// is present), so both kernels and every tile shape give the same bits — with more work
// per barrier and per shared load: U units (U = 2, 1 for 64 x 64) a step, the 4 warps as
// WM x WN (2 x 2 for 64 rows: a warp holds 32 rows x TN/2 tokens and reuses each x fragment
// for two m-tiles; 1 x 4 for 16 rows: the 16-row tiles give small m four times the blocks).
// Launch: grid (sum of ceil(m_i / TM), ceil(n / TN)), block 128; shared: TM x 32U quants,
// TN x 32U x hi and lo, scales (at most 39 KB).

template <int TM, int TN, int WM, int U>
__device__ __forceinline__ void matmul_mma2(const float* x, const float* norm_w, float eps,
                                            const MmProjs& projs, int n, int k, int accumulate) {
    constexpr int WN = 4 / WM;
    constexpr int MT = TM / WM / 16;  // m-tiles of 16 rows a warp
    constexpr int NTW = TN / WN / 8;  // n-tiles of 8 tokens a warp
    constexpr int KS = 32 * U;        // k a step
    constexpr int LD = KS + 4;        // shared row stride: conflict-free fragment loads
    constexpr int WSLOTS = TM * 2 * U;                            // weight halves a step
    constexpr int WL = (WSLOTS + MMA_THREADS - 1) / MMA_THREADS;  // ... a thread
    constexpr int XQ = KS / 4;                                    // float4 of a token a step
    constexpr int XF = TN * XQ / MMA_THREADS;                     // x float4 a thread
    __shared__ __align__(16) float s_w[TM][LD];
    __shared__ float s_a[TM][2 * U];
    __shared__ float s_b[TM][U];
    __shared__ __align__(16) u32 s_xh[TN][LD];
    __shared__ __align__(16) u32 s_xl[TN][LD];
    __shared__ float s_sx[TN][U];
    __shared__ float s_scale[TN];
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int gid = lane >> 2, tig = lane & 3;
    int wm = warp / WN, wn = warp % WN;
    const MmProj& p = proj_of_block(projs);
    int dtype = p.dtype, m = p.m;
    int r0 = ((int)blockIdx.x - p.first_block) * TM;
    int t0 = blockIdx.y * TN;
    int nt = min(TN, n - t0);
    if (norm_w != 0) token_scales(x, t0, nt, k, eps, s_scale);
    int ups = quant_block_elems(dtype) / 32;
    u64 nbr = (u64)(k / quant_block_elems(dtype));
    int nu = k / 32;
    int steps = (nu + U - 1) / U;
    QLayout L = qlayout((const u8*)p.w, dtype, (u64)m * nbr);
    float acc[MT][NTW][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NTW; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mt][j][c] = 0.0f;

    RawHalf wr[WL];
    float4 xv[XF];
    auto load_step = [&](int st) {
#pragma unroll
        for (int i = 0; i < WL; i++) {
            int slot = tid + MMA_THREADS * i;
            int row = slot / (2 * U), uu = (slot % (2 * U)) / 2, hh = slot % 2;
            int unit = st * U + uu;
            bool valid = slot < WSLOTS && r0 + row < m && unit < nu;
            u64 bi = (u64)(r0 + row) * nbr + (u64)(unit / ups);
            wr[i] = load_half(L, dtype, bi, unit % ups, hh, valid);
        }
#pragma unroll
        for (int f = 0; f < XF; f++) {
            int idx = tid + MMA_THREADS * f;
            int ft = idx / XQ, fq = idx % XQ;
            int e = st * KS + fq * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (ft < nt && e < k) {
                v = *(const float4*)(x + (u64)(t0 + ft) * k + e);
                if (norm_w != 0) {
                    float4 w = *(const float4*)(norm_w + e);
                    float sc = s_scale[ft];
                    v.x = v.x * sc * w.x; v.y = v.y * sc * w.y;
                    v.z = v.z * sc * w.z; v.w = v.w * sc * w.w;
                }
            }
            xv[f] = v;
        }
    };
    load_step(0);
    for (int st = 0; st < steps; st++) {
        __syncthreads();  // the previous step's products are done with the tiles
#pragma unroll
        for (int i = 0; i < WL; i++) {
            int slot = tid + MMA_THREADS * i;
            if (slot < WSLOTS) {
                int row = slot / (2 * U), uu = (slot % (2 * U)) / 2, hh = slot % 2;
                int unit = st * U + uu;
                Half h = decode_half(wr[i], dtype, unit % ups, hh);
#pragma unroll
                for (int q = 0; q < 8; q++) {
                    s_w[row][uu * 32 + h.x0 + q] = h.q[q];
                    s_w[row][uu * 32 + h.x1 + q] = h.q[8 + q];
                }
                s_a[row][uu * 2 + hh] = h.a;
                if (hh == 0) s_b[row][uu] = h.b;
            }
        }
#pragma unroll
        for (int f = 0; f < XF; f++) {
            int idx = tid + MMA_THREADS * f;
            int ft = idx / XQ, fq = idx % XQ;
            float v[4] = {xv[f].x, xv[f].y, xv[f].z, xv[f].w};
#pragma unroll
            for (int c = 0; c < 4; c++) {
                u32 hi = tf32_rna(v[c]);
                s_xh[ft][fq * 4 + c] = hi;
                s_xl[ft][fq * 4 + c] = tf32_rna(v[c] - __uint_as_float(hi));
            }
            // sum of a token's 32 values of one unit: its 8 lanes, in matmul_mma's order.
            float sx = ((v[0] + v[1]) + v[2]) + v[3];
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 4);
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 2);
            sx += __shfl_xor_sync(0xFFFFFFFFu, sx, 1);
            if (fq % 8 == 0) s_sx[ft][fq / 8] = sx;
        }
        __syncthreads();
        if (st + 1 < steps) load_step(st + 1);  // in flight during the products below
#pragma unroll
        for (int uu = 0; uu < U; uu++) {
            if (st * U + uu >= nu) break;
#pragma unroll
            for (int g = 0; g < 2; g++) {
                float tmp[MT][NTW][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int j = 0; j < NTW; j++)
#pragma unroll
                        for (int c = 0; c < 4; c++) tmp[mt][j][c] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < 2; kk++) {
                    int kb = uu * 32 + 16 * g + 8 * kk;
                    u32 a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        int row = wm * (TM / WM) + mt * 16 + gid;
                        a[mt][0] = __float_as_uint(s_w[row][kb + tig]);
                        a[mt][1] = __float_as_uint(s_w[row + 8][kb + tig]);
                        a[mt][2] = __float_as_uint(s_w[row][kb + tig + 4]);
                        a[mt][3] = __float_as_uint(s_w[row + 8][kb + tig + 4]);
                    }
#pragma unroll
                    for (int j = 0; j < NTW; j++) {
                        int tok = wn * (TN / WN) + j * 8 + gid;
                        u32 h0 = s_xh[tok][kb + tig], h1 = s_xh[tok][kb + tig + 4];
                        u32 l0 = s_xl[tok][kb + tig], l1 = s_xl[tok][kb + tig + 4];
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            mma_tf32(tmp[mt][j], a[mt], h0, h1);
                            mma_tf32(tmp[mt][j], a[mt], l0, l1);
                        }
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    int row = wm * (TM / WM) + mt * 16 + gid;
                    float a0 = s_a[row][uu * 2 + g], a1 = s_a[row + 8][uu * 2 + g];
#pragma unroll
                    for (int j = 0; j < NTW; j++) {
                        acc[mt][j][0] = fmaf(a0, tmp[mt][j][0], acc[mt][j][0]);
                        acc[mt][j][1] = fmaf(a0, tmp[mt][j][1], acc[mt][j][1]);
                        acc[mt][j][2] = fmaf(a1, tmp[mt][j][2], acc[mt][j][2]);
                        acc[mt][j][3] = fmaf(a1, tmp[mt][j][3], acc[mt][j][3]);
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                int row = wm * (TM / WM) + mt * 16 + gid;
                float b0 = s_b[row][uu], b1 = s_b[row + 8][uu];
                if (b0 != 0.0f || b1 != 0.0f) {
#pragma unroll
                    for (int j = 0; j < NTW; j++) {
                        int tk = wn * (TN / WN) + j * 8 + 2 * tig;
                        float sx0 = s_sx[tk][uu], sx1 = s_sx[tk + 1][uu];
                        acc[mt][j][0] = fmaf(b0, sx0, acc[mt][j][0]);
                        acc[mt][j][1] = fmaf(b0, sx1, acc[mt][j][1]);
                        acc[mt][j][2] = fmaf(b1, sx0, acc[mt][j][2]);
                        acc[mt][j][3] = fmaf(b1, sx1, acc[mt][j][3]);
                    }
                }
            }
        }
    }
    float* out = (float*)p.out;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NTW; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int row = r0 + wm * (TM / WM) + mt * 16 + gid + (c >= 2 ? 8 : 0);
                int t = wn * (TN / WN) + j * 8 + 2 * tig + (c & 1);
                if (row >= m || t >= nt) continue;
                float* o = out + (u64)(t0 + t) * p.out_stride + row;
                *o = accumulate ? *o + acc[mt][j][c] : acc[mt][j][c];
            }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma2_64x64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
                  int accumulate) {
    pdl_begin();
    matmul_mma2<64, 64, 2, 1>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma2_64x32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
                  int accumulate) {
    pdl_begin();
    matmul_mma2<64, 32, 2, 2>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma2_64x16(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
                  int accumulate) {
    pdl_begin();
    matmul_mma2<64, 16, 2, 2>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma2_16x64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
                  int accumulate) {
    pdl_begin();
    matmul_mma2<16, 64, 1, 2>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
matmul_mma2_16x32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
                  int accumulate) {
    pdl_begin();
    matmul_mma2<16, 32, 1, 2>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)
matmul(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
       int accumulate) {
    pdl_begin();
    __shared__ float s_scale[MM_TOKENS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const MmProj& p = proj_of_block(projs);
    const u8* w = (const u8*)p.w;
    float* out = (float*)p.out;
    int dtype = p.dtype, m = p.m, out_stride = p.out_stride;
    int j = ((int)blockIdx.x - p.first_block) * MM_WARPS + warp;
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n - t0);
    if (norm_w != 0) token_scales(x, t0, nt, k, eps, s_scale);
    if (j >= m) return;
    const u8* wr = w + (u64)j * row_bytes_of(dtype, k);
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int e0 = lane * 8; e0 < k; e0 += 256) {
        float wv[8];
        load8_float(wr, dtype, e0, wv);
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t < nt) {
                float xv[8];
                load_x8(x + (u64)(t0 + t) * k, norm_w, norm_w != 0 ? s_scale[t] : 1.0f, e0, xv);
                float s = acc[t];
#pragma unroll
                for (int i = 0; i < 8; i++) s = fmaf(wv[i], xv[i], s);
                acc[t] = s;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) {
            float* o = out + (u64)(t0 + t) * out_stride + j;
            *o = accumulate ? *o + s : s;
        }
    }
}
