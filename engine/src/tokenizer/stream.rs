//! Incremental detokenization for streaming output.
//!
//! A token can end in the middle of a UTF-8 character (byte-level BPE
//! splits multi-byte characters freely), so [`StreamDecoder`] keeps the
//! bytes of an incomplete trailing character until the next token completes
//! it.
//!
//! Invariants: the concatenation of everything returned by `push*` equals
//! `String::from_utf8_lossy` of all the bytes pushed, less an incomplete
//! character at the very end, which is held back (at most 3 bytes) and
//! dropped by [`StreamDecoder::finish`]: text cut off in the middle of a
//! character (say by a token limit) never ends in U+FFFD.

use super::Tokenizer;

/// Turns a stream of token ids into complete UTF-8 text.
///
/// It holds no reference to the tokenizer, so it can live next to one in a
/// request's state.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token's bytes (see [`Tokenizer::token_bytes`]) and returns
    /// the text that is now complete. An id outside the vocabulary adds
    /// nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Adds raw bytes and returns the text that is now complete. Invalid
    /// bytes become U+FFFD at once; only an incomplete character at the end
    /// is held back.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Incomplete character at the end: hold it back.
                        None => {
                            rest = tail;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop_n = self.pending.len() - keep;
        self.pending.drain(..drop_n);
        out
    }

    /// The bytes held back (an incomplete trailing character).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: drops what is held back (the bytes of an
    /// incomplete last character, never emitted as U+FFFD), returns the
    /// bytes dropped and resets the decoder.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let mut d = StreamDecoder::new();
        let emoji = "👨".as_bytes(); // 4 bytes
        assert_eq!(d.push_bytes(b"a"), "a");
        assert_eq!(d.push_bytes(&emoji[..1]), "");
        assert_eq!(d.push_bytes(&emoji[1..3]), "");
        assert_eq!(d.pending().len(), 3);
        assert_eq!(d.push_bytes(&[emoji[3], b'b']), "👨b");
        assert!(d.finish().is_empty());
    }

    #[test]
    fn invalid_bytes_are_replaced_at_once() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push_bytes(&[0xFF, b'x', 0xE2, 0x82]), "\u{FFFD}x");
        // The incomplete last character is dropped, not replaced.
        assert_eq!(d.finish(), [0xE2, 0x82]);
        assert_eq!(d.push_bytes(&[0xC3]), "");
        assert_eq!(d.push_bytes(b"z"), "\u{FFFD}z");
    }
}
