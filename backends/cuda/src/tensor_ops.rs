//! [`TensorOps`] on the device: `kernels/{embedding,matmul,rms_norm,rope,elementwise}.cu`.
//! The fused `rms_norm_matmul` is one `matmul.cu` launch per four projections with the
//! norm computed inside (`normed` is not written). Quantized weights are in the device
//! layout of `weight_layout.rs`.

use pagoda_backend::{
    BackendError, BufRef, DType, EmbeddingDims, MatmulDims, Projection, Result, RopeDims, TensorOps,
};

use crate::args::Args;
use crate::{CudaBackend, dtype_code, weight_bytes};

fn i32_of(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| BackendError::InvalidArgument {
        op,
        detail: format!("dimension {v} above i32"),
    })
}

/// One projection of a `matmul` launch (`kernels/matmul.cu`'s `MmProj`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmProj {
    w: u64,
    out: u64,
    dtype: i32,
    m: i32,
    out_stride: i32,
    first_block: i32,
}

/// Up to four projections sharing one input (`MmProjs`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmProjs {
    p: [MmProj; 4],
    count: i32,
}

/// A projection to launch: weight, dtype, rows, output, output stride.
#[derive(Clone, Copy)]
struct ProjArg {
    w: BufRef,
    dtype: DType,
    m: usize,
    out: BufRef,
    out_stride: usize,
}

impl ProjArg {
    /// No projection (m = 0).
    const NONE: ProjArg = ProjArg {
        w: BufRef::EMPTY,
        dtype: DType::F32,
        m: 0,
        out: BufRef::EMPTY,
        out_stride: 0,
    };
}

/// Blocks below which a tiled launch takes 8-row tiles (two waves of the H200's 132 SMs).
const MIN_TILED_BLOCKS: usize = 264;

/// Blocks below which a tensor-core launch takes narrower token tiles (one wave).
const MIN_MMA_BLOCKS: usize = 132;

/// Rows of a `matmul_mma_t*` tile (`MMA_TM`).
const MMA_ROWS: usize = 64;

/// Tokens up to which a quantized matmul takes `matmul_mma2_*` by default (decode-sized
/// steps; prefill chunks above it take `matmul_mma_t*`: measured both ways on the H200,
/// notes/gpu-runs.md run 14).
const MMA2_MAX_TOKENS: usize = 128;

/// Which kernels quantized matmuls of `n` > 8 tokens take: 1 = `matmul_mma_t*`,
/// 2 = `matmul_mma2_*` (the same bits), 0 = the f32 SIMT tiles. `PAGODA_CUDA_MMA=0|1|2`
/// forces one (for comparison); by default 2 up to [`MMA2_MAX_TOKENS`], 1 above.
fn mma_kind(n: usize) -> u8 {
    static KIND: std::sync::OnceLock<Option<u8>> = std::sync::OnceLock::new();
    let forced = *KIND.get_or_init(|| match std::env::var("PAGODA_CUDA_MMA").as_deref() {
        Ok("0") => Some(0),
        Ok("1") => Some(1),
        Ok("2") => Some(2),
        _ => None,
    });
    forced.unwrap_or(if n <= MMA2_MAX_TOKENS { 2 } else { 1 })
}

/// Which GEMV quantized matmuls of at most 8 tokens take (`PAGODA_CUDA_MV`): the persistent
/// per-type `matmul_vec_<type>_n<NT>_r<R>` with R picked per launch (default), with R
/// forced (`r1`, `r2`; R = 2 exists for one token), or `matmul_vec`, one kernel for every
/// type (`0`, for comparison). All give the same bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum VecKind {
    Auto,
    R1,
    R2,
    Single,
}

fn vec_kind() -> VecKind {
    static KIND: std::sync::OnceLock<VecKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| match std::env::var("PAGODA_CUDA_MV").as_deref() {
        Ok("0") => VecKind::Single,
        Ok("r1") => VecKind::R1,
        Ok("r2") => VecKind::R2,
        _ => VecKind::Auto,
    })
}

