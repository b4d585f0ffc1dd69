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

// ---- Growable KV: commit units ----

use crate::kv_commit::{CommitEvent, RecordingCommit};

/// A block manager over `num_pages` reserved pages whose memory comes from a
/// recording committer with `ppu` pages per unit and an optional cap.
fn growable(
    num_pages: usize,
    ps: usize,
    ppu: usize,
    cap: Option<usize>,
    caching: bool,
) -> (BlockManager, Arc<RecordingCommit>) {
    let faults = FaultInjector::new();
    let c = Arc::new(RecordingCommit::new(ppu, cap, faults.clone()));
    let m = BlockManager::with_commit(num_pages, ps, caching, faults, Some(c.clone())).unwrap();
    (m, c)
}

/// Grows for and allocates `n` more tokens of `s` (as the scheduler does).
fn take(m: &mut BlockManager, s: &mut Sequence, n: usize) {
    let need = m.num_pages_to_allocate(s, n);
    assert!(m.grow_for(need).unwrap(), "growth for {need} pages");
    m.allocate_slots(s, n).unwrap();
    s.num_computed_tokens += n;
}

#[test]
fn nothing_is_committed_until_pages_are_needed_and_uncommitted_pages_are_never_handed_out() {
    let (mut m, c) = growable(8, 2, 2, None, false);
    assert_eq!(m.num_units(), 4);
    assert_eq!(m.num_committed_units(), 0);
    assert_eq!(m.num_available_pages(), 0);
    assert_eq!(m.num_free_pages(), 8, "the reservation is free");
    let mut s = seq(0, &[1; 4], 2);
    let err = m.allocate_slots(&mut s, 1).unwrap_err();
    assert!(matches!(err, EngineError::OutOfKvPages { .. }), "{err}");
    m.free(&mut s);
    assert!(c.events().is_empty());
    m.check_invariants().unwrap();
}

#[test]
fn growth_under_a_rising_load_commits_one_unit_at_a_time_lowest_first() {
    let (mut m, c) = growable(8, 2, 2, None, false);
    let mut seqs: Vec<Sequence> = (0..4).map(|i| seq(i, &[1; 4], 2)).collect();
    for (i, s) in seqs.iter_mut().enumerate() {
        take(&mut m, s, 4); // two pages = one unit each
        assert_eq!(m.num_committed_units(), i + 1, "after sequence {i}");
        assert_eq!(m.num_committed_pages(), 2 * (i + 1));
        assert_eq!(
            s.block_table,
            vec![PageId(2 * i as u32), PageId(2 * i as u32 + 1)]
        );
        m.check_invariants().unwrap();
    }
    assert_eq!(
        c.events(),
        (0..4).map(CommitEvent::Commit).collect::<Vec<_>>()
    );
    assert!(!m.grow_for(1).unwrap(), "the reservation is exhausted");
    let st = m.commit_stats();
    assert_eq!(
        (st.num_grows, st.peak_committed_pages, st.reserved_pages),
        (4, 8, 8)
    );
    assert_eq!(c.violation(), None);
}

#[test]
fn a_unit_is_released_when_its_pages_free_while_another_unit_stays() {
    let (mut m, c) = growable(8, 2, 2, None, false);
    let mut long = seq(0, &[1; 8], 2);
    let mut short = seq(1, &[1; 8], 2);
    take(&mut m, &mut long, 2); // unit 0, page 0
    take(&mut m, &mut short, 4); // page 1 of unit 0, then unit 1
    take(&mut m, &mut long, 2); // page 3 of unit 1
    assert_eq!(long.block_table, [0, 3].map(PageId).to_vec());
    assert_eq!(short.block_table, [1, 2].map(PageId).to_vec());
    // Mixed lifetimes: `short` finishes, `long` goes on. No unit is empty
    // (each holds a page of `long`), so nothing is released.
    m.free(&mut short);
    m.end_step();
    assert_eq!(m.num_committed_units(), 2);
    // `long` grows into the freed pages, lowest unit first, not a new unit.
    take(&mut m, &mut long, 4);
    assert_eq!(long.block_table, [0, 3, 1, 2].map(PageId).to_vec());
    assert_eq!(m.num_committed_units(), 2);
    let mut other = seq(2, &[1; 4], 2);
    take(&mut m, &mut other, 4); // unit 2
    assert_eq!(other.block_table, [4, 5].map(PageId).to_vec());
    m.free(&mut long);
    m.end_step();
    assert_eq!(
        c.committed_units(),
        vec![2],
        "units 0 and 1 emptied; unit 2 is live"
    );
    assert_eq!(m.num_committed_units(), 1);
    assert!(m.is_committed(PageId(4)) && !m.is_committed(PageId(0)));
    m.check_invariants().unwrap();
    m.free(&mut other);
    m.end_step();
    assert!(c.committed_units().is_empty());
    assert_eq!(m.commit_stats().num_releases, 3);
    assert_eq!(c.violation(), None);
    m.check_invariants().unwrap();
}

#[test]
fn placement_takes_the_lowest_committed_unit_with_a_clean_page() {
    let (mut m, _c) = growable(6, 1, 2, None, false);
    let mut a = seq(0, &[1; 6], 1);
    take(&mut m, &mut a, 6); // units 0, 1, 2
    // Free a page in unit 2, then one in unit 0: the next page comes from unit 0.
    let mut b = seq(1, &[1; 2], 1);
    let (p5, p1) = (a.block_table[5], a.block_table[1]);
    a.block_table.retain(|p| *p != p5 && *p != p1);
    m.release(p5, a.id);
    m.release(p1, a.id);
    take(&mut m, &mut b, 2);
    assert_eq!(b.block_table, vec![p1, p5]);
    m.check_invariants().unwrap();
}

