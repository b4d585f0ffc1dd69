//! Element types of tensors and KV pages, including GGUF block-quantized types.

use std::fmt;

/// A tensor element type. Quantized types store blocks of `block_size()`
/// elements in `block_bytes()` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // GGUF's own type names (Q4_K, ...)
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// GGUF Q8_0: blocks of 32, an f16 scale and 32 i8.
    Q8_0,
    /// GGUF Q4_0: blocks of 32, an f16 scale and 16 bytes of nibbles (offset 8).
    Q4_0,
    /// GGUF Q4_1: blocks of 32, f16 scale, f16 min and 16 bytes of nibbles.
    Q4_1,
    /// GGUF Q5_0: blocks of 32, an f16 scale, 32 high bits and 16 bytes of nibbles (offset 16).
    Q5_0,
    /// GGUF Q5_1: blocks of 32, f16 scale, f16 min, 32 high bits and 16 bytes of nibbles.
    Q5_1,
    /// GGUF Q4_K: super-blocks of 256 (8 sub-blocks of 32 with 6-bit scales and mins).
    Q4_K,
    /// GGUF Q5_K: super-blocks of 256, as Q4_K plus a fifth bit per element.
    Q5_K,
    /// GGUF Q6_K: super-blocks of 256 (16 sub-blocks of 16 with i8 scales), 6 bits per element.
    Q6_K,
    /// 32-bit unsigned integer (token ids, positions, slot mappings).
    U32,
}

impl DType {
    /// Every type, in declaration order.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::U32,
    ];

    /// The GGUF tensor types a weight can have (what the CPU backend computes with;
    /// other backends list their own subset in `BackendInfo::weight_dtypes`).
    pub const WEIGHT_TYPES: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ];

    /// The 32-element block types of the first GGUF versions.
    pub const LEGACY_QUANTS: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

    /// Elements per block (1 for plain types).
    pub const fn block_size(self) -> usize {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => 32,
            DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a multiple of
    /// the block size.
    pub const fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        Some(n / self.block_size() * self.block_bytes())
    }

    /// Whether this is a block-quantized type.
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Lower-case name as used on the command line and in GGUF tools.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q4_K => "q4_k",
            DType::Q5_K => "q5_k",
            DType::Q6_K => "q6_k",
            DType::U32 => "u32",
        }
    }

    /// Parses a name written by [`DType::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<DType> {
        Self::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_bytes_of_quantized_types() {
        assert_eq!(DType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(DType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(DType::Q4_0.row_bytes(33), None);
        assert_eq!(DType::F16.row_bytes(3), Some(6));
        assert_eq!(DType::Q4_K.row_bytes(1536), Some(6 * 144));
        assert_eq!(DType::Q6_K.row_bytes(576), None);
        assert_eq!(DType::Q5_0.row_bytes(576), Some(18 * 22));
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("Q5_K"), Some(DType::Q5_K));
        assert_eq!(DType::from_name("q2_k"), None);
    }
}
