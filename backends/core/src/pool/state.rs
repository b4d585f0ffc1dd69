//! The pool's bookkeeping: segments, their blocks, the free index and the
//! running totals.
//!
//! Nothing here locks or calls the backend; [`super::Pool`] does both and keeps
//! a [`State`] behind its mutex. Every method leaves the invariants listed in
//! the module documentation of [`super`] intact, and none of them panics
//! (arithmetic that could only underflow on a broken invariant saturates), so
//! a `Block` drop that reaches [`State::release`] cannot panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::{
    BlockInfo, ClassStats, MemoryTag, PoolChanges, PoolStats, RawSegment, SMALL_REQUEST_MAX_BYTES,
    SegmentId, SegmentInfo,
};

/// Most distinct block labels the pool interns; later new labels share
/// [`OVERFLOW_LABEL`]. Labels name a purpose (`blk.3.attn_q.weight`,
/// `kv.layer.7`), not an instance, so real runs stay far below this.
pub(super) const MAX_LABELS: usize = 1 << 16;

/// The label of blocks allocated once [`MAX_LABELS`] labels exist.
pub(super) const OVERFLOW_LABEL: &str = "(too many labels)";

/// Which segments may serve a request: small requests (at most
/// [`SMALL_REQUEST_MAX_BYTES`] after rounding) only use small segments, larger
/// ones only large segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SizeClass {
    /// Requests up to [`SMALL_REQUEST_MAX_BYTES`].
    Small,
    /// Requests above [`SMALL_REQUEST_MAX_BYTES`].
    Large,
}

impl SizeClass {
    /// The class of a request of `rounded` bytes (already rounded to the alignment).
    pub(super) fn of(rounded: u64) -> SizeClass {
        if rounded <= SMALL_REQUEST_MAX_BYTES {
            SizeClass::Small
        } else {
            SizeClass::Large
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            SizeClass::Small => 0,
            SizeClass::Large => 1,
        }
    }

    /// Lower-case name, for error messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            SizeClass::Small => "small",
            SizeClass::Large => "large",
        }
    }
}

/// A free block in the free index. Ordered by size first, so the first key at
/// or above `(n, SegmentId(0), 0)` is the best fit for `n` bytes; ties go to
/// the lowest segment id, then the lowest offset (deterministic placement).
pub(super) type FreeKey = (u64, SegmentId, u64);

/// Who asked for a live block and when (telemetry: hover label and age).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Meta {
    /// Interned label id (0 = no label).
    pub(super) label: u32,
    /// Requested (unrounded) bytes.
    pub(super) requested: u64,
    /// Engine step current at allocation ([`super::Pool::set_step`]).
    pub(super) step: u64,
    /// Microseconds since the pool was made, at allocation.
    pub(super) t_us: u64,
}

/// One block of a segment: live (tagged) or free (`tag: None`, default meta).
#[derive(Debug, Clone, Copy)]
struct Span {
    bytes: u64,
    tag: Option<MemoryTag>,
    meta: Meta,
}

impl Span {
    fn free(bytes: u64) -> Span {
        Span {
            bytes,
            tag: None,
            meta: Meta::default(),
        }
    }
}

/// Interned block labels: a `u32` per span instead of a string, so a span
/// stays `Copy` and freeing a block never touches the heap. Never shrinks.
#[derive(Debug)]
struct Labels {
    /// Id -> label; id 0 is the empty label.
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
}

impl Labels {
    fn new() -> Labels {
        let empty: Arc<str> = Arc::from("");
        Labels {
            names: vec![empty.clone()],
            ids: HashMap::from([(empty, 0)]),
        }
    }

    /// The id of `label`, adding it when new (allocates only then).
    fn intern(&mut self, label: &str) -> u32 {
        if let Some(&id) = self.ids.get(label) {
            return id;
        }
        let label = if self.names.len() >= MAX_LABELS {
            OVERFLOW_LABEL
        } else {
            label
        };
        if let Some(&id) = self.ids.get(label) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = Arc::from(label);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    fn name(&self, id: u32) -> Arc<str> {
        self.names
            .get(id as usize)
            .unwrap_or(&self.names[0])
            .clone()
    }
}

#[derive(Debug)]
struct Segment {
    /// What the backend returned; handed back as is.
    raw: RawSegment,
    /// Usable size: what the pool asked for.
    bytes: u64,
    class: SizeClass,
    /// Every block of the segment by offset; they tile `[0, bytes)` exactly.
    spans: BTreeMap<u64, Span>,
    /// Number of live spans.
    live: usize,
    /// [`State::generation`] of the last change to the segment's blocks.
    changed_at: u64,
}

/// A block just handed out by [`State::carve`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Carved {
    /// Segment holding the block.
    pub(super) segment: SegmentId,
    /// Offset of the block in the segment.
    pub(super) offset: u64,
    /// Segment base address + offset.
    pub(super) addr: u64,
    /// Size of the block (the rounded request, plus any remainder too small to split off).
    pub(super) bytes: u64,
}

