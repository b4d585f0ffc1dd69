//! Fused RoPE + KV write, the reference for `kernels/rope_write_kv.cu` and
//! `shaders/rope_write_kv.wgsl`.
//!
//! Rotates Q and K in place, then stores the rotated K and V rows at their
//! slots: on the CPU the unfused sequence (`rope` on Q, `rope` on K,
//! `write_kv`), so it is bit-identical to it by construction. A GPU kernel
//! rotates each K row in registers and writes it straight into its page.

use pagoda_backend::{BufRef, KvCacheOps, KvLayerRef, Result, RopeKvDims, TensorOps};

use crate::CpuBackend;

impl CpuBackend {
    /// See [`KvCacheOps::rope_write_kv`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_write_kv_impl(
        &self,
        q: BufRef,
        k: BufRef,
        v: BufRef,
        positions: BufRef,
        slot_mapping: BufRef,
        cache: KvLayerRef<'_>,
        dims: RopeKvDims,
    ) -> Result<()> {
        self.rope(q, positions, dims.rope(false))?;
        self.rope(k, positions, dims.rope(true))?;
        self.write_kv(cache, k, v, slot_mapping, dims.num_tokens)
    }
}