/// The persistent GEMV for `dtype` (quantized), `n` <= 8 tokens and `r` rows a warp (2 only
/// for one token; otherwise 1): `matmul_vec_<type>_n<1|8>_r<R>` of `kernels::FILES`, looked
/// up in a table built once (no formatting per launch).
fn vec_symbol(dtype: DType, n: usize, r: usize) -> Option<&'static str> {
    type Entry = (DType, usize, usize, &'static str);
    static TABLE: std::sync::OnceLock<Vec<Entry>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let symbols = || {
            crate::kernels::FILES
                .iter()
                .flat_map(|f| f.symbols.iter().copied())
        };
        let mut t = Vec::new();
        for d in DType::WEIGHT_TYPES.into_iter().filter(|d| d.is_quantized()) {
            for (nt, r) in [(1, 1), (1, 2), (8, 1)] {
                let name = format!("matmul_vec_{}_n{nt}_r{r}", d.name());
                if let Some(sym) = symbols().find(|s| *s == name) {
                    t.push((d, nt, r, sym));
                }
            }
        }
        t
    });
    let (nt, r) = if n <= 1 { (1, r.clamp(1, 2)) } else { (8, 1) };
    table
        .iter()
        .find(|e| e.0 == dtype && e.1 == nt && e.2 == r)
        .map(|e| e.3)
}

/// Tokens up to which quantized matmuls take a GEMV (`matmul_vec*`), above them the tiles:
/// 8, or `PAGODA_CUDA_VEC_MAX` (1 ..= 8, for comparison).
fn vec_max_tokens() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("PAGODA_CUDA_VEC_MAX")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(8, |v| v.clamp(1, 8))
    })
}

/// Whether a matmul of `n` tokens over quantized weights takes the persistent GEMV.
fn persistent_vec(quantized: bool, n: usize) -> bool {
    quantized && n <= vec_max_tokens() && vec_kind() != VecKind::Single
}

/// The `matmul_mma2_*` tile (symbol, rows, tokens) for `n` tokens over row counts `ms`: the
/// largest that gives a wave of blocks, else the one giving the most blocks.
fn mma2_tile(n: usize, ms: impl Iterator<Item = usize> + Clone) -> (&'static str, usize, usize) {
    const TILES: [(&str, usize, usize); 5] = [
        ("matmul_mma2_64x64", 64, 64),
        ("matmul_mma2_64x32", 64, 32),
        ("matmul_mma2_64x16", 64, 16),
        ("matmul_mma2_16x64", 16, 64),
        ("matmul_mma2_16x32", 16, 32),
    ];
    let widest = match n {
        0..=16 => 16,
        17..=32 => 32,
        _ => 64,
    };
    let mut best = TILES[2];
    let mut best_blocks = 0;
    for t in TILES {
        // 64-row tiles no wider than the tokens; 16-row tiles at any width.
        if t.1 == 64 && t.2 > widest {
            continue;
        }
        let blocks = ms.clone().map(|m| m.div_ceil(t.1)).sum::<usize>() * n.div_ceil(t.2);
        if blocks >= MIN_MMA_BLOCKS {
            return t;
        }
        if blocks > best_blocks {
            (best, best_blocks) = (t, blocks);
        }
    }
    best
}

