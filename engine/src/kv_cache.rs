//! The paged KV cache in device memory: per layer, arena pieces reserved at
//! their maximum and committed in units as pages are needed (layout and
//! geometry in `pagoda_backend::kv_cache`).
//!
//! - **Reserve.** Every layer reserves [`KvGeometry::layer_reserved_bytes`]
//!   of address space in pieces ([`pagoda_backend::KvArenaOps::reserve`]);
//!   nothing moves afterwards, so kernel arguments (and captured graphs)
//!   never change when the cache grows.
//! - **Commit.** Unit `u` (pages `u * ppu ..`) is committed in every layer at
//!   once ([`KvCommit::commit`], a fault site `kv grow`). Units map to
//!   granule ranges of their piece; a granule shared by two units (unit bytes
//!   need not be granule multiples) is committed while either unit is, by a
//!   per-granule count. The null page's granules are committed for the
//!   cache's whole life.
//! - **Release.** [`KvCommit::release`] only queues the unit; the memory goes
//!   back in [`KvCache::flush_releases`], which the engine calls at the end
//!   of each step (after its blocking read-back and the scheduler's
//!   postprocess), so no queued op can still touch it.
//! - **Page tables.** One `(num_pages, 2)` u32 table per layer (pool block,
//!   tag `kv`), written once at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pagoda_backend::{
    Backend, Block, BufRef, FaultInjector, KvGeometry, KvLayerRef, KvLayout, MemoryTag, Pool,
    RawSegment,
};

use crate::error::{EngineError, Result};
use crate::kv_commit::KvCommit;

/// Commit state shared by the cache and its [`KvCommit`] handle.
#[derive(Debug, Default)]
struct CommitState {
    /// Committed units.
    units: Vec<bool>,
    /// Per (piece, granule): how many committed units (or the null page) use it.
    granule_users: HashMap<(usize, u64), u32>,
    /// Units released but not yet given back to the device.
    pending: Vec<usize>,
    /// Units committed now.
    num_committed: usize,
    /// Most units committed at once.
    peak_committed: usize,
    /// Grow and release events so far.
    num_grows: u64,
    num_releases: u64,
    /// Granules committed now (per layer) and at most.
    committed_granules: usize,
    peak_committed_granules: usize,
}

struct Inner<B: Backend> {
    backend: Arc<B>,
    geometry: KvGeometry,
    /// (num_layers, num_pieces) reservations.
    pieces: Vec<Vec<RawSegment>>,
    faults: FaultInjector,
    state: Mutex<CommitState>,
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one user of every granule of `range` in `piece` of every layer,
    /// committing granules that gain their first user. On failure nothing
    /// is changed (granules this call committed are decommitted again).
    fn add_range(
        &self,
        st: &mut CommitState,
        piece: usize,
        range: std::ops::Range<u64>,
    ) -> pagoda_backend::Result<()> {
        let g = self.geometry.granularity;
        let first = range.start / g * g;
        let mut granule = first;
        while granule < range.end {
            let users = st
                .granule_users
                .get(&(piece, granule))
                .copied()
                .unwrap_or(0);
            if users == 0 {
                for (l, layer) in self.pieces.iter().enumerate() {
                    if let Err(e) = self.backend.commit(layer[piece], granule, g) {
                        for undo in &self.pieces[..l] {
                            let _ = self.backend.decommit(undo[piece], granule, g);
                        }
                        self.remove_range(st, piece, first..granule);
                        return Err(e);
                    }
                }
            }
            if users == 0 {
                st.committed_granules += 1;
                st.peak_committed_granules = st.peak_committed_granules.max(st.committed_granules);
            }
            st.granule_users.insert((piece, granule), users + 1);
            granule += g;
        }
        Ok(())
    }

    /// Removes one user of every granule of `range`, decommitting granules
    /// that lose their last user.
    fn remove_range(&self, st: &mut CommitState, piece: usize, range: std::ops::Range<u64>) {
        let g = self.geometry.granularity;
        let mut granule = range.start / g * g;
        while granule < range.end {
            let users = st
                .granule_users
                .get(&(piece, granule))
                .copied()
                .unwrap_or(0);
            if users <= 1 {
                st.granule_users.remove(&(piece, granule));
                if users == 1 {
                    st.committed_granules -= 1;
                    for layer in &self.pieces {
                        let _ = self.backend.decommit(layer[piece], granule, g);
                    }
                }
            } else {
                st.granule_users.insert((piece, granule), users - 1);
            }
            granule += g;
        }
    }

