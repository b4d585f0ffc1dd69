//! A small GGUF v3 writer, for tests and synthetic models.
//!
//! ```no_run
//! use pagoda::gguf::{GgufWriter, Value};
//! use pagoda_backend::DType;
//!
//! let bytes = GgufWriter::new()
//!     .metadata("general.architecture", "llama")
//!     .metadata("llama.block_count", 2u32)
//!     .metadata("tokenizer.ggml.tokens", vec!["a", "b"])
//!     .alignment(64)
//!     .tensor("norm.weight", &[4], DType::F32, vec![0u8; 16])
//!     .to_bytes()?;
//! # Ok::<(), pagoda::gguf::GgufError>(())
//! ```
//!
//! Layout: header (magic, version, tensor count, metadata count), metadata in
//! insertion order, tensor infos in insertion order, zero padding up to the
//! alignment, then each tensor's data, each padded with zeros to the
//! alignment (as ggml does, the file ends on an aligned offset). The
//! alignment is `general.alignment` when set (see [`GgufWriter::alignment`]),
//! else [`DEFAULT_ALIGNMENT`].
//!
//! Everything written through the checked methods reads back with
//! [`super::GgufFile`]; [`GgufWriter::version`] and
//! [`GgufWriter::tensor_raw`] exist to write files the reader must refuse.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pagoda_backend::DType;

use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufError, Value, ggml_type_id};

/// The type of a tensor being written.
#[derive(Debug, Clone, Copy)]
enum TensorType {
    /// Checked: shape and byte count must match.
    Known(DType),
    /// Any ggml type id, unchecked.
    Raw(u32),
}

/// A tensor's bytes: given now, or written later into the file's buffer
/// ([`GgufWriter::to_shared_bytes`]; zeros through the other outputs).
#[derive(Debug, Clone)]
enum TensorData {
    Bytes(Vec<u8>),
    Deferred(usize),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::Bytes(b) => b.len(),
            TensorData::Deferred(n) => *n,
        }
    }
}

#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    shape: Vec<u64>,
    ty: TensorType,
    data: TensorData,
}

/// Builds a GGUF v3 file in memory and writes it out.
///
/// Methods take `&mut self` and return it, so calls chain on a temporary
/// (`GgufWriter::new().metadata(..).to_bytes()`) or on a binding in a loop.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// The name writer errors carry when no output file is involved.
const MEMORY_PATH: &str = "<gguf writer>";

