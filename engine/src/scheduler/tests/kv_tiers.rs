//! Growable KV (commit units) and swap-to-host preemption, run against the
//! fake paged model of the parent module: outputs must equal solo runs, and
//! every page, unit and host slot must be accounted for.

use super::*;
use crate::kv_commit::{CommitEvent, RecordingCommit};

/// One request: the step it arrives at, its prompt and its parameters.
type Arrival = (usize, Vec<u32>, SeqParams);

/// What a run saw, step by step.
struct Run {
    done: Finished,
    ids: Vec<SeqId>,
    failed: Vec<SeqId>,
    /// Committed units after each step.
    committed: Vec<usize>,
    /// Releases so far after each step.
    releases: Vec<u64>,
    /// Running (or swapped / waiting) sequences after each step.
    unfinished: Vec<Vec<SeqId>>,
}

fn run_arrivals(s: &mut Scheduler, reqs: &[Arrival]) -> Run {
    let c = s.config().clone();
    let mut r = FakeRunner::new(&c);
    let mut run = Run {
        done: HashMap::new(),
        ids: Vec::new(),
        failed: Vec::new(),
        committed: Vec::new(),
        releases: Vec::new(),
        unfinished: Vec::new(),
    };
    let last = reqs.iter().map(|q| q.0).max().unwrap_or(0);
    let mut step = 0;
    loop {
        for (_, q, prm) in reqs.iter().filter(|q| q.0 == step) {
            run.ids.push(s.add(q.clone(), prm.clone()).unwrap());
        }
        if !s.has_unfinished() && step > last {
            break;
        }
        step += 1;
        assert!(step < 10_000, "no progress");
        let out = s.schedule();
        check(s, out.plan.as_ref());
        run.failed.extend(out.failed.iter().map(|f| f.seq_id));
        if let Some(plan) = out.plan {
            let sm = r.execute(&plan);
            s.postprocess(&plan, &sm);
            check(s, None);
        }
        r.wipe_uncommitted(s.block_manager());
        run.committed.push(s.block_manager().num_committed_units());
        run.releases.push(s.kv_commit_stats().num_releases);
        run.unfinished.push(
            run.ids
                .iter()
                .copied()
                .filter(|id| s.get(*id).is_some_and(|q| !q.is_finished()))
                .collect(),
        );
    }
    run.done = s
        .take_finished()
        .into_iter()
        .map(|q| {
            (
                q.id,
                (q.output().to_vec(), q.finish_reason().cloned().unwrap()),
            )
        })
        .collect();
    run
}

fn growable(
    c: &SchedulerConfig,
    ppu: usize,
    cap: Option<usize>,
) -> (Scheduler, Arc<RecordingCommit>) {
    let commit = Arc::new(RecordingCommit::new(ppu, cap, FaultInjector::new()));
    let s =
        Scheduler::with_kv_commit(c.clone(), FaultInjector::new(), Some(commit.clone())).unwrap();
    (s, commit)
}

fn assert_outputs_match_solo_runs(run: &Run, reqs: &[Arrival]) {
    for (id, (_, q, prm)) in run.ids.iter().zip(reqs) {
        assert_eq!(
            run.done[id],
            (reference(q, prm), FinishReason::Length),
            "{id}"
        );
    }
}

/// Balance zero: every page free, every host slot free, and every unit
/// still committed holds only cached free pages (released once idle).
fn assert_balance_zero(s: &mut Scheduler, commit: &RecordingCommit) {
    assert_all_pages_free(s);
    assert_eq!(commit.violation(), None);
    assert_eq!(s.num_host_slots_in_use(), 0, "host slots leaked");
    let bm = s.block_manager();
    assert_eq!(commit.committed_units().len(), bm.num_committed_units());
    let ppu = bm.pages_per_unit();
    let states = bm.page_states();
    for u in commit.committed_units() {
        assert!(
            states[u * ppu..((u + 1) * ppu).min(states.len())]
                .iter()
                .any(|p| p.hash.is_some()),
            "unit {u} stays committed without a cached page"
        );
    }
    s.block_manager.set_cache_idle_steps(0);
    s.block_manager.end_step();
    assert_eq!(s.block_manager().num_committed_units(), 0);
    assert!(commit.committed_units().is_empty());
    s.block_manager().check_invariants().unwrap();
}

