//! Scheduler behaviours, run against a fake paged model.
//!
//! [`FakeRunner`] stands in for the model runner: it executes each
//! [`StepPlan`] on a fake KV cache whose slot for position `p` holds a digest
//! of the slot for `p - 1` (read through the block table) and the token, and
//! samples a token from that digest. Outputs therefore depend on the whole
//! prefix *as stored*, so a wrong block table, slot, copy or revived page
//! changes them; [`reference`] gives the output of a request run alone,
//! without any scheduler. [`check`] asserts the scheduler's invariants.

use super::*;
use proptest::prelude::*;

const VOCAB: u64 = 997;

fn cfg(
    page_size: usize,
    num_pages: usize,
    max_num_batched_tokens: usize,
    caching: bool,
) -> SchedulerConfig {
    SchedulerConfig {
        page_size,
        num_pages,
        max_num_seqs: 8,
        max_num_batched_tokens,
        max_model_len: 4096,
        enable_prefix_caching: caching,
        swap: SwapConfig::default(),
    }
}

fn sched(config: SchedulerConfig) -> Scheduler {
    Scheduler::new(config, FaultInjector::new()).unwrap()
}

fn p(max_tokens: usize) -> SeqParams {
    SeqParams::with_max_tokens(max_tokens)
}

/// What a fake layer stores in one KV slot.
#[derive(Debug, Clone, Copy)]
struct FakeKv {
    pos: u32,
    /// Running digest of the whole prefix up to `pos`.
    state: u64,
}

