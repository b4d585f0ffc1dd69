// common.cuh — the prelude every kernel file is compiled with (prepended by
// the backend, not #included, so NVRTC needs no include path).
//
// Integer types, dtype codes (must match `src/kernels.rs::dtype_code`),
// f16/bf16 conversions that round exactly as the `half` crate does, and the
// decoders of `pagoda_backend::quant`'s blocks (value of element j):
//   Q8_0 (34 B / 32): d f16, qs i8[32]      -> d * qs[j]
//   Q4_0 (18 B / 32): d f16, qs u8[16]      -> d * (nib(j) - 8)
//   Q4_1 (20 B / 32): d f16, m f16, qs[16]  -> d * nib(j) + m
//   nib(j) = qs[j] & 15 for j < 16, qs[j - 16] >> 4 for j >= 16.
//   Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: as pagoda_backend::kquant (decode_half below).
// Quantized *weights* are repacked by the backend's upload_weight
// (pagoda_backend::weight_layout): one region per block field (`QLayout` below), the
// quants first, 16-byte aligned and read with 16-byte loads. Q8_0 KV rows keep the GGUF
// block layout.
// KV arena pieces: `KvPieces` (by value, 64 piece base addresses), pages found
// through the layer's page table (num_pages, 2) u32 = (piece, page in piece).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5
#define DT_Q5_0 6
#define DT_Q5_1 7
#define DT_Q4_K 8
#define DT_Q5_K 9
#define DT_Q6_K 10

#define MAX_KV_PIECES 64
#define INFINITY __int_as_float(0x7f800000)

struct KvPieces {
    u64 base[MAX_KV_PIECES];
};

// Programmatic dependent launch (sm_90+). The backend launches kernels with programmatic
// stream serialization, so a kernel may start while the one before it in the stream still
// runs. pdl_wait() returns once every earlier kernel has finished and its writes are
// visible; before it a kernel may only read memory no kernel writes (weights). Every kernel
// calls pdl_begin() before touching anything else, or pdl_wait() after loading only
// weights (matmul_vec); the cuda_kernels test checks every kernel does. The next kernel
// launches when this one's blocks exit, or (PAGODA_PDL_EARLY, `PAGODA_CUDA_PDL=early`) as
// soon as all of them have started: earlier, but its blocks are then placed while this
// kernel still holds SMs. Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_begin() {
    pdl_wait();
#if __CUDA_ARCH__ >= 900 && defined(PAGODA_PDL_EARLY)
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, as half::f16::from_f32 (the same integer algorithm;
// no inline PTX, whose 16-bit result register lost its low byte when stored
// bytewise on the H200, 2026-12-02).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x & 0x80000000u) >> 16;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (u16)(sign | 0x7C00u | nan_bit | (man >> 13));
    }
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (u16)(sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)sign;
        man |= 0x00800000u;
        u32 half_man = man >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (u16)(sign | half_man);
    }
    u32 bits = sign | ((u32)half_exp << 10) | (man >> 13);
    const u32 round_bit = 0x1000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) bits += 1;
    return (u16)bits;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// half::bf16::from_f32: NaN stays a quiet NaN, otherwise round to nearest even.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    const u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
        return (u16)((x >> 16) + 1u);
    }
    return (u16)(x >> 16);
}

__device__ __forceinline__ u16 load_u16(const u8* p) {
    return (u16)p[0] | ((u16)p[1] << 8);
}

// Bytes of a row of `n` elements (n a multiple of the block size).
__device__ __forceinline__ u64 row_bytes_of(int dtype, int n) {
    switch (dtype) {
    case DT_F32: return (u64)n * 4;
    case DT_F16:
    case DT_BF16: return (u64)n * 2;
    case DT_Q8_0: return (u64)(n / 32) * 34;
    case DT_Q4_0: return (u64)(n / 32) * 18;
    case DT_Q4_1: return (u64)(n / 32) * 20;
    case DT_Q5_0: return (u64)(n / 32) * 22;
    case DT_Q5_1: return (u64)(n / 32) * 24;
    case DT_Q4_K: return (u64)(n / 256) * 144;
    case DT_Q5_K: return (u64)(n / 256) * 176;
    default: return (u64)(n / 256) * 210;
    }
}

