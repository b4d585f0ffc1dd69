//! [`TensorOps`] on the device: `shaders/{embedding,matmul,rms_norm,rope,elementwise}.wgsl`.
//! The fused ops are their parts in order (`rms_norm_matmul` writes `normed`, then one
//! matmul per projection), so they are bit-identical to the unfused sequence.

use pagoda_backend::{
    BackendError, BufRef, DType, EmbeddingDims, MatmulDims, Projection, Result, RopeDims, TensorOps,
};

use crate::kernels::Shader;
use crate::{MatmulPath, WgpuBackend, dtype_code};

/// `r` holds at least `bytes` bytes.
pub(crate) fn need(op: &'static str, what: &str, r: BufRef, bytes: u64) -> Result<()> {
    if r.bytes < bytes {
        return Err(BackendError::InvalidArgument {
            op,
            detail: format!("{what} has {} bytes, needs {bytes}", r.bytes),
        });
    }
    Ok(())
}

/// `v` as a u32 kernel parameter.
pub(crate) fn u32_of(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| BackendError::InvalidArgument {
        op,
        detail: format!("dimension {v} above u32"),
    })
}

/// The RoPE frequency table as kernel parameters: per pair, base^(−2i/rope_dim) in f64
/// split into three f32, the first two of 8 significant bits (`rope.wgsl`).
pub(crate) fn rope_params(dims: &RopeDims) -> Result<Vec<u32>> {
    if dims.rope_dim > dims.head_dim || !dims.rope_dim.is_multiple_of(2) {
        return Err(BackendError::InvalidArgument {
            op: "rope",
            detail: format!("rope_dim {} of head_dim {}", dims.rope_dim, dims.head_dim),
        });
    }
    let pairs = dims.rope_dim / 2;
    let mut p = vec![
        u32_of("rope", dims.num_tokens)?,
        u32_of("rope", dims.num_heads)?,
        u32_of("rope", dims.head_dim)?,
        pairs as u32,
    ];
    for i in 0..pairs {
        let f = (dims.freq_base as f64).powf(-2.0 * i as f64 / dims.rope_dim as f64);
        // Keep 8 significant bits (1 + 7 of the mantissa): pos · c is exact below 2^16.
        let chunk = |x: f64| f32::from_bits((x as f32).to_bits() & 0xFFFF_0000);
        let c0 = chunk(f);
        let c1 = chunk(f - c0 as f64);
        let c2 = (f - c0 as f64 - c1 as f64) as f32;
        p.extend([c0.to_bits(), c1.to_bits(), c2.to_bits()]);
    }
    Ok(p)
}

impl WgpuBackend {
    /// Blocks of a quantized weight piece of `m` rows of `k` (0 for float weights).
    fn blocks(dtype: DType, m: usize, k: usize) -> usize {
        if dtype.is_quantized() {
            m * (k / dtype.block_size())
        } else {
            0
        }
    }

    pub(crate) fn rope_dispatch(&self, x: BufRef, positions: BufRef, dims: RopeDims) -> Result<()> {
        let n = dims.num_tokens * dims.num_heads * (dims.rope_dim / 2);
        if n == 0 {
            return Ok(());
        }
        need(
            "rope",
            "x",
            x,
            (dims.num_tokens * dims.num_heads * dims.head_dim * 4) as u64,
        )?;
        need("rope", "positions", positions, (dims.num_tokens * 4) as u64)?;
        let params = rope_params(&dims)?;
        self.shared.dispatch(
            "rope",
            Shader::Rope,
            "rope",
            &[(1, x), (2, positions)],
            &params,
            u32_of("rope", n.div_ceil(256))?,
        )
    }
}

impl TensorOps for WgpuBackend {
    fn embedding(
        &self,
        table: BufRef,
        table_dtype: DType,
        ids: BufRef,
        out: BufRef,
        d: EmbeddingDims,
    ) -> Result<()> {
        let op = "embedding";
        if d.n == 0 || d.dim == 0 {
            return Ok(());
        }
        let dt = dtype_code(op, table_dtype)?;
        let row = table_dtype
            .row_bytes(d.dim)
            .ok_or_else(|| BackendError::InvalidArgument {
                op,
                detail: format!("dim {} is not whole {table_dtype} blocks", d.dim),
            })?;
        need(op, "table", table, (row * d.num_rows) as u64)?;
        need(op, "ids", ids, (d.n * 4) as u64)?;
        need(op, "out", out, (d.n * d.dim * 4) as u64)?;
        // Ids outside this piece (and so any id at or above the vocabulary) are skipped in
        // the shader: no read outside the table, no host round trip.
        let params = [
            u32_of(op, d.n)?,
            u32_of(op, d.dim)?,
            dt,
            u32_of(op, d.first_row)?,
            u32_of(op, d.num_rows)?,
            u32_of(op, Self::blocks(table_dtype, d.num_rows, d.dim))?,
        ];
        self.shared.dispatch(
            op,
            Shader::Embedding,
            "embedding",
            &[(1, table), (2, ids), (3, out)],
            &params,
            u32_of(op, (d.n * d.dim).div_ceil(256))?,
        )
    }

