//! Behaviour tests and the property test of the caching pool, over a fake
//! [`RawAllocator`] that hands out increasing addresses and records frees.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[derive(Debug, Default)]
struct FakeInner {
    next_id: u32,
    next_addr: u64,
    live: BTreeMap<SegmentId, RawSegment>,
    alloc_calls: u64,
    frees: u64,
    /// Frees of segments that were not live (double free, foreign segment).
    bad_frees: u64,
    /// Whether `wait_idle` ran since the last segment was handed out (new
    /// work may touch a new segment).
    idle: bool,
    /// Frees made while work might still be queued.
    frees_before_idle: u64,
}

/// A fake backend: segments at increasing, aligned, non-adjacent addresses;
/// optional capacity to simulate running out of device memory.
#[derive(Debug)]
struct FakeRaw {
    alignment: u64,
    capacity: Option<u64>,
    panic_on_alloc: bool,
    inner: Mutex<FakeInner>,
}

impl FakeRaw {
    fn build(alignment: u64, capacity: Option<u64>, panic_on_alloc: bool) -> Arc<FakeRaw> {
        let inner = FakeInner {
            next_addr: 1 << 32,
            ..FakeInner::default()
        };
        Arc::new(FakeRaw {
            alignment,
            capacity,
            panic_on_alloc,
            inner: Mutex::new(inner),
        })
    }
    fn new() -> Arc<FakeRaw> {
        FakeRaw::build(256, None, false)
    }
    fn with_capacity(capacity: u64) -> Arc<FakeRaw> {
        FakeRaw::build(256, Some(capacity), false)
    }
    fn with_alignment(alignment: u64) -> Arc<FakeRaw> {
        FakeRaw::build(alignment, None, false)
    }
    fn inner(&self) -> std::sync::MutexGuard<'_, FakeInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn live_segments(&self) -> BTreeMap<SegmentId, RawSegment> {
        self.inner().live.clone()
    }
    fn live_bytes(&self) -> u64 {
        self.inner().live.values().map(|s| s.bytes).sum()
    }
    fn alloc_calls(&self) -> u64 {
        self.inner().alloc_calls
    }
    fn frees(&self) -> u64 {
        self.inner().frees
    }
    fn bad_frees(&self) -> u64 {
        self.inner().bad_frees
    }
    fn frees_before_idle(&self) -> u64 {
        self.inner().frees_before_idle
    }
}

#[test]
fn segments_are_freed_only_after_the_queue_is_idle() {
    let raw = FakeRaw::new();
    let pool = Pool::new(raw.clone(), PoolConfig::default(), FaultInjector::new());
    let a = pool.alloc(3 * MIB, MemoryTag::Weights).unwrap();
    let b = pool.alloc(4 * KIB, MemoryTag::Scratch).unwrap();
    drop(a);
    drop(b);
    pool.empty_cache();
    assert_eq!(raw.frees(), 2);
    let c = pool.alloc(5 * MIB, MemoryTag::Kv).unwrap();
    drop(c);
    drop(pool);
    assert_eq!(raw.frees(), 3);
    assert_eq!(
        raw.frees_before_idle(),
        0,
        "a segment was freed while work could be queued"
    );
}

impl RawAllocator for FakeRaw {
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment> {
        assert!(!self.panic_on_alloc, "fake backend panics");
        let mut inner = self.inner();
        inner.alloc_calls += 1;
        assert!(bytes > 0, "the pool asked for an empty segment");
        let in_use: u64 = inner.live.values().map(|s| s.bytes).sum();
        if let Some(cap) = self.capacity
            && in_use + bytes > cap
        {
            return Err(BackendError::OutOfMemory {
                tag: MemoryTag::Scratch,
                requested_bytes: bytes,
                detail: format!("fake device: {in_use} of {cap} bytes in use"),
            });
        }
        let id = SegmentId(inner.next_id);
        inner.next_id += 1;
        let addr = inner.next_addr;
        // Leave a gap so that segments are never adjacent.
        inner.next_addr = (addr + bytes + self.alignment).next_multiple_of(self.alignment);
        let seg = RawSegment { id, addr, bytes };
        inner.live.insert(id, seg);
        inner.idle = false;
        Ok(seg)
    }

    fn free_segment(&self, segment: RawSegment) {
        let mut inner = self.inner();
        if !inner.idle {
            inner.frees_before_idle += 1;
        }
        inner.frees += 1;
        if inner.live.remove(&segment.id) != Some(segment) {
            inner.bad_frees += 1;
        }
    }

    fn alignment(&self) -> u64 {
        self.alignment
    }

    fn wait_idle(&self) -> Result<()> {
        self.inner().idle = true;
        Ok(())
    }
}

fn pool_over(raw: &Arc<FakeRaw>, config: PoolConfig) -> Pool {
    let raw: Arc<dyn RawAllocator> = raw.clone();
    Pool::new(raw, config, FaultInjector::new())
}

fn new_pool(raw: &Arc<FakeRaw>) -> Pool {
    pool_over(raw, PoolConfig::default())
}

/// `(offset, bytes, tag)` of every block of the only segment.
fn layout(pool: &Pool) -> Vec<(u64, u64, Option<MemoryTag>)> {
    let snap = pool.snapshot();
    assert_eq!(snap.segments.len(), 1, "expected one segment: {snap:?}");
    snap.segments[0]
        .blocks
        .iter()
        .map(|b| (b.offset, b.bytes, b.tag))
        .collect()
}