// Element e of a row of float weights (F32, F16, BF16).
__device__ __forceinline__ float load_float_elem(const u8* row, int dtype, int e) {
    switch (dtype) {
    case DT_F32: return ((const float*)row)[e];
    case DT_F16: return f16_to_f32(((const u16*)row)[e]);
    default: return bf16_to_f32(((const u16*)row)[e]);
    }
}

// Elements e0 .. e0 + 8 of a row of float weights (e0 a multiple of 8, row
// 16-byte aligned).
__device__ __forceinline__ void load8_float(const u8* row, int dtype, int e0, float w[8]) {
    if (dtype == DT_F32) {
        const float4* p = (const float4*)((const float*)row + e0);
        float4 a = p[0], b = p[1];
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
        return;
    }
    uint4 v = *(const uint4*)((const u16*)row + e0);
    u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u16 lo = (u16)(words[i] & 0xFFFF), hi = (u16)(words[i] >> 16);
        w[2 * i] = dtype == DT_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
        w[2 * i + 1] = dtype == DT_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
    }
}

__device__ __forceinline__ bool is_quant(int dtype) {
    return dtype >= DT_Q8_0 && dtype <= DT_Q6_K;
}

__device__ __forceinline__ bool is_kquant(int dtype) {
    return dtype == DT_Q4_K || dtype == DT_Q5_K || dtype == DT_Q6_K;
}

// Elements of one block (32, or 256 for the K-quants).
__device__ __forceinline__ int quant_block_elems(int dtype) { return is_kquant(dtype) ? 256 : 32; }

// ---- the repacked weight layout (pagoda_backend::weight_layout): per piece of nblk
// blocks, one region per block field, [nblk][len] bytes each, in this order:
//   Q8_0 qs 32 | d 2          Q4_0 qs 16 | d 2        Q4_1 qs 16 | d,m 4
//   Q5_0 qs 16 | qh 4 | d 2   Q5_1 qs 16 | qh 4 | d,m 4
//   Q4_K qs 128 | d,dmin,scales[12] 16      Q5_K qh[32],qs[128] 160 | d,dmin,scales 16
//   Q6_K ql[128],qh[64] 192 | scales i8[16] 16 | d 2
struct QLayout {
    const u8* r0;  // quants (16-byte aligned)
    const u8* r1;  // second field
    const u8* r2;  // third field (Q5_0, Q5_1, Q6_K)
};

__device__ __forceinline__ QLayout qlayout(const u8* w, int dtype, u64 nblk) {
    int l0, l1;
    switch (dtype) {
    case DT_Q8_0: l0 = 32; l1 = 2; break;
    case DT_Q4_0: l0 = 16; l1 = 2; break;
    case DT_Q4_1: l0 = 16; l1 = 4; break;
    case DT_Q5_0:
    case DT_Q5_1: l0 = 16; l1 = 4; break;
    case DT_Q4_K: l0 = 128; l1 = 16; break;
    case DT_Q5_K: l0 = 160; l1 = 16; break;
    default: l0 = 192; l1 = 16; break;  // Q6_K
    }
    QLayout L;
    L.r0 = w;
    L.r1 = w + nblk * l0;
    L.r2 = L.r1 + nblk * l1;
    return L;
}

// The raw bits of half `hh` (16 values) of 32-element unit `j` of block `bi` (j = 0 for
// the 32-element types; 0..8 for the K-quants): loads only, no arithmetic, so callers
// can put several in flight. Which 16 values: the Q4/Q5 legacy types hold elements
// 8hh .. 8hh+7 (low nibbles) and 16+8hh .. 16+8hh+7 (high nibbles) of the unit; every
// other type elements 16hh .. 16hh+15 of the unit.
struct RawHalf {
    uint4 q;  // quants: 16 bytes (Q8_0, K-quants) or 8 (legacy Q4/Q5, in x, y)
    uint4 h;  // high bits: Q5_0/Q5_1 qh in x; Q5_K / Q6_K 16 bytes of qh
    uint4 s;  // scales: d (u16) or d,m (u32) in x; K4 head (d, dmin, scales[12]);
              // Q6_K: x = the i8 scale, y = d
};

