//! The op-family trait implementations of [`CpuBackend`]: argument checking
//! and threading around the plain loops of the per-op files.

use pagoda_backend::{
    AttentionDims, AttentionOps, BackendError, BufRef, DType, EmbeddingDims, KvCacheOps,
    KvLayerRef, MAX_KV_PIECES, MatmulDims, Projection, Result, RopeDims, RopeKvDims, SamplingOps,
    TensorOps,
};

use crate::kv_cache::{KvPages, KvPagesMut};
use crate::matmul::OutPtr;
use crate::paged_attention::{AttentionArgs, QUERY_TILE, attend};
use crate::par::{SharedMut, for_ranges};
use crate::{
    CpuBackend, disjoint, elementwise, embedding, kv_cache, matmul, rms_norm, rope, sampling,
};

/// Rows (or tokens) per parallel chunk of the row-wise ops; fewer run inline.
const ROW_CHUNK: usize = 16;
/// Elements per parallel chunk of the elementwise ops; fewer run inline.
const ELEMENT_CHUNK: usize = 16 * 1024;

fn invalid(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

impl TensorOps for CpuBackend {
    fn embedding(
        &self,
        table: BufRef,
        table_dtype: DType,
        ids: BufRef,
        out: BufRef,
        d: EmbeddingDims,
    ) -> Result<()> {
        disjoint("embedding", out, &[table, ids])?;
        let _g = self.lock();
        let table = self.view::<u8>(table, table.bytes as usize, "embedding")?;
        let ids = self.view::<u32>(ids, d.n, "embedding")?;
        let out = self.view_mut::<f32>(out, d.n * d.dim, "embedding")?;
        embedding::embedding(table, table_dtype, ids, out, d)
    }

    fn matmul(
        &self,
        x: BufRef,
        w: BufRef,
        w_dtype: DType,
        out: BufRef,
        d: MatmulDims,
    ) -> Result<()> {
        let row_bytes = w_dtype
            .row_bytes(d.k)
            .filter(|_| d.k.is_multiple_of(32) && w_dtype != DType::U32)
            .ok_or_else(|| {
                invalid(
                    "matmul",
                    format!("k = {} must be a multiple of 32 for {w_dtype}", d.k),
                )
            })?;
        if d.out_stride < d.m {
            return Err(invalid(
                "matmul",
                format!("out_stride {} below m = {}", d.out_stride, d.m),
            ));
        }
        disjoint("matmul", out, &[x, w])?;
        let _g = self.lock();
        let xs = self.view::<f32>(x, d.n * d.k, "matmul")?;
        let ws = self.view::<u8>(w, d.m * row_bytes, "matmul")?;
        let os = self.view_mut::<f32>(out, d.out_len(), "matmul")?;
        let o = OutPtr::strided(SharedMut::new(os), d.out_stride, d.accumulate);
        // Split over weight rows: each thread owns whole output columns.
        for_ranges(self.pool.as_ref(), d.m, 8, |rows| {
            matmul::matmul_rows(xs, ws, w_dtype, o, d.n, d.k, d.m, rows)
        });
        Ok(())
    }

    fn rms_norm(
        &self,
        x: BufRef,
        weight: BufRef,
        out: BufRef,
        n: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        disjoint("rms_norm", out, &[x, weight])?;
        let _g = self.lock();
        let xs = self.view::<f32>(x, n * dim, "rms_norm")?;
        let ws = self.view::<f32>(weight, dim, "rms_norm")?;
        let os = self.view_mut::<f32>(out, n * dim, "rms_norm")?;
        let o = SharedMut::new(os);
        // Rows are independent: split them (prefill) or run inline (decode).
        for_ranges(self.pool.as_ref(), n, ROW_CHUNK, |rows| {
            for r in rows {
                // SAFETY: row r belongs to this range only.
                let or = unsafe { o.slice_mut(r * dim, dim) };
                rms_norm::rms_norm_row(&xs[r * dim..][..dim], ws, or, eps);
            }
        });
        Ok(())
    }

    fn rms_norm_matmul(
        &self,
        x: BufRef,
        weight: BufRef,
        normed: BufRef,
        n: usize,
        k: usize,
        eps: f32,
        projections: &[Projection],
    ) -> Result<()> {
        self.rms_norm_matmul_impl(x, weight, normed, n, k, eps, projections)
    }

    fn rope(&self, x: BufRef, positions: BufRef, d: RopeDims) -> Result<()> {
        if d.rope_dim > d.head_dim
            || !d.rope_dim.is_multiple_of(2)
            || d.rope_dim / 2 > rope::MAX_PAIRS
        {
            return Err(invalid(
                "rope",
                format!("rope_dim {} with head_dim {}", d.rope_dim, d.head_dim),
            ));
        }
        disjoint("rope", x, &[positions])?;
        let _g = self.lock();
        let pos = self.view::<u32>(positions, d.num_tokens, "rope")?;
        let width = d.num_heads * d.head_dim;
        let xs = self.view_mut::<f32>(x, d.num_tokens * width, "rope")?;
        let freqs = rope::Freqs::new(d.rope_dim, d.freq_base);
        let o = SharedMut::new(xs);
        for_ranges(self.pool.as_ref(), d.num_tokens, ROW_CHUNK, |tokens| {
            for t in tokens {
                // SAFETY: token t's row belongs to this range only.
                let row = unsafe { o.slice_mut(t * width, width) };
                rope::rope_token_with(row, pos[t], d.num_heads, d.head_dim, &freqs);
            }
        });
        Ok(())
    }

    fn silu_mul(&self, gate: BufRef, up: BufRef, out: BufRef, len: usize) -> Result<()> {
        disjoint("silu_mul", out, &[gate, up])?;
        let _g = self.lock();
        let g = self.view::<f32>(gate, len, "silu_mul")?;
        let u = self.view::<f32>(up, len, "silu_mul")?;
        let os = self.view_mut::<f32>(out, len, "silu_mul")?;
        let o = SharedMut::new(os);
        for_ranges(self.pool.as_ref(), len, ELEMENT_CHUNK, |r| {
            // SAFETY: the elements of r belong to this range only.
            let out = unsafe { o.slice_mut(r.start, r.len()) };
            elementwise::silu_mul(&g[r.clone()], &u[r], out);
        });
        Ok(())
    }

    fn add_assign(&self, x: BufRef, y: BufRef, len: usize) -> Result<()> {
        disjoint("add_assign", x, &[y])?;
        let _g = self.lock();
        let ys = self.view::<f32>(y, len, "add_assign")?;
        let xs = self.view_mut::<f32>(x, len, "add_assign")?;
        let o = SharedMut::new(xs);
        for_ranges(self.pool.as_ref(), len, ELEMENT_CHUNK, |r| {
            // SAFETY: the elements of r belong to this range only.
            let x = unsafe { o.slice_mut(r.start, r.len()) };
            elementwise::add_assign(x, &ys[r]);
        });
        Ok(())
    }

    fn gather_rows(
        &self,
        x: BufRef,
        indices: BufRef,
        out: BufRef,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        disjoint("gather_rows", out, &[x, indices])?;
        let _g = self.lock();
        let n = if dim == 0 {
            0
        } else {
            x.bytes as usize / (4 * dim)
        };
        let xs = self.view::<f32>(x, n * dim, "gather_rows")?;
        let idx = self.view::<u32>(indices, m, "gather_rows")?;
        let os = self.view_mut::<f32>(out, m * dim, "gather_rows")?;
        for (i, &r) in idx.iter().enumerate() {
            let r = r as usize;
            if r >= n {
                return Err(invalid("gather_rows", format!("row {r} outside {n} rows")));
            }
            os[i * dim..(i + 1) * dim].copy_from_slice(&xs[r * dim..(r + 1) * dim]);
        }
        Ok(())
    }
}

impl CpuBackend {
    fn kv_pieces_ok(&self, cache: &KvLayerRef<'_>, op: &'static str) -> Result<()> {
        if cache.pieces.is_empty() || cache.pieces.len() > MAX_KV_PIECES {
            return Err(invalid(
                op,
                format!("{} KV pieces (1 ..= {MAX_KV_PIECES})", cache.pieces.len()),
            ));
        }
        Ok(())
    }

    /// Read-only views of a layer arena's pieces and page table.
    fn kv_pages<'a>(&'a self, cache: &KvLayerRef<'_>, op: &'static str) -> Result<KvPages<'a>> {
        self.kv_pieces_ok(cache, op)?;
        let mut pieces: [&[u8]; MAX_KV_PIECES] = [&[]; MAX_KV_PIECES];
        for (i, p) in cache.pieces.iter().enumerate() {
            pieces[i] = self.view::<u8>(*p, p.bytes as usize, op)?;
        }
        Ok(KvPages {
            pieces,
            num_pieces: cache.pieces.len(),
            table: self.view::<u32>(cache.page_table, 2 * cache.layout.num_pages, op)?,
            layout: cache.layout,
        })
    }

    /// Mutable views of a layer arena's pieces (each its own segment) and its page table.
    fn kv_pages_mut<'a>(
        &'a self,
        cache: &KvLayerRef<'_>,
        op: &'static str,
    ) -> Result<KvPagesMut<'a>> {
        self.kv_pieces_ok(cache, op)?;
        for (i, a) in cache.pieces.iter().enumerate() {
            if cache.pieces[..i]
                .iter()
                .any(|b| crate::overlaps_ref(*a, *b))
            {
                return Err(invalid(op, "two KV pieces overlap".into()));
            }
        }
        let mut pieces: [&mut [u8]; MAX_KV_PIECES] =
            std::array::from_fn(|_| <&mut [u8]>::default());
        for (i, p) in cache.pieces.iter().enumerate() {
            pieces[i] = self.view_mut::<u8>(*p, p.bytes as usize, op)?;
        }
        Ok(KvPagesMut {
            pieces,
            num_pieces: cache.pieces.len(),
            table: self.view::<u32>(cache.page_table, 2 * cache.layout.num_pages, op)?,
            layout: cache.layout,
        })
    }
}

