// paged_attention.cu — causal, ragged, GQA attention reading K/V only through
// block tables and the layer's page table (reference:
// backends/cpu/src/paged_attention.rs). Prefill and decode are one kernel.
//
// paged_attention(q, pieces, page_table, positions, block_tables, context_lens,
//                 query_start_locs, out, num_tokens, num_seqs, num_heads, num_kv_heads,
//                 head_dim, page_size, num_pages, dtype, max_blocks_per_seq, scale,
//                 partial, counters, splits)
// paged_attention_prefill(...): the same outputs for prefill tiles (its header is further down)
//   q:   (num_tokens, num_heads, head_dim) f32;  out: (num_tokens, num_heads, head_dim) f32
//   positions: (num_tokens) u32, token t attends to positions 0 ..= positions[t]
//   block_tables: (num_seqs, max_blocks_per_seq) u32; context_lens: (num_seqs) u32
//   query_start_locs: (num_seqs + 1) u32; KV dtype F32, F16, BF16 or Q8_0; head_dim <= 256
//   partial: (num_tokens, num_heads, splits, head_dim + 2) f32 when splits > 1;
//   counters: (num_tokens, num_heads) u32, zero before and after every launch.
// Keys are taken in chunks of PA_CHUNK = 128 positions (chunk c: keys c*128 .. c*128+127).
// Each chunk gives (m_c = max score, l_c = sum e^(s - m_c), a_c = sum e^(s - m_c) v), and the
// chunks are merged in order by merge_chunk (running max, rescaled sums); out = a / l.
// Split launches (splits = the chunks a sequence can have, for short batches: flash-decoding)
// run one chunk a block and write it to partial; the token-head's last block to finish
// (split_arrive: an atomic counter) merges them in the same order with the same merge_chunk
// — so a token's output has the same bits split or not, whatever else is in the batch, and
// no second launch is needed.
// Launch: grid (num_tokens, num_heads, splits), block 256 = 8 warps; shared: q (256 floats),
//   128 scores, the chunk's page base addresses (129 u64), reduction scratch, 8 x 256 floats
//   for the warps' V sums (about 11 KB). splits = 1: the block walks every chunk.
//   Per chunk the block first translates the chunk's pages (block table -> layer page table
//   -> piece base) once into shared memory, so no key waits on a chain of dependent loads;
//   thread j < 128 scores key j (a dot product over the row, 16-byte loads where the dtype
//   allows); warp w accumulates V over the keys j = w (mod 8), lane l owning elements l,
//   l + 32, ... (loads coalesced); the warps' sums are added in shared memory, and thread e
//   merges element e. A token outside every sequence gets zeros.

#define PA_THREADS 256
#define PA_CHUNK 128
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

// s_page[i] = base address of page table[i] (0 when outside the page table), i < npages,
// by the whole block (no barrier).
__device__ __forceinline__ void translate_pages(const KvPieces& pieces, const u32* page_table,
                                                const u32* table, int npages, int num_pages,
                                                u64 page_bytes, u64* s_page) {
    for (int i = threadIdx.x; i < npages; i += blockDim.x) {
        u32 page = table[i];
        u64 base = 0;
        if (page < (u32)num_pages) {
            u32 piece = page_table[2 * page];
            if (piece < MAX_KV_PIECES)
                base = pieces.base[piece] + (u64)page_table[2 * page + 1] * page_bytes;
        }
        s_page[i] = base;
    }
}

// Merges chunk (m_c, l_c, a_c) into the running (m, l, a); an empty chunk (m_c = -inf)
// changes nothing. The one merge of both paths (in-block and split_arrive).
__device__ __forceinline__ void merge_chunk(float& m, float& l, float& a, float m_c, float l_c,
                                            float a_c) {
    if (m_c == -INFINITY) return;
    float mx = fmaxf(m, m_c);
    float ca = m == -INFINITY ? 0.0f : expf(m - mx);
    float cb = expf(m_c - mx);
    l = fmaf(l, ca, l_c * cb);
    a = fmaf(a, ca, a_c * cb);
    m = mx;
}