__device__ __forceinline__ RawHalf load_half(const QLayout& L, int dtype, u64 bi, int j, int hh,
                                             bool valid) {
    RawHalf r;
    r.q = make_uint4(0, 0, 0, 0);
    r.h = make_uint4(0, 0, 0, 0);
    r.s = make_uint4(0, 0, 0, 0);
    if (!valid) return r;
    switch (dtype) {
    case DT_Q8_0:
        r.q = *(const uint4*)(L.r0 + bi * 32 + hh * 16);
        r.s.x = ((const u16*)L.r1)[bi];
        break;
    case DT_Q4_0:
    case DT_Q4_1:
    case DT_Q5_0:
    case DT_Q5_1: {
        uint2 v = *(const uint2*)(L.r0 + bi * 16 + hh * 8);
        r.q.x = v.x;
        r.q.y = v.y;
        if (dtype == DT_Q4_0) r.s.x = ((const u16*)L.r1)[bi];
        else if (dtype == DT_Q4_1) r.s.x = ((const u32*)L.r1)[bi];
        else {
            r.h.x = ((const u32*)L.r1)[bi];
            r.s.x = dtype == DT_Q5_0 ? (u32)((const u16*)L.r2)[bi] : ((const u32*)L.r2)[bi];
        }
        break;
    }
    case DT_Q4_K:
        r.q = *(const uint4*)(L.r0 + bi * 128 + 32 * (j / 2) + 16 * hh);
        r.s = *(const uint4*)(L.r1 + bi * 16);
        break;
    case DT_Q5_K:
        r.q = *(const uint4*)(L.r0 + bi * 160 + 32 + 32 * (j / 2) + 16 * hh);
        r.h = *(const uint4*)(L.r0 + bi * 160 + 16 * hh);
        r.s = *(const uint4*)(L.r1 + bi * 16);
        break;
    default:  // Q6_K
        r.q = *(const uint4*)(L.r0 + bi * 192 + 64 * (j / 4) + 32 * ((j % 4) & 1) + 16 * hh);
        r.h = *(const uint4*)(L.r0 + bi * 192 + 128 + 32 * (j / 4) + 16 * hh);
        r.s.x = L.r1[bi * 16 + 8 * (j / 4) + 2 * (j % 4) + hh];
        r.s.y = ((const u16*)L.r2)[bi];
        break;
    }
    return r;
}

__device__ __forceinline__ u32 byte_of(const uint4& v, int i) {
    u32 w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
    return (w >> (8 * (i % 4))) & 0xFF;
}

// Scale and min of sub-block j (0..8) of a Q4_K / Q5_K head (bytes 4..16 of s),
// as pagoda_backend::kquant::scale_min_k4.
__device__ __forceinline__ void scale_min_k4(const uint4& s, int j, u32* sc, u32* mn) {
    // scales[i] = byte 4 + i of the head.
    if (j < 4) {
        *sc = byte_of(s, 4 + j) & 63;
        *mn = byte_of(s, 8 + j) & 63;
    } else {
        *sc = (byte_of(s, 8 + j) & 0x0F) | ((byte_of(s, j) >> 6) << 4);
        *mn = (byte_of(s, 8 + j) >> 4) | ((byte_of(s, 4 + j) >> 6) << 4);
    }
}

// A decoded half: value i = a * q[i] + b (q exact small integers as floats), and where
// its values sit in the unit: q[0..8] at elements x0 .. x0+7, q[8..16] at x1 .. x1+7.
struct Half {
    float q[16];
    float a, b;
    int x0, x1;
};

