//! Reader and writer tests on synthetic files made with [`GgufWriter`].

use std::panic::{AssertUnwindSafe, catch_unwind};

use pagoda_backend::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

const NAME: &str = "synthetic-test.gguf";

fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(NAME, bytes)
}

fn parse_ok(bytes: &[u8]) -> GgufFile {
    match parse(bytes) {
        Ok(f) => f,
        Err(e) => panic!("expected a valid file, got: {e}"),
    }
}

/// The error message of a file the reader must refuse; it always names the file.
fn parse_err(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(NAME), "message does not name the file: {msg}");
            msg
        }
    }
}

fn bytes_of(w: &GgufWriter) -> Vec<u8> {
    match w.to_bytes() {
        Ok(b) => b,
        Err(e) => panic!("writer refused: {e}"),
    }
}

/// Position of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:?} not found"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the type id of the first metadata key in a file whose first
/// key is `key`: 24 bytes of header, the key's u64 length and bytes.
fn first_type_at(key: &str) -> usize {
    24 + 8 + key.len()
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// A file with a bit of everything: metadata of several types and three
/// tensors of different types and sizes.
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("llama.block_count", 2u32)
        .metadata("llama.rope.freq_base", 10000.0f32)
        .metadata("tokenizer.ggml.tokens", vec!["<s>", "a", "bc", "ü"])
        .metadata("tokenizer.ggml.token_type", vec![3i32, 1, 1, 1])
        .metadata("tokenizer.ggml.add_bos_token", true)
        .metadata("x.nested", vec![vec![1u64, 2], vec![], vec![3]]);
    let f32_data: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    w.tensor("a.weight", &[3, 2], DType::F32, f32_data);
    let mut q8 = Vec::new();
    for b in 0..2u8 {
        q8.extend_from_slice(&f16_bytes(0.25));
        q8.extend((0..32u8).map(|j| j.wrapping_mul(7).wrapping_add(b)));
    }
    w.tensor("b.weight", &[64], DType::Q8_0, q8);
    let mut q41 = Vec::new();
    q41.extend_from_slice(&f16_bytes(0.5));
    q41.extend_from_slice(&f16_bytes(-1.0));
    q41.extend((0..16u8).map(|j| j * 17));
    w.tensor("c.weight", &[32, 1], DType::Q4_1, q41);
    w
}

// ---------------------------------------------------------------- round trips

#[test]
fn every_value_type_round_trips() {
    let values = vec![
        ("t.u8", Value::U8(0xAB)),
        ("t.u8max", Value::U8(u8::MAX)),
        ("t.i8", Value::I8(i8::MIN)),
        ("t.u16", Value::U16(0xBEEF)),
        ("t.i16", Value::I16(-12345)),
        ("t.u32", Value::U32(u32::MAX)),
        ("t.i32", Value::I32(i32::MIN)),
        ("t.f32", Value::F32(-1.5e-7)),
        ("t.f32inf", Value::F32(f32::INFINITY)),
        ("t.bool_t", Value::Bool(true)),
        ("t.bool_f", Value::Bool(false)),
        ("t.str", Value::String("héllo, 世界 \u{1F600}".into())),
        ("t.str_empty", Value::String(String::new())),
        ("t.str_nul", Value::String("a\0b".into())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.f64neg0", Value::F64(-0.0)),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &values {
        w.metadata(*k, v.clone());
    }
    let f = parse_ok(&bytes_of(&w));
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata.len(), values.len());
    assert!(f.tensors.is_empty());
    for (k, v) in &values {
        assert_eq!(f.get(k), Some(v), "{k}");
        assert_eq!(f.get(k).map(Value::type_name), Some(v.type_name()), "{k}");
    }
    // -0.0 == 0.0, so check the sign bit too.
    assert!(matches!(f.get("t.f64neg0"), Some(Value::F64(x)) if x.is_sign_negative()));
}

#[test]
fn nan_bits_round_trip() {
    let nan32 = f32::from_bits(0x7FC0_1234);
    let nan64 = f64::from_bits(0xFFF8_0000_0000_0042);
    let f = parse_ok(&bytes_of(
        GgufWriter::new()
            .metadata("n32", nan32)
            .metadata("n64", nan64),
    ));
    assert!(matches!(f.get("n32"), Some(Value::F32(x)) if x.to_bits() == 0x7FC0_1234));
    assert!(matches!(f.get("n64"), Some(Value::F64(x)) if x.to_bits() == nan64.to_bits()));
}

