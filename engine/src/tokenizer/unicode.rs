//! Per-code-point character classes used by the pre-tokenizer: the
//! general-category class (llama.cpp's `unicode_cpt_flags` categories) and
//! the `White_Space` property.
//!
//! Invariant: the classes are those of Unicode 15.1, as in llama.cpp's
//! `unicode-data.cpp`; unassigned code points are [`Class::Undefined`].

use super::unicode_data as data;

/// General-category class of a code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Unassigned (`Cn`).
    Undefined,
    /// `\p{N}`.
    Number,
    /// `\p{L}`.
    Letter,
    /// `\p{Z}`.
    Separator,
    /// `\p{M}`.
    Mark,
    /// `\p{P}`.
    Punct,
    /// `\p{S}`.
    Symbol,
    /// `\p{C}` except `Cn`.
    Control,
}

impl Class {
    fn from_u8(v: u8) -> Class {
        match v {
            data::NUMBER => Class::Number,
            data::LETTER => Class::Letter,
            data::SEPARATOR => Class::Separator,
            data::MARK => Class::Mark,
            data::PUNCT => Class::Punct,
            data::SYMBOL => Class::Symbol,
            data::CONTROL => Class::Control,
            data::UNDEFINED => Class::Undefined,
            _ => Class::Undefined,
        }
    }
}

/// The class of `c`.
pub(crate) fn class(c: char) -> Class {
    let cp = c as u32;
    // `RUNS` starts at 0, so the partition point is at least 1.
    let i = data::RUNS.partition_point(|&(start, _)| start <= cp);
    Class::from_u8(data::RUNS[i.saturating_sub(1)].1)
}

/// Unicode `White_Space` (the 25 code points llama.cpp lists; the same set
/// as [`char::is_whitespace`]).
pub(crate) fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{09}'..='\u{0D}'
            | '\u{20}'
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// What the splitters need to know about one code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags {
    pub(crate) class: Class,
    pub(crate) ws: bool,
}

impl Flags {
    pub(crate) fn of(c: char) -> Flags {
        Flags {
            class: class(c),
            ws: is_whitespace(c),
        }
    }
    pub(crate) fn letter(self) -> bool {
        self.class == Class::Letter
    }
    pub(crate) fn number(self) -> bool {
        self.class == Class::Number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class('a'), Class::Letter);
        assert_eq!(class('7'), Class::Number);
        assert_eq!(class(' '), Class::Separator);
        assert_eq!(class('\n'), Class::Control);
        assert_eq!(class('!'), Class::Punct);
        assert_eq!(class('$'), Class::Symbol);
        assert_eq!(class('\u{301}'), Class::Mark);
        assert_eq!(class('你'), Class::Letter);
        assert_eq!(class('²'), Class::Number);
        assert_eq!(class('\u{378}'), Class::Undefined);
        assert_eq!(class('\u{10FFFF}'), Class::Undefined);
        assert_eq!(class('\u{E000}'), Class::Control);
        // Unicode 15.1 (CJK Extension I) is in; 16.0 additions are not.
        assert_eq!(class('\u{2EBF0}'), Class::Letter);
        assert_eq!(class('\u{1C89}'), Class::Undefined);
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            assert_eq!(is_whitespace(c), c.is_whitespace(), "U+{:04X}", c as u32);
        }
    }
}