// Decodes a half as the reference dequantizers do: a and b are the f32 products the
// CPU forms (d, d*sc, -(dmin*m)), so a * q + b rounded once each is the CPU's value.
__device__ __forceinline__ Half decode_half(const RawHalf& r, int dtype, int j, int hh) {
    Half o;
    o.b = 0.0f;
    switch (dtype) {
    case DT_Q8_0:
#pragma unroll
        for (int i = 0; i < 16; i++) o.q[i] = (float)(signed char)byte_of(r.q, i);
        o.a = f16_to_f32((u16)(r.s.x & 0xFFFF));
        o.x0 = 16 * hh;
        o.x1 = o.x0 + 8;
        break;
    case DT_Q4_0:
    case DT_Q4_1:
    case DT_Q5_0:
    case DT_Q5_1: {
        bool five = dtype == DT_Q5_0 || dtype == DT_Q5_1;
        int off = dtype == DT_Q4_0 ? 8 : dtype == DT_Q5_0 ? 16 : 0;
        u32 qh = r.h.x;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            int byte = (int)byte_of(r.q, c);
            int lo = byte & 15, hi = byte >> 4;
            if (five) {
                lo |= (int)((qh >> (8 * hh + c)) & 1) << 4;
                hi |= (int)((qh >> (16 + 8 * hh + c)) & 1) << 4;
            }
            o.q[c] = (float)(lo - off);
            o.q[8 + c] = (float)(hi - off);
        }
        o.a = f16_to_f32((u16)(r.s.x & 0xFFFF));
        if (dtype == DT_Q4_1 || dtype == DT_Q5_1) o.b = f16_to_f32((u16)(r.s.x >> 16));
        o.x0 = 8 * hh;
        o.x1 = 16 + 8 * hh;
        break;
    }
    case DT_Q4_K:
    case DT_Q5_K: {
        int shift = 4 * (j % 2);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            int v = (int)((byte_of(r.q, i) >> shift) & 0x0F);
            if (dtype == DT_Q5_K) v += (int)((byte_of(r.h, i) >> j) & 1) << 4;
            o.q[i] = (float)v;
        }
        u32 sc, mn;
        scale_min_k4(r.s, j, &sc, &mn);
        float d = f16_to_f32((u16)(r.s.x & 0xFFFF)), dmin = f16_to_f32((u16)(r.s.x >> 16));
        o.a = __fmul_rn(d, (float)sc);
        o.b = -__fmul_rn(dmin, (float)mn);
        o.x0 = 16 * hh;
        o.x1 = o.x0 + 8;
        break;
    }
    default: {  // Q6_K
        int i4 = j % 4;
        int qs = 4 * (i4 >> 1), hs = 2 * i4;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            int v = (int)(((byte_of(r.q, i) >> qs) & 0x0F) | (((byte_of(r.h, i) >> hs) & 3) << 4));
            o.q[i] = (float)(v - 32);
        }
        float d = f16_to_f32((u16)(r.s.y & 0xFFFF));
        o.a = __fmul_rn(d, (float)(signed char)(r.s.x & 0xFF));
        o.x0 = 16 * hh;
        o.x1 = o.x0 + 8;
        break;
    }
    }
    return o;
}

// Element value i of a decoded half, rounded as the reference dequantizers.
__device__ __forceinline__ float half_value(const Half& h, int i) {
    return __fadd_rn(__fmul_rn(h.a, h.q[i]), h.b);
}