impl KvCacheOps for CpuBackend {
    fn write_kv(
        &self,
        cache: KvLayerRef<'_>,
        k: BufRef,
        v: BufRef,
        slot_mapping: BufRef,
        num_tokens: usize,
    ) -> Result<()> {
        let l = cache.layout;
        for &p in cache.pieces {
            disjoint("write_kv", p, &[k, v, slot_mapping, cache.page_table])?;
        }
        let _g = self.lock();
        let width = num_tokens * l.num_kv_heads * l.head_dim;
        let ks = self.view::<f32>(k, width, "write_kv")?;
        let vs = self.view::<f32>(v, width, "write_kv")?;
        let slots = self.view::<u32>(slot_mapping, num_tokens, "write_kv")?;
        let mut c = self.kv_pages_mut(&cache, "write_kv")?;
        let pieces = cache.pieces;
        kv_cache::write_kv(&mut c, ks, vs, slots, |piece, off, len| {
            let p = pieces[piece];
            self.mem
                .check_committed(p.segment, p.addr + off as u64, len as u64)
        })
    }

    fn rope_write_kv(
        &self,
        q: BufRef,
        k: BufRef,
        v: BufRef,
        positions: BufRef,
        slot_mapping: BufRef,
        cache: KvLayerRef<'_>,
        dims: RopeKvDims,
    ) -> Result<()> {
        self.rope_write_kv_impl(q, k, v, positions, slot_mapping, cache, dims)
    }