#[test]
fn arrays_of_every_type_round_trip() {
    let arrays = vec![
        ("a.u8", Value::from(vec![0u8, 1, 255])),
        ("a.i8", Value::from(vec![-128i8, 0, 127])),
        ("a.u16", Value::from(vec![0u16, 65535])),
        ("a.i16", Value::from(vec![-32768i16, 32767])),
        ("a.u32", Value::from(vec![7u32; 100])),
        ("a.i32", Value::from(vec![-1i32, 2, -3])),
        ("a.f32", Value::from(vec![0.5f32, -2.25, 1e30])),
        ("a.bool", Value::from(vec![true, false, true])),
        ("a.str", Value::from(vec!["", "x", "yz", "日本語"])),
        ("a.u64", Value::from(vec![u64::MAX, 0])),
        ("a.i64", Value::from(vec![i64::MIN, i64::MAX])),
        ("a.f64", Value::from(vec![1e-300f64, -1e300])),
        ("a.empty", Value::Array(vec![])),
        (
            "a.nested",
            Value::from(vec![vec![1u32, 2, 3], vec![], vec![4]]),
        ),
        ("a.nested_str", Value::from(vec![vec!["a", "b"], vec!["c"]])),
        (
            "a.deep",
            Value::from(vec![vec![vec![1i16], vec![2, 3]], vec![vec![]]]),
        ),
        // Nested arrays may differ in element type from one another.
        (
            "a.mixed_inner",
            Value::Array(vec![Value::from(vec![1u8]), Value::from(vec!["s"])]),
        ),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &arrays {
        w.metadata(*k, v.clone());
    }
    let f = parse_ok(&bytes_of(&w));
    for (k, v) in &arrays {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    assert_eq!(f.get_array("a.str").map(|a| a.len()).ok(), Some(4));
}

#[test]
fn metadata_key_set_twice_keeps_last_value() {
    let f = parse_ok(&bytes_of(
        GgufWriter::new().metadata("k", 1u32).metadata("k", "two"),
    ));
    assert_eq!(f.metadata.len(), 1);
    assert_eq!(f.get_str("k").ok(), Some("two"));
}

#[test]
fn tensors_round_trip() {
    let w = sample_writer();
    let bytes = bytes_of(&w);
    let f = parse_ok(&bytes);
    assert_eq!(f.tensors.len(), 3);
    assert_eq!(f.get_u64("llama.block_count").ok(), Some(2));
    assert_eq!(
        f.get_bool_opt("tokenizer.ggml.add_bos_token").ok(),
        Some(Some(true))
    );
    let a = f.tensor("a.weight").expect("a.weight");
    assert_eq!(
        (a.shape.as_slice(), a.dtype, a.bytes),
        (&[3, 2][..], Some(DType::F32), 24)
    );
    let vals: Vec<f32> = f
        .tensor_data(a)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(vals, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let b = f.tensor("b.weight").expect("b.weight");
    assert_eq!(
        (b.shape.as_slice(), b.dtype, b.bytes),
        (&[64][..], Some(DType::Q8_0), 68)
    );
    assert_eq!(&f.tensor_data(b)[..2], &f16_bytes(0.25));
    assert_eq!(f.tensor_data(b)[2 + 5], 35);
    let c = f.tensor("c.weight").expect("c.weight");
    assert_eq!(
        (c.shape.as_slice(), c.dtype, c.bytes),
        (&[32, 1][..], Some(DType::Q4_1), 20)
    );
    assert_eq!(f.tensor_data(c)[4 + 15], 255);
    assert_eq!(f.tensor_bytes(), 24 + 68 + 20);
    // ggml pads every tensor, the last one too.
    assert_eq!(f.file_bytes(), f.data_offset + 32 + 96 + 32);
    assert_eq!(f.file_bytes() as usize, bytes.len());
}

#[test]
fn write_to_and_open_round_trip() {
    let path = std::env::temp_dir().join(format!("pagoda-gguf-writer-{}.gguf", std::process::id()));
    sample_writer().write_to(&path).expect("write");
    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.path(), path.as_path());
    assert_eq!(f.tensors.len(), 3);
    let from_mem = parse_ok(&bytes_of(&sample_writer()));
    assert_eq!(f.tensors, from_mem.tensors);
    assert_eq!(f.metadata, from_mem.metadata);
    for t in &f.tensors {
        assert_eq!(f.tensor_data(t), from_mem.tensor_data(t));
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn tensor_data_of_a_foreign_info_is_empty_not_a_panic() {
    let f = parse_ok(&bytes_of(&sample_writer()));
    let mut info = f.tensors[0].clone();
    info.offset = u64::MAX - 3;
    assert!(f.tensor_data(&info).is_empty());
    info.offset = 0;
    info.bytes = usize::MAX;
    assert!(f.tensor_data(&info).is_empty());
}

// ----------------------------------------------------------------- alignment

fn check_layout(f: &GgufFile, alignment: u64) {
    assert_eq!(f.alignment, alignment);
    assert_eq!(f.data_offset % alignment, 0);
    for t in &f.tensors {
        assert_eq!(t.offset % alignment, 0, "{}", t.name);
        assert!(t.offset >= f.data_offset);
    }
}

#[test]
fn default_alignment_is_32() {
    let f = parse_ok(&bytes_of(&sample_writer()));
    assert!(f.get("general.alignment").is_none());
    check_layout(&f, 32);
    // 24, 68 and 20 bytes, each padded to 32.
    let offs: Vec<u64> = f.tensors.iter().map(|t| t.offset - f.data_offset).collect();
    assert_eq!(offs, [0, 32, 128]);
}

#[test]
fn alignment_64() {
    let mut w = sample_writer();
    w.alignment(64);
    let bytes = bytes_of(&w);
    let f = parse_ok(&bytes);
    assert_eq!(f.get("general.alignment"), Some(&Value::U32(64)));
    check_layout(&f, 64);
    let offs: Vec<u64> = f.tensors.iter().map(|t| t.offset - f.data_offset).collect();
    assert_eq!(offs, [0, 64, 192]);
    // Padding between the tensor infos and the data is zeros, under 64 bytes.
    let end_of_infos = find(&bytes, b"c.weight") + 8 + 4 + 16 + 4 + 8;
    assert!(f.data_offset as usize - end_of_infos < 64);
    assert!(
        bytes[end_of_infos..f.data_offset as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(bytes.len() % 64, 0);
}

#[test]
fn alignment_as_another_integer_type_and_larger_values() {
    for a in [1u64, 8, 256, 4096] {
        let mut w = sample_writer();
        w.metadata("general.alignment", Value::U64(a));
        let f = parse_ok(&bytes_of(&w));
        check_layout(&f, a);
    }
}

#[test]
fn alignment_not_a_power_of_two_is_refused() {
    let bytes = bytes_of(sample_writer().alignment(64));
    let at = find(&bytes, b"general.alignment") + "general.alignment".len() + 4;
    for bad in [0u32, 48, 3] {
        let mut b = bytes.clone();
        put_u32(&mut b, at, bad);
        let msg = parse_err(&b);
        assert!(
            msg.contains("`general.alignment`") && msg.contains("power of two"),
            "{msg}"
        );
    }
    // A non-integer alignment too.
    let mut b = bytes.clone();
    put_u32(&mut b, at - 4, 6); // type u32 -> f32
    let msg = parse_err(&b);
    assert!(msg.contains("`general.alignment`"), "{msg}");
}

#[test]
fn misaligned_tensor_offset_is_refused() {
    let mut bytes = bytes_of(&sample_writer());
    // The offset field of b.weight: name, n_dims, 1 dim, type, then offset.
    let at = find(&bytes, b"b.weight") + 8 + 4 + 8 + 4;
    assert_eq!(
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
        32
    );
    put_u64(&mut bytes, at, 33);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`b.weight`") && msg.contains("not aligned"),
        "{msg}"
    );
}

#[test]
fn overlapping_tensor_data_is_refused_with_both_names() {
    let mut bytes = bytes_of(&sample_writer());
    // b.weight's data (68 bytes at 32) moved to 0, over a.weight's [0, 24).
    let at = find(&bytes, b"b.weight") + 8 + 4 + 8 + 4;
    assert_eq!(
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
        32
    );
    parse_ok(&bytes);
    put_u64(&mut bytes, at, 0);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`a.weight`") && msg.contains("`b.weight`") && msg.contains("overlaps"),
        "{msg}"
    );
    // The same data for two names is an overlap too, whichever comes first.
    let mut bytes = bytes_of(&sample_writer());
    let a_at = find(&bytes, b"a.weight") + 8 + 4 + 8 + 8 + 4;
    put_u64(&mut bytes, a_at, 32);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`a.weight`") && msg.contains("`b.weight`") && msg.contains("overlaps"),
        "{msg}"
    );
}

// ------------------------------------------------------------------- versions

#[test]
fn version_2_is_accepted() {
    let f = parse_ok(&bytes_of(sample_writer().version(2)));
    assert_eq!(f.version, 2);
    assert_eq!(f.tensors.len(), 3);
}

#[test]
fn versions_1_and_4_are_refused_naming_the_version() {
    for v in [1u32, 4, 0, 1000] {
        let msg = parse_err(&bytes_of(sample_writer().version(v)));
        assert!(msg.contains(&format!("version {v} ")), "{msg}");
        assert!(msg.contains("offset 4"), "{msg}");
    }
    let msg = parse_err(&bytes_of(sample_writer().version(3u32.swap_bytes())));
    assert!(msg.contains("big-endian"), "{msg}");
}

#[test]
fn wrong_magic_is_not_a_gguf_file() {
    let mut bytes = bytes_of(&sample_writer());
    bytes[..4].copy_from_slice(b"GGML");
    let msg = parse_err(&bytes);
    assert!(msg.contains("not a GGUF file"), "{msg}");
    // Through `open`, the message names the path on disk.
    let path = std::env::temp_dir().join(format!("pagoda-not-gguf-{}.bin", std::process::id()));
    std::fs::write(&path, b"PK\x03\x04 this is a zip file, not a model").expect("write");
    let msg = GgufFile::open(&path).expect_err("zip").to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn tiny_files_are_truncated_errors() {
    for b in [&b""[..], b"G", b"GGU", b"GGUF", b"GGUF\x03\0\0\0"] {
        let msg = parse_err(b);
        assert!(msg.contains("truncated"), "{msg}");
    }
    let msg = parse_err(b"GGUG");
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

// ------------------------------------------------------------- bad values

#[test]
fn unknown_value_type_names_key_and_offset() {
    let mut bytes = bytes_of(GgufWriter::new().metadata("my.key", 5u32));
    let at = first_type_at("my.key");
    assert_eq!(at, 38);
    for t in [13u32, 255, u32::MAX] {
        put_u32(&mut bytes, at, t);
        let msg = parse_err(&bytes);
        assert!(msg.contains("`my.key`"), "{msg}");
        assert!(msg.contains(&format!("unknown value type {t}")), "{msg}");
        assert!(msg.contains("offset 38"), "{msg}");
    }
}

#[test]
fn unknown_array_element_type_names_key_and_offset() {
    let mut bytes = bytes_of(GgufWriter::new().metadata("arr", vec![1u32, 2]));
    let at = first_type_at("arr") + 4; // the element type, after the array's type id
    put_u32(&mut bytes, at, 13);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`arr`") && msg.contains("unknown array element type 13"),
        "{msg}"
    );
    assert!(msg.contains(&format!("offset {at}")), "{msg}");
}

#[test]
fn bool_byte_2_is_refused() {
    let mut bytes = bytes_of(GgufWriter::new().metadata("flag", true));
    let at = first_type_at("flag") + 4;
    assert_eq!(bytes[at], 1);
    bytes[at] = 2;
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`flag`") && msg.contains("bool byte 2"),
        "{msg}"
    );
    assert!(msg.contains(&format!("offset {at}")), "{msg}");
    // In an array too.
    let mut bytes = bytes_of(GgufWriter::new().metadata("flags", vec![false, true]));
    let last = bytes.iter().rposition(|&b| b == 1).unwrap();
    bytes[last] = 0xFF;
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("`flags`") && msg.contains("bool byte 255"),
        "{msg}"
    );
}

#[test]
fn duplicate_keys_and_tensor_names_are_refused() {
    let mut bytes = bytes_of(GgufWriter::new().metadata("k.a", 1u8).metadata("k.b", 2u8));
    let at = find(&bytes, b"k.b");
    bytes[at + 2] = b'a';
    let msg = parse_err(&bytes);
    assert!(msg.contains("duplicate metadata key `k.a`"), "{msg}");

    let mut bytes = bytes_of(&sample_writer());
    let at = find(&bytes, b"b.weight");
    bytes[at] = b'a';
    let msg = parse_err(&bytes);
    assert!(msg.contains("duplicate tensor name `a.weight`"), "{msg}");
}

#[test]
fn arrays_nested_too_deep_are_refused() {
    let mut v = Value::from(vec![1u8]);
    for _ in 0..20 {
        v = Value::Array(vec![v]);
    }
    let msg = parse_err(&bytes_of(GgufWriter::new().metadata("deep", v)));
    assert!(
        msg.contains("`deep`") && msg.contains("nested deeper"),
        "{msg}"
    );
}

// -------------------------------------------------------------- bad tensors

#[test]
fn every_tensor_type_is_read_and_sized() {
    // (ggml id, name, bytes of a [256, 2] tensor): ggml's block layouts.
    let cases = [
        (12u32, "Q4_K", 2 * 144),
        (13, "Q5_K", 2 * 176),
        (14, "Q6_K", 2 * 210),
        (6, "Q5_0", 2 * 8 * 22),
        (7, "Q5_1", 2 * 8 * 24),
        (10, "Q2_K", 2 * 84),
        (11, "Q3_K", 2 * 110),
        (23, "IQ4_XS", 2 * 136),
        (24, "I8", 2 * 256),
    ];
    for (id, name, bytes) in cases {
        let mut w = sample_writer();
        w.tensor_raw("blk.0.attn_k.weight", &[256, 2], id, vec![7u8; bytes]);
        // A tensor after it: its offset is right only if the size was.
        w.tensor_raw("after", &[8], 0, (0..32).collect::<Vec<u8>>());
        let f = parse_ok(&bytes_of(&w));
        let t = f.tensor("blk.0.attn_k.weight").expect("read");
        // Metric: exact byte size and type; the engine has no DType for it.
        assert_eq!((t.ggml_type, t.type_name(), t.bytes), (id, name, bytes));
        assert!(t.size_known());
        assert!(f.tensor_data(t).iter().all(|&b| b == 7), "{name} data");
        let after = f.tensor("after").expect("after");
        assert_eq!(f.tensor_data(after), (0..32).collect::<Vec<u8>>(), "{name}");
        match DType::from_name(name) {
            // A type the engine computes with: the same type, the same block size.
            Some(d) if d.is_quantized() => {
                assert_eq!(t.dtype, Some(d), "{name}");
                assert_eq!(d.row_bytes(256).map(|b| 2 * b), Some(bytes), "{name}");
                assert_eq!(t.require_dtype(f.path()).unwrap(), d);
            }
            _ => {
                assert_eq!(t.dtype, None, "{name}");
                // Asking for the engine type names the tensor and the type.
                let msg = t.require_dtype(f.path()).expect_err("no DType").to_string();
                assert!(
                    msg.contains("`blk.0.attn_k.weight`")
                        && msg.contains(&format!("type {id} ({name})")),
                    "{msg}"
                );
            }
        }
        // The census lists it next to the sample's types.
        assert!(
            f.type_counts().contains(&(name.to_string(), 1)),
            "{:?}",
            f.type_counts()
        );
    }
}

#[test]
fn an_undefined_tensor_type_is_read_with_no_size() {
    for id in [4u32, 99, u32::MAX] {
        let mut w = sample_writer();
        w.tensor_raw("odd", &[256, 2], id, vec![0u8; 64]);
        let f = parse_ok(&bytes_of(&w));
        let t = f.tensor("odd").expect("read");
        // Metric: no size, no data, and a clear error when its type is needed.
        assert!(!t.size_known() && t.bytes == 0 && t.dtype.is_none());
        assert!(f.tensor_data(t).is_empty());
        let msg = t.require_dtype(f.path()).expect_err("unknown").to_string();
        assert!(
            msg.contains("`odd`") && msg.contains(&format!("type {id} (unknown)")),
            "{msg}"
        );
        assert!(f.type_counts().contains(&(format!("type {id}"), 1)));
    }
}

#[test]
fn block_layouts_agree_with_the_engine_types() {
    // Every ggml type the engine maps has the layout its DType says.
    let mut mapped = 0;
    for id in 0..64u32 {
        if let Some(d) = dtype_from_ggml(id) {
            assert_eq!(
                ggml_block_layout(id),
                Some((d.block_size(), d.block_bytes())),
                "{d}"
            );
            assert_eq!(ggml_type_id(d), Some(id));
            mapped += 1;
        }
    }
    // F32, F16, BF16, Q8_0, Q4_0, Q4_1 at least.
    assert!(mapped >= 6, "{mapped}");
    // The core crate's 5-bit and K-quant decoders have ggml's layouts.
    for (id, name) in [
        (6u32, "Q5_0"),
        (7, "Q5_1"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
    ] {
        let (block, bytes, _) = pagoda_backend::kquant::block_format(name).expect(name);
        assert_eq!(ggml_block_layout(id), Some((block, bytes)), "{name}");
        assert_eq!(ggml_type_name(id), name);
    }
    // Known ids have names and layouts; removed ids have neither.
    for id in [0u32, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30, 39] {
        assert!(
            ggml_block_layout(id).is_some() && ggml_type_name(id) != "unknown",
            "{id}"
        );
    }
    for id in [4u32, 5, 31, 32, 33, 36, 37, 38, 40] {
        assert!(
            ggml_block_layout(id).is_none() && ggml_type_name(id) == "unknown",
            "{id}"
        );
    }
}

#[test]
fn tensor_data_past_the_end_is_refused() {
    let bytes = bytes_of(&sample_writer());
    let f = parse_ok(&bytes);
    let last = &f.tensors[2];
    let end = (last.offset as usize) + last.bytes;
    for len in [end - 1, end - 19, last.offset as usize] {
        let msg = parse_err(&bytes[..len]);
        assert!(
            msg.contains("`c.weight`") && msg.contains("past the end"),
            "{msg}"
        );
    }
    // With the data section gone, the first tensor is the one named.
    let msg = parse_err(&bytes[..f.data_offset as usize]);
    assert!(
        msg.contains("`a.weight`") && msg.contains("past the end"),
        "{msg}"
    );
    // Trailing padding is not data: cutting it is fine.
    assert!(parse(&bytes[..end]).is_ok());
    // An offset far past the end.
    let mut b = bytes.clone();
    let at = find(&b, b"c.weight") + 8 + 4 + 16 + 4;
    put_u64(&mut b, at, 1 << 40);
    let msg = parse_err(&b);
    assert!(
        msg.contains("`c.weight`") && msg.contains("past the end"),
        "{msg}"
    );
    // An offset that overflows when added to the data offset.
    put_u64(&mut b, at, u64::MAX - 31);
    let msg = parse_err(&b);
    assert!(
        msg.contains("`c.weight`") && msg.contains("past the end"),
        "{msg}"
    );
}

#[test]
fn bad_dimensions_are_refused() {
    let bytes = bytes_of(&sample_writer());
    let n_dims_at = find(&bytes, b"a.weight") + 8;
    for n in [0u32, 5, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, n_dims_at, n);
        let msg = parse_err(&b);
        assert!(
            msg.contains("`a.weight`") && msg.contains(&format!("{n} dimensions")),
            "{msg}"
        );
    }
    // Dimensions whose product overflows.
    let mut w = sample_writer();
    w.tensor_raw("big", &[u64::MAX, 2], 0, vec![]);
    let msg = parse_err(&bytes_of(&w));
    assert!(msg.contains("`big`") && msg.contains("overflows"), "{msg}");
    let mut w = sample_writer();
    w.tensor_raw("big", &[1 << 40, 1 << 40], 0, vec![]);
    let msg = parse_err(&bytes_of(&w));
    assert!(msg.contains("`big`"), "{msg}");
    // A first dimension that is not a whole number of blocks.
    let mut w = sample_writer();
    w.tensor_raw("q", &[33], 8, vec![0; 68]);
    let msg = parse_err(&bytes_of(&w));
    assert!(
        msg.contains("`q`") && msg.contains("block size 32"),
        "{msg}"
    );
    // A huge first dimension with a zero second one: no elements, and
    // no overflow computing a row's bytes.
    for ty in [0u32, 8] {
        let mut w = sample_writer();
        w.tensor_raw("empty", &[1 << 62, 0], ty, vec![]);
        let f = parse_ok(&bytes_of(&w));
        let t = f.tensor("empty").expect("empty");
        assert_eq!((t.bytes, t.num_elements()), (0, 0));
    }
}

// -------------------------------------------------------- huge counts/lengths

#[test]
fn huge_string_lengths_are_refused_without_allocating() {
    // The key's length.
    let mut bytes = bytes_of(GgufWriter::new().metadata("key", "value"));
    put_u64(&mut bytes, 24, u64::MAX);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("metadata key #0") && msg.contains("string length"),
        "{msg}"
    );
    assert!(msg.contains("offset 24"), "{msg}");
    // A string value's length.
    let mut bytes = bytes_of(GgufWriter::new().metadata("key", "value"));
    let at = first_type_at("key") + 4;
    for len in [u64::MAX, u64::MAX / 2, 1 << 40, bytes.len() as u64] {
        put_u64(&mut bytes, at, len);
        let msg = parse_err(&bytes);
        assert!(
            msg.contains("`key`") && msg.contains(&format!("string length {len}")),
            "{msg}"
        );
        assert!(msg.contains(&format!("offset {at}")), "{msg}");
    }
    // A tensor name's length.
    let mut bytes = bytes_of(&sample_writer());
    let at = find(&bytes, b"a.weight") - 8;
    put_u64(&mut bytes, at, u64::MAX);
    let msg = parse_err(&bytes);
    assert!(
        msg.contains("name of tensor #0") && msg.contains("string length"),
        "{msg}"
    );
}

#[test]
fn huge_array_counts_are_refused_without_allocating() {
    for v in [
        Value::from(vec![1u8]),
        Value::from(vec!["s"]),
        Value::from(vec![vec![1u8]]),
        Value::from(vec![1u64]),
    ] {
        let mut bytes = bytes_of(GgufWriter::new().metadata("arr", v));
        let at = first_type_at("arr") + 4 + 4;
        for count in [u64::MAX, u64::MAX / 12 + 1, 1 << 32] {
            put_u64(&mut bytes, at, count);
            let msg = parse_err(&bytes);
            assert!(
                msg.contains("`arr`") && msg.contains(&format!("array of {count}")),
                "{msg}"
            );
            assert!(msg.contains(&format!("offset {at}")), "{msg}");
        }
    }
}

#[test]
fn huge_tensor_and_metadata_counts_are_refused() {
    let bytes = bytes_of(&sample_writer());
    for count in [u64::MAX, 1 << 40, u64::MAX / 24 + 1] {
        let mut b = bytes.clone();
        put_u64(&mut b, 8, count);
        let msg = parse_err(&b);
        assert!(
            msg.contains(&format!("tensor count {count}")) && msg.contains("offset 8"),
            "{msg}"
        );
        let mut b = bytes.clone();
        put_u64(&mut b, 16, count);
        let msg = parse_err(&b);
        assert!(
            msg.contains(&format!("metadata count {count}")) && msg.contains("offset 16"),
            "{msg}"
        );
    }
    // Counts that fit the bytes left but are still wrong: parsing runs into garbage.
    let mut b = bytes.clone();
    put_u64(&mut b, 8, 4);
    parse_err(&b);
    let mut b = bytes.clone();
    put_u64(&mut b, 16, 8);
    parse_err(&b);
}

// ------------------------------------------------------------- writer checks

#[test]
fn writer_refuses_what_it_cannot_write() {
    let err = |w: &GgufWriter| w.to_bytes().expect_err("should refuse").to_string();
    let msg =
        err(GgufWriter::new().metadata("mixed", Value::Array(vec![Value::U8(1), Value::U16(2)])));
    assert!(
        msg.contains("`mixed`") && msg.contains("element 1 is u16"),
        "{msg}"
    );
    let msg = err(GgufWriter::new().metadata(
        "inner",
        Value::Array(vec![Value::Array(vec![Value::Bool(true), Value::I8(1)])]),
    ));
    assert!(msg.contains("`inner`"), "{msg}");
    let msg = err(GgufWriter::new().alignment(48));
    assert!(msg.contains("`general.alignment`"), "{msg}");
    let msg = err(GgufWriter::new().tensor("t", &[4], DType::F32, vec![0u8; 15]));
    assert!(
        msg.contains("`t`") && msg.contains("needs 16 bytes, got 15"),
        "{msg}"
    );
    let msg = err(GgufWriter::new().tensor("t", &[16], DType::Q4_0, vec![0u8; 9]));
    assert!(msg.contains("`t`") && msg.contains("block size"), "{msg}");
    let msg = err(GgufWriter::new().tensor("t", &[4], DType::U32, vec![0u8; 16]));
    assert!(msg.contains("not a GGUF tensor type"), "{msg}");
    let msg = err(GgufWriter::new().tensor("t", &[1, 1, 1, 1, 1], DType::F32, vec![0u8; 4]));
    assert!(msg.contains("5 dimensions"), "{msg}");
    let msg = err(GgufWriter::new()
        .tensor("t", &[1], DType::F32, vec![0u8; 4])
        .tensor("t", &[1], DType::F32, vec![0u8; 4]));
    assert!(msg.contains("`t`") && msg.contains("twice"), "{msg}");
    // Nothing is created when the writer refuses.
    let path = std::env::temp_dir().join(format!("pagoda-refused-{}.gguf", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let msg = GgufWriter::new()
        .tensor("t", &[4], DType::F32, vec![0u8; 1])
        .write_to(&path)
        .expect_err("refuse")
        .to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!path.exists());
}

// ------------------------------------------------------------------- fuzzing

/// Parses under `catch_unwind`: corrupted input may parse or be refused,
/// but must never panic. A refusal names the file.
fn parse_no_panic(bytes: &[u8], case: &str) -> Option<GgufFile> {
    match catch_unwind(AssertUnwindSafe(|| parse(bytes))) {
        Err(_) => panic!("parser panicked: {case}"),
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                msg.contains(NAME),
                "{case}: message does not name the file: {msg}"
            );
            None
        }
    }
}

