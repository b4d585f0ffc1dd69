//! The kernel sources (`kernels/*.cu`), compiled by NVRTC at start for the
//! device's architecture and cached on disk, and the loaded functions.
//!
//! Every file is compiled as `kernels/common.cuh` followed by the file (the
//! prelude is prepended, so NVRTC needs no include path). The cache key is
//! the SHA-256 of the full source, the architecture, the NVRTC version and
//! the options; a cached cubin is at
//! `$PAGODA_CACHE/kernels/<stem>-<arch>-<key>.cubin` (default cache root
//! `~/.cache/pagoda`), written by an atomic rename.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::path::{Path, PathBuf};

use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as nv;
use pagoda_backend::{BackendError, Result};
use sha2::{Digest, Sha256};

use crate::driver::check;

/// The prelude every file is compiled with.
pub const PRELUDE: &str = include_str!("../kernels/common.cuh");

/// One kernel file and the symbols it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// File stem, the same as the CPU backend's module (`paged_attention`).
    pub stem: &'static str,
    /// The file's text.
    pub source: &'static str,
    /// `extern "C"` kernels it defines.
    pub symbols: &'static [&'static str],
}

macro_rules! kernel_file {
    ($stem:literal, [$($sym:literal),* $(,)?]) => {
        KernelFile {
            stem: $stem,
            source: include_str!(concat!("../kernels/", $stem, ".cu")),
            symbols: &[$($sym),*],
        }
    };
}

/// Every kernel file (`kernels/README.md` lists the same).
pub const FILES: &[KernelFile] = &[
    kernel_file!("elementwise", ["silu_mul", "add_assign", "gather_rows"]),
    kernel_file!("embedding", ["embedding"]),
    kernel_file!("kv_arena", ["fill_words", "check_words"]),
    kernel_file!("kv_cache", ["write_kv", "copy_pages"]),
    kernel_file!(
        "matmul",
        [
            "matmul_vec",
            "matmul_vec_q8_0_n1_r1",
            "matmul_vec_q8_0_n1_r2",
            "matmul_vec_q8_0_n8_r1",
            "matmul_vec_q4_0_n1_r1",
            "matmul_vec_q4_0_n1_r2",
            "matmul_vec_q4_0_n8_r1",
            "matmul_vec_q4_1_n1_r1",
            "matmul_vec_q4_1_n1_r2",
            "matmul_vec_q4_1_n8_r1",
            "matmul_vec_q5_0_n1_r1",
            "matmul_vec_q5_0_n1_r2",
            "matmul_vec_q5_0_n8_r1",
            "matmul_vec_q5_1_n1_r1",
            "matmul_vec_q5_1_n1_r2",
            "matmul_vec_q5_1_n8_r1",
            "matmul_vec_q4_k_n1_r1",
            "matmul_vec_q4_k_n1_r2",
            "matmul_vec_q4_k_n8_r1",
            "matmul_vec_q5_k_n1_r1",
            "matmul_vec_q5_k_n1_r2",
            "matmul_vec_q5_k_n8_r1",
            "matmul_vec_q6_k_n1_r1",
            "matmul_vec_q6_k_n1_r2",
            "matmul_vec_q6_k_n8_r1",
            "matmul_t16",
            "matmul_t32",
            "matmul_t64",
            "matmul_r8_t16",
            "matmul_r8_t32",
            "matmul_r8_t64",
            "matmul_mma_t16",
            "matmul_mma_t32",
            "matmul_mma_t64",
            "matmul_mma2_64x64",
            "matmul_mma2_64x32",
            "matmul_mma2_64x16",
            "matmul_mma2_16x64",
            "matmul_mma2_16x32",
            "matmul"
        ]
    ),
    kernel_file!(
        "paged_attention",
        ["paged_attention", "paged_attention_prefill"]
    ),
    kernel_file!("rms_norm", ["rms_norm"]),
    kernel_file!("rope", ["rope"]),
    kernel_file!("rope_write_kv", ["rope_write_kv"]),
    kernel_file!(
        "sampling",
        ["argmax_partial", "argmax_finish", "top_k_rows"]
    ),
];

/// Options given to NVRTC besides the architecture (no fast math: the
/// kernels round as the CPU does).
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "--fmad=true", "-default-device"];

/// A kernel file that did not compile.
#[derive(Debug)]
pub struct CompileError {
    /// The file stem.
    pub stem: &'static str,
    /// NVRTC's result and log.
    pub log: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernels/{}.cu did not compile:\n{}", self.stem, self.log)
    }
}

impl std::error::Error for CompileError {}

impl From<CompileError> for BackendError {
    fn from(e: CompileError) -> Self {
        BackendError::Device {
            op: "nvrtc",
            detail: e.to_string(),
        }
    }
}