/// Segments, blocks, the free index and the totals.
#[derive(Debug)]
pub(super) struct State {
    /// Block alignment (a power of two, at least 256).
    align: u64,
    segments: BTreeMap<SegmentId, Segment>,
    /// Free blocks per size class, indexed by [`SizeClass::index`].
    free: [BTreeSet<FreeKey>; 2],
    reserved: u64,
    allocated: u64,
    peak: u64,
    live_blocks: usize,
    by_tag: [u64; 5],
    /// Live blocks per tag.
    live_by_tag: [usize; 5],
    /// Requested (unrounded) bytes of live blocks per tag.
    pub(super) requested_by_tag: [u64; 5],
    /// Bumped by every change to any segment's blocks (and by adding or
    /// removing a segment); each segment remembers the value of its last change.
    generation: u64,
    labels: Labels,
}

/// `1 - largest / total`, 0 when nothing is free.
pub(super) fn fragmentation(largest_free: u64, total_free: u64) -> f64 {
    if total_free == 0 {
        0.0
    } else {
        1.0 - largest_free as f64 / total_free as f64
    }
}

impl State {
    /// An empty state for blocks aligned to `align` bytes.
    pub(super) fn new(align: u64) -> State {
        State {
            align,
            segments: BTreeMap::new(),
            free: [BTreeSet::new(), BTreeSet::new()],
            reserved: 0,
            allocated: 0,
            peak: 0,
            live_blocks: 0,
            by_tag: [0; 5],
            live_by_tag: [0; 5],
            requested_by_tag: [0; 5],
            generation: 0,
            labels: Labels::new(),
        }
    }

    /// The interned id of a block label.
    pub(super) fn intern(&mut self, label: &str) -> u32 {
        self.labels.intern(label)
    }