#[test]
fn flipping_any_header_byte_never_panics() {
    let mut w = sample_writer();
    w.alignment(64);
    let bytes = bytes_of(&w);
    let header_len = parse_ok(&bytes).data_offset as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(0x6767_7566);
    let mut b = bytes.clone();
    let (mut ok, mut refused) = (0, 0);
    for pos in 0..header_len {
        let random: u8 = rng.random_range(1..=255);
        for x in [0x01u8, 0x80, 0xFF, random] {
            b[pos] ^= x;
            match parse_no_panic(&b, &format!("byte {pos} ^ {x:#04x}")) {
                Some(f) => {
                    // Whatever parsed must be self-consistent.
                    for t in &f.tensors {
                        assert_eq!(f.tensor_data(t).len(), t.bytes);
                    }
                    ok += 1;
                }
                None => refused += 1,
            }
            b[pos] ^= x;
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
}

#[test]
fn truncating_anywhere_before_the_last_tensor_end_is_refused() {
    let bytes = bytes_of(&sample_writer());
    let f = parse_ok(&bytes);
    let end = f
        .tensors
        .iter()
        .map(|t| t.offset as usize + t.bytes)
        .max()
        .unwrap_or(0);
    for len in 0..end {
        let msg = match catch_unwind(|| parse(&bytes[..len])) {
            Err(_) => panic!("panic at length {len}"),
            Ok(Ok(_)) => panic!("truncated to {len} bytes and still parsed"),
            Ok(Err(e)) => e.to_string(),
        };
        assert!(msg.contains(NAME), "{msg}");
        assert!(
            msg.contains("offset") || msg.contains("tensor `") || msg.contains("key `"),
            "{len}: {msg}"
        );
    }
}

#[test]
fn random_bytes_after_a_valid_prefix_never_panic() {
    let bytes = bytes_of(&sample_writer());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..2000 {
        let cut = rng.random_range(0..bytes.len());
        let mut b = bytes[..cut].to_vec();
        let extra = rng.random_range(0..64);
        b.extend((0..extra).map(|_| rng.random::<u8>()));
        parse_no_panic(&b, &format!("case {case}"));
    }
}

#[test]
fn deferred_tensors_are_filled_in_the_shared_buffer() {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .alignment(64)
        .tensor("given", &[4], DType::F32, vec![7u8; 16])
        .tensor_deferred("later", &[32, 3], DType::Q8_0)
        .tensor_deferred("norm", &[5], DType::F32);
    // Through to_bytes, deferred tensors are zeros.
    let zeros = parse_ok(&bytes_of(&w));
    assert_eq!(w.file_bytes(), zeros.file_bytes());
    let later = zeros.tensor("later").expect("later").clone();
    assert_eq!(later.bytes, 3 * 34);
    assert!(zeros.tensor_data(&later).iter().all(|&b| b == 0));
    // Through to_shared_bytes, fill writes them in place, given ones are copied.
    let shared = w
        .to_shared_bytes(|slices: Vec<&mut [u8]>| -> Result<(), GgufError> {
            assert_eq!(
                slices.iter().map(|s| s.len()).collect::<Vec<_>>(),
                vec![16, 102, 20]
            );
            assert!(slices[0].iter().all(|&b| b == 7));
            for (i, s) in slices.into_iter().enumerate().skip(1) {
                s.fill(i as u8);
            }
            Ok(())
        })
        .expect("shared bytes");
    assert_eq!(shared.len() as u64, w.file_bytes());
    let f = GgufFile::from_bytes(NAME, shared).expect("parses");
    assert_eq!(f.tensors, zeros.tensors);
    let data = |n: &str| f.tensor_data(f.tensor(n).expect("tensor")).to_vec();
    assert_eq!(data("given"), vec![7u8; 16]);
    assert_eq!(data("later"), vec![1u8; 102]);
    assert_eq!(data("norm"), vec![2u8; 20]);
    // The fill's error comes back; validation runs before it.
    let err = w.to_shared_bytes(|_| -> Result<(), crate::EngineError> {
        Err(crate::EngineError::InvalidInput("fill failed".into()))
    });
    assert!(
        err.err()
            .is_some_and(|e| e.to_string().contains("fill failed"))
    );
    let mut bad = GgufWriter::new();
    bad.tensor_deferred("odd", &[33], DType::Q4_0);
    assert!(
        bad.to_shared_bytes(|_| -> Result<(), GgufError> { Ok(()) })
            .is_err()
    );
}
