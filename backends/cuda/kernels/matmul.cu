// matmul.cu — out (n, m) = x (n, k) . w (m, k)^T with w in any weight dtype
// (reference: backends/cpu/src/matmul.rs, and rms_norm_matmul.rs for the fused
// form). Weights are read in their GGUF blocks and decoded in registers;
// nothing is dequantized to memory.
//
// matmul(x, norm_w, eps, projs, n, k, accumulate)
//   x:      (n, k) f32, rows 16-byte aligned (k a multiple of 8)
//   norm_w: (k) f32 or 0. When given, x is RMS-normed on the fly
//           (x[e] * (1 / sqrt(mean(x^2) + eps)) * norm_w[e], as rms_norm.cu) — the fused
//           rms_norm_matmul; the normed rows are never written.
//   projs:  MmProjs by value, 1-4 projections sharing x: projection i has
//           w (m_i, k) in dtype_i (F32, F16, BF16, Q8_0, Q4_0, Q4_1), out (n, out_stride_i) f32
//           with columns 0 .. m_i written (added to when accumulate != 0), and owns
//           grid.x blocks first_block_i .. first_block_{i+1}.
// Launch: grid (sum of ceil(m_i / 4), ceil(n / 8)), block 128 = 4 warps; shared: 8 floats.
//   Warp w of a block owns weight row j = (blockIdx.x - first_block) * 4 + w of its
//   projection and tokens blockIdx.y * 8 .. + 8; lane l decodes elements l*8 .. l*8+8 of
//   every 256-element stretch of the row and keeps one accumulator per token; a warp sum
//   ends each dot product.

#define MM_WARPS 4
#define MM_TOKENS 8
#define MM_MAX_PROJS 4

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

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)
matmul(const float* x, const float* norm_w, float eps, MmProjs projs, int n, int k,
       int accumulate) {
    __shared__ float s_scale[MM_TOKENS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int pi = 0;
#pragma unroll
    for (int i = 1; i < MM_MAX_PROJS; i++)
        if (i < projs.count && (int)blockIdx.x >= projs.p[i].first_block) pi = i;
    const u8* w = (const u8*)projs.p[pi].w;
    float* out = (float*)projs.p[pi].out;
    int dtype = projs.p[pi].dtype, m = projs.p[pi].m, out_stride = projs.p[pi].out_stride;
    int j = ((int)blockIdx.x - projs.p[pi].first_block) * MM_WARPS + warp;
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n - t0);
    if (norm_w != 0) {
        // Every warp takes part (before any returns): one scale per token.
        for (int t = warp; t < nt; t += MM_WARPS) {
            const float* xr = x + (u64)(t0 + t) * k;
            float s = 0.0f;
            for (int e = lane; e < k; e += 32) s += xr[e] * xr[e];
            s = warp_sum(s);
            if (lane == 0) s_scale[t] = 1.0f / sqrtf(s / (float)k + eps);
        }
        __syncthreads();
    }
    if (j >= m) return;
    const u8* wr = w + (u64)j * row_bytes_of(dtype, k);
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int e0 = lane * 8; e0 < k; e0 += 256) {
        float wv[8];
        load8(wr, dtype, e0, wv);
        float nw[8];
        if (norm_w != 0) {
            const float4* np = (const float4*)(norm_w + e0);
            float4 a = np[0], b = np[1];
            nw[0] = a.x; nw[1] = a.y; nw[2] = a.z; nw[3] = a.w;
            nw[4] = b.x; nw[5] = b.y; nw[6] = b.z; nw[7] = b.w;
        }
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t < nt) {
                const float4* xp = (const float4*)(x + (u64)(t0 + t) * k + e0);
                float4 a = xp[0], b = xp[1];
                float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                if (norm_w != 0) {
                    float sc = s_scale[t];
#pragma unroll
                    for (int i = 0; i < 8; i++) xv[i] = xv[i] * sc * nw[i];
                }
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
