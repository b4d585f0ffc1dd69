//! Unit tests on small hand-made vocabularies (the real-model fixtures are
//! in `engine/tests/tokenizer_fixtures.rs`).

use super::*;

/// A GPT-2 style vocabulary: three control tokens (ids 0..=2, SmolLM's
/// layout), the 256 byte characters, then the results of `merges`.
fn vocab(pre: &str, merges: &[&str]) -> TokenizerParts {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![TokenType::Control; 3];
    for b in 0..=255u8 {
        tokens.push(byte_level::byte_to_char(b).to_string());
        types.push(TokenType::Normal);
    }
    for m in merges {
        let joined = m.replacen(' ', "", 1);
        if !tokens.contains(&joined) {
            tokens.push(joined);
            types.push(TokenType::Normal);
        }
    }
    TokenizerParts {
        tokens,
        token_types: types,
        merges: merges.iter().map(|s| s.to_string()).collect(),
        pre: Some(pre.into()),
        bos_id: Some(1),
        eos_id: Some(2),
        unknown_id: Some(0),
        padding_id: Some(2),
        add_bos: Some(false),
        ..Default::default()
    }
}

fn smollm() -> Tokenizer {
    let merges = [
        "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "i m", "_ s", "H i",
    ];
    Tokenizer::new(vocab("smollm", &merges)).expect("valid vocabulary")
}

fn strs(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| t.token_str(i).unwrap_or("?").to_string())
        .collect()
}

#[test]
fn empty_string_is_no_tokens() {
    let t = smollm();
    assert!(t.encode("", true).is_empty());
    assert!(t.encode("", false).is_empty());
    assert!(t.encode_with_special("", true, true).is_empty());
    assert!(t.decode(&[]).is_empty());
}

#[test]
fn merges_and_round_trip() {
    let t = smollm();
    let ids = t.encode("Hi world", false);
    assert_eq!(strs(&t, &ids), ["Hi", "Ġworld"]);
    assert_eq!(t.decode(&ids), b"Hi world");
}

#[test]
fn digits_are_one_token_each() {
    let t = smollm();
    // "1 2" is a merge, but the smollm pre-tokenizer isolates every digit.
    let ids = t.encode("x 12345", false);
    assert_eq!(strs(&t, &ids), ["x", "Ġ", "1", "2", "3", "4", "5"]);
    // The plain GPT-2 pre-tokenizer keeps the run, so the merge applies.
    let gpt2 = Tokenizer::new(vocab("gpt-2", &["1 2", "Ġ 12"])).expect("valid");
    let ids = gpt2.encode("x 123", false);
    assert_eq!(strs(&gpt2, &ids), ["x", "Ġ12", "3"]);
}

#[test]
fn partial_control_token_next_to_real_ones() {
    let t = smollm();
    let text = "<|im_start <|im_start|><|im_end|>im_end|>";
    let ids = t.encode(text, true);
    assert_eq!(
        strs(&t, &ids),
        [
            "<",
            "|",
            "im",
            "_",
            "s",
            "t",
            "a",
            "r",
            "t",
            "Ġ",
            "<|im_start|>",
            "<|im_end|>",
            "im",
            "_",
            "e",
            "n",
            "d",
            "|",
            ">"
        ]
    );
    assert_eq!(t.decode(&ids), text.as_bytes());
    let plain = t.encode(text, false);
    assert!(plain.iter().all(|&id| id > 2), "{plain:?}");
    assert_eq!(t.decode(&plain), text.as_bytes());
}

#[test]
fn control_tokens_decode_to_their_text() {
    let t = smollm();
    assert_eq!(t.token_bytes(2), b"<|im_end|>");
    assert_eq!(t.token_bytes(3 + u32::from(b' ')), b" ");
    assert_eq!(t.token_bytes(u32::MAX), b"");
    assert_eq!(t.decode(&[1, 9_999_999, 2]), b"<|im_start|><|im_end|>");
}

#[test]
fn eog_ids_and_accessors() {
    let t = smollm();
    assert_eq!(t.eog_ids(), [0, 2]);
    assert!(t.is_eog(0) && t.is_eog(2) && !t.is_eog(1));
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert!(!t.add_bos());
    assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_to_id("nope"), None);
    assert_eq!(t.vocab_size(), 3 + 256 + 9);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsGpt2);
}

#[test]
fn add_special_follows_add_bos() {
    let mut parts = vocab("smollm", &[]);
    parts.add_bos = Some(true);
    let t = Tokenizer::new(parts).expect("valid");
    assert_eq!(
        t.encode_with_special("a", true, false),
        [1, 3 + u32::from(b'a')]
    );
    assert_eq!(
        t.encode_with_special("a", false, false),
        [3 + u32::from(b'a')]
    );
    assert_eq!(t.encode("a", false), [3 + u32::from(b'a')]);
}