/// Checks every invariant of the pool against its snapshot, the fake
/// backend's view and the blocks the caller holds.
fn check_invariants(pool: &Pool, raw: &FakeRaw, held: &[Block]) {
    pool.shared.lock().check_internal();
    let snap = pool.snapshot();
    let align = pool.alignment();
    let raw_live = raw.live_segments();
    assert_eq!(raw.bad_frees(), 0);
    assert_eq!(
        snap.segments.len(),
        raw_live.len(),
        "pool and backend disagree on segments"
    );

    let (mut reserved, mut allocated, mut free, mut largest, mut used) =
        (0u64, 0u64, 0u64, 0u64, 0usize);
    let mut by_tag = [0u64; 5];
    // (segment, offset) -> (bytes, tag) of every live block in the snapshot.
    let mut used_blocks = BTreeMap::new();
    let mut prev_id = None;
    for seg in &snap.segments {
        assert!(prev_id < Some(seg.id), "segments not in id order");
        prev_id = Some(seg.id);
        let raw_seg = raw_live
            .get(&seg.id)
            .expect("segment unknown to the backend");
        assert!(raw_seg.bytes >= seg.bytes);
        assert_eq!(seg.addr, raw_seg.addr, "segment base address");
        assert!(seg.changed_at <= snap.generation);
        reserved += seg.bytes;
        let (mut end, mut prev_free, mut seg_free, mut seg_largest) = (0u64, false, 0u64, 0u64);
        for b in &seg.blocks {
            assert_eq!(b.offset, end, "gap or overlap in segment {:?}", seg.id);
            assert!(b.bytes > 0, "empty block");
            assert_eq!(b.offset % align, 0, "misaligned offset");
            assert_eq!(b.bytes % align, 0, "misaligned size");
            end += b.bytes;
            match b.tag {
                None => {
                    assert!(
                        !prev_free,
                        "adjacent free blocks in segment {:?}: {:?}",
                        seg.id, seg.blocks
                    );
                    prev_free = true;
                    assert_eq!((&*b.label, b.requested_bytes, b.alloc_step), ("", 0, 0));
                    seg_free += b.bytes;
                    seg_largest = seg_largest.max(b.bytes);
                }
                Some(tag) => {
                    prev_free = false;
                    allocated += b.bytes;
                    by_tag[tag.index()] += b.bytes;
                    used += 1;
                    assert!(b.requested_bytes > 0 && b.requested_bytes <= b.bytes);
                    used_blocks.insert((seg.id, b.offset), (b.bytes, tag));
                }
            }
        }
        assert_eq!(end, seg.bytes, "blocks do not cover segment {:?}", seg.id);
        assert_eq!(seg.free_bytes, seg_free);
        assert_eq!(seg.largest_free_bytes, seg_largest);
        assert_eq!(
            seg.fragmentation,
            state::fragmentation(seg_largest, seg_free)
        );
        if seg_free == 0 {
            assert_eq!(seg.fragmentation, 0.0);
        } else {
            assert_eq!(
                seg.fragmentation,
                1.0 - seg_largest as f64 / seg_free as f64
            );
        }
        free += seg_free;
        largest = largest.max(seg_largest);
    }

    let s = &snap.stats;
    assert_eq!(s.reserved_bytes, reserved);
    assert_eq!(s.allocated_bytes, allocated);
    assert_eq!(s.free_bytes, free);
    assert_eq!(s.reserved_bytes, s.allocated_bytes + s.free_bytes);
    assert_eq!(s.largest_free_bytes, largest);
    let frag = if free == 0 {
        0.0
    } else {
        1.0 - largest as f64 / free as f64
    };
    assert_eq!(s.fragmentation, frag);
    assert!(s.peak_allocated_bytes >= s.allocated_bytes);
    assert_eq!(s.num_segments, snap.segments.len());
    assert_eq!(s.num_live_blocks, used);
    assert_eq!(s.allocated_by_tag, by_tag);
    assert_eq!(s.live_blocks_by_tag.iter().sum::<usize>(), used);
    assert_eq!(by_tag.iter().sum::<u64>(), allocated);
    for tag in MemoryTag::ALL {
        assert_eq!(s.allocated(tag), by_tag[tag.index()]);
    }
    assert_eq!(
        raw.live_bytes(),
        reserved,
        "fake segments are exactly the requested size"
    );

    // The blocks the caller holds are exactly the live blocks of the snapshot.
    let mut ranges = Vec::new();
    let mut seen = HashSet::new();
    for block in held.iter().filter(|b| b.bytes() > 0) {
        let buf = block.buf();
        let id = buf.segment.expect("non-empty block without a segment");
        let (bytes, tag) = *used_blocks
            .get(&(id, buf.offset))
            .expect("held block not live in the pool");
        assert_eq!(tag, block.tag());
        assert_eq!(bytes, block.block_bytes());
        assert!(block.block_bytes() >= buf.bytes);
        // A block is the request rounded to the alignment, plus (large
        // blocks only) a remainder too small to serve a large request.
        let rounded = buf.bytes.next_multiple_of(align);
        if rounded <= SMALL_REQUEST_MAX_BYTES {
            assert_eq!(block.block_bytes(), rounded);
        } else {
            assert!(block.block_bytes() - rounded <= SMALL_REQUEST_MAX_BYTES);
        }
        assert_eq!(buf.addr, raw_live[&id].addr + buf.offset);
        assert!(seen.insert((id, buf.offset)), "two blocks share a range");
        ranges.push((buf.addr, block.block_bytes()));
    }
    assert_eq!(seen.len(), used, "the pool has live blocks nobody holds");
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
    }
}

