//! K-quant and Q5 dequantization against llama.cpp's blocks (issue 15 item 1):
//! `tests/fixtures/reference/kquant_rows.json` (made by llama-quantize, dequantized by the
//! `gguf` Python package; its README says how).

use pagoda_backend::{DType, kquant, kquantize, quant};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/reference/kquant_rows.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn num(v: &Value) -> usize {
    v.as_u64()
        .map(|n| n as usize)
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .expect("a number")
}

fn floats(v: &Value) -> Vec<f32> {
    let arr = match v {
        Value::String(s) => serde_json::from_str::<Value>(s).expect("array text"),
        other => other.clone(),
    };
    arr.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_k_quant_and_q5_row_dequantizes_bit_exactly() {
    let fx = fixture();
    let mut seen = std::collections::BTreeMap::new();
    for c in fx["cases"].as_array().expect("cases") {
        let ty = c["type"].as_str().expect("type");
        let Some((block, bytes, decode)) = kquant::block_format(ty) else {
            assert_eq!(ty, "Q8_0", "a type without a decoder");
            continue;
        };
        let n = num(&c["row_len"]);
        let raw = hex(c["quantized_hex"].as_str().expect("hex"));
        assert_eq!(raw.len(), num(&c["bytes_per_row"]), "{ty} row bytes");
        assert_eq!(raw.len(), n / block * bytes, "{ty} block size");
        let want = floats(&c["dequantized_f32"]);
        let mut got = vec![0f32; n];
        for (o, b) in got.chunks_exact_mut(block).zip(raw.chunks_exact(bytes)) {
            decode(b, o);
        }
        // Metric: every element's bits; bound: identical (f16 scale x integer in f32).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{ty} {} row {} element {i}: {g} vs {w}",
                c["tensor"],
                c["row"]
            );
        }
        *seen.entry(ty.to_string()).or_insert(0) += 1;
    }
    // Every type of the fixture was checked (4 rows each).
    for ty in ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"] {
        assert_eq!(seen.get(ty), Some(&4), "{ty} rows checked");
    }
}

#[test]
fn every_row_quantizes_to_llama_cpps_bytes() {
    let fx = fixture();
    let mut seen = std::collections::BTreeMap::new();
    for c in fx["cases"].as_array().expect("cases") {
        let ty = c["type"].as_str().expect("type");
        let src = floats(&c["source_f32"]);
        let want = hex(c["quantized_hex"].as_str().expect("hex"));
        let mut got = vec![0u8; want.len()];
        match kquantize::block_encoder(ty) {
            Some((block, bytes, encode)) => {
                for (x, b) in src.chunks_exact(block).zip(got.chunks_exact_mut(bytes)) {
                    encode(x, b);
                }
            }
            None => {
                assert_eq!(ty, "Q8_0", "a type without a quantizer");
                quant::quantize_row(DType::Q8_0, &src, &mut got).expect("q8_0");
            }
        }
        // Metric: the row's bytes; bound: identical to llama-quantize's.
        if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
            panic!(
                "{ty} {} row {}: first differing byte {i} ({:#04x} vs {:#04x})",
                c["tensor"], c["row"], got[i], want[i]
            );
        }
        *seen.entry(ty.to_string()).or_insert(0) += 1;
    }
    for ty in ["Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"] {
        assert_eq!(seen.get(ty), Some(&4), "{ty} rows checked");
    }
}
