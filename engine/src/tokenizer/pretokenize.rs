//! The pre-tokenizer: splits text into the pieces ("words") that BPE
//! merges never cross, exactly as llama.cpp's `unicode_regex_split` does
//! for the supported `tokenizer.ggml.pre` types.
//!
//! llama.cpp applies a list of regexes in sequence. Each regex splits every
//! piece produced so far into its matches and the unmatched gaps between
//! them (both are kept). The GPT-2 and Llama-3 regexes are hand-coded there
//! (`unicode_regex_split_custom_gpt2/llama3`) and are ported here line by
//! line, quirks included; the simple class regexes (`\p{N}`,
//! `[\p{P}...]+`, `\p{N}+`, `[0-9][0-9][0-9]`) are written out by hand with
//! std::regex leftmost-match semantics.
//!
//! Invariants: the pieces are non-empty, in order, and concatenate to the
//! input; character classes are Unicode 15.1 general categories (see
//! `unicode.rs`), whitespace is the `White_Space` property.

use super::unicode::{Class, Flags};

/// A supported `tokenizer.ggml.pre` family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's default (missing or `"default"`): punctuation runs, the
    /// GPT-2 regex, number runs, then groups of three ASCII digits.
    Default,
    /// The GPT-2 regex alone (`gpt-2`, `mpt`, `olmo`, ...).
    Gpt2,
    /// Every `\p{N}` code point isolated, then the GPT-2 regex (`smollm`,
    /// `starcoder`, `refact`, `command-r`, ...).
    DigitsGpt2,
    /// Falcon: punctuation runs (with backtick), the GPT-2 regex, then
    /// groups of three ASCII digits.
    Falcon,
    /// The Llama-3 regex (`llama-bpe`, `llama3`, `dbrx`, ...).
    Llama3,
}

/// `(tokenizer.ggml.pre value, family, ignore_merges, default add_bos)`,
/// after llama.cpp's `llama_vocab::impl::load`.
const NAMES: &[(&str, PreTokenizer, bool, bool)] = &[
    ("default", PreTokenizer::Default, false, false),
    ("gpt-2", PreTokenizer::Gpt2, false, false),
    ("phi-2", PreTokenizer::Gpt2, false, false),
    ("gigachat", PreTokenizer::Gpt2, false, false),
    ("a.x-4.0", PreTokenizer::Gpt2, false, false),
    ("mellum", PreTokenizer::Gpt2, false, false),
    ("mpt", PreTokenizer::Gpt2, false, false),
    ("olmo", PreTokenizer::Gpt2, false, false),
    ("jais", PreTokenizer::Gpt2, false, false),
    ("trillion", PreTokenizer::Gpt2, false, false),
    ("granite-docling", PreTokenizer::Gpt2, false, false),
    ("exaone4", PreTokenizer::Gpt2, false, false),
    ("smollm", PreTokenizer::DigitsGpt2, false, false),
    ("starcoder", PreTokenizer::DigitsGpt2, false, false),
    ("refact", PreTokenizer::DigitsGpt2, false, false),
    ("command-r", PreTokenizer::DigitsGpt2, false, false),
    ("codeshell", PreTokenizer::DigitsGpt2, false, false),
    ("exaone", PreTokenizer::DigitsGpt2, false, false),
    ("minerva-7b", PreTokenizer::DigitsGpt2, false, false),
    ("mellum2", PreTokenizer::DigitsGpt2, false, false),
    ("falcon", PreTokenizer::Falcon, false, false),
    ("llama3", PreTokenizer::Llama3, true, true),
    ("llama-v3", PreTokenizer::Llama3, true, true),
    ("llama-bpe", PreTokenizer::Llama3, true, true),
    ("falcon3", PreTokenizer::Llama3, true, true),
    ("falcon-h1", PreTokenizer::Llama3, true, true),
    ("pixtral", PreTokenizer::Llama3, true, true),
    ("midm-2.0", PreTokenizer::Llama3, true, true),
    ("lfm2", PreTokenizer::Llama3, true, true),
    ("dbrx", PreTokenizer::Llama3, false, false),
    ("smaug-bpe", PreTokenizer::Llama3, false, false),
];

/// How a `tokenizer.ggml.pre` value configures the tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PreConfig {
    pub(crate) kind: PreTokenizer,
    /// A piece that is itself a vocabulary token skips the merges.
    pub(crate) ignore_merges: bool,
    /// `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
    pub(crate) default_add_bos: bool,
}

