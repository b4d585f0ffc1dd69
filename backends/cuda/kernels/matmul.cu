// matmul.cu — out (n, m) = x (n, k) . w (m, k)^T with w in any weight dtype
// (reference: backends/cpu/src/matmul.rs). Weights are read in their GGUF
// blocks and decoded in registers; nothing is dequantized to memory.
//
// matmul(x, w, dtype, out, n, k, m, out_stride, accumulate)
//   x:   (n, k) f32, rows 16-byte aligned (k a multiple of 8)
//   w:   (m, k) in dtype (F32, F16, BF16, Q8_0, Q4_0, Q4_1), rows of whole blocks
//   out: (n, out_stride) f32; columns 0 .. m written (added to when accumulate != 0)
// Launch: grid (ceil(m / 4), ceil(n / 8)), block 128 = 4 warps. Warp w of a
//   block owns weight row j = blockIdx.x * 4 + w and tokens blockIdx.y * 8 .. + 8;
//   lane l decodes elements l*8 .. l*8+8 of every 256-element stretch of the row
//   and keeps one accumulator per token; a warp sum ends each dot product.

#define MM_WARPS 4
#define MM_TOKENS 8

extern "C" __global__ void __launch_bounds__(MM_WARPS * 32)
matmul(const float* x, const u8* w, int dtype, float* out, int n, int k, int m,
       int out_stride, int accumulate) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int j = blockIdx.x * MM_WARPS + warp;
    if (j >= m) return;
    int t0 = blockIdx.y * MM_TOKENS;
    int nt = min(MM_TOKENS, n - t0);
    const u8* wr = w + (u64)j * row_bytes_of(dtype, k);
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (int e0 = lane * 8; e0 < k; e0 += 256) {
        float wv[8];
        load8(wr, dtype, e0, wv);
#pragma unroll
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t < nt) {
                const float4* xp = (const float4*)(x + (u64)(t0 + t) * k + e0);
                float4 a = xp[0], b = xp[1];
                float s = acc[t];
                s = fmaf(wv[0], a.x, s); s = fmaf(wv[1], a.y, s);
                s = fmaf(wv[2], a.z, s); s = fmaf(wv[3], a.w, s);
                s = fmaf(wv[4], b.x, s); s = fmaf(wv[5], b.y, s);
                s = fmaf(wv[6], b.z, s); s = fmaf(wv[7], b.w, s);
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