#[test]
fn cached_pages_are_evicted_before_a_new_unit_is_committed() {
    let (mut m, c) = growable(8, 2, 2, None, true);
    let mut a = seq(0, &[1, 2, 3, 4], 2);
    take(&mut m, &mut a, 4);
    m.register_full_pages(&mut a);
    m.free(&mut a);
    assert_eq!(m.num_cached_free_pages(), 2);
    m.end_step();
    assert_eq!(m.num_committed_units(), 1, "cached pages keep their unit");
    let mut b = seq(1, &[7; 2], 2);
    take(&mut m, &mut b, 2);
    assert_eq!(
        b.block_table,
        vec![PageId(1)],
        "LRU cached page (the tail) reused"
    );
    assert_eq!(c.events(), vec![CommitEvent::Commit(0)], "no growth");
    m.check_invariants().unwrap();
}

#[test]
fn a_unit_of_only_cached_pages_is_released_after_the_idle_steps_and_revival_resets_them() {
    let (mut m, c) = growable(4, 2, 2, None, true);
    m.set_cache_idle_steps(3);
    let mut a = seq(0, &[1, 2, 3, 4, 5], 2);
    take(&mut m, &mut a, 4);
    m.register_full_pages(&mut a);
    m.free(&mut a);
    m.end_step();
    m.end_step();
    // Revived before the idle steps ran out: the count starts again.
    let mut b = seq(1, &[1, 2, 3, 4, 5], 2);
    let hit = m.lookup_prefix(&b);
    assert_eq!(hit.num_revived, 2);
    m.admit(&mut b, hit);
    m.end_step();
    m.free(&mut b);
    for _ in 0..2 {
        m.end_step();
        assert_eq!(m.num_committed_units(), 1);
        assert_eq!(m.lookup_prefix(&seq(2, &[1, 2, 3, 4, 5], 2)).pages.len(), 2);
    }
    m.end_step();
    assert_eq!(m.num_committed_units(), 0, "idle cached unit released");
    assert_eq!(c.events().last(), Some(&CommitEvent::Release(0)));
    assert!(
        m.lookup_prefix(&seq(2, &[1, 2, 3, 4, 5], 2))
            .pages
            .is_empty()
    );
    assert_eq!(m.commit_stats().num_idle_evictions, 2);
    assert_eq!(m.num_cached_free_pages(), 0);
    m.check_invariants().unwrap();
}

#[test]
fn a_refused_commit_is_an_error_that_keeps_every_page_accounted_for() {
    let (mut m, c) = growable(8, 2, 2, Some(1), false);
    let mut s = seq(0, &[1; 6], 2);
    let err = m.grow_for(3).unwrap_err();
    assert!(err.to_string().contains("cap"), "{err}");
    assert_eq!(
        m.num_available_pages(),
        2,
        "the unit committed before the refusal stays"
    );
    assert_eq!(
        c.events(),
        vec![CommitEvent::Commit(0), CommitEvent::Refused(1)]
    );
    assert_eq!(m.max_new_tokens(&s), 4);
    m.allocate_slots(&mut s, 4).unwrap();
    assert_eq!(m.commit_stats().num_grow_failures, 1);
    m.free(&mut s);
    m.end_step();
    assert_eq!(m.num_committed_units(), 0);
    assert_eq!(m.num_free_pages(), 8);
    m.check_invariants().unwrap();
}

#[test]
fn an_injected_fault_at_a_grow_is_an_error_and_the_next_grow_succeeds() {
    let faults = FaultInjector::new();
    let c = Arc::new(RecordingCommit::new(2, None, faults.clone()));
    let mut m = BlockManager::with_commit(8, 2, false, faults.clone(), Some(c.clone())).unwrap();
    faults.fail_at(1);
    let err = m.grow_for(1).unwrap_err();
    assert!(err.to_string().contains("kv grow"), "{err}");
    assert_eq!(m.num_committed_units(), 0);
    assert!(m.grow_for(1).unwrap());
    assert_eq!(c.committed_units(), vec![0]);
    m.check_invariants().unwrap();
}

#[test]
fn a_short_last_unit_holds_the_remaining_pages() {
    let (mut m, _c) = growable(5, 1, 2, None, false);
    assert_eq!(m.num_units(), 3);
    let mut s = seq(0, &[1; 5], 1);
    take(&mut m, &mut s, 5);
    assert_eq!(m.num_committed_pages(), 5);
    assert_eq!(m.commit_stats().committed_units, 3);
    m.free(&mut s);
    m.end_step();
    assert_eq!(m.num_committed_pages(), 0);
    m.check_invariants().unwrap();
}

#[test]
fn without_a_committer_everything_is_committed_and_never_released() {
    let mut m = bm(4, 2, false);
    assert_eq!(m.num_committed_pages(), 4);
    assert_eq!(m.num_units(), 1);
    let mut s = seq(0, &[1; 4], 2);
    m.allocate_slots(&mut s, 4).unwrap();
    m.free(&mut s);
    m.end_step();
    assert_eq!(m.num_committed_pages(), 4);
    assert!(m.grow_for(4).unwrap());
    assert!(!m.grow_for(5).unwrap());
    assert_eq!(m.commit_stats().num_releases, 0);
    m.check_invariants().unwrap();
}