/// Which `kernels/matmul.cu` kernel a launch takes: (symbol, rows a block, tokens a block,
/// block threads), for `n` tokens and the projections' row counts `ms`.
fn matmul_kernel(
    quantized: bool,
    n: usize,
    ms: impl Iterator<Item = usize> + Clone,
) -> (&'static str, usize, usize, u32) {
    if !quantized {
        return ("matmul", 4, 8, 128);
    }
    if n <= vec_max_tokens() {
        return ("matmul_vec", 8, n.max(1), 256);
    }
    if mma_kind(n) == 2 {
        let (symbol, rows, tokens) = mma2_tile(n, ms);
        return (symbol, rows, tokens, 128);
    }
    if mma_kind(n) == 1 {
        // The widest token tile that still gives a wave of blocks (every width gives the
        // same bits: each output is its own chain).
        let row_blocks: usize = ms.map(|m| m.div_ceil(MMA_ROWS)).sum();
        let mut tn = match n {
            9..=16 => 16,
            17..=32 => 32,
            _ => 64,
        };
        while tn > 16 && row_blocks * n.div_ceil(tn) < MIN_MMA_BLOCKS {
            tn /= 2;
        }
        let symbol = match tn {
            16 => "matmul_mma_t16",
            32 => "matmul_mma_t32",
            _ => "matmul_mma_t64",
        };
        return (symbol, MMA_ROWS, tn, 128);
    }
    let tn = match n {
        9..=16 => 16,
        17..=32 => 32,
        _ => 64,
    };
    let blocks: usize = ms.map(|m| m.div_ceil(32)).sum::<usize>() * n.div_ceil(tn);
    // 8-row tiles for decode-sized steps only: above 64 tokens the x tile re-read per
    // 8 rows costs more than the idle SMs (measured on the H200, notes/benchmarks.md).
    let small = blocks < MIN_TILED_BLOCKS && n <= 64;
    let symbol = match (small, tn) {
        (false, 16) => "matmul_t16",
        (false, 32) => "matmul_t32",
        (false, _) => "matmul_t64",
        (true, 16) => "matmul_r8_t16",
        (true, 32) => "matmul_r8_t32",
        (true, _) => "matmul_r8_t64",
    };
    (symbol, if small { 8 } else { 32 }, tn, 128)
}

impl CudaBackend {
    /// Enqueues the `matmul` launches of up to four projections of `x` (n, k),
    /// RMS-normed on the fly with `norm` (weight, eps) when given: one launch
    /// for the quantized projections, one for the float ones.
    fn launch_matmul(
        &self,
        x: BufRef,
        norm: Option<(BufRef, f32)>,
        projs: &[ProjArg],
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        for quantized in [true, false] {
            let mut group = [None; 4];
            let mut len = 0;
            for p in projs {
                if p.dtype.is_quantized() == quantized && len < 4 {
                    group[len] = Some(*p);
                    len += 1;
                }
            }
            if len == 0 {
                continue;
            }
            let list: [ProjArg; 4] = group.map(|p| p.unwrap_or(ProjArg::NONE));
            if !persistent_vec(quantized, n) {
                self.launch_matmul_group(x, norm, &list[..len], n, k, accumulate, quantized)?;
                continue;
            }
            // The persistent GEMV is one kernel per weight type: a launch per type present
            // (in order of first appearance).
            let list = &list[..len];
            for (i, p) in list.iter().enumerate() {
                if list[..i].iter().any(|q| q.dtype == p.dtype) {
                    continue;
                }
                let mut same = [ProjArg::NONE; 4];
                let mut count = 0;
                for q in list.iter().filter(|q| q.dtype == p.dtype) {
                    same[count] = *q;
                    count += 1;
                }
                self.launch_matmul_group(x, norm, &same[..count], n, k, accumulate, quantized)?;
            }
        }
        Ok(())
    }