fn chain(prev: u64, token: u32) -> u64 {
    let mut z = prev ^ (u64::from(token) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const SEED: u64 = 0x1234_5678;

fn next_token(state: u64) -> u32 {
    (state % VOCAB) as u32 + 1
}

/// A fake model over a fake paged KV cache: the K/V of position `p` is a
/// digest of the K/V of `p - 1` (read through the block table) and the
/// token, and the sampled token is a function of that digest. So the
/// output is a function of the whole prefix *as stored*: a wrong block
/// table, a missing copy-on-write copy or a stale page changes it.
struct FakeRunner {
    page_size: usize,
    /// (num_pages * page_size)
    kv: Vec<Option<FakeKv>>,
    /// Host slot -> the page_size slots of one swapped-out page.
    host: HashMap<u32, Vec<Option<FakeKv>>>,
}

impl FakeRunner {
    fn new(c: &SchedulerConfig) -> Self {
        Self {
            page_size: c.page_size,
            kv: vec![None; c.num_pages * c.page_size],
            host: HashMap::new(),
        }
    }

    /// Forgets the content of every page whose commit unit is released, so
    /// reading one later panics.
    fn wipe_uncommitted(&mut self, bm: &BlockManager) {
        let ps = self.page_size;
        for p in 0..bm.num_pages() {
            if !bm.is_committed(PageId(p as u32)) {
                self.kv[p * ps..(p + 1) * ps].fill(None);
            }
        }
    }

    /// Runs the copies in the plan's order (swap-out, copy-on-write,
    /// swap-in), then the rows.
    fn execute(&mut self, plan: &StepPlan) -> Vec<Option<u32>> {
        let ps = self.page_size;
        for &(page, slot) in &plan.swap_out {
            let s = page as usize * ps;
            self.host.insert(slot, self.kv[s..s + ps].to_vec());
        }
        for &(src, dst) in &plan.copy_pages {
            let (s, d) = (src as usize * ps, dst as usize * ps);
            let page: Vec<_> = self.kv[s..s + ps].to_vec();
            self.kv[d..d + ps].copy_from_slice(&page);
        }
        for &(slot, page) in &plan.swap_in {
            let content = self
                .host
                .remove(&slot)
                .unwrap_or_else(|| panic!("host slot {slot} swapped in but never out"));
            let d = page as usize * ps;
            self.kv[d..d + ps].copy_from_slice(&content);
        }
        for i in 0..plan.num_seqs() {
            let table = plan.block_table(i).to_vec();
            for r in plan.rows(i) {
                let pos = plan.positions[r];
                let prev = if pos == 0 {
                    SEED
                } else {
                    let q = pos as usize - 1;
                    let slot = table[q / ps] as usize * ps + q % ps;
                    let kv = self.kv[slot].unwrap_or_else(|| panic!("K/V of position {q} missing"));
                    assert_eq!(kv.pos as usize, q, "slot {slot} holds another position");
                    kv.state
                };
                self.kv[plan.slot_mapping[r] as usize] = Some(FakeKv {
                    pos,
                    state: chain(prev, plan.input_ids[r]),
                });
            }
        }
        (0..plan.num_seqs())
            .map(|i| {
                plan.sample_rows[i].map(|j| {
                    let r = plan.logits_indices[j as usize] as usize;
                    next_token(
                        self.kv[plan.slot_mapping[r] as usize]
                            .expect("sampled row has K/V")
                            .state,
                    )
                })
            })
            .collect()
    }
}

/// The output the fake model gives a request run on its own, computed
/// without any scheduler.
fn reference(prompt: &[u32], params: &SeqParams) -> Vec<u32> {
    let mut state = prompt.iter().fold(SEED, |s, &t| chain(s, t));
    let mut out = Vec::new();
    loop {
        let t = next_token(state);
        out.push(t);
        if (!params.ignore_eog && params.eog_ids.contains(&t)) || out.len() == params.max_tokens {
            return out;
        }
        state = chain(state, t);
    }
}

/// Checks the scheduler invariants of the module docs (and the plan's).
fn check(s: &Scheduler, plan: Option<&StepPlan>) {
    for info in s.kv_page_map() {
        assert_eq!(s.kv_page_info(info.page).as_ref(), Some(&info));
    }
    let bm = s.block_manager();
    let ps = s.config.page_size;
    bm.check_invariants().unwrap();
    let mut holders = vec![0u32; bm.num_pages()];
    for w in s.running.windows(2) {
        assert!(
            s.seqs[&w[0]].arrival < s.seqs[&w[1]].arrival,
            "running not sorted by arrival"
        );
    }
    for (a, b) in s.waiting.iter().zip(s.waiting.iter().skip(1)) {
        assert!(
            s.seqs[a].arrival < s.seqs[b].arrival,
            "waiting not sorted by arrival"
        );
    }
    for id in &s.waiting {
        let q = &s.seqs[id];
        assert_eq!(q.status, SeqStatus::Waiting);
        assert!(
            q.block_table.is_empty() && q.num_computed_tokens == 0,
            "{id} waits holding pages"
        );
    }
    for id in &s.running {
        let q = &s.seqs[id];
        assert_eq!(q.status, SeqStatus::Running);
        assert!(q.num_computed_tokens < q.len(), "{id} computed everything");
        assert!(
            q.block_table.len() * ps >= q.num_computed_tokens,
            "{id} has K/V outside its pages"
        );
        let mut seen = HashSet::new();
        for pg in &q.block_table {
            assert!(seen.insert(*pg), "{id} holds {pg} twice");
            holders[pg.index()] += 1;
        }
    }
    for q in s.seqs.values().filter(|q| q.is_finished()) {
        assert!(q.block_table.is_empty(), "finished {} holds pages", q.id);
        assert!(
            q.host_slots.is_empty(),
            "finished {} holds host slots",
            q.id
        );
    }
    let mut host_slots: Vec<u32> = s.host_free.iter().chain(&s.host_freed).copied().collect();
    for w in s.swapped.iter().zip(s.swapped.iter().skip(1)) {
        assert!(
            s.seqs[w.0].arrival < s.seqs[w.1].arrival,
            "swapped not sorted by arrival"
        );
    }
    for id in &s.swapped {
        let q = &s.seqs[id];
        assert_eq!(q.status, SeqStatus::Swapped);
        assert!(q.block_table.is_empty(), "swapped {id} holds device pages");
        assert!(q.num_computed_tokens > 0 && q.num_computed_tokens < q.len());
        assert_eq!(
            q.host_slots.len(),
            q.num_computed_tokens.div_ceil(ps),
            "{id} host slots"
        );
        host_slots.extend(&q.host_slots);
    }
    for q in s.seqs.values().filter(|q| q.status != SeqStatus::Swapped) {
        assert!(
            q.host_slots.is_empty(),
            "{} holds host slots while {:?}",
            q.id,
            q.status
        );
    }
    host_slots.sort_unstable();
    assert_eq!(
        host_slots,
        (0..s.num_host_slots() as u32).collect::<Vec<_>>(),
        "every host slot is free or held by exactly one swapped sequence"
    );
    for st in bm.page_states() {
        assert_eq!(
            st.refcount,
            holders[st.page.index()],
            "{} refcount vs block tables",
            st.page
        );
        if st.refcount > 1 {
            assert!(
                st.hash.is_some(),
                "{} is shared but not a cached full page",
                st.page
            );
        }
    }
    assert_eq!(
        bm.num_free_pages(),
        holders.iter().filter(|&&h| h == 0).count()
    );
    if let Some(plan) = plan {
        plan.validate(ps).unwrap();
        let states = bm.page_states();
        for &slot in &plan.slot_mapping {
            let page = PageId(slot / ps as u32);
            assert_eq!(
                bm.refcount(page),
                1,
                "step writes into {page} shared by {}",
                bm.refcount(page)
            );
            assert!(
                states[page.index()].hash.is_none(),
                "step writes into cached {page}"
            );
        }
        for &(_, dst) in &plan.copy_pages {
            assert_eq!(bm.refcount(PageId(dst)), 1, "copy target must be private");
        }
        for &(_, dst) in &plan.swap_in {
            assert_eq!(
                bm.refcount(PageId(dst)),
                1,
                "swap-in target must be private"
            );
            assert!(
                bm.is_committed(PageId(dst)),
                "swap-in into an uncommitted page"
            );
        }
        for &slot in &plan.slot_mapping {
            assert!(
                bm.is_committed(PageId(slot / ps as u32)),
                "write into an uncommitted page"
            );
        }
        let decode_rows = plan.num_decode_tokens;
        for i in 0..plan.num_seqs() {
            let first = plan.query_start_locs[i] as usize;
            let is_decode = s.seqs[&plan.seq_ids[i]].num_computed_tokens + 1
                == s.seqs[&plan.seq_ids[i]].len()
                && first < decode_rows;
            if first < decode_rows {
                assert!(
                    is_decode && plan.num_new_tokens(i) == 1,
                    "decode rows must come first, one per sequence"
                );
            }
        }
    }
}

/// Outputs and finish reasons of every finished request.
type Finished = HashMap<SeqId, (Vec<u32>, FinishReason)>;

/// Runs steps until nothing is unfinished, checking invariants each step.
/// `before_step(step, scheduler)` may add or abort requests.
fn drive(
    s: &mut Scheduler,
    r: &mut FakeRunner,
    mut before_step: impl FnMut(usize, &mut Scheduler),
    max_extra_steps: usize,
) -> Finished {
    let mut step = 0;
    // What a telemetry subscriber sees: the page map rebuilt from changes only.
    let mut mirror: Vec<Option<KvPageInfo>> = vec![None; s.block_manager().num_pages()];
    let mut changed = Vec::new();
    let mut check_mirror = |s: &mut Scheduler| {
        changed.clear();
        s.take_kv_changes(&mut changed);
        for &p in &changed {
            mirror[p.index()] = s.kv_page_info(p);
        }
        let full: Vec<Option<KvPageInfo>> = s.kv_page_map().into_iter().map(Some).collect();
        assert_eq!(mirror, full, "page map from changes vs full page map");
    };
    loop {
        before_step(step, s);
        if !s.has_unfinished() && step >= max_extra_steps {
            break;
        }
        step += 1;
        assert!(step < 50_000, "no progress");
        let out = s.schedule();
        check(s, out.plan.as_ref());
        check_mirror(s);
        for f in &out.failed {
            assert!(s.get(f.seq_id).unwrap().is_finished());
        }
        if let Some(plan) = out.plan {
            let sampled = r.execute(&plan);
            let updates = s.postprocess(&plan, &sampled);
            for u in &updates {
                if let Some(t) = u.new_token {
                    assert_eq!(s.get(u.seq_id).unwrap().tokens.last(), Some(&t));
                }
            }
            check(s, None);
            check_mirror(s);
        }
        r.wipe_uncommitted(s.block_manager());
    }
    check_mirror(s);
    s.take_finished()
        .into_iter()
        .map(|q| {
            (
                q.id,
                (q.output().to_vec(), q.finish_reason().cloned().unwrap()),
            )
        })
        .collect()
}

fn run_all(s: &mut Scheduler, r: &mut FakeRunner) -> Finished {
    drive(s, r, |_, _| {}, 0)
}

fn assert_all_pages_free(s: &Scheduler) {
    assert!(!s.has_unfinished());
    assert_eq!(
        s.block_manager().num_free_pages(),
        s.config.num_pages,
        "pages leaked"
    );
    s.block_manager().check_invariants().unwrap();
}

#[test]
fn one_prompt_prefill_then_decode_has_exact_arrays() {
    let mut s = sched(cfg(4, 8, 64, false));
    let id = s.add(vec![10, 11, 12, 13, 14], p(3)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let expected = StepPlan {
        input_ids: vec![10, 11, 12, 13, 14],
        positions: vec![0, 1, 2, 3, 4],
        slot_mapping: vec![0, 1, 2, 3, 4],
        block_tables: vec![0, 1],
        max_blocks_per_seq: 2,
        context_lens: vec![5],
        query_start_locs: vec![0, 5],
        seq_ids: vec![id],
        logits_indices: vec![4],
        sample_rows: vec![Some(0)],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: 5,
        num_decode_tokens: 0,
    };
    assert_eq!(plan, expected);
    let up = s.postprocess(&plan, &[Some(99)]);
    assert_eq!(
        up,
        vec![SeqUpdate {
            seq_id: id,
            new_token: Some(99),
            finished: None
        }]
    );
    assert_eq!(s.get(id).unwrap().num_computed_tokens, 5);

    let plan = s.schedule().plan.unwrap();
    let expected = StepPlan {
        input_ids: vec![99],
        positions: vec![5],
        slot_mapping: vec![5],
        block_tables: vec![0, 1],
        max_blocks_per_seq: 2,
        context_lens: vec![6],
        query_start_locs: vec![0, 1],
        seq_ids: vec![id],
        logits_indices: vec![0],
        sample_rows: vec![Some(0)],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: 0,
        num_decode_tokens: 1,
    };
    assert_eq!(plan, expected);
    s.postprocess(&plan, &[Some(98)]);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        (plan.positions.clone(), plan.slot_mapping.clone()),
        (vec![6], vec![6])
    );
    let up = s.postprocess(&plan, &[Some(97)]);
    assert_eq!(up[0].finished, Some(FinishReason::Length));
    assert_eq!(s.get(id).unwrap().output(), &[99, 98, 97]);
    assert!(s.schedule().plan.is_none());
    assert_all_pages_free(&s);
}

#[test]
fn decode_runs_before_prefill_in_a_mixed_step() {
    let mut s = sched(cfg(4, 8, 64, false));
    let a = s.add(vec![1, 2, 3], p(4)).unwrap();
    let plan = s.schedule().plan.unwrap();
    s.postprocess(&plan, &[Some(50)]);
    let b = s.add(vec![7, 8, 9, 10, 11], p(4)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let expected = StepPlan {
        input_ids: vec![50, 7, 8, 9, 10, 11],
        positions: vec![3, 0, 1, 2, 3, 4],
        slot_mapping: vec![3, 4, 5, 6, 7, 8],
        block_tables: vec![0, 0, 1, 2],
        max_blocks_per_seq: 2,
        context_lens: vec![4, 5],
        query_start_locs: vec![0, 1, 6],
        seq_ids: vec![a, b],
        logits_indices: vec![0, 5],
        sample_rows: vec![Some(0), Some(1)],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: 5,
        num_decode_tokens: 1,
    };
    assert_eq!(plan, expected);
    let up = s.postprocess(&plan, &[Some(51), Some(60)]);
    assert_eq!(
        up.iter().map(|u| u.new_token).collect::<Vec<_>>(),
        vec![Some(51), Some(60)]
    );
    // Next step: both decode, page 0 of `a` is full so it takes page 3.
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.num_decode_tokens, 2);
    assert_eq!(plan.slot_mapping, vec![12, 9]);
    assert_eq!(plan.block_tables, vec![0, 3, 1, 2]);
}

#[test]
fn long_prompt_is_prefilled_in_chunks_under_the_token_budget() {
    let mut s = sched(cfg(4, 16, 4, false));
    let prompt: Vec<u32> = (100..110).collect();
    let a = s.add(prompt.clone(), p(2)).unwrap();
    let b = s.add(vec![7, 8, 9], p(1)).unwrap();

    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        plan.seq_ids,
        vec![a],
        "the budget is spent on the first prompt"
    );
    assert_eq!(plan.input_ids, prompt[0..4]);
    assert_eq!(plan.positions, vec![0, 1, 2, 3]);
    assert_eq!(plan.slot_mapping, vec![0, 1, 2, 3]);
    assert_eq!(plan.block_tables, vec![0]);
    assert_eq!(plan.context_lens, vec![4]);
    assert_eq!(plan.logits_indices, Vec::<u32>::new());
    assert_eq!(plan.sample_rows, vec![None]);
    let up = s.postprocess(&plan, &[None]);
    assert_eq!(
        up,
        vec![SeqUpdate {
            seq_id: a,
            new_token: None,
            finished: None
        }]
    );

    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.input_ids, prompt[4..8]);
    assert_eq!(plan.positions, vec![4, 5, 6, 7]);
    assert_eq!(plan.slot_mapping, vec![4, 5, 6, 7]);
    assert_eq!(plan.block_tables, vec![0, 1]);
    assert_eq!(plan.sample_rows, vec![None]);
    s.postprocess(&plan, &[None]);

    // Last chunk of `a` (2 tokens) and the first 2 tokens of `b`.
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b]);
    assert_eq!(plan.input_ids, vec![108, 109, 7, 8]);
    assert_eq!(plan.positions, vec![8, 9, 0, 1]);
    assert_eq!(plan.slot_mapping, vec![8, 9, 12, 13]);
    assert_eq!(plan.block_tables, vec![0, 1, 2, 3, 0, 0]);
    assert_eq!(plan.context_lens, vec![10, 2]);
    assert_eq!(plan.query_start_locs, vec![0, 2, 4]);
    assert_eq!(plan.logits_indices, vec![1]);
    assert_eq!(plan.sample_rows, vec![Some(0), None]);
    assert_eq!(plan.num_prefill_tokens, 4);
    s.postprocess(&plan, &[Some(5), None]);

    // `a` decodes first, then the last token of `b`.
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b]);
    assert_eq!(plan.input_ids, vec![5, 9]);
    assert_eq!(plan.positions, vec![10, 2]);
    assert_eq!(plan.sample_rows, vec![Some(0), Some(1)]);
    assert_eq!((plan.num_decode_tokens, plan.num_prefill_tokens), (1, 1));
    let up = s.postprocess(&plan, &[Some(6), Some(7)]);
    assert!(up.iter().all(|u| u.finished == Some(FinishReason::Length)));
    assert_all_pages_free(&s);
}