    /// The current generation: changes since an earlier value are exactly the
    /// segments whose `changed_at` is larger.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Next generation, for a change being made now.
    fn bump(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Bytes held in segments.
    pub(super) fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Whether a segment with this id is held.
    pub(super) fn has_segment(&self, id: SegmentId) -> bool {
        self.segments.contains_key(&id)
    }

    /// Smallest remainder split off a free block: any remainder in a small
    /// segment; in a large segment only one that could serve a large request
    /// (above [`SMALL_REQUEST_MAX_BYTES`]), since small requests never use
    /// large segments. A smaller remainder stays part of the handed-out block.
    fn min_split(&self, class: SizeClass) -> u64 {
        match class {
            SizeClass::Small => self.align,
            SizeClass::Large => SMALL_REQUEST_MAX_BYTES + 1,
        }
    }

    /// Best fit: the smallest free block of `class` with at least `bytes` bytes.
    /// `O(log F)` for `F` free blocks of the class.
    pub(super) fn best_fit(&self, class: SizeClass, bytes: u64) -> Option<FreeKey> {
        self.free[class.index()]
            .range((bytes, SegmentId(0), 0)..)
            .next()
            .copied()
    }

    /// Adopts a new segment of `bytes` usable bytes as one free block and
    /// returns its key. The caller checked that the id is new.
    pub(super) fn add_segment(&mut self, raw: RawSegment, bytes: u64, class: SizeClass) -> FreeKey {
        let mut spans = BTreeMap::new();
        spans.insert(0, Span::free(bytes));
        let changed_at = self.bump();
        self.segments.insert(
            raw.id,
            Segment {
                raw,
                bytes,
                class,
                spans,
                live: 0,
                changed_at,
            },
        );
        let key = (bytes, raw.id, 0);
        self.free[class.index()].insert(key);
        self.reserved = self.reserved.saturating_add(bytes);
        key
    }

    /// Turns the free block `key` into a live block of `bytes` (a multiple of
    /// the alignment, at most the free block's size) tagged `tag` with `meta`, splitting
    /// the remainder off as a free block when it is at least the class's
    /// minimum split. `None` (and no change) when `key` is not a free block
    /// large enough. `O(log F + log B)`.
    pub(super) fn carve(
        &mut self,
        key: FreeKey,
        bytes: u64,
        tag: MemoryTag,
        meta: Meta,
    ) -> Option<Carved> {
        let (size, id, offset) = key;
        let min_split = self.min_split(self.segments.get(&id)?.class);
        let seg = self.segments.get_mut(&id)?;
        let span = seg.spans.get(&offset).copied()?;
        if span.tag.is_some() || span.bytes != size || size < bytes {
            return None;
        }
        self.generation += 1;
        seg.changed_at = self.generation;
        let free = &mut self.free[seg.class.index()];
        free.remove(&key);
        let remainder = size - bytes;
        let block = if remainder >= min_split {
            let rest = offset + bytes;
            seg.spans.insert(rest, Span::free(remainder));
            free.insert((remainder, id, rest));
            bytes
        } else {
            size
        };
        seg.spans.insert(
            offset,
            Span {
                bytes: block,
                tag: Some(tag),
                meta,
            },
        );
        seg.live += 1;
        let addr = seg.raw.addr.wrapping_add(offset);
        self.allocated = self.allocated.saturating_add(block);
        self.peak = self.peak.max(self.allocated);
        self.by_tag[tag.index()] = self.by_tag[tag.index()].saturating_add(block);
        self.live_by_tag[tag.index()] += 1;
        self.live_blocks += 1;
        Some(Carved {
            segment: id,
            offset,
            addr,
            bytes: block,
        })
    }

    /// Frees the live block at `offset` of segment `id` and merges it with a
    /// free neighbour on either side. Returns `false`, changing nothing, when
    /// there is no such live block. Never panics. `O(log F + log B)`.
    pub(super) fn release(&mut self, id: SegmentId, offset: u64) -> bool {
        let Some(seg) = self.segments.get_mut(&id) else {
            return false;
        };
        let Some(span) = seg.spans.get(&offset).copied() else {
            return false;
        };
        let Some(tag) = span.tag else { return false };
        self.generation += 1;
        seg.changed_at = self.generation;
        let free = &mut self.free[seg.class.index()];

        let mut start = offset;
        let mut bytes = span.bytes;
        if let Some((&prev_off, &prev)) = seg.spans.range(..offset).next_back()
            && prev.tag.is_none()
        {
            free.remove(&(prev.bytes, id, prev_off));
            seg.spans.remove(&offset);
            start = prev_off;
            bytes = bytes.saturating_add(prev.bytes);
        }
        let next_off = offset.saturating_add(span.bytes);
        if let Some(&next) = seg.spans.get(&next_off)
            && next.tag.is_none()
        {
            free.remove(&(next.bytes, id, next_off));
            seg.spans.remove(&next_off);
            bytes = bytes.saturating_add(next.bytes);
        }
        seg.spans.insert(start, Span::free(bytes));
        free.insert((bytes, id, start));
        seg.live = seg.live.saturating_sub(1);

        self.allocated = self.allocated.saturating_sub(span.bytes);
        self.by_tag[tag.index()] = self.by_tag[tag.index()].saturating_sub(span.bytes);
        self.live_by_tag[tag.index()] = self.live_by_tag[tag.index()].saturating_sub(1);
        self.live_blocks = self.live_blocks.saturating_sub(1);
        true
    }

    /// Removes every segment without a live block and returns them, for the
    /// caller to give back to the backend. `O(S + F log F)`.
    pub(super) fn take_free_segments(&mut self) -> Vec<RawSegment> {
        let ids: Vec<SegmentId> = self
            .segments
            .iter()
            .filter(|(_, s)| s.live == 0)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(seg) = self.segments.remove(&id) else {
                continue;
            };
            for (&off, span) in &seg.spans {
                if span.tag.is_none() {
                    self.free[seg.class.index()].remove(&(span.bytes, id, off));
                }
            }
            self.reserved = self.reserved.saturating_sub(seg.bytes);
            out.push(seg.raw);
        }
        if !out.is_empty() {
            self.bump();
        }
        out
    }

