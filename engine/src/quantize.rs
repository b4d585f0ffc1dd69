//! `pagoda quantize`: a GGUF file rewritten in another weight type the way llama.cpp's
//! `llama-quantize` does it without an importance matrix.
//!
//! - **Which tensors**: names ending in `weight` with two or more dimensions, except norms
//!   (`*_norm.weight`) and MoE gates (`ffn_gate_inp.weight`); everything else is copied.
//! - **Which type** ([`plan`]): the mix's default type, then llama.cpp's per-tensor rules
//!   (`llama_tensor_get_type`): the output matrix (or the token embedding when the output is
//!   tied to it) gets Q6_K; in the `_M` mixes `attn_v` and `ffn_down` get Q6_K on the layers
//!   `use_more_bits` picks (the first and last eighth, and every third between); fused
//!   `attn_qkv` gets one step more. Rows whose width is not a multiple of the type's block fall
//!   back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 (then F16 if even that does not divide).
//! - **Order**: tensors sorted as llama.cpp's loader sorts them (layer number, then name), so
//!   the layer counters of those rules see the same sequence.
//! - **Blocks**: llama.cpp's reference quantizers ([`pagoda_backend::quant`],
//!   [`pagoda_backend::kquantize`]); an already-quantized tensor is dequantized to f32 first
//!   ([`QuantizePlan::requantized`]), one already in its target type is copied unchanged.
//! - **Metadata**: every key of the input, plus `general.file_type` (llama.cpp's ftype) and
//!   `general.quantization_version` = 2.

use std::cmp::Ordering;
use std::path::Path;

use pagoda_backend::DType;
use pagoda_backend::quant::{dequantize_row, quantize_row};

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufWriter, TensorInfo, Value};

/// A target of `pagoda quantize`: one type for everything, or a llama.cpp mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // llama.cpp's names
pub enum QuantMix {
    /// Q4_K, with Q6_K for half of `attn_v` / `ffn_down` and the output.
    Q4_K_M,
    /// Q5_K, with Q6_K for half of `attn_v` / `ffn_down` and the output.
    Q5_K_M,
    /// Q6_K throughout.
    Q6_K,
    /// Q8_0 throughout.
    Q8_0,
    /// Q4_0, with Q6_K for the output.
    Q4_0,
    /// Q4_1, with Q6_K for the output.
    Q4_1,
}

impl QuantMix {
    /// Every mix, in the order `--help` lists them.
    pub const ALL: [QuantMix; 6] = [
        QuantMix::Q4_K_M,
        QuantMix::Q5_K_M,
        QuantMix::Q6_K,
        QuantMix::Q8_0,
        QuantMix::Q4_0,
        QuantMix::Q4_1,
    ];

    /// llama.cpp's name (`Q4_K_M`).
    pub fn name(self) -> &'static str {
        match self {
            QuantMix::Q4_K_M => "Q4_K_M",
            QuantMix::Q5_K_M => "Q5_K_M",
            QuantMix::Q6_K => "Q6_K",
            QuantMix::Q8_0 => "Q8_0",
            QuantMix::Q4_0 => "Q4_0",
            QuantMix::Q4_1 => "Q4_1",
        }
    }

    /// Parses a name (case-insensitive).
    pub fn from_name(name: &str) -> Option<QuantMix> {
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }

    /// The type of every tensor the rules leave alone.
    pub fn default_type(self) -> DType {
        match self {
            QuantMix::Q4_K_M => DType::Q4_K,
            QuantMix::Q5_K_M => DType::Q5_K,
            QuantMix::Q6_K => DType::Q6_K,
            QuantMix::Q8_0 => DType::Q8_0,
            QuantMix::Q4_0 => DType::Q4_0,
            QuantMix::Q4_1 => DType::Q4_1,
        }
    }

    /// llama.cpp's `llama_ftype` number, written as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            QuantMix::Q4_0 => 2,
            QuantMix::Q4_1 => 3,
            QuantMix::Q8_0 => 7,
            QuantMix::Q4_K_M => 15,
            QuantMix::Q5_K_M => 17,
            QuantMix::Q6_K => 18,
        }
    }
}

/// What happens to one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// Index of the tensor in the input's tensor list.
    pub index: usize,
    /// Tensor name.
    pub name: String,
    /// Shape, `ne0` first.
    pub shape: Vec<usize>,
    /// The input's ggml type name (`Q4_1`).
    pub from: &'static str,
    /// The output type; `None` when the tensor is copied as it is (not a matrix, or
    /// already in its target type).
    pub to: Option<DType>,
    /// Whether the row width forced a fall-back type.
    pub fallback: bool,
}