#[test]
fn shared_prefix_is_reused_and_only_the_suffix_is_prefilled() {
    let mut s = sched(cfg(16, 32, 256, true));
    let prefix: Vec<u32> = (1000..1064).collect();
    let a = s
        .add([prefix.clone(), vec![1, 2, 3]].concat(), p(8))
        .unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.num_tokens(), 67);
    s.postprocess(&plan, &[Some(1)]);
    assert_eq!(
        s.get(a).unwrap().block_table,
        [0, 1, 2, 3, 4].map(PageId).to_vec()
    );

    let b = s
        .add([prefix.clone(), vec![7, 8, 9, 10]].concat(), p(8))
        .unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b]);
    let rows = plan.rows(1);
    assert_eq!(plan.input_ids[rows.clone()], [7, 8, 9, 10]);
    assert_eq!(plan.positions[rows.clone()], [64, 65, 66, 67]);
    assert_eq!(
        plan.slot_mapping[rows],
        [80, 81, 82, 83],
        "page 5, the suffix's own page"
    );
    assert_eq!(plan.block_table(1), &[0, 1, 2, 3, 5]);
    assert_eq!(plan.context_lens, vec![68, 68]);
    assert_eq!(s.get(b).unwrap().num_cached_tokens, 64);
    for pg in 0..4 {
        assert_eq!(s.block_manager().refcount(PageId(pg)), 2);
    }
    assert_eq!(s.block_manager().refcount(PageId(4)), 1);
    assert_eq!(s.stats().num_prefix_cache_hit_tokens, 64);
    check(&s, Some(&plan));
    let map = s.kv_page_map();
    assert_eq!(map[0].owners, vec![a, b]);
    assert!(map[0].shared && map[0].cached && map[0].tokens_used == 16);
    assert_eq!(
        (map[4].owners.clone(), map[4].shared, map[4].cached),
        (vec![a], false, false)
    );
    assert_eq!(map[4].tokens_used, 3);
    assert_eq!(
        map[5].tokens_used, 0,
        "suffix K/V not written before postprocess"
    );
}

