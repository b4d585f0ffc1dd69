//! GGUF v2/v3 reader: header, every metadata value type, tensor infos,
//! alignment, and a memory map of the data section.
//!
//! Every read is bounds-checked. A truncated, corrupted or non-GGUF file
//! gives a [`GgufError`] naming the file, the byte offset and what was being
//! read; nothing here panics on bad input.
//!
//! A [`GgufFile`] is usually a memory map of a file on disk
//! ([`GgufFile::open`]); [`GgufFile::from_bytes`] parses bytes already in
//! memory (synthetic models, tests). [`writer::GgufWriter`] writes GGUF v3.

mod block_layout;
#[cfg(test)]
mod tests;
mod value;
pub mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use pagoda_backend::DType;

pub use block_layout::ggml_block_layout;
pub use value::Value;
pub use writer::GgufWriter;

/// The magic bytes at offset 0.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Default alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A malformed or unsupported GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Structural problem at a byte offset.
    #[error("{path}: invalid GGUF at byte offset {offset}: {what}")]
    Malformed {
        /// File.
        path: PathBuf,
        /// Offset where reading failed.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("{path}: metadata key `{key}`: {what}")]
    Key {
        /// File.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        what: String,
    },
    /// A tensor is missing, malformed, has a type the engine cannot use,
    /// or the wrong shape.
    #[error("{path}: tensor `{name}`: {what}")]
    Tensor {
        /// File.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What is wrong.
        what: String,
    },
}

/// Name of a ggml tensor type id, for error messages.
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// Maps a ggml type id to a [`DType`] this engine computes with.
pub fn dtype_from_ggml(id: u32) -> Option<DType> {
    Some(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        30 => DType::BF16,
        _ => return None,
    })
}

/// The ggml type id of a [`DType`] (the inverse of [`dtype_from_ggml`]);
/// `None` for [`DType::U32`], which GGUF has no type for.
pub fn ggml_type_id(dtype: DType) -> Option<u32> {
    Some(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q4_K => 12,
        DType::Q5_K => 13,
        DType::Q6_K => 14,
        DType::BF16 => 30,
        DType::U32 => return None,
    })
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, `ne0` (the contiguous one) first.
    pub shape: Vec<usize>,
    /// The ggml type id as stored in the file (any value: the reader
    /// accepts every type, the loader decides what it can use).
    pub ggml_type: u32,
    /// The engine's element type for `ggml_type`, or `None` when the engine
    /// has none ([`dtype_from_ggml`]).
    pub dtype: Option<DType>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes; 0 when the type's block layout is unknown
    /// ([`TensorInfo::size_known`] is then false).
    pub bytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The ggml type's name (`"Q4_K"`; `"unknown"` for an undefined id).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }

    /// Whether [`TensorInfo::bytes`] is the real size (the ggml type's
    /// block layout is known).
    pub fn size_known(&self) -> bool {
        ggml_block_layout(self.ggml_type).is_some()
    }

    /// The engine type, or an error naming the tensor and its ggml type
    /// when the engine has none (`path` names the file in the error).
    pub fn require_dtype(&self, path: &Path) -> Result<DType, GgufError> {
        self.dtype.ok_or_else(|| GgufError::Tensor {
            path: path.to_path_buf(),
            name: self.name.clone(),
            what: format!(
                "tensor type {} ({}) is not supported by Pagoda (supported: {})",
                self.ggml_type,
                self.type_name(),
                supported_type_names()
            ),
        })
    }
}

/// The ggml types [`dtype_from_ggml`] maps, for error messages
/// (`"F32, F16, ..."`, in id order).
fn supported_type_names() -> String {
    let names: Vec<&str> = (0..=u8::MAX as u32)
        .filter(|&id| dtype_from_ggml(id).is_some())
        .map(ggml_type_name)
        .collect();
    names.join(", ")
}