#[test]
fn stream_decoder_holds_back_split_emoji() {
    let t = smollm();
    // No merges cover the emoji, so each of its 4 bytes is its own token.
    let ids = t.encode("a👨b", false);
    assert_eq!(ids.len(), 6);
    let mut d = t.stream_decoder();
    let out: Vec<String> = ids.iter().map(|&id| d.push(&t, id)).collect();
    assert_eq!(out, ["a", "", "", "", "👨", "b"]);
    assert!(d.finish().is_empty());
    // A cut-off character is dropped, never emitted as U+FFFD.
    assert_eq!(d.push(&t, ids[1]), "");
    assert_eq!(d.finish(), "👨".as_bytes()[..1]);
    assert_eq!(d.push(&t, ids[5]), "b");
}

#[test]
fn user_defined_tokens_split_even_without_parse_special() {
    let mut parts = vocab("gpt-2", &[]);
    parts.tokens.push("<tool>".into());
    parts.token_types.push(TokenType::UserDefined);
    let t = Tokenizer::new(parts).expect("valid");
    let id = t.token_to_id("<tool>").expect("present");
    assert_eq!(t.encode("a<tool>", false)[1..], [id]);
    assert_eq!(t.token_bytes(id), b"<tool>");
}

#[test]
fn longest_special_token_wins() {
    let mut parts = vocab("gpt-2", &[]);
    parts.tokens.push("<|im_end|>x".into());
    parts.token_types.push(TokenType::Control);
    let t = Tokenizer::new(parts).expect("valid");
    let long = t.token_to_id("<|im_end|>x").expect("present");
    assert_eq!(t.encode("<|im_end|>x<|im_end|>", true), [long, 2]);
}

#[test]
fn byte_tokens_decode_to_their_byte() {
    let mut parts = vocab("gpt-2", &[]);
    parts.tokens.push("<0xE2>".into());
    parts.token_types.push(TokenType::Byte);
    parts.tokens.push("<unused0>".into());
    parts.token_types.push(TokenType::Unused);
    let t = Tokenizer::new(parts).expect("valid");
    let n = t.vocab_size() as u32;
    assert_eq!(t.token_bytes(n - 2), [0xE2]);
    assert_eq!(t.token_bytes(n - 1), b"");
}

#[test]
fn eog_found_by_text_becomes_control() {
    let mut parts = vocab("gpt-2", &[]);
    parts.tokens.push("<|eot_id|>".into());
    parts.token_types.push(TokenType::Normal);
    parts.eos_id = None;
    parts.tokens[0] = "<s>".into();
    parts.tokens[2] = "</x>".into();
    let t = Tokenizer::new(parts).expect("valid");
    let eot = t.token_to_id("<|eot_id|>").expect("present");
    assert_eq!(t.eot_id(), Some(eot));
    assert_eq!(t.eog_ids(), [eot]);
    assert!(t.is_control(eot));
    assert_eq!(t.encode("a<|eot_id|>", true)[1..], [eot]);
}

#[test]
fn bad_parts_are_errors() {
    let msg = |p: TokenizerParts| match Tokenizer::new(p) {
        Ok(_) => String::from("<ok>"),
        Err(e) => e.to_string(),
    };
    let m = msg(vocab("qwen-unknown", &[]));
    assert!(
        m.contains("tokenizer.ggml.pre") && m.contains("qwen-unknown"),
        "{m}"
    );

    let mut p = vocab("smollm", &[]);
    p.eos_id = Some(100_000);
    let m = msg(p);
    assert!(
        m.contains("tokenizer.ggml.eos_token_id") && m.contains("100000"),
        "{m}"
    );

    let mut p = vocab("smollm", &[]);
    p.tokens[5] = p.tokens[6].clone();
    assert!(msg(p).contains("duplicate"));

    let mut p = vocab("smollm", &[]);
    p.token_types.truncate(10);
    assert!(msg(p).contains("tokenizer.ggml.token_type"));

    let mut p = vocab("smollm", &[]);
    p.add_bos = Some(true);
    p.bos_id = None;
    assert!(msg(p).contains("tokenizer.ggml.add_bos_token"));

    assert!(msg(TokenizerParts::default()).contains("empty vocabulary"));
}