impl PreTokenizer {
    /// The configuration for a `tokenizer.ggml.pre` value, or `None` if
    /// llama.cpp's name is not one this engine implements.
    pub(crate) fn config(name: &str) -> Option<PreConfig> {
        NAMES
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|&(_, kind, ignore_merges, default_add_bos)| PreConfig {
                kind,
                ignore_merges,
                default_add_bos,
            })
    }

    /// The supported `tokenizer.ggml.pre` values, for error messages.
    pub fn supported_names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(n, ..)| *n)
    }

    fn steps(self) -> &'static [Step] {
        match self {
            PreTokenizer::Default => &[
                Step::Runs(Pred::PunctPlus("$+<=>^~|")),
                Step::Gpt2,
                Step::Runs(Pred::Number),
                Step::AsciiDigits3,
            ],
            PreTokenizer::Gpt2 => &[Step::Gpt2],
            PreTokenizer::DigitsGpt2 => &[Step::Each(Pred::Number), Step::Gpt2],
            PreTokenizer::Falcon => &[
                Step::Runs(Pred::PunctPlus("$+<=>^~|`")),
                Step::Gpt2,
                Step::AsciiDigits3,
            ],
            PreTokenizer::Llama3 => &[Step::Llama3],
        }
    }

    /// Splits `text` into pre-tokens (byte ranges of `text`, in order,
    /// covering it).
    pub(crate) fn split(self, text: &str) -> Vec<std::ops::Range<usize>> {
        let mut cps: Vec<char> = Vec::with_capacity(text.len());
        let mut byte_at: Vec<usize> = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            cps.push(c);
            byte_at.push(i);
        }
        byte_at.push(text.len());
        if cps.is_empty() {
            return Vec::new();
        }
        let flags: Vec<Flags> = cps.iter().map(|&c| Flags::of(c)).collect();
        let seq = Seq {
            cps: &cps,
            flags: &flags,
        };

        let mut lens = vec![cps.len()];
        for step in self.steps() {
            let mut out = Vec::with_capacity(lens.len() * 2);
            let mut start = 0;
            for &len in &lens {
                let (ini, end) = (start, start + len);
                start = end;
                match *step {
                    Step::Each(p) => seq.split_class(ini, end, p, false, &mut out),
                    Step::Runs(p) => seq.split_class(ini, end, p, true, &mut out),
                    Step::AsciiDigits3 => seq.split_digits3(ini, end, &mut out),
                    Step::Gpt2 => seq.split_gpt2(ini, end, &mut out),
                    Step::Llama3 => seq.split_llama3(ini, end, &mut out),
                }
            }
            lens = out;
        }

        let mut ranges = Vec::with_capacity(lens.len());
        let mut start = 0;
        for len in lens {
            ranges.push(byte_at[start]..byte_at[start + len]);
            start += len;
        }
        ranges
    }
}

/// A code-point class used by the simple regexes.
#[derive(Clone, Copy, Debug)]
enum Pred {
    /// `\p{N}`
    Number,
    /// `[\p{P}` + these ASCII characters + `]`
    PunctPlus(&'static str),
}

/// One regex of llama.cpp's list.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Each code point of the class is a match (`\p{N}`).
    Each(Pred),
    /// Maximal runs of the class are matches (`\p{N}+`, `[\p{P}...]+`).
    Runs(Pred),
    /// `[0-9][0-9][0-9]`, leftmost first.
    AsciiDigits3,
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
    Gpt2,
    /// `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
}

/// The text as code points, with their flags.
struct Seq<'a> {
    cps: &'a [char],
    flags: &'a [Flags],
}

/// Pushes the piece `[*prev, end)` if it is not empty and moves `prev`.
fn add(out: &mut Vec<usize>, prev: &mut usize, end: usize) -> usize {
    let len = end - *prev;
    if len > 0 {
        out.push(len);
    }
    *prev = end;
    len
}

