//! [`SamplingOps`] on the device: `kernels/sampling.cu`.

use pagoda_backend::{BackendError, BufRef, Result, SamplingOps};

use crate::args::Args;
use crate::{CudaBackend, MAX_TOP_K, SCRATCH_BYTES};

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
        // One u64 key per row in the scratch buffer, a chunk of rows at a time; each row
        // split into stretches of at least 2048 elements (at most 64 blocks a row).
        let stretches = vocab.div_ceil(2048).clamp(1, 64) as u32;
        let chunk = (SCRATCH_BYTES / 8) as usize;
        let _g = self.lock_scratch();
        let mut r0 = 0;
        while r0 < rows {
            let n = chunk.min(rows - r0);
            let keys = self.zeroed_scratch(n as u64 * 8)?;
            let l = lp + (r0 * vocab) as u64 * 4;
            Args::new()
                .arg(l)
                .arg(keys)
                .arg(n as i32)
                .arg(vocab as i32)
                .launch(
                    OP,
                    self.func("argmax_partial")?,
                    (n as u32, stretches, 1),
                    256,
                    0,
                    self.stream(),
                )?;
            Args::new()
                .arg(l)
                .arg(keys)
                .arg(ip + r0 as u64 * 4)
                .arg(n as i32)
                .arg(vocab as i32)
                .launch(
                    OP,
                    self.func("argmax_finish")?,
                    (n.div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    self.stream(),
                )?;
            r0 += n;
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