fn align_up(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// GGUF value type id of a value.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// Checks that every array (nested ones included) holds one element type.
fn check_homogeneous(v: &Value) -> Result<(), String> {
    if let Value::Array(items) = v {
        if let Some(first) = items.first() {
            let t = value_type_id(first);
            if let Some((i, bad)) = items
                .iter()
                .enumerate()
                .find(|(_, x)| value_type_id(x) != t)
            {
                return Err(format!(
                    "array elements must share one type: element 0 is {}, element {i} is {}",
                    first.type_name(),
                    bad.type_name()
                ));
            }
        }
        for item in items {
            check_homogeneous(item)?;
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (not its type id).
fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array keeps no element type; it is written as u8.
            let elem = items.first().map_or(0, value_type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file: no metadata, no tensors.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version number written in the header (default 3). The layout
    /// is always v2/v3's, so any other number makes a file readers refuse:
    /// this is for tests.
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets a metadata value. Keys keep their first insertion position; setting
    /// a key again replaces its value. Arrays must hold one element type
    /// (checked when the file is written).
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Sets `general.alignment` (a u32; must be a power of two, checked when the
    /// file is written): the alignment of the data section and every tensor.
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.metadata("general.alignment", Value::U32(alignment))
    }

    /// Adds a tensor. `shape` is `ne0` (the contiguous dimension) first, 1 to 4
    /// dimensions; `bytes` is its data in `dtype`'s layout and must be exactly
    /// the tensor's size (checked when the file is written).
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        bytes: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
            ty: TensorType::Known(dtype),
            data: TensorData::Bytes(bytes.into()),
        });
        self
    }

    /// Adds a tensor whose bytes are written later, straight into the file's
    /// buffer, by the `fill` of [`GgufWriter::to_shared_bytes`] (so a large
    /// model is never held twice). [`GgufWriter::to_bytes`] and
    /// [`GgufWriter::write_to`] write zeros for it.
    pub fn tensor_deferred(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
    ) -> &mut Self {
        // A shape whose size overflows gets 0 bytes, which validation refuses.
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.block_bytes()))
            .unwrap_or(0);
        self.tensors.push(PendingTensor {
            name: name.into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
            ty: TensorType::Known(dtype),
            data: TensorData::Deferred(bytes),
        });
        self
    }

    /// Adds a tensor with any ggml type id, any shape and any bytes, none of
    /// them checked (tensor names must still be unique): for writing files
    /// with types or shapes the reader must refuse.
    pub fn tensor_raw(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ggml_type: u32,
        bytes: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            shape: shape.to_vec(),
            ty: TensorType::Raw(ggml_type),
            data: TensorData::Bytes(bytes.into()),
        });
        self
    }

    /// The alignment the file will be written with.
    pub fn data_alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Checks everything before a byte is written.
    fn validate(&self, path: &Path) -> Result<(), GgufError> {
        let key_err = |key: &str, what: String| GgufError::Key {
            path: path.to_path_buf(),
            key: key.into(),
            what,
        };
        for (key, value) in &self.metadata {
            check_homogeneous(value).map_err(|what| key_err(key, what))?;
            if key == "general.alignment" {
                match value.as_u64() {
                    Some(a) if a.is_power_of_two() && a <= u32::MAX as u64 => {}
                    _ => return Err(key_err(key, format!("must be a power of two, got {value}"))),
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            let terr = |what: String| GgufError::Tensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                what,
            };
            if !names.insert(t.name.as_str()) {
                return Err(terr("added twice".into()));
            }
            let TensorType::Known(dtype) = t.ty else {
                continue;
            };
            if ggml_type_id(dtype).is_none() {
                return Err(terr(format!("{dtype} is not a GGUF tensor type")));
            }
            if t.shape.is_empty() || t.shape.len() > 4 {
                return Err(terr(format!(
                    "shape {:?} has {} dimensions (1 to 4 allowed)",
                    t.shape,
                    t.shape.len()
                )));
            }
            if t.shape[0] % dtype.block_size() as u64 != 0 {
                return Err(terr(format!(
                    "first dimension {} is not a multiple of the {dtype} block size {}",
                    t.shape[0],
                    dtype.block_size()
                )));
            }
            let expected = t
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .and_then(|n| {
                    (n / dtype.block_size() as u64).checked_mul(dtype.block_bytes() as u64)
                });
            if expected != Some(t.data.len() as u64) {
                return Err(terr(format!(
                    "shape {:?} of {dtype} needs {} bytes, got {}",
                    t.shape,
                    expected.map_or("too many".to_string(), |e| e.to_string()),
                    t.data.len()
                )));
            }
        }
        Ok(())
    }

    /// The header: everything before the data section, padding included.
    fn header(&self) -> Vec<u8> {
        let align = self.data_alignment();
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value_type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in &t.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            let type_id = match t.ty {
                TensorType::Known(d) => ggml_type_id(d).unwrap_or(u32::MAX),
                TensorType::Raw(id) => id,
            };
            out.extend_from_slice(&type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.data.len() as u64, align);
        }
        let padded = align_up(out.len() as u64, align) as usize;
        out.resize(padded, 0);
        out
    }

    fn write_all(&self, w: &mut impl Write) -> std::io::Result<()> {
        let align = self.data_alignment();
        w.write_all(&self.header())?;
        let zeros = [0u8; 4096];
        for t in &self.tensors {
            match &t.data {
                TensorData::Bytes(b) => w.write_all(b)?,
                TensorData::Deferred(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(zeros.len());
                        w.write_all(&zeros[..k])?;
                        left -= k;
                    }
                }
            }
            let mut pad = align_up(t.data.len() as u64, align) - t.data.len() as u64;
            while pad > 0 {
                let n = pad.min(zeros.len() as u64);
                w.write_all(&zeros[..n as usize])?;
                pad -= n;
            }
        }
        Ok(())
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let path = Path::new(MEMORY_PATH);
        self.validate(path)?;
        let mut out = Vec::new();
        self.write_all(&mut out).map_err(|source| GgufError::Io {
            path: PathBuf::from(MEMORY_PATH),
            source,
        })?;
        Ok(out)
    }

    /// Size of the whole file in bytes (header, data and padding).
    pub fn file_bytes(&self) -> u64 {
        let align = self.data_alignment();
        let data: u64 = self
            .tensors
            .iter()
            .map(|t| align_up(t.data.len() as u64, align))
            .sum();
        self.header().len() as u64 + data
    }

    /// The whole file in one buffer allocated once. `fill` gets each tensor's
    /// data, in insertion order (given bytes already copied, deferred ones
    /// zeroed), to write the deferred ones in place; then the buffer is
    /// shared, ready for [`super::GgufFile::from_bytes`] without a copy.
    pub fn to_shared_bytes<E: From<GgufError>>(
        &self,
        fill: impl FnOnce(Vec<&mut [u8]>) -> Result<(), E>,
    ) -> Result<Arc<[u8]>, E> {
        let path = Path::new(MEMORY_PATH);
        self.validate(path)?;
        let align = self.data_alignment();
        let header = self.header();
        let total = usize::try_from(self.file_bytes()).map_err(|_| GgufError::Malformed {
            path: path.to_path_buf(),
            offset: 0,
            what: "file larger than the address space".into(),
        })?;
        // One zeroed allocation of the final size (fresh pages from the OS
        // for a large one, so nothing is written twice), filled in place.
        // SAFETY: the slice is zero-initialised, and all-zero bytes are valid u8.
        let mut buf: Arc<[u8]> = unsafe { Arc::<[u8]>::new_zeroed_slice(total).assume_init() };
        let bytes = Arc::get_mut(&mut buf).ok_or_else(|| GgufError::Malformed {
            path: path.to_path_buf(),
            offset: 0,
            what: "a fresh buffer is shared (cannot happen)".into(),
        })?;
        let (head, mut rest) = bytes.split_at_mut(header.len());
        head.copy_from_slice(&header);
        let mut slices = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let padded = align_up(t.data.len() as u64, align) as usize;
            let (this, tail) = std::mem::take(&mut rest).split_at_mut(padded);
            let (data, _pad) = this.split_at_mut(t.data.len());
            if let TensorData::Bytes(b) = &t.data {
                data.copy_from_slice(b);
            }
            slices.push(data);
            rest = tail;
        }
        fill(slices)?;
        Ok(buf)
    }

    /// Writes the file to `path` (created or truncated). Nothing is created
    /// when validation fails.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        self.validate(path)?;
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut w = BufWriter::new(file);
        self.write_all(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
        Ok(())
    }
}