    fn commit_unit(&self, unit: usize) -> pagoda_backend::Result<()> {
        let mut st = self.lock();
        if st.units.get(unit).copied().unwrap_or(true) {
            return Ok(());
        }
        self.faults.check("kv grow")?;
        // A unit released in this step but not yet flushed is simply kept.
        if let Some(i) = st.pending.iter().position(|&u| u == unit) {
            st.pending.swap_remove(i);
        } else {
            let (piece, range) = self.geometry.unit_range(unit);
            self.add_range(&mut st, piece, range)?;
        }
        st.units[unit] = true;
        st.num_committed += 1;
        st.peak_committed = st.peak_committed.max(st.num_committed);
        st.num_grows += 1;
        Ok(())
    }

    fn release_unit(&self, unit: usize) {
        let mut st = self.lock();
        if !st.units.get(unit).copied().unwrap_or(false) {
            return;
        }
        st.units[unit] = false;
        st.num_committed -= 1;
        st.num_releases += 1;
        st.pending.push(unit);
    }

    fn flush(&self) {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        for unit in pending {
            let (piece, range) = self.geometry.unit_range(unit);
            self.remove_range(&mut st, piece, range);
        }
    }
}

impl<B: Backend> Drop for Inner<B> {
    fn drop(&mut self) {
        // Frees wait for the queue.
        let _ = self.backend.synchronize();
        for layer in &self.pieces {
            for &p in layer {
                self.backend.unreserve(p);
            }
        }
    }
}

/// The [`KvCommit`] side of a [`KvCache`], shared with the block manager.
pub struct KvCommitHandle<B: Backend>(Arc<Inner<B>>);

impl<B: Backend> KvCommit for KvCommitHandle<B> {
    fn pages_per_unit(&self) -> usize {
        self.0.geometry.pages_per_unit
    }
    fn commit(&self, unit: usize) -> pagoda_backend::Result<()> {
        self.0.commit_unit(unit)
    }
    fn release(&self, unit: usize) {
        self.0.release_unit(unit)
    }
}

/// Counters of a [`KvCache`], for telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct KvCommitStats {
    /// Bytes reserved (address space) over all layers.
    pub reserved_bytes: u64,
    /// Bytes committed (backed by memory) over all layers, as the device reports them.
    pub committed_bytes: u64,
    /// Most bytes committed at once over all layers.
    pub peak_committed_bytes: u64,
    /// Commit units per layer.
    pub num_units: usize,
    /// Units committed now.
    pub committed_units: usize,
    /// Most units committed at once.
    pub peak_committed_units: usize,
    /// Units committed so far.
    pub num_grows: u64,
    /// Units released so far.
    pub num_releases: u64,
}

