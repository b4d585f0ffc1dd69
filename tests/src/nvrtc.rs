//! NVRTC for compiling the CUDA kernels on a machine without a GPU or a CUDA
//! toolkit (CI): the `nvidia-cuda-nvrtc` 13.0.88 wheel (the H200 machine's
//! version) fetched from PyPI on first use into `<cache>/nvrtc-13.0.88/`,
//! each library checked against its sha256, then loaded by absolute path.
//! `PAGODA_NVRTC_DIR` names a folder holding the two libraries instead.

use std::path::PathBuf;

use pagoda::fetch::{ArtifactSpec, PypiFile, cache_dir, ensure_file};

const INDEX: &str = "https://pypi.org/simple/nvidia-cuda-nvrtc/";
const WHEEL: &str =
    "nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl";

/// The two libraries of the wheel (name, archive entry, sha256, size).
const LIBS: [(&str, &str, &str, u64); 2] = [
    (
        "libnvrtc-builtins.so.13.0",
        "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
        "91dcd944d01da9c0f08fff5d779db136a47f6d62bdb63bae900d2f481e92c3a2",
        4_380_616,
    ),
    (
        "libnvrtc.so.13",
        "nvidia/cu13/lib/libnvrtc.so.13",
        "a49e67e8e74590f1e98de55c39c6287efd3f59e3c3797464d7bbe0fe01349b11",
        109_338_064,
    ),
];

/// The folder holding NVRTC 13.0.88's libraries, fetched if needed.
pub fn nvrtc_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("PAGODA_NVRTC_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let dir = cache_dir().join("nvrtc-13.0.88");
    let source = PypiFile {
        index_url: INDEX.to_owned(),
        file_name: WHEEL.to_owned(),
    };
    for (file_name, archive_entry, sha256, size) in LIBS {
        let spec = ArtifactSpec {
            file_name,
            archive_entry,
            sha256,
            size,
        };
        ensure_file(&dir, &spec, &source).map_err(|e| format!("fetching NVRTC: {e}"))?;
    }
    Ok(dir)
}

/// Makes NVRTC loadable in this process (fetching it if needed).
pub fn load_nvrtc() -> Result<(), String> {
    if pagoda_cuda::kernels::nvrtc_present() {
        return Ok(());
    }
    let dir = nvrtc_dir()?;
    pagoda_cuda::kernels::preload_nvrtc(&dir).map_err(|e| e.to_string())
}