/// Definitions put before the prelude: `PAGODA_CUDA_PDL=early` makes every kernel let the
/// next one launch as it starts (`pdl_begin`), instead of when its blocks exit (measured
/// both ways: notes/gpu-runs.md).
fn defines() -> &'static str {
    if std::env::var("PAGODA_CUDA_PDL").is_ok_and(|v| v == "early") {
        "#define PAGODA_PDL_EARLY 1\n"
    } else {
        ""
    }
}

/// The full text NVRTC compiles for `file`.
pub fn full_source(file: &KernelFile) -> String {
    format!(
        "{}{PRELUDE}\n#line 1 \"{}.cu\"\n{}",
        defines(),
        file.stem,
        file.source
    )
}

/// Whether NVRTC can be loaded (after [`preload_nvrtc`], if a folder was given).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen NVRTC's candidate names.
    unsafe { nv::is_culib_present() }
}

/// Loads `libnvrtc-builtins.so.13.0` and `libnvrtc.so.13` from `dir` (e.g. the
/// `nvidia/cu13/lib` folder of the `nvidia-cuda-nvrtc` wheel) and keeps them
/// loaded, so cudarc's later load by name finds them (the dynamic loader
/// matches already-loaded libraries by soname).
pub fn preload_nvrtc(dir: &Path) -> Result<()> {
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = dir.join(name);
        // SAFETY: loading NVRTC runs only its initialisers, which have no preconditions; the library stays loaded for the process's life.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| BackendError::Device {
            op: "nvrtc",
            detail: format!("cannot load {}: {e}", path.display()),
        })?;
        std::mem::forget(lib);
    }
    Ok(())
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(no_nvrtc());
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: writes two ints.
    let r = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_check("nvrtcVersion", r)?;
    Ok((major, minor))
}

fn no_nvrtc() -> BackendError {
    BackendError::Device {
        op: "nvrtc",
        detail: "NVRTC (libnvrtc.so.13) not found: install the CUDA 13 toolkit's NVRTC or \
                 `pip install nvidia-cuda-nvrtc==13.0.88` and put its lib folder on LD_LIBRARY_PATH"
            .into(),
    }
}

fn nvrtc_check(what: &str, r: nv::nvrtcResult) -> Result<()> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Device {
            op: "nvrtc",
            detail: format!("{what}: {r:?}"),
        })
    }
}

/// Compiles `file` for `arch` (`sm_90`) to a cubin.
pub fn compile(file: &KernelFile, arch: &str) -> std::result::Result<Vec<u8>, CompileError> {
    let fail = |log: String| CompileError {
        stem: file.stem,
        log,
    };
    if !nvrtc_present() {
        return Err(fail(no_nvrtc().to_string()));
    }
    let src = CString::new(full_source(file)).map_err(|e| fail(e.to_string()))?;
    let name = CString::new(format!("{}.cu", file.stem)).map_err(|e| fail(e.to_string()))?;
    let mut opts: Vec<CString> = NVRTC_OPTIONS
        .iter()
        .map(|o| CString::new(*o).expect("static option"))
        .collect();
    opts.push(CString::new(format!("--gpu-architecture={arch}")).map_err(|e| fail(e.to_string()))?);
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: src and name are NUL-terminated and outlive the program; no headers.
    let r = unsafe {
        nv::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(fail(format!("nvrtcCreateProgram: {r:?}")));
    }
    // SAFETY: prog is a live program; the options are NUL-terminated strings.
    let r = unsafe { nv::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let log = program_log(prog);
    let result = if r != nv::nvrtcResult::NVRTC_SUCCESS {
        Err(fail(format!("{r:?}\n{log}")))
    } else {
        cubin(prog).map_err(|e| fail(format!("{e}\n{log}")))
    };
    // SAFETY: prog is live and destroyed once.
    unsafe { nv::nvrtcDestroyProgram(&mut prog) };
    result
}

fn program_log(prog: nv::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: prog is live; writes one usize.
    if unsafe { nv::nvrtcGetProgramLogSize(prog, &mut size) } != nv::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: buf holds `size` bytes as NVRTC asked.
    unsafe { nv::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) };
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

fn cubin(prog: nv::nvrtcProgram) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: prog compiled; writes one usize.
    let r = unsafe { nv::nvrtcGetCUBINSize(prog, &mut size) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(format!("nvrtcGetCUBINSize: {r:?}"));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buf holds `size` bytes as NVRTC asked.
    let r = unsafe { nv::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {r:?}"));
    }
    Ok(buf)
}

/// The on-disk cache folder of compiled kernels.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("PAGODA_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("pagoda"),
    }
    .join("kernels")
}

