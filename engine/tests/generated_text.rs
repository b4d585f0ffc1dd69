//! The text `pagoda generate` prints and reports: no end-of-generation token
//! text, no U+FFFD for a character cut by `--max-tokens`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn pagoda(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .output()
        .expect("pagoda runs")
}

fn stdout_text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout_text(out)).expect("one JSON document")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Greedily, the default model answers this with "🍨🍨…", each 🍨 (4 bytes)
/// being three tokens: [10813, 231, 118].
const EMOJI_PROMPT: &str =
    "<|im_start|>user\nWrite three emojis of food.<|im_end|>\n<|im_start|>assistant\n";

fn emoji_run(max_tokens: usize, json_out: bool) -> Output {
    let n = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--prompt",
        EMOJI_PROMPT,
        "--max-tokens",
        &n,
        "--greedy",
    ];
    if json_out {
        args.push("--json");
    }
    pagoda(&args)
}

/// Item 7: a reply cut inside a UTF-8 character holds the incomplete
/// character back instead of ending in U+FFFD, in `--json` and streamed.
#[test]
fn a_character_cut_by_max_tokens_is_held_back_not_replaced() {
    // 2 tokens: the first 3 bytes of 🍨; 4 and 5: 🍨 and part of the next.
    for (n, want) in [(2, ""), (4, "🍨"), (5, "🍨")] {
        let doc = json(&emoji_run(n, true));
        let toks = ids(&doc["generated_tokens"]);
        assert_eq!(toks.len(), n);
        let emoji = [10813, 231, 118];
        assert_eq!(
            toks,
            emoji.iter().cycle().take(n).copied().collect::<Vec<u64>>(),
            "the greedy reply changed: {doc}"
        );
        let text = doc["text"].as_str().unwrap();
        assert_eq!(text, want, "--max-tokens {n} --json");
        assert!(!text.contains('\u{FFFD}'));
        let streamed = stdout_text(&emoji_run(n, false));
        assert_eq!(streamed.trim_end_matches('\n'), want, "--max-tokens {n}");
    }
}

fn fixture_case(id: &str) -> serde_json::Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/greedy.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
        .clone()
}

/// Item 8: the end-of-generation token ends the reply but is not text: its id
/// stays in `generated_tokens`; `text` and the streamed output lack its piece.
#[test]
fn the_end_of_generation_token_is_not_text() {
    let case = fixture_case("gen05");
    assert_eq!(case["stop_reason"], "eog");
    let prompt = case["prompt_text"].as_str().unwrap();
    let run = |json_out: bool| {
        let mut args = vec![
            "generate",
            "--prompt",
            prompt,
            "--max-tokens",
            "32",
            "--greedy",
        ];
        if json_out {
            args.push("--json");
        }
        pagoda(&args)
    };
    let doc = json(&run(true));
    assert_eq!(doc["stop_reason"], "eog");
    assert_eq!(
        ids(&doc["generated_tokens"]),
        ids(&case["generated_tokens"])
    );
    assert_eq!(
        *ids(&doc["generated_tokens"]).last().unwrap(),
        2,
        "<|im_end|>"
    );
    // The fixture's text includes the EOG piece; the engine's does not.
    let want = case["generated_text"]
        .as_str()
        .unwrap()
        .strip_suffix("<|im_end|>")
        .expect("fixture text ends with <|im_end|>");
    assert_eq!(doc["text"].as_str().unwrap(), want);
    let streamed = stdout_text(&run(false));
    assert_eq!(streamed.trim_end_matches('\n'), want);
    assert!(!streamed.contains("<|im_end|>"));
}
