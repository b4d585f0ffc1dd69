//! Device memory: every pool segment and KV arena piece is one `wgpu::Buffer`, registered
//! under a synthetic base address (`(id + 1) << 40`), so a `BufRef`'s `addr` finds its
//! buffer and offset, and a stale or foreign reference is an error value.
//!
//! Buffers are `STORAGE | COPY_SRC | COPY_DST`, sized up to a multiple of 4 bytes (wgpu
//! copies move whole words). A zero-byte request is valid everywhere and touches nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pagoda_backend::{
    BackendError, BufRef, MemoryTag, RawAllocator, RawSegment, Result, SegmentId,
};

use crate::device::Gpu;

/// Largest download kept in the reusable readback buffer.
const READBACK_KEEP: u64 = 64 << 20;

/// Spacing of synthetic base addresses (larger than any buffer).
const ADDR_SHIFT: u32 = 40;

/// One registered buffer.
#[derive(Clone)]
pub(crate) struct Seg {
    pub(crate) buffer: wgpu::Buffer,
    /// Bytes the segment was asked for.
    pub(crate) bytes: u64,
}

/// Every live buffer of one backend, by synthetic base address.
#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU32,
    segs: Mutex<BTreeMap<u64, Seg>>,
    live_bytes: AtomicU64,
}

/// A resolved `BufRef`: its buffer and byte offset there.
pub(crate) struct Resolved {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) bytes: u64,
}

fn invalid(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Seg>> {
        self.segs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new buffer of `bytes` (> 0), registered.
    pub(crate) fn alloc(
        &self,
        gpu: &Gpu,
        bytes: u64,
        tag: MemoryTag,
        label: &str,
    ) -> Result<RawSegment> {
        if bytes == 0 {
            return Err(invalid("alloc_segment", "zero bytes".into()));
        }
        if bytes > gpu.limits.max_buffer_size {
            return Err(BackendError::OutOfMemory {
                tag,
                requested_bytes: bytes,
                detail: format!(
                    "one buffer of {bytes} bytes is above the adapter's max_buffer_size {}",
                    gpu.limits.max_buffer_size
                ),
            });
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(BackendError::OutOfMemory {
                tag,
                requested_bytes: bytes,
                detail: format!("wgpu: {e}"),
            });
        }
        let id = SegmentId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let addr = (id.0 as u64 + 1) << ADDR_SHIFT;
        self.lock().insert(addr, Seg { buffer, bytes });
        self.live_bytes.fetch_add(bytes, Ordering::SeqCst);
        Ok(RawSegment { id, addr, bytes })
    }

    /// Drops a registered buffer (after the queue is idle).
    pub(crate) fn free(&self, addr: u64) {
        if let Some(seg) = self.lock().remove(&addr) {
            self.live_bytes.fetch_sub(seg.bytes, Ordering::SeqCst);
            seg.buffer.destroy();
        }
    }

    /// The buffer of segment base `addr`.
    pub(crate) fn segment(&self, addr: u64) -> Option<Seg> {
        self.lock().get(&addr).cloned()
    }

    /// The buffer and offset of a non-empty `r`, checked to lie inside one live buffer.
    pub(crate) fn resolve(&self, op: &'static str, r: BufRef) -> Result<Resolved> {
        let map = self.lock();
        let hit = map.range(..=r.addr).next_back();
        match hit {
            Some((&base, seg))
                if r.addr
                    .checked_add(r.bytes)
                    .is_some_and(|end| end <= base + seg.bytes) =>
            {
                Ok(Resolved {
                    buffer: seg.buffer.clone(),
                    offset: r.addr - base,
                    bytes: r.bytes,
                })
            }
            _ => Err(invalid(
                op,
                format!("buffer {r:?} is not inside a live wgpu buffer of this backend"),
            )),
        }
    }

    /// Bytes held in buffers right now (pool segments and KV arena pieces).
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::SeqCst)
    }

    /// Buffers alive right now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The [`RawAllocator`] of the wgpu backend: one buffer per segment.
pub struct WgpuAllocator {
    pub(crate) shared: Arc<crate::Shared>,
}

impl RawAllocator for WgpuAllocator {
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment> {
        self.shared.registry.alloc(
            &self.shared.gpu,
            bytes,
            MemoryTag::Scratch,
            "pagoda pool segment",
        )
    }

    fn free_segment(&self, segment: RawSegment) {
        self.shared.registry.free(segment.addr);
    }

    fn wait_idle(&self) -> Result<()> {
        self.shared.synchronize()
    }

    fn alignment(&self) -> u64 {
        crate::SEGMENT_ALIGN
    }
}