    /// One launch of projections all quantized or all float.
    #[allow(clippy::too_many_arguments)]
    fn launch_matmul_group(
        &self,
        x: BufRef,
        norm: Option<(BufRef, f32)>,
        projs: &[ProjArg],
        n: usize,
        k: usize,
        accumulate: bool,
        quantized: bool,
    ) -> Result<()> {
        const OP: &str = "matmul";
        if n == 0 || projs.iter().all(|p| p.m == 0) {
            return Ok(());
        }
        if !k.is_multiple_of(8) || projs.len() > 4 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!(
                    "k {k} not a multiple of 8, or {} projections (at most 4)",
                    projs.len()
                ),
            });
        }
        let smem = vec_staging_bytes(n, k);
        let (symbol, rows_per_block, tokens_per_block, threads) = if persistent_vec(quantized, n) {
            let dtype = projs[0].dtype;
            let missing = || BackendError::Unsupported {
                op: OP,
                dtype: dtype.to_string(),
            };
            // Two rows a warp once the 16-row virtual blocks give every SM one (7B, H200:
            // 209 t/s with R = 2 only where they fill every resident block, 235 with
            // R = 2 everywhere; notes/gpu-runs.md run 14).
            let r = match vec_kind() {
                VecKind::R2 if n <= 1 => 2,
                VecKind::Auto if n <= 1 => {
                    let vbs: usize = projs.iter().map(|p| p.m.div_ceil(16)).sum();
                    if vbs >= self.sm_count() as usize {
                        2
                    } else {
                        1
                    }
                }
                _ => 1,
            };
            (
                vec_symbol(dtype, n, r).ok_or_else(missing)?,
                8 * r,
                n.max(1),
                256,
            )
        } else {
            matmul_kernel(quantized, n, projs.iter().map(|p| p.m))
        };
        let vec = symbol.starts_with("matmul_vec");
        let xp = self.ptr(x, (n * k) as u64 * 4, 16, OP)?;
        let (np, eps) = match norm {
            Some((w, eps)) => (self.ptr(w, k as u64 * 4, 16, OP)?, eps),
            None => (0, 0.0),
        };
        let mut all = MmProjs::default();
        let mut blocks = 0usize;
        for p in projs.iter().filter(|p| p.m > 0) {
            if p.out_stride < p.m {
                return Err(BackendError::InvalidArgument {
                    op: OP,
                    detail: format!("out_stride {} < m {}", p.out_stride, p.m),
                });
            }
            let dims = MatmulDims {
                n,
                k,
                m: p.m,
                out_stride: p.out_stride,
                accumulate,
            };
            all.p[all.count as usize] = MmProj {
                w: self.ptr(p.w, weight_bytes(OP, p.dtype, p.m, k)?, 16, OP)?,
                out: self.ptr(p.out, dims.out_len() as u64 * 4, 4, OP)?,
                dtype: dtype_code(OP, p.dtype)?,
                m: i32_of(OP, p.m)?,
                out_stride: i32_of(OP, p.out_stride)?,
                first_block: i32_of(OP, blocks)?,
            };
            all.count += 1;
            blocks += p.m.div_ceil(rows_per_block);
        }
        // A persistent launch: no more blocks than the device holds at once.
        let grid_x = if vec && symbol != "matmul_vec" {
            blocks.min(self.device_blocks(symbol, threads, smem)? as usize)
        } else {
            blocks
        };
        Args::new()
            .arg(xp)
            .arg(np)
            .arg(eps)
            .arg(all)
            .arg(i32_of(OP, n)?)
            .arg(i32_of(OP, k)?)
            .arg(accumulate as i32)
            .launch(
                OP,
                self.func(symbol)?,
                (grid_x as u32, n.div_ceil(tokens_per_block) as u32, 1),
                threads,
                if vec { smem } else { 0 },
                self.stream(),
            )
    }
}

/// Dynamic shared memory of a `matmul_vec*` launch: room to stage x (n, k) f32 once when it
/// fits the 48 KiB a launch gets without opting in (else 0: x is read from global memory).
fn vec_staging_bytes(n: usize, k: usize) -> u32 {
    const LIMIT: usize = 48 * 1024 - 64;
    let bytes = n * k * 4;
    if bytes <= LIMIT { bytes as u32 } else { 0 }
}

