//! Host memory the engine stages device data in (the KV swap tier): plain
//! heap memory by default, page-locked (pinned) memory on backends whose
//! transfers are faster from it ([`crate::Backend::alloc_host`]).

/// A host byte buffer from a backend.
pub trait HostBuffer: Send + Sync {
    /// The bytes.
    fn as_slice(&self) -> &[u8];
    /// The bytes, mutably.
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// Whether the memory is page-locked for the device's DMA engines.
    fn is_pinned(&self) -> bool;
}

/// Zero-filled heap memory (the default [`HostBuffer`]).
#[derive(Debug, Default)]
pub struct HeapBuffer(Vec<u8>);

impl HeapBuffer {
    /// `bytes` zero bytes (lazily zero-filled by the OS).
    pub fn new(bytes: usize) -> Self {
        HeapBuffer(vec![0; bytes])
    }
}

impl HostBuffer for HeapBuffer {
    fn as_slice(&self) -> &[u8] {
        &self.0
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn is_pinned(&self) -> bool {
        false
    }
}
