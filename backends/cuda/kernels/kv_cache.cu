// kv_cache.cu — KV writes by slot and page copies through one layer's arena
// pieces and page table (reference: backends/cpu/src/kv_cache.rs; layout in
// backends/core/src/kv_cache.rs).
//
// write_kv(pieces, page_table, k, v, slots, num_tokens, num_kv_heads, head_dim,
//          page_size, num_pages, dtype)
//   pieces: KvPieces by value; page_table: (num_pages, 2) u32
//   k, v: (num_tokens, num_kv_heads, head_dim) f32; slots: (num_tokens) u32 = page * page_size + offset
//   dtype: F32, F16, BF16 or Q8_0 (head_dim a multiple of 32), stored by common.cuh's
//   store_kv_elem
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
    pdl_begin();
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
    // Every lane of a warp takes part (Q8_0 blocks reduce over the warp).
    store_kv_elem(dst, dtype, e, e < head_dim ? src[e] : 0.0f, head_dim);
}

extern "C" __global__ void copy_pages(KvPieces pieces, const u32* page_table, const u32* pairs,
                                      int num_pairs, u64 page_bytes, int num_pages) {
    pdl_begin();
    int p = blockIdx.x;
    if (p >= num_pairs) return;
    u32 src = pairs[2 * p], dst = pairs[2 * p + 1];
    if (src >= (u32)num_pages || dst >= (u32)num_pages) return;
    const u32* s = (const u32*)(pieces.base[page_table[2 * src]] + (u64)page_table[2 * src + 1] * page_bytes);
    u32* d = (u32*)(pieces.base[page_table[2 * dst]] + (u64)page_table[2 * dst + 1] * page_bytes);
    for (u64 i = threadIdx.x; i < page_bytes / 4; i += blockDim.x) d[i] = s[i];
}