#[test]
fn shared_prefix_runs_give_the_same_outputs_as_solo_runs() {
    let c = cfg(4, 64, 32, true);
    let prefix: Vec<u32> = (1..=12).collect();
    let prompts: Vec<Vec<u32>> = vec![
        [prefix.clone(), vec![40]].concat(),
        prefix.clone(),
        [prefix.clone(), vec![41, 42, 43, 44, 45]].concat(),
        prefix.clone(),
    ];
    let mut s = sched(c.clone());
    let mut r = FakeRunner::new(&c);
    let ids: Vec<SeqId> = prompts
        .iter()
        .map(|q| s.add(q.clone(), p(6)).unwrap())
        .collect();
    // Run the first alone so the others hit the cache, then the rest.
    let first = s.schedule().plan.unwrap();
    assert_eq!(first.num_seqs(), 3, "budget 32 admits three prompts");
    let sampled = r.execute(&first);
    s.postprocess(&first, &sampled);
    let out = run_all(&mut s, &mut r);
    for (id, q) in ids.iter().zip(&prompts) {
        assert_eq!(out[id].0, reference(q, &p(6)), "{id}");
    }
    assert!(s.stats().num_prefix_cache_hit_tokens >= 11);
    assert_all_pages_free(&s);
}

#[test]
fn freed_cached_pages_are_revived_by_a_later_identical_prefix() {
    let c = cfg(4, 8, 64, true);
    let mut s = sched(c.clone());
    let prompt: Vec<u32> = (1..=8).collect();
    let a = s.add(prompt.clone(), p(1)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let up = s.postprocess(&plan, &[Some(9)]);
    assert_eq!(up[0].finished, Some(FinishReason::Length));
    assert_eq!(s.block_manager().num_free_pages(), 8);
    assert_eq!(s.block_manager().num_cached_free_pages(), 2);
    assert_eq!(
        s.block_manager().free_pages_in_lru_order(),
        [2, 3, 4, 5, 6, 7, 1, 0].map(PageId).to_vec()
    );
    s.remove(a).unwrap();

    let b = s.add(prompt.clone(), p(2)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        plan.input_ids,
        vec![8],
        "only the last prompt token is recomputed"
    );
    assert_eq!(plan.positions, vec![7]);
    assert_eq!(s.get(b).unwrap().num_cached_tokens, 7);
    // Pages 0 and 1 are revived; cached page 1 is immutable, so the
    // write goes to a private copy (page 2, the LRU front).
    assert_eq!(plan.copy_pages, vec![(1, 2)]);
    assert_eq!(plan.block_tables, vec![0, 2]);
    assert_eq!(plan.slot_mapping, vec![11]);
    assert_eq!(
        s.block_manager().free_pages_in_lru_order(),
        [3, 4, 5, 6, 7, 1].map(PageId).to_vec()
    );
    s.postprocess(&plan, &[Some(9)]);

    // A different prompt takes fresh pages in LRU order: never-cached first.
    let c2 = s.add((50..58).collect(), p(1)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![b, c2]);
    assert_eq!(plan.block_table(0), &[0, 2, 3], "b's decode takes page 3");
    assert_eq!(&plan.block_table(1)[..2], &[4, 5]);
    s.postprocess(&plan, &[Some(1), Some(1)]);
    assert_all_pages_free(&s);
    // Clean pages first (never used 6, 7, then b's freed uncached 3, 2),
    // then the cached ones least recently freed first: 1 (freed at b's
    // copy-on-write), b's 0, c's 5, 4 (tail first).
    assert_eq!(
        s.block_manager().free_pages_in_lru_order(),
        [6, 7, 3, 2, 1, 0, 5, 4].map(PageId).to_vec()
    );
    // Fresh pages follow that order: 5 pages for a new prompt take the four
    // clean pages, then evict 1 (the cached copy of tokens 5..8); page 0
    // stays cached.
    let d = s.add((200..220).collect(), p(1)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.block_table(0), &[6, 7, 3, 2, 1]);
    s.postprocess(&plan, &[Some(1)]);
    s.remove(d).unwrap();
    let e = s.add(prompt.clone(), p(1)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        s.get(e).unwrap().num_cached_tokens,
        4,
        "page 0 still cached, page 1 evicted"
    );
    assert_eq!(plan.block_table(0)[0], 0);
    assert_eq!(plan.positions, vec![4, 5, 6, 7]);
}

/// Regression (found by the proptest): a revived cached page was written in
/// place by one admission while a second admission in the same step claimed
/// it, so the step wrote into a page with refcount 2.
#[test]
fn regression_revived_page_claimed_twice_in_one_step_is_not_written() {
    let c = SchedulerConfig {
        max_num_seqs: 2,
        ..cfg(5, 3, 3, true)
    };
    let mut s = sched(c.clone());
    let mut r = FakeRunner::new(&c);
    let first = s.add(vec![7; 5], p(1)).unwrap();
    let out = run_all(&mut s, &mut r);
    assert_eq!(out[&first].0, reference(&[7; 5], &p(1)));
    let a = s.add(vec![7; 5], p(1)).unwrap();
    let b = s.add(vec![7, 7, 7, 7, 7, 1], p(1)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b]);
    assert_eq!(plan.copy_pages.len(), 1, "a writes position 4 into a copy");
    assert_eq!(
        s.block_manager().refcount(PageId(0)),
        1,
        "b alone holds the cached page"
    );
    check(&s, Some(&plan));
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    let out = run_all(&mut s, &mut r);
    assert_eq!(out[&a].0, reference(&[7; 5], &p(1)));
    assert_eq!(out[&b].0, reference(&[7, 7, 7, 7, 7, 1], &p(1)));
    assert_all_pages_free(&s);
}