// Writes row r of a repacked quantized weight (m rows of k) as f32 into out[0..k], the
// calling threads (tid of nthreads) taking halves tid, tid + nthreads, ...
__device__ __forceinline__ void dequantize_packed_row(const u8* w, int dtype, u64 m, int k, u64 r,
                                                      float* out, int tid, int nthreads) {
    int qk = quant_block_elems(dtype);
    u64 nbr = (u64)(k / qk);
    QLayout L = qlayout(w, dtype, m * nbr);
    int halves = (k / 32) * 2;
    for (int hb = tid; hb < halves; hb += nthreads) {
        int u = hb / 2, hh = hb % 2;
        int ups = qk / 32;
        int j = u % ups;
        u64 bi = r * nbr + (u64)(u / ups);
        Half h = decode_half(load_half(L, dtype, bi, j, hh, true), dtype, j, hh);
        float* o = out + u * 32;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            o[h.x0 + i] = half_value(h, i);
            o[h.x1 + i] = half_value(h, 8 + i);
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// Byte address of row (page, kv, token in page, head) of one layer arena, or
// 0 when the page is outside the table.
__device__ __forceinline__ u8* kv_row(const KvPieces& pieces, const u32* page_table,
                                     u32 page, int kv, int tok, int head, int num_pages,
                                     int page_size, int num_kv_heads, u64 row_bytes) {
    if (page >= (u32)num_pages) return 0;
    u32 piece = page_table[2 * page];
    u32 in_piece = page_table[2 * page + 1];
    if (piece >= MAX_KV_PIECES) return 0;
    u64 page_bytes = (u64)2 * page_size * num_kv_heads * row_bytes;
    u64 off = (u64)in_piece * page_bytes +
              (((u64)kv * page_size + tok) * num_kv_heads + head) * row_bytes;
    return (u8*)(pieces.base[piece] + off);
}

// cos / sin of pair i at position pos, llama.cpp NORM mode: theta = pos * base^(-2i / rope_dim),
// computed in f64 then cast (as backends/cpu/src/rope.rs).
__device__ __forceinline__ void rope_cs(double pos, int i, int rope_dim, float freq_base,
                                        float* c, float* s) {
    double inv = pow((double)freq_base, -2.0 * (double)i / (double)rope_dim);
    double theta = pos * inv;
    *c = (float)cos(theta);
    *s = (float)sin(theta);
}

// Rotates pair i (elements 2i, 2i+1) of one head by (c, s).
__device__ __forceinline__ void rope_rotate(float* head, int i, float c, float s) {
    float a = head[2 * i], b = head[2 * i + 1];
    head[2 * i] = a * c - b * s;
    head[2 * i + 1] = a * s + b * c;
}

// RoPE of every head of one token by the whole block: thread (g, i) with
// i = tid % pairs computes pair i's angle once and rotates pair i of heads
// g, g + G, ... (G = blockDim / pairs; when pairs > blockDim, threads stride
// over pairs and rotate every head). heads(h) is the address of head h.
template <typename Heads>
__device__ __forceinline__ void rope_heads(Heads heads, int num_heads, double pos, int rope_dim,
                                           float freq_base) {
    int pairs = rope_dim / 2;
    if (pairs <= 0) return;
    int nt = (int)blockDim.x;
    int groups = pairs <= nt ? nt / pairs : 1;
    int g = pairs <= nt ? (int)threadIdx.x / pairs : 0;
    if (g >= groups) return;
    int step = pairs <= nt ? pairs : nt;
    for (int i = pairs <= nt ? (int)threadIdx.x % pairs : (int)threadIdx.x; i < pairs; i += step) {
        float c, s;
        rope_cs(pos, i, rope_dim, freq_base, &c, &s);
        for (int h = g; h < num_heads; h += groups) rope_rotate(heads(h), i, c, s);
    }
}

// Stores element e of a K/V row in `dtype` (F32, F16, BF16, Q8_0). For Q8_0
// the 32 lanes of a warp call it together for one 32-element block (lanes
// with e >= head_dim pass as padding): d = amax / 127 as f16, q = clamp(round(x / d)),
// exactly quant::quantize_row_q8_0; blocks are 34 bytes at even offsets, so the
// scale is one aligned u16 store.
__device__ __forceinline__ void store_kv_elem(u8* row, int dtype, int e, float x, int head_dim) {
    if (dtype == DT_Q8_0) {
        float v = e < head_dim ? x : 0.0f;
        float amax = warp_max(fabsf(v));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (e < head_dim) {
            u8* b = row + (e / 32) * 34;
            int q = (int)roundf(v * id);
            q = max(-127, min(127, q));
            b[2 + e % 32] = (u8)(signed char)q;
            if (e % 32 == 0) *(u16*)b = f32_to_f16(d);
        }
        return;
    }
    if (e >= head_dim) return;
    if (dtype == DT_F32) ((float*)row)[e] = x;
    else if (dtype == DT_F16) ((u16*)row)[e] = f32_to_f16(x);
    else ((u16*)row)[e] = f32_to_bf16(x);
}