#[test]
fn zero_byte_allocation_is_valid_and_allocates_nothing() {
    // Production failure #1: a zero-byte allocation returned null and a later
    // copy crashed. A zero-byte block is valid, empty, and costs nothing.
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    pool.faults().fail_at(1);
    let block = pool
        .alloc(0, MemoryTag::Activations)
        .expect("zero bytes is a valid request");
    assert_eq!(block.buf(), BufRef::EMPTY);
    assert!(block.buf().is_empty());
    assert_eq!(block.bytes(), 0);
    assert_eq!(block.block_bytes(), 0);
    assert_eq!(block.tag(), MemoryTag::Activations);
    assert_eq!(block.buf().slice(0, 0), Ok(BufRef::EMPTY));
    assert_eq!(
        pool.faults().sites_reached(),
        0,
        "a zero-byte request is not a fault site"
    );
    assert_eq!(raw.alloc_calls(), 0);
    assert_eq!(pool.stats(), PoolStats::default());
    assert!(pool.snapshot().segments.is_empty());
    check_invariants(&pool, &raw, std::slice::from_ref(&block));
    drop(block);
    assert_eq!(pool.stats(), PoolStats::default());
    // The fault target is still site 1: the zero-byte request did not consume it.
    let err = pool.alloc(1, MemoryTag::Activations).unwrap_err();
    assert!(
        matches!(err, BackendError::FaultInjected { site: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn freed_neighbours_coalesce() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let seg = 2 * MIB;
    let a = pool.alloc(4 * KIB, MemoryTag::Scratch).unwrap();
    let b = pool.alloc(4 * KIB, MemoryTag::Scratch).unwrap();
    let c = pool.alloc(4 * KIB, MemoryTag::Scratch).unwrap();
    let s = Some(MemoryTag::Scratch);
    assert_eq!(
        layout(&pool),
        vec![
            (0, 4 * KIB, s),
            (4 * KIB, 4 * KIB, s),
            (8 * KIB, 4 * KIB, s),
            (12 * KIB, seg - 12 * KIB, None)
        ]
    );
    drop(a);
    assert_eq!(
        layout(&pool),
        vec![
            (0, 4 * KIB, None),
            (4 * KIB, 4 * KIB, s),
            (8 * KIB, 4 * KIB, s),
            (12 * KIB, seg - 12 * KIB, None)
        ]
    );
    // Right neighbour free: c merges into the tail.
    drop(c);
    assert_eq!(
        layout(&pool),
        vec![
            (0, 4 * KIB, None),
            (4 * KIB, 4 * KIB, s),
            (8 * KIB, seg - 8 * KIB, None)
        ]
    );
    // Both neighbours free: everything becomes one free block.
    drop(b);
    assert_eq!(layout(&pool), vec![(0, seg, None)]);
    let stats = pool.stats();
    assert_eq!(stats.largest_free_bytes, seg);
    assert_eq!(stats.fragmentation, 0.0);
    check_invariants(&pool, &raw, &[]);
}

#[test]
fn best_fit_picks_smallest_fitting_block() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let t = MemoryTag::Activations;
    // Holes of 8 KiB, 4 KiB and 16 KiB separated by live 4 KiB fences, then the tail.
    let hole8 = pool.alloc(8 * KIB, t).unwrap();
    let _f1 = pool.alloc(4 * KIB, t).unwrap();
    let hole4 = pool.alloc(4 * KIB, t).unwrap();
    let _f2 = pool.alloc(4 * KIB, t).unwrap();
    let hole16 = pool.alloc(16 * KIB, t).unwrap();
    let _f3 = pool.alloc(4 * KIB, t).unwrap();
    let (off8, off4, off16) = (hole8.buf().offset, hole4.buf().offset, hole16.buf().offset);
    let tail = _f3.buf().offset + 4 * KIB;
    drop((hole8, hole4, hole16));
    let stats = pool.stats();
    assert!(stats.fragmentation > 0.0);

    let x = pool.alloc(3 * KIB, t).unwrap();
    assert_eq!(x.buf().offset, off4, "3 KiB goes to the 4 KiB hole");
    let y = pool.alloc(6 * KIB, t).unwrap();
    assert_eq!(y.buf().offset, off8, "6 KiB goes to the 8 KiB hole");
    let z = pool.alloc(12 * KIB, t).unwrap();
    assert_eq!(z.buf().offset, off16, "12 KiB goes to the 16 KiB hole");
    let w = pool.alloc(20 * KIB, t).unwrap();
    assert_eq!(w.buf().offset, tail, "20 KiB only fits the tail");
    assert_eq!(raw.alloc_calls(), 1);
    check_invariants(&pool, &raw, &[x, y, z, w, _f1, _f2, _f3]);
}

#[test]
fn split_leaves_remainder_free() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let small = pool.alloc(1000, MemoryTag::Weights).unwrap();
    assert_eq!(small.bytes(), 1000);
    assert_eq!(
        small.buf().bytes,
        1000,
        "BufRef.bytes is the requested size"
    );
    assert_eq!(small.block_bytes(), 1024);
    assert_eq!(
        layout(&pool),
        vec![
            (0, 1024, Some(MemoryTag::Weights)),
            (1024, 2 * MIB - 1024, None)
        ]
    );
    let stats = pool.stats();
    assert_eq!(stats.allocated_bytes, 1024);
    assert_eq!(stats.free_bytes, 2 * MIB - 1024);
    check_invariants(&pool, &raw, std::slice::from_ref(&small));
    drop(small);

    // Large: 2.5 MiB in a 4 MiB segment leaves 1.5 MiB, which can serve a
    // large request, so it is split off.
    let raw = FakeRaw::new();
    let pool = pool_over(&raw, PoolConfig::default());
    let big = pool.alloc(5 * MIB / 2, MemoryTag::Weights).unwrap();
    assert_eq!(big.block_bytes(), 5 * MIB / 2);
    assert_eq!(
        layout(&pool),
        vec![
            (0, 5 * MIB / 2, Some(MemoryTag::Weights)),
            (5 * MIB / 2, 3 * MIB / 2, None)
        ]
    );
    // A remainder of 1 MiB or less in a large segment can never serve a large
    // request, so it stays in the block: 3 MiB takes the whole 4 MiB segment.
    let whole = pool.alloc(3 * MIB, MemoryTag::Weights).unwrap();
    assert_eq!(whole.bytes(), 3 * MIB);
    assert_eq!(whole.block_bytes(), 4 * MIB);
    let snap = pool.snapshot();
    assert_eq!(snap.segments.len(), 2);
    let b = &snap.segments[1].blocks;
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0].offset, b[0].bytes, b[0].tag, b[0].requested_bytes),
        (0, 4 * MIB, Some(MemoryTag::Weights), 3 * MIB)
    );
    check_invariants(&pool, &raw, &[big, whole]);
}

