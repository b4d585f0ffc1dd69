// rms_norm.cu — RMSNorm (reference: backends/cpu/src/rms_norm.rs); also the
// first half of the fused rms_norm_matmul (rms_norm.cu then matmul.cu).
//
// rms_norm(x, weight, out, n, dim, eps)
//   x: (n, dim) f32; weight: (dim) f32; out: (n, dim) f32
//   out[i] = x[i] * (1 / sqrt(mean(x[i]^2) + eps)) * weight
// Launch: grid (n), block 256 (a multiple of 32); shared: 32 floats.

extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int n,
                                    int dim, float eps) {
    pdl_begin();
    __shared__ float partial[32];
    int r = blockIdx.x;
    if (r >= n) return;
    const float* xr = x + (u64)r * dim;
    float s = 0.0f;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) s += xr[e] * xr[e];
    s = warp_sum(s);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x / 32;
        float t = lane < warps ? partial[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) partial[0] = t;
    }
    __syncthreads();
    float scale = 1.0f / sqrtf(partial[0] / (float)dim + eps);
    float* o = out + (u64)r * dim;
    for (int e = threadIdx.x; e < dim; e += blockDim.x) o[e] = xr[e] * scale * weight[e];
}