#[test]
fn fully_cached_prompt_copies_the_shared_last_page() {
    let c = cfg(4, 8, 64, true);
    let mut s = sched(c.clone());
    let mut r = FakeRunner::new(&c);
    let prompt: Vec<u32> = (1..=8).collect();
    let a = s.add(prompt.clone(), p(4)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let sampled = r.execute(&plan);
    s.postprocess(&plan, &sampled);
    let b = s.add(prompt.clone(), p(4)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b]);
    assert_eq!(
        plan.copy_pages,
        vec![(1, 3)],
        "shared page 1 copied to fresh page 3"
    );
    assert_eq!(plan.block_table(0), &[0, 1, 2]);
    assert_eq!(plan.block_table(1), &[0, 3, 0]);
    assert_eq!(plan.input_ids[1], 8);
    assert_eq!(plan.positions[1], 7);
    assert_eq!(plan.slot_mapping, vec![8, 15]);
    assert_eq!(s.block_manager().refcount(PageId(0)), 2);
    assert_eq!(s.block_manager().refcount(PageId(1)), 1);
    assert_eq!(s.block_manager().refcount(PageId(3)), 1);
    check(&s, Some(&plan));
    let sampled = r.execute(&plan);
    s.postprocess(&plan, &sampled);
    let out = run_all(&mut s, &mut r);
    assert_eq!(out[&a].0, reference(&prompt, &p(4)));
    assert_eq!(out[&b].0, reference(&prompt, &p(4)));
    assert_all_pages_free(&s);
}

/// Runs each prompt through its own scheduler.
fn solo_outputs(c: &SchedulerConfig, prompts: &[(Vec<u32>, SeqParams)]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|(q, prm)| {
            let mut s = sched(c.clone());
            let mut r = FakeRunner::new(c);
            let id = s.add(q.clone(), prm.clone()).unwrap();
            let out = run_all(&mut s, &mut r);
            assert_all_pages_free(&s);
            out[&id].0.clone()
        })
        .collect()
}

#[test]
fn too_few_pages_preempts_and_outputs_match_solo_runs() {
    for caching in [false, true] {
        let c = cfg(4, 6, 64, caching);
        let reqs: Vec<(Vec<u32>, SeqParams)> = (0..4u32)
            .map(|i| ((10 * i..10 * i + 5 + i).collect(), p(12)))
            .collect();
        let mut s = sched(c.clone());
        let mut r = FakeRunner::new(&c);
        let ids: Vec<SeqId> = reqs
            .iter()
            .map(|(q, prm)| s.add(q.clone(), prm.clone()).unwrap())
            .collect();
        let out = run_all(&mut s, &mut r);
        assert!(
            s.stats().num_preemptions >= 1,
            "6 pages cannot hold 4 growing sequences"
        );
        let solo = solo_outputs(&c, &reqs);
        for (k, id) in ids.iter().enumerate() {
            assert_eq!(out[id].1, FinishReason::Length);
            assert_eq!(out[id].0.len(), 12);
            assert_eq!(out[id].0, solo[k], "{id} with caching={caching}");
            assert_eq!(solo[k], reference(&reqs[k].0, &reqs[k].1));
        }
        assert_all_pages_free(&s);
    }
}