    fn matmul(
        &self,
        x: BufRef,
        w: BufRef,
        w_dtype: DType,
        out: BufRef,
        d: MatmulDims,
    ) -> Result<()> {
        let op = "matmul";
        if d.n == 0 || d.m == 0 {
            return Ok(());
        }
        let dt = dtype_code(op, w_dtype)?;
        if d.out_stride < d.m {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("out_stride {} below m {}", d.out_stride, d.m),
            });
        }
        let row = w_dtype
            .row_bytes(d.k)
            .ok_or_else(|| BackendError::InvalidArgument {
                op,
                detail: format!("k {} is not whole {w_dtype} blocks", d.k),
            })?;
        need(op, "x", x, (d.n * d.k * 4) as u64)?;
        need(op, "w", w, (row * d.m) as u64)?;
        need(op, "out", out, (d.out_len() * 4) as u64)?;
        let params = [
            u32_of(op, d.n)?,
            u32_of(op, d.k)?,
            u32_of(op, d.m)?,
            u32_of(op, d.out_stride)?,
            d.accumulate as u32,
            dt,
            u32_of(op, Self::blocks(w_dtype, d.m, d.k))?,
        ];
        // Prefill-sized batches take 32 tokens a workgroup (same per-output order).
        let tok = if d.n >= 32 { 32 } else { 8 };
        let (shader, entry, row_groups) = match self.matmul_path() {
            // The weight dtype code (params[5]) is also the pipeline's DT.
            MatmulPath::Rows => (Shader::Matmul(tok, dt), "matmul", d.m.div_ceil(64)),
            MatmulPath::Coalesced if w_dtype == DType::F16 && self.shared.gpu.shader_f16 => {
                (Shader::MatmulF16(tok), "matmul_f16", d.m)
            }
            MatmulPath::Coalesced => (Shader::MatmulCo(tok, dt), "matmul_co", d.m),
        };
        self.shared.dispatch(
            op,
            shader,
            entry,
            &[(1, x), (2, w), (3, out)],
            &params,
            u32_of(op, row_groups * d.n.div_ceil(tok as usize))?,
        )
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
        let op = "rms_norm";
        if n == 0 || dim == 0 {
            return Ok(());
        }
        need(op, "x", x, (n * dim * 4) as u64)?;
        need(op, "weight", weight, (dim * 4) as u64)?;
        need(op, "out", out, (n * dim * 4) as u64)?;
        self.shared.dispatch(
            op,
            Shader::RmsNorm,
            "rms_norm",
            &[(1, x), (2, weight), (3, out)],
            &[u32_of(op, n)?, u32_of(op, dim)?, eps.to_bits()],
            u32_of(op, n)?,
        )
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
        if n == 0 {
            return Ok(());
        }
        self.rms_norm(x, weight, normed, n, k, eps)?;
        for p in projections {
            let dims = MatmulDims {
                out_stride: p.out_stride,
                ..MatmulDims::new(n, k, p.m)
            };
            self.matmul(normed, p.w, p.dtype, p.out, dims)?;
        }
        Ok(())
    }

    fn rope(&self, x: BufRef, positions: BufRef, dims: RopeDims) -> Result<()> {
        self.rope_dispatch(x, positions, dims)
    }

    fn silu_mul(&self, gate: BufRef, up: BufRef, out: BufRef, len: usize) -> Result<()> {
        let op = "silu_mul";
        if len == 0 {
            return Ok(());
        }
        for (what, r) in [("gate", gate), ("up", up), ("out", out)] {
            need(op, what, r, (len * 4) as u64)?;
        }
        self.shared.dispatch(
            op,
            Shader::Elementwise,
            "silu_mul",
            &[(1, gate), (2, up), (3, out)],
            &[u32_of(op, len)?],
            u32_of(op, len.div_ceil(256))?,
        )
    }

    fn add_assign(&self, x: BufRef, y: BufRef, len: usize) -> Result<()> {
        let op = "add_assign";
        if len == 0 {
            return Ok(());
        }
        need(op, "x", x, (len * 4) as u64)?;
        need(op, "y", y, (len * 4) as u64)?;
        self.shared.dispatch(
            op,
            Shader::Elementwise,
            "add_assign",
            &[(1, x), (2, y)],
            &[u32_of(op, len)?],
            u32_of(op, len.div_ceil(256))?,
        )
    }

    fn gather_rows(
        &self,
        x: BufRef,
        indices: BufRef,
        out: BufRef,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        let op = "gather_rows";
        if m == 0 || dim == 0 {
            return Ok(());
        }
        need(op, "indices", indices, (m * 4) as u64)?;
        need(op, "out", out, (m * dim * 4) as u64)?;
        // Rows outside x are skipped in the shader (never an out-of-bounds read).
        let rows = x.bytes as usize / (dim * 4);
        self.shared.dispatch(
            op,
            Shader::Elementwise,
            "gather_rows",
            &[(1, x), (2, indices), (3, out)],
            &[u32_of(op, m)?, u32_of(op, dim)?, u32_of(op, rows)?],
            u32_of(op, (m * dim).div_ceil(256))?,
        )
    }
}
