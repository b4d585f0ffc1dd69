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
// Launch: grid (num_tokens, num_heads), block 512; shared: q (256 floats), one chunk of
//   512 scores, 32 floats of reduction scratch, 512 floats to merge the V partial sums.
//   Keys are visited in chunks of 512: every thread scores whole keys (a dot product over
//   the row, 16-byte loads where the dtype allows), the block takes the chunk's max and
//   sum (online softmax across chunks), then thread (g, e) accumulates element e of V over
//   the keys j = g (mod 512 / head_dim) of the chunk — loads coalesced across e. The groups'
//   partial sums are added at the end. A token outside every sequence gets zeros.

#define PA_THREADS 512
#define PA_CHUNK 512

__device__ __forceinline__ float kv_elem(const u8* row, int dtype, int e) {
    if (dtype == DT_F32) return ((const float*)row)[e];
    if (dtype == DT_F16) return f16_to_f32(((const u16*)row)[e]);
    if (dtype == DT_BF16) return bf16_to_f32(((const u16*)row)[e]);
    const u8* b = row + (e / 32) * 34;
    return f16_to_f32(load_u16(b)) * (float)(signed char)b[2 + e % 32];
}

// q (shared) . K row.
__device__ __forceinline__ float dot_row(const u8* kr, int dtype, const float* q, int hd) {
    float s = 0.0f;
    if (dtype == DT_F32 && hd % 4 == 0) {
        const float4* k4 = (const float4*)kr;
        for (int i = 0; i < hd / 4; i++) {
            float4 k = k4[i];
            s = fmaf(q[4 * i], k.x, s);
            s = fmaf(q[4 * i + 1], k.y, s);
            s = fmaf(q[4 * i + 2], k.z, s);
            s = fmaf(q[4 * i + 3], k.w, s);
        }
    } else if ((dtype == DT_F16 || dtype == DT_BF16) && hd % 8 == 0) {
        const uint4* k4 = (const uint4*)kr;
        for (int i = 0; i < hd / 8; i++) {
            uint4 v = k4[i];
            u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int w = 0; w < 4; w++) {
                u16 lo = (u16)(words[w] & 0xFFFF), hi = (u16)(words[w] >> 16);
                float a = dtype == DT_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
                float b = dtype == DT_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
                s = fmaf(q[8 * i + 2 * w], a, s);
                s = fmaf(q[8 * i + 2 * w + 1], b, s);
            }
        }
    } else if (dtype == DT_Q8_0) {
        for (int blk = 0; blk < hd / 32; blk++) {
            const u8* b = kr + blk * 34;
            float d = f16_to_f32(load_u16(b));
            float t = 0.0f;
#pragma unroll 8
            for (int j = 0; j < 32; j++) t = fmaf(q[32 * blk + j], (float)(signed char)b[2 + j], t);
            s = fmaf(d, t, s);
        }
    } else {
        for (int e = 0; e < hd; e++) s = fmaf(q[e], kv_elem(kr, dtype, e), s);
    }
    return s;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
    v = warp_max(v);
    __syncthreads();  // sh may still be read from the previous reduction
    if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < (int)blockDim.x / 32; w++) r = fmaxf(r, sh[w]);
    return r;
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = v;
    __syncthreads();
    float r = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) r += sh[w];
    return r;
}

