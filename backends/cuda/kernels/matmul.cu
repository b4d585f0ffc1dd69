// matmul.cu — out (n, m) = x (n, k) . w (m, k)^T (reference: backends/cpu/src/matmul.rs,
// and rms_norm_matmul.rs for the fused form). Weights are decoded in registers; nothing
// is dequantized to memory. Three kinds of kernel, one argument list:
//
// matmul_vec, matmul_t16, matmul_t32, matmul_t64, matmul_r8_t16, matmul_r8_t32,
// matmul_r8_t64, matmul — all (x, norm_w, eps, projs, n, k, accumulate):
//   x:      (n, k) f32, rows 16-byte aligned (k a multiple of 8; of 32 for quantized w)
//   norm_w: (k) f32 or 0. When given, x is RMS-normed on the fly
//           (x[e] * (1 / sqrt(mean(x^2) + eps)) * norm_w[e], as rms_norm.cu) — the fused
//           rms_norm_matmul; the normed rows are never written.
//   projs:  MmProjs by value, 1-4 projections sharing x: projection i has
//           w (m_i, k) in dtype_i, out (n, out_stride_i) f32 with columns 0 .. m_i written
//           (added to when accumulate != 0), and owns grid.x blocks
//           first_block_i .. first_block_{i+1}. One launch holds only quantized
//           projections (Q8_0, Q4_0, Q4_1, in the repacked layout of common.cuh) or only
//           float ones (F32, F16, BF16, row-major).
//
// matmul_vec (quantized, n <= 8: decode). Launch: grid (sum of ceil(m_i / 4), 1), block 128 = 4
//   warps; shared: 8 floats. Warp w owns row j = (blockIdx.x - first_block) * 4 + w; lane l
//   takes the half-blocks l, l + 32, ... of the row (16 values: 8 bytes of Q4 quants or 16
//   of Q8_0), two at a time, loaded before any arithmetic (the first two even before the
//   norm scales), sums q * x per token with the scale applied once per half (and
//   m * sum(x) for Q4_1); a warp sum ends each dot.
//
// matmul_t<TN> / matmul_r8_t<TN> (quantized, n > 8; TN = 16, 32, 64 tokens; TM = 32 rows a
//   block, or 8 for the r8 kernels, which give small m more blocks). Launch: grid (sum of
//   ceil(m_i / TM), ceil(n / TN)), block 128; shared: a 32 x TM weight tile and a 32 x TN
//   x tile, both k-major (about 4.6 + 8.7 KB at TM = 32, TN = 64), TN floats of scales.
//   Each step of 32 (one block of every row) the block decodes TM rows x 32 values
//   (thread: one row, a quarter of the block) and loads TN tokens x 32 values of x (normed
//   on the fly) into shared memory, the next step's global loads in flight during this
//   step's products; thread (tx, ty) then accumulates rows ty*TM/8 .. + TM/8 x tokens
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