/// The whole file's plan: tensors in output order.
#[derive(Debug, Clone)]
pub struct QuantizePlan {
    /// The mix.
    pub mix: QuantMix,
    /// Every tensor of the input, in output order.
    pub tensors: Vec<TensorPlan>,
}

impl QuantizePlan {
    /// Tensors that are already block-quantized in the input and get a new type (so they are
    /// dequantized and quantized again, which adds error).
    pub fn requantized(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.to.is_some() && !matches!(t.from, "F32" | "F16" | "BF16"))
            .count()
    }

    /// Output type names and how many tensors have each, most common first (ties by name).
    pub fn census(&self, file: &GgufFile) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for t in &self.tensors {
            let name = match t.to {
                Some(d) => d.name().to_ascii_uppercase(),
                None => file.tensors[t.index].type_name().to_string(),
            };
            *counts.entry(name).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// llama.cpp's loader order: tensors of layer `blk.N.` by N (others, N = -1, first), then by name.
fn loader_order(a: &str, b: &str) -> Ordering {
    fn layer(name: &str) -> i64 {
        name.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    }
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// `use_more_bits` of llama.cpp: the first and last eighth of the layers, and every third
/// layer between.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Whether llama-quantize quantizes a tensor of this name and shape at all.
fn is_quantizable(t: &TensorInfo) -> bool {
    // ggml_n_dims: dimensions up to the last one above 1.
    let n_dims = t.shape.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    t.name.ends_with("weight")
        && n_dims >= 2
        && !t.name.contains("_norm.weight")
        && !t.name.contains("ffn_gate_inp.weight")
}

/// The per-tensor type rules' running state (llama.cpp's `quantize_state_impl`).
struct Counters {
    n_attention_wv: i64,
    i_attention_wv: i64,
    n_layer: i64,
    i_ffn_down: i64,
    has_output: bool,
    /// A 70B-shaped model (80 layers, grouped KV heads) gets Q5_K for its Q4_K `attn_v`.
    is_70b: bool,
}

fn upper(d: DType) -> String {
    d.name().to_ascii_uppercase()
}

/// `llama_tensor_get_type` for the mixes we write: the type of tensor `name` with rows of
/// `nx`, and whether a fall-back was taken.
fn tensor_type(c: &mut Counters, mix: QuantMix, name: &str, nx: usize) -> Result<(DType, bool)> {
    let mut t = mix.default_type();
    let m_mix = matches!(mix, QuantMix::Q4_K_M | QuantMix::Q5_K_M);
    if name == "output.weight" || (!c.has_output && name == "token_embd.weight") {
        if !nx.is_multiple_of(t.block_size()) {
            t = DType::Q8_0;
        } else if t != DType::Q8_0 {
            t = DType::Q6_K;
        }
    } else if name == "token_embd.weight" {
        // Kept at the default type for these mixes.
    } else if name.contains("attn_v.weight") {
        if m_mix && use_more_bits(c.i_attention_wv, c.n_attention_wv) {
            t = DType::Q6_K;
        }
        if c.is_70b && t == DType::Q4_K {
            t = DType::Q5_K;
        }
        c.i_attention_wv += 1;
    } else if name.contains("ffn_down") {
        if m_mix && use_more_bits(c.i_ffn_down, c.n_layer) {
            t = DType::Q6_K;
        }
        c.i_ffn_down += 1;
    } else if name.contains("attn_qkv.weight") {
        match mix {
            QuantMix::Q4_K_M => t = DType::Q5_K,
            QuantMix::Q5_K_M => t = DType::Q6_K,
            _ => {}
        }
    }
    if nx.is_multiple_of(t.block_size()) {
        return Ok((t, false));
    }
    let fb = match t {
        DType::Q4_K => DType::Q5_0,
        DType::Q5_K => DType::Q5_1,
        DType::Q6_K => DType::Q8_0,
        _ => {
            return Err(EngineError::InvalidInput(format!(
                "tensor `{name}`: rows of {nx} are not a multiple of the {} block ({}) and {} has no fall-back type",
                upper(t),
                t.block_size(),
                upper(t)
            )));
        }
    };
    Ok((
        if nx.is_multiple_of(fb.block_size()) {
            fb
        } else {
            DType::F16
        },
        true,
    ))
}

/// Decides every tensor's type (no data is read).
pub fn plan(file: &GgufFile, mix: QuantMix) -> Result<QuantizePlan> {
    let arch = file.get_str("general.architecture").unwrap_or("llama");
    let key = |k: &str| format!("{arch}.{k}");
    let n_layer = file.get_u64(&key("block_count")).unwrap_or(0) as i64;
    let heads = file.get_u64(&key("attention.head_count")).unwrap_or(0);
    let kv_heads = file
        .get_u64(&key("attention.head_count_kv"))
        .unwrap_or(heads);
    let mut order: Vec<usize> = (0..file.tensors.len()).collect();
    order.sort_by(|&a, &b| loader_order(&file.tensors[a].name, &file.tensors[b].name));
    let mut c = Counters {
        n_attention_wv: file
            .tensors
            .iter()
            .filter(|t| t.name.contains("attn_v.weight") || t.name.contains("attn_qkv.weight"))
            .count() as i64,
        i_attention_wv: 0,
        n_layer,
        i_ffn_down: 0,
        has_output: file.tensors.iter().any(|t| t.name == "output.weight"),
        is_70b: n_layer == 80 && heads != kv_heads,
    };
    let mut tensors = Vec::with_capacity(order.len());
    for i in order {
        let t = &file.tensors[i];
        let (to, fallback) = if is_quantizable(t) {
            let (to, fallback) = tensor_type(&mut c, mix, &t.name, t.shape[0])?;
            (Some(to).filter(|&d| t.dtype != Some(d)), fallback)
        } else {
            (None, false)
        };
        tensors.push(TensorPlan {
            index: i,
            name: t.name.clone(),
            shape: t.shape.clone(),
            from: t.type_name(),
            to,
            fallback,
        });
    }
    Ok(QuantizePlan { mix, tensors })
}

/// The bytes of tensor `t` of `file` in `to`: every row dequantized to f32 and quantized
/// again, rows split over `threads` threads.
pub fn convert_tensor(
    file: &GgufFile,
    t: &TensorInfo,
    to: DType,
    threads: usize,
) -> Result<Vec<u8>> {
    let from = t.dtype.ok_or_else(|| {
        EngineError::InvalidInput(format!(
            "tensor `{}`: cannot dequantize {} to requantize it",
            t.name,
            t.type_name()
        ))
    })?;
    let nx = t.shape[0];
    let rows = t.num_elements() / nx.max(1);
    let bad = |what: String| EngineError::InvalidInput(format!("tensor `{}`: {what}", t.name));
    let in_row = from
        .row_bytes(nx)
        .ok_or_else(|| bad(format!("rows of {nx} are not whole {from} blocks")))?;
    let out_row = to
        .row_bytes(nx)
        .ok_or_else(|| bad(format!("rows of {nx} are not whole {to} blocks")))?;
    let src = file.tensor_data(t);
    let mut out = vec![0u8; rows * out_row];
    if rows == 0 || nx == 0 {
        return Ok(out);
    }
    let per = rows.div_ceil(threads.max(1));
    std::thread::scope(|s| -> Result<()> {
        let jobs: Vec<_> = out
            .chunks_mut(per * out_row)
            .enumerate()
            .map(|(c, dst)| {
                let src = &src[c * per * in_row..];
                s.spawn(move || -> Result<()> {
                    let mut f = vec![0f32; nx];
                    for (r, o) in dst.chunks_exact_mut(out_row).enumerate() {
                        dequantize_row(from, &src[r * in_row..(r + 1) * in_row], &mut f)?;
                        quantize_row(to, &f, o)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for j in jobs {
            j.join().expect("quantize worker panicked")?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// What [`quantize`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// The plan it followed.
    pub plan: QuantizePlan,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
}

/// Writes `file` quantized to `mix` at `out`. `progress(done, total, tensor)` is called
/// before each tensor.
pub fn quantize(
    file: &GgufFile,
    mix: QuantMix,
    out: &Path,
    threads: usize,
    mut progress: impl FnMut(usize, usize, &TensorPlan),
) -> Result<QuantizeReport> {
    let plan = plan(file, mix)?;
    let mut w = GgufWriter::new();
    for (k, v) in &file.metadata {
        w.metadata(k.clone(), v.clone());
    }
    w.metadata("general.quantization_version", Value::U32(2));
    w.metadata("general.file_type", Value::U32(mix.file_type()));
    if !file.metadata.contains_key("general.alignment") {
        w.alignment(file.alignment as u32);
    }
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for (i, tp) in plan.tensors.iter().enumerate() {
        progress(i, plan.tensors.len(), tp);
        let t = &file.tensors[tp.index];
        bytes_in += t.bytes as u64;
        match tp.to {
            Some(to) => {
                let bytes = convert_tensor(file, t, to, threads)?;
                bytes_out += bytes.len() as u64;
                w.tensor(t.name.clone(), &t.shape, to, bytes);
            }
            None => {
                let bytes = file.tensor_data(t).to_vec();
                bytes_out += bytes.len() as u64;
                w.tensor_raw(
                    t.name.clone(),
                    &t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
                    t.ggml_type,
                    bytes,
                );
            }
        }
    }
    w.write_to(out)?;
    Ok(QuantizeReport {
        plan,
        bytes_in,
        bytes_out,
    })
}

#[cfg(test)]
mod tests;
