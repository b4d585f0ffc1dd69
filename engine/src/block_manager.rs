//! Paged KV-cache bookkeeping: which page holds what, who holds each page.
//!
//! The [`BlockManager`] hands out [`PageId`]s of `page_size` token positions,
//! counts references to each page, and keeps the prefix cache: every *full*
//! page whose K/V is written can be registered under
//! `hash_page(parent_hash, page_tokens)`, so a later sequence with the same
//! prefix reuses the page instead of recomputing it.
//!
//! ## Invariants
//! - A page is in the free list if and only if its refcount is 0.
//! - A page has cached content (hash, parent hash, tokens) if and only if the
//!   hash map points to it. Freed pages *keep* their content, so a later
//!   request can revive them; the content is dropped only when the page is
//!   handed out again as a fresh page (eviction).
//! - A page registered in the prefix cache is immutable: it is never written.
//!   [`BlockManager::allocate_slots`] copies it first (copy-on-write). Only
//!   registered pages are ever shared, so no page with refcount > 1 is
//!   written either.
//!
//! ## Free list and LRU
//! One free list, ordered by the time pages were freed: pages freed go to the
//! back, fresh pages are taken from the front, so cached content is evicted in
//! least-recently-freed order (never-used pages start at the front, in page
//! order). A sequence frees its pages last page first, so the tail of a prompt
//! is evicted before the shared head. A prefix-cache hit on a free page unlinks
//! it from the middle of the list. The list is intrusive (prev/next indices per
//! page), so push, pop and unlink are O(1) and memory is O(num_pages).
//!
//! ## Prefix cache
//! Hash: [`hash_page`] (in [`crate::prefix_hash`]), a hand-rolled 64-bit mix (splitmix64 finaliser per
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
//! Allocation, free and revival: O(1) per page (plus O(holders) of a shared page). Lookup: O(page_size) per hit
//! page (token verification). Registration: O(page_size) per newly full page.
//! Every fresh page allocation is a fault site (`faults.check("kv page")`).

use std::collections::HashMap;

use pagoda_backend::FaultInjector;

use crate::error::{EngineError, Result};
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

/// Intrusive doubly-linked list of free pages: O(1) push-back, pop-front and
/// unlink by page id.
#[derive(Debug, Clone)]
struct FreeList {
    /// (num_pages)
    prev: Vec<Option<u32>>,
    /// (num_pages)
    next: Vec<Option<u32>>,
    /// (num_pages)
    linked: Vec<bool>,
    head: Option<u32>,
    tail: Option<u32>,
    len: usize,
}

impl FreeList {
    /// All pages free, in page order.
    fn full(num_pages: u32) -> Self {
        let n = num_pages as usize;
        let mut l = Self {
            prev: vec![None; n],
            next: vec![None; n],
            linked: vec![false; n],
            head: None,
            tail: None,
            len: 0,
        };
        for p in 0..num_pages {
            l.push_back(p);
        }
        l
    }

    fn push_back(&mut self, p: u32) {
        let i = p as usize;
        debug_assert!(!self.linked[i], "page {p} pushed to the free list twice");
        self.prev[i] = self.tail;
        self.next[i] = None;
        match self.tail {
            Some(t) => self.next[t as usize] = Some(p),
            None => self.head = Some(p),
        }
        self.tail = Some(p);
        self.linked[i] = true;
        self.len += 1;
    }

    fn unlink(&mut self, p: u32) {
        let i = p as usize;
        debug_assert!(self.linked[i], "page {p} unlinked but not free");
        let (prev, next) = (self.prev[i], self.next[i]);
        match prev {
            Some(q) => self.next[q as usize] = next,
            None => self.head = next,
        }
        match next {
            Some(q) => self.prev[q as usize] = prev,
            None => self.tail = prev,
        }
        self.prev[i] = None;
        self.next[i] = None;
        self.linked[i] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let p = self.head?;
        self.unlink(p);
        Some(p)
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(self.head, |&p| self.next[p as usize])
    }
}

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
#[derive(Debug, Clone)]
pub struct BlockManager {
    page_size: usize,
    enable_prefix_caching: bool,
    faults: FaultInjector,
    /// (num_pages)
    pages: Vec<Page>,
    free: FreeList,
    /// hash -> page holding that content.
    cache: HashMap<u64, PageId>,
    dirty: DirtyPages,
}

