//! Shaders, pipelines and dispatches.
//!
//! - Sources: `shaders/*.wgsl` embedded with `include_str!`; each pipeline's module is
//!   `common.wgsl`, then `weights.wgsl` (matmul, embedding) or the generated KV piece
//!   bindings and `kv.wgsl` (kv_cache, paged_attention), then the shader itself.
//! - Variants: each module is specialised for the device's [`ShaderFeatures`] (`//#if f16`,
//!   `//#if subgroup`, `//#else`, `//#endif` blocks, [`specialise`]; `enable f16;` first when
//!   f16 is on), once per device, so the fallback text has no f16 type and no subgroup op.
//! - Pipelines: cached by (shader, entry point, constants: KV pieces bound, the attention's
//!   `override HEAD_DIM`, `GROUP` and `KV_DT`, the matmul's `TOK` and `DT`), layouts
//!   derived from the shader.
//! - Arguments: each `BufRef` is bound as a window of its buffer starting at the largest
//!   offset-aligned byte at or below it; the word offset of the data inside the window goes
//!   into the parameter buffer (`common.wgsl`).
//! - Recording: every dispatch and copy goes into one pending command encoder, submitted
//!   when the host needs a result (`download`, `synchronize`) or before a staging write.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use pagoda_backend::{BackendError, BufRef, Result};

use crate::Shared;

/// Most KV arena pieces a KV shader binds (bindings 8 ..), the engine's own limit; the
/// adapter's `max_storage_buffers_per_shader_stage` may allow fewer.
pub const MAX_BOUND_PIECES: usize = pagoda_backend::MAX_KV_PIECES;

/// Words of the parameter buffer before the op's own parameters: one offset per binding
/// 1 ..= 80 (`common.wgsl`).
const HEADER_WORDS: usize = 80;

/// Largest workgroup count of one dimension.
const MAX_GROUPS: u32 = 65535;

/// The shaders (the stems of `kernels/*.cu` and the CPU backend's files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shader {
    /// matmul.wgsl's lane-per-row `matmul` with (tokens a workgroup, weight dtype code):
    /// `override TOK` (8 or 32) and `override DT`, so the block decoder's dtype switch folds.
    Matmul(u32, u32),
    /// matmul.wgsl's coalesced `matmul_co` (64 invocations a row) with (tokens a workgroup,
    /// weight dtype code).
    MatmulCo(u32, u32),
    /// matmul_f16.wgsl (`matmul_co` for f16 weights bound as `array<vec2<f16>>`; only with
    /// the f16 feature) with this many tokens a workgroup.
    MatmulF16(u32),
    /// embedding.wgsl.
    Embedding,
    /// rms_norm.wgsl.
    RmsNorm,
    /// elementwise.wgsl.
    Elementwise,
    /// rope.wgsl.
    Rope,
    /// sampling.wgsl.
    Sampling,
    /// kv_cache.wgsl with this many KV pieces bound.
    KvCache(u32),
    /// paged_attention.wgsl with (KV pieces bound, head_dim, query heads per KV head, KV
    /// dtype code): the shader's `override HEAD_DIM`, `GROUP` and `KV_DT`, so its loops have
    /// constant trip counts and its row decoder's dtype switch folds.
    PagedAttention(u32, u32, u32, u32),
}

const COMMON: &str = include_str!("../shaders/common.wgsl");
const WEIGHTS: &str = include_str!("../shaders/weights.wgsl");
const KV: &str = include_str!("../shaders/kv.wgsl");

/// Every `.wgsl` file (name, text), for validation.
pub const SHADER_FILES: [(&str, &str); 12] = [
    ("common.wgsl", COMMON),
    ("weights.wgsl", WEIGHTS),
    ("kv.wgsl", KV),
    ("matmul.wgsl", include_str!("../shaders/matmul.wgsl")),
    (
        "matmul_f16.wgsl",
        include_str!("../shaders/matmul_f16.wgsl"),
    ),
    ("embedding.wgsl", include_str!("../shaders/embedding.wgsl")),
    ("rms_norm.wgsl", include_str!("../shaders/rms_norm.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../shaders/elementwise.wgsl"),
    ),
    ("rope.wgsl", include_str!("../shaders/rope.wgsl")),
    ("sampling.wgsl", include_str!("../shaders/sampling.wgsl")),
    ("kv_cache.wgsl", include_str!("../shaders/kv_cache.wgsl")),
    (
        "paged_attention.wgsl",
        include_str!("../shaders/paged_attention.wgsl"),
    ),
];

