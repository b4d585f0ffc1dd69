// rope_write_kv.cu — fused RoPE and KV write (reference:
// backends/cpu/src/rope_write_kv.rs = rope on q and k, then write_kv).
//
// rope_write_kv(q, k, v, positions, slots, pieces, page_table, num_tokens, num_heads,
//               num_kv_heads, head_dim, rope_dim, freq_base, page_size, num_pages, dtype)
//   q: (num_tokens, num_heads, head_dim) f32, rotated in place
//   k: (num_tokens, num_kv_heads, head_dim) f32, rotated in place
//   v: (num_tokens, num_kv_heads, head_dim) f32
//   positions, slots: (num_tokens) u32 (slot = page * page_size + offset)
//   KV rows stored through pieces + page_table ((num_pages, 2) u32) in dtype F32, F16,
//   BF16 or Q8_0 (head_dim a multiple of 32) — common.cuh's rope_heads and store_kv_elem,
//   the same code as rope.cu and kv_cache.cu.
// Launch: grid (num_tokens), block 256. The block rotates every q and k head of its token
//   (rope_heads: one angle per thread, reused over heads), synchronises, then each warp
//   stores K/V rows (32 elements at a time).

extern "C" __global__ void rope_write_kv(float* q, float* k, const float* v, const u32* positions,
                                         const u32* slots, KvPieces pieces, const u32* page_table,
                                         int num_tokens, int num_heads, int num_kv_heads,
                                         int head_dim, int rope_dim, float freq_base,
                                         int page_size, int num_pages, int dtype) {
    pdl_begin();
    int t = blockIdx.x;
    if (t >= num_tokens) return;
    float* qt = q + (u64)t * num_heads * head_dim;
    float* kt = k + (u64)t * num_kv_heads * head_dim;
    rope_heads(
        [=](int h) {
            return h < num_heads ? qt + (u64)h * head_dim : kt + (u64)(h - num_heads) * head_dim;
        },
        num_heads + num_kv_heads, (double)positions[t], rope_dim, freq_base);
    __syncthreads();
    u32 slot = slots[t];
    u32 page = slot / (u32)page_size;
    int off = (int)(slot % (u32)page_size);
    u64 row = row_bytes_of(dtype, head_dim);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const float* vt = v + (u64)t * num_kv_heads * head_dim;
    for (int r = warp; r < 2 * num_kv_heads; r += warps) {
        int kv = r / num_kv_heads, h = r % num_kv_heads;
        u8* dst = kv_row(pieces, page_table, page, kv, off, h, num_pages, page_size,
                         num_kv_heads, row);
        if (dst == 0) continue;
        const float* src = (kv == 0 ? kt : vt) + (u64)h * head_dim;
        for (int e0 = 0; e0 < head_dim; e0 += 32) {
            int e = e0 + lane;
            store_kv_elem(dst, dtype, e, e < head_dim ? src[e] : 0.0f, head_dim);
        }
    }
}