/// KV storage for every layer.
pub struct KvCache<B: Backend> {
    /// The layout shared by all layers (null page included).
    pub layout: KvLayout,
    /// Pieces and units.
    pub geometry: KvGeometry,
    inner: Arc<Inner<B>>,
    /// (num_layers, num_pieces) the pieces as buffers.
    piece_bufs: Vec<Vec<BufRef>>,
    /// One `(num_pages, 2)` u32 page table per layer.
    page_tables: Vec<Block>,
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl<B: Backend> KvCache<B> {
    /// Reserves every layer's pieces and writes the page tables; commits
    /// only the null page.
    pub fn new(
        geometry: KvGeometry,
        backend: Arc<B>,
        pool: &Pool,
        faults: FaultInjector,
    ) -> Result<KvCache<B>> {
        let layout = geometry.layout;
        let mut pieces: Vec<Vec<RawSegment>> = Vec::with_capacity(layout.num_layers);
        let unreserve = |pieces: &Vec<Vec<RawSegment>>| {
            for l in pieces {
                for &p in l {
                    backend.unreserve(p);
                }
            }
        };
        for _ in 0..layout.num_layers {
            let mut layer = Vec::with_capacity(geometry.num_pieces);
            for i in 0..geometry.num_pieces {
                match faults
                    .check("kv reserve")
                    .and_then(|_| backend.reserve(geometry.piece_bytes(i)))
                {
                    Ok(seg) => layer.push(seg),
                    Err(e) => {
                        for &p in &layer {
                            backend.unreserve(p);
                        }
                        unreserve(&pieces);
                        return Err(e.into());
                    }
                }
            }
            pieces.push(layer);
        }
        let piece_bufs = pieces
            .iter()
            .map(|l| {
                l.iter()
                    .map(|s| BufRef {
                        segment: Some(s.id),
                        offset: 0,
                        addr: s.addr,
                        bytes: s.bytes,
                    })
                    .collect()
            })
            .collect();
        let inner = Arc::new(Inner {
            backend: backend.clone(),
            geometry,
            pieces,
            faults,
            state: Mutex::new(CommitState {
                units: vec![false; geometry.num_units()],
                ..CommitState::default()
            }),
        });
        let table: Vec<u32> = (0..layout.num_pages)
            .flat_map(|p| {
                let (piece, idx) = geometry.locate(p);
                [piece as u32, idx as u32]
            })
            .collect();
        let mut page_tables = Vec::with_capacity(layout.num_layers);
        for l in 0..layout.num_layers {
            let label = format!("kv.layer.{l}.page_table");
            let b = pool.alloc_labeled(geometry.page_table_bytes(), MemoryTag::Kv, &label)?;
            backend.upload(b.buf(), bytemuck::cast_slice(&table))?;
            page_tables.push(b);
        }
        // The null page stays committed for the cache's life.
        {
            let null = layout.null_page() as usize;
            let (piece, idx) = geometry.locate(null);
            let pb = layout.page_bytes() as u64;
            let mut st = inner.lock();
            inner.add_range(&mut st, piece, idx as u64 * pb..(idx as u64 + 1) * pb)?;
        }
        Ok(KvCache {
            layout,
            geometry,
            inner,
            piece_bufs,
            page_tables,
        })
    }

    /// Layer `l` as kernels see it.
    pub fn layer(&self, l: usize) -> KvLayerRef<'_> {
        KvLayerRef {
            pieces: &self.piece_bufs[l],
            page_table: self.page_tables[l].buf(),
            layout: self.layout,
        }
    }

    /// The buffer of page `page` of layer `l` (host-side copies: swap).
    pub fn page_buf(&self, l: usize, page: usize) -> Result<BufRef> {
        let (piece, idx) = self.geometry.locate(page);
        let pb = self.layout.page_bytes() as u64;
        Ok(self.piece_bufs[l][piece].slice(idx as u64 * pb, pb)?)
    }

    /// Where `page` lives, for telemetry: `(piece, offset_bytes)`, the arena
    /// piece holding it and its byte offset inside that piece, the same in
    /// every layer.
    pub fn page_location(&self, page: u32) -> (u32, u64) {
        let (piece, idx) = self.geometry.locate(page as usize);
        (piece as u32, idx as u64 * self.layout.page_bytes() as u64)
    }

    /// The handle the block manager commits and releases units through.
    pub fn commit_handle(&self) -> Arc<dyn KvCommit> {
        Arc::new(KvCommitHandle(self.inner.clone()))
    }

    /// Commits every unit (for engines whose block manager does not grow).
    pub fn commit_all(&self) -> Result<()> {
        for u in 0..self.geometry.num_units() {
            self.inner.commit_unit(u).map_err(EngineError::Backend)?;
        }
        Ok(())
    }

    /// Gives released units back to the device. Call only when no queued
    /// work may touch them (after a blocking read-back).
    pub fn flush_releases(&self) {
        self.inner.flush()
    }

    /// Reserved vs committed bytes and unit counters.
    pub fn stats(&self) -> KvCommitStats {
        let st = self.inner.lock();
        let committed = self
            .inner
            .pieces
            .iter()
            .flatten()
            .map(|&p| self.inner.backend.committed_bytes(p))
            .sum();
        KvCommitStats {
            reserved_bytes: self.geometry.reserved_bytes(),
            committed_bytes: committed,
            peak_committed_bytes: st.peak_committed_granules as u64
                * self.geometry.granularity
                * self.layout.num_layers as u64,
            num_units: self.geometry.num_units(),
            committed_units: st.num_committed,
            peak_committed_units: st.peak_committed,
            num_grows: st.num_grows,
            num_releases: st.num_releases,
        }
    }

    /// Bytes reserved (the plan's KV figure, without the page tables).
    pub fn reserved_bytes(&self) -> u64 {
        self.geometry.reserved_bytes()
    }

    /// Bytes committed right now.
    pub fn committed_bytes(&self) -> u64 {
        self.stats().committed_bytes
    }
}