impl Seq<'_> {
    fn matches(&self, i: usize, p: Pred) -> bool {
        let f = self.flags[i];
        match p {
            Pred::Number => f.number(),
            // llama.cpp maps non-ASCII whitespace to \x0B before matching.
            Pred::PunctPlus(extra) => {
                !f.ws && (f.class == Class::Punct || extra.contains(self.cps[i]))
            }
        }
    }

    fn split_class(&self, ini: usize, end: usize, p: Pred, runs: bool, out: &mut Vec<usize>) {
        let mut prev = ini;
        let mut pos = ini;
        while pos < end {
            if self.matches(pos, p) {
                add(out, &mut prev, pos);
                pos += 1;
                if runs {
                    while pos < end && self.matches(pos, p) {
                        pos += 1;
                    }
                }
                add(out, &mut prev, pos);
            } else {
                pos += 1;
            }
        }
        add(out, &mut prev, end);
    }

    fn split_digits3(&self, ini: usize, end: usize, out: &mut Vec<usize>) {
        let mut prev = ini;
        let mut pos = ini;
        while pos < end {
            if pos + 3 <= end && self.cps[pos..pos + 3].iter().all(|c| c.is_ascii_digit()) {
                add(out, &mut prev, pos);
                pos += 3;
                add(out, &mut prev, pos);
            } else {
                pos += 1;
            }
        }
        add(out, &mut prev, end);
    }

    /// Port of `unicode_regex_split_custom_gpt2`.
    fn split_gpt2(&self, ini: usize, end: usize, out: &mut Vec<usize>) {
        let cpt = |p: usize| if p < end { Some(self.cps[p]) } else { None };
        let fl = |p: usize| if p < end { Some(self.flags[p]) } else { None };
        let letter = |f: Option<Flags>| f.is_some_and(|f| f.letter());
        let number = |f: Option<Flags>| f.is_some_and(|f| f.number());
        // `[^\s\p{L}\p{N}]` on an in-range code point.
        let other = |f: Option<Flags>| f.is_some_and(|f| !f.ws && !f.letter() && !f.number());
        let ws = |f: Option<Flags>| f.is_some_and(|f| f.ws);

        let mut prev = ini;
        let mut pos = ini;
        while pos < end {
            let c = self.cps[pos];
            let f = self.flags[pos];

            // 's|'t|'re|'ve|'m|'ll|'d
            if c == '\'' && pos + 1 < end {
                let n = self.cps[pos + 1];
                if matches!(n, 's' | 't' | 'm' | 'd') {
                    pos += add(out, &mut prev, pos + 2);
                    continue;
                }
                if pos + 2 < end {
                    let nn = self.cps[pos + 2];
                    if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        pos += add(out, &mut prev, pos + 3);
                        continue;
                    }
                }
            }

            let f2 = if c == ' ' { fl(pos + 1) } else { Some(f) };
            //  ?\p{L}+
            if letter(f2) {
                pos += usize::from(c == ' ');
                while letter(fl(pos)) {
                    pos += 1;
                }
                add(out, &mut prev, pos);
                continue;
            }
            //  ?\p{N}+
            if number(f2) {
                pos += usize::from(c == ' ');
                while number(fl(pos)) {
                    pos += 1;
                }
                add(out, &mut prev, pos);
                continue;
            }
            //  ?[^\s\p{L}\p{N}]+
            if other(f2) {
                pos += usize::from(c == ' ');
                while other(fl(pos)) {
                    pos += 1;
                }
                add(out, &mut prev, pos);
                continue;
            }

            let mut n_ws = 0;
            while ws(fl(pos + n_ws)) {
                n_ws += 1;
            }
            // \s+(?!\S)
            if n_ws > 1 && cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                add(out, &mut prev, pos);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                add(out, &mut prev, pos);
                continue;
            }
            // no match
            pos += 1;
            add(out, &mut prev, pos);
        }
    }

    /// Port of `unicode_regex_split_custom_llama3`.
    fn split_llama3(&self, ini: usize, end: usize, out: &mut Vec<usize>) {
        let cpt = |p: usize| if p < end { Some(self.cps[p]) } else { None };
        let fl = |p: usize| if p < end { Some(self.flags[p]) } else { None };
        let letter = |f: Option<Flags>| f.is_some_and(|f| f.letter());
        let number = |f: Option<Flags>| f.is_some_and(|f| f.number());
        let other = |f: Option<Flags>| f.is_some_and(|f| !f.ws && !f.letter() && !f.number());
        let ws = |f: Option<Flags>| f.is_some_and(|f| f.ws);
        let is_rn = |c: Option<char>| matches!(c, Some('\r' | '\n'));

        let mut prev = ini;
        let mut pos = ini;
        while pos < end {
            let c = self.cps[pos];
            let f = self.flags[pos];

            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if c == '\'' && pos + 1 < end {
                let n = self.cps[pos + 1].to_ascii_lowercase();
                if matches!(n, 's' | 't' | 'm' | 'd') {
                    pos += add(out, &mut prev, pos + 2);
                    continue;
                }
                if pos + 2 < end {
                    let nn = self.cps[pos + 2].to_ascii_lowercase();
                    if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        pos += add(out, &mut prev, pos + 3);
                        continue;
                    }
                }
            }

            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(c == '\r' || c == '\n' || f.number()) && (f.letter() || letter(fl(pos + 1))) {
                pos += 1;
                while letter(fl(pos)) {
                    pos += 1;
                }
                add(out, &mut prev, pos);
                continue;
            }

            // \p{N}{1,3}
            if f.number() {
                let mut first = pos;
                while number(fl(pos)) {
                    pos += 1;
                    if pos - first >= 3 {
                        add(out, &mut prev, pos);
                        first = pos;
                    }
                }
                add(out, &mut prev, pos);
                continue;
            }

            //  ?[^\s\p{L}\p{N}]+[\r\n]*
            // (llama.cpp tests the second condition on `flags`, which is
            // always set inside the piece: a lone trailing space enters here)
            let f2 = if c == ' ' { fl(pos + 1) } else { Some(f) };
            if !f2.is_some_and(|f| f.ws || f.letter() || f.number()) {
                pos += usize::from(c == ' ');
                while other(fl(pos)) {
                    pos += 1;
                }
                while is_rn(cpt(pos)) {
                    pos += 1;
                }
                add(out, &mut prev, pos);
                continue;
            }

            let mut n_ws = 0;
            let mut last_rn_end = 0;
            while ws(fl(pos + n_ws)) {
                if is_rn(cpt(pos + n_ws)) {
                    last_rn_end = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            // \s*[\r\n]+
            if last_rn_end > 0 {
                pos = last_rn_end;
                add(out, &mut prev, pos);
                continue;
            }
            // \s+(?!\S)
            if n_ws > 1 && cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                add(out, &mut prev, pos);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                add(out, &mut prev, pos);
                continue;
            }
            // no match
            pos += 1;
            add(out, &mut prev, pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(kind: PreTokenizer, text: &str) -> Vec<&str> {
        let r = kind.split(text);
        let joined: String = r.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(joined, text);
        r.into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_basics() {
        let p = |t| pieces(PreTokenizer::Gpt2, t);
        assert_eq!(p("Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(p("a   b"), ["a", "  ", " b"]);
        assert_eq!(p("a  "), ["a", "  "]);
        assert_eq!(
            p("they'll've DON'T"),
            ["they", "'ll", "'ve", " DON", "'", "T"]
        );
        assert_eq!(p("x 123 4"), ["x", " 123", " 4"]);
        assert_eq!(p("e\u{301} vs"), ["e", "\u{301}", " vs"]);
        assert_eq!(p("[\u{a0}]"), ["[", "\u{a0}", "]"]);
        assert_eq!(p("  \t\n  mixed"), ["  \t\n ", " mixed"]);
        assert_eq!(p(""), Vec::<&str>::new());
    }

    #[test]
    fn digits_isolated_first() {
        let p = |t| pieces(PreTokenizer::DigitsGpt2, t);
        assert_eq!(p("12345678"), ["1", "2", "3", "4", "5", "6", "7", "8"]);
        assert_eq!(p("$5 100%"), ["$", "5", " ", "1", "0", "0", "%"]);
        assert_eq!(p("x²y"), ["x", "²", "y"]);
    }

    #[test]
    fn llama3_basics() {
        let p = |t| pieces(PreTokenizer::Llama3, t);
        assert_eq!(p("Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(p("12345"), ["123", "45"]);
        assert_eq!(p("I'M ok\n\n  x"), ["I", "'M", " ok", "\n\n", " ", " x"]);
        assert_eq!(p("a.\n\nb"), ["a", ".\n\n", "b"]);
    }

    #[test]
    fn default_steps() {
        let p = |t| pieces(PreTokenizer::Default, t);
        assert_eq!(p("1234567 a+=b"), ["123", "456", "7", " a", "+=", "b"]);
    }

    #[test]
    fn names() {
        assert_eq!(
            PreTokenizer::config("smollm").map(|c| c.kind),
            Some(PreTokenizer::DigitsGpt2)
        );
        assert!(PreTokenizer::config("llama-bpe").is_some_and(|c| c.ignore_merges));
        assert_eq!(PreTokenizer::config("qwen2"), None);
    }
}
