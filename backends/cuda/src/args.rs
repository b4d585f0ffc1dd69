//! Kernel arguments without heap allocation: values packed into a fixed
//! buffer, pointers to them built at launch (what `cuLaunchKernel` takes).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys;
use pagoda_backend::{BackendError, Result};

use crate::driver::check;

/// Whether launches carry programmatic stream serialization (programmatic dependent
/// launch: a kernel may start while the previous one ends; `kernels/common.cuh`'s
/// `pdl_begin`). Set by the backend from the device (compute capability 9.0 or newer) and
/// `PAGODA_CUDA_PDL` (`0` turns it off).
static PDL: AtomicBool = AtomicBool::new(false);

/// Turns programmatic dependent launch on or off for every later launch.
pub(crate) fn set_pdl(on: bool) {
    PDL.store(on, Ordering::Relaxed);
}

/// Whether launches use programmatic dependent launch.
pub fn pdl_enabled() -> bool {
    PDL.load(Ordering::Relaxed)
}

const WORDS: usize = 128;
const MAX_ARGS: usize = 24;

/// Up to 24 kernel arguments of 1 KiB in all, in declaration order.
pub(crate) struct Args {
    data: [u64; WORDS],
    off: [u16; MAX_ARGS],
    n: usize,
    used: usize,
    overflow: bool,
}

impl Args {
    pub(crate) fn new() -> Self {
        Args {
            data: [0; WORDS],
            off: [0; MAX_ARGS],
            n: 0,
            used: 0,
            overflow: false,
        }
    }

    /// Appends one argument; `T` must have the layout of the kernel's parameter
    /// (u64 for pointers, i32 for `int`, f32 for `float`, `#[repr(C)]` structs).
    pub(crate) fn arg<T: Copy>(mut self, v: T) -> Self {
        let size = std::mem::size_of::<T>();
        let words = size.div_ceil(8);
        if self.n == MAX_ARGS || self.used + words > WORDS || std::mem::align_of::<T>() > 8 {
            self.overflow = true;
            return self;
        }
        let at = self.used * 8;
        // SAFETY: `at + size` lies inside `data` (checked above); T is Copy and the destination is 8-aligned, at least T's alignment.
        unsafe {
            std::ptr::write((self.data.as_mut_ptr() as *mut u8).add(at) as *mut T, v);
        }
        self.off[self.n] = at as u16;
        self.n += 1;
        self.used += words;
        self
    }

    /// Launches `f` on `stream`.
    pub(crate) fn launch(
        mut self,
        op: &'static str,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        stream: sys::CUstream,
    ) -> Result<()> {
        if self.overflow {
            return Err(BackendError::InvalidArgument {
                op,
                detail: "too many kernel arguments".into(),
            });
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let base = self.data.as_mut_ptr() as *mut u8;
        let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, &o) in ptrs.iter_mut().zip(&self.off[..self.n]) {
            // SAFETY: every offset was written by `arg` inside `data`.
            *p = unsafe { base.add(o as usize) } as *mut c_void;
        }
        // Programmatic stream serialization: every kernel waits (griddepcontrol.wait) before
        // touching memory an earlier kernel writes, so the next one may be scheduled early.
        // SAFETY: an all-zero launch attribute is a valid (ignored) value; id and value set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = pdl_enabled();
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_bytes,
            hStream: stream,
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        // SAFETY: `f` is a loaded kernel of this context; `config` (and the attribute it points to) lives for the call; `ptrs` holds one pointer per parameter to a value of its type, alive for the call (the driver copies them before returning); buffers were checked by the caller to lie inside live device memory.
        let r =
            unsafe { sys::cuLaunchKernelEx(&config, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) };
        check(op, r)
    }
}
