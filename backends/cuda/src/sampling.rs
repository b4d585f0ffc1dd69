//! [`SamplingOps`] on the device: `kernels/sampling.cu`.

use pagoda_backend::{BackendError, BufRef, Result, SamplingOps};

use crate::args::Args;
use crate::{CudaBackend, MAX_TOP_K};

impl SamplingOps for CudaBackend {
    fn argmax_rows(&self, logits: BufRef, ids: BufRef, rows: usize, vocab: usize) -> Result<()> {
        const OP: &str = "argmax_rows";
        if rows == 0 {
            return Ok(());
        }
        if vocab == 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: "empty rows".into(),
            });
        }
        let lp = self.ptr32(logits, rows * vocab, OP)?;
        let ip = self.ptr32(ids, rows, OP)?;
        Args::new()
            .arg(lp)
            .arg(ip)
            .arg(rows as i32)
            .arg(vocab as i32)
            .launch(
                OP,
                self.func("argmax_rows")?,
                (rows as u32, 1, 1),
                1024,
                0,
                self.stream(),
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
                detail: format!("k = {k} above min(vocab {vocab}, {MAX_TOP_K})"),
            });
        }
        let lp = self.ptr32(logits, rows * vocab, OP)?;
        let vp = self.ptr32(values, rows * k, OP)?;
        let ip = self.ptr32(ids, rows * k, OP)?;
        Args::new()
            .arg(lp)
            .arg(vp)
            .arg(ip)
            .arg(rows as i32)
            .arg(vocab as i32)
            .arg(k as i32)
            .launch(
                OP,
                self.func("top_k_rows")?,
                (rows as u32, 1, 1),
                1024,
                0,
                self.stream(),
            )
    }
}