#[test]
fn alignment_is_respected() {
    for (backend_align, expect) in [(64, 256), (256, 256), (4096, 4096), (64 * KIB, 64 * KIB)] {
        let raw = FakeRaw::with_alignment(backend_align);
        let pool = new_pool(&raw);
        assert_eq!(pool.alignment(), expect);
        let blocks: Vec<Block> = [1u64, 100, 5000, 255, 257, 70_000, 3 * MIB + 1]
            .iter()
            .map(|&n| pool.alloc(n, MemoryTag::Scratch).unwrap())
            .collect();
        for b in &blocks {
            assert_eq!(b.buf().offset % expect, 0, "offset of {b:?}");
            // Addresses are aligned as far as the backend aligns segment bases.
            assert_eq!(b.buf().addr % backend_align, 0, "address of {b:?}");
            assert_eq!(b.block_bytes() % expect, 0, "size of {b:?}");
            assert!(b.block_bytes() >= b.bytes());
        }
        for seg in pool.snapshot().segments {
            assert_eq!(seg.bytes % expect, 0);
        }
        check_invariants(&pool, &raw, &blocks);
    }
}

#[test]
fn oom_after_empty_cache_retry_reports_numbers() {
    let raw = FakeRaw::with_capacity(4 * MIB);
    let pool = new_pool(&raw);
    // A 3 MiB request takes a 4 MiB large segment: the whole device.
    drop(pool.alloc(3 * MIB, MemoryTag::Weights).unwrap());
    assert_eq!(
        pool.stats().reserved_bytes,
        4 * MIB,
        "the freed segment stays cached"
    );
    // A small request cannot use the large segment; the backend refuses a new
    // one until the cached segment is given back, then the retry succeeds.
    let small = pool
        .alloc(KIB, MemoryTag::Kv)
        .expect("retry after empty_cache succeeds");
    assert_eq!(raw.frees(), 1);
    assert_eq!(pool.stats().reserved_bytes, 2 * MIB);
    check_invariants(&pool, &raw, std::slice::from_ref(&small));

    // 8 MiB cannot fit even after the retry: the error carries the numbers.
    let calls = raw.alloc_calls();
    let err = pool.alloc(8 * MIB, MemoryTag::Activations).unwrap_err();
    let BackendError::OutOfMemory {
        tag,
        requested_bytes,
        detail,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*tag, MemoryTag::Activations);
    assert_eq!(*requested_bytes, 8 * MIB);
    for number in [
        "8388608 B",
        "reserved 2097152 B in 1 segments",
        "allocated 1024 B",
        "budget none",
    ] {
        assert!(
            detail.contains(number),
            "{number:?} missing from {detail:?}"
        );
    }
    assert!(detail.contains("retried after empty_cache"), "{detail}");
    assert!(
        detail.contains("fake device"),
        "the backend's message is kept: {detail}"
    );
    assert_eq!(raw.alloc_calls(), calls + 2, "one try, one retry");
    assert!(err.to_string().contains("8388608"));
    check_invariants(&pool, &raw, std::slice::from_ref(&small));
}

