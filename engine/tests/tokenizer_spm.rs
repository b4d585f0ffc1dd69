//! The SentencePiece (SPM) tokenizer against the llama.cpp reference cases
//! (`tests/fixtures/reference/tokenization_spm.json`) on the vocab-only
//! Llama tokenizer file `tests/fixtures/reference/vocab/llama-spm.gguf`
//! (32,000 tokens, no tensors). Both are in the repository, so nothing is
//! fetched.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pagoda::gguf::GgufFile;
use pagoda::tokenizer::{TokenType, Tokenizer, TokenizerModel};
use serde_json::Value;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn vocab_path() -> PathBuf {
    reference_dir().join("vocab/llama-spm.gguf")
}

fn cases() -> Vec<(String, String, Vec<u32>)> {
    let p = reference_dir().join("tokenization_spm.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    doc["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect();
            (
                c["id"].as_str().expect("id").to_string(),
                c["text"].as_str().expect("text").to_string(),
                ids,
            )
        })
        .collect()
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let gguf = GgufFile::open(vocab_path()).unwrap_or_else(|e| panic!("{e}"));
        Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"))
    })
}

#[test]
fn vocab_only_file_reads_as_spm() {
    let gguf = GgufFile::open(vocab_path()).expect("open vocab-only GGUF");
    // The file holds the vocabulary only: 0 tensors.
    assert!(gguf.tensors.is_empty(), "{} tensors", gguf.tensors.len());
    let t = tokenizer();
    assert_eq!(t.model(), TokenizerModel::Spm);
    // Llama's SPM vocabulary: 32000 tokens, <unk>=0, <s>=1, </s>=2.
    assert_eq!(t.vocab_size(), 32000);
    assert_eq!(t.unknown_id(), Some(0));
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert!(t.add_bos(), "llama SPM prepends BOS by default");
    assert!(
        t.add_space_prefix(),
        "llama SPM adds the leading ▁ by default"
    );
    assert!(t.is_eog(2), "</s> ends generation");
    // Byte tokens <0x00>..<0xFF> are ids 3..=258 with type Byte.
    assert_eq!(t.token_to_id("<0x0A>"), Some(13));
    assert_eq!(t.token_type(13), Some(TokenType::Byte));
}

#[test]
fn every_reference_case_gives_llama_cpp_ids() {
    let t = tokenizer();
    let cases = cases();
    // The fixture holds 23 cases; a broken read would make this pass vacuously.
    assert_eq!(cases.len(), 23);
    let mut failed = Vec::new();
    for (id, text, want) in &cases {
        // Metric: exact id sequence (add_special = false, parse_special = false).
        let got = t.encode_with_special(text, false, false);
        if &got != want {
            failed.push(format!("{id} {text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} cases differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn every_reference_case_decodes_back_to_its_text() {
    let t = tokenizer();
    for (id, text, want) in cases() {
        // Metric: byte equality of decode(reference ids) with the text.
        assert_eq!(
            String::from_utf8_lossy(&t.decode(&want)),
            text,
            "{id}: decode of the reference ids"
        );
        // And of our own ids (parse_special on: no control text in these).
        let ids = t.encode(&text, true);
        assert_eq!(t.decode(&ids), text.as_bytes(), "{id}: round trip");
    }
}

#[test]
fn byte_fallback_spells_unknown_characters_as_bytes() {
    let t = tokenizer();
    // 🦙 (F0 9F A6 99) is not in the vocabulary: after the "▁" token
    // (29871) come its four byte tokens <0xF0> <0x9F> <0xA6> <0x99>, which
    // are ids 3 + byte.
    let ids = t.encode_with_special("🦙", false, false);
    assert_eq!(ids, [29871, 3 + 0xF0, 3 + 0x9F, 3 + 0xA6, 3 + 0x99]);
    for &id in &ids[1..] {
        assert_eq!(t.token_type(id), Some(TokenType::Byte), "id {id}");
    }
    // A control character with no token of its own: \u{1} is <0x01> = 4.
    assert_eq!(t.encode_with_special("a\u{1}", false, false)[1..], [4]);
    // Byte tokens decode to the raw bytes; the 4 together are the emoji.
    assert_eq!(t.decode(&ids), "🦙".as_bytes());
    assert_eq!(t.token_bytes(3 + 0xF0), [0xF0]);
}

#[test]
fn add_special_prepends_bos_and_parse_special_cuts_control_text() {
    let t = tokenizer();
    let plain = t.encode_with_special("Hello", false, false);
    // Metric: BOS (1) then exactly the plain ids.
    let with_bos = t.encode_with_special("Hello", true, false);
    assert_eq!(with_bos[0], 1);
    assert_eq!(with_bos[1..], plain[..]);
    // Empty text with add_special is [BOS] only, as SentencePiece.
    assert_eq!(t.encode_with_special("", true, false), [1]);
    // With parse_special, "</s>" is the EOS token and the text after it gets
    // the space prefix again (it follows a special token).
    let ids = t.encode_with_special("Hello</s>Hello", false, true);
    assert_eq!(ids, [plain.clone(), vec![2], plain.clone()].concat());
    // Without it, "</s>" is spelled out in ordinary pieces.
    let ids = t.encode_with_special("</s>", false, false);
    assert!(!ids.contains(&2) && ids.len() > 1, "{ids:?}");
    assert_eq!(t.decode(&ids), b"</s>");
}

#[test]
fn decode_drops_only_the_first_leading_space() {
    let t = tokenizer();
    let hello = t.token_to_id("▁Hello").expect("▁Hello");
    // "▁Hello▁Hello" decodes to "Hello Hello": the prefix space of the first
    // piece goes, the second stays; token_bytes keeps every space.
    assert_eq!(t.decode(&[hello, hello]), b"Hello Hello");
    assert_eq!(t.token_bytes(hello), b" Hello");
    let mut d = t.stream_decoder();
    assert_eq!(d.push(t, hello), " Hello");
}