/// Where a [`GgufFile`]'s bytes live: a read-only memory map of the file
/// ([`GgufFile::open`]) or a shared buffer in memory
/// ([`GgufFile::from_bytes`]). Both hold the whole file, header included.
enum Storage {
    Mmap(Mmap),
    Owned(Arc<[u8]>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(b) => b,
        }
    }
}

/// An open GGUF file: parsed header and the bytes of the whole file (a
/// memory map, or a buffer for [`GgufFile::from_bytes`]).
pub struct GgufFile {
    path: PathBuf,
    data: Storage,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Alignment of the data section and of every tensor.
    pub alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("num_metadata", &self.metadata.len())
            .field("num_tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

const MAX_ARRAY_DEPTH: usize = 8;
/// Most elements reserved up front for an array or the tensor infos; larger
/// counts grow as they parse, so a corrupted count cannot reserve gigabytes.
const MAX_PREALLOC: u64 = 1 << 16;

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.err(format!(
                    "file truncated: need {n} bytes for {what}, {} left",
                    self.bytes.len().saturating_sub(self.pos)
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            self.pos = start;
            return Err(self.err(format!(
                "{what}: string length {len} exceeds the {} bytes left",
                self.remaining()
            )));
        }
        let s = self.take(len as usize, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, type_id: u32, what: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1")));
                }
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let type_pos = self.pos;
                let elem_type = self.u32(what)?;
                let count_pos = self.pos;
                let count = self.u64(what)?;
                let min_size = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        self.pos = type_pos;
                        return Err(self.err(format!("{what}: unknown array element type {t}")));
                    }
                };
                if count.saturating_mul(min_size) > self.remaining() as u64 {
                    self.pos = count_pos;
                    return Err(self.err(format!(
                        "{what}: array of {count} elements cannot fit in the {} bytes left",
                        self.remaining()
                    )));
                }
                let mut items = Vec::with_capacity(count.min(MAX_PREALLOC) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => {
                self.pos -= 4;
                return Err(self.err(format!("{what}: unknown value type {t}")));
            }
        })
    }
}

