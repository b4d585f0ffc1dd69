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
// Quantized *weights* are repacked by the backend's upload_weight (src/weight_layout.rs):
// for a (m, k) piece with nb = k / 32 blocks a row, first the quants of every block,
// [m][nb][QB] bytes (QB = 32 for Q8_0, 16 for Q4_0 / Q4_1: 16-byte aligned, read with
// 16-byte loads), then the scales, [m][nb][SB] bytes (SB = 2: d; Q4_1: 4, d then m).
// Q8_0 KV rows keep the GGUF block layout.
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

#define MAX_KV_PIECES 64
#define INFINITY __int_as_float(0x7f800000)

struct KvPieces {
    u64 base[MAX_KV_PIECES];
};

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
    default: return (u64)(n / 32) * 20;
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
    return dtype == DT_Q8_0 || dtype == DT_Q4_0 || dtype == DT_Q4_1;
}

// Bytes of one block's quants / scales in the repacked weight layout.
__device__ __forceinline__ int quant_qb(int dtype) { return dtype == DT_Q8_0 ? 32 : 16; }
__device__ __forceinline__ int quant_sb(int dtype) { return dtype == DT_Q4_1 ? 4 : 2; }

// Scale d (and min m, Q4_1) of block i (= row * nb + b) of a repacked weight.
__device__ __forceinline__ void quant_scales(const u8* sc, int dtype, u64 i, float* d, float* m) {
    if (dtype == DT_Q4_1) {
        u32 dm = ((const u32*)sc)[i];
        *d = f16_to_f32((u16)(dm & 0xFFFF));
        *m = f16_to_f32((u16)(dm >> 16));
    } else {
        *d = f16_to_f32(((const u16*)sc)[i]);
        *m = 0.0f;
    }
}

// Element e of row r of a repacked quantized weight of (m, k).
__device__ __forceinline__ float packed_elem(const u8* w, int dtype, u64 m, int k, u64 r, int e) {
    u64 nb = (u64)(k / 32);
    u64 i = r * nb + (u64)(e / 32);
    const u8* qs = w + i * quant_qb(dtype);
    const u8* sc = w + m * nb * quant_qb(dtype);
    float d, mn;
    quant_scales(sc, dtype, i, &d, &mn);
    int j = e % 32;
    if (dtype == DT_Q8_0) return d * (float)(signed char)qs[j];
    int q = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
    return dtype == DT_Q4_0 ? d * (float)(q - 8) : d * (float)q + mn;
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