#[test]
fn budget_is_enforced() {
    let budget = 4 * MIB + 512 * KIB;
    let raw = FakeRaw::new();
    let pool = pool_over(
        &raw,
        PoolConfig {
            budget_bytes: Some(budget),
            ..PoolConfig::default()
        },
    );
    // 4 MiB large segment; the remainder of 1.5 MiB (above 1 MiB) is split off.
    let big = pool.alloc(2 * MIB + 512 * KIB, MemoryTag::Weights).unwrap();
    assert_eq!(pool.stats().reserved_bytes, 4 * MIB);
    // A 2 MiB small segment would exceed the budget; a segment of just the
    // request fits.
    let small = pool.alloc(KIB, MemoryTag::Kv).unwrap();
    assert_eq!(pool.stats().reserved_bytes, 4 * MIB + KIB);
    // Nothing can be freed and 1 MiB more exceeds the budget.
    let err = pool.alloc(MIB, MemoryTag::Kv).unwrap_err();
    let BackendError::OutOfMemory {
        detail,
        requested_bytes,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*requested_bytes, MIB);
    assert!(detail.contains("exceed the budget"), "{detail}");
    assert!(detail.contains(&format!("budget {budget} B")), "{detail}");
    assert!(pool.stats().reserved_bytes <= budget);
    check_invariants(&pool, &raw, &[big, small]);
    // Once the blocks are gone (check_invariants took them), their cached segments are given back to make room.
    let small2 = pool.alloc(MIB, MemoryTag::Kv).unwrap();
    assert!(pool.stats().reserved_bytes <= budget);
    assert_eq!(raw.frees(), 2, "both cached segments went back");
    check_invariants(&pool, &raw, std::slice::from_ref(&small2));
}

#[test]
fn per_tag_totals() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let mut held = vec![
        pool.alloc(1000, MemoryTag::Weights).unwrap(),
        pool.alloc(5000, MemoryTag::Kv).unwrap(),
        pool.alloc(256, MemoryTag::Kv).unwrap(),
        pool.alloc(3 * MIB, MemoryTag::Activations).unwrap(),
        pool.alloc(0, MemoryTag::Graph).unwrap(),
    ];
    let s = pool.stats();
    assert_eq!(s.allocated(MemoryTag::Weights), 1024);
    assert_eq!(s.allocated(MemoryTag::Kv), 5120 + 256);
    assert_eq!(
        s.allocated(MemoryTag::Activations),
        4 * MIB,
        "3 MiB takes a whole 4 MiB segment"
    );
    assert_eq!(s.allocated(MemoryTag::Graph), 0);
    assert_eq!(s.allocated(MemoryTag::Scratch), 0);
    assert_eq!(s.allocated_bytes, 1024 + 5120 + 256 + 4 * MIB);
    assert_eq!(s.num_live_blocks, 4, "zero-byte blocks are not pool blocks");
    check_invariants(&pool, &raw, &held);
    drop(held.remove(1));
    let s = pool.stats();
    assert_eq!(s.allocated(MemoryTag::Kv), 256);
    assert_eq!(s.allocated(MemoryTag::Weights), 1024);
    assert_eq!(s.allocated_bytes, 1024 + 256 + 4 * MIB);
    assert_eq!(s.peak_allocated_bytes, 1024 + 5120 + 256 + 4 * MIB);
    check_invariants(&pool, &raw, &held);
}

#[test]
fn fault_injection_fails_the_kth_allocation() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    pool.faults().fail_at(3);
    let a = pool.alloc(KIB, MemoryTag::Kv).unwrap();
    let _zero = pool.alloc(0, MemoryTag::Kv).unwrap();
    let b = pool.alloc(3 * MIB, MemoryTag::Weights).unwrap();
    let (before, calls) = (pool.stats(), raw.alloc_calls());
    let err = pool.alloc(KIB, MemoryTag::Activations).unwrap_err();
    assert_eq!(
        err,
        BackendError::FaultInjected {
            site: 3,
            what: "activations".into()
        }
    );
    assert_eq!(pool.stats(), before, "a failed request changes nothing");
    assert_eq!(raw.alloc_calls(), calls);
    let c = pool
        .alloc(KIB, MemoryTag::Activations)
        .expect("only the k-th site fails");
    assert_eq!(pool.faults().sites_reached(), 4);
    assert_eq!(pool.faults().faults_fired(), 1);
    check_invariants(&pool, &raw, &[a, b, c]);
}

#[test]
fn empty_cache_returns_free_segments() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let small = pool.alloc(KIB, MemoryTag::Scratch).unwrap();
    let small_kept = pool.alloc(KIB, MemoryTag::Scratch).unwrap();
    // 4 MiB large segment; the remainder of 1.5 MiB (above 1 MiB) is split off.
    let big = pool.alloc(2 * MIB + 512 * KIB, MemoryTag::Weights).unwrap();
    let big_kept = pool.alloc(5 * MIB, MemoryTag::Weights).unwrap();
    assert_eq!(pool.stats().num_segments, 3);
    drop((small, big));
    // The freed blocks stay cached until asked.
    assert_eq!(pool.stats().num_segments, 3);
    assert_eq!(raw.frees(), 0);
    pool.empty_cache();
    // Only the fully free large segment went back; the small segment still
    // holds `small_kept`.
    assert_eq!(raw.frees(), 1);
    let s = pool.stats();
    assert_eq!(s.num_segments, 2);
    assert_eq!(s.reserved_bytes, 2 * MIB + 6 * MIB);
    check_invariants(&pool, &raw, &[small_kept, big_kept]);
    pool.empty_cache();
    assert_eq!(raw.frees(), 3);
    assert_eq!(
        pool.stats(),
        PoolStats {
            peak_allocated_bytes: s.peak_allocated_bytes,
            ..PoolStats::default()
        }
    );
    assert!(raw.live_segments().is_empty());
}

