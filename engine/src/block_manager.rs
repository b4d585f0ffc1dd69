//! Paged KV-cache bookkeeping: which page holds what, who holds each page.
//!
//! The [`BlockManager`] hands out [`PageId`]s of `page_size` token positions,
//! counts references to each page, and keeps the prefix cache: every *full*
//! page whose K/V is written can be registered under
//! `hash_page(parent_hash, page_tokens)`, so a later sequence with the same
//! prefix reuses the page instead of recomputing it.
//!
//! ## Invariants
//! - A page is on a free list if and only if its refcount is 0 and its
//!   commit unit is committed. Clean free pages (no cached content) are on
//!   their unit's clean list; free pages with cached content are on the one
//!   cached list.
//! - A page has cached content (hash, parent hash, tokens) if and only if the
//!   hash map points to it. Freed pages *keep* their content, so a later
//!   request can revive them; the content is dropped only when the page is
//!   handed out again as a fresh page, or by the idle rule below (eviction).
//! - A page registered in the prefix cache is immutable: it is never written.
//!   [`BlockManager::allocate_slots`] copies it first (copy-on-write). Only
//!   registered pages are ever shared, so no page with refcount > 1 is
//!   written either.
//! - Page ids never move: growing or shrinking the committed memory never
//!   relocates a live page (no compaction).
//!
//! ## Free lists and LRU
//! A fresh page is, in this order:
//! 1. a *clean* free page (never used, or freed without cached content) of
//!    the lowest committed unit that has one, front of that unit's list
//!    (freed pages go to the back: FIFO within a unit);
//! 2. else the *least recently freed cached* page, whose content is evicted;
//! 3. else none: the caller grows first ([`BlockManager::grow_for`]).
//!
//! So cached content is evicted only when no clean page is left, and then in
//! least-recently-freed order. A sequence frees its pages last page first,
//! so the tail of a prompt is evicted before the shared head. A prefix-cache
//! hit on a free page unlinks it from the middle of the cached list. The
//! lists are intrusive (prev/next indices per page), so push, pop and unlink
//! are O(1) and memory is O(num_pages). (Before growable KV there was one
//! list mixing clean and cached pages by free time, so an old cached page was
//! evicted before a newer clean one; now clean pages go first.)
//!
//! ## Growable KV: commit units
//! `num_pages` is the *reservation* (the plan's KV figure). With a
//! [`KvCommit`] ([`BlockManager::with_commit`]), physical memory is committed
//! in units of `pages_per_unit` consecutive page ids (unit `u` = pages
//! `u * ppu .. (u + 1) * ppu`, the last one possibly shorter); without one
//! ([`BlockManager::new`]) everything is one committed unit, never released.
//! - **Only committed pages are handed out.** Pages of an uncommitted unit
//!   are on no list; [`BlockManager::num_available_pages`] counts the free
//!   pages of committed units, and every scheduling decision
//!   ([`BlockManager::can_allocate`], [`BlockManager::max_new_tokens`]) uses
//!   it.
//! - **Grow before preempting.** [`BlockManager::grow_for`]`(n)` commits the
//!   lowest uncommitted units until `n` pages are available; the scheduler
//!   calls it before deciding that pages are short. Cached free pages count
//!   as available, so the cache is evicted (LRU) before memory is grown. A
//!   refused commit (device full, budget, injected fault) is an `Err`; the
//!   units committed before it stay, nothing leaks, and the scheduler
//!   preempts, waits, or fails a sequence that has nothing to wait for.
//! - **Placement so units can empty.** Fresh pages come from the lowest
//!   committed unit with a clean page, so the load packs into low units and
//!   high units are the first to empty. (Fullest-unit-first would pack
//!   tighter but needs a priority queue keyed by fill, updated on every free;
//!   lowest-first costs O(log num_units) and approximates it, since low units
//!   are filled first.)
//! - **Release.** A unit is *live* while a page of it is held (refcount > 0)
//!   or holds cached content. A unit with no live page is released by the
//!   next [`BlockManager::end_step`] — at the end of the scheduler's
//!   `postprocess`, after the step's plan ran, because that plan's swap-out
//!   copies may still read a page freed while it was scheduled. The
//!   committer defers the actual free until queued device work is done.
//! - **Eviction of idle cached pages.** A cached free page keeps its unit
//!   committed. A unit whose pages are all free but some cached (no page
//!   held) for `cache_idle_steps` steps ([`DEFAULT_CACHE_IDLE_STEPS`] = 64,
//!   [`BlockManager::set_cache_idle_steps`]) has its cached pages evicted
//!   (dropped from the prefix cache, out of LRU order) and is released at
//!   that `end_step`. Reviving one of its pages makes it live again and
//!   restarts the count. Under memory pressure cached pages are evicted
//!   earlier, by reuse (rule 2 above), before any growth.
//!
//! //! ## Prefix cache
//! Hash: [`hash_page`], a hand-rolled 64-bit mix (splitmix64 finaliser per
//! token), stable across runs and platforms. A lookup walks a sequence's
//! full-page hashes in order and stops at the first miss; each hit is verified
//! against the stored tokens and parent hash, so a false hit needs a 64-bit
//! collision between two different prefixes' parent chains.
//!
//! **Cap.** The cache may cover the whole sequence; the scheduler then
//! recomputes only the last token, so there are logits to sample. That token's
//! K/V lands in the last cached page, which is immutable, so the sequence gets
//! a private copy first (copy-on-write: one `(src, dst)` pair in the step plan,
//! the cached original keeps its other holders or goes back to the free list,
//! still revivable). This costs one page copy instead of recomputing up to
//! `page_size` tokens. Writing in place, even the same token at the same
//! position, is not safe: another sequence admitted in the same step may
//! claim the page and read it while it is written.
//!
//! ## Telemetry
//! Every page remembers its holders (sequence id and index in its block
//! table, by arrival), and every change to a page's refcount, holders or
//! cached content marks it *dirty*: a set of at most `num_pages` entries
//! (a flag per page and a list), so a telemetry delta reads only the pages
//! changed since the last one ([`BlockManager::take_dirty_pages`]). The
//! scheduler also marks pages whose written-token count moved.
//!
//! ## Costs
//! Allocation, free and revival: O(log num_units) per page (O(1) list work
//! plus the ordered set of units with clean pages). Lookup: O(page_size) per
//! hit page (token verification). Registration: O(page_size) per newly full
//! page. Commit: O(pages_per_unit + log num_units) per unit; release and idle
//! eviction: O(pages_per_unit + log num_units) per unit released;
//! `end_step` does no work for units that stay live. Every fresh page
//! allocation is a fault site (`faults.check("kv page")`); every commit is a
//! fault site of the committer (`faults.check("kv grow")` in the test
//! double).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use pagoda_backend::FaultInjector;

