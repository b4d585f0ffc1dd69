//! Byte-level BPE merges, as llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! Merge `i` of `tokenizer.ggml.merges` is the string `"left right"` (split
//! at the first space after the first byte) and has rank `i`; for a repeated
//! pair the first rank wins. Within one pre-token, starting from single
//! characters, the adjacent pair with the lowest rank is merged first (ties:
//! the leftmost), until no adjacent pair has a rank.
//!
//! Invariants: the merged symbols of a word are non-empty, in order, and
//! concatenate to the word. Nothing is cached across calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Range;

/// The merge table: merge-part strings are interned to ids, and ranks are
/// keyed by pairs of ids.
#[derive(Debug, Default)]
pub(crate) struct Merges {
    part_ids: HashMap<String, u32>,
    ranks: HashMap<(u32, u32), u32>,
}

/// One symbol of a word being merged.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// The symbol's text as a merge part, if it is one.
    part: Option<u32>,
}

impl Merges {
    /// Parses the merge strings. Entries without a separating space can
    /// never apply and are skipped (llama.cpp stores them as an empty pair).
    pub(crate) fn new<S: AsRef<str>>(merges: &[S]) -> Merges {
        let mut m = Merges::default();
        for (rank, entry) in merges.iter().enumerate() {
            let entry = entry.as_ref();
            let Some(pos) = entry
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1)
            else {
                continue;
            };
            let (left, right) = (&entry[..pos], &entry[pos + 1..]);
            let l = m.intern(left);
            let r = m.intern(right);
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            m.ranks.entry((l, r)).or_insert(rank);
        }
        m
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.part_ids.get(s) {
            return id;
        }
        let id = u32::try_from(self.part_ids.len()).unwrap_or(u32::MAX);
        self.part_ids.insert(s.to_owned(), id);
        id
    }

    /// Number of distinct merge pairs.
    pub(crate) fn len(&self) -> usize {
        self.ranks.len()
    }

    fn rank(&self, a: &Symbol, b: &Symbol) -> Option<u32> {
        self.ranks.get(&(a.part?, b.part?)).copied()
    }

    /// Merges `word` (a byte-level pre-token) and returns the byte ranges of
    /// the resulting symbols.
    pub(crate) fn apply(&self, word: &str) -> Vec<Range<usize>> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(word.len());
        let n_chars = word.chars().count();
        for (i, (start, c)) in word.char_indices().enumerate() {
            let end = start + c.len_utf8();
            syms.push(Symbol {
                start,
                end,
                prev: i.checked_sub(1),
                next: (i + 1 < n_chars).then_some(i + 1),
                part: self.part_ids.get(&word[start..end]).copied(),
            });
        }

        // (rank, left index, right index, combined byte length)
        let mut queue: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<_>, syms: &[Symbol], l: usize, r: usize| {
            if let Some(rank) = self.rank(&syms[l], &syms[r]) {
                let len = syms[r].end - syms[l].start;
                queue.push(Reverse((rank, l, r, len)));
            }
        };
        for i in 1..syms.len() {
            push(&mut queue, &syms, i - 1, i);
        }

        while let Some(Reverse((_, l, r, len))) = queue.pop() {
            let (left, right) = (syms[l], syms[r]);
            // Stale: one side was merged away or has grown since.
            let alive = left.end > left.start && right.end > right.start;
            if !alive || left.next != Some(r) || right.end - left.start != len {
                continue;
            }
            syms[l].end = right.end;
            syms[l].next = right.next;
            syms[l].part = self.part_ids.get(&word[left.start..right.end]).copied();
            syms[r].end = syms[r].start; // dead
            if let Some(n) = right.next {
                syms[n].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                push(&mut queue, &syms, p, l);
            }
            if let Some(n) = syms[l].next {
                push(&mut queue, &syms, l, n);
            }
        }

        syms.iter()
            .filter(|s| s.end > s.start)
            .map(|s| s.start..s.end)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(merges: &[&str], word: &str) -> Vec<String> {
        let m = Merges::new(merges);
        m.apply(word)
            .into_iter()
            .map(|r| word[r].to_string())
            .collect()
    }

    #[test]
    fn lowest_rank_first_then_leftmost() {
        assert_eq!(run(&["a b", "b c"], "abc"), ["ab", "c"]);
        assert_eq!(run(&["b c", "a b"], "abc"), ["a", "bc"]);
        assert_eq!(run(&["a a"], "aaa"), ["aa", "a"]);
        assert_eq!(run(&["a a", "aa aa"], "aaaa"), ["aaaa"]);
        assert_eq!(run(&["h e", "l l", "he ll", "hell o"], "hello"), ["hello"]);
        assert_eq!(run(&[], "ĠÃ©"), ["Ġ", "Ã", "©"]);
        assert_eq!(run(&["x"], "x"), ["x"]);
        assert!(run(&["a b"], "").is_empty());
    }

    #[test]
    fn first_rank_wins_and_split_at_first_space_after_first_byte() {
        let m = Merges::new(&["a b", "c d", "a b"]);
        assert_eq!(m.len(), 2);
        // A leading space belongs to the left part.
        assert_eq!(run(&["  x"], "  x"), [" ", " x"]);
        assert_eq!(run(&["  x", "  x"], " x"), [" x"]);
    }
}
