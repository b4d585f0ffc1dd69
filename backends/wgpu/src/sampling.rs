//! [`SamplingOps`] on the device: `shaders/sampling.wgsl`.

use pagoda_backend::{BackendError, BufRef, Result, SamplingOps};

use crate::kernels::Shader;
use crate::tensor_ops::{need, u32_of};
use crate::{MAX_TOP_K, WgpuBackend};

impl SamplingOps for WgpuBackend {
    fn argmax_rows(&self, logits: BufRef, ids: BufRef, rows: usize, vocab: usize) -> Result<()> {
        const OP: &str = "argmax_rows";
        if rows == 0 {
            return Ok(());
        }
        if vocab == 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: "an empty vocabulary".into(),
            });
        }
        need(OP, "logits", logits, (rows * vocab * 4) as u64)?;
        need(OP, "ids", ids, (rows * 4) as u64)?;
        self.shared.dispatch(
            OP,
            Shader::Sampling,
            "argmax_rows",
            &[(1, logits), (2, ids)],
            &[u32_of(OP, rows)?, u32_of(OP, vocab)?],
            u32_of(OP, rows)?,
        )
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
        const OP: &str = "top_k_rows";
        if rows == 0 || k == 0 {
            return Ok(());
        }
        if k > vocab.min(MAX_TOP_K) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("k {k} above min(vocab {vocab}, {MAX_TOP_K})"),
            });
        }
        need(OP, "logits", logits, (rows * vocab * 4) as u64)?;
        need(OP, "values", values, (rows * k * 4) as u64)?;
        need(OP, "ids", ids, (rows * k * 4) as u64)?;
        self.shared.dispatch(
            OP,
            Shader::Sampling,
            "top_k_rows",
            &[(1, logits), (2, ids), (3, values)],
            &[u32_of(OP, rows)?, u32_of(OP, vocab)?, u32_of(OP, k)?],
            u32_of(OP, rows)?,
        )
    }
}