fn file(name: &str) -> &'static str {
    SHADER_FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .expect("embedded shader")
}

/// The bindings of `pieces` KV arena pieces and the accessors kv.wgsl uses: plain words
/// (paged_attention reads), or atomic words (kv_cache writes, whose rows may share a word
/// with the next row's: Q8_0 rows of an odd number of blocks), with `kv_st_bytes` storing
/// only the bytes of `mask`.
pub fn kv_prelude(pieces: u32, atomic: bool) -> String {
    let ty = if atomic {
        "array<atomic<u32>>"
    } else {
        "array<u32>"
    };
    let mut s = String::new();
    for p in 0..pieces {
        s += &format!(
            "@group(0) @binding({}) var<storage, read_write> KV{p}: {ty};\n",
            8 + p
        );
    }
    let cases = |body: &dyn Fn(u32) -> String| -> String {
        (0..pieces)
            .map(|p| format!("        case {p}u: {{ {} }}\n", body(p)))
            .collect()
    };
    let at = |p: u32| format!("KV{p}[off({}u) + w]", 7 + p);
    let ld = if atomic {
        cases(&|p| format!("return atomicLoad(&{});", at(p)))
    } else {
        cases(&|p| format!("return {};", at(p)))
    };
    s += &format!(
        "fn kv_ld(p: u32, w: u32) -> u32 {{\n    switch p {{\n{ld}        default: {{ return 0u; }}\n    }}\n}}\n"
    );
    let st = if atomic {
        cases(&|p| format!("atomicStore(&{}, v);", at(p)))
    } else {
        cases(&|p| format!("{} = v;", at(p)))
    };
    s += &format!(
        "fn kv_st(p: u32, w: u32, v: u32) {{\n    switch p {{\n{st}        default: {{}}\n    }}\n}}\n"
    );
    if atomic {
        let sb = cases(&|p| {
            format!(
                "atomicAnd(&{a}, ~mask); atomicOr(&{a}, v & mask);",
                a = at(p)
            )
        });
        s += &format!(
            "fn kv_st_bytes(p: u32, w: u32, v: u32, mask: u32) {{\n    switch p {{\n{sb}        default: {{}}\n    }}\n}}\n"
        );
    }
    s
}

/// The shader features a module is specialised for (the device's, after masking).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ShaderFeatures {
    /// `SHADER_F16`: halves are read as `f16` (`enable f16;`); arithmetic stays f32.
    pub f16: bool,
    /// `SUBGROUP`: reductions use `subgroupAdd` (matmul_co, rms_norm).
    pub subgroup: bool,
}

impl ShaderFeatures {
    /// Every combination (for validation).
    pub const ALL: [ShaderFeatures; 4] = [
        ShaderFeatures {
            f16: false,
            subgroup: false,
        },
        ShaderFeatures {
            f16: true,
            subgroup: false,
        },
        ShaderFeatures {
            f16: false,
            subgroup: true,
        },
        ShaderFeatures {
            f16: true,
            subgroup: true,
        },
    ];

    /// Whether `name` (`f16`, `subgroup`) is on; unknown names are off.
    pub fn has(&self, name: &str) -> bool {
        match name {
            "f16" => self.f16,
            "subgroup" => self.subgroup,
            _ => false,
        }
    }
}

/// `text` with its `//#if NAME` … [`//#else` …] `//#endif` blocks (not nested) resolved for
/// `f`; dropped lines become empty lines, so line numbers in errors stay the file's.
pub fn specialise(text: &str, f: ShaderFeatures) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut keep, mut cond) = (true, true);
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("//#if ") {
            cond = f.has(name.trim());
            keep = cond;
        } else if t == "//#else" {
            keep = !cond;
        } else if t == "//#endif" {
            keep = true;
        } else if keep {
            out += line;
        }
        out.push('\n');
    }
    out
}