impl BlockManager {
    /// `num_pages` pages of `page_size` token positions, all free.
    /// Fails when `page_size` is 0, `num_pages` is 0, or a slot
    /// (`page * page_size + offset`) would not fit in `u32`.
    pub fn new(
        num_pages: usize,
        page_size: usize,
        enable_prefix_caching: bool,
        faults: FaultInjector,
    ) -> Result<Self> {
        if page_size == 0 || num_pages == 0 {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache needs at least one page of at least one token (num_pages={num_pages}, page_size={page_size})"
            )));
        }
        let num_slots = num_pages.saturating_mul(page_size);
        let num_pages_u32 = match u32::try_from(num_pages) {
            Ok(n) if u32::try_from(num_slots).is_ok() => n,
            _ => {
                return Err(EngineError::InvalidConfig(format!(
                    "KV cache of {num_pages} pages x {page_size} tokens has more slots than fit in u32"
                )));
            }
        };
        Ok(Self {
            page_size,
            enable_prefix_caching,
            faults,
            pages: vec![Page::default(); num_pages],
            free: FreeList::full(num_pages_u32),
            cache: HashMap::new(),
            dirty: DirtyPages::all(num_pages_u32),
        })
    }

    /// Token positions per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Total pages.
    pub fn num_pages(&self) -> usize {
        self.pages.len()
    }

    /// Pages with refcount 0 (cached or not).
    pub fn num_free_pages(&self) -> usize {
        self.free.len
    }

    /// Free pages that still hold revivable cached content.
    pub fn num_cached_free_pages(&self) -> usize {
        self.free
            .iter()
            .filter(|&p| self.pages[p as usize].cached.is_some())
            .count()
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching_enabled(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Whether `num_pages` fresh pages are available.
    pub fn can_allocate(&self, num_pages: usize) -> bool {
        num_pages <= self.free.len
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

    /// Free pages in eviction order (front = next to be handed out). O(num_pages).
    pub fn free_pages_in_lru_order(&self) -> Vec<PageId> {
        self.free.iter().map(PageId).collect()
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
        if self.free.len < cow {
            return 0;
        }
        let room = (seq.block_table.len() * ps).saturating_sub(seq.num_computed_tokens);
        room + (self.free.len - cow) * ps
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
            if p.refcount == 0 {
                self.free.unlink(page.0);
            }
            p.refcount += 1;
            add_holder(&mut p.holders, seq.id, i as u32);
            self.dirty.mark(page.0);
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

    /// Takes a fresh page from the front of the free list for `owner` (at
    /// `index` of its block table), evicting its cached content. A fault site.
    fn allocate_page(&mut self, owner: SeqId, index: u32) -> Result<PageId> {
        self.faults.check("kv page")?;
        let Some(p) = self.free.pop_front() else {
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
        if let Some(content) = page.cached.take()
            && self.cache.get(&content.hash) == Some(&PageId(p))
        {
            self.cache.remove(&content.hash);
        }
        page.refcount = 1;
        add_holder(&mut page.holders, owner, index);
        self.dirty.mark(p);
        Ok(PageId(p))
    }

    /// `owner` lets go of `page`.
    fn release(&mut self, page: PageId, owner: SeqId) {
        let p = &mut self.pages[page.index()];
        debug_assert!(p.refcount > 0, "{page} released with refcount 0");
        p.refcount = p.refcount.saturating_sub(1);
        p.holders.retain(|&(s, _)| s != owner);
        if p.refcount == 0 {
            self.free.push_back(page.0);
        }
        self.dirty.mark(page.0);
    }

    /// Checks the module invariants; returns the first violation. O(num_pages).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut free_count = 0;
        for p in self.free.iter() {
            free_count += 1;
            if self.pages[p as usize].refcount != 0 {
                return Err(format!(
                    "page {p} is free with refcount {}",
                    self.pages[p as usize].refcount
                ));
            }
        }
        if free_count != self.free.len {
            return Err(format!(
                "free list walks {free_count} pages but counts {}",
                self.free.len
            ));
        }
        for (i, page) in self.pages.iter().enumerate() {
            if page.holders.len() != page.refcount as usize
                || page.holders.windows(2).any(|w| w[0].0 >= w[1].0)
            {
                return Err(format!(
                    "page {i}: refcount {} but holders {:?}",
                    page.refcount, page.holders
                ));
            }
            if (page.refcount == 0) != self.free.linked[i] {
                return Err(format!(
                    "page {i}: refcount {} but linked={}",
                    page.refcount, self.free.linked[i]
                ));
            }
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
