// paged_attention.cu — causal, ragged, GQA attention reading K/V only through
// block tables and the layer's page table (reference:
// backends/cpu/src/paged_attention.rs). Prefill and decode are one kernel.
//
// paged_attention(q, pieces, page_table, positions, block_tables, context_lens,
//                 query_start_locs, out, num_tokens, num_seqs, num_heads, num_kv_heads,
//                 head_dim, page_size, num_pages, dtype, max_blocks_per_seq, scale,
//                 partial, splits)
// attention_combine(partial, out, num_tokens, num_heads, head_dim, splits)
//   q:   (num_tokens, num_heads, head_dim) f32;  out: (num_tokens, num_heads, head_dim) f32
//   positions: (num_tokens) u32, token t attends to positions 0 ..= positions[t]
//   block_tables: (num_seqs, max_blocks_per_seq) u32; context_lens: (num_seqs) u32
//   query_start_locs: (num_seqs + 1) u32; KV dtype F32, F16, BF16 or Q8_0; head_dim <= 256
//   partial: (num_tokens, num_heads, splits, head_dim + 2) f32 when splits > 1: the keys of a
//   token are split into `splits` stretches (flash-decoding: short batches get enough
//   blocks); block z writes its stretch's running max, sum and unnormalised V sum there
//   and attention_combine merges the stretches into out. splits = 1: out directly.
// Launch: grid (num_tokens, num_heads, splits), block 256 = 8 warps; shared: q (256 floats), one
//   chunk of 256 scores, the chunk's page base addresses (257 u64), 32 floats of reduction
//   scratch, 8 x 256 floats to merge the warps' V sums (about 12 KB).
//   Keys are visited in chunks of 256. Per chunk the block first translates the chunk's
//   pages (block table -> layer page table -> piece base) once into shared memory, so no
//   key waits on a chain of dependent loads; then every thread scores one whole key (a dot
//   product over the row, 16-byte loads where the dtype allows), the block takes the
//   chunk's max and sum (online softmax across chunks), and warp w accumulates all of V
//   over the keys j = w (mod 8), lane l owning elements l, l + 32, ... (loads coalesced
//   across the warp). The warps' partial sums are added at the end. A token outside every
//   sequence gets zeros.
// attention_combine: grid (num_tokens, num_heads), block 256; out = sum_z e^(m_z - M) acc_z
//   / sum_z e^(m_z - M) l_z over the stretches z (M = max m_z), zeros when no key scored.

