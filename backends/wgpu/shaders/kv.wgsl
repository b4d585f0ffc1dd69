// kv.wgsl — reading and writing paged KV rows, prepended to kv_cache.wgsl and
// paged_attention.wgsl after the generated piece bindings (src/kernels.rs `kv_prelude`):
// `@binding(8 + p) KV{p}: array<u32>` for the layer arena's pieces p < NUM_PIECES, and
// kv_ld(piece, word) / kv_st(piece, word, value) switching over them.
//
// Layout (pagoda_backend::kv_cache): page `pg` lives in piece PT[2 pg] as page PT[2 pg + 1]
// of it; inside a piece, row (page, K|V, token, head) starts at byte
// ((page · 2 + kv) · page_size + token) · kv_heads · row_bytes + head · row_bytes.
// Row codecs: f32 words; f16 / bf16 two per word (low half first); Q8_0 blocks of 34 bytes
// (f16 d, 32 i8), read byte by byte (a Q8_0 row of an odd number of blocks need not start
// on a word); f16 / bf16 rows start on a word (head_dim even; the host checks).
//
// Bindings: 7 PT: array<u32> (num_pages, 2), the page table.

@group(0) @binding(7) var<storage, read_write> PT: array<u32>;

struct Kv {
    page_size: u32,
    kv_heads: u32,
    head_dim: u32,
    row_bytes: u32,
    page_bytes: u32,
    dt: u32,
}

// (piece, byte offset in the piece) of row (page, which = 0 K / 1 V, token, head).
fn kv_loc(kv: Kv, page: u32, which: u32, tok: u32, head: u32) -> vec2<u32> {
    let pt = off(6u);
    let piece = PT[pt + 2u * page];
    let in_piece = PT[pt + 2u * page + 1u];
    let byte = in_piece * kv.page_bytes
        + ((which * kv.page_size + tok) * kv.kv_heads + head) * kv.row_bytes;
    return vec2<u32>(piece, byte);
}

fn kv_byte(piece: u32, byte: u32) -> u32 {
    return (kv_ld(piece, byte / 4u) >> (8u * (byte % 4u))) & 0xFFu;
}

// Element e of the row at `loc`, as f32.
fn kv_read(kv: Kv, loc: vec2<u32>, e: u32) -> f32 {
    let p = loc.x;
    let w0 = loc.y / 4u;
    switch kv.dt {
        case 0u: { return bitcast<f32>(kv_ld(p, w0 + e)); }
        case 1u: { return half_at(kv_ld(p, w0 + e / 2u), (e & 1u) == 1u); }
        case 2u: { return bf16_to_f32(kv_ld(p, w0 + e / 2u) >> (16u * (e & 1u))); }
        default: {
            let b0 = loc.y + (e / 32u) * 34u;
            let d = half_lo(kv_byte(p, b0) | (kv_byte(p, b0 + 1u) << 8u));
            let q = f32(i32(kv_byte(p, b0 + 2u + e % 32u) << 24u) >> 24u);
            return q * d;
        }
    }
}