#[test]
fn growth_under_a_rising_load_commits_units_step_by_step() {
    let c = cfg(4, 32, 64, false);
    let (mut s, commit) = growable(&c, 2, None);
    let reqs: Vec<Arrival> = (0..4)
        .map(|i| (2 * i, (10 * i as u32..10 * i as u32 + 8).collect(), p(12)))
        .collect();
    let run = run_arrivals(&mut s, &reqs);
    assert_outputs_match_solo_runs(&run, &reqs);
    // While the load rises (until the first request finishes), the committed
    // units only grow, one step at a time, lowest unit first.
    let first_release = run.releases.iter().position(|&r| r > 0).unwrap();
    let rising = &run.committed[..first_release];
    assert!(rising.windows(2).all(|w| w[0] <= w[1]), "{rising:?}");
    let mut levels = rising.to_vec();
    levels.dedup();
    assert!(
        levels.len() >= 5,
        "committed units rise step by step: {rising:?}"
    );
    assert_eq!(levels[0], 1, "the first step commits one unit");
    let commits: Vec<usize> = commit
        .events()
        .iter()
        .take_while(|e| matches!(e, CommitEvent::Commit(_)))
        .map(|e| match e {
            CommitEvent::Commit(u) => *u,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(commits, (0..commits.len()).collect::<Vec<_>>());
    let peak = s.kv_commit_stats().peak_committed_pages;
    assert!(
        (12..32).contains(&peak),
        "memory follows the load, not the reservation: {peak}"
    );
    assert_eq!(s.stats().num_preemptions, 0);
    assert_balance_zero(&mut s, &commit);
}

#[test]
fn a_unit_is_released_when_a_short_request_finishes_while_a_long_one_runs() {
    let c = cfg(4, 32, 64, false);
    let (mut s, commit) = growable(&c, 2, None);
    let reqs: Vec<Arrival> = vec![
        (0, (1..=8).collect(), p(30)),
        (0, (21..=28).collect(), p(4)),
    ];
    let run = run_arrivals(&mut s, &reqs);
    assert_outputs_match_solo_runs(&run, &reqs);
    let (long, short) = (run.ids[0], run.ids[1]);
    // The step where the short request is gone and the long one still runs.
    let step = run
        .unfinished
        .iter()
        .position(|u| u == &vec![long])
        .unwrap();
    assert!(
        run.releases[step] >= 1,
        "a unit of the short request was released"
    );
    assert!(run.committed[step] >= 1, "the long request's units stay");
    let events = commit.events();
    let release = events
        .iter()
        .position(|e| *e == CommitEvent::Release(1))
        .unwrap();
    assert!(
        !events[..release].contains(&CommitEvent::Release(0)),
        "unit 0 (the long request's prompt) outlives unit 1 (the short one's)"
    );
    assert!(run.unfinished[step].contains(&long) && !run.unfinished[step].contains(&short));
    assert_balance_zero(&mut s, &commit);
}

#[test]
fn cached_prefix_pages_keep_their_unit_until_they_are_idle() {
    let c = cfg(4, 32, 64, true);
    let (mut s, commit) = growable(&c, 2, None);
    let prefix: Vec<u32> = (1..=8).collect();
    let reqs: Vec<Arrival> = vec![
        (0, prefix.clone(), p(3)),
        (6, [prefix.clone(), vec![40, 41]].concat(), p(3)),
    ];
    s.block_manager.set_cache_idle_steps(1_000);
    let run = run_arrivals(&mut s, &reqs);
    assert_outputs_match_solo_runs(&run, &reqs);
    assert!(
        s.stats().num_prefix_cache_hit_tokens >= 8,
        "the second request reused the prefix"
    );
    assert!(
        s.block_manager().num_committed_units() >= 1,
        "cached pages keep unit 0"
    );
    assert_balance_zero(&mut s, &commit);
}

#[test]
fn a_commit_cap_leads_to_preemption_not_failure() {
    let (c, reqs) = fault_workload();
    let (mut s, commit) = growable(&c, 2, Some(3));
    let arrivals: Vec<Arrival> = reqs
        .iter()
        .enumerate()
        .map(|(i, (q, prm))| (i, q.clone(), prm.clone()))
        .collect();
    let run = run_arrivals(&mut s, &arrivals);
    assert!(run.failed.is_empty());
    assert_outputs_match_solo_runs(&run, &arrivals);
    assert!(
        s.kv_commit_stats().num_grow_failures > 0,
        "the cap was reached"
    );
    assert!(s.stats().num_preemptions > 0);
    assert!(commit.peak_units() <= 3);
    assert_balance_zero(&mut s, &commit);
}

#[test]
fn every_grow_fault_is_survived_without_a_leak() {
    let (c, reqs) = fault_workload();
    let arrivals: Vec<Arrival> = reqs
        .iter()
        .enumerate()
        .map(|(i, (q, prm))| (i, q.clone(), prm.clone()))
        .collect();
    let grow_faults = FaultInjector::new();
    let run_with = |faults: &FaultInjector| {
        let commit = Arc::new(RecordingCommit::new(2, None, faults.clone()));
        let mut s =
            Scheduler::with_kv_commit(c.clone(), FaultInjector::new(), Some(commit.clone()))
                .unwrap();
        let run = run_arrivals(&mut s, &arrivals);
        (s, commit, run)
    };
    let (mut s, commit, base) = run_with(&grow_faults);
    assert!(base.failed.is_empty());
    assert_outputs_match_solo_runs(&base, &arrivals);
    assert_balance_zero(&mut s, &commit);
    let n = grow_faults.sites_reached();
    assert!(n >= 5, "workload reaches {n} grow sites");
    let mut survived_by_all = 0;
    for k in 1..=n {
        let f = FaultInjector::new();
        f.fail_at(k);
        let (mut s, commit, run) = run_with(&f);
        assert_eq!(f.faults_fired(), 1, "grow site {k}");
        assert!(run.failed.len() <= 1, "grow site {k}: {:?}", run.failed);
        for id in &run.ids {
            if run.failed.contains(id) {
                // Only a sequence with nothing to wait for fails.
                assert!(
                    matches!(&run.done[id].1, FinishReason::Error(m) if m.contains("kv grow")),
                    "grow site {k}: {:?}",
                    run.done[id].1
                );
            } else {
                assert_eq!(run.done[id], base.done[id], "grow site {k}: {id}");
            }
        }
        survived_by_all += usize::from(run.failed.is_empty());
        assert_eq!(s.kv_commit_stats().num_grow_failures, 1);
        assert_balance_zero(&mut s, &commit);
    }
    assert!(
        survived_by_all > 0,
        "some grow faults are absorbed by waiting or preemption"
    );
}

// ---- Swap to host ----

/// Swap constants of a SmolLM2-135M f32 KV page (16 tokens × 30 layers ×
/// 3 KV heads × 64 × 2 × 4 bytes) with the default rule constants.
fn smollm_swap(space_bytes: u64) -> SwapConfig {
    SwapConfig {
        space_bytes,
        page_bytes: 737_280,
        ..SwapConfig::default()
    }
}

#[test]
fn the_rule_recomputes_short_sequences_and_swaps_long_ones() {
    let sc = smollm_swap(1 << 30);
    assert_eq!(sc.num_slots(), 1456);
    // 4 tokens in one page: swap = 2 × (1 ms + 737 280 B / 10 GB/s) = 2.147 ms,
    // recompute = 4 / 4096 tok/s = 0.977 ms: recompute.
    assert_eq!(sc.swap_cost_ns(1), 2_147_456);
    assert_eq!(sc.recompute_cost_ns(4), 976_562);
    assert!(!sc.prefers_swap(4, 1));
    // 64 tokens in four pages: swap = 2.590 ms, recompute = 15.625 ms: swap.
    assert_eq!(sc.swap_cost_ns(4), 2_589_824);
    assert_eq!(sc.recompute_cost_ns(64), 15_625_000);
    assert!(sc.prefers_swap(64, 4));
    // Break-even near 9 tokens per 2.15 ms of transfer.
    assert!(!sc.prefers_swap(8, 1) && sc.prefers_swap(9, 1));
    assert!(
        !smollm_swap(0).prefers_swap(64, 4),
        "off without swap space"
    );
}

/// A (old, short prompt) decodes into a full cache, so B (newer, `b_prompt`)
/// is preempted at step 2.
fn preempt_b(swap: SwapConfig, b_len: usize) -> (Scheduler, Run, Vec<Arrival>) {
    let num_pages = 1 + b_len.div_ceil(4);
    let c = SchedulerConfig {
        swap,
        ..cfg(4, num_pages, 64, false)
    };
    let mut s = sched(c);
    let reqs: Vec<Arrival> = vec![
        (0, vec![1, 2, 3, 4], p(3)),
        (0, (100..100 + b_len as u32).collect(), p(2)),
    ];
    let run = run_arrivals(&mut s, &reqs);
    (s, run, reqs)
}

#[test]
fn a_long_victim_is_swapped_and_resumes_with_the_same_output() {
    let (s, run, reqs) = preempt_b(smollm_swap(16 * 737_280), 40);
    assert_outputs_match_solo_runs(&run, &reqs);
    let st = s.stats();
    assert_eq!((st.num_preemptions, st.num_swap_preemptions), (1, 1));
    assert_eq!(st.num_swap_resumes, 1);
    assert_eq!((st.num_swap_out_pages, st.num_swap_in_pages), (10, 10));
    assert_eq!(s.num_host_slots_in_use(), 0);
}

#[test]
fn a_short_victim_is_recomputed() {
    let (s, run, reqs) = preempt_b(smollm_swap(16 * 737_280), 3);
    assert_outputs_match_solo_runs(&run, &reqs);
    let st = s.stats();
    assert_eq!((st.num_preemptions, st.num_swap_preemptions), (1, 0));
}

#[test]
fn a_long_victim_is_recomputed_when_the_host_slots_are_too_few() {
    let (s, run, reqs) = preempt_b(smollm_swap(9 * 737_280), 40);
    assert_outputs_match_solo_runs(&run, &reqs);
    assert_eq!(s.num_host_slots(), 9);
    assert_eq!(s.stats().num_swap_preemptions, 0);
    assert_eq!(s.stats().num_preemptions, 1);
}

#[test]
fn swap_out_plan_has_exact_copies_and_runs_before_the_page_is_reused() {
    let c = SchedulerConfig {
        swap: smollm_swap(16 * 737_280),
        ..cfg(4, 4, 64, false)
    };
    let mut s = sched(c.clone());
    let mut r = FakeRunner::new(&c);
    let a = s.add(vec![1, 2, 3, 4], p(3)).unwrap();
    let b_prompt: Vec<u32> = (100..112).collect();
    let b = s.add(b_prompt.clone(), p(2)).unwrap();
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.block_tables, vec![0, 0, 0, 1, 2, 3]);
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    // A's decode needs a page: B (12 tokens in pages 1, 2, 3; swap 2.44 ms
    // < recompute 2.93 ms) goes to host slots 0, 1, 2, and A's new page is
    // B's old page 3 (freed last page first), written this very step: the
    // swap-out runs first.
    let out = s.schedule();
    assert_eq!(out.preempted, vec![b]);
    let plan = out.plan.unwrap();
    assert_eq!(plan.swap_out, vec![(1, 0), (2, 1), (3, 2)]);
    assert_eq!(plan.seq_ids, vec![a]);
    assert_eq!(plan.block_tables, vec![0, 3]);
    assert!(plan.swap_in.is_empty());
    assert_eq!(s.get(b).unwrap().status, SeqStatus::Swapped);
    assert_eq!(s.get(b).unwrap().host_slots, vec![0, 1, 2]);
    assert_eq!(s.num_swapped(), 1);
    assert_eq!(s.host_bytes_in_use(), 3 * 737_280);
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    // A finishes at the next step; B resumes the step after, its three
    // pages copied back into fresh pages before its decode row runs.
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![a]);
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    let plan = s.schedule().plan.unwrap();
    assert_eq!(plan.seq_ids, vec![b]);
    assert_eq!(plan.swap_in.len(), 3);
    assert_eq!(
        plan.swap_in.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        plan.positions,
        vec![12],
        "only the token after the swapped K/V runs"
    );
    let sm = r.execute(&plan);
    s.postprocess(&plan, &sm);
    let mut done = run_all(&mut s, &mut r);
    assert_eq!(
        done.remove(&b).unwrap(),
        (reference(&b_prompt, &p(2)), FinishReason::Length)
    );
    assert_eq!(s.stats().num_swap_in_pages, 3);
    assert_eq!(s.num_host_slots_in_use(), 0);
}

