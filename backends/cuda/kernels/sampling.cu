// sampling.cu — picking tokens from logits rows on the device (reference:
// backends/cpu/src/sampling.rs, the host sampler's exact orders).
//
// argmax_partial(logits, keys, rows, vocab) then argmax_finish(logits, keys, ids, rows)
//   logits: (rows, vocab) f32; keys: (rows) u64, zeroed before; ids: (rows) u32. The first
//   maximum, as the CPU's `if v > row[best]` scan: ties go to the lower id, NaN never
//   replaces the best, and a row whose element 0 is NaN gives 0. A candidate is keyed as
//   one u64 (order bits << 32 | ~id), so the best is the largest key: each block of
//   argmax_partial reduces one stretch of a row and atomicMax-es its key into keys[row];
//   argmax_finish turns the keys into ids.
//   Launch: argmax_partial grid (rows, stretches), block 256; shared: 32 u64.
//           argmax_finish grid (ceil(rows / 256)), block 256.
// top_k_rows(logits, values, ids, rows, vocab, k)
//   values: (rows, k) f32; ids: (rows, k) u32; descending by f32::total_cmp, ties to the
//   lower id. Each element is keyed as one u64 (total-order bits << 32 | ~id), so the
//   order is a plain integer order; k rounds each pick the largest key below the last pick.
//   Launch: grid (rows), block 1024; shared: 32 u64.

__device__ __forceinline__ u64 block_max_u64(u64 v, u64* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 other = __shfl_xor_sync(0xFFFFFFFFu, v, o);
        v = other > v ? other : v;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // sh may still be read from the previous round
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    u64 r = 0;
    for (int w = 0; w < warps; w++) r = sh[w] > r ? sh[w] : r;
    return r;
}

// f32::total_cmp order as unsigned bits.
__device__ __forceinline__ u32 total_order_bits(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

extern "C" __global__ void argmax_partial(const float* logits, u64* keys, int rows, int vocab) {
    pdl_begin();
    __shared__ u64 sh[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + (u64)r * vocab;
    int per = (vocab + gridDim.y - 1) / gridDim.y;
    int lo = blockIdx.y * per, hi = min(vocab, lo + per);
    // Key of a candidate: order bits of the value (NaN excluded), then the lower id.
    u64 best = 0;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float v = row[i];
        if (v != v) continue;
        // +0 and -0 compare equal in `v > best`: fold -0 onto +0 so the lower id wins.
        if (v == 0.0f) v = 0.0f;
        u64 key = ((u64)total_order_bits(v) << 32) | (u64)(0xFFFFFFFFu - (u32)i);
        best = key > best ? key : best;
    }
    best = block_max_u64(best, sh);
    if (threadIdx.x == 0 && best != 0) atomicMax(keys + r, best);
}

extern "C" __global__ void argmax_finish(const float* logits, const u64* keys, u32* ids,
                                         int rows, int vocab) {
    pdl_begin();
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float v0 = logits[(u64)r * vocab];
    u64 best = keys[r];
    ids[r] = (v0 != v0 || best == 0) ? 0u : 0xFFFFFFFFu - (u32)(best & 0xFFFFFFFFu);
}

extern "C" __global__ void top_k_rows(const float* logits, float* values, u32* ids, int rows,
                                      int vocab, int k) {
    pdl_begin();
    __shared__ u64 sh[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = logits + (u64)r * vocab;
    u64 limit = ~(u64)0;  // picks so far are all >= limit; the next is the largest below it
    for (int round = 0; round < k; round++) {
        u64 best = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            u64 key = ((u64)total_order_bits(row[i]) << 32) | (u64)(0xFFFFFFFFu - (u32)i);
            if (key < limit && key > best) best = key;
        }
        best = block_max_u64(best, sh);
        if (threadIdx.x == 0) {
            u32 id = 0xFFFFFFFFu - (u32)(best & 0xFFFFFFFFu);
            ids[(u64)r * k + round] = id;
            values[(u64)r * k + round] = row[id];
        }
        limit = best;
    }
}