    /// Current totals. `O(log F)`.
    pub(super) fn stats(&self) -> PoolStats {
        let free_bytes = self.reserved.saturating_sub(self.allocated);
        let largest_free_bytes = self
            .free
            .iter()
            .filter_map(|set| set.last())
            .map(|key| key.0)
            .max()
            .unwrap_or(0);
        let mut by_class = [ClassStats::default(); 2];
        for seg in self.segments.values() {
            let c = &mut by_class[seg.class.index()];
            c.num_segments += 1;
            c.reserved_bytes += seg.bytes;
        }
        for (c, free) in by_class.iter_mut().zip(&self.free) {
            c.free_bytes = free.iter().map(|key| key.0).sum();
            c.largest_free_bytes = free.last().map_or(0, |key| key.0);
            c.fragmentation = fragmentation(c.largest_free_bytes, c.free_bytes);
        }
        PoolStats {
            reserved_bytes: self.reserved,
            allocated_bytes: self.allocated,
            free_bytes,
            largest_free_bytes,
            fragmentation: fragmentation(largest_free_bytes, free_bytes),
            peak_allocated_bytes: self.peak,
            num_segments: self.segments.len(),
            num_live_blocks: self.live_blocks,
            allocated_by_tag: self.by_tag,
            requested_by_tag: self.requested_by_tag,
            live_blocks_by_tag: self.live_by_tag,
            by_class,
        }
    }

    /// Every segment with its blocks, in id order. `O(S + B)` over all blocks.
    pub(super) fn segment_infos(&self) -> Vec<SegmentInfo> {
        self.segments.values().map(|seg| self.info(seg)).collect()
    }

    /// The segments changed after generation `since` (in id order, with all
    /// their blocks), and the ids of all segments. `O(S + B)` over the
    /// changed segments' blocks only.
    pub(super) fn changes_since(&self, since: u64) -> PoolChanges {
        let mut changed = Vec::new();
        let mut blocks_visited = 0;
        for seg in self.segments.values().filter(|s| s.changed_at > since) {
            blocks_visited += seg.spans.len();
            changed.push(self.info(seg));
        }
        PoolChanges {
            since,
            generation: self.generation,
            segment_ids: self.segments.keys().copied().collect(),
            changed,
            stats: self.stats(),
            blocks_visited,
        }
    }

    /// One segment with its blocks. `O(B)` over its blocks.
    fn info(&self, seg: &Segment) -> SegmentInfo {
        let mut total_free = 0u64;
        let mut largest_free = 0u64;
        let blocks = seg
            .spans
            .iter()
            .map(|(&offset, span)| {
                if span.tag.is_none() {
                    total_free += span.bytes;
                    largest_free = largest_free.max(span.bytes);
                }
                BlockInfo {
                    offset,
                    bytes: span.bytes,
                    tag: span.tag,
                    label: self.labels.name(span.meta.label),
                    requested_bytes: span.meta.requested,
                    alloc_step: span.meta.step,
                    alloc_us: span.meta.t_us,
                }
            })
            .collect();
        SegmentInfo {
            id: seg.raw.id,
            addr: seg.raw.addr,
            bytes: seg.bytes,
            blocks,
            free_bytes: total_free,
            largest_free_bytes: largest_free,
            fragmentation: fragmentation(largest_free, total_free),
            changed_at: seg.changed_at,
        }
    }

    /// Checks what the public snapshot cannot show: the free index holds
    /// exactly the free spans, each segment's live count and class are right,
    /// and the running totals match a recount.
    #[cfg(test)]
    pub(super) fn check_internal(&self) {
        let mut expect_free: [BTreeSet<FreeKey>; 2] = [BTreeSet::new(), BTreeSet::new()];
        let (mut reserved, mut allocated, mut live_total) = (0u64, 0u64, 0usize);
        for (&id, seg) in &self.segments {
            assert_eq!(seg.raw.id, id);
            reserved += seg.bytes;
            let mut live = 0;
            for (&off, span) in &seg.spans {
                match span.tag {
                    None => {
                        expect_free[seg.class.index()].insert((span.bytes, id, off));
                    }
                    Some(_) => {
                        live += 1;
                        allocated += span.bytes;
                    }
                }
            }
            assert_eq!(seg.live, live, "live count of segment {id:?}");
            live_total += live;
        }
        assert_eq!(
            self.free, expect_free,
            "free index out of sync with the spans"
        );
        assert_eq!(self.reserved, reserved);
        assert_eq!(self.allocated, allocated);
        assert_eq!(self.live_blocks, live_total);
        assert_eq!(self.live_by_tag.iter().sum::<usize>(), live_total);
        assert!(
            self.segments
                .values()
                .all(|s| s.changed_at <= self.generation),
            "a segment changed after the current generation"
        );
    }
}
