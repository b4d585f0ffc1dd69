// rope.cu — rotary position embedding, llama.cpp NORM mode (reference:
// backends/cpu/src/rope.rs); the math is common.cuh's rope_heads.
//
// rope(x, positions, num_tokens, num_heads, head_dim, rope_dim, freq_base)
//   x: (num_tokens, num_heads, head_dim) f32, in place; positions: (num_tokens) u32
//   pair (2i, 2i+1), i < rope_dim / 2, rotates by theta = pos * base^(-2i / rope_dim),
//   computed in f64 then cast (as the CPU).
// Launch: grid (num_tokens), block 128; threads stride over (head, pair).

extern "C" __global__ void rope(float* x, const u32* positions, int num_tokens, int num_heads,
                                int head_dim, int rope_dim, float freq_base) {
    pdl_begin();
    int t = blockIdx.x;
    if (t >= num_tokens) return;
    float* xt = x + (u64)t * num_heads * head_dim;
    rope_heads([=](int h) { return xt + (u64)h * head_dim; }, num_heads, (double)positions[t],
               rope_dim, freq_base);
}