/// The whole WGSL module of a shader, specialised for `f`.
pub fn module_source(shader: Shader, f: ShaderFeatures) -> String {
    let text = module_text(shader);
    let body = specialise(&text, f);
    if f.f16 {
        format!("enable f16;\n{body}")
    } else {
        body
    }
}

fn module_text(shader: Shader) -> String {
    let kv = |p: u32, atomic: bool| format!("{}\n{}", kv_prelude(p, atomic), KV);
    match shader {
        Shader::Matmul(..) | Shader::MatmulCo(..) => {
            format!("{COMMON}\n{WEIGHTS}\n{}", file("matmul.wgsl"))
        }
        Shader::MatmulF16(_) => format!("{COMMON}\n{}", file("matmul_f16.wgsl")),
        Shader::Embedding => format!("{COMMON}\n{WEIGHTS}\n{}", file("embedding.wgsl")),
        Shader::RmsNorm => format!("{COMMON}\n{}", file("rms_norm.wgsl")),
        Shader::Elementwise => format!("{COMMON}\n{}", file("elementwise.wgsl")),
        Shader::Rope => format!("{COMMON}\n{}", file("rope.wgsl")),
        Shader::Sampling => format!("{COMMON}\n{}", file("sampling.wgsl")),
        Shader::KvCache(p) => format!("{COMMON}\n{}\n{}", kv(p, true), file("kv_cache.wgsl")),
        Shader::PagedAttention(p, ..) => {
            format!(
                "{COMMON}\n{}\n{}",
                kv(p, false),
                file("paged_attention.wgsl")
            )
        }
    }
}

/// Every (shader, entry point) the backend dispatches, for validation and warm-up.
pub const ENTRY_POINTS: [(Shader, &str); 16] = [
    (Shader::Matmul(8, 4), "matmul"),
    (Shader::Matmul(32, 10), "matmul"),
    (Shader::MatmulCo(8, 5), "matmul_co"),
    (Shader::MatmulCo(32, 0), "matmul_co"),
    (Shader::Embedding, "embedding"),
    (Shader::RmsNorm, "rms_norm"),
    (Shader::Elementwise, "silu_mul"),
    (Shader::Elementwise, "add_assign"),
    (Shader::Elementwise, "gather_rows"),
    (Shader::Elementwise, "copy_words"),
    (Shader::Rope, "rope"),
    (Shader::Sampling, "argmax_rows"),
    (Shader::Sampling, "top_k_rows"),
    (Shader::KvCache(1), "write_kv"),
    (Shader::KvCache(1), "copy_pages"),
    (Shader::PagedAttention(1, 64, 3, 0), "paged_attention"),
];

/// The (shader, entry point)s that need the f16 feature (compiled only where it is on).
pub const F16_ENTRY_POINTS: [(Shader, &str); 2] = [
    (Shader::MatmulF16(8), "matmul_f16"),
    (Shader::MatmulF16(32), "matmul_f16"),
];

/// Bytes of the ring buffer (dispatch parameters and small uploads of one submission).
pub(crate) const RING_BYTES: u64 = 4 << 20;

/// One reusable device buffer for the host data of a submission: dispatch parameters (bound
/// at storage-offset-aligned windows) and small uploads (copied from it in order with the
/// ops). Regions are bump-allocated and written with `queue.write_buffer`, which lands at
/// the start of the next submission; the bump pointer returns to 0 at every submission (the
/// queue orders a later write after the work already submitted, so it never reaches it).
#[derive(Default)]
pub(crate) struct Ring {
    buf: Option<wgpu::Buffer>,
    used: u64,
}

/// Pipeline cache, the pending encoder, the ring and the readback buffer.
#[derive(Default)]
pub(crate) struct Kernels {
    pipelines: Mutex<HashMap<(Shader, &'static str), wgpu::ComputePipeline>>,
    /// Lock order: `ring` before `pending`.
    pub(crate) pending: Mutex<Option<wgpu::CommandEncoder>>,
    pub(crate) ring: Mutex<Ring>,
    /// The reusable MAP_READ buffer of downloads (grown to powers of two).
    pub(crate) readback: Mutex<Option<wgpu::Buffer>>,
    /// A 4-byte buffer bound for zero-byte arguments.
    dummy: Mutex<Option<wgpu::Buffer>>,
}

fn device_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Device { op, detail }
}