#[test]
fn preempted_sequence_goes_back_to_waiting_and_is_recomputed() {
    let c = cfg(2, 4, 64, false);
    let mut s = sched(c.clone());
    let x = s.add(vec![1, 2, 3], p(5)).unwrap();
    let y = s.add(vec![4, 5, 6], p(3)).unwrap();
    let mut r = FakeRunner::new(&c);
    let mut preempted_seen = Vec::new();
    let mut steps = 0;
    while s.has_unfinished() {
        steps += 1;
        assert!(steps < 100);
        let o = s.schedule();
        check(&s, o.plan.as_ref());
        for &id in &o.preempted {
            let q = s.get(id).unwrap();
            assert_eq!(q.status, SeqStatus::Waiting);
            assert_eq!((q.num_computed_tokens, q.block_table.len()), (0, 0));
            preempted_seen.push(id);
        }
        if let Some(plan) = o.plan {
            let sm = r.execute(&plan);
            s.postprocess(&plan, &sm);
        }
    }
    assert_eq!(
        preempted_seen.first(),
        Some(&y),
        "the newest sequence is the victim"
    );
    assert_eq!(s.get(x).unwrap().output(), reference(&[1, 2, 3], &p(5)));
    assert_eq!(s.get(y).unwrap().output(), reference(&[4, 5, 6], &p(3)));
    assert_eq!(s.stats().num_preemptions, preempted_seen.len() as u64);
}

#[test]
fn abort_frees_every_page() {
    let c = cfg(4, 16, 64, true);
    let mut s = sched(c.clone());
    let mut r = FakeRunner::new(&c);
    let prefix: Vec<u32> = (1..=8).collect();
    let a = s.add([prefix.clone(), vec![9]].concat(), p(10)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    let b = s
        .add([prefix.clone(), vec![10, 11]].concat(), p(10))
        .unwrap();
    let w = s.add(vec![5; 40], p(10)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a, b, w]);
    let x = s.add(vec![6; 10], p(10)).unwrap();
    assert_eq!(s.block_manager().refcount(PageId(0)), 2);
    // Abort `a` mid-step: the shared pages stay with `b`; postprocess skips `a`.
    s.abort(a).unwrap();
    assert_eq!(s.block_manager().refcount(PageId(0)), 1);
    let sm = r.execute(&plan);
    let up = s.postprocess(&plan, &sm);
    assert_eq!(up.iter().map(|u| u.seq_id).collect::<Vec<_>>(), vec![b, w]);
    check(&s, None);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    s.abort(x).unwrap(); // waiting
    s.abort(w).unwrap(); // running
    s.abort(b).unwrap();
    s.abort(b).unwrap(); // twice is fine
    for id in [a, b, w, x] {
        assert_eq!(
            s.get(id).unwrap().finish_reason(),
            Some(&FinishReason::Aborted)
        );
    }
    assert_all_pages_free(&s);
    assert!(matches!(
        s.abort(SeqId(99)),
        Err(EngineError::UnknownSequence(SeqId(99)))
    ));
    assert!(s.schedule().plan.is_none());
}

#[test]
fn finish_with_stop_keeps_the_first_reason_and_remove_needs_a_finished_sequence() {
    let mut s = sched(cfg(4, 8, 64, false));
    let a = s.add(vec![1, 2], p(5)).unwrap();
    let plan = s.schedule().plan.unwrap();
    s.postprocess(&plan, &[Some(3)]);
    assert!(matches!(s.remove(a), Err(EngineError::NotFinished(_))));
    s.finish(a, FinishReason::Stop).unwrap();
    s.finish(a, FinishReason::Aborted).unwrap();
    assert_eq!(s.get(a).unwrap().finish_reason(), Some(&FinishReason::Stop));
    assert_all_pages_free(&s);
    let q = s.remove(a).unwrap();
    assert_eq!(q.output(), &[3]);
    assert!(matches!(s.remove(a), Err(EngineError::UnknownSequence(_))));
    assert!(s.get(a).is_none());
}

#[test]
fn eog_finishes_and_is_kept_in_the_output_unless_ignored() {
    let mut s = sched(cfg(4, 8, 64, false));
    let params = SeqParams {
        eog_ids: vec![2, 7],
        ..p(5)
    };
    let a = s.add(vec![1], params.clone()).unwrap();
    let b = s
        .add(
            vec![1],
            SeqParams {
                ignore_eog: true,
                ..params
            },
        )
        .unwrap();
    let plan = s.schedule().plan.unwrap();
    s.postprocess(&plan, &[Some(4), Some(4)]);
    let plan = s.schedule().plan.unwrap();
    let up = s.postprocess(&plan, &[Some(7), Some(7)]);
    assert_eq!(
        up[0],
        SeqUpdate {
            seq_id: a,
            new_token: Some(7),
            finished: Some(FinishReason::Eog)
        }
    );
    assert_eq!(
        up[1],
        SeqUpdate {
            seq_id: b,
            new_token: Some(7),
            finished: None
        }
    );
    assert_eq!(s.get(a).unwrap().output(), &[4, 7]);
    let done = s.take_finished();
    assert_eq!(done.iter().map(|q| q.id).collect::<Vec<_>>(), vec![a]);
    assert_eq!(s.num_running(), 1);
}

#[test]
fn a_missing_sampled_token_fails_the_sequence() {
    let mut s = sched(cfg(4, 8, 64, false));
    let a = s.add(vec![1, 2], p(5)).unwrap();
    let plan = s.schedule().plan.unwrap();
    let up = s.postprocess(&plan, &[None]);
    assert!(matches!(&up[0].finished, Some(FinishReason::Error(m)) if m.contains("no token")));
    assert!(s.get(a).unwrap().is_finished());
    assert_all_pages_free(&s);
}