#[test]
fn every_segment_returned_when_pool_and_blocks_dropped() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let clone = pool.clone();
    let blocks: Vec<Block> = (0..20u64)
        .map(|i| clone.alloc(i * 300 * KIB, MemoryTag::Kv).unwrap())
        .collect();
    let free_seg = pool.alloc(7 * MIB, MemoryTag::Kv).unwrap();
    drop(free_seg);
    let segments = pool.stats().num_segments;
    assert!(segments > 2);
    drop(pool);
    drop(clone);
    // Blocks keep the pool's state alive.
    assert_eq!(raw.live_segments().len(), segments);
    assert_eq!(raw.frees(), 0);
    drop(blocks);
    assert!(raw.live_segments().is_empty(), "all segments are back");
    assert_eq!(raw.frees() as usize, segments);
    assert_eq!(raw.bad_frees(), 0);
}

#[test]
fn freed_blocks_are_reused_without_calling_the_backend() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    for _ in 0..100 {
        let a = pool.alloc(700 * KIB, MemoryTag::Activations).unwrap();
        let b = pool.alloc(9 * MIB, MemoryTag::Activations).unwrap();
        drop((a, b));
    }
    assert_eq!(raw.alloc_calls(), 2);
    assert_eq!(pool.stats().peak_allocated_bytes, 700 * KIB + 10 * MIB);
}

#[test]
fn large_segments_are_rounded_to_2mib_and_small_ones_are_min_segment() {
    let raw = FakeRaw::new();
    let pool = pool_over(
        &raw,
        PoolConfig {
            min_segment_bytes: 4 * MIB,
            ..PoolConfig::default()
        },
    );
    let a = pool.alloc(MIB, MemoryTag::Scratch).unwrap();
    let b = pool.alloc(MIB + 1, MemoryTag::Scratch).unwrap();
    let c = pool.alloc(9 * MIB, MemoryTag::Scratch).unwrap();
    let sizes: Vec<u64> = pool.snapshot().segments.iter().map(|s| s.bytes).collect();
    assert_eq!(sizes, vec![4 * MIB, 4 * MIB, 10 * MIB]);
    // A small request never lands in a large segment, a large one never in a small one.
    assert_ne!(a.buf().segment, b.buf().segment);
    // 2 MiB fits in the rest of b's large segment.
    let d = pool.alloc(2 * MIB, MemoryTag::Scratch).unwrap();
    assert_eq!(d.buf().segment, b.buf().segment);
    assert_eq!(pool.stats().num_segments, 3);
    check_invariants(&pool, &raw, &[a, b, c, d]);
}

#[test]
fn reserve_pre_reserves_a_segment_used_by_later_allocations() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    assert_eq!(pool.reserve(0, MemoryTag::Weights), Ok(0));
    assert_eq!(pool.reserve(63 * MIB, MemoryTag::Weights), Ok(64 * MIB));
    assert_eq!(
        pool.faults().sites_reached(),
        0,
        "reserve is not a fault site"
    );
    let blocks: Vec<Block> = (0..30)
        .map(|_| pool.alloc(2 * MIB, MemoryTag::Weights).unwrap())
        .collect();
    assert_eq!(raw.alloc_calls(), 1);
    assert_eq!(pool.stats().allocated_bytes, 60 * MIB);
    check_invariants(&pool, &raw, &blocks);

    let raw = FakeRaw::with_capacity(8 * MIB);
    let pool = new_pool(&raw);
    assert_eq!(pool.reserve(6 * MIB, MemoryTag::Weights), Ok(6 * MIB));
    let err = pool.reserve(6 * MIB, MemoryTag::Weights).unwrap_err();
    assert!(matches!(err, BackendError::OutOfMemory { .. }), "{err:?}");
    assert_eq!(
        pool.stats().reserved_bytes,
        6 * MIB,
        "reserve never gives back the cache"
    );
}

#[test]
fn impossible_requests_fail_cleanly() {
    let raw = FakeRaw::with_capacity(1 << 30);
    let pool = new_pool(&raw);
    for bytes in [u64::MAX, u64::MAX - 255, u64::MAX / 2 + 1] {
        let err = pool.alloc(bytes, MemoryTag::Weights).unwrap_err();
        assert!(
            matches!(err, BackendError::OutOfMemory { requested_bytes, .. } if requested_bytes == bytes)
        );
    }
    check_invariants(&pool, &raw, &[]);
}

#[test]
fn blocks_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Block>();
    assert_send_sync::<Pool>();
}

#[test]
fn concurrent_alloc_and_free_keep_invariants() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let kept: Vec<Vec<Block>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = pool.clone();
                scope.spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..500u64 {
                        let bytes = (i * 7919 + t * 104_729) % (3 * MIB);
                        let block = pool.alloc(bytes, MemoryTag::ALL[(i % 5) as usize]).unwrap();
                        if i % 3 == 0 {
                            kept.push(block);
                        }
                    }
                    kept
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let kept: Vec<Block> = kept.into_iter().flatten().collect();
    check_invariants(&pool, &raw, &kept);
}

#[test]
fn block_drop_survives_a_poisoned_mutex() {
    let raw = FakeRaw::build(256, None, true);
    let pool = new_pool(&raw);
    let zero = pool.alloc(0, MemoryTag::Kv).unwrap();
    // The backend panics while the pool holds its lock: the mutex is poisoned.
    let pool2 = pool.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        pool2.alloc(KIB, MemoryTag::Kv)
    }));
    assert!(result.is_err());
    assert!(pool.shared.state.is_poisoned());
    // Everything still works and nothing panics.
    let _ = pool.stats();
    let _ = pool.snapshot();
    pool.empty_cache();
    drop(zero);
    check_invariants(&pool, &raw, &[]);
}

