//! CUDA graphs of decode steps ([`GraphOps`]).
//!
//! The engine captures one graph per padded decode batch size (a bounded
//! set: 1, 2, 4, ... up to the largest batch), all over its one static
//! workspace, and replays them; sequence length is data. Capture is on the
//! backend's own (non-legacy) stream in thread-local mode. The graphs hold
//! kernel nodes only, no memory nodes, so they allocate from no private
//! pool: their device memory is the instantiated executables', measured by
//! `cuMemGetInfo` around instantiation and upload, and predicted for the
//! plan by [`planned_graph_bytes`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys as cu;
use pagoda_backend::{BackendError, GraphId, GraphOps, GraphPlanInput, Result};

use crate::device::Device;
use crate::driver::check;
use crate::memory::mem_info;

/// Kernel launches per transformer layer of a decode forward (7 fused ops,
/// of which rms_norm_matmul and rope_write_kv are 2–4 launches each), rounded up.
pub const NODES_PER_LAYER: u64 = 16;
/// Launches outside the layers (embedding, final norm, lm head, sampling).
pub const NODES_FIXED: u64 = 16;
/// Device bytes per kernel node of an instantiated graph, an upper bound
/// checked against the measurement on the H200 (`tests/graphs.rs`).
pub const BYTES_PER_NODE: u64 = 4 << 10;
/// Device bytes per graph besides its nodes (rounded to the 2 MiB the
/// driver's allocations come in).
pub const BYTES_PER_GRAPH: u64 = 2 << 20;

/// Bytes the graphs of `input` will take: per graph, a fixed part plus a part
/// per kernel node.
pub fn planned_graph_bytes(input: &GraphPlanInput) -> u64 {
    let nodes = NODES_FIXED + NODES_PER_LAYER * input.num_layers as u64;
    input.batch_sizes.len() as u64 * (BYTES_PER_GRAPH + nodes * BYTES_PER_NODE)
}

struct Captured {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
    /// Device bytes measured when it was instantiated.
    bytes: u64,
}

/// The graphs of one backend.
pub(crate) struct Graphs {
    dev: Arc<Device>,
    /// By id; `None` once released (ids are never reused).
    graphs: Mutex<Vec<Option<Captured>>>,
    free_before: AtomicU64,
}

// SAFETY: graph handles are used only under the mutex, with the context current.
unsafe impl Send for Graphs {}
// SAFETY: as above.
unsafe impl Sync for Graphs {}

impl Graphs {
    pub(crate) fn new(dev: Arc<Device>) -> Self {
        Graphs {
            dev,
            graphs: Mutex::new(Vec::new()),
            free_before: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Captured>>> {
        self.graphs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the stream is recording now.
    pub(crate) fn capturing(&self) -> bool {
        let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: the stream is live; writes one status.
        unsafe { cu::cuStreamIsCapturing(self.dev.stream(), &mut status) };
        status != cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    }
}

impl GraphOps for Graphs {
    fn begin_capture(&self) -> Result<()> {
        self.dev.bind()?;
        if self.capturing() {
            return Err(BackendError::InvalidArgument {
                op: "begin_capture",
                detail: "a capture is already in progress".into(),
            });
        }
        self.dev.synchronize()?;
        let (_, free) = mem_info(&self.dev)?;
        self.free_before.store(free, Ordering::SeqCst);
        // SAFETY: the stream is a non-legacy stream of this context.
        let r = unsafe {
            cu::cuStreamBeginCapture_v2(
                self.dev.stream(),
                cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        };
        check("cuStreamBeginCapture", r)
    }

    fn end_capture(&self) -> Result<GraphId> {
        self.dev.bind()?;
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun on this stream; writes one graph (null when the capture was invalidated).
        let r = unsafe { cu::cuStreamEndCapture(self.dev.stream(), &mut graph) };
        check("cuStreamEndCapture", r)?;
        let mut exec: cu::CUgraphExec = std::ptr::null_mut();
        // SAFETY: graph is a complete captured graph.
        let r = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = check("cuGraphInstantiate", r) {
            // SAFETY: the graph was created above and is destroyed once.
            unsafe { cu::cuGraphDestroy(graph) };
            return Err(e);
        }
        // SAFETY: exec was just instantiated; uploading it allocates its memory now.
        let r = unsafe { cu::cuGraphUpload(exec, self.dev.stream()) };
        check("cuGraphUpload", r)?;
        self.dev.synchronize()?;
        let (_, free) = mem_info(&self.dev)?;
        let bytes = self.free_before.load(Ordering::SeqCst).saturating_sub(free);
        let mut g = self.lock();
        g.push(Some(Captured { graph, exec, bytes }));
        Ok(GraphId(g.len() as u32 - 1))
    }

    fn replay(&self, id: GraphId) -> Result<()> {
        self.dev.bind()?;
        let g = self.lock();
        let c = g
            .get(id.0 as usize)
            .and_then(|c| c.as_ref())
            .ok_or_else(|| BackendError::InvalidArgument {
                op: "replay",
                detail: format!("no graph {id:?}"),
            })?;
        // SAFETY: exec is an instantiated graph of this context; its buffers are the engine's static workspace and KV pieces, alive while it is.
        check("cuGraphLaunch", unsafe {
            cu::cuGraphLaunch(c.exec, self.dev.stream())
        })
    }

    fn release(&self, id: GraphId) -> Result<()> {
        self.dev.bind()?;
        let c = self
            .lock()
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| BackendError::InvalidArgument {
                op: "release",
                detail: format!("no graph {id:?}"),
            })?;
        // A replay may still be queued.
        self.dev.synchronize()?;
        destroy(c);
        Ok(())
    }

    fn num_graphs(&self) -> usize {
        self.lock().iter().filter(|c| c.is_some()).count()
    }

    fn memory_bytes(&self) -> u64 {
        self.lock().iter().flatten().map(|c| c.bytes).sum()
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        for c in self.lock().drain(..).flatten() {
            destroy(c);
        }
    }
}

/// Destroys one graph (the stream idle).
fn destroy(c: Captured) {
    // SAFETY: the executable is destroyed once, with no replay queued.
    unsafe { cu::cuGraphExecDestroy(c.exec) };
    // SAFETY: the graph it was instantiated from is destroyed once, after it.
    unsafe { cu::cuGraphDestroy(c.graph) };
}