#[test]
fn swapped_and_resumed_sequences_match_solo_runs_under_pressure() {
    // Always swap (free copies) with room for every page.
    let swap = SwapConfig {
        space_bytes: 64,
        page_bytes: 1,
        latency_us: 0,
        ..SwapConfig::default()
    };
    let (c, reqs) = fault_workload();
    let c = SchedulerConfig { swap, ..c };
    let arrivals: Vec<Arrival> = reqs
        .iter()
        .enumerate()
        .map(|(i, (q, prm))| (i, q.clone(), prm.clone()))
        .collect();
    for ppu in [None, Some(1), Some(3)] {
        let (mut s, commit) = match ppu {
            Some(ppu) => growable(&c, ppu, None),
            None => growable(&c, c.num_pages, None),
        };
        let run = run_arrivals(&mut s, &arrivals);
        assert!(run.failed.is_empty());
        assert_outputs_match_solo_runs(&run, &arrivals);
        let st = s.stats().clone();
        assert!(st.num_swap_preemptions > 0, "{ppu:?}: {st:?}");
        assert_eq!(st.num_swap_resumes, st.num_swap_preemptions);
        assert_eq!(st.num_swap_in_pages, st.num_swap_out_pages);
        assert_balance_zero(&mut s, &commit);
    }
}
