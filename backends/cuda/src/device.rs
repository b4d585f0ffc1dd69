//! One device: its primary context and the one in-order stream every op,
//! copy and graph of the backend runs on.

use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaStream};
use pagoda_backend::{BackendError, Result};

use crate::driver::{check, driver_present};

/// The context and stream of a backend.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Device name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability (9, 0).
    pub capability: (i32, i32),
    /// Device ordinal.
    pub ordinal: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Device({} {}, sm_{}{})",
            self.ordinal, self.name, self.capability.0, self.capability.1
        )
    }
}

impl Device {
    /// Opens device `ordinal`: an error value (never a panic) when there is no
    /// driver or no such device.
    pub fn open(ordinal: usize) -> Result<Arc<Device>> {
        if !driver_present() {
            return Err(BackendError::Device {
                op: "cuInit",
                detail: "no CUDA driver (libcuda.so.1) on this machine".into(),
            });
        }
        let err = |op: &'static str| {
            move |e: cudarc::driver::DriverError| BackendError::Device {
                op,
                detail: format!("{e:?}"),
            }
        };
        let count = CudaContext::device_count().map_err(err("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::Device {
                op: "cuDeviceGet",
                detail: format!("no CUDA device {ordinal} ({count} found)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(err("cuCtxCreate"))?;
        // SAFETY: the backend orders all work on its one stream and synchronises explicitly; cudarc's per-buffer events would break graph capture (CUDA_ERROR_STREAM_CAPTURE_ISOLATION).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("cuStreamCreate"))?;
        let name = ctx.name().map_err(err("cuDeviceGetName"))?;
        let capability = ctx
            .compute_capability()
            .map_err(err("cuDeviceGetAttribute"))?;
        Ok(Arc::new(Device {
            ctx,
            stream,
            name,
            capability,
            ordinal,
        }))
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| BackendError::Device {
            op: "cuCtxSetCurrent",
            detail: format!("{e:?}"),
        })
    }

    /// The raw stream.
    pub(crate) fn stream(&self) -> cu::CUstream {
        self.stream.cu_stream()
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream is live for the device's life.
        check("cuStreamSynchronize", unsafe {
            cu::cuStreamSynchronize(self.stream())
        })
    }

    /// A device attribute.
    pub(crate) fn attribute(&self, a: cu::CUdevice_attribute) -> Result<i32> {
        self.ctx.attribute(a).map_err(|e| BackendError::Device {
            op: "cuDeviceGetAttribute",
            detail: format!("{e:?}"),
        })
    }
}