#[test]
fn want_all_logits_returns_every_prompt_row_across_chunks() {
    let mut s = sched(cfg(4, 8, 3, false));
    let a = s
        .add(
            vec![1, 2, 3, 4, 5],
            SeqParams {
                want_all_logits: true,
                ..p(2)
            },
        )
        .unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        (plan.logits_indices.clone(), plan.sample_rows.clone()),
        (vec![0, 1, 2], vec![None])
    );
    s.postprocess(&plan, &[None]);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.positions, vec![3, 4]);
    assert_eq!(
        (plan.logits_indices.clone(), plan.sample_rows.clone()),
        (vec![0, 1], vec![Some(1)])
    );
    s.postprocess(&plan, &[Some(9)]);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(
        (plan.logits_indices.clone(), plan.sample_rows.clone()),
        (vec![0], vec![Some(0)])
    );
    assert_eq!(plan.seq_ids, vec![a]);
}

#[test]
fn max_num_seqs_limits_admission() {
    let mut s = sched(SchedulerConfig {
        max_num_seqs: 2,
        ..cfg(4, 16, 64, false)
    });
    for i in 0..3 {
        s.add(vec![i + 1], p(2)).unwrap();
    }
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![SeqId(0), SeqId(1)]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    s.postprocess(&plan, &[Some(5), Some(5)]);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![SeqId(0), SeqId(1)]);
    s.postprocess(&plan, &[Some(5), Some(5)]);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![SeqId(2)]);
}

#[test]
fn add_rejects_empty_too_long_and_unfittable_requests() {
    let mut s = sched(SchedulerConfig {
        max_model_len: 64,
        ..cfg(4, 4, 64, false)
    });
    assert!(matches!(s.add(vec![], p(1)), Err(EngineError::EmptyPrompt)));
    assert!(matches!(
        s.add(vec![1], p(0)),
        Err(EngineError::ZeroMaxTokens)
    ));
    let err = s.add(vec![1; 60], p(5)).unwrap_err();
    assert!(matches!(
        err,
        EngineError::TooLong {
            prompt_len: 60,
            max_tokens: 5,
            max_model_len: 64
        }
    ));
    assert!(
        err.to_string().contains("exceeds the model context of 64"),
        "{err}"
    );
    assert!(matches!(
        s.add(vec![1; 10], p(usize::MAX)),
        Err(EngineError::TooLong { .. })
    ));
    // 16 token positions fit in 4 pages of 4: prompt 10 + 7 tokens needs 16.
    s.add(vec![1; 10], p(7)).unwrap();
    let err = s.add(vec![1; 10], p(8)).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::ExceedsKvCache {
                num_tokens: 17,
                needed_pages: 5,
                page_size: 4,
                num_pages: 4
            }
        ),
        "{err}"
    );
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn bad_configs_are_refused() {
    for c in [
        SchedulerConfig {
            max_num_seqs: 0,
            ..cfg(4, 4, 4, false)
        },
        SchedulerConfig {
            max_num_batched_tokens: 0,
            ..cfg(4, 4, 4, false)
        },
        SchedulerConfig {
            max_model_len: 1,
            ..cfg(4, 4, 4, false)
        },
        cfg(0, 4, 4, false),
        cfg(4, 0, 4, false),
    ] {
        assert!(matches!(
            Scheduler::new(c, FaultInjector::new()),
            Err(EngineError::InvalidConfig(_))
        ));
    }
}

/// Several requests with a shared prefix, tight pages: exercises hits,
/// copy-on-write, chunking and preemption.
fn fault_workload() -> (SchedulerConfig, Vec<(Vec<u32>, SeqParams)>) {
    let c = SchedulerConfig {
        max_num_seqs: 4,
        ..cfg(4, 10, 12, true)
    };
    let prefix: Vec<u32> = (1..=8).collect();
    let reqs = vec![
        (prefix.clone(), p(6)),
        ([prefix.clone(), vec![20, 21, 22]].concat(), p(5)),
        (prefix.clone(), p(4)),
        ((30..44).collect(), p(6)),
        ([prefix.clone(), vec![23]].concat(), p(7)),
    ];
    (c, reqs)
}

fn run_workload(
    c: &SchedulerConfig,
    reqs: &[(Vec<u32>, SeqParams)],
    faults: FaultInjector,
) -> (Scheduler, Finished, Vec<SeqId>, Vec<SeqId>) {
    let mut s = Scheduler::new(c.clone(), faults).unwrap();
    let mut r = FakeRunner::new(c);
    let mut ids = Vec::new();
    let mut failed = Vec::new();
    let mut step = 0;
    // Requests arrive over the first steps.
    loop {
        if let Some((q, prm)) = reqs.get(step) {
            ids.push(s.add(q.clone(), prm.clone()).unwrap());
        }
        if !s.has_unfinished() && step >= reqs.len() {
            break;
        }
        step += 1;
        assert!(step < 10_000, "no progress");
        let out = s.schedule();
        check(&s, out.plan.as_ref());
        failed.extend(out.failed.iter().map(|f| f.seq_id));
        if let Some(plan) = out.plan {
            let sm = r.execute(&plan);
            s.postprocess(&plan, &sm);
            check(&s, None);
        }
        r.wipe_uncommitted(s.block_manager());
    }
    let done: Finished = s
        .take_finished()
        .into_iter()
        .map(|q| {
            (
                q.id,
                (q.output().to_vec(), q.finish_reason().cloned().unwrap()),
            )
        })
        .collect();
    (s, done, ids, failed)
}