#[test]
fn llama3_defaults_to_bos_and_ignores_merges() {
    let mut parts = vocab("llama-bpe", &["a b"]);
    parts.add_bos = None;
    // "abc" is a token but no merge builds it: ignore_merges finds it whole.
    parts.tokens.push("abc".into());
    parts.token_types.push(TokenType::Normal);
    let t = Tokenizer::new(parts).expect("valid");
    assert!(t.add_bos());
    let abc = t.token_to_id("abc").expect("present");
    assert_eq!(t.encode_with_special("abc", true, false), [1, abc]);
}

// --- from_gguf on tiny synthetic files -------------------------------------

enum Kv<'a> {
    Str(&'a str),
    Strs(&'a [&'a str]),
    I32s(&'a [i32]),
    U32(u32),
    Bool(bool),
}

fn write_gguf(kvs: &[(&str, Kv<'_>)]) -> tempfile_path::TempPath {
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        s(&mut b, k);
        match v {
            Kv::Str(v) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                s(&mut b, v);
            }
            Kv::Strs(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in *v {
                    s(&mut b, x);
                }
            }
            Kv::I32s(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&5u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in *v {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
            Kv::U32(v) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Kv::Bool(v) => {
                b.extend_from_slice(&7u32.to_le_bytes());
                b.push(u8::from(*v));
            }
        }
    }
    // Pad to the default alignment (the data section is empty).
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    tempfile_path::TempPath::with_contents(&b)
}

/// A file path removed on drop (no tempfile dependency).
mod tempfile_path {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) struct TempPath(PathBuf);

    impl TempPath {
        pub(super) fn with_contents(bytes: &[u8]) -> TempPath {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "pagoda-tok-test-{}-{}.gguf",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, bytes).expect("write temp file");
            TempPath(p)
        }
        pub(super) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn from_gguf_reads_metadata() {
    let f = write_gguf(&[
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str("smollm")),
        (
            "tokenizer.ggml.tokens",
            Kv::Strs(&["<|endoftext|>", "a", "b", "ab", "Ġ"]),
        ),
        ("tokenizer.ggml.token_type", Kv::I32s(&[3, 1, 1, 1, 1])),
        ("tokenizer.ggml.merges", Kv::Strs(&["a b"])),
        ("tokenizer.ggml.eos_token_id", Kv::U32(0)),
        ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
    ]);
    let g = GgufFile::open(f.path()).expect("open");
    let t = Tokenizer::from_gguf(&g).expect("tokenizer");
    assert_eq!(t.encode("ab a<|endoftext|>", true), [3, 4, 1, 0]);
    assert_eq!(t.eog_ids(), [0]);
    assert_eq!(t.bos_id(), None);
}

#[test]
fn from_gguf_errors_name_the_key() {
    let msg = |kvs: &[(&str, Kv<'_>)]| {
        let f = write_gguf(kvs);
        let g = GgufFile::open(f.path()).expect("open");
        match Tokenizer::from_gguf(&g) {
            Ok(_) => String::from("<ok>"),
            Err(e) => e.to_string(),
        }
    };
    let m = msg(&[("tokenizer.ggml.model", Kv::Str("rwkv"))]);
    assert!(
        m.contains("tokenizer.ggml.model") && m.contains("\"rwkv\""),
        "{m}"
    );
    assert!(m.contains("pagoda-tok-test-"), "names the file: {m}");
    let m = msg(&[
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.tokens", Kv::Strs(&["a"])),
    ]);
    assert!(m.contains("tokenizer.ggml.merges"), "{m}");
    let m = msg(&[
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str("nonesuch")),
        ("tokenizer.ggml.tokens", Kv::Strs(&["a"])),
        ("tokenizer.ggml.merges", Kv::Strs(&[])),
    ]);
    assert!(
        m.contains("tokenizer.ggml.pre") && m.contains("nonesuch"),
        "{m}"
    );
    assert!(m.contains("pagoda-tok-test-"), "names the file: {m}");
    let m = msg(&[
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str("gpt-2")),
        ("tokenizer.ggml.tokens", Kv::Strs(&["a"])),
        ("tokenizer.ggml.merges", Kv::Strs(&[])),
        ("tokenizer.ggml.bos_token_id", Kv::Str("1")),
    ]);
    assert!(m.contains("tokenizer.ggml.bos_token_id"), "{m}");
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    let tok = std::sync::Arc::new(smollm());
    let want = tok.encode("hello world", true);
    let got: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            let t = tok.clone();
            std::thread::spawn(move || t.encode("hello world", true))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(got.iter().all(|g| *g == want), "{got:?} vs {want:?}");
}

