//! The GGUF reader on the real model file: its metadata, dequantized rows
//! checked against an independent decoding, and robustness against
//! truncated and corrupted copies.
//!
//! The model is `$PAGODA_MODEL`, else the default model (fetched on first use).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pagoda::gguf::{GgufFile, GgufWriter, Value};
use pagoda_backend::DType;
use pagoda_backend::quant::dequantize_row;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The default model, fetched on first use (a missing model is a failure, not a skip).
fn model() -> PathBuf {
    match std::env::var_os("PAGODA_MODEL") {
        Some(p) => PathBuf::from(p),
        None => pagoda::fetch::default_model_path()
            .unwrap_or_else(|e| panic!("default model unavailable: {e}")),
    }
}

fn open(p: &Path) -> GgufFile {
    GgufFile::open(p).unwrap_or_else(|e| panic!("{e}"))
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-robustness-{test}"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// An error message is useful when it names the file and says where: a byte
/// offset, a tensor or a metadata key.
fn assert_useful(msg: &str, file: &str, case: &str) {
    assert!(
        msg.contains(file),
        "{case}: message does not name {file}: {msg}"
    );
    assert!(
        msg.contains("offset") || msg.contains("tensor `") || msg.contains("key `"),
        "{case}: message names no offset, tensor or key: {msg}"
    );
}

// ------------------------------------------------------------------ metadata

#[test]
fn gguf_real_file_metadata() {
    let p = model();
    let f = open(&p);
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(f.metadata.len(), 33);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.get_str("general.architecture").ok(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count").ok(), Some(30));
    assert_eq!(f.get_u64("llama.embedding_length").ok(), Some(576));
    assert_eq!(f.get_u64("llama.feed_forward_length").ok(), Some(1536));
    assert_eq!(f.get_u64("llama.attention.head_count").ok(), Some(9));
    assert_eq!(f.get_u64("llama.attention.head_count_kv").ok(), Some(3));
    assert_eq!(f.get_u64("llama.context_length").ok(), Some(8192));
    assert_eq!(f.get_f64("llama.rope.freq_base").ok(), Some(100000.0));
    assert_eq!(f.get_str("tokenizer.ggml.model").ok(), Some("gpt2"));
    assert_eq!(
        f.get_bool_opt("tokenizer.ggml.add_bos_token").ok(),
        Some(Some(false))
    );
    let tokens = f.get_array("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(tokens.len(), 49152);
    assert!(tokens.iter().all(|t| matches!(t, Value::String(_))));
    let merges = f.get_array("tokenizer.ggml.merges").expect("merges");
    assert_eq!(merges.len(), 48900);
    assert_eq!(
        f.get_array("tokenizer.ggml.token_type")
            .map(|a| a.len())
            .ok(),
        Some(49152)
    );
    assert_eq!(
        f.get_array("general.languages").ok(),
        Some(&[Value::String("en".into())][..])
    );

    let emb = f.tensor("token_embd.weight").expect("token_embd.weight");
    assert_eq!(emb.dtype, Some(DType::Q8_0));
    assert_eq!(emb.shape, [576, 49152]);
    assert_eq!(emb.bytes, 576 / 32 * 34 * 49152);
    assert!(
        f.tensor("output.weight").is_none(),
        "tied embeddings: no output.weight"
    );
    let q = f.tensor("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(
        (q.dtype, q.shape.as_slice()),
        (Some(DType::Q4_1), &[576, 576][..])
    );
    let k = f.tensor("blk.29.attn_k.weight").expect("attn_k");
    assert_eq!(
        (k.dtype, k.shape.as_slice()),
        (Some(DType::Q4_1), &[576, 192][..])
    );

    let mut counts = HashMap::new();
    for t in &f.tensors {
        *counts.entry(t.dtype).or_insert(0) += 1;
        assert_eq!(t.offset % 32, 0, "{}", t.name);
        assert!(t.offset + t.bytes as u64 <= f.file_bytes(), "{}", t.name);
    }
    let counts: Vec<_> = counts
        .into_iter()
        .map(|(d, n)| (d.expect("a type the engine has").name(), n))
        .collect();
    let mut expected = vec![("q4_1", 210), ("f32", 61), ("q8_0", 1)];
    expected.sort();
    let mut counts_sorted = counts.clone();
    counts_sorted.sort();
    assert_eq!(counts_sorted, expected);
    assert_eq!(f.file_bytes(), 98_362_432);
    // The file's own type census (what `pagoda plan` lists), by ggml id.
    let census: Vec<(String, usize)> =
        vec![("F32".into(), 61), ("Q4_1".into(), 210), ("Q8_0".into(), 1)];
    assert_eq!(f.type_counts(), census);
}

// ----------------------------------------------------------- dequantization

/// IEEE half to f32 from the bits, written out independently of `half`.
fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = bits >> 15;
    let exp = ((bits >> 10) & 0x1F) as i32;
    let man = (bits & 0x3FF) as u32;
    let mag = match exp {
        // Subnormal: man * 2^-24.
        0 => man as f32 * 2f32.powi(-24),
        31 if man == 0 => f32::INFINITY,
        31 => f32::NAN,
        // (1 + man / 1024) * 2^(exp - 15) = (1024 + man) * 2^(exp - 25).
        _ => (1024 + man) as f32 * 2f32.powi(exp - 25),
    };
    if sign == 1 { -mag } else { mag }
}

fn le16(b: &[u8], i: usize) -> u16 {
    b[i] as u16 | (b[i + 1] as u16) << 8
}

/// Q8_0 by hand: blocks of 34 bytes, an f16 scale then 32 two's-complement bytes.
fn decode_q8_0(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for block in raw.chunks(34) {
        let d = f16_bits_to_f32(le16(block, 0));
        for &q in &block[2..34] {
            let q = if q >= 128 { q as i32 - 256 } else { q as i32 };
            out.push(d * q as f32);
        }
    }
    out
}

/// Q4_1 by hand: blocks of 20 bytes, f16 scale, f16 min, 16 bytes whose low
/// nibbles are elements 0..16 and high nibbles elements 16..32.
fn decode_q4_1(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for block in raw.chunks(20) {
        let d = f16_bits_to_f32(le16(block, 0));
        let m = f16_bits_to_f32(le16(block, 2));
        let mut vals = [0f32; 32];
        for i in 0..16 {
            let byte = block[4 + i];
            vals[i] = d * (byte & 0x0F) as f32 + m;
            vals[i + 16] = d * (byte >> 4) as f32 + m;
        }
        out.extend_from_slice(&vals);
    }
    out
}

fn row_of(f: &GgufFile, name: &str, row: usize) -> (DType, Vec<u8>, usize) {
    let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    let n = t.shape[0];
    let dtype = t.dtype.expect("a type the engine has");
    let rb = dtype.row_bytes(n).expect("row bytes");
    let data = f.tensor_data(t);
    (dtype, data[row * rb..(row + 1) * rb].to_vec(), n)
}

fn check_row(lib: &[f32], mine: &[f32], what: &str) {
    assert_eq!(lib.len(), mine.len());
    for (j, (a, b)) in lib.iter().zip(mine).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}[{j}]: library {a}, by hand {b}"
        );
    }
    assert!(
        lib.iter().all(|x| x.is_finite()),
        "{what}: non-finite value"
    );
    let sum: f64 = lib.iter().map(|&x| x as f64).sum();
    assert!(sum.is_finite(), "{what}: sum {sum}");
    assert!(lib.iter().any(|&x| x != 0.0), "{what}: all zeros");
    eprintln!(
        "{what}: [{}, {}, {}, ..., {}], sum {sum}",
        lib[0],
        lib[1],
        lib[2],
        lib[lib.len() - 1]
    );
}