// A split block's end: its chunk's partial (m, l, a[head_dim]) is written; count the block
// in (one counter per token-head) and, in the block that arrives last, merge the splits'
// chunks in order z = 0 .. splits-1 with merge_chunk (the bits of the unsplit walk) into
// out, and reset the counter for the next launch. Every thread of the block calls it.
__device__ __forceinline__ void split_arrive(const float* p, u32* counter, int splits,
                                             int head_dim, float* o) {
    __shared__ int s_last;
    __threadfence();  // this block's partial is visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 prev = atomicAdd(counter, 1u);
        s_last = prev == (u32)(splits - 1);
        if (s_last) *counter = 0u;  // every split has arrived
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float m = -INFINITY, l = 0.0f, a = 0.0f;
        for (int z = 0; z < splits; z++) {
            const float* pz = p + (u64)z * (head_dim + 2);
            merge_chunk(m, l, a, __ldcg(pz), __ldcg(pz + 1), __ldcg(pz + 2 + e));
        }
        o[e] = a * (l > 0.0f ? 1.0f / l : 0.0f);
    }
}

extern "C" __global__ void __launch_bounds__(PA_THREADS)
paged_attention(const float* q, KvPieces pieces, const u32* page_table, const u32* positions,
                const u32* block_tables, const u32* context_lens, const u32* query_start_locs,
                float* out, int num_tokens, int num_seqs, int num_heads, int num_kv_heads,
                int head_dim, int page_size, int num_pages, int dtype, int max_blocks_per_seq,
                float scale, float* partial, u32* counters, int splits) {
    pdl_begin();
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
    int nkeys = 0;
    int s = -1;
    // The sequence holding token t: the last s with query_start_locs[s] <= t.
    if (num_seqs > 0 && t >= (int)query_start_locs[0] && t < (int)query_start_locs[num_seqs]) {
        int lo = 0, hi = num_seqs;  // invariant: qsl[lo] <= t < qsl[hi]
        while (hi - lo > 1) {
            int mid = (lo + hi) / 2;
            if ((int)query_start_locs[mid] <= t) lo = mid; else hi = mid;
        }
        s = lo;
        int ctx = (int)context_lens[s];
        // Never past the context nor the block table's width.
        nkeys = min(min((int)positions[t], ctx - 1), max_blocks_per_seq * page_size - 1) + 1;
    }
    // Chunks of this block: all (splits = 1) or chunk z only.
    int c_first = splits > 1 ? z * PA_CHUNK : 0;
    int c_end = splits > 1 ? min(nkeys, c_first + PA_CHUNK) : nkeys;
    if (s < 0 || c_first >= c_end) {
        // No key: an empty chunk (split) or zeros (a token outside every sequence).
        if (part != 0) {
            for (int e = tid; e < head_dim + 2; e += blockDim.x) part[e] = e == 0 ? -INFINITY : 0.0f;
            split_arrive(partial + ((u64)t * num_heads + h) * splits * (head_dim + 2),
                         counters + (u64)t * num_heads + h, splits, head_dim, o);
        } else {
            for (int e = tid; e < head_dim; e += blockDim.x) o[e] = 0.0f;
        }
        return;
    }
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
    // Thread e < head_dim keeps the running (m, l, a[e]) of the merged chunks.
    float m_run = -INFINITY, l_run = 0.0f, a_run = 0.0f;
    for (int c0 = c_first; c0 < c_end; c0 += PA_CHUNK) {
        int n = min(PA_CHUNK, c_end - c0);
        int first = c0 / page_size;
        int npages = (c0 + n - 1) / page_size - first + 1;
        translate_pages(pieces, page_table, table + first, npages, num_pages, page_bytes, s_page);
        __syncthreads();  // s_page (and s_q on the first chunk)
        float d = -INFINITY;
        if (tid < n) {
            int p = c0 + tid;
            u64 base = s_page[p / page_size - first];
            if (base != 0) {
                const u8* kr = (const u8*)(base + k_off + (u64)(p % page_size) * tok_stride);
                d = dot_row(kr, dtype, s_q, head_dim) * scale;
            }
        }
        float m_c = block_max(d, s_red);
        float pj = (tid < n && d != -INFINITY) ? expf(d - m_c) : 0.0f;
        if (tid < PA_CHUNK) s_p[tid] = pj;
        float l_c = block_sum(pj, s_red);  // its barriers publish s_p
        float acc[PA_MAX_EPL];
#pragma unroll
        for (int i = 0; i < PA_MAX_EPL; i++) acc[i] = 0.0f;
#pragma unroll 4
        for (int j = warp; j < n; j += PA_WARPS) {
            int p = c0 + j;
            u64 base = s_page[p / page_size - first];
            float w = s_p[j];
            if (base == 0 || w == 0.0f) continue;
            const u8* vr = (const u8*)(base + v_off + (u64)(p % page_size) * tok_stride);
#pragma unroll
            for (int i = 0; i < PA_MAX_EPL; i++) {
                int e = lane + 32 * i;
                if (i < epl && e < head_dim) acc[i] = fmaf(w, kv_elem(vr, dtype, e), acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < PA_MAX_EPL; i++) {
            int e = lane + 32 * i;
            if (i < epl && e < head_dim) s_acc[warp * 256 + e] = acc[i];
        }
        __syncthreads();  // s_acc complete
        if (tid < head_dim) {
            float a_c = 0.0f;
#pragma unroll
            for (int w = 0; w < PA_WARPS; w++) a_c += s_acc[w * 256 + tid];
            if (part != 0) {
                part[2 + tid] = a_c;
                if (tid == 0) {
                    part[0] = m_c;
                    part[1] = l_c;
                }
            } else {
                merge_chunk(m_run, l_run, a_run, m_c, l_c, a_c);
            }
        }
        __syncthreads();  // the next chunk overwrites s_p, s_page and s_acc
    }
    if (part == 0 && tid < head_dim) o[tid] = a_run * (l_run > 0.0f ? 1.0f / l_run : 0.0f);
    if (part != 0)
        split_arrive(partial + ((u64)t * num_heads + h) * splits * (head_dim + 2),
                     counters + (u64)t * num_heads + h, splits, head_dim, o);
}

// ---------------------------------------------------------------- prefill tiles
// paged_attention_prefill(q, pieces, page_table, positions, block_tables, context_lens,
//                         query_start_locs, out, num_tokens, num_seqs, num_heads,
//                         num_kv_heads, head_dim, page_size, num_pages, dtype,
//                         max_blocks_per_seq, scale)
//   The arguments of paged_attention (no splits); head_dim <= 128 and K/V rows of at most
//   512 bytes. Every output has the bits paged_attention gives it: the same chunks of 128
//   keys, the same dot_row scores, the same reduction orders (a warp sum over keys
//   32i .. 32i+31, then i = 0 .. 3), the same V chains (keys j = w mod 8 in order, then
//   w = 0 .. 7) and merge_chunk — only the work is shared: the K/V rows of a chunk are
//   staged once in shared memory for a tile of up to 8 query tokens.
// Launch: grid (ceil(num_tokens / 8), num_heads), block 256; shared: 8 q rows, 8 x 128
//   scores, one staged stretch of 32 K or V rows (16 KB), the chunk's page bases (about
//   25 KB). The tile's tokens are taken in runs of one sequence; per chunk: pass 1 scores
//   (two (query, key) pairs a thread), pass 2 a warp a query (max, exp, sum), pass 3 thread
//   o owns outputs (query, element) o, o + 256, ... (at most 4) with 8 chains each.

#define PP_Q 8
#define PP_SUB 32
#define PP_MAX_HD 128
#define PP_MAX_ROW 512
#define PP_OUT ((PP_Q * PP_MAX_HD) / PA_THREADS)  // outputs a thread (4)

// Stages the K (off = k_off) or V (off = v_off) rows of keys p0 .. p0 + ns into s_kv as u16
// words (zeros for a key whose page is outside the table), by the whole block (no barrier).
__device__ __forceinline__ void stage_rows(const u64* s_page, int first, int page_size, u64 off,
                                           u64 tok_stride, int p0, int ns, int row16, u8* s_kv) {
    for (int i = threadIdx.x; i < ns * row16; i += blockDim.x) {
        int jj = i / row16, w = i % row16;
        int p = p0 + jj;
        u64 base = s_page[p / page_size - first];
        u16 v = 0;
        if (base != 0) v = ((const u16*)(base + off + (u64)(p % page_size) * tok_stride))[w];
        ((u16*)s_kv)[jj * row16 + w] = v;
    }
}

extern "C" __global__ void __launch_bounds__(PA_THREADS)
paged_attention_prefill(const float* q, KvPieces pieces, const u32* page_table,
                        const u32* positions, const u32* block_tables, const u32* context_lens,
                        const u32* query_start_locs, float* out, int num_tokens, int num_seqs,
                        int num_heads, int num_kv_heads, int head_dim, int page_size,
                        int num_pages, int dtype, int max_blocks_per_seq, float scale) {
    pdl_begin();
    __shared__ float s_q[PP_Q][PP_MAX_HD];
    __shared__ float s_s[PP_Q][PA_CHUNK];
    __shared__ __align__(16) u8 s_kv[PP_SUB * PP_MAX_ROW];
    __shared__ u64 s_page[PA_CHUNK + 1];
    __shared__ int s_nk[PP_Q];
    __shared__ float s_mc[PP_Q], s_lc[PP_Q];
    int h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int t0 = blockIdx.x * PP_Q;
    int t_end = min(num_tokens, t0 + PP_Q);
    int kvh = h / (num_heads / num_kv_heads);
    u64 row = row_bytes_of(dtype, head_dim);
    u64 page_bytes = (u64)2 * page_size * num_kv_heads * row;
    u64 k_off = (u64)kvh * row, v_off = ((u64)page_size * num_kv_heads + kvh) * row;
    u64 tok_stride = (u64)num_kv_heads * row;
    int row16 = (int)(row / 2);  // u16 words of a row
    int ta = t0;
    while (ta < t_end) {
        // The run: tokens ta .. tb of one sequence s (s = -1: outside every sequence).
        int s = -1;
        if (num_seqs > 0 && ta >= (int)query_start_locs[0] && ta < (int)query_start_locs[num_seqs]) {
            int lo = 0, hi = num_seqs;
            while (hi - lo > 1) {
                int mid = (lo + hi) / 2;
                if ((int)query_start_locs[mid] <= ta) lo = mid; else hi = mid;
            }
            s = lo;
        }
        int tb = s < 0 ? ta + 1 : min(t_end, (int)query_start_locs[s + 1]);
        int nq = tb - ta;
        if (s < 0) {
            float* o = out + ((u64)ta * num_heads + h) * head_dim;
            for (int e = tid; e < head_dim; e += PA_THREADS) o[e] = 0.0f;
            ta = tb;
            continue;
        }
        int ctx = (int)context_lens[s];
        const u32* table = block_tables + (u64)s * max_blocks_per_seq;
        __syncthreads();  // the previous run is done with the shared arrays
        if (tid < nq) {
            int t = ta + tid;
            s_nk[tid] = min(min((int)positions[t], ctx - 1), max_blocks_per_seq * page_size - 1) + 1;
        }
        for (int i = tid; i < nq * head_dim; i += PA_THREADS) {
            int qi = i / head_dim, e = i % head_dim;
            s_q[qi][e] = q[((u64)(ta + qi) * num_heads + h) * head_dim + e];
        }
        __syncthreads();
        int max_n = 0;
        for (int qi = 0; qi < nq; qi++) max_n = max(max_n, s_nk[qi]);
        // Running state of the outputs this thread owns.
        float m_run[PP_OUT], l_run[PP_OUT], a_run[PP_OUT];
#pragma unroll
        for (int r = 0; r < PP_OUT; r++) {
            m_run[r] = -INFINITY;
            l_run[r] = 0.0f;
            a_run[r] = 0.0f;
        }
        for (int c0 = 0; c0 < max_n; c0 += PA_CHUNK) {
            int n_c = min(PA_CHUNK, max_n - c0);
            int first = c0 / page_size;
            int npages = (c0 + n_c - 1) / page_size - first + 1;
            translate_pages(pieces, page_table, table + first, npages, num_pages, page_bytes, s_page);
            for (int i = tid; i < PP_Q * PA_CHUNK; i += PA_THREADS) s_s[i / PA_CHUNK][i % PA_CHUNK] = -INFINITY;
            __syncthreads();
            // Pass 1: scores, a stretch of 32 K rows at a time.
            for (int sub = 0; sub < n_c; sub += PP_SUB) {
                int ns = min(PP_SUB, n_c - sub);
                stage_rows(s_page, first, page_size, k_off, tok_stride, c0 + sub, ns, row16, s_kv);
                __syncthreads();
                for (int i = tid; i < nq * PP_SUB; i += PA_THREADS) {
                    int qi = i / PP_SUB, jj = i % PP_SUB;
                    int j = sub + jj;  // key j of the chunk
                    int p = c0 + j;
                    if (jj < ns && j < s_nk[qi] - c0 && s_page[p / page_size - first] != 0)
                        s_s[qi][j] = dot_row(s_kv + (u64)jj * row, dtype, s_q[qi], head_dim) * scale;
                }
                __syncthreads();
            }
            // Pass 2: a warp a query: chunk max, weights, sum (paged_attention's orders).
            for (int qi = warp; qi < nq; qi += PA_WARPS) {
                float d[4], mx = -INFINITY;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    d[i] = s_s[qi][32 * i + lane];
                    mx = fmaxf(mx, d[i]);
                }
                mx = warp_max(mx);
                float l = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float pj = d[i] != -INFINITY ? expf(d[i] - mx) : 0.0f;
                    s_s[qi][32 * i + lane] = pj;
                    l += warp_sum(pj);
                }
                if (lane == 0) {
                    s_mc[qi] = mx;
                    s_lc[qi] = l;
                }
            }
            // Pass 3: V chains, a stretch of 32 V rows at a time.
            float chain[PP_OUT][PA_WARPS];
#pragma unroll
            for (int r = 0; r < PP_OUT; r++)
#pragma unroll
                for (int w = 0; w < PA_WARPS; w++) chain[r][w] = 0.0f;
            for (int sub = 0; sub < n_c; sub += PP_SUB) {
                int ns = min(PP_SUB, n_c - sub);
                __syncthreads();  // pass 2 / the previous stretch are done
                stage_rows(s_page, first, page_size, v_off, tok_stride, c0 + sub, ns, row16, s_kv);
                __syncthreads();
#pragma unroll
                for (int r = 0; r < PP_OUT; r++) {
                    int o = tid + PA_THREADS * r;
                    if (o >= nq * head_dim) continue;
                    int qi = o / head_dim, e = o % head_dim;
                    // Key j = sub + jj0 + w goes to chain w (sub and jj0 are multiples of 8),
                    // in increasing j.
                    for (int jj0 = 0; jj0 < ns; jj0 += PA_WARPS) {
#pragma unroll
                        for (int w = 0; w < PA_WARPS; w++) {
                            int jj = jj0 + w;
                            int j = sub + jj;
                            int p = c0 + j;
                            if (jj >= ns) continue;
                            float pw = s_s[qi][j];
                            if (s_page[p / page_size - first] == 0 || pw == 0.0f) continue;
                            chain[r][w] = fmaf(pw, kv_elem(s_kv + (u64)jj * row, dtype, e), chain[r][w]);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < PP_OUT; r++) {
                int o = tid + PA_THREADS * r;
                if (o >= nq * head_dim) continue;
                int qi = o / head_dim;
                if (c0 >= s_nk[qi]) continue;  // paged_attention never visits this chunk
                float a_c = 0.0f;
#pragma unroll
                for (int w = 0; w < PA_WARPS; w++) a_c += chain[r][w];
                merge_chunk(m_run[r], l_run[r], a_run[r], s_mc[qi], s_lc[qi], a_c);
            }
            __syncthreads();  // the next chunk overwrites s_page and s_s
        }
#pragma unroll
        for (int r = 0; r < PP_OUT; r++) {
            int o = tid + PA_THREADS * r;
            if (o >= nq * head_dim) continue;
            int qi = o / head_dim, e = o % head_dim;
            out[((u64)(ta + qi) * num_heads + h) * head_dim + e] =
                a_run[r] * (l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f);
        }
        ta = tb;
    }
}