// The projection owning this block (by blockIdx.x).
__device__ __forceinline__ const MmProj& proj_of_block(const MmProjs& projs) {
    int pi = 0;
#pragma unroll
    for (int i = 1; i < MM_MAX_PROJS; i++)
        if (i < projs.count && (int)blockIdx.x >= projs.p[i].first_block) pi = i;
    return projs.p[pi];
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

// Half a quantized block's raw bits: 16 of its 32 values (8 bytes of Q4 quants: values
// 8h .. 8h+7 and 16+8h .. 16+8h+7; 16 bytes of Q8_0 quants: values 16h .. 16h+15) and the
// block's scales word.
struct RawHalf {
    uint4 q;
    u32 sc;
};

// Half h of block i (= row * nb + b) of a repacked weight; zeros when !valid.
__device__ __forceinline__ RawHalf load_half(const u8* qs, const u8* sc, int dtype, u64 i, int h,
                                             bool valid) {
    RawHalf r;
    r.q = make_uint4(0, 0, 0, 0);
    r.sc = 0;
    if (!valid) return r;
    if (dtype == DT_Q8_0) {
        r.q = *(const uint4*)(qs + i * 32 + h * 16);
        r.sc = ((const u16*)sc)[i];
    } else {
        uint2 v = *(const uint2*)(qs + i * 16 + h * 8);
        r.q.x = v.x;
        r.q.y = v.y;
        r.sc = dtype == DT_Q4_1 ? ((const u32*)sc)[i] : (u32)((const u16*)sc)[i];
    }
    return r;
}

// acc[t] += half h of the block (values from element e0 = block start) . x[t0 + t] for t < nt.
__device__ __forceinline__ void half_dot(const RawHalf& r, int dtype, int h, const float* x,
                                         const float* norm_w, const float* s_scale, int nt, int k,
                                         int e0, float acc[MV_TOKENS]) {
    float q[16];
    // x offsets of the two runs of 8 values this half holds.
    int xa, xb;
    if (dtype == DT_Q8_0) {
        u32 w[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int c = 0; c < 4; c++) q[4 * i + c] = (float)(signed char)((w[i] >> (8 * c)) & 0xFF);
        xa = e0 + 16 * h;
        xb = xa + 8;
    } else {
        int off = dtype == DT_Q4_0 ? 8 : 0;
        u32 w[2] = {r.q.x, r.q.y};
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int byte = (int)((w[i] >> (8 * c)) & 0xFF);
                q[4 * i + c] = (float)((byte & 15) - off);
                q[8 + 4 * i + c] = (float)((byte >> 4) - off);
            }
        xa = e0 + 8 * h;
        xb = xa + 16;
    }
    float d = f16_to_f32((u16)(r.sc & 0xFFFF));
    float mn = dtype == DT_Q4_1 ? f16_to_f32((u16)(r.sc >> 16)) : 0.0f;
#pragma unroll
    for (int t = 0; t < MV_TOKENS; t++) {
        if (t >= nt) break;
        const float* xr = x + (u64)t * k;
        float sc = norm_w != 0 ? s_scale[t] : 1.0f;
        float va[8], vb[8];
        load_x8(xr, norm_w, sc, xa, va);
        load_x8(xr, norm_w, sc, xb, vb);
        float sq = 0.0f, sx = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sq = fmaf(q[i], va[i], sq);
            sx += va[i];
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sq = fmaf(q[8 + i], vb[i], sq);
            sx += vb[i];
        }
        acc[t] = fmaf(d, sq, acc[t]);
        if (dtype == DT_Q4_1) acc[t] = fmaf(mn, sx, acc[t]);
    }
}

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)
matmul_vec(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    __shared__ float s_scale[MV_TOKENS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const MmProj& p = proj_of_block(projs);
    int dtype = p.dtype, m = p.m;
    int j = ((int)blockIdx.x - p.first_block) * MM_WARPS + warp;
    int nt = min(MV_TOKENS, n);
    u64 nb = (u64)(k / 32);
    u64 nh = 2 * nb;  // halves of the row
    const u8* qs = (const u8*)p.w;
    const u8* sc = qs + (u64)m * nb * quant_qb(dtype);
    u64 row0 = (u64)j * nb;
    // The first two halves of this lane are loaded before the norm scales are computed.
    u64 hb = lane;
    RawHalf r0 = load_half(qs, sc, dtype, row0 + hb / 2, (int)(hb % 2), j < m && hb < nh);
    RawHalf r1 = load_half(qs, sc, dtype, row0 + (hb + 32) / 2, (int)(hb % 2),
                           j < m && hb + 32 < nh);
    if (norm_w != 0) token_scales(x, 0, nt, k, eps, s_scale);
    if (j >= m) return;
    float acc[MV_TOKENS];
#pragma unroll
    for (int t = 0; t < MV_TOKENS; t++) acc[t] = 0.0f;
    for (;;) {
        if (hb < nh) half_dot(r0, dtype, (int)(hb % 2), x, norm_w, s_scale, nt, k, (int)(hb / 2) * 32, acc);
        if (hb + 32 < nh)
            half_dot(r1, dtype, (int)(hb % 2), x, norm_w, s_scale, nt, k, (int)((hb + 32) / 2) * 32, acc);
        hb += 64;
        if (hb >= nh) break;
        r0 = load_half(qs, sc, dtype, row0 + hb / 2, (int)(hb % 2), true);
        r1 = load_half(qs, sc, dtype, row0 + (hb + 32) / 2, (int)(hb % 2), hb + 32 < nh);
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
    u64 nb = (u64)(k / 32);
    const u8* qs = (const u8*)p.w;
    const u8* sc = qs + (u64)m * nb * quant_qb(dtype);
    // Loader roles: weight row r0 + lr, quarter lq of each block (8 values).
    int lr = tid / 4, lq = tid % 4;
    bool wvalid = lr < TM && r0 + lr < m;
    u64 wrow = (u64)(r0 + lr) * nb;
    // Compute roles.
    int tx = tid % 16, ty = tid / 16;
    float acc[RPT][TPT];
#pragma unroll
    for (int r = 0; r < RPT; r++)
#pragma unroll
        for (int i = 0; i < TPT; i++) acc[r][i] = 0.0f;

    // Raw loads of step b into registers.
    uint2 wq = make_uint2(0, 0);
    u32 wsc = 0;
    float4 xv[XF];
    auto load_step = [&](u64 b) {
        if (wvalid) {
            u64 i = wrow + b;
            if (dtype == DT_Q8_0) {
                wq = *(const uint2*)(qs + i * 32 + lq * 8);
                wsc = ((const u16*)sc)[i];
            } else {
                wq.x = *(const u32*)(qs + i * 16 + lq * 4);
                wsc = dtype == DT_Q4_1 ? ((const u32*)sc)[i] : (u32)((const u16*)sc)[i];
            }
        }
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
    for (u64 b = 0; b < nb; b++) {
        __syncthreads();  // the previous step's products are done with the tiles
        if (lr < TM) {
            float d = f16_to_f32((u16)(wsc & 0xFFFF));
            if (dtype == DT_Q8_0) {
                u32 w2[2] = {wq.x, wq.y};
#pragma unroll
                for (int c = 0; c < 8; c++)
                    s_w[lq * 8 + c][lr] = d * (float)(signed char)((w2[c / 4] >> (8 * (c % 4))) & 0xFF);
            } else {
                float mn = dtype == DT_Q4_1 ? f16_to_f32((u16)(wsc >> 16)) : 0.0f;
                int off = dtype == DT_Q4_0 ? 8 : 0;
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    int byte = (int)((wq.x >> (8 * c)) & 0xFF);
                    s_w[lq * 4 + c][lr] = fmaf(d, (float)((byte & 15) - off), mn);
                    s_w[16 + lq * 4 + c][lr] = fmaf(d, (float)((byte >> 4) - off), mn);
                }
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
        if (b + 1 < nb) load_step(b + 1);  // in flight during the products below
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
    matmul_tiled<32, 16>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_t32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    matmul_tiled<32, 32>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_t64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
           int accumulate) {
    matmul_tiled<32, 64>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t16(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    matmul_tiled<8, 16>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t32(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    matmul_tiled<8, 32>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MT_THREADS)
matmul_r8_t64(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
              int accumulate) {
    matmul_tiled<8, 64>(x, norm_w, eps, projs, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)
matmul(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
       int accumulate) {
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