extern "C" __global__ void __launch_bounds__(PA_THREADS)
paged_attention(const float* q, KvPieces pieces, const u32* page_table, const u32* positions,
                const u32* block_tables, const u32* context_lens, const u32* query_start_locs,
                float* out, int num_tokens, int num_seqs, int num_heads, int num_kv_heads,
                int head_dim, int page_size, int num_pages, int dtype, int max_blocks_per_seq,
                float scale) {
    __shared__ float s_q[256];
    __shared__ float s_p[PA_CHUNK];
    __shared__ float s_red[32];
    __shared__ float s_acc[PA_THREADS];
    int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    if (t >= num_tokens) return;
    float* o = out + ((u64)t * num_heads + h) * head_dim;

    // The sequence holding token t: the last s with query_start_locs[s] <= t.
    if (num_seqs <= 0 || t < (int)query_start_locs[0] || t >= (int)query_start_locs[num_seqs]) {
        for (int e = tid; e < head_dim; e += blockDim.x) o[e] = 0.0f;
        return;
    }
    int lo = 0, hi = num_seqs;  // invariant: qsl[lo] <= t < qsl[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if ((int)query_start_locs[mid] <= t) lo = mid; else hi = mid;
    }
    int s = lo;
    int ctx = (int)context_lens[s];
    // Never past the context nor the block table's width.
    int nkeys = min(min((int)positions[t], ctx - 1), max_blocks_per_seq * page_size - 1) + 1;
    int kvh = h / (num_heads / num_kv_heads);
    u64 row = row_bytes_of(dtype, head_dim);
    const u32* table = block_tables + (u64)s * max_blocks_per_seq;
    const float* qh = q + ((u64)t * num_heads + h) * head_dim;
    for (int e = tid; e < head_dim; e += blockDim.x) s_q[e] = qh[e];
    __syncthreads();

    // V ownership: groups of head_dim threads (512 / head_dim groups; a
    // head_dim above 512 cannot occur: at most 256).
    bool wide = head_dim > PA_THREADS;
    int groups = wide ? 1 : PA_THREADS / head_dim;
    int g = wide ? 0 : tid / head_dim;
    int e0 = wide ? tid : tid % head_dim;
    int e1 = tid + PA_THREADS;
    bool active = g < groups;
    float acc0 = 0.0f, acc1 = 0.0f, m_run = -INFINITY, l_run = 0.0f;
    for (int c0 = 0; c0 < nkeys; c0 += PA_CHUNK) {
        int n = min(PA_CHUNK, nkeys - c0);
        float local_max = -INFINITY;
        for (int j = tid; j < n; j += PA_THREADS) {
            int p = c0 + j;
            const u8* kr = kv_row(pieces, page_table, table[p / page_size], 0, p % page_size, kvh,
                                  num_pages, page_size, num_kv_heads, row);
            float d = kr == 0 ? -INFINITY : dot_row(kr, dtype, s_q, head_dim) * scale;
            s_p[j] = d;
            local_max = fmaxf(local_max, d);
        }
        float m_new = fmaxf(m_run, block_max(local_max, s_red));
        float local_sum = 0.0f;
        for (int j = tid; j < n; j += PA_THREADS) {
            float pj = s_p[j] == -INFINITY ? 0.0f : expf(s_p[j] - m_new);
            s_p[j] = pj;
            local_sum += pj;
        }
        float csum = block_sum(local_sum, s_red);  // its barriers publish s_p
        float corr = m_run == -INFINITY ? 0.0f : expf(m_run - m_new);
        l_run = l_run * corr + csum;
        acc0 *= corr;
        acc1 *= corr;
        m_run = m_new;
        if (active) {
#pragma unroll 4
            for (int j = g; j < n; j += groups) {
                int p = c0 + j;
                const u8* vr = kv_row(pieces, page_table, table[p / page_size], 1, p % page_size,
                                      kvh, num_pages, page_size, num_kv_heads, row);
                if (vr == 0) continue;
                float pj = s_p[j];
                acc0 = fmaf(pj, kv_elem(vr, dtype, e0), acc0);
                if (wide && e1 < head_dim) acc1 = fmaf(pj, kv_elem(vr, dtype, e1), acc1);
            }
        }
        __syncthreads();  // the next chunk overwrites s_p
    }
    float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
    if (wide) {
        o[e0] = acc0 * inv;
        if (e1 < head_dim) o[e1] = acc1 * inv;
        return;
    }
    if (active) s_acc[g * head_dim + e0] = acc0;
    __syncthreads();
    for (int e = tid; e < head_dim; e += blockDim.x) {
        float a = 0.0f;
        for (int gg = 0; gg < groups; gg++) a += s_acc[gg * head_dim + e];
        o[e] = a * inv;
    }
}