#[test]
fn block_drop_after_a_panic_in_another_thread_returns_the_block() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let block = pool.alloc(KIB, MemoryTag::Kv).unwrap();
    let shared = pool.shared.clone();
    let _ = std::thread::spawn(move || {
        let _guard = shared.state.lock();
        panic!("poison the pool");
    })
    .join();
    assert!(pool.shared.state.is_poisoned());
    drop(block);
    assert_eq!(pool.stats().allocated_bytes, 0);
    check_invariants(&pool, &raw, &[]);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { bytes: u64, tag: usize },
    Free(usize),
    EmptyCache,
}

/// Applies [`PoolChanges`] to an earlier snapshot.
fn apply_changes(snap: &mut PoolSnapshot, changes: PoolChanges) {
    assert_eq!(changes.since, snap.generation, "changes from another base");
    snap.segments
        .retain(|s| changes.segment_ids.contains(&s.id));
    for seg in changes.changed {
        match snap.segments.binary_search_by_key(&seg.id, |s| s.id) {
            Ok(i) => snap.segments[i] = seg,
            Err(i) => snap.segments.insert(i, seg),
        }
    }
    snap.stats = changes.stats;
    snap.generation = changes.generation;
}

#[test]
fn labels_steps_and_base_addresses_reach_the_snapshot() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    pool.set_step(7);
    let q = pool
        .alloc_labeled(1000, MemoryTag::Weights, "blk.0.attn_q.weight")
        .unwrap();
    pool.set_step(9);
    let kv = pool
        .alloc_labeled(3 * MIB, MemoryTag::Kv, "kv.layer.0")
        .unwrap();
    let plain = pool.alloc(10, MemoryTag::Scratch).unwrap();
    let again = pool
        .alloc_labeled(1000, MemoryTag::Weights, "blk.0.attn_q.weight")
        .unwrap();
    let snap = pool.snapshot();
    let find = |b: &Block| {
        let buf = b.buf();
        let seg = snap
            .segments
            .iter()
            .find(|s| Some(s.id) == buf.segment)
            .unwrap();
        assert_eq!(seg.addr + buf.offset, buf.addr, "base address + offset");
        seg.blocks
            .iter()
            .find(|x| x.offset == buf.offset)
            .unwrap()
            .clone()
    };
    let (bq, bkv, bp, ba) = (find(&q), find(&kv), find(&plain), find(&again));
    assert_eq!(
        (&*bq.label, bq.alloc_step, bq.requested_bytes),
        ("blk.0.attn_q.weight", 7, 1000)
    );
    assert_eq!((&*bkv.label, bkv.alloc_step), ("kv.layer.0", 9));
    assert_eq!((&*bp.label, bp.alloc_step), ("", 9));
    // One interned copy of a repeated label.
    assert!(Arc::ptr_eq(&bq.label, &ba.label));
    assert!(bq.alloc_us <= bkv.alloc_us);
    assert_eq!(snap.stats.live_blocks_by_tag[MemoryTag::Weights.index()], 2);
    check_invariants(&pool, &raw, &[q, kv, plain, again]);
}

#[test]
fn too_many_labels_share_one_overflow_label() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let mut st = pool.shared.lock();
    for i in 1..state::MAX_LABELS {
        assert_eq!(st.intern(&format!("l{i}")), i as u32);
    }
    let a = st.intern("one more");
    let b = st.intern("and another");
    assert_eq!(a, b, "labels past the cap share the overflow label");
    assert_eq!(st.intern("l5"), 5, "known labels keep their id");
    drop(st);
    let blk = pool
        .alloc_labeled(1, MemoryTag::Scratch, "yet another")
        .unwrap();
    let label = pool.snapshot().segments[0].blocks[0].label.clone();
    assert_eq!(&*label, state::OVERFLOW_LABEL);
    drop(blk);
}