    fn copy_pages(&self, cache: KvLayerRef<'_>, pairs: &[(u32, u32)]) -> Result<()> {
        let _g = self.lock();
        let mut c = self.kv_pages_mut(&cache, "copy_pages")?;
        kv_cache::copy_pages(&mut c, pairs)
    }
}

impl SamplingOps for CpuBackend {
    fn argmax_rows(&self, logits: BufRef, ids: BufRef, rows: usize, vocab: usize) -> Result<()> {
        disjoint("argmax_rows", ids, &[logits])?;
        let _g = self.lock();
        let l = self.view::<f32>(logits, rows * vocab, "argmax_rows")?;
        let out = self.view_mut::<u32>(ids, rows, "argmax_rows")?;
        if vocab == 0 && rows > 0 {
            return Err(invalid("argmax_rows", "empty rows".into()));
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = sampling::argmax(&l[r * vocab..(r + 1) * vocab]);
        }
        Ok(())
    }

    fn top_k_rows(
        &self,
        logits: BufRef,
        values: BufRef,
        ids: BufRef,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<()> {
        if k > vocab || k > self.info.max_top_k {
            return Err(invalid(
                "top_k_rows",
                format!(
                    "k = {k} above vocab {vocab} or the limit {}",
                    self.info.max_top_k
                ),
            ));
        }
        disjoint("top_k_rows", values, &[logits, ids])?;
        disjoint("top_k_rows", ids, &[logits])?;
        let _g = self.lock();
        let l = self.view::<f32>(logits, rows * vocab, "top_k_rows")?;
        let vs = self.view_mut::<f32>(values, rows * k, "top_k_rows")?;
        let is = self.view_mut::<u32>(ids, rows * k, "top_k_rows")?;
        for r in 0..rows {
            sampling::top_k(
                &l[r * vocab..(r + 1) * vocab],
                k,
                &mut vs[r * k..(r + 1) * k],
                &mut is[r * k..(r + 1) * k],
            );
        }
        Ok(())
    }
}

impl AttentionOps for CpuBackend {
    fn paged_attention(
        &self,
        q: BufRef,
        cache: KvLayerRef<'_>,
        positions: BufRef,
        block_tables: BufRef,
        context_lens: BufRef,
        query_start_locs: BufRef,
        out: BufRef,
        d: AttentionDims,
    ) -> Result<()> {
        let l = cache.layout;
        disjoint(
            "paged_attention",
            out,
            &[
                q,
                cache.page_table,
                positions,
                block_tables,
                context_lens,
                query_start_locs,
            ],
        )?;
        for &p in cache.pieces {
            disjoint("paged_attention", out, &[p])?;
        }
        let _g = self.lock();
        let width = d.num_heads * l.head_dim;
        let args = AttentionArgs {
            q: self.view::<f32>(q, d.num_tokens * width, "paged_attention")?,
            cache: self.kv_pages(&cache, "paged_attention")?,
            layout: &l,
            positions: self.view::<u32>(positions, d.num_tokens, "paged_attention")?,
            block_tables: self.view::<u32>(
                block_tables,
                d.num_seqs * d.max_blocks_per_seq,
                "paged_attention",
            )?,
            context_lens: self.view::<u32>(context_lens, d.num_seqs, "paged_attention")?,
            query_start_locs: self.view::<u32>(
                query_start_locs,
                d.num_seqs + 1,
                "paged_attention",
            )?,
            num_heads: d.num_heads,
            max_blocks_per_seq: d.max_blocks_per_seq,
            scale: d.scale,
        };
        args.validate()?;
        if args.query_start_locs[d.num_seqs] as usize != d.num_tokens {
            return Err(invalid(
                "paged_attention",
                "query_start_locs does not end at num_tokens".into(),
            ));
        }
        let os = self.view_mut::<f32>(out, d.num_tokens * width, "paged_attention")?;
        let o = SharedMut::new(os);
        let kvh = l.num_kv_heads;
        let group = d.num_heads / kvh;
        let span = group * l.head_dim;
        let qsl = args.query_start_locs;
        // One task per (KV head, tile of QUERY_TILE consecutive tokens), head
        // major so that a thread's run of tasks reuses one head's K/V rows.
        // A tile spanning sequences is handled one sequence at a time.
        let tiles = d.num_tokens.div_ceil(QUERY_TILE);
        for_ranges(self.pool.as_ref(), kvh * tiles, 1, |range| {
            for task in range {
                let (h, tile) = (task / tiles, task % tiles);
                let (a, b) = (
                    tile * QUERY_TILE,
                    ((tile + 1) * QUERY_TILE).min(d.num_tokens),
                );
                // The sequence of token a (query_start_locs is validated, ends at num_tokens).
                let mut s = qsl.partition_point(|&x| x as usize <= a) - 1;
                let mut t0 = a;
                while t0 < b {
                    while qsl[s + 1] as usize <= t0 {
                        s += 1;
                    }
                    let t1 = b.min(qsl[s + 1] as usize);
                    attend(&args, s, t0..t1, h, |t, rows| {
                        // SAFETY: task (h, tile) owns output rows (t, h*group .. (h+1)*group) for t in its tile, disjoint across tasks.
                        let out = unsafe {
                            o.slice_mut((t * d.num_heads + h * group) * l.head_dim, span)
                        };
                        out.copy_from_slice(rows);
                    });
                    t0 = t1;
                }
            }
        });
        Ok(())
    }
}