impl GgufFile {
    /// Opens, maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // A directory or a device opens, but cannot be mapped ("No such
        // device"): name what it is instead.
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            let what = if meta.is_dir() {
                "is a directory, not a GGUF file"
            } else {
                "is not a regular file (a GGUF model is one)"
            };
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                what,
            )));
        }
        // The file is mapped read-only; Pagoda never writes to model files,
        // and every access below is bounds-checked against the map's length.
        // Another process truncating the file while it is mapped is outside
        // what any mmap-based loader can guard against.
        // SAFETY: read-only map of a file we opened; accesses are bounds-checked.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Storage::Mmap(mmap))
    }

    /// Parses a whole GGUF file already in memory. `path` is only used to
    /// name the file in errors and by [`GgufFile::path`]. Passing an
    /// `Arc<[u8]>` shares the buffer without copying it.
    pub fn from_bytes(
        path: impl Into<PathBuf>,
        bytes: impl Into<Arc<[u8]>>,
    ) -> Result<GgufFile, GgufError> {
        Self::parse(path.into(), Storage::Owned(bytes.into()))
    }

    fn parse(path: PathBuf, data: Storage) -> Result<GgufFile, GgufError> {
        let (version, metadata, tensors, data_offset, alignment) = {
            let mut c = Cursor {
                bytes: &data,
                pos: 0,
                path: &path,
            };
            let magic = c.array::<4>("magic")?;
            if &magic != GGUF_MAGIC {
                c.pos = 0;
                return Err(c.err(format!(
                    "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
                    magic
                )));
            }
            let version = c.u32("version")?;
            if version != 2 && version != 3 {
                c.pos = 4;
                let hint = if (1..=3).contains(&version.swap_bytes()) {
                    " (a big-endian GGUF file?)"
                } else {
                    ""
                };
                return Err(c.err(format!(
                    "unsupported GGUF version {version}{hint} (supported: 2, 3)"
                )));
            }
            let tensor_count = c.u64("tensor count")?;
            let kv_count = c.u64("metadata count")?;
            // Each KV takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8+4+4+8.
            if kv_count.saturating_mul(13) > c.remaining() as u64 {
                c.pos = 16;
                return Err(c.err(format!("metadata count {kv_count} cannot fit in the file")));
            }
            if tensor_count.saturating_mul(24) > c.remaining() as u64 {
                c.pos = 8;
                return Err(c.err(format!(
                    "tensor count {tensor_count} cannot fit in the file"
                )));
            }
            let mut metadata = BTreeMap::new();
            for i in 0..kv_count {
                let key_at = c.pos;
                let key = c.string(&format!("metadata key #{i}"))?;
                if metadata.contains_key(&key) {
                    c.pos = key_at;
                    return Err(c.err(format!("duplicate metadata key `{key}`")));
                }
                let type_id = c.u32(&format!("type of `{key}`"))?;
                let value = c.value(type_id, &format!("value of `{key}`"), 0)?;
                metadata.insert(key, value);
            }
            let alignment = match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(v) => match v.as_u64() {
                    Some(a) if a > 0 && a.is_power_of_two() => a,
                    _ => {
                        return Err(GgufError::Key {
                            path: path.clone(),
                            key: "general.alignment".into(),
                            what: format!("must be a power of two, got {v}"),
                        });
                    }
                },
            };
            // The count was checked against the bytes left, but a corrupted
            // count can still be millions: let the vector grow as infos parse.
            let mut raw = Vec::with_capacity(tensor_count.min(MAX_PREALLOC) as usize);
            let mut names = std::collections::HashSet::new();
            for i in 0..tensor_count {
                let at = c.pos as u64;
                let name = c.string(&format!("name of tensor #{i}"))?;
                if !names.insert(name.clone()) {
                    c.pos = at as usize;
                    return Err(c.err(format!("duplicate tensor name `{name}`")));
                }
                let n_dims = c.u32(&format!("dimension count of `{name}`"))?;
                if n_dims == 0 || n_dims > 4 {
                    c.pos -= 4;
                    return Err(c.err(format!(
                        "tensor `{name}` has {n_dims} dimensions (1 to 4 allowed)"
                    )));
                }
                let mut shape = Vec::with_capacity(n_dims as usize);
                for d in 0..n_dims {
                    let ne = c.u64(&format!("dimension {d} of `{name}`"))?;
                    shape.push(ne);
                }
                let type_id = c.u32(&format!("type of `{name}`"))?;
                let offset = c.u64(&format!("offset of `{name}`"))?;
                raw.push((at, name, shape, type_id, offset));
            }
            let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
            let file_len = data.len() as u64;
            let mut tensors = Vec::with_capacity(raw.len());
            for (at, name, shape, type_id, offset) in raw {
                let terr = |what: String| GgufError::Tensor {
                    path: path.clone(),
                    name: name.clone(),
                    what,
                };
                // Every type is read; the loader refuses what it cannot use.
                let dtype = dtype_from_ggml(type_id);
                let mut n: u64 = 1;
                for &d in &shape {
                    n = n
                        .checked_mul(d)
                        .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
                }
                // Not `dtype.row_bytes(row)`: its byte count can overflow
                // for a corrupted (huge) first dimension. A type whose
                // layout is unknown has no size: 0 bytes, and its data is
                // never read (the loader refuses the type first).
                let bytes = match ggml_block_layout(type_id) {
                    None => 0,
                    Some((block, block_bytes)) => {
                        let row = shape[0];
                        if row % block as u64 != 0 {
                            return Err(terr(format!(
                                "first dimension {row} is not a multiple of the {} block size {block} (tensor info at byte offset {at})",
                                ggml_type_name(type_id)
                            )));
                        }
                        (n / block as u64)
                            .checked_mul(block_bytes as u64)
                            .ok_or_else(|| terr("size overflows".into()))?
                    }
                };
                if offset % alignment != 0 {
                    return Err(terr(format!(
                        "data offset {offset} is not aligned to {alignment}"
                    )));
                }
                let abs = data_offset
                    .checked_add(offset)
                    .filter(|a| a.checked_add(bytes).is_some_and(|end| end <= file_len))
                    .ok_or_else(|| {
                        terr(format!(
                            "data [{offset}, +{bytes}) past the end of the file (data section at {data_offset}, file is {file_len} bytes): truncated?"
                        ))
                    })?;
                tensors.push(TensorInfo {
                    name,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                    ggml_type: type_id,
                    dtype,
                    offset: abs,
                    bytes: bytes as usize,
                });
            }
            check_no_overlap(&path, &tensors, data_offset)?;
            (version, metadata, tensors, data_offset, alignment)
        };
        Ok(GgufFile {
            path,
            data,
            version,
            metadata,
            tensors,
            data_offset,
            alignment,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn key_err(&self, key: &str, what: impl Into<String>) -> GgufError {
        GgufError::Key {
            path: self.path.clone(),
            key: key.into(),
            what: what.into(),
        }
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| self.key_err(key, "missing"))
    }

    /// A required unsigned integer value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            self.key_err(
                key,
                format!("expected an unsigned integer, found {}", v.type_name()),
            )
        })
    }

    /// A required float value (any numeric type).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.key_err(key, format!("expected a number, found {}", v.type_name())))
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.key_err(key, format!("expected a string, found {}", v.type_name())))
    }

    /// A required array value.
    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.key_err(key, format!("expected an array, found {}", v.type_name())))
    }

    /// An optional bool value (wrong type is an error).
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.key_err(key, format!("expected a bool, found {}", v.type_name()))
            }),
        }
    }

    /// A tensor's info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes (a slice of the memory map).
    ///
    /// `info` should come from this file; for an info from elsewhere whose
    /// range is outside the file, the slice is empty.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        // Bounds of this file's infos were checked when it was parsed.
        let start = info.offset as usize;
        start
            .checked_add(info.bytes)
            .and_then(|end| self.data.get(start..end))
            .unwrap_or(&[])
    }

    /// Total bytes of all tensor data (tensors of an unknown layout count 0).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes as u64).sum()
    }

    /// How many tensors of each ggml type the file holds, as
    /// `(type name, count)` in ascending type-id order (an undefined id is
    /// named `"type N"`).
    pub fn type_counts(&self) -> Vec<(String, usize)> {
        let mut counts = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(t.ggml_type).or_insert(0usize) += 1;
        }
        counts
            .into_iter()
            .map(|(id, n)| {
                let name = match ggml_type_name(id) {
                    "unknown" => format!("type {id}"),
                    known => known.to_string(),
                };
                (name, n)
            })
            .collect()
    }
}

/// Refuses tensors whose data ranges overlap (a corrupted or crafted file:
/// one tensor's weights would be read as another's), naming both. Empty
/// tensors, and those of a type whose size is unknown (0 bytes), overlap
/// nothing.
fn check_no_overlap(
    path: &Path,
    tensors: &[TensorInfo],
    data_offset: u64,
) -> Result<(), GgufError> {
    let end = |t: &TensorInfo| t.offset + t.bytes as u64;
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.bytes > 0).collect();
    order.sort_by_key(|t| (t.offset, t.bytes));
    // Sorted by start, a range overlaps an earlier one exactly when it starts
    // before the furthest end so far.
    let mut furthest: Option<&TensorInfo> = None;
    for t in order {
        if let Some(f) = furthest
            && t.offset < end(f)
        {
            let range =
                |t: &TensorInfo| format!("[{}, {})", t.offset - data_offset, end(t) - data_offset);
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                what: format!(
                    "data {} overlaps that of tensor `{}` {} (offsets in the data section)",
                    range(t),
                    f.name,
                    range(f)
                ),
            });
        }
        if furthest.is_none_or(|f| end(t) > end(f)) {
            furthest = Some(t);
        }
    }
    Ok(())
}
