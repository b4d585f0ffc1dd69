// elementwise.cu — SwiGLU activation, residual add, row gather
// (reference: backends/cpu/src/elementwise.rs).
//
// silu_mul(gate, up, out, len)        gate, up, out: (len) f32; out = gate / (1 + e^-gate) * up
// add_assign(x, y, len)               x, y: (len) f32; x += y (in place)
// gather_rows(x, idx, out, m, dim, n) x: (n, dim) f32; idx: (m) u32; out: (m, dim) f32
//                                     (an index >= n gives a row of zeros)
//
// Launch: silu_mul / add_assign: grid (ceil(len / 256)), block 256, one element a thread.
//         gather_rows: grid (m), block 256, threads stride over dim.

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, u64 len) {
    pdl_begin();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
}

extern "C" __global__ void add_assign(float* x, const float* y, u64 len) {
    pdl_begin();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    x[i] += y[i];
}

extern "C" __global__ void gather_rows(const float* x, const u32* idx, float* out, int m, int dim,
                                       u32 n) {
    pdl_begin();
    int r = blockIdx.x;
    if (r >= m) return;
    u32 i = idx[r];
    float* dst = out + (u64)r * dim;
    if (i >= n) {
        for (int e = threadIdx.x; e < dim; e += blockDim.x) dst[e] = 0.0f;
        return;
    }
    const float* src = x + (u64)i * dim;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) dst[e] = src[e];
}
