//! The tokenizer against the llama.cpp reference fixtures
//! (`tests/fixtures/reference/`), on the real SmolLM2-135M-Instruct model.
//!
//! Set `PAGODA_MODEL` to use another GGUF file; by default the model is
//! fetched on first use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pagoda::gguf::GgufFile;
use pagoda::tokenizer::Tokenizer;
use serde_json::Value;

/// The default model (fetched on first use), or `$PAGODA_MODEL`.
fn model_path() -> PathBuf {
    match std::env::var_os("PAGODA_MODEL") {
        Some(p) => PathBuf::from(p),
        None => pagoda::fetch::default_model_path()
            .unwrap_or_else(|e| panic!("default model unavailable: {e}")),
    }
}

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The model's tokenizer.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let gguf = GgufFile::open(model_path()).unwrap_or_else(|e| panic!("{e}"));
        Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn tokenizer_header_ids_match() {
    let t = tokenizer();
    let f = fixture("tokenization.json");
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_id(), Some(f["bos_id"].as_u64().expect("bos") as u32));
    assert_eq!(t.eos_id(), Some(f["eos_id"].as_u64().expect("eos") as u32));
    assert_eq!(t.eog_ids(), ids(&f["eog_ids"]));
    assert_eq!(t.eog_ids(), [0, 2]);
    assert_eq!(t.add_bos(), f["add_bos"].as_bool().expect("add_bos"));
    assert_eq!(t.pre_tokenizer_name(), "smollm");
}

#[test]
fn tokenizer_tokenization_cases_match_llama_cpp() {
    let t = tokenizer();
    let f = fixture("tokenization.json");
    let cases = f["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    let (mut ok_special, mut ok_plain) = (0, 0);
    for c in cases {
        let id = c["id"].as_str().expect("id");
        let text = c["text"].as_str().expect("text");
        assert_eq!(
            text.as_bytes(),
            hex(c["text_utf8_hex"].as_str().expect("hex")),
            "{id}"
        );
        for (parse_special, key) in [(true, "ids_parse_special"), (false, "ids_no_parse_special")] {
            let want = ids(&c[key]);
            let got = t.encode(text, parse_special);
            if got == want {
                if parse_special {
                    ok_special += 1;
                } else {
                    ok_plain += 1;
                }
            } else {
                failures.push(format!(
                    "{id} {key}: {text:?}\n  want {want:?}\n  got  {got:?}"
                ));
            }
            assert_eq!(t.decode(&got), text.as_bytes(), "{id} {key}: round trip");
        }
        // The vocabulary strings of the reference ids.
        let strs: Vec<&str> = ids(&c["ids_parse_special"])
            .iter()
            .map(|&i| t.token_str(i).expect("in vocab"))
            .collect();
        let want: Vec<&str> = c["vocab_strings_parse_special"]
            .as_array()
            .expect("strings")
            .iter()
            .map(|s| s.as_str().expect("str"))
            .collect();
        assert_eq!(strs, want, "{id}");
    }
    eprintln!(
        "tokenization fixtures: parse_special {ok_special}/{n}, no_parse_special {ok_plain}/{n}",
        n = cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tokenizer_prompt_tokens_of_other_fixtures_match() {
    let t = tokenizer();
    for file in ["greedy.json", "logits_last.json"] {
        for c in fixture(file)["cases"].as_array().expect("cases") {
            let text = c["prompt_text"].as_str().expect("prompt_text");
            let parse_special = c["parse_special"].as_bool().expect("parse_special");
            assert_eq!(
                t.encode(text, parse_special),
                ids(&c["prompt_tokens"]),
                "{file} {}",
                c["id"]
            );
        }
    }
    for c in fixture("argmax_positions.json")["cases"]
        .as_array()
        .expect("cases")
    {
        let text = c["prompt_text_of_tokens"].as_str().expect("text");
        let want = ids(&c["prompt_tokens"]);
        assert_eq!(t.decode(&want), text.as_bytes());
        assert_eq!(t.encode(text, true), want);
    }
}

#[test]
fn tokenizer_generated_pieces_decode_like_llama_cpp() {
    let t = tokenizer();
    for c in fixture("greedy.json")["cases"].as_array().expect("cases") {
        let toks = ids(&c["generated_tokens"]);
        let pieces: Vec<Vec<u8>> = c["generated_pieces_hex"]
            .as_array()
            .expect("pieces")
            .iter()
            .map(|p| hex(p.as_str().expect("hex")))
            .collect();
        assert_eq!(toks.len(), pieces.len());
        for (&id, piece) in toks.iter().zip(&pieces) {
            assert_eq!(
                t.token_bytes(id),
                piece.as_slice(),
                "{} token {id}",
                c["id"]
            );
        }
        let mut d = t.stream_decoder();
        let text: String = toks.iter().map(|&id| d.push(t, id)).collect();
        assert!(d.finish().is_empty(), "{}: cut inside a character", c["id"]);
        assert_eq!(
            text,
            c["generated_text"].as_str().expect("text"),
            "{}",
            c["id"]
        );
        if c["stop_reason"] == "eog" {
            assert!(toks.last().is_some_and(|&id| t.is_eog(id)));
        }
    }
}

#[test]
fn tokenizer_perplexity_text_is_2052_tokens() {
    let t = tokenizer();
    let f = fixture("perplexity.json");
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/ppl_text.txt");
    let text = std::fs::read_to_string(&p).expect("ppl_text.txt");
    let start = std::time::Instant::now();
    let got = t.encode(&text, true);
    let dt = start.elapsed();
    eprintln!(
        "ppl_text.txt: {} bytes -> {} tokens in {dt:?}",
        text.len(),
        got.len()
    );
    assert_eq!(got.len() as u64, f["n_tokens"].as_u64().expect("n_tokens"));
    assert_eq!(t.decode(&got), text.as_bytes());
}

/// Edge cases beyond the reference set (whitespace-only and trailing
/// space, exotic whitespace, non-ASCII digits, scripts, marks, emoji, code,
/// more control tokens). Expected ids came from HF `tokenizers` built from
/// the same GGUF vocabulary, which agrees with llama.cpp on every reference
/// case; see `tests/data/tokenizer_extra_cases.json`.
#[test]
fn tokenizer_extra_cases_match() {
    let t = tokenizer();
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer_extra_cases.json");
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("extra cases")).expect("json");
    let mut failures = Vec::new();
    for c in f["cases"].as_array().expect("cases") {
        let text = c["text"].as_str().expect("text");
        for (parse_special, key) in [(true, "ids_parse_special"), (false, "ids_no_parse_special")] {
            let got = t.encode(text, parse_special);
            if got != ids(&c[key]) {
                failures.push(format!(
                    "{key}: {text:?}\n  want {:?}\n  got  {got:?}",
                    ids(&c[key])
                ));
            }
            assert_eq!(t.decode(&got), text.as_bytes(), "{text:?}: round trip");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
