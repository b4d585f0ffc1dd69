//! Loading the CUDA driver and turning its result codes into [`BackendError`]s.
//!
//! cudarc loads `libcuda.so.1` on first use and panics when it is missing, so
//! every entry point checks [`driver_present`] first and returns an error
//! value instead.

use cudarc::driver::sys::{self, CUresult};
use pagoda_backend::{BackendError, MemoryTag, Result};

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver's candidate names; loads nothing else.
    unsafe { sys::is_culib_present() }
}

/// The error value of a failed driver call.
pub(crate) fn driver_error(op: &'static str, r: CUresult) -> BackendError {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves null).
    unsafe { sys::cuGetErrorString(r, &mut name) };
    let msg = if name.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: the driver returned a NUL-terminated static string.
        let s = unsafe { std::ffi::CStr::from_ptr(name) };
        format!("{r:?}: {}", s.to_string_lossy())
    };
    BackendError::Device { op, detail: msg }
}

/// `Ok` for `CUDA_SUCCESS`, else the error value naming `op`.
pub(crate) fn check(op: &'static str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(op, r))
    }
}

/// Like [`check`], but `CUDA_ERROR_OUT_OF_MEMORY` becomes [`BackendError::OutOfMemory`].
pub(crate) fn check_alloc(op: &'static str, r: CUresult, tag: MemoryTag, bytes: u64) -> Result<()> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(BackendError::OutOfMemory {
            tag,
            requested_bytes: bytes,
            detail: format!("{op}: the device has no {bytes} bytes free"),
        }),
        r => Err(driver_error(op, r)),
    }
}
