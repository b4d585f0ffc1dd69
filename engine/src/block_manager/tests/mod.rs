//! Unit tests of the parent module.

use super::*;
use crate::sequence::{SeqId, SeqParams};

fn seq(id: u64, tokens: &[u32], ps: usize) -> Sequence {
    Sequence::new(
        SeqId(id),
        tokens.to_vec(),
        SeqParams::with_max_tokens(4),
        id,
        ps,
    )
}

fn bm(num_pages: usize, ps: usize, caching: bool) -> BlockManager {
    BlockManager::new(num_pages, ps, caching, FaultInjector::new()).unwrap()
}

/// Prefills the whole sequence as one chunk and registers its full pages.
fn prefill(m: &mut BlockManager, s: &mut Sequence) {
    let hit = m.lookup_prefix(s);
    m.admit(s, hit);
    let n = s.len() - s.num_computed_tokens;
    m.allocate_slots(s, n).unwrap();
    s.num_computed_tokens = s.len();
    m.register_full_pages(s);
}

#[test]
fn fresh_pages_come_in_page_order_and_allocation_fails_when_exhausted() {
    let mut m = bm(3, 4, false);
    let mut s = seq(0, &[1; 12], 4);
    assert_eq!(m.num_pages_to_allocate(&s, 12), 3);
    m.allocate_slots(&mut s, 12).unwrap();
    assert_eq!(s.block_table, vec![PageId(0), PageId(1), PageId(2)]);
    assert_eq!(m.num_free_pages(), 0);
    assert!(!m.can_allocate(1));
    let mut t = seq(1, &[1], 4);
    let err = m.allocate_slots(&mut t, 1).unwrap_err();
    assert!(matches!(err, EngineError::OutOfKvPages { .. }), "{err}");
    m.free(&mut s);
    m.free(&mut t);
    assert_eq!(m.num_free_pages(), 3);
    m.check_invariants().unwrap();
}

#[test]
fn freed_pages_are_reused_in_lru_order_tail_first() {
    let mut m = bm(6, 2, false);
    let mut a = seq(0, &[1, 2, 3, 4], 2);
    let mut b = seq(1, &[5, 6, 7, 8], 2);
    m.allocate_slots(&mut a, 4).unwrap(); // pages 0, 1
    m.allocate_slots(&mut b, 4).unwrap(); // pages 2, 3
    m.free(&mut b); // 3 then 2 to the back
    m.free(&mut a); // 1 then 0 to the back
    assert_eq!(
        m.free_pages_in_lru_order(),
        [4, 5, 3, 2, 1, 0].map(PageId).to_vec()
    );
    let mut c = seq(2, &[9; 10], 2);
    m.allocate_slots(&mut c, 10).unwrap();
    assert_eq!(c.block_table, [4, 5, 3, 2, 1].map(PageId).to_vec());
}

#[test]
fn full_pages_are_shared_with_a_later_identical_prefix() {
    let mut m = bm(8, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4, 5], 2);
    prefill(&mut m, &mut a);
    assert_eq!(a.block_table, [0, 1, 2].map(PageId).to_vec());
    let b = seq(1, &[1, 2, 3, 4, 9, 9], 2);
    let hit = m.lookup_prefix(&b);
    assert_eq!(hit.pages, vec![PageId(0), PageId(1)]);
    assert_eq!(hit.num_cached_tokens, 4);
    assert_eq!(hit.num_revived, 0);
    let mut b = b;
    m.admit(&mut b, hit);
    assert_eq!(m.refcount(PageId(0)), 2);
    assert_eq!(m.refcount(PageId(1)), 2);
    assert_eq!(m.refcount(PageId(2)), 1);
    assert_eq!(b.num_computed_tokens, 4);
    // The partially filled page 2 of `a` is not shared.
    assert_eq!(m.num_pages_to_allocate(&b, 2), 1);
    m.check_invariants().unwrap();
}

#[test]
fn a_hash_collision_is_not_a_hit() {
    let mut m = bm(8, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4, 0], 2);
    prefill(&mut m, &mut a);
    // Forge colliding hashes: same hash chain, different tokens.
    let mut b = seq(1, &[1, 2, 9, 9, 0], 2);
    b.page_hashes = a.page_hashes.clone();
    assert_eq!(
        m.lookup_prefix(&b).pages,
        vec![PageId(0)],
        "first page really matches"
    );
    // Same page tokens, same hash, but a different parent chain.
    let mut c = seq(2, &[5, 5, 3, 4, 0], 2);
    c.page_hashes = vec![a.page_hashes[1]];
    assert!(m.lookup_prefix(&c).pages.is_empty());
}

#[test]
fn a_different_parent_is_a_miss_even_with_equal_page_tokens() {
    let mut m = bm(8, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4, 0], 2);
    prefill(&mut m, &mut a);
    let b = seq(1, &[7, 7, 3, 4, 0], 2);
    assert!(m.lookup_prefix(&b).pages.is_empty());
}