use crate::error::{EngineError, Result};
use crate::kv_commit::KvCommit;
use crate::sequence::{PageId, SeqId, Sequence, TokenId};

pub use crate::prefix_hash::hash_page;

/// What a page holds in the prefix cache.
#[derive(Debug, Clone)]
struct CachedContent {
    hash: u64,
    parent: Option<u64>,
    /// (page_size)
    tokens: Box<[TokenId]>,
}

#[derive(Debug, Clone, Default)]
struct Page {
    refcount: u32,
    cached: Option<CachedContent>,
    /// (refcount) holders: sequence and index of the page in its block
    /// table, sorted by sequence id (= arrival).
    holders: Vec<(SeqId, u32)>,
}

/// Pages changed since the last [`BlockManager::take_dirty_pages`]: a flag
/// per page so a page is listed once, the list in marking order.
#[derive(Debug, Clone)]
struct DirtyPages {
    /// (num_pages)
    flag: Vec<bool>,
    /// At most num_pages entries (reserved up front).
    list: Vec<u32>,
}

impl DirtyPages {
    /// Every page dirty: nobody has seen any yet.
    fn all(num_pages: u32) -> DirtyPages {
        DirtyPages {
            flag: vec![true; num_pages as usize],
            list: (0..num_pages).collect(),
        }
    }

    fn mark(&mut self, p: u32) {
        if let Some(f) = self.flag.get_mut(p as usize)
            && !*f
        {
            *f = true;
            self.list.push(p);
        }
    }
}

/// Intrusive doubly-linked lists over page ids (each page in at most one
/// list): O(1) push-back, pop-front and unlink by page id.
#[derive(Debug, Clone)]
struct PageLists {
    /// (num_pages)
    prev: Vec<Option<u32>>,
    /// (num_pages)
    next: Vec<Option<u32>>,
    /// (num_pages) the list holding each page.
    list: Vec<Option<u32>>,
    /// (num_lists)
    head: Vec<Option<u32>>,
    /// (num_lists)
    tail: Vec<Option<u32>>,
    /// (num_lists)
    len: Vec<usize>,
}

impl PageLists {
    fn new(num_pages: usize, num_lists: usize) -> Self {
        Self {
            prev: vec![None; num_pages],
            next: vec![None; num_pages],
            list: vec![None; num_pages],
            head: vec![None; num_lists],
            tail: vec![None; num_lists],
            len: vec![0; num_lists],
        }
    }

    fn push_back(&mut self, l: usize, p: u32) {
        let i = p as usize;
        debug_assert!(
            self.list[i].is_none(),
            "page {p} pushed to a free list twice"
        );
        self.prev[i] = self.tail[l];
        self.next[i] = None;
        match self.tail[l] {
            Some(t) => self.next[t as usize] = Some(p),
            None => self.head[l] = Some(p),
        }
        self.tail[l] = Some(p);
        self.list[i] = Some(l as u32);
        self.len[l] += 1;
    }

    /// Unlinks `p` from its list; returns the list.
    fn unlink(&mut self, p: u32) -> Option<usize> {
        let i = p as usize;
        let l = self.list[i]? as usize;
        let (prev, next) = (self.prev[i], self.next[i]);
        match prev {
            Some(q) => self.next[q as usize] = next,
            None => self.head[l] = next,
        }
        match next {
            Some(q) => self.prev[q as usize] = prev,
            None => self.tail[l] = prev,
        }
        self.prev[i] = None;
        self.next[i] = None;
        self.list[i] = None;
        self.len[l] -= 1;
        Some(l)
    }

    fn pop_front(&mut self, l: usize) -> Option<u32> {
        let p = self.head[l]?;
        self.unlink(p);
        Some(p)
    }

    fn list_of(&self, p: u32) -> Option<usize> {
        self.list[p as usize].map(|l| l as usize)
    }

    fn iter(&self, l: usize) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(self.head[l], |&p| self.next[p as usize])
    }
}

