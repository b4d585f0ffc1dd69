//! The interface between the block manager and the device KV arena: which
//! commit units are backed by memory.

/// The physical memory behind KV pages, committed and released in units of
/// `pages_per_unit()` consecutive page ids (unit u = pages u*ppu .. (u+1)*ppu).
/// Implemented by the device KV cache ([`crate::kv_cache::KvCache`]) and by test doubles.
pub trait KvCommit: Send + Sync {
    /// Pages per commit unit (>= 1).
    fn pages_per_unit(&self) -> usize;
    /// Commits unit `unit` so its pages can be written. A fault site. Err = the device (or budget) cannot back it; the scheduler then preempts instead.
    fn commit(&self, unit: usize) -> pagoda_backend::Result<()>;
    /// Releases unit `unit`; none of its pages is live. The implementation defers the actual free until queued device work that may touch it has finished.
    fn release(&self, unit: usize);
}
