// kv_cache.cu — KV writes by slot and page copies through one layer's arena
// pieces and page table (reference: backends/cpu/src/kv_cache.rs; layout in
// backends/core/src/kv_cache.rs). Also the second half of rope_write_kv.
//
// write_kv(pieces, page_table, k, v, slots, num_tokens, num_kv_heads, head_dim,
//          page_size, num_pages, dtype)
//   pieces: KvPieces by value; page_table: (num_pages, 2) u32
//   k, v: (num_tokens, num_kv_heads, head_dim) f32; slots: (num_tokens) u32 = page * page_size + offset
//   dtype: F32, F16, BF16 or Q8_0 (head_dim a multiple of 32; d = amax / 127 as f16,
//   q = clamp(round(x / d), -127, 127), exactly quant::quantize_row_q8_0)
//   Launch: grid (num_tokens, 2 /* K, V */, num_kv_heads), block 32 * ceil(head_dim / 32);
//   thread e handles element e; for Q8_0 each warp is one 32-element block.
//
// copy_pages(pieces, page_table, pairs, num_pairs, page_bytes, num_pages)
//   pairs: (num_pairs, 2) u32 (src page, dst page); page_bytes a multiple of 4
//   Launch: grid (num_pairs), block 256; threads stride over the page's words.

extern "C" __global__ void write_kv(KvPieces pieces, const u32* page_table, const float* k,
                                    const float* v, const u32* slots, int num_tokens,
                                    int num_kv_heads, int head_dim, int page_size, int num_pages,
                                    int dtype) {
    int t = blockIdx.x, kv = blockIdx.y, h = blockIdx.z;
    int e = threadIdx.x;
    if (t >= num_tokens) return;
    u32 slot = slots[t];
    u32 page = slot / (u32)page_size;
    int off = (int)(slot % (u32)page_size);
    u64 row = row_bytes_of(dtype, head_dim);
    u8* dst = kv_row(pieces, page_table, page, kv, off, h, num_pages, page_size, num_kv_heads, row);
    if (dst == 0) return;
    const float* src = (kv == 0 ? k : v) + ((u64)t * num_kv_heads + h) * head_dim;
    if (dtype == DT_Q8_0) {
        // Every thread of a warp takes part in the block's reductions.
        float x = e < head_dim ? src[e] : 0.0f;
        float amax = warp_max(fabsf(x));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (e < head_dim) {
            u8* b = dst + (e / 32) * 34;
            int q = (int)roundf(x * id);
            q = max(-127, min(127, q));
            b[2 + e % 32] = (u8)(signed char)q;
            // Blocks are 34 bytes at even offsets: the scale is one aligned u16.
            if (e % 32 == 0) *(u16*)b = f32_to_f16(d);
        }
        return;
    }
    if (e >= head_dim) return;
    float x = src[e];
    if (dtype == DT_F32) ((float*)dst)[e] = x;
    else if (dtype == DT_F16) ((u16*)dst)[e] = f32_to_f16(x);
    else ((u16*)dst)[e] = f32_to_bf16(x);
}

extern "C" __global__ void copy_pages(KvPieces pieces, const u32* page_table, const u32* pairs,
                                      int num_pairs, u64 page_bytes, int num_pages) {
    int p = blockIdx.x;
    if (p >= num_pairs) return;
    u32 src = pairs[2 * p], dst = pairs[2 * p + 1];
    if (src >= (u32)num_pages || dst >= (u32)num_pages) return;
    const u32* s = (const u32*)(pieces.base[page_table[2 * src]] + (u64)page_table[2 * src + 1] * page_bytes);
    u32* d = (u32*)(pieces.base[page_table[2 * dst]] + (u64)page_table[2 * dst + 1] * page_bytes);
    for (u64 i = threadIdx.x; i < page_bytes / 4; i += blockDim.x) d[i] = s[i];
}