#[test]
fn every_fault_site_fails_only_its_request() {
    let (c, reqs) = fault_workload();
    let clean = FaultInjector::new();
    let (s, base, ids, failed) = run_workload(&c, &reqs, clean.clone());
    assert!(failed.is_empty());
    assert!(
        s.stats().num_preemptions > 0 && s.stats().num_prefix_cache_hit_tokens > 0,
        "{:?}",
        s.stats()
    );
    for (id, (q, prm)) in ids.iter().zip(&reqs) {
        assert_eq!(base[id], (reference(q, prm), FinishReason::Length));
    }
    let n = clean.sites_reached();
    assert!(n >= 10, "workload reaches {n} sites");
    for k in 1..=n {
        let f = FaultInjector::new();
        f.fail_at(k);
        let (s, done, ids, failed) = run_workload(&c, &reqs, f.clone());
        assert_eq!(f.faults_fired(), 1, "site {k}");
        assert_eq!(failed.len(), 1, "site {k}: exactly one request fails");
        for id in &ids {
            if *id == failed[0] {
                assert!(
                    matches!(&done[id].1, FinishReason::Error(m) if m.contains("injected fault")),
                    "site {k}: {:?}",
                    done[id].1
                );
            } else {
                assert_eq!(done[id], base[id], "site {k}: {id} must be unaffected");
            }
        }
        assert_eq!(s.stats().num_failed, 1);
        assert_all_pages_free(&s);
    }
}

/// One request of a random workload.
#[derive(Debug, Clone)]
struct Req {
    prefix: usize,
    suffix: Vec<u32>,
    max_tokens: usize,
    arrive: usize,
    abort_at: Option<usize>,
    eog: bool,
}

fn req_strategy() -> impl Strategy<Value = Req> {
    (
        0usize..4,
        prop::collection::vec(1u32..50, 0..10),
        1usize..10,
        0usize..12,
        prop::option::weighted(0.15, 0usize..30),
        any::<bool>(),
    )
        .prop_map(|(prefix, suffix, max_tokens, arrive, abort_at, eog)| Req {
            prefix,
            suffix,
            max_tokens,
            arrive,
            abort_at,
            eog,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
    #[test]
    fn random_workloads_keep_invariants_and_balance(
        page_size in 1usize..6,
        num_pages in 3usize..30,
        budget in 1usize..40,
        max_num_seqs in 1usize..6,
        caching in any::<bool>(),
        fault_at in prop::option::weighted(0.3, 1u64..60),
        reqs in prop::collection::vec(req_strategy(), 1..8),
        host_slots in prop::option::weighted(0.4, 0u64..12),
        pages_per_unit in prop::option::weighted(0.5, 1usize..4),
        idle_steps in 0u64..4,
    ) {
        // Swap on: every preemption with enough free host slots swaps.
        let swap = match host_slots {
            Some(n) => SwapConfig { space_bytes: n, page_bytes: 1, latency_us: 0, ..SwapConfig::default() },
            None => SwapConfig::default(),
        };
        let c = SchedulerConfig { page_size, num_pages, max_num_seqs, max_num_batched_tokens: budget, max_model_len: 64, enable_prefix_caching: caching, swap };
        let prefixes: [Vec<u32>; 4] = [vec![], vec![7; 5], (1..9).collect(), (1..13).collect()];
        let faults = FaultInjector::new();
        faults.fail_at(fault_at.unwrap_or(0));
        let commit = pages_per_unit.map(|ppu| Arc::new(crate::kv_commit::RecordingCommit::new(ppu, None, FaultInjector::new())));
        let mut s = Scheduler::with_kv_commit(
            c.clone(),
            faults.clone(),
            commit.clone().map(|c| c as Arc<dyn KvCommit>),
        ).unwrap();
        s.block_manager.set_cache_idle_steps(idle_steps);
        let mut r = FakeRunner::new(&c);
        let mut added: Vec<(SeqId, Vec<u32>, SeqParams, Option<usize>)> = Vec::new();
        let mut pending: Vec<&Req> = reqs.iter().collect();
        let last_arrival = reqs.iter().map(|q| q.arrive).max().unwrap_or(0);
        let done = drive(&mut s, &mut r, |step, s| {
            pending.retain(|q| {
                if q.arrive != step {
                    return true;
                }
                let mut prompt = [prefixes[q.prefix].clone(), q.suffix.clone()].concat();
                if prompt.is_empty() {
                    prompt.push(3);
                }
                let params = SeqParams { eog_ids: if q.eog { vec![5, 6, 7] } else { vec![] }, ..p(q.max_tokens) };
                match s.add(prompt.clone(), params.clone()) {
                    Ok(id) => added.push((id, prompt, params, q.abort_at.map(|a| a + step))),
                    Err(e) => assert!(matches!(e, EngineError::ExceedsKvCache { .. }), "{e}"),
                }
                false
            });
            for (id, _, _, abort_at) in &added {
                if *abort_at == Some(step) {
                    s.abort(*id).unwrap();
                }
            }
        }, last_arrival + 1);
        assert_all_pages_free(&s);
        prop_assert_eq!(s.num_host_slots_in_use(), 0);
        if let Some(commit) = &commit {
            prop_assert_eq!(commit.violation(), None);
            prop_assert_eq!(commit.committed_units().len(), s.block_manager().num_committed_units());
        }
        let num_errors = done.values().filter(|d| matches!(d.1, FinishReason::Error(_))).count() as u64;
        prop_assert_eq!(num_errors, faults.faults_fired(), "one failed request per fired fault");
        prop_assert!(faults.faults_fired() <= 1);
        for (id, prompt, params, _) in &added {
            let (out, reason) = &done[id];
            let want = reference(prompt, params);
            match reason {
                FinishReason::Aborted => prop_assert!(want.starts_with(out), "{id}: aborted output is a prefix"),
                FinishReason::Length | FinishReason::Eog => prop_assert_eq!(out, &want, "{}", id),
                FinishReason::Error(m) => {
                    prop_assert!(m.contains("injected fault"), "{id} failed: {m}");
                    prop_assert!(want.starts_with(out), "{id}: failed output is a prefix");
                }
                other => prop_assert!(false, "{id} finished with {other:?}"),
            }
        }
    }
}

mod kv_tiers;
