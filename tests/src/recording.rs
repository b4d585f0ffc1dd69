//! A recording backend double: wraps the CPU backend, logs every call (op,
//! buffer addresses, dims) and can capture and replay "graphs" the way a
//! CUDA backend does, so the engine's fixed-shape rules are tested without a
//! GPU.
//!
//! - Every call appends a [`Call`] to the log: the op name, the addresses of
//!   its buffer arguments and a text of its other arguments.
//! - With `graphs` on, [`GraphOps::begin_capture`] switches to recording:
//!   forward ops are stored as closures over their (copied) arguments and
//!   not run; [`GraphOps::replay`] runs them again with the same arguments.
//!   A blocking call (download, synchronize) during capture is an error, as
//!   it is in a CUDA stream capture. If a step's device arguments depended
//!   on anything but the padded batch size, replays would compute the wrong
//!   thing and the engine's output would differ from the plain CPU's.
//! - The raw allocator is wrapped too, so segment frees and `wait_idle` land
//!   in the same log as the ops.

use std::sync::{Arc, Mutex};

use pagoda_backend::{
    AttentionDims, AttentionOps, Backend, BackendError, BackendInfo, BufRef, DType, DeviceMemory,
    EmbeddingDims, GraphId, GraphOps, GraphPlanInput, KvArenaOps, KvCacheOps, KvLayerRef, KvLayout,
    MatmulDims, Projection, RawAllocator, RawSegment, Result, RopeDims, RopeKvDims, SamplingOps,
    TensorOps,
};
use pagoda_cpu::CpuBackend;

/// One logged call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Op name (`matmul`, `upload`, `decommit`, `free_segment`, ...).
    pub op: &'static str,
    /// Addresses (and lengths) of its buffer arguments.
    pub bufs: Vec<(u64, u64)>,
    /// Its other arguments.
    pub args: String,
    /// Recorded into a graph (not run).
    pub captured: bool,
}

impl Call {
    /// Whether this is device work of the forward pass (what a graph captures).
    pub fn is_forward_op(&self) -> bool {
        matches!(
            self.op,
            "embedding"
                | "matmul"
                | "rms_norm"
                | "rms_norm_matmul"
                | "rope"
                | "silu_mul"
                | "add_assign"
                | "gather_rows"
                | "write_kv"
                | "rope_write_kv"
                | "paged_attention"
        )
    }
}

type Op = Box<dyn Fn(&CpuBackend) -> Result<()> + Send + Sync>;

#[derive(Default)]
struct State {
    log: Vec<Call>,
    capturing: Option<Vec<Op>>,
    /// Captured graphs by id (`None` once released).
    graphs: Vec<Option<Vec<Op>>>,
}

/// The recording double.
pub struct RecordingBackend {
    inner: Arc<CpuBackend>,
    info: BackendInfo,
    state: Arc<Mutex<State>>,
    raw: Arc<RecordingRaw>,
    /// Bytes the double's weight preparation adds to every weight piece
    /// (a stand-in for a backend that repacks into a larger layout).
    weight_padding: u64,
}

impl std::fmt::Debug for RecordingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingBackend").finish()
    }
}

/// The wrapped raw allocator: logs segment allocation, frees and waits.
pub struct RecordingRaw {
    inner: Arc<dyn RawAllocator>,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn bufs(b: &[BufRef]) -> Vec<(u64, u64)> {
    b.iter().map(|b| (b.addr, b.bytes)).collect()
}

impl RawAllocator for RecordingRaw {
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment> {
        let s = self.inner.alloc_segment(bytes)?;
        lock(&self.state).log.push(Call {
            op: "alloc_segment",
            bufs: vec![(s.addr, s.bytes)],
            args: String::new(),
            captured: false,
        });
        Ok(s)
    }
    fn free_segment(&self, segment: RawSegment) {
        lock(&self.state).log.push(Call {
            op: "free_segment",
            bufs: vec![(segment.addr, segment.bytes)],
            args: String::new(),
            captured: false,
        });
        self.inner.free_segment(segment)
    }
    fn wait_idle(&self) -> Result<()> {
        lock(&self.state).log.push(Call {
            op: "wait_idle",
            bufs: vec![],
            args: String::new(),
            captured: false,
        });
        self.inner.wait_idle()
    }
    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }
}