#[test]
fn changes_since_lists_only_changed_segments() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    // Many blocks in small segments that then stay put.
    let stable: Vec<Block> = (0..200)
        .map(|_| pool.alloc(20 * KIB, MemoryTag::Weights).unwrap())
        .collect();
    let big = pool.alloc(5 * MIB, MemoryTag::Kv).unwrap();
    let base = pool.snapshot();
    assert!(base.segments.len() > 2);
    let nothing = pool.changes_since(base.generation);
    assert!(nothing.changed.is_empty());
    assert_eq!(nothing.blocks_visited, 0);
    assert_eq!(nothing.generation, base.generation);
    // A change in the large segment: only it is read.
    drop(big);
    let one = pool.changes_since(base.generation);
    assert_eq!(one.changed.len(), 1);
    assert_eq!(one.blocks_visited, 1);
    // Giving the free large segment back lists it as gone.
    pool.empty_cache();
    let gone = pool.changes_since(one.generation);
    assert!(gone.changed.is_empty());
    assert_eq!(gone.segment_ids.len(), base.segments.len() - 1);
    let mut mirror = base.clone();
    apply_changes(&mut mirror, pool.changes_since(base.generation));
    assert_eq!(mirror, pool.snapshot());
    drop(stable);
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        4 => 1u64..=4096,
        3 => 4097u64..=MIB,
        1 => prop::sample::select(vec![MIB - 1, MIB, MIB + 1, 2 * MIB, 2 * MIB + 1, 3 * MIB]),
        2 => (MIB + 1)..=(9 * MIB),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (size_strategy(), 0usize..5).prop_map(|(bytes, tag)| Op::Alloc { bytes, tag }),
        5 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::EmptyCache),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_alloc_free_sequences_keep_the_pool_consistent(
        ops in prop::collection::vec(op_strategy(), 1..200),
        capacity in prop::option::weighted(0.3, (8 * MIB)..(48 * MIB)),
        budget in prop::option::weighted(0.3, (4 * MIB)..(40 * MIB)),
        alignment in prop::sample::select(vec![64u64, 256, 512, 4096]),
    ) {
        let raw = FakeRaw::build(alignment, capacity, false);
        let pool = pool_over(&raw, PoolConfig { budget_bytes: budget, ..PoolConfig::default() });
        let mut held: Vec<Block> = Vec::new();
        let mut peak = 0u64;
        let mut mirror = pool.snapshot();
        for op in ops {
            match op {
                Op::Alloc { bytes, tag } => match pool.alloc(bytes, MemoryTag::ALL[tag]) {
                    Ok(block) => {
                        prop_assert_eq!(block.bytes(), bytes);
                        prop_assert_eq!(block.tag(), MemoryTag::ALL[tag]);
                        held.push(block);
                    }
                    Err(BackendError::OutOfMemory { requested_bytes, .. }) => {
                        prop_assert!(capacity.is_some() || budget.is_some());
                        prop_assert_eq!(requested_bytes, bytes);
                    }
                    Err(other) => prop_assert!(false, "unexpected error {:?}", other),
                },
                Op::Free(i) => {
                    if !held.is_empty() {
                        let i = i % held.len();
                        held.swap_remove(i);
                    }
                }
                Op::EmptyCache => pool.empty_cache(),
            }
            let stats = pool.stats();
            peak = peak.max(stats.allocated_bytes);
            prop_assert_eq!(stats.peak_allocated_bytes, peak);
            if let Some(budget) = budget {
                prop_assert!(stats.reserved_bytes <= budget);
            }
            check_invariants(&pool, &raw, &held);
            // Changes since the last look, applied to what was seen then,
            // give the layout now; unchanged segments are not read.
            let changes = pool.changes_since(mirror.generation);
            let unchanged_blocks: usize = mirror
                .segments
                .iter()
                .filter(|s| changes.segment_ids.contains(&s.id))
                .filter(|s| !changes.changed.iter().any(|c| c.id == s.id))
                .map(|s| s.blocks.len())
                .sum();
            apply_changes(&mut mirror, changes.clone());
            let now = pool.snapshot();
            prop_assert_eq!(&mirror, &now);
            let total_blocks: usize = now.segments.iter().map(|s| s.blocks.len()).sum();
            prop_assert_eq!(changes.blocks_visited + unchanged_blocks, total_blocks);
        }
        drop(pool);
        drop(held);
        prop_assert!(raw.live_segments().is_empty());
        prop_assert_eq!(raw.bad_frees(), 0);
    }
}

#[test]
fn segments_never_exceed_the_largest_buffer() {
    let raw = FakeRaw::new();
    let pool = pool_over(
        &raw,
        PoolConfig {
            max_segment_bytes: 4 * MIB,
            ..PoolConfig::default()
        },
    );
    let a = pool.alloc(3 * MIB, MemoryTag::Weights).unwrap();
    let b = pool.alloc(4 * MIB, MemoryTag::Weights).unwrap();
    assert!(raw.live_segments().values().all(|s| s.bytes <= 4 * MIB));
    let err = pool.alloc(4 * MIB + 1, MemoryTag::Weights).unwrap_err();
    assert!(err.to_string().contains("largest buffer"), "{err}");
    drop((a, b));
}

#[test]
fn stats_by_size_class_split_segments_and_free_bytes() {
    let raw = FakeRaw::new();
    let pool = new_pool(&raw);
    let a = pool.alloc(256 * KIB, MemoryTag::Kv).unwrap();
    let b = pool.alloc(256 * KIB, MemoryTag::Kv).unwrap();
    let _c = pool.alloc(256 * KIB, MemoryTag::Kv).unwrap();
    // 4 MiB large segment; the remainder of 1.5 MiB (above 1 MiB) is split off.
    let big = pool.alloc(2 * MIB + 512 * KIB, MemoryTag::Weights).unwrap();
    drop(a);
    drop(b);
    let s = pool.stats();
    let [small, large] = s.by_class;
    assert_eq!((small.num_segments, large.num_segments), (1, 1));
    assert_eq!(
        small.reserved_bytes + large.reserved_bytes,
        s.reserved_bytes
    );
    assert_eq!(small.free_bytes + large.free_bytes, s.free_bytes);
    // Small segment: a and b coalesced (512 KiB) before c, the tail after it.
    assert_eq!(small.free_bytes, 2 * MIB - 256 * KIB);
    assert_eq!(small.largest_free_bytes, 2 * MIB - 768 * KIB);
    let f = 1.0 - small.largest_free_bytes as f64 / small.free_bytes as f64;
    assert!((small.fragmentation - f).abs() < 1e-12);
    assert_eq!(large.reserved_bytes, 4 * MIB);
    assert_eq!(large.free_bytes, MIB + 512 * KIB);
    assert_eq!(large.fragmentation, 0.0);
    drop(big);
}