#[test]
fn gguf_real_file_q8_0_embedding_row_matches_hand_decoding() {
    let p = model();
    let f = open(&p);
    for row in [0usize, 1, 49151] {
        let (dtype, raw, n) = row_of(&f, "token_embd.weight", row);
        assert_eq!((dtype, n, raw.len()), (DType::Q8_0, 576, 18 * 34));
        let mut lib = vec![0f32; n];
        dequantize_row(dtype, &raw, &mut lib).expect("dequantize");
        let mine = decode_q8_0(&raw);
        // A few values spelled out: element 0 is d0 * qs[0], element 33 is d1 * qs[1].
        let d0 = f16_bits_to_f32(le16(&raw, 0));
        let d1 = f16_bits_to_f32(le16(&raw, 34));
        assert_eq!(lib[0], d0 * (raw[2] as i8) as f32);
        assert_eq!(lib[33], d1 * (raw[34 + 2 + 1] as i8) as f32);
        assert_eq!(d0, half::f16::from_bits(le16(&raw, 0)).to_f32());
        check_row(&lib, &mine, &format!("token_embd.weight row {row}"));
    }
}

#[test]
fn gguf_real_file_q4_1_attn_q_row_matches_hand_decoding() {
    let p = model();
    let f = open(&p);
    for row in [0usize, 300, 575] {
        let (dtype, raw, n) = row_of(&f, "blk.0.attn_q.weight", row);
        assert_eq!((dtype, n, raw.len()), (DType::Q4_1, 576, 18 * 20));
        let mut lib = vec![0f32; n];
        dequantize_row(dtype, &raw, &mut lib).expect("dequantize");
        let mine = decode_q4_1(&raw);
        // Element 16 is the high nibble of the block's first quant byte.
        let d = f16_bits_to_f32(le16(&raw, 0));
        let m = f16_bits_to_f32(le16(&raw, 2));
        assert_eq!(lib[16], d * (raw[4] >> 4) as f32 + m);
        assert_eq!(lib[15], d * (raw[4 + 15] & 15) as f32 + m);
        check_row(&lib, &mine, &format!("blk.0.attn_q.weight row {row}"));
    }
}