impl crate::Shared {
    /// Host bytes into `dst` (any offset and length): whole words through a staging buffer
    /// and a copy recorded in order with the ops; a range that does not start and end on
    /// words is merged with the device's bytes around it first.
    pub(crate) fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()> {
        if src.len() as u64 != dst.bytes {
            return Err(invalid(
                "upload",
                format!("{} host bytes into a buffer of {}", src.len(), dst.bytes),
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        let r = self.registry.resolve("upload", dst)?;
        let start = r.offset / 4 * 4;
        let end = (r.offset + r.bytes).next_multiple_of(4);
        let mut words = vec![0u8; (end - start) as usize];
        if start != r.offset || end != r.offset + r.bytes {
            self.read_span(&r.buffer, start, &mut words)?;
        }
        let at = (r.offset - start) as usize;
        words[at..at + src.len()].copy_from_slice(src);
        if words.len() as u64 <= crate::kernels::RING_BYTES / 4 {
            // Small uploads (the step's ids, positions, tables): through the ring, no buffer
            // made per call.
            self.with_ring(&words, 4, |ring, at, enc| {
                enc.copy_buffer_to_buffer(ring, at, &r.buffer, start, words.len() as u64)
            });
            return Ok(());
        }
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload staging"),
            size: words.len() as u64,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        staging
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| BackendError::Device {
                op: "upload",
                detail: format!("mapping the staging buffer: {e}"),
            })?
            .copy_from_slice(&words);
        staging.unmap();
        self.record(|enc| {
            enc.copy_buffer_to_buffer(&staging, 0, &r.buffer, start, words.len() as u64)
        });
        Ok(())
    }

    /// Device bytes `[start, start + out.len())` of `buffer` (word-aligned), after all
    /// recorded work, through the reusable readback buffer (held for the whole read; grown
    /// to a power of two; spans above [`READBACK_KEEP`] get a buffer of their own).
    fn read_span(&self, buffer: &wgpu::Buffer, start: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len() as u64;
        let mut kept = self
            .kernels
            .readback
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let make = |size: u64| {
            self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let readback = match kept.as_ref() {
            _ if len > READBACK_KEEP => make(len),
            Some(b) if b.size() >= len => b.clone(),
            _ => {
                let b = make(len.next_power_of_two().max(64 << 10));
                *kept = Some(b.clone());
                b
            }
        };
        self.record(|enc| enc.copy_buffer_to_buffer(buffer, start, &readback, 0, len));
        self.submit();
        let slice = readback.slice(..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |res| {
            let _ = tx.send(res);
        });
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| BackendError::Device {
                op: "download",
                detail: e.to_string(),
            })?;
        match rx.recv() {
            Ok(Ok(())) => {}
            other => {
                return Err(BackendError::Device {
                    op: "download",
                    detail: format!("mapping the readback buffer failed: {other:?}"),
                });
            }
        }
        out.copy_from_slice(&slice.get_mapped_range().map_err(|e| BackendError::Device {
            op: "download",
            detail: format!("reading the readback buffer: {e}"),
        })?);
        readback.unmap();
        Ok(())
    }

    /// `src` to the host, after all recorded work.
    pub(crate) fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != src.bytes {
            return Err(invalid(
                "download",
                format!("a buffer of {} into {} host bytes", src.bytes, dst.len()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        let r = self.registry.resolve("download", src)?;
        let start = r.offset / 4 * 4;
        let end = (r.offset + r.bytes).next_multiple_of(4);
        let mut words = vec![0u8; (end - start) as usize];
        self.read_span(&r.buffer, start, &mut words)?;
        let at = (r.offset - start) as usize;
        dst.copy_from_slice(&words[at..at + dst.len()]);
        Ok(())
    }

    /// Device-to-device copy of equal lengths: a buffer copy between two buffers, a word
    /// copy kernel inside one, the host for ranges that are not whole words.
    pub(crate) fn copy(&self, src: BufRef, dst: BufRef) -> Result<()> {
        if src.bytes != dst.bytes {
            return Err(invalid(
                "copy",
                format!("{} bytes into a buffer of {}", src.bytes, dst.bytes),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        let s = self.registry.resolve("copy", src)?;
        let d = self.registry.resolve("copy", dst)?;
        let aligned = s.offset % 4 == 0 && d.offset % 4 == 0 && s.bytes % 4 == 0;
        if !aligned {
            let mut host = vec![0u8; src.bytes as usize];
            self.download(src, &mut host)?;
            return self.upload(dst, &host);
        }
        if s.buffer != d.buffer {
            self.record(|enc| {
                enc.copy_buffer_to_buffer(&s.buffer, s.offset, &d.buffer, d.offset, s.bytes)
            });
            return Ok(());
        }
        let words = (s.bytes / 4) as u32;
        self.dispatch(
            "copy",
            crate::kernels::Shader::Elementwise,
            "copy_words",
            &[(2, src), (4, dst)],
            &[words],
            words.div_ceil(256),
        )
    }
}
