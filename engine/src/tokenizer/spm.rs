//! SentencePiece (SPM) encoding of one raw fragment, as llama.cpp's
//! `llm_tokenizer_spm_session::tokenize` (`tokenizer.ggml.model = "llama"`).
//!
//! The text (spaces already escaped to "▁", U+2581, by the caller) is split
//! into UTF-8 characters, one symbol each. Every pair of neighbouring symbols
//! whose concatenation is a vocabulary token goes into a priority queue keyed
//! by that token's score (highest first; on a tie the leftmost pair first).
//! The best pair is merged, and the merged symbol's new neighbour pairs are
//! queued; entries made stale by an earlier merge are skipped. At the end
//! every symbol is a token, or a single character that is not one, which is
//! written as its UTF-8 bytes through the byte-fallback tokens `<0xNN>`.
//!
//! llama.cpp's `resegment` also consults a reverse-merge map for symbols
//! that are not tokens; a symbol only grows by merging into a token, so a
//! non-token symbol is always a single character, which (for valid UTF-8,
//! as every `&str` is) is never the text of a queued pair: that path cannot
//! be taken and is not reproduced here.
//!
//! Invariant: the output's token bytes, concatenated, are exactly the input
//! bytes whenever every byte has a byte token.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// What the SPM session needs from the vocabulary.
pub(super) trait SpmVocab {
    /// The id of the token whose text is exactly `text`.
    fn id(&self, text: &str) -> Option<u32>;
    /// The score of token `id` (`tokenizer.ggml.scores`, 0 when absent).
    fn score(&self, id: u32) -> f32;
    /// The token for one byte: `<0xNN>`, else the one-byte text itself
    /// (as llama.cpp's `byte_to_token`), else `None`.
    fn byte_token(&self, byte: u8) -> Option<u32>;
}

/// One symbol: a byte range of the text and its neighbours in the chain.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    /// Length in bytes; 0 once merged into its left neighbour.
    n: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and `right` (neighbours when queued).
#[derive(Clone, Copy, Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    /// Bytes of the merged text; a mismatch when popped means stale.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The max-heap pops the highest score first, then the smallest `left`
    /// (llama.cpp's `llm_bigram_spm::comparator`).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
            .then_with(|| other.right.cmp(&self.right))
    }
}

/// Encodes `text` (whitespace already escaped) and appends the ids to `out`.
pub(super) fn encode(vocab: &impl SpmVocab, text: &str, out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    let count = text.chars().count();
    for (i, (start, c)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            n: c.len_utf8(),
            prev: i.checked_sub(1),
            next: (i + 1 < count).then_some(i + 1),
        });
    }
    if symbols.is_empty() {
        return;
    }

    let mut queue = BinaryHeap::new();
    let try_add = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left, right| {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r): (&Symbol, &Symbol) = (&symbols[left], &symbols[right]);
        let size = l.n + r.n;
        if let Some(id) = vocab.id(&text[l.start..l.start + size]) {
            queue.push(Bigram {
                left,
                right,
                score: vocab.score(id),
                size,
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&symbols, &mut queue, Some(i - 1), Some(i));
    }

    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        if l.n == 0 || r.n == 0 || l.n + r.n != b.size {
            continue;
        }
        symbols[b.left].n += r.n;
        symbols[b.right].n = 0;
        symbols[b.left].next = r.next;
        if let Some(nx) = r.next {
            symbols[nx].prev = Some(b.left);
        }
        try_add(&symbols, &mut queue, l.prev, Some(b.left));
        try_add(&symbols, &mut queue, Some(b.left), r.next);
    }

    let mut at = Some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.n];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| vocab.byte_token(b))),
        }
        at = s.next;
    }
}

/// llama.cpp's `llama_escape_whitespace`: every space (U+0020 only, not
/// tabs or newlines) becomes "▁".
pub(super) fn escape_whitespace(text: &str, out: &mut String) {
    for c in text.chars() {
        out.push(if c == ' ' { '\u{2581}' } else { c });
    }
}

/// The inverse for decoding a normal token: "▁" becomes a space.
pub(super) fn unescape_whitespace(text: &str) -> String {
    text.replace('\u{2581}', " ")
}