#[test]
fn gguf_real_file_f32_norm_is_finite() {
    let p = model();
    let f = open(&p);
    let (dtype, raw, n) = row_of(&f, "blk.0.attn_norm.weight", 0);
    assert_eq!((dtype, n), (DType::F32, 576));
    let mut lib = vec![0f32; n];
    dequantize_row(dtype, &raw, &mut lib).expect("dequantize");
    for (j, c) in raw.chunks_exact(4).enumerate() {
        let bits = c[0] as u32 | (c[1] as u32) << 8 | (c[2] as u32) << 16 | (c[3] as u32) << 24;
        assert_eq!(lib[j].to_bits(), bits);
    }
    assert!(lib.iter().all(|x| x.is_finite()));
}

// ------------------------------------------------------------- truncation

#[test]
fn gguf_real_file_truncated_anywhere_is_refused() {
    let p = model();
    let bytes = std::fs::read(&p).expect("read model");
    let f = open(&p);
    let header = f.data_offset as usize;
    let file_len = bytes.len();
    let data_end = f
        .tensors
        .iter()
        .map(|t| t.offset as usize + t.bytes)
        .max()
        .unwrap_or(0);
    // The first tensor info: its name's length, then the name.
    let first = &f
        .tensors
        .iter()
        .min_by_key(|t| t.offset)
        .expect("tensors")
        .name;
    let mut needle = (first.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(first.as_bytes());
    let infos = bytes[..header]
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("first tensor info");
    drop(f);

    let mut rng = ChaCha8Rng::seed_from_u64(0x7472_756e);
    let mut lens: Vec<usize> = (1..=64).collect();
    // Metadata: around 100 offsets spread over it, plus its first 4 KiB densely.
    lens.extend((0..100).map(|_| rng.random_range(65..infos)));
    lens.extend((0..40).map(|_| rng.random_range(65..4096)));
    // Tensor infos, their boundaries and the padding after them.
    lens.extend((0..100).map(|_| rng.random_range(infos..=header)));
    lens.extend([infos, infos + 1, header - 1, header]);
    // Data section.
    lens.extend([
        header + 1,
        header + 31,
        (header + data_end) / 2,
        data_end - 1,
    ]);
    lens.push(file_len - 1);
    lens.sort();
    lens.dedup();
    // Any padding after the last tensor is not data: cutting it is allowed.
    let must_fail = |n: usize| n < data_end;
    assert!(
        must_fail(file_len - 1),
        "file ends {} bytes after the last tensor",
        file_len - data_end
    );

    let dir = scratch_dir("truncate");
    let cut = dir.join("truncated.gguf");
    let cut_name = cut.display().to_string();
    let mut refused = 0;
    for &n in &lens {
        std::fs::write(&cut, &bytes[..n]).expect("write prefix");
        let result = catch_unwind(|| GgufFile::open(&cut).map(|_| ()));
        match result {
            Err(_) => panic!("panic opening a copy truncated to {n} bytes"),
            Ok(Ok(())) => assert!(!must_fail(n), "truncated to {n} bytes and still opened"),
            Ok(Err(e)) => {
                assert_useful(&e.to_string(), &cut_name, &format!("truncated to {n}"));
                refused += 1;
            }
        }
    }
    eprintln!(
        "{refused} truncated copies refused ({} lengths)",
        lens.len()
    );
    assert!(refused >= 300);
    let _ = std::fs::remove_file(&cut);
}

// -------------------------------------------------------------- corruption

/// Parses `bytes` in memory under `catch_unwind`. Returns whether it parsed;
/// a refusal must name the file and where.
fn parse_no_panic(name: &str, bytes: Arc<[u8]>, case: &str) -> bool {
    match catch_unwind(AssertUnwindSafe(|| GgufFile::from_bytes(name, bytes))) {
        Err(_) => panic!("parser panicked: {case}"),
        Ok(Ok(f)) => {
            for t in &f.tensors {
                assert_eq!(f.tensor_data(t).len(), t.bytes, "{case}: {}", t.name);
            }
            true
        }
        Ok(Err(e)) => {
            assert_useful(&e.to_string(), name, case);
            false
        }
    }
}

#[test]
fn gguf_real_file_flipped_header_bytes_never_panic() {
    let p = model();
    let name = p.display().to_string();
    let mut bytes: Arc<[u8]> = std::fs::read(&p).expect("read model").into();
    let (header, infos_start) = {
        let f = GgufFile::from_bytes(&p, bytes.clone()).expect("parse in memory");
        // Each info is name (8 + len), n_dims (4), dims (8 each), type (4),
        // offset (8); then up to 31 bytes of padding.
        let infos: usize = f
            .tensors
            .iter()
            .map(|t| 8 + t.name.len() + 4 + 8 * t.shape.len() + 4 + 8)
            .sum();
        let header = f.data_offset as usize;
        (header, header.saturating_sub(infos + 31))
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0x666c_6970);
    let mut positions: Vec<usize> = Vec::new();
    positions.extend((0..100).map(|_| rng.random_range(0..4096)));
    positions.extend((0..100).map(|_| rng.random_range(infos_start..header)));
    positions.extend((0..100).map(|_| rng.random_range(0..header)));
    let (mut parsed, mut refused) = (0, 0);
    for pos in positions {
        let x: u8 = rng.random_range(1..=255);
        let buf = Arc::get_mut(&mut bytes).expect("unique buffer");
        buf[pos] ^= x;
        if parse_no_panic(&name, bytes.clone(), &format!("byte {pos} ^ {x:#04x}")) {
            parsed += 1;
        } else {
            refused += 1;
        }
        let buf = Arc::get_mut(&mut bytes).expect("unique buffer");
        buf[pos] ^= x;
    }
    eprintln!("flipped header bytes: {parsed} still parse, {refused} refused");
    assert!(refused > 0);
    // The restored buffer parses again.
    assert!(parse_no_panic(&name, bytes, "restored"));
}

/// A synthetic model shaped like the real one (a few tensors of each type,
/// tokenizer arrays), every header byte flipped with a few values.
#[test]
fn gguf_synthetic_model_every_header_byte_flipped_never_panics() {
    let mut w = GgufWriter::new();
    let tokens: Vec<String> = (0..40).map(|i| format!("tok{i}")).collect();
    w.metadata("general.architecture", "llama")
        .metadata("llama.block_count", 1u32)
        .metadata("llama.embedding_length", 64u32)
        .metadata("llama.rope.freq_base", 10000.0f32)
        .metadata("tokenizer.ggml.tokens", tokens)
        .metadata("tokenizer.ggml.token_type", vec![1i32; 40])
        .metadata("tokenizer.ggml.merges", vec!["t o", "to k"])
        .metadata("tokenizer.ggml.add_bos_token", false)
        .tensor(
            "token_embd.weight",
            &[64, 40],
            DType::Q8_0,
            vec![0u8; 2 * 34 * 40],
        )
        .tensor("blk.0.attn_norm.weight", &[64], DType::F32, vec![0u8; 256])
        .tensor(
            "blk.0.attn_q.weight",
            &[64, 64],
            DType::Q4_1,
            vec![0u8; 2 * 20 * 64],
        )
        .tensor("output_norm.weight", &[64], DType::F32, vec![0u8; 256]);
    let mut bytes: Arc<[u8]> = w.to_bytes().expect("write").into();
    let header = GgufFile::from_bytes("synthetic.gguf", bytes.clone())
        .expect("parse")
        .data_offset as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let (mut parsed, mut refused) = (0, 0);
    for pos in 0..header {
        let r: u8 = rng.random_range(1..=255);
        for x in [0x01, 0x10, 0x80, 0xFF, r] {
            Arc::get_mut(&mut bytes).expect("unique")[pos] ^= x;
            if parse_no_panic(
                "synthetic.gguf",
                bytes.clone(),
                &format!("byte {pos} ^ {x:#04x}"),
            ) {
                parsed += 1;
            } else {
                refused += 1;
            }
            Arc::get_mut(&mut bytes).expect("unique")[pos] ^= x;
        }
    }
    eprintln!("synthetic: {header} header bytes, {parsed} flips parse, {refused} refused");
    assert!(parsed > 0 && refused > 0);
}