#define PA_THREADS 256
#define PA_CHUNK 256
#define PA_WARPS (PA_THREADS / 32)
#define PA_MAX_EPL 8  // head_dim <= 256: elements per lane

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
                float scale, float* partial, int splits) {
    __shared__ float s_q[256];
    __shared__ float s_p[PA_CHUNK];
    __shared__ float s_red[32];
    __shared__ u64 s_page[PA_CHUNK + 1];
    __shared__ float s_acc[PA_WARPS * 256];
    int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
    int warp = tid / 32, lane = tid % 32;
    if (t >= num_tokens) return;
    float* o = out + ((u64)t * num_heads + h) * head_dim;
    float* part = splits > 1 ? partial + (((u64)t * num_heads + h) * splits + z) * (head_dim + 2)
                             : 0;

    // The sequence holding token t: the last s with query_start_locs[s] <= t.
    if (num_seqs <= 0 || t < (int)query_start_locs[0] || t >= (int)query_start_locs[num_seqs]) {
        if (part != 0) {
            for (int e = tid; e < head_dim + 2; e += blockDim.x) part[e] = e == 0 ? -INFINITY : 0.0f;
        } else {
            for (int e = tid; e < head_dim; e += blockDim.x) o[e] = 0.0f;
        }
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
    u64 page_bytes = (u64)2 * page_size * num_kv_heads * row;
    // Offsets inside a page of token 0's K row and V row of this head.
    u64 k_off = (u64)kvh * row, v_off = ((u64)page_size * num_kv_heads + kvh) * row;
    u64 tok_stride = (u64)num_kv_heads * row;
    const u32* table = block_tables + (u64)s * max_blocks_per_seq;
    const float* qh = q + ((u64)t * num_heads + h) * head_dim;
    for (int e = tid; e < head_dim; e += blockDim.x) s_q[e] = qh[e];

    int epl = (head_dim + 31) / 32;
    float acc[PA_MAX_EPL];
#pragma unroll
    for (int i = 0; i < PA_MAX_EPL; i++) acc[i] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f;
    int per = (nkeys + splits - 1) / splits;
    int kb = z * per, ke = min(nkeys, kb + per);
    for (int c0 = kb; c0 < ke; c0 += PA_CHUNK) {
        int n = min(PA_CHUNK, ke - c0);
        int first = c0 / page_size;
        int npages = (c0 + n - 1) / page_size - first + 1;
        for (int i = tid; i < npages; i += PA_THREADS) {
            u32 page = table[first + i];
            u64 base = 0;
            if (page < (u32)num_pages) {
                u32 piece = page_table[2 * page];
                if (piece < MAX_KV_PIECES)
                    base = pieces.base[piece] + (u64)page_table[2 * page + 1] * page_bytes;
            }
            s_page[i] = base;
        }
        __syncthreads();  // s_page (and s_q on the first chunk)
        float local_max = -INFINITY;
        for (int j = tid; j < n; j += PA_THREADS) {
            int p = c0 + j;
            u64 base = s_page[p / page_size - first];
            float d = -INFINITY;
            if (base != 0) {
                const u8* kr = (const u8*)(base + k_off + (u64)(p % page_size) * tok_stride);
                d = dot_row(kr, dtype, s_q, head_dim) * scale;
            }
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
        m_run = m_new;
#pragma unroll
        for (int i = 0; i < PA_MAX_EPL; i++) acc[i] *= corr;
#pragma unroll 4
        for (int j = warp; j < n; j += PA_WARPS) {
            int p = c0 + j;
            u64 base = s_page[p / page_size - first];
            float pj = s_p[j];
            if (base == 0 || pj == 0.0f) continue;
            const u8* vr = (const u8*)(base + v_off + (u64)(p % page_size) * tok_stride);
#pragma unroll
            for (int i = 0; i < PA_MAX_EPL; i++) {
                int e = lane + 32 * i;
                if (i < epl && e < head_dim) acc[i] = fmaf(pj, kv_elem(vr, dtype, e), acc[i]);
            }
        }
        __syncthreads();  // the next chunk overwrites s_p and s_page
    }
    float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
#pragma unroll
    for (int i = 0; i < PA_MAX_EPL; i++) {
        int e = lane + 32 * i;
        if (i < epl && e < head_dim) s_acc[warp * 256 + e] = acc[i];
    }
    __syncthreads();
    for (int e = tid; e < head_dim; e += blockDim.x) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; w++) a += s_acc[w * 256 + e];
        if (part != 0) part[2 + e] = a;
        else o[e] = a * inv;
    }
    if (part != 0 && tid == 0) {
        part[0] = m_run;
        part[1] = l_run;
    }
}

extern "C" __global__ void attention_combine(const float* partial, float* out, int num_tokens,
                                             int num_heads, int head_dim, int splits) {
    int t = blockIdx.x, h = blockIdx.y;
    if (t >= num_tokens) return;
    const float* p = partial + ((u64)t * num_heads + h) * splits * (head_dim + 2);
    float mx = -INFINITY;
    for (int z = 0; z < splits; z++) mx = fmaxf(mx, p[(u64)z * (head_dim + 2)]);
    float l = 0.0f;
    for (int z = 0; z < splits; z++) {
        float m = p[(u64)z * (head_dim + 2)];
        if (m != -INFINITY) l += expf(m - mx) * p[(u64)z * (head_dim + 2) + 1];
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* o = out + ((u64)t * num_heads + h) * head_dim;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float a = 0.0f;
        for (int z = 0; z < splits; z++) {
            const float* pz = p + (u64)z * (head_dim + 2);
            if (pz[0] != -INFINITY) a = fmaf(expf(pz[0] - mx), pz[2 + e], a);
        }
        o[e] = a * inv;
    }
}