impl RecordingBackend {
    /// Wraps `inner`; with `graphs`, the double offers graph capture.
    pub fn new(inner: CpuBackend, graphs: bool) -> RecordingBackend {
        let inner = Arc::new(inner);
        let mut info = inner.info().clone();
        info.name = "recording".into();
        info.supports_graphs = graphs;
        let state = Arc::new(Mutex::new(State::default()));
        let raw = Arc::new(RecordingRaw {
            inner: inner.raw_allocator(),
            state: state.clone(),
        });
        RecordingBackend {
            inner,
            info,
            state,
            raw,
            weight_padding: 0,
        }
    }

    /// Makes the double's weight preparation add `bytes` to every weight
    /// piece (the GGUF bytes first, then zeros), as a repacking backend would.
    pub fn with_weight_padding(mut self, bytes: u64) -> RecordingBackend {
        self.weight_padding = bytes;
        self
    }

    /// Takes the log so far.
    pub fn take_log(&self) -> Vec<Call> {
        std::mem::take(&mut lock(&self.state).log)
    }

    fn log(&self, op: &'static str, b: &[BufRef], args: String, captured: bool) {
        lock(&self.state).log.push(Call {
            op,
            bufs: bufs(b),
            args,
            captured,
        });
    }

    /// Runs `f` now, or records it when capturing; logs the call either way.
    fn op(
        &self,
        op: &'static str,
        b: &[BufRef],
        args: String,
        f: impl Fn(&CpuBackend) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let capturing = lock(&self.state).capturing.is_some();
        self.log(op, b, args, capturing);
        if capturing {
            if let Some(c) = lock(&self.state).capturing.as_mut() {
                c.push(Box::new(f));
            }
            Ok(())
        } else {
            f(&self.inner)
        }
    }

    /// Fails a blocking call made inside a capture.
    fn no_capture(&self, op: &'static str) -> Result<()> {
        if lock(&self.state).capturing.is_some() {
            return Err(BackendError::InvalidArgument {
                op,
                detail: "a blocking call inside a graph capture".into(),
            });
        }
        Ok(())
    }
}

/// An owned copy of a KV layer reference.
#[derive(Clone)]
struct OwnedKv {
    pieces: Vec<BufRef>,
    page_table: BufRef,
    layout: KvLayout,
}

impl OwnedKv {
    fn of(c: &KvLayerRef<'_>) -> OwnedKv {
        OwnedKv {
            pieces: c.pieces.to_vec(),
            page_table: c.page_table,
            layout: c.layout,
        }
    }
    fn get(&self) -> KvLayerRef<'_> {
        KvLayerRef {
            pieces: &self.pieces,
            page_table: self.page_table,
            layout: self.layout,
        }
    }
    fn bufs(&self) -> Vec<BufRef> {
        let mut v = self.pieces.clone();
        v.push(self.page_table);
        v
    }
}

impl TensorOps for RecordingBackend {
    fn embedding(
        &self,
        table: BufRef,
        dt: DType,
        ids: BufRef,
        out: BufRef,
        d: EmbeddingDims,
    ) -> Result<()> {
        self.op(
            "embedding",
            &[table, ids, out],
            format!("{dt} {d:?}"),
            move |b| b.embedding(table, dt, ids, out, d),
        )
    }
    fn matmul(&self, x: BufRef, w: BufRef, dt: DType, out: BufRef, d: MatmulDims) -> Result<()> {
        self.op("matmul", &[x, w, out], format!("{dt} {d:?}"), move |b| {
            b.matmul(x, w, dt, out, d)
        })
    }
    fn rms_norm(
        &self,
        x: BufRef,
        w: BufRef,
        out: BufRef,
        n: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.op(
            "rms_norm",
            &[x, w, out],
            format!("{n} {dim} {eps}"),
            move |b| b.rms_norm(x, w, out, n, dim, eps),
        )
    }
    fn rms_norm_matmul(
        &self,
        x: BufRef,
        w: BufRef,
        normed: BufRef,
        n: usize,
        k: usize,
        eps: f32,
        projections: &[Projection],
    ) -> Result<()> {
        let projs = projections.to_vec();
        let mut b = vec![x, w, normed];
        b.extend(projs.iter().flat_map(|p| [p.w, p.out]));
        let args = format!(
            "{n} {k} {eps} {:?}",
            projs
                .iter()
                .map(|p| (p.dtype, p.m, p.out_stride))
                .collect::<Vec<_>>()
        );
        self.op("rms_norm_matmul", &b, args, move |be| {
            be.rms_norm_matmul(x, w, normed, n, k, eps, &projs)
        })
    }
    fn rope(&self, x: BufRef, positions: BufRef, d: RopeDims) -> Result<()> {
        self.op("rope", &[x, positions], format!("{d:?}"), move |b| {
            b.rope(x, positions, d)
        })
    }
    fn silu_mul(&self, g: BufRef, u: BufRef, out: BufRef, len: usize) -> Result<()> {
        self.op("silu_mul", &[g, u, out], format!("{len}"), move |b| {
            b.silu_mul(g, u, out, len)
        })
    }
    fn add_assign(&self, x: BufRef, y: BufRef, len: usize) -> Result<()> {
        self.op("add_assign", &[x, y], format!("{len}"), move |b| {
            b.add_assign(x, y, len)
        })
    }
    fn gather_rows(&self, x: BufRef, idx: BufRef, out: BufRef, m: usize, dim: usize) -> Result<()> {
        self.op(
            "gather_rows",
            &[x, idx, out],
            format!("{m} {dim}"),
            move |b| b.gather_rows(x, idx, out, m, dim),
        )
    }
}