/// The cache key of `file` for `arch` under NVRTC `version`.
pub fn cache_key(file: &KernelFile, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(full_source(file).as_bytes());
    h.update(
        format!(
            "\0{arch}\0{}.{}\0{}",
            version.0,
            version.1,
            NVRTC_OPTIONS.join(" ")
        )
        .as_bytes(),
    );
    let d = h.finalize();
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The cubin of `file` for `arch`: from the disk cache, else compiled and cached.
/// Returns the cubin and whether it came from the cache.
pub fn cached_cubin(file: &KernelFile, arch: &str) -> Result<(Vec<u8>, bool)> {
    let version = nvrtc_version()?;
    let dir = cache_dir();
    let path = dir.join(format!(
        "{}-{arch}-{}.cubin",
        file.stem,
        cache_key(file, arch, version)
    ));
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok((bytes, true));
    }
    let bytes = compile(file, arch)?;
    // The cache is an optimisation: a read-only cache folder is not an error.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{}.{}.tmp", file.stem, std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((bytes, false))
}

/// The loaded modules and their functions (of one context).
pub(crate) struct Kernels {
    modules: Vec<cu::CUmodule>,
    functions: HashMap<&'static str, cu::CUfunction>,
    /// Blocks of a kernel resident on one SM, by (kernel, block threads, dynamic shared bytes).
    occupancy: std::sync::Mutex<HashMap<(&'static str, u32, u32), u32>>,
    /// Seconds spent compiling (0 when every file came from the cache).
    pub(crate) compile_seconds: f64,
}

// SAFETY: CUmodule / CUfunction are driver handles usable from any thread with the context current; they are only read after construction.
unsafe impl Send for Kernels {}
// SAFETY: as above.
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Compiles (or reads from the cache) and loads every file for `arch`,
    /// with the owning context current on this thread.
    pub(crate) fn load(arch: &str) -> Result<Kernels> {
        let mut k = Kernels {
            modules: Vec::new(),
            functions: HashMap::new(),
            occupancy: std::sync::Mutex::new(HashMap::new()),
            compile_seconds: 0.0,
        };
        for file in FILES {
            let t = std::time::Instant::now();
            let (cubin, cached) = cached_cubin(file, arch)?;
            if !cached {
                k.compile_seconds += t.elapsed().as_secs_f64();
            }
            let mut module: cu::CUmodule = std::ptr::null_mut();
            // SAFETY: cubin is a complete image NVRTC produced for this arch.
            let r = unsafe { cu::cuModuleLoadData(&mut module, cubin.as_ptr() as *const _) };
            check("cuModuleLoadData", r)?;
            k.modules.push(module);
            for &sym in file.symbols {
                let name = CString::new(sym).expect("static symbol");
                let mut f: cu::CUfunction = std::ptr::null_mut();
                // SAFETY: module is loaded; name is NUL-terminated.
                let r = unsafe { cu::cuModuleGetFunction(&mut f, module, name.as_ptr()) };
                check("cuModuleGetFunction", r)?;
                k.functions.insert(sym, f);
            }
        }
        Ok(k)
    }

    /// The function `name` (one of the symbols of [`FILES`]).
    pub(crate) fn get(&self, name: &'static str) -> Result<cu::CUfunction> {
        self.functions
            .get(name)
            .copied()
            .ok_or_else(|| BackendError::Device {
                op: "kernel",
                detail: format!("no kernel named {name}"),
            })
    }
}

impl Kernels {
    /// Blocks of `threads` threads and `smem` dynamic shared bytes of kernel `name` that one
    /// SM holds at once (the driver's occupancy calculator; at least 1), cached.
    pub(crate) fn resident_blocks(
        &self,
        name: &'static str,
        threads: u32,
        smem: u32,
    ) -> Result<u32> {
        let key = (name, threads, smem);
        let mut cache = self
            .occupancy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&b) = cache.get(&key) {
            return Ok(b);
        }
        let f = self.get(name)?;
        let mut blocks: c_int = 0;
        // SAFETY: f is a loaded function of this context; blocks is a valid out pointer.
        let r = unsafe {
            cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut blocks,
                f,
                threads as c_int,
                smem as usize,
            )
        };
        check("cuOccupancyMaxActiveBlocksPerMultiprocessor", r)?;
        let b = (blocks.max(1)) as u32;
        cache.insert(key, b);
        Ok(b)
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for &m in &self.modules {
            // SAFETY: each module was loaded once and is unloaded once; the backend synchronised its stream before dropping the kernels.
            unsafe { cu::cuModuleUnload(m) };
        }
    }
}
