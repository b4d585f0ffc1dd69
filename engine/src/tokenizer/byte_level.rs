//! GPT-2 byte-level mapping: every byte 0..=255 is shown as one printable
//! Unicode character (`bytes_to_unicode` of GPT-2 / llama.cpp's
//! `unicode_byte_to_utf8_map`), so a byte-level BPE vocabulary is made of
//! ordinary strings (`Ġ` = space, `Ċ` = newline).
//!
//! Invariant: the map is a bijection between the 256 bytes and the 256
//! characters it produces, all below U+0144.

/// Number of code points the reverse table covers (the largest mapped
/// character is U+0143).
const REV_LEN: usize = 0x144;

struct Tables {
    to_char: [char; 256],
    to_byte: [i16; REV_LEN],
}

const fn build() -> Tables {
    let mut to_char = ['\0'; 256];
    let mut to_byte = [-1i16; REV_LEN];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        let cp = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        // All code points here are below U+0144, so never surrogates.
        to_char[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        to_byte[cp as usize] = b as i16;
        b += 1;
    }
    Tables { to_char, to_byte }
}

static TABLES: Tables = build();

/// The character that stands for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    TABLES.to_char[b as usize]
}

/// The byte that character `c` stands for, if `c` is one of the 256.
pub fn char_to_byte(c: char) -> Option<u8> {
    match TABLES.to_byte.get(c as usize) {
        Some(&v) if v >= 0 => Some(v as u8),
        _ => None,
    }
}

/// Appends the byte-level form of `bytes` to `out`.
pub fn encode_into(bytes: &[u8], out: &mut String) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(byte_to_char(b));
    }
}

/// Appends the bytes a byte-level string stands for to `out`.
///
/// A character outside the map (not produced by [`encode_into`]) is kept
/// as its own UTF-8 bytes. (llama.cpp writes an `[UNK_BYTE_0x..]` marker
/// there; no GPT-2 style vocabulary has such characters.)
pub fn decode_into(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bijection_and_known_points() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        assert_eq!(byte_to_char(0xA0), 'ł');
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte('€'), None);
        let mut s = String::new();
        encode_into("é\r\n".as_bytes(), &mut s);
        assert_eq!(s, "Ã©čĊ");
        let mut v = Vec::new();
        decode_into(&s, &mut v);
        assert_eq!(v, "é\r\n".as_bytes());
    }
}