/// A tiny SPM vocabulary: `<unk>`, `<s>`, `</s>`, the byte tokens for
/// 'a', 'b' and '\n' only, then pieces with scores.
fn spm(pieces: &[(&str, f32)]) -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    let mut scores = vec![0.0; 3];
    for b in [b'a', b'b', b'\n'] {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TokenType::Byte);
        scores.push(0.0);
    }
    for &(p, s) in pieces {
        tokens.push(p.into());
        types.push(TokenType::Normal);
        scores.push(s);
    }
    Tokenizer::new(TokenizerParts {
        model: TokenizerModel::Spm,
        tokens,
        scores,
        token_types: types,
        bos_id: Some(1),
        eos_id: Some(2),
        unknown_id: Some(0),
        ..Default::default()
    })
    .expect("valid SPM vocabulary")
}

#[test]
fn spm_merges_the_highest_score_first() {
    // "▁abc": the pairs "▁a" (-5), "ab" (-1), "bc" (-2). The best, "ab",
    // merges first; then "▁ab" (-3) beats "abc" (-4).
    let vocab = [
        ("▁", -10.0),
        ("a", -10.0),
        ("b", -10.0),
        ("c", -10.0),
        ("▁a", -5.0),
        ("ab", -1.0),
        ("bc", -2.0),
        ("▁ab", -3.0),
        ("abc", -4.0),
    ];
    let t = spm(&vocab);
    let ids = t.encode("abc", false);
    assert_eq!(strs(&t, &ids), ["▁ab", "c"]);
    // Swap the scores of "▁ab" and "abc": now "▁" + "abc".
    let mut v2 = vocab;
    v2[7].1 = -4.0;
    v2[8].1 = -3.0;
    let t2 = spm(&v2);
    assert_eq!(strs(&t2, &t2.encode("abc", false)), ["▁", "abc"]);
    // decode(encode(x)) == x: the prefix space is dropped again.
    assert_eq!(t.decode(&ids), b"abc");
}

#[test]
fn spm_equal_scores_merge_leftmost_first() {
    // "aaa": "aa" at (0,1) and (1,2) tie; the left pair wins: "aa" "a".
    let t = spm(&[("a", 0.0), ("aa", -1.0)]);
    let tok = Tokenizer::new(TokenizerParts {
        add_space_prefix: Some(false),
        ..parts_of(&t)
    })
    .expect("valid");
    assert_eq!(strs(&tok, &tok.encode("aaa", false)), ["aa", "a"]);
    assert!(!tok.add_space_prefix());
    // Without the prefix, nothing is added or dropped.
    assert_eq!(tok.decode(&tok.encode("aaa", false)), b"aaa");
}

/// The parts of a tokenizer built by [`spm`] (rebuilt from its accessors).
fn parts_of(t: &Tokenizer) -> TokenizerParts {
    let n = t.vocab_size() as u32;
    TokenizerParts {
        model: t.model(),
        tokens: (0..n)
            .map(|i| t.token_str(i).unwrap_or("").to_string())
            .collect(),
        scores: (0..n).map(|i| t.score(i)).collect(),
        token_types: (0..n)
            .map(|i| t.token_type(i).unwrap_or(TokenType::Normal))
            .collect(),
        bos_id: t.bos_id(),
        eos_id: t.eos_id(),
        unknown_id: t.unknown_id(),
        ..Default::default()
    }
}

#[test]
fn spm_byte_fallback_and_unknown() {
    let t = spm(&[("▁", 0.0), ("x", 0.0)]);
    // 'a' and '\n' are not pieces: their byte tokens; 'é' (C3 A9) has no
    // byte token here, so each byte becomes <unk> (llama.cpp would throw).
    let ids = t.encode("xa\né", false);
    assert_eq!(
        strs(&t, &ids),
        ["▁", "x", "<0x61>", "<0x0A>", "<unk>", "<unk>"]
    );
    assert_eq!(t.decode(&ids[..4]), b"xa\n");
}

#[test]
fn spm_space_prefix_after_special_tokens_only() {
    let t = spm(&[("▁", 0.0), ("x", 0.0), ("▁x", 1.0)]);
    // Start of text and after </s>: "▁x"; spaces become "▁" too.
    let ids = t.encode("x</s>x x", true);
    assert_eq!(strs(&t, &ids), ["▁x", "</s>", "▁x", "▁x"]);
    // add_special: BOS (default true for SPM), no EOS.
    assert!(t.add_bos());
    assert_eq!(
        t.encode_with_special("x", true, true),
        [1, t.token_to_id("▁x").unwrap()]
    );
}

#[test]
fn spm_scores_of_the_wrong_length_are_an_error() {
    let r = Tokenizer::new(TokenizerParts {
        model: TokenizerModel::Spm,
        tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into()],
        scores: vec![0.0],
        ..Default::default()
    });
    let m = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(m.contains("tokenizer.ggml.scores"), "{m}");
}
