//! Unit tests of the parent module.

use super::*;

#[test]
fn use_more_bits_picks_fourteen_of_thirty_layers() {
    let picked: Vec<i64> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
    assert_eq!(
        picked,
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29],
        "first 3, last 4, every third from layer 3"
    );
}

#[test]
fn loader_order_is_by_layer_number_then_name() {
    let mut names = vec![
        "blk.10.attn_v.weight",
        "blk.2.ffn_up.weight",
        "token_embd.weight",
        "blk.2.attn_k.weight",
        "output_norm.weight",
    ];
    names.sort_by(|a, b| loader_order(a, b));
    assert_eq!(
        names,
        [
            "output_norm.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "blk.2.ffn_up.weight",
            "blk.10.attn_v.weight",
        ]
    );
}

/// A file with SmolLM2-135M's tensor names, widths and types (two rows each, so it is
/// small): 30 layers of width 576, FFN 1536, Q4_1 matrices, a Q8_0 embedding tied to the
/// output, F32 norms.
fn smollm2_like() -> GgufFile {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("llama.block_count", 30u32)
        .metadata("llama.attention.head_count", 9u32)
        .metadata("llama.attention.head_count_kv", 3u32);
    let add = |w: &mut GgufWriter, name: String, nx: usize, rows: usize, d: DType| {
        let bytes = vec![0u8; d.row_bytes(nx).unwrap() * rows];
        let shape: Vec<usize> = if rows == 1 { vec![nx] } else { vec![nx, rows] };
        w.tensor(name, &shape, d, bytes);
    };
    add(&mut w, "token_embd.weight".into(), 576, 2, DType::Q8_0);
    add(&mut w, "output_norm.weight".into(), 576, 1, DType::F32);
    for l in 0..30 {
        for (t, nx) in [
            ("attn_q", 576),
            ("attn_k", 576),
            ("attn_v", 576),
            ("attn_output", 576),
            ("ffn_gate", 576),
            ("ffn_up", 576),
            ("ffn_down", 1536),
        ] {
            add(&mut w, format!("blk.{l}.{t}.weight"), nx, 2, DType::Q4_1);
        }
        add(
            &mut w,
            format!("blk.{l}.attn_norm.weight"),
            576,
            1,
            DType::F32,
        );
        add(
            &mut w,
            format!("blk.{l}.ffn_norm.weight"),
            576,
            1,
            DType::F32,
        );
    }
    GgufFile::from_bytes("smollm2-like", w.to_bytes().unwrap()).unwrap()
}

fn census(mix: QuantMix) -> Vec<(String, usize)> {
    let f = smollm2_like();
    plan(&f, mix).unwrap().census(&f)
}

fn c(v: &[(&str, usize)]) -> Vec<(String, usize)> {
    v.iter().map(|(n, k)| (n.to_string(), *k)).collect()
}

#[test]
fn q4_k_m_census_of_the_default_model_is_llama_cpps() {
    // llama-quantize's choice for SmolLM2-135M (the figures).
    assert_eq!(
        census(QuantMix::Q4_K_M),
        c(&[
            ("Q5_0", 166),
            ("F32", 61),
            ("Q4_K", 16),
            ("Q8_0", 15),
            ("Q6_K", 14)
        ])
    );
}

#[test]
fn other_mixes_fall_back_where_576_is_not_256_wide() {
    assert_eq!(
        census(QuantMix::Q5_K_M),
        c(&[
            ("Q5_1", 166),
            ("F32", 61),
            ("Q5_K", 16),
            ("Q8_0", 15),
            ("Q6_K", 14)
        ])
    );
    assert_eq!(
        census(QuantMix::Q6_K),
        c(&[("Q8_0", 181), ("F32", 61), ("Q6_K", 30)])
    );
    // The tied embedding becomes the output: Q6_K, which falls back to Q8_0.
    assert_eq!(
        census(QuantMix::Q4_0),
        c(&[("Q4_0", 210), ("F32", 61), ("Q8_0", 1)])
    );
}

#[test]
fn tensors_already_in_their_type_are_copied_and_the_rest_counted_as_requantized() {
    let f = smollm2_like();
    let p = plan(&f, QuantMix::Q4_K_M).unwrap();
    let embd = p
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    assert_eq!(embd.to, None, "Q8_0 already");
    let q = p
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!((q.to, q.fallback), (Some(DType::Q5_0), true));
    let down = p
        .tensors
        .iter()
        .find(|t| t.name == "blk.3.ffn_down.weight")
        .unwrap();
    assert_eq!((down.to, down.fallback), (Some(DType::Q4_K), false));
    assert_eq!(p.requantized(), 210);
    // Q4_1 to Q4_1: the matrices stay, the tied embedding's Q6_K falls back to its Q8_0.
    assert_eq!(plan(&f, QuantMix::Q4_1).unwrap().requantized(), 0);
}

#[test]
fn a_width_no_type_divides_is_an_error_naming_the_tensor() {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("llama.block_count", 1u32)
        .tensor(
            "blk.0.attn_q.weight",
            &[48, 2],
            DType::F32,
            vec![0u8; 48 * 2 * 4],
        );
    let f = GgufFile::from_bytes("odd", w.to_bytes().unwrap()).unwrap();
    let e = plan(&f, QuantMix::Q4_0).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("48"), "{e}");
    // Q4_K falls back to Q5_0, which does not divide 48 either: F16.
    let p = plan(&f, QuantMix::Q4_K_M).unwrap();
    assert_eq!(p.tensors[0].to, Some(DType::F16));
}

#[test]
fn quantized_file_reads_back_with_the_planned_types_and_metadata() {
    let f = smollm2_like();
    let dir = std::env::temp_dir().join(format!("pagoda-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("q4km.gguf");
    let mut calls = 0;
    let r = quantize(&f, QuantMix::Q4_K_M, &out, 2, |i, n, _| {
        assert!(i < n);
        calls += 1;
    })
    .unwrap();
    assert_eq!(calls, f.tensors.len());
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_u64("general.file_type").unwrap(), 15);
    assert_eq!(g.get_u64("general.quantization_version").unwrap(), 2);
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    for t in &r.plan.tensors {
        let got = g.tensor(&t.name).unwrap();
        let want = t.to.or(f.tensors[t.index].dtype);
        assert_eq!(got.dtype, want, "{}", t.name);
    }
    assert_eq!(g.tensors[0].name, "output_norm.weight", "loader order");
    std::fs::remove_dir_all(&dir).ok();
}