impl KvCacheOps for RecordingBackend {
    fn write_kv(
        &self,
        cache: KvLayerRef<'_>,
        k: BufRef,
        v: BufRef,
        slots: BufRef,
        n: usize,
    ) -> Result<()> {
        let c = OwnedKv::of(&cache);
        let mut b = c.bufs();
        b.extend([k, v, slots]);
        self.op("write_kv", &b, format!("{n}"), move |be| {
            be.write_kv(c.get(), k, v, slots, n)
        })
    }
    fn rope_write_kv(
        &self,
        q: BufRef,
        k: BufRef,
        v: BufRef,
        positions: BufRef,
        slots: BufRef,
        cache: KvLayerRef<'_>,
        d: RopeKvDims,
    ) -> Result<()> {
        let c = OwnedKv::of(&cache);
        let mut b = c.bufs();
        b.extend([q, k, v, positions, slots]);
        self.op("rope_write_kv", &b, format!("{d:?}"), move |be| {
            be.rope_write_kv(q, k, v, positions, slots, c.get(), d)
        })
    }
    fn copy_pages(&self, cache: KvLayerRef<'_>, pairs: &[(u32, u32)]) -> Result<()> {
        self.no_capture("copy_pages")?;
        self.log(
            "copy_pages",
            &OwnedKv::of(&cache).bufs(),
            format!("{pairs:?}"),
            false,
        );
        self.inner.copy_pages(cache, pairs)
    }
}

impl AttentionOps for RecordingBackend {
    fn paged_attention(
        &self,
        q: BufRef,
        cache: KvLayerRef<'_>,
        positions: BufRef,
        block_tables: BufRef,
        context_lens: BufRef,
        qsl: BufRef,
        out: BufRef,
        d: AttentionDims,
    ) -> Result<()> {
        let c = OwnedKv::of(&cache);
        let mut b = c.bufs();
        b.extend([q, positions, block_tables, context_lens, qsl, out]);
        self.op("paged_attention", &b, format!("{d:?}"), move |be| {
            be.paged_attention(
                q,
                c.get(),
                positions,
                block_tables,
                context_lens,
                qsl,
                out,
                d,
            )
        })
    }
}

impl SamplingOps for RecordingBackend {
    fn argmax_rows(&self, logits: BufRef, ids: BufRef, rows: usize, vocab: usize) -> Result<()> {
        self.no_capture("argmax_rows")?;
        self.log(
            "argmax_rows",
            &[logits, ids],
            format!("{rows} {vocab}"),
            false,
        );
        self.inner.argmax_rows(logits, ids, rows, vocab)
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
        self.no_capture("top_k_rows")?;
        self.log(
            "top_k_rows",
            &[logits, values, ids],
            format!("{rows} {vocab} {k}"),
            false,
        );
        self.inner.top_k_rows(logits, values, ids, rows, vocab, k)
    }
}

impl KvArenaOps for RecordingBackend {
    fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        let s = self.inner.reserve(bytes)?;
        self.log("reserve", &[], format!("{} {}", s.addr, s.bytes), false);
        Ok(s)
    }
    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.log(
            "commit",
            &[],
            format!("{} {offset} {bytes}", range.addr),
            false,
        );
        self.inner.commit(range, offset, bytes)
    }
    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.log(
            "decommit",
            &[],
            format!("{} {offset} {bytes}", range.addr),
            false,
        );
        self.inner.decommit(range, offset, bytes)
    }
    fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.inner.committed_bytes(range)
    }
    fn unreserve(&self, range: RawSegment) {
        self.log("unreserve", &[], format!("{}", range.addr), false);
        self.inner.unreserve(range)
    }
}