/// Where a commit unit stands (only tracked with a committer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitState {
    /// No memory behind it; its pages are in no list.
    Uncommitted,
    /// Committed, every page clean and free: released at the next
    /// [`BlockManager::end_step`].
    Empty,
    /// Committed, no page held, some free pages cached; since the step it
    /// entered this state (idle eviction after `cache_idle_steps`).
    CacheOnly(u64),
    /// Committed with at least one held page.
    Live,
}

#[derive(Debug, Clone, Copy)]
struct Unit {
    /// Pages with refcount > 0.
    held: u32,
    /// Free pages with cached content.
    cached_free: u32,
    state: UnitState,
}

/// Growth counters for telemetry (all zero growth counters without a
/// committer, where every page is committed from the start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvCommitStats {
    /// Pages reserved (the plan's `num_pages`).
    pub reserved_pages: usize,
    /// Pages per commit unit.
    pub pages_per_unit: usize,
    /// Units committed now.
    pub committed_units: usize,
    /// Pages in committed units now.
    pub committed_pages: usize,
    /// Most pages committed at once.
    pub peak_committed_pages: usize,
    /// Successful commits (grow events).
    pub num_grows: u64,
    /// Releases.
    pub num_releases: u64,
    /// Commits the committer refused (device full, cap, injected fault).
    pub num_grow_failures: u64,
    /// Cached free pages evicted by the idle rule (not by reuse).
    pub num_idle_evictions: u64,
}

/// Default steps a unit holding only cached free pages stays committed
/// before its cached pages are evicted and the unit released.
pub const DEFAULT_CACHE_IDLE_STEPS: u64 = 64;

/// The cached pages a waiting sequence can reuse, from
/// [`BlockManager::lookup_prefix`]. Valid until the block manager is next
/// changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Cached pages covering the sequence's first tokens, in order.
    pub pages: Vec<PageId>,
    /// Tokens whose K/V the sequence need not compute:
    /// `min(pages.len() * page_size, len - 1)`.
    pub num_cached_tokens: usize,
    /// How many of `pages` are free now (refcount 0): claiming them takes
    /// them off the free list.
    pub num_revived: usize,
}

/// One page as the block manager sees it (telemetry, checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageState {
    /// The page.
    pub page: PageId,
    /// Sequences holding it.
    pub refcount: u32,
    /// Prefix-cache hash when the page is registered (revivable when free).
    pub hash: Option<u64>,
}

impl PageState {
    /// Whether it is in the free list.
    pub fn is_free(&self) -> bool {
        self.refcount == 0
    }
}

/// Allocator and prefix cache of KV pages. See the module docs.
#[derive(Clone)]
pub struct BlockManager {
    page_size: usize,
    enable_prefix_caching: bool,
    faults: FaultInjector,
    /// (num_pages)
    pages: Vec<Page>,
    /// Lists `0..num_units`: the clean free pages of each committed unit
    /// (freed pages at the back); list `num_units` ([`Self::cached_list`]):
    /// free pages with cached content, least recently freed first.
    lists: PageLists,
    /// hash -> page holding that content.
    cache: HashMap<u64, PageId>,
    /// The memory behind the pages; `None` = all committed, never released.
    commit: Option<Arc<dyn KvCommit>>,
    pages_per_unit: usize,
    /// (num_units)
    units: Vec<Unit>,
    /// Committed units with a clean free page (placement: lowest first).
    units_with_clean: BTreeSet<u32>,
    /// Uncommitted units (growth: lowest first).
    uncommitted: BTreeSet<u32>,
    /// Units in [`UnitState::Empty`].
    empty_units: BTreeSet<u32>,
    /// Units in [`UnitState::CacheOnly`], by (since step, unit).
    cache_only_units: BTreeSet<(u64, u32)>,
    /// Pages with refcount > 0.
    num_held: usize,
    /// Clean free pages in committed units.
    num_clean: usize,
    /// Steps ended so far ([`Self::end_step`]).
    step: u64,
    cache_idle_steps: u64,
    stats: KvCommitStats,
    dirty: DirtyPages,
}

