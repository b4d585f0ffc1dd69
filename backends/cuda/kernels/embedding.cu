// embedding.cu — token embedding lookup over one row piece of the table
// (reference: backends/cpu/src/embedding.rs).
//
// embedding(table, dtype, ids, out, n, dim, first_row, num_rows)
//   table: (num_rows, dim) in dtype (F32, F16, BF16, or a quantized type repacked as
//   common.cuh says), rows first_row ..
//   ids:   (n) u32;  out: (n, dim) f32, row i written only when the piece holds ids[i].
// Launch: grid (n), block 256; each thread decodes elements e, e + 256, ... (float) or
// halves of 32-element units h, h + 256, ... (quantized: common.cuh's decode_half).

extern "C" __global__ void embedding(const u8* table, int dtype, const u32* ids, float* out,
                                     int n, int dim, u32 first_row, u32 num_rows) {
    pdl_begin();
    int i = blockIdx.x;
    if (i >= n) return;
    u32 id = ids[i];
    if (id < first_row || id - first_row >= num_rows) return;
    u64 r = id - first_row;
    float* o = out + (u64)i * dim;
    if (is_quant(dtype)) {
        dequantize_packed_row(table, dtype, num_rows, dim, r, o, threadIdx.x, blockDim.x);
        return;
    }
    const u8* row = table + r * row_bytes_of(dtype, dim);
    for (int e = threadIdx.x; e < dim; e += blockDim.x) o[e] = load_float_elem(row, dtype, e);
}