impl GraphOps for RecordingBackend {
    fn begin_capture(&self) -> Result<()> {
        let mut st = lock(&self.state);
        if st.capturing.is_some() {
            return Err(BackendError::InvalidArgument {
                op: "begin_capture",
                detail: "already capturing".into(),
            });
        }
        st.capturing = Some(Vec::new());
        st.log.push(Call {
            op: "begin_capture",
            bufs: vec![],
            args: String::new(),
            captured: false,
        });
        Ok(())
    }
    fn end_capture(&self) -> Result<GraphId> {
        let mut st = lock(&self.state);
        let ops = st
            .capturing
            .take()
            .ok_or_else(|| BackendError::InvalidArgument {
                op: "end_capture",
                detail: "not capturing".into(),
            })?;
        st.graphs.push(Some(ops));
        let id = GraphId(st.graphs.len() as u32 - 1);
        st.log.push(Call {
            op: "end_capture",
            bufs: vec![],
            args: format!("{id:?}"),
            captured: false,
        });
        Ok(id)
    }
    fn replay(&self, graph: GraphId) -> Result<()> {
        self.log("replay", &[], format!("{graph:?}"), false);
        let st = lock(&self.state);
        let ops = st
            .graphs
            .get(graph.0 as usize)
            .and_then(|g| g.as_ref())
            .ok_or_else(|| BackendError::InvalidArgument {
                op: "replay",
                detail: format!("no graph {graph:?}"),
            })?;
        for op in ops {
            op(&self.inner)?;
        }
        Ok(())
    }
    fn num_graphs(&self) -> usize {
        lock(&self.state)
            .graphs
            .iter()
            .filter(|g| g.is_some())
            .count()
    }
    fn release(&self, graph: GraphId) -> Result<()> {
        self.log("release", &[], format!("{graph:?}"), false);
        let mut st = lock(&self.state);
        match st.graphs.get_mut(graph.0 as usize).and_then(Option::take) {
            Some(_) => Ok(()),
            None => Err(BackendError::InvalidArgument {
                op: "release",
                detail: format!("no graph {graph:?}"),
            }),
        }
    }
    fn memory_bytes(&self) -> u64 {
        0
    }
}

impl Backend for RecordingBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }
    fn memory(&self) -> Result<DeviceMemory> {
        self.inner.memory()
    }
    fn raw_allocator(&self) -> Arc<dyn RawAllocator> {
        self.raw.clone()
    }
    fn graph_memory_bytes(&self, _input: &GraphPlanInput) -> u64 {
        0
    }
    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()> {
        self.no_capture("upload")?;
        self.log("upload", &[dst], String::new(), false);
        self.inner.upload(dst, src)
    }
    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()> {
        self.no_capture("download")?;
        self.log("download", &[src], String::new(), false);
        self.inner.download(src, dst)
    }
    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()> {
        self.no_capture("copy")?;
        self.log("copy", &[src, dst], String::new(), false);
        self.inner.copy(src, dst)
    }
    fn synchronize(&self) -> Result<()> {
        self.no_capture("synchronize")?;
        self.log("synchronize", &[], String::new(), false);
        self.inner.synchronize()
    }
    fn graphs(&self) -> Option<&dyn GraphOps> {
        if self.info.supports_graphs {
            Some(self)
        } else {
            None
        }
    }
    fn prepared_weight_bytes(&self, dtype: DType, rows: usize, cols: usize) -> Option<u64> {
        Some(self.inner.prepared_weight_bytes(dtype, rows, cols)? + self.weight_padding)
    }
    fn upload_weight(
        &self,
        dst: BufRef,
        src: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.log(
            "upload_weight",
            &[dst],
            format!("{dtype} {rows} {cols}"),
            false,
        );
        if Some(dst.bytes) != self.prepared_weight_bytes(dtype, rows, cols) {
            return Err(BackendError::InvalidArgument {
                op: "upload_weight",
                detail: format!(
                    "a {}-byte destination for ({rows}, {cols}) {dtype}",
                    dst.bytes
                ),
            });
        }
        let head = dst.slice(0, src.len() as u64)?;
        self.inner.upload_weight(head, src, dtype, rows, cols)
    }
}