impl std::fmt::Debug for BlockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManager")
            .field("page_size", &self.page_size)
            .field("num_pages", &self.pages.len())
            .field("num_held", &self.num_held)
            .field("growable", &self.commit.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl BlockManager {
    /// `num_pages` pages of `page_size` token positions, all free and
    /// committed (no committer). Fails when `page_size` is 0, `num_pages` is
    /// 0, or a slot (`page * page_size + offset`) would not fit in `u32`.
    pub fn new(
        num_pages: usize,
        page_size: usize,
        enable_prefix_caching: bool,
        faults: FaultInjector,
    ) -> Result<Self> {
        Self::with_commit(num_pages, page_size, enable_prefix_caching, faults, None)
    }

    /// Like [`BlockManager::new`], with `num_pages` the *reservation*: with a
    /// committer, no unit is committed at first and units are committed and
    /// released as the module docs describe; `None` commits everything from
    /// the start.
    pub fn with_commit(
        num_pages: usize,
        page_size: usize,
        enable_prefix_caching: bool,
        faults: FaultInjector,
        commit: Option<Arc<dyn KvCommit>>,
    ) -> Result<Self> {
        if page_size == 0 || num_pages == 0 {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache needs at least one page of at least one token (num_pages={num_pages}, page_size={page_size})"
            )));
        }
        let num_slots = num_pages.saturating_mul(page_size);
        if u32::try_from(num_pages).is_err() || u32::try_from(num_slots).is_err() {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache of {num_pages} pages x {page_size} tokens has more slots than fit in u32"
            )));
        }
        let pages_per_unit = match &commit {
            Some(c) if c.pages_per_unit() == 0 => {
                return Err(EngineError::InvalidConfig(
                    "a KV commit unit must hold at least one page".into(),
                ));
            }
            Some(c) => c.pages_per_unit(),
            None => num_pages,
        };
        let num_units = num_pages.div_ceil(pages_per_unit);
        let growable = commit.is_some();
        let mut m = Self {
            page_size,
            enable_prefix_caching,
            faults,
            pages: vec![Page::default(); num_pages],
            lists: PageLists::new(num_pages, num_units + 1),
            cache: HashMap::new(),
            commit,
            pages_per_unit,
            units: vec![
                Unit {
                    held: 0,
                    cached_free: 0,
                    state: UnitState::Uncommitted,
                };
                num_units
            ],
            units_with_clean: BTreeSet::new(),
            uncommitted: (0..num_units as u32).collect(),
            empty_units: BTreeSet::new(),
            cache_only_units: BTreeSet::new(),
            num_held: 0,
            num_clean: 0,
            step: 0,
            cache_idle_steps: DEFAULT_CACHE_IDLE_STEPS,
            stats: KvCommitStats {
                reserved_pages: num_pages,
                pages_per_unit,
                ..KvCommitStats::default()
            },
            dirty: DirtyPages::all(num_pages as u32),
        };
        if !growable {
            // Everything committed from the start, never released.
            m.mark_committed(0);
            m.units[0].state = UnitState::Live;
            m.empty_units.clear();
        }
        Ok(m)
    }

    /// Token positions per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Total pages (the reservation).
    pub fn num_pages(&self) -> usize {
        self.pages.len()
    }

    /// Pages with refcount 0 (cached or not, committed or not).
    pub fn num_free_pages(&self) -> usize {
        self.pages.len() - self.num_held
    }

    /// Free pages in committed units (cached or not): what can be handed
    /// out without growing.
    pub fn num_available_pages(&self) -> usize {
        self.num_clean + self.lists.len[self.cached_list()]
    }

    /// Free pages that still hold revivable cached content.
    pub fn num_cached_free_pages(&self) -> usize {
        self.lists.len[self.cached_list()]
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Whether `num_pages` pages are available now, without growing.
    pub fn can_allocate(&self, num_pages: usize) -> bool {
        num_pages <= self.num_available_pages()
    }

    /// Whether a committer backs the pages (units grow and shrink).
    pub fn is_growable(&self) -> bool {
        self.commit.is_some()
    }

    /// Pages per commit unit (`num_pages` without a committer).
    pub fn pages_per_unit(&self) -> usize {
        self.pages_per_unit
    }

    /// Commit units of the reservation.
    pub fn num_units(&self) -> usize {
        self.units.len()
    }

    /// Units committed now.
    pub fn num_committed_units(&self) -> usize {
        self.stats.committed_units
    }

    /// Pages in committed units now.
    pub fn num_committed_pages(&self) -> usize {
        self.stats.committed_pages
    }

    /// Whether the unit holding `page` is committed.
    pub fn is_committed(&self, page: PageId) -> bool {
        self.units
            .get(page.index() / self.pages_per_unit)
            .is_some_and(|u| u.state != UnitState::Uncommitted)
    }

    /// Reserved / committed / peak pages and grow / release events.
    pub fn commit_stats(&self) -> &KvCommitStats {
        &self.stats
    }

    /// Steps a unit holding only cached free pages waits before its cached
    /// pages are evicted and it is released (see the module docs).
    pub fn set_cache_idle_steps(&mut self, steps: u64) {
        self.cache_idle_steps = steps;
    }

    /// Sequences holding `page`.
    pub fn refcount(&self, page: PageId) -> u32 {
        self.pages.get(page.index()).map_or(0, |p| p.refcount)
    }

    /// The sequences holding `page` with the page's index in each one's
    /// block table, by arrival. Empty for a free or unknown page.
    pub fn holders(&self, page: PageId) -> &[(SeqId, u32)] {
        self.pages.get(page.index()).map_or(&[], |p| &p.holders)
    }

    /// Whether `page` holds registered prefix-cache content.
    pub fn is_cached(&self, page: PageId) -> bool {
        self.pages
            .get(page.index())
            .is_some_and(|p| p.cached.is_some())
    }

    /// Marks `page` changed for telemetry (the scheduler calls this when
    /// tokens written into it move). O(1); a page is listed once.
    pub fn mark_dirty(&mut self, page: PageId) {
        self.dirty.mark(page.0);
    }

    /// Moves the pages changed since the last call (all pages on the first
    /// call) into `out`, in marking order, and clears the set.
    /// O(pages changed).
    pub fn take_dirty_pages(&mut self, out: &mut Vec<PageId>) {
        for p in self.dirty.list.drain(..) {
            if let Some(f) = self.dirty.flag.get_mut(p as usize) {
                *f = false;
            }
            out.push(PageId(p));
        }
    }

    /// Every page's refcount and cache hash, in page order. O(num_pages).
    pub fn page_states(&self) -> Vec<PageState> {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, p)| PageState {
                page: PageId(i as u32),
                refcount: p.refcount,
                hash: p.cached.as_ref().map(|c| c.hash),
            })
            .collect()
    }

    /// Committed free pages in the order they are handed out (front = next):
    /// clean pages by unit, then cached pages least recently freed first.
    /// O(num_pages).
    pub fn free_pages_in_lru_order(&self) -> Vec<PageId> {
        let mut out: Vec<PageId> = Vec::with_capacity(self.num_available_pages());
        for &u in &self.units_with_clean {
            out.extend(self.lists.iter(u as usize).map(PageId));
        }
        out.extend(self.lists.iter(self.cached_list()).map(PageId));
        out
    }

    fn cached_list(&self) -> usize {
        self.units.len()
    }

    fn unit_of(&self, p: u32) -> usize {
        p as usize / self.pages_per_unit
    }

    fn unit_pages(&self, u: usize) -> std::ops::Range<u32> {
        let start = u * self.pages_per_unit;
        let end = (start + self.pages_per_unit).min(self.pages.len());
        start as u32..end as u32
    }

    /// The cached pages that cover the first full pages of `seq.tokens`
    /// (read-only). Empty when prefix caching is off.
    pub fn lookup_prefix(&self, seq: &Sequence) -> PrefixHit {
        let mut hit = PrefixHit::default();
        // A sequence that wants the logits of every prompt position must compute them all.
        if !self.enable_prefix_caching || seq.params.want_all_logits {
            return hit;
        }
        let ps = self.page_size;
        let mut parent = None;
        for (i, &h) in seq.page_hashes.iter().enumerate() {
            let Some(&page) = self.cache.get(&h) else {
                break;
            };
            let Some(content) = self.pages[page.index()].cached.as_ref() else {
                debug_assert!(false, "cache map points to {page} without content");
                break;
            };
            let Some(tokens) = seq.tokens.get(i * ps..(i + 1) * ps) else {
                break;
            };
            if content.parent != parent || *content.tokens != *tokens {
                break; // hash collision
            }
            if self.pages[page.index()].refcount == 0 {
                hit.num_revived += 1;
            }
            hit.pages.push(page);
            parent = Some(h);
        }
        hit.num_cached_tokens = (hit.pages.len() * ps).min(seq.len().saturating_sub(1));
        hit
    }

    /// Fresh pages [`BlockManager::allocate_slots`] would take for
    /// `num_new_tokens` more tokens of `seq`, copy-on-write page included.
    pub fn num_pages_to_allocate(&self, seq: &Sequence, num_new_tokens: usize) -> usize {
        let ps = self.page_size;
        let needed = (seq.num_computed_tokens + num_new_tokens).div_ceil(ps);
        let fresh = needed.saturating_sub(seq.block_table.len());
        fresh + usize::from(num_new_tokens > 0 && self.needs_copy_on_write(seq))
    }

    /// Pages admitting `seq` with `hit` and `num_new_tokens` tokens to compute
    /// would take off the free list: revived cached pages, fresh pages and a
    /// copy-on-write page.
    pub fn num_pages_to_admit(
        &self,
        seq: &Sequence,
        hit: &PrefixHit,
        num_new_tokens: usize,
    ) -> usize {
        let ps = self.page_size;
        let needed = (hit.num_cached_tokens + num_new_tokens).div_ceil(ps);
        let fresh = needed.saturating_sub(hit.pages.len());
        // The last cached page is written (so copied) when the cache covers
        // the whole sequence. Counted at its peak: a revived page is taken
        // before its copy, and only then released.
        let writes_cached = hit.num_cached_tokens < hit.pages.len() * ps;
        debug_assert!(
            seq.block_table.is_empty(),
            "{} admitted while holding pages",
            seq.id
        );
        hit.num_revived + fresh + usize::from(num_new_tokens > 0 && writes_cached)
    }

    /// Most tokens `seq` can add now without preempting anyone.
    pub fn max_new_tokens(&self, seq: &Sequence) -> usize {
        let ps = self.page_size;
        let cow = usize::from(self.needs_copy_on_write(seq));
        let available = self.num_available_pages();
        if available < cow {
            return 0;
        }
        let room = (seq.block_table.len() * ps).saturating_sub(seq.num_computed_tokens);
        room + (available - cow) * ps
    }

    /// Whether the next token of `seq` would be written into a cached
    /// (immutable, possibly shared) page.
    fn needs_copy_on_write(&self, seq: &Sequence) -> bool {
        let idx = seq.num_computed_tokens / self.page_size;
        seq.block_table.get(idx).is_some_and(|p| {
            let page = &self.pages[p.index()];
            page.refcount > 1 || page.cached.is_some()
        })
    }

    /// Claims the cached pages of `hit` for a waiting `seq` (refcount + 1,
    /// revived pages leave the free list) and marks their tokens computed.
    /// Takes no fresh page, so it is not a fault site.
    pub fn admit(&mut self, seq: &mut Sequence, hit: PrefixHit) {
        debug_assert!(
            seq.block_table.is_empty(),
            "{} admitted while holding pages",
            seq.id
        );
        for (i, &page) in hit.pages.iter().enumerate() {
            let p = &mut self.pages[page.index()];
            debug_assert!(
                p.cached.is_some(),
                "{page} claimed from the cache without content"
            );
            p.refcount += 1;
            add_holder(&mut p.holders, seq.id, i as u32);
            self.dirty.mark(page.0);
            if p.refcount == 1 {
                // Revived: off the cached free list, held again.
                self.lists.unlink(page.0);
                let u = self.unit_of(page.0);
                self.units[u].cached_free -= 1;
                self.hold(page.0);
            }
        }
        seq.num_registered_pages = hit.pages.len();
        seq.block_table = hit.pages;
        seq.num_computed_tokens = hit.num_cached_tokens;
        seq.num_cached_tokens = hit.num_cached_tokens;
    }

    /// Makes room for tokens `num_computed_tokens .. num_computed_tokens +
    /// num_new_tokens` of `seq`: copies the page the first of them lands in
    /// when it is a cached (immutable) page, and appends fresh pages. Returns the copy as
    /// `(src, dst)` page indices when one was made.
    ///
    /// On error (`FaultInjected`, `OutOfKvPages`) the pages taken so far stay
    /// in `seq.block_table`; the caller frees the sequence.
    pub fn allocate_slots(
        &mut self,
        seq: &mut Sequence,
        num_new_tokens: usize,
    ) -> Result<Option<(u32, u32)>> {
        let ps = self.page_size;
        let mut copy = None;
        if num_new_tokens > 0 && self.needs_copy_on_write(seq) {
            let idx = seq.num_computed_tokens / ps;
            let src = seq.block_table[idx];
            let dst = self.allocate_page(seq.id, idx as u32)?;
            self.release(src, seq.id);
            seq.block_table[idx] = dst;
            // The copy is private and unregistered: the original stays the
            // cache's page (back on the free list if we were its only holder).
            seq.num_registered_pages = seq.num_registered_pages.min(idx);
            copy = Some((src.0, dst.0));
        }
        let needed = (seq.num_computed_tokens + num_new_tokens).div_ceil(ps);
        while seq.block_table.len() < needed {
            let page = self.allocate_page(seq.id, seq.block_table.len() as u32)?;
            seq.block_table.push(page);
        }
        Ok(copy)
    }

    /// Registers the pages of `seq` that became full of computed tokens in the
    /// prefix cache (no-op when caching is off). A page whose content is
    /// already cached elsewhere stays unregistered.
    pub fn register_full_pages(&mut self, seq: &mut Sequence) {
        if !self.enable_prefix_caching {
            return;
        }
        let ps = self.page_size;
        let num_full = (seq.num_computed_tokens / ps)
            .min(seq.page_hashes.len())
            .min(seq.block_table.len());
        for i in seq.num_registered_pages..num_full {
            let page = seq.block_table[i];
            let hash = seq.page_hashes[i];
            if self.pages[page.index()].cached.is_some() || self.cache.contains_key(&hash) {
                continue;
            }
            self.pages[page.index()].cached = Some(CachedContent {
                hash,
                parent: i.checked_sub(1).map(|j| seq.page_hashes[j]),
                tokens: seq.tokens[i * ps..(i + 1) * ps].into(),
            });
            self.cache.insert(hash, page);
            self.dirty.mark(page.0);
        }
        seq.num_registered_pages = seq.num_registered_pages.max(num_full);
    }

    /// Releases every page of `seq`, last page first (so a prompt's tail is
    /// evicted before its head), and empties its block table. Pages reaching
    /// refcount 0 join the back of the free list, keeping cached content.
    pub fn free(&mut self, seq: &mut Sequence) {
        for &page in seq.block_table.iter().rev() {
            self.release(page, seq.id);
        }
        seq.block_table.clear();
        seq.num_registered_pages = 0;
    }

    /// Commits units, lowest first, until `num_pages` pages are available
    /// (free in committed units). Returns whether they are. Without a
    /// committer it commits nothing. `Err` = the committer refused a unit
    /// (the units committed before it stay); the caller preempts, waits, or
    /// fails a sequence that has nothing to wait for. Each commit is a fault
    /// site of the committer.
    pub fn grow_for(&mut self, num_pages: usize) -> Result<bool> {
        while self.num_available_pages() < num_pages {
            let Some(commit) = self.commit.clone() else {
                return Ok(false);
            };
            let Some(&u) = self.uncommitted.first() else {
                return Ok(false);
            };
            if let Err(e) = commit.commit(u as usize) {
                self.stats.num_grow_failures += 1;
                return Err(e.into());
            }
            self.stats.num_grows += 1;
            self.mark_committed(u as usize);
        }
        Ok(true)
    }

    /// Ends one scheduler step: releases every unit with no live page
    /// (clean and free throughout) and evicts the cached pages of units that
    /// have held no page for `cache_idle_steps` steps, releasing them too.
    /// Call only when no built plan is waiting to run (its copies may read a
    /// freed page): the scheduler calls it at the end of `postprocess` and
    /// after a `schedule` that built no plan. O(released units × pages per
    /// unit + log num_units).
    pub fn end_step(&mut self) {
        self.step += 1;
        let Some(commit) = self.commit.clone() else {
            return;
        };
        while let Some(&(since, u)) = self.cache_only_units.first() {
            if since.saturating_add(self.cache_idle_steps) > self.step {
                break;
            }
            self.evict_unit_cache(u as usize);
        }
        let empty: Vec<u32> = std::mem::take(&mut self.empty_units).into_iter().collect();
        for u in empty {
            self.release_unit(u as usize, commit.as_ref());
        }
    }

    /// Evicts the cached free pages of unit `u` (which holds no page); it
    /// becomes empty.
    fn evict_unit_cache(&mut self, u: usize) {
        for p in self.unit_pages(u) {
            if self.lists.list_of(p) != Some(self.cached_list()) {
                continue;
            }
            self.lists.unlink(p);
            self.drop_content(p);
            self.units[u].cached_free -= 1;
            self.push_clean(p);
            self.stats.num_idle_evictions += 1;
        }
        self.update_unit(u);
    }

    /// Drops page `p`'s cached content and its map entry.
    fn drop_content(&mut self, p: u32) {
        self.dirty.mark(p);
        if let Some(content) = self.pages[p as usize].cached.take()
            && self.cache.get(&content.hash) == Some(&PageId(p))
        {
            self.cache.remove(&content.hash);
        }
    }

    fn push_clean(&mut self, p: u32) {
        let u = self.unit_of(p);
        self.lists.push_back(u, p);
        self.units_with_clean.insert(u as u32);
        self.num_clean += 1;
    }

    /// Unit `u` is backed now: its pages join its clean list in page order.
    fn mark_committed(&mut self, u: usize) {
        self.uncommitted.remove(&(u as u32));
        for p in self.unit_pages(u) {
            self.push_clean(p);
        }
        let n = self.unit_pages(u).len();
        self.stats.committed_units += 1;
        self.stats.committed_pages += n;
        self.stats.peak_committed_pages = self
            .stats
            .peak_committed_pages
            .max(self.stats.committed_pages);
        self.units[u].state = UnitState::Empty;
        self.empty_units.insert(u as u32);
    }

    /// Releases empty unit `u`: its pages leave the clean list.
    fn release_unit(&mut self, u: usize, commit: &dyn KvCommit) {
        debug_assert_eq!(
            self.units[u].state,
            UnitState::Empty,
            "unit {u} released while not empty"
        );
        for p in self.unit_pages(u) {
            self.lists.unlink(p);
            self.num_clean -= 1;
        }
        self.units_with_clean.remove(&(u as u32));
        self.empty_units.remove(&(u as u32));
        self.units[u].state = UnitState::Uncommitted;
        self.uncommitted.insert(u as u32);
        self.stats.committed_units -= 1;
        self.stats.committed_pages -= self.unit_pages(u).len();
        self.stats.num_releases += 1;
        commit.release(u);
    }

    /// Recomputes unit `u`'s state from its counts and moves it between
    /// the state sets. No-op without a committer (nothing is released).
    fn update_unit(&mut self, u: usize) {
        if self.commit.is_none() {
            return;
        }
        let unit = self.units[u];
        let new = if unit.state == UnitState::Uncommitted {
            UnitState::Uncommitted
        } else if unit.held > 0 {
            UnitState::Live
        } else if unit.cached_free > 0 {
            match unit.state {
                UnitState::CacheOnly(since) => UnitState::CacheOnly(since),
                _ => UnitState::CacheOnly(self.step),
            }
        } else {
            UnitState::Empty
        };
        if new == unit.state {
            return;
        }
        match unit.state {
            UnitState::Empty => {
                self.empty_units.remove(&(u as u32));
            }
            UnitState::CacheOnly(since) => {
                self.cache_only_units.remove(&(since, u as u32));
            }
            UnitState::Live | UnitState::Uncommitted => {}
        }
        match new {
            UnitState::Empty => {
                self.empty_units.insert(u as u32);
            }
            UnitState::CacheOnly(since) => {
                self.cache_only_units.insert((since, u as u32));
            }
            UnitState::Live | UnitState::Uncommitted => {}
        }
        self.units[u].state = new;
    }

    /// Takes a fresh page: a clean page of the lowest committed unit that
    /// has one, else the least recently freed cached page (evicting its
    /// content), for `owner` at `index` of its block table. Never grows
    /// ([`BlockManager::grow_for`] does). A fault site.
    fn allocate_page(&mut self, owner: SeqId, index: u32) -> Result<PageId> {
        self.faults.check("kv page")?;
        let p = if let Some(&u) = self.units_with_clean.first() {
            let Some(p) = self.lists.pop_front(u as usize) else {
                debug_assert!(false, "unit {u} listed with clean pages but has none");
                return Err(EngineError::OutOfKvPages {
                    requested: 1,
                    free: 0,
                });
            };
            if self.lists.len[u as usize] == 0 {
                self.units_with_clean.remove(&u);
            }
            self.num_clean -= 1;
            p
        } else if let Some(p) = self.lists.pop_front(self.cached_list()) {
            self.drop_content(p);
            let u = self.unit_of(p);
            self.units[u].cached_free -= 1;
            p
        } else {
            return Err(EngineError::OutOfKvPages {
                requested: 1,
                free: 0,
            });
        };
        let page = &mut self.pages[p as usize];
        debug_assert_eq!(
            page.refcount, 0,
            "free page {p} had refcount {}",
            page.refcount
        );
        debug_assert!(page.cached.is_none(), "fresh page {p} kept cached content");
        page.refcount = 1;
        add_holder(&mut page.holders, owner, index);
        self.dirty.mark(p);
        self.hold(p);
        Ok(PageId(p))
    }

    /// Counts page `p` (refcount now 1, off every list) as held.
    fn hold(&mut self, p: u32) {
        let u = self.unit_of(p);
        self.units[u].held += 1;
        self.num_held += 1;
        self.update_unit(u);
    }

    /// `owner` lets go of `page`.
    fn release(&mut self, page: PageId, owner: SeqId) {
        let p = &mut self.pages[page.index()];
        debug_assert!(p.refcount > 0, "{page} released with refcount 0");
        if p.refcount == 0 {
            return;
        }
        p.refcount -= 1;
        p.holders.retain(|&(s, _)| s != owner);
        self.dirty.mark(page.0);
        if p.refcount > 0 {
            return;
        }
        let cached = p.cached.is_some();
        let u = self.unit_of(page.0);
        self.units[u].held -= 1;
        self.num_held -= 1;
        if cached {
            self.lists.push_back(self.cached_list(), page.0);
            self.units[u].cached_free += 1;
        } else {
            self.push_clean(page.0);
        }
        self.update_unit(u);
    }

    /// Checks the module invariants; returns the first violation. O(num_pages).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let cached_list = self.cached_list();
        let (mut held, mut clean) = (0usize, 0usize);
        let (mut committed_units, mut committed_pages) = (0usize, 0usize);
        for (u, unit) in self.units.iter().enumerate() {
            let (mut u_held, mut u_cached, mut u_clean) = (0u32, 0u32, 0usize);
            let committed = unit.state != UnitState::Uncommitted;
            for p in self.unit_pages(u) {
                let page = &self.pages[p as usize];
                if page.holders.len() != page.refcount as usize
                    || page.holders.windows(2).any(|w| w[0].0 >= w[1].0)
                {
                    return Err(format!(
                        "page {p}: refcount {} but holders {:?}",
                        page.refcount, page.holders
                    ));
                }
                let list = self.lists.list_of(p);
                if !committed {
                    if page.refcount != 0 || page.cached.is_some() || list.is_some() {
                        return Err(format!("page {p} of uncommitted unit {u} is in use"));
                    }
                    continue;
                }
                match (page.refcount, &page.cached, list) {
                    (r, _, None) if r > 0 => u_held += 1,
                    (0, Some(_), Some(l)) if l == cached_list => u_cached += 1,
                    (0, None, Some(l)) if l == u => u_clean += 1,
                    (r, c, l) => {
                        return Err(format!(
                            "page {p}: refcount {r}, cached {}, in list {l:?}",
                            c.is_some()
                        ));
                    }
                }
            }
            if committed {
                committed_units += 1;
                committed_pages += self.unit_pages(u).len();
                if u_held != unit.held || u_cached != unit.cached_free {
                    return Err(format!(
                        "unit {u} counts {}/{} held/cached, pages say {u_held}/{u_cached}",
                        unit.held, unit.cached_free
                    ));
                }
                if self.lists.len[u] != u_clean
                    || self.units_with_clean.contains(&(u as u32)) != (u_clean > 0)
                {
                    return Err(format!("unit {u}: clean list disagrees with its pages"));
                }
            }
            held += u_held as usize;
            clean += u_clean;
            let listed = (
                self.uncommitted.contains(&(u as u32)),
                self.empty_units.contains(&(u as u32)),
                matches!(unit.state, UnitState::CacheOnly(s) if self.cache_only_units.contains(&(s, u as u32))),
            );
            let expected = match unit.state {
                UnitState::Uncommitted => (true, false, false),
                UnitState::Empty => (false, self.commit.is_some(), false),
                UnitState::CacheOnly(_) => (false, false, true),
                UnitState::Live => (false, false, false),
            };
            if listed != expected {
                return Err(format!(
                    "unit {u} in {:?} is listed as {listed:?}",
                    unit.state
                ));
            }
            if self.commit.is_some() && committed {
                let want = if unit.held > 0 {
                    matches!(unit.state, UnitState::Live)
                } else if unit.cached_free > 0 {
                    matches!(unit.state, UnitState::CacheOnly(_))
                } else {
                    unit.state == UnitState::Empty
                };
                if !want {
                    return Err(format!(
                        "unit {u} state {:?} disagrees with its counts",
                        unit.state
                    ));
                }
            }
        }
        if held != self.num_held || clean != self.num_clean {
            return Err(format!(
                "{} held / {} clean counted, pages say {held} / {clean}",
                self.num_held, self.num_clean
            ));
        }
        if committed_units != self.stats.committed_units
            || committed_pages != self.stats.committed_pages
        {
            return Err("committed unit / page counts disagree with the units".into());
        }
        let walked = self.lists.iter(cached_list).count();
        if walked != self.lists.len[cached_list] {
            return Err(format!(
                "cached free list walks {walked} pages but counts {}",
                self.lists.len[cached_list]
            ));
        }
        for (i, page) in self.pages.iter().enumerate() {
            if let Some(c) = &page.cached
                && self.cache.get(&c.hash) != Some(&PageId(i as u32))
            {
                return Err(format!(
                    "page {i} has cached content the map does not point to"
                ));
            }
        }
        for (h, p) in &self.cache {
            if self.pages[p.index()].cached.as_ref().map(|c| c.hash) != Some(*h) {
                return Err(format!(
                    "map entry {h:#x} points to {p} holding other content"
                ));
            }
        }
        Ok(())
    }
}

/// Adds `(owner, index)` to `holders`, keeping them sorted by sequence id.
fn add_holder(holders: &mut Vec<(SeqId, u32)>, owner: SeqId, index: u32) {
    let at = holders.partition_point(|&(s, _)| s < owner);
    holders.insert(at, (owner, index));
}

#[cfg(test)]
mod tests;
