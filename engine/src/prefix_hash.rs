//! The prefix-cache page hash, shared by [`crate::sequence::Sequence`] (which
//! keeps the hash of every full page of its tokens) and
//! [`crate::block_manager::BlockManager`] (which looks pages up by it).
//!
//! It lives in its own module so neither of those depends on the other for
//! it. It takes plain `u32` token ids (what [`crate::sequence::TokenId`]
//! names), so this module depends on nothing in the crate.

/// Stable 64-bit hash of one full page under its parent page's hash.
///
/// `parent` is `None` for the first page of a sequence. The same
/// `(parent, tokens)` always gives the same value, in any process.
pub fn hash_page(parent: Option<u64>, tokens: &[u32]) -> u64 {
    /// splitmix64's finaliser: a bijective, well-mixing 64-bit permutation.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = match parent {
        None => mix(GOLDEN),
        Some(p) => mix(p ^ 0x5851_f42d_4c95_7f2d),
    };
    for &t in tokens {
        h = mix(h.wrapping_add(GOLDEN) ^ u64::from(t));
    }
    mix(h ^ (tokens.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_runs() {
        assert_eq!(hash_page(None, &[1, 2, 3]), hash_page(None, &[1, 2, 3]));
        assert_ne!(hash_page(None, &[1, 2, 3]), hash_page(None, &[3, 2, 1]));
        assert_ne!(hash_page(None, &[0]), hash_page(Some(0), &[0]));
        assert_ne!(hash_page(None, &[0]), hash_page(None, &[0, 0]));
        // Pinned: the value must not depend on the process, platform or std version.
        assert_eq!(hash_page(None, &[1, 2, 3]), 0xcb74_73a6_ff38_dac9);
    }
}
