// paged_attention.cu — causal, ragged, GQA attention reading K/V only through
// block tables and the layer's page table (reference:
// backends/cpu/src/paged_attention.rs). Prefill and decode are one kernel.
//
// paged_attention(q, pieces, page_table, positions, block_tables, context_lens,
//                 query_start_locs, out, num_tokens, num_seqs, num_heads, num_kv_heads,
//                 head_dim, page_size, num_pages, dtype, max_blocks_per_seq, scale)
//   q:   (num_tokens, num_heads, head_dim) f32;  out: (num_tokens, num_heads, head_dim) f32
//   positions: (num_tokens) u32, token t attends to positions 0 ..= positions[t]
//   block_tables: (num_seqs, max_blocks_per_seq) u32; context_lens: (num_seqs) u32
//   query_start_locs: (num_seqs + 1) u32; KV dtype F32, F16, BF16 or Q8_0; head_dim <= 256
// Launch: grid (num_tokens, num_heads), block 128 = 4 warps; shared: 4 * (2 + 256) floats.
//   Warp w visits keys w, w + 4, ... (lane l holds elements l, l + 32, ... of the head);
//   each warp keeps an online softmax (max, sum, accumulator); the four states are
//   merged through shared memory at the end. A token outside every sequence gets zeros.

#define PA_WARPS 4
#define PA_MAX_PER_LANE 8 /* head_dim <= 256 */

__device__ __forceinline__ float kv_elem(const u8* row, int dtype, int e) {
    if (dtype == DT_F32) return ((const float*)row)[e];
    if (dtype == DT_F16) return f16_to_f32(((const u16*)row)[e]);
    if (dtype == DT_BF16) return bf16_to_f32(((const u16*)row)[e]);
    const u8* b = row + (e / 32) * 34;
    return f16_to_f32(load_u16(b)) * (float)(signed char)b[2 + e % 32];
}

extern "C" __global__ void __launch_bounds__(PA_WARPS * 32)
paged_attention(const float* q, KvPieces pieces, const u32* page_table, const u32* positions,
                const u32* block_tables, const u32* context_lens, const u32* query_start_locs,
                float* out, int num_tokens, int num_seqs, int num_heads, int num_kv_heads,
                int head_dim, int page_size, int num_pages, int dtype, int max_blocks_per_seq,
                float scale) {
    __shared__ float s_m[PA_WARPS];
    __shared__ float s_l[PA_WARPS];
    __shared__ float s_acc[PA_WARPS][PA_MAX_PER_LANE * 32];
    int t = blockIdx.x, h = blockIdx.y;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= num_tokens) return;
    float* o = out + ((u64)t * num_heads + h) * head_dim;

    // The sequence holding token t: the last s with query_start_locs[s] <= t.
    int lo = 0, hi = num_seqs;  // invariant: qsl[lo] <= t < qsl[hi] if t is in a sequence
    if (num_seqs <= 0 || t < (int)query_start_locs[0] || t >= (int)query_start_locs[num_seqs]) {
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) o[e] = 0.0f;
        return;
    }
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if ((int)query_start_locs[mid] <= t) lo = mid; else hi = mid;
    }
    int s = lo;
    int ctx = (int)context_lens[s];
    // Never past the context nor the block table's width.
    int last = min(min((int)positions[t], ctx - 1), max_blocks_per_seq * page_size - 1);
    int kvh = h / (num_heads / num_kv_heads);
    u64 row = row_bytes_of(dtype, head_dim);
    const u32* table = block_tables + (u64)s * max_blocks_per_seq;

    const float* qh = q + ((u64)t * num_heads + h) * head_dim;
    float qv[PA_MAX_PER_LANE], acc[PA_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < PA_MAX_PER_LANE; i++) {
        int e = lane + 32 * i;
        qv[i] = e < head_dim ? qh[e] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int p = warp; p <= last; p += PA_WARPS) {
        u32 page = table[p / page_size];
        int off = p % page_size;
        const u8* kr = kv_row(pieces, page_table, page, 0, off, kvh, num_pages, page_size,
                              num_kv_heads, row);
        const u8* vr = kv_row(pieces, page_table, page, 1, off, kvh, num_pages, page_size,
                              num_kv_heads, row);
        if (kr == 0) continue;
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < PA_MAX_PER_LANE; i++) {
            int e = lane + 32 * i;
            if (e < head_dim) d = fmaf(qv[i], kv_elem(kr, dtype, e), d);
        }
        float score = warp_sum(d) * scale;
        float m_new = fmaxf(m, score);
        float corr = expf(m - m_new);
        float pexp = expf(score - m_new);
        l = l * corr + pexp;
#pragma unroll
        for (int i = 0; i < PA_MAX_PER_LANE; i++) {
            int e = lane + 32 * i;
            if (e < head_dim) acc[i] = acc[i] * corr + pexp * kv_elem(vr, dtype, e);
        }
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PA_MAX_PER_LANE; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float gm = -INFINITY;
#pragma unroll
    for (int w = 0; w < PA_WARPS; w++) gm = fmaxf(gm, s_m[w]);
    float gl = 0.0f;
    float f[PA_WARPS];
#pragma unroll
    for (int w = 0; w < PA_WARPS; w++) {
        f[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - gm);
        gl += s_l[w] * f[w];
    }
    float inv = gl > 0.0f ? 1.0f / gl : 0.0f;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; w++) a += s_acc[w][e] * f[w];
        o[e] = a * inv;
    }
}
