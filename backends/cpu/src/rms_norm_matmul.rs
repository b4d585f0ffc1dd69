//! Fused RMSNorm + several projections (Q, K, V; gate and up), the reference
//! for `kernels/rms_norm_matmul.cu` and `shaders/rms_norm_matmul.wgsl`.
//!
//! The CPU runs it as the unfused sequence (the normed rows once, then each
//! projection from them), so it is bit-identical to `rms_norm` followed by
//! one `matmul` per projection by construction; a GPU kernel may keep the
//! normed rows in registers or shared memory instead. The parity test in
//! `tests/` holds the fused op to that sequence.

use pagoda_backend::{BufRef, MatmulDims, Projection, Result, TensorOps};

use crate::{CpuBackend, disjoint};

impl CpuBackend {
    /// See [`TensorOps::rms_norm_matmul`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rms_norm_matmul_impl(
        &self,
        x: BufRef,
        weight: BufRef,
        normed: BufRef,
        n: usize,
        k: usize,
        eps: f32,
        projections: &[Projection],
    ) -> Result<()> {
        for p in projections {
            disjoint("rms_norm_matmul", p.out, &[x, weight, normed])?;
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
}