impl TensorOps for CudaBackend {
    fn embedding(
        &self,
        table: BufRef,
        table_dtype: DType,
        ids: BufRef,
        out: BufRef,
        d: EmbeddingDims,
    ) -> Result<()> {
        const OP: &str = "embedding";
        if d.n == 0 {
            return Ok(());
        }
        let code = dtype_code(OP, table_dtype)?;
        let tp = self.ptr(
            table,
            weight_bytes(OP, table_dtype, d.num_rows, d.dim)?,
            4,
            OP,
        )?;
        let ip = self.ptr32(ids, d.n, OP)?;
        let op = self.ptr32(out, d.n * d.dim, OP)?;
        Args::new()
            .arg(tp)
            .arg(code)
            .arg(ip)
            .arg(op)
            .arg(i32_of(OP, d.n)?)
            .arg(i32_of(OP, d.dim)?)
            .arg(d.first_row as u32)
            .arg(d.num_rows as u32)
            .launch(
                OP,
                self.func("embedding")?,
                (d.n as u32, 1, 1),
                256,
                0,
                self.stream(),
            )
    }

    fn matmul(
        &self,
        x: BufRef,
        w: BufRef,
        w_dtype: DType,
        out: BufRef,
        dims: MatmulDims,
    ) -> Result<()> {
        let p = ProjArg {
            w,
            dtype: w_dtype,
            m: dims.m,
            out,
            out_stride: dims.out_stride,
        };
        self.launch_matmul(x, None, &[p], dims.n, dims.k, dims.accumulate)
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
        const OP: &str = "rms_norm";
        if n == 0 {
            return Ok(());
        }
        let xp = self.ptr32(x, n * dim, OP)?;
        let wp = self.ptr32(weight, dim, OP)?;
        let op = self.ptr32(out, n * dim, OP)?;
        Args::new()
            .arg(xp)
            .arg(wp)
            .arg(op)
            .arg(i32_of(OP, n)?)
            .arg(i32_of(OP, dim)?)
            .arg(eps)
            .launch(
                OP,
                self.func("rms_norm")?,
                (n as u32, 1, 1),
                256,
                0,
                self.stream(),
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
        // One launch per four projections, the norm computed in the kernel
        // (`normed` is not written).
        let _ = normed;
        for chunk in projections.chunks(4) {
            let mut list = [ProjArg::NONE; 4];
            for (l, p) in list.iter_mut().zip(chunk) {
                *l = ProjArg {
                    w: p.w,
                    dtype: p.dtype,
                    m: p.m,
                    out: p.out,
                    out_stride: p.out_stride,
                };
            }
            self.launch_matmul(x, Some((weight, eps)), &list[..chunk.len()], n, k, false)?;
        }
        Ok(())
    }

    fn rope(&self, x: BufRef, positions: BufRef, d: RopeDims) -> Result<()> {
        const OP: &str = "rope";
        if d.num_tokens == 0 {
            return Ok(());
        }
        if d.rope_dim > d.head_dim {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("rope_dim {} above head_dim {}", d.rope_dim, d.head_dim),
            });
        }
        let xp = self.ptr32(x, d.num_tokens * d.num_heads * d.head_dim, OP)?;
        let pp = self.ptr32(positions, d.num_tokens, OP)?;
        Args::new()
            .arg(xp)
            .arg(pp)
            .arg(i32_of(OP, d.num_tokens)?)
            .arg(i32_of(OP, d.num_heads)?)
            .arg(i32_of(OP, d.head_dim)?)
            .arg(i32_of(OP, d.rope_dim)?)
            .arg(d.freq_base)
            .launch(
                OP,
                self.func("rope")?,
                (d.num_tokens as u32, 1, 1),
                128,
                0,
                self.stream(),
            )
    }

    fn silu_mul(&self, gate: BufRef, up: BufRef, out: BufRef, len: usize) -> Result<()> {
        const OP: &str = "silu_mul";
        if len == 0 {
            return Ok(());
        }
        let g = self.ptr32(gate, len, OP)?;
        let u = self.ptr32(up, len, OP)?;
        let o = self.ptr32(out, len, OP)?;
        Args::new().arg(g).arg(u).arg(o).arg(len as u64).launch(
            OP,
            self.func("silu_mul")?,
            (len.div_ceil(256) as u32, 1, 1),
            256,
            0,
            self.stream(),
        )
    }

    fn add_assign(&self, x: BufRef, y: BufRef, len: usize) -> Result<()> {
        const OP: &str = "add_assign";
        if len == 0 {
            return Ok(());
        }
        let xp = self.ptr32(x, len, OP)?;
        let yp = self.ptr32(y, len, OP)?;
        Args::new().arg(xp).arg(yp).arg(len as u64).launch(
            OP,
            self.func("add_assign")?,
            (len.div_ceil(256) as u32, 1, 1),
            256,
            0,
            self.stream(),
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
        const OP: &str = "gather_rows";
        if m == 0 || dim == 0 {
            return Ok(());
        }
        // Indices are on the device: the kernel zeroes rows whose index is outside x.
        let xp = self.ptr32(x, dim, OP)?;
        let rows = (x.bytes / 4 / dim as u64) as usize;
        let ip = self.ptr32(indices, m, OP)?;
        let op = self.ptr32(out, m * dim, OP)?;
        Args::new()
            .arg(xp)
            .arg(ip)
            .arg(op)
            .arg(i32_of(OP, m)?)
            .arg(i32_of(OP, dim)?)
            .arg(u32::try_from(rows).unwrap_or(u32::MAX))
            .launch(
                OP,
                self.func("gather_rows")?,
                (m as u32, 1, 1),
                256,
                0,
                self.stream(),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mma2_tiles_fill_a_wave_or_give_the_most_blocks() {
        // 7B gate/up at 64 tokens: 344 blocks of 64 x 64.
        assert_eq!(
            mma2_tile(64, [11008, 11008].into_iter()).0,
            "matmul_mma2_64x64"
        );
        // SmolLM2's 576 rows at 64 tokens: 9 blocks of 64 rows, 18 at 32 tokens, 36 of 16
        // rows x 64, 72 of 16 rows x 32: the most blocks.
        assert_eq!(mma2_tile(64, [576].into_iter()).0, "matmul_mma2_16x32");
        // A 512-token prefill of 576 rows: 64 x 64 tiles give 72 blocks, 64 x 32 give 144.
        assert_eq!(mma2_tile(512, [576].into_iter()).0, "matmul_mma2_64x32");
        // 9..16 tokens never take 64-row tiles wider than 16.
        let (sym, rows, tokens) = mma2_tile(12, [3072].into_iter());
        assert!(rows == 16 || tokens == 16, "{sym}");
    }

    #[test]
    fn matmul_vec_stages_x_only_when_it_fits() {
        assert_eq!(vec_staging_bytes(1, 4096), 16384);
        assert_eq!(vec_staging_bytes(8, 1536), 0);
    }

    #[test]
    fn every_quantized_type_has_its_persistent_gemv() {
        let defined: Vec<&str> = crate::kernels::FILES
            .iter()
            .flat_map(|f| f.symbols.iter().copied())
            .collect();
        for dtype in DType::WEIGHT_TYPES.iter().filter(|d| d.is_quantized()) {
            for (n, r) in [(1, 1), (1, 2), (2, 1), (8, 1), (8, 2)] {
                let sym = vec_symbol(*dtype, n, r).unwrap_or_else(|| panic!("{dtype}"));
                assert!(defined.contains(&sym), "{sym} is not a kernel of FILES");
                assert!(sym.contains(if n == 1 { "_n1_" } else { "_n8_" }), "{sym}");
            }
        }
        assert_eq!(vec_symbol(DType::F16, 1, 1), None);
        assert_eq!(vec_symbol(DType::Q4_K, 1, 2), Some("matmul_vec_q4_k_n1_r2"));
    }
}
