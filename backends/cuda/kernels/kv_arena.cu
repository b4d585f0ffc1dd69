// kv_arena.cu — checks of committed arena memory for the VMM stress tests
// (reference: backends/cpu/src/kv_arena.rs, whose `check_committed` reads and
// writes every committed byte).
//
// fill_words(dst, words, seed)            dst: (words) u32; dst[i] = hash(seed, i)
// check_words(src, words, seed, bad)      src: (words) u32; atomically counts the words
//                                          that differ from hash(seed, i) into *bad (u32)
// Launch: grid (min(ceil(words / 256), 4096)), block 256; grid-stride loops.

__device__ __forceinline__ u32 word_hash(u32 seed, u64 i) {
    u32 x = seed ^ (u32)i ^ (u32)(i >> 32) * 0x9E3779B9u;
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}

extern "C" __global__ void fill_words(u32* dst, u64 words, u32 seed) {
    pdl_begin();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += (u64)gridDim.x * blockDim.x)
        dst[i] = word_hash(seed, i);
}

extern "C" __global__ void check_words(const u32* src, u64 words, u32 seed, u32* bad) {
    pdl_begin();
    u32 n = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += (u64)gridDim.x * blockDim.x)
        n += src[i] != word_hash(seed, i);
    if (n) atomicAdd(bad, n);
}