/// One argument of a dispatch: binding number and buffer.
pub(crate) type Arg = (u32, BufRef);

/// Workgroup counts for `groups` groups (2D beyond 65535).
fn grid(groups: u32) -> (u32, u32) {
    if groups <= MAX_GROUPS {
        (groups.max(1), 1)
    } else {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
    }
}

impl Shared {
    pub(crate) fn pipeline_for(
        &self,
        shader: Shader,
        entry: &'static str,
    ) -> Result<wgpu::ComputePipeline> {
        let mut map = self
            .kernels
            .pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = map.get(&(shader, entry)) {
            return Ok(p.clone());
        }
        let dev = &self.gpu.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(entry),
            source: wgpu::ShaderSource::Wgsl(
                module_source(shader, self.gpu.shader_features()).into(),
            ),
        });
        // Override constants: (shader, entry point, constants) is the cache key.
        let constants: Vec<(&str, f64)> = match shader {
            Shader::PagedAttention(_, hd, group, dt) => vec![
                ("HEAD_DIM", hd as f64),
                ("GROUP", group as f64),
                ("KV_DT", dt as f64),
            ],
            Shader::Matmul(tok, dt) | Shader::MatmulCo(tok, dt) => {
                vec![("TOK", tok as f64), ("DT", dt as f64)]
            }
            Shader::MatmulF16(tok) => vec![("TOK", tok as f64)],
            _ => Vec::new(),
        };
        let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                ..Default::default()
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("pipeline", format!("{shader:?}::{entry}: {e}")));
        }
        map.insert((shader, entry), pipeline.clone());
        Ok(pipeline)
    }

    /// Runs `f` on the pending encoder (created when there is none).
    pub(crate) fn record<T>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> T) -> T {
        let mut pending = self
            .kernels
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let enc = pending.get_or_insert_with(|| {
            self.gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("step"),
                })
        });
        f(enc)
    }

    /// Submits the pending encoder (if any); the ring's regions are free again.
    pub(crate) fn submit(&self) {
        let mut ring = self
            .kernels
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.submit_with(&mut ring);
    }

    fn submit_with(&self, ring: &mut Ring) {
        let enc = self
            .kernels
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(enc) = enc {
            self.gpu.queue.submit([enc.finish()]);
        } else if ring.used > 0 {
            self.gpu.queue.submit([]);
        }
        ring.used = 0;
    }

    /// `data` (whole words, at most [`RING_BYTES`]) written into a region of the ring aligned
    /// to `align`, then `f(ring buffer, region offset, pending encoder)` recorded in the same
    /// submission. A full ring submits the pending work first.
    pub(crate) fn with_ring<T>(
        &self,
        data: &[u8],
        align: u64,
        f: impl FnOnce(&wgpu::Buffer, u64, &mut wgpu::CommandEncoder) -> T,
    ) -> T {
        let mut ring = self
            .kernels
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let len = (data.len() as u64).next_multiple_of(4);
        let mut at = ring.used.next_multiple_of(align);
        if at + len > RING_BYTES {
            self.submit_with(&mut ring);
            at = 0;
        }
        let buf = ring
            .buf
            .get_or_insert_with(|| {
                self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("ring"),
                    size: RING_BYTES,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .clone();
        self.gpu.queue.write_buffer(&buf, at, data);
        ring.used = at + len;
        self.record(|enc| f(&buf, at, enc))
    }

    /// Submits and waits for all work, then frees the scratch buffers it used.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.submit();
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| device_err("synchronize", e.to_string()))?;
        let retired =
            std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner));
        for addr in retired {
            self.registry.free(addr);
        }
        Ok(())
    }

    fn dummy(&self) -> wgpu::Buffer {
        let mut d = self
            .kernels
            .dummy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.get_or_insert_with(|| {
            self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("empty argument"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .clone()
    }

    /// Records one dispatch of `entry` with buffers `args` and op parameters `params`, over
    /// `groups` workgroups.
    pub(crate) fn dispatch(
        &self,
        op: &'static str,
        shader: Shader,
        entry: &'static str,
        args: &[Arg],
        params: &[u32],
        groups: u32,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let pipeline = self.pipeline_for(shader, entry)?;
        let align = self.gpu.limits.min_storage_buffer_offset_alignment as u64;
        let max_bind = self.gpu.limits.max_storage_buffer_binding_size;
        let mut header = [0u32; HEADER_WORDS];
        // (binding, buffer, window offset, window size)
        let mut windows: Vec<(u32, wgpu::Buffer, u64, u64)> = Vec::with_capacity(args.len());
        for &(binding, r) in args {
            if r.is_empty() {
                windows.push((binding, self.dummy(), 0, 16));
                continue;
            }
            let res = self.registry.resolve(op, r)?;
            if res.offset % 4 != 0 {
                return Err(BackendError::InvalidArgument {
                    op,
                    detail: format!("buffer {r:?} does not start on a 4-byte boundary"),
                });
            }
            let win = res.offset / align * align;
            let size = (res.offset + res.bytes - win).next_multiple_of(4);
            if size > max_bind {
                return Err(BackendError::InvalidArgument {
                    op,
                    detail: format!(
                        "a binding of {size} bytes is above the adapter's max_storage_buffer_binding_size {max_bind}"
                    ),
                });
            }
            header[binding as usize - 1] = ((res.offset - win) / 4) as u32;
            windows.push((binding, res.buffer, win, size));
        }
        let mut words = header.to_vec();
        words.extend_from_slice(params);
        let pbytes = (words.len() * 4) as u64;
        if pbytes > max_bind || pbytes > RING_BYTES {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("{} parameter words", words.len()),
            });
        }
        let dev = &self.gpu.device;
        let layout = pipeline.get_bind_group_layout(0);
        let (gx, gy) = grid(groups);
        // Parameters in the ring, bound as a window; the bind group and the pass are made
        // while the ring is held, so the region belongs to this submission.
        self.with_ring(bytemuck::cast_slice(&words), align, |ring, at, enc| {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: ring,
                    offset: at,
                    size: wgpu::BufferSize::new(pbytes),
                }),
            }];
            for (binding, buf, offset, size) in &windows {
                entries.push(wgpu::BindGroupEntry {
                    binding: *binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: buf,
                        offset: *offset,
                        size: wgpu::BufferSize::new(*size),
                    }),
                });
            }
            let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
            let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &layout,
                entries: &entries,
            });
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(device_err(op, format!("binding {entry}'s arguments: {e}")));
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_2d_beyond_65535_groups() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(65535), (65535, 1));
        assert_eq!(grid(65536), (65535, 2));
    }

    #[test]
    fn specialise_keeps_the_matching_branch() {
        let text = "a\n//#if subgroup\nb\n//#else\nc\n//#endif\n//#if f16\nd\n//#endif\ne\n";
        let on = ShaderFeatures {
            f16: true,
            subgroup: true,
        };
        assert_eq!(specialise(text, on), "a\n\nb\n\n\n\n\nd\n\ne\n");
        let off = ShaderFeatures::default();
        assert_eq!(specialise(text, off), "a\n\n\n\nc\n\n\n\n\ne\n");
        assert!(module_source(Shader::MatmulF16(8), on).starts_with("enable f16;\n"));
        let fallback = module_source(Shader::MatmulCo(8, 4), off);
        assert!(!fallback.contains("@builtin(subgroup") && !fallback.starts_with("enable"));
        assert!(module_source(Shader::MatmulCo(8, 4), on).contains("subgroupAdd(acc[t])"));
    }

    #[test]
    fn kv_prelude_binds_each_piece_once() {
        let s = kv_prelude(3, false);
        assert_eq!(s.matches("var<storage, read_write> KV").count(), 3);
        assert!(s.contains("@binding(10)") && !s.contains("@binding(11)"));
        assert!(s.contains("case 2u: { return KV2[off(9u) + w]; }"));
        assert!(!s.contains("kv_st_bytes"));
        let a = kv_prelude(2, true);
        assert!(
            a.contains("array<atomic<u32>>") && a.contains("atomicAnd(&KV1[off(8u) + w], ~mask)")
        );
    }
}