#[test]
fn freed_cached_pages_are_revived_and_evicted_only_when_reused() {
    let mut m = bm(4, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4, 5], 2);
    prefill(&mut m, &mut a); // pages 0, 1 registered, 2 partial
    m.free(&mut a);
    assert_eq!(m.num_free_pages(), 4);
    assert_eq!(m.num_cached_free_pages(), 2);
    assert_eq!(
        m.free_pages_in_lru_order(),
        [3, 2, 1, 0].map(PageId).to_vec()
    );

    // Revived: both pages come back with refcount 1 and leave the free list.
    let mut b = seq(1, &[1, 2, 3, 4, 6], 2);
    let hit = m.lookup_prefix(&b);
    assert_eq!(hit.num_revived, 2);
    assert_eq!(m.num_pages_to_admit(&b, &hit, 1), 3);
    m.admit(&mut b, hit);
    assert_eq!(m.free_pages_in_lru_order(), [3, 2].map(PageId).to_vec());
    m.free(&mut b);
    assert_eq!(
        m.free_pages_in_lru_order(),
        [3, 2, 1, 0].map(PageId).to_vec()
    );

    // Fresh pages evict in LRU order: 3, 2 (uncached), then 1 (cached tail).
    let mut c = seq(2, &[8; 6], 2);
    m.allocate_slots(&mut c, 6).unwrap();
    assert_eq!(c.block_table, [3, 2, 1].map(PageId).to_vec());
    let d = seq(3, &[1, 2, 3, 4, 6], 2);
    let hit = m.lookup_prefix(&d);
    assert_eq!(
        hit.pages,
        vec![PageId(0)],
        "page 1 was evicted, page 0 still cached"
    );
    m.check_invariants().unwrap();
}

#[test]
fn writing_a_shared_page_copies_it_first() {
    let mut m = bm(8, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4], 2);
    prefill(&mut m, &mut a);
    let mut b = seq(1, &[1, 2, 3, 4], 2);
    let hit = m.lookup_prefix(&b);
    assert_eq!(
        hit.num_cached_tokens, 3,
        "the last token is always recomputed"
    );
    assert_eq!(m.num_pages_to_admit(&b, &hit, 1), 1);
    m.admit(&mut b, hit);
    assert_eq!(m.max_new_tokens(&b), 1 + 5 * 2);
    let copy = m.allocate_slots(&mut b, 1).unwrap();
    assert_eq!(copy, Some((1, 2)));
    assert_eq!(b.block_table, vec![PageId(0), PageId(2)]);
    assert_eq!(m.refcount(PageId(1)), 1);
    assert_eq!(m.refcount(PageId(0)), 2);
    m.check_invariants().unwrap();
}

#[test]
fn a_revived_cached_page_is_copied_before_it_is_written() {
    let mut m = bm(4, 2, true);
    let mut a = seq(0, &[1, 2, 3, 4], 2);
    prefill(&mut m, &mut a);
    m.free(&mut a);
    assert_eq!(
        m.free_pages_in_lru_order(),
        [2, 3, 1, 0].map(PageId).to_vec()
    );
    let mut b = seq(1, &[1, 2, 3, 4], 2);
    let hit = m.lookup_prefix(&b);
    assert_eq!(
        m.num_pages_to_admit(&b, &hit, 1),
        3,
        "two revived plus the copy, at peak"
    );
    m.admit(&mut b, hit);
    assert_eq!(m.allocate_slots(&mut b, 1).unwrap(), Some((1, 2)));
    assert_eq!(b.block_table, vec![PageId(0), PageId(2)]);
    // The original goes back to the free list, still revivable.
    assert_eq!(m.free_pages_in_lru_order(), [3, 1].map(PageId).to_vec());
    assert_eq!(
        m.lookup_prefix(&seq(2, &[1, 2, 3, 4, 5], 2)).pages,
        vec![PageId(0), PageId(1)]
    );
    m.check_invariants().unwrap();
}

#[test]
fn every_fresh_page_is_a_fault_site() {
    let f = FaultInjector::new();
    f.fail_at(2);
    let mut m = BlockManager::new(4, 2, false, f.clone()).unwrap();
    let mut s = seq(0, &[1; 6], 2);
    let err = m.allocate_slots(&mut s, 6).unwrap_err();
    assert!(matches!(
        err,
        EngineError::Backend(pagoda_backend::BackendError::FaultInjected { site: 2, .. })
    ));
    assert_eq!(
        s.block_table.len(),
        1,
        "the page taken before the fault stays with the sequence"
    );
    m.free(&mut s);
    assert_eq!(m.num_free_pages(), 4);
    assert_eq!(f.sites_reached(), 2);
}

#[test]
fn caching_off_never_hits() {
    let mut m = bm(8, 2, false);
    let mut a = seq(0, &[1, 2, 3, 4, 5], 2);
    prefill(&mut m, &mut a);
    assert_eq!(
        m.lookup_prefix(&seq(1, &[1, 2, 3, 4, 5], 2)),
        PrefixHit::default()
    );
    assert!(m.page_states().iter().all(|p| p.hash.is_none()));
}

#[test]
fn bad_geometry_is_refused() {
    assert!(BlockManager::new(0, 16, false, FaultInjector::new()).is_err());
    assert!(BlockManager::new(16, 0, false, FaultInjector::new()).is_err());
    assert!(BlockManager::new(1 << 30, 16, false, FaultInjector::new()).is_err());
}
