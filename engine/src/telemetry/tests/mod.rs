//! Tests of the publisher (policy, never blocking), of reconstruction on a
//! real engine over a synthetic model, of the delta's cost, and of trace
//! replay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use pagoda_cpu::CpuBackend;

use super::trace::Trace;
use super::*;
use crate::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
use crate::sampler::SamplingParams;
use crate::{Engine, EngineConfig, GenerationParams, SeqId};

fn stats(step: u64) -> StepStats {
    StepStats {
        step_id: step,
        t_us: 0,
        batch_size: 1,
        num_tokens: 1,
        num_prefill_tokens: 0,
        num_decode_tokens: 1,
        schedule_us: 1,
        forward_us: 1,
        step_us: 2,
        total_preemptions: 0,
        total_prefix_cache_hit_tokens: 0,
        num_waiting: 0,
        num_running: 1,
        free_pages: 1,
        num_pages: 2,
        total_prefix_cache_queried_tokens: 0,
        total_swap_preemptions: 0,
        total_swap_out_pages: 0,
        total_swap_in_pages: 0,
        num_swapped: 0,
    }
}

fn empty_totals(free_pages: u64) -> MemoryTotals {
    MemoryTotals {
        device_total_bytes: 0,
        device_free_bytes: 0,
        pool: PoolTotals::from_stats(&pagoda_backend::PoolStats::default()),
        kv: KvTotals {
            num_pages: 2,
            free_pages,
            page_size: 16,
            page_bytes: 0,
            num_pieces: 1,
            reserved_bytes: 0,
            committed_bytes: 0,
            num_units: 0,
            committed_units: 0,
            pages_per_unit: 0,
        },
        graphs: GraphTotals::default(),
        host_swap_bytes: 0,
    }
}

/// A memory source whose state is a counter in `kv.free_pages`; counts its calls.
#[derive(Default)]
struct Fake {
    value: u64,
    captures: std::cell::Cell<usize>,
    changes: usize,
}

impl MemorySource for Fake {
    fn capture(&self) -> MemoryState {
        self.captures.set(self.captures.get() + 1);
        MemoryState {
            totals: empty_totals(self.value),
            plan: PlanLines::default(),
            segments: vec![],
            kv_pages: vec![],
        }
    }
    fn changes(&mut self, _base: &mut Baseline) -> MemoryChanges {
        self.changes += 1;
        MemoryChanges {
            totals: empty_totals(self.value),
            segments: vec![],
            removed_segments: vec![],
            kv_pages: vec![],
            cost: DeltaCost::default(),
        }
    }
}

/// The kinds of the events received: `s`tep, `K`eyframe, `d`elta.
fn kinds(rx: &Receiver<TelemetryEvent>) -> String {
    rx.try_iter()
        .map(|e| match e {
            TelemetryEvent::Step(_) => 's',
            TelemetryEvent::Keyframe(_) => 'K',
            TelemetryEvent::Delta(_) => 'd',
        })
        .collect()
}

#[test]
fn a_slow_subscriber_never_blocks_the_engine() {
    let mut t = Telemetry::new();
    let rx = t.subscribe(2, false);
    let mut fake = Fake::default();
    for i in 0..100 {
        t.publish_step(stats(i), &mut fake);
    }
    // No memory state is built when nobody asked for it.
    assert_eq!((fake.captures.get(), fake.changes), (0, 0));
    assert_eq!(
        t.dropped, 98,
        "events beyond the channel's capacity are dropped"
    );
    let got: Vec<_> = rx.try_iter().collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].step_id(), 0);
    // A disconnected subscriber is forgotten.
    drop(rx);
    t.publish_step(stats(100), &mut fake);
    assert!(t.subscribers.is_empty());
}

#[test]
fn keyframe_first_then_deltas_then_a_keyframe_every_n_events() {
    let mut t = Telemetry::new();
    t.set_keyframe_interval(4);
    let a = t.subscribe(1000, true);
    let mut fake = Fake::default();
    for i in 1..=9 {
        fake.value = i;
        t.publish_step(stats(i * 10), &mut fake);
        if i == 6 {
            // A late subscriber starts with a keyframe, the others go on with deltas.
            let late = t.subscribe(1000, true);
            t.publish_step(stats(65), &mut fake);
            assert_eq!(kinds(&late), "sK");
        }
    }
    assert_eq!(kinds(&a), "sKsdsdsdsKsdsdsdsKsd");
    assert_eq!(fake.changes, 10);
    // One capture per keyframe event: three for everyone, one for the late one.
    assert_eq!(fake.captures.get(), 4);
}

#[test]
fn subscribe_now_sends_a_keyframe_at_once_that_the_next_delta_follows() {
    let mut t = Telemetry::new();
    let mut fake = Fake::default();
    // Before any memory event: a keyframe of step 0.
    let first = t.subscribe_now(100, true, &fake);
    let got: Vec<_> = first.try_iter().collect();
    assert!(matches!(&got[..], [TelemetryEvent::Keyframe(k)] if k.step_id == 0));
    for i in 1..=3 {
        fake.value = i;
        t.publish_step(stats(i), &mut fake);
    }
    // The state changes between steps, then a viewer connects.
    fake.value = 7;
    let late = t.subscribe_now(100, true, &fake);
    fake.value = 8;
    t.publish_step(stats(4), &mut fake);
    let mut trace = Trace::default();
    for ev in late.try_iter() {
        trace.push(ev).unwrap();
    }
    let k: Vec<_> = trace.events().iter().map(TelemetryEvent::step_id).collect();
    assert_eq!(
        k,
        vec![3, 4, 4],
        "keyframe at the last memory step, then step 4's events"
    );
    assert!(matches!(trace.events()[2], TelemetryEvent::Delta(_)));
    let states = trace.replay().expect("the delta follows the keyframe");
    assert_eq!(states[0].1.totals.kv.free_pages, 7);
    assert_eq!(states.last().unwrap().1.totals.kv.free_pages, 8);
    // Without memory events: nothing at once.
    assert_eq!(kinds(&t.subscribe_now(10, false, &fake)), "");
}

#[test]
fn a_subscriber_that_dropped_a_memory_event_gets_a_keyframe_next() {
    let mut t = Telemetry::new();
    t.set_keyframe_interval(1000);
    let slow = t.subscribe(3, true);
    let mut fake = Fake::default();
    let mut trace = Trace::default();
    for i in 1..=20 {
        fake.value = i;
        t.publish_step(stats(i), &mut fake);
        if i % 5 == 0 {
            let evs: Vec<_> = slow.try_iter().collect();
            // Whatever arrived replays without a gap.
            for ev in evs {
                trace.push(ev).unwrap();
            }
            let states = trace.replay().expect("no gap after a drop");
            let (step, last) = states.last().unwrap();
            assert_eq!(last.totals.kv.free_pages, *step);
        }
    }
    assert!(t.dropped > 0);
    let keys = trace
        .events()
        .iter()
        .filter(|e| matches!(e, TelemetryEvent::Keyframe(_)))
        .count();
    assert!(keys > 1, "a keyframe after each overflow, got {keys}");
}

// --- on a real engine --------------------------------------------------------

/// The synthetic tiny model, written once per test process (tests run in
/// parallel: none may read it half-written).
fn tiny_model() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pagoda-telemetry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tiny.gguf");
        write_synthetic_gguf(&SyntheticSpec::tiny(), &path).expect("writes");
        path
    })
    .clone()
}

fn engine(path: &Path, num_pages: usize, page_size: usize) -> Engine<CpuBackend> {
    Engine::builder()
        .model(path)
        .backend(Arc::new(CpuBackend::new(1).expect("cpu backend")))
        .config(EngineConfig {
            ctx: Some(64),
            max_seqs: Some(4),
            page_size,
            num_pages: Some(num_pages),
            max_num_batched_tokens: 48,
            faults: pagoda_backend::FaultInjector::new(),
            ..EngineConfig::default()
        })
        .build()
        .expect("engine builds")
}

fn params(max_tokens: usize, seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams {
            seed,
            ..SamplingParams::default()
        },
        ignore_eog: true,
        ..GenerationParams::default()
    }
}

/// Device free memory is a live reading of host RAM: two reads differ.
fn without_live_readings(mut m: MemoryState) -> MemoryState {
    assert!(m.totals.device_total_bytes > 0);
    m.totals.device_free_bytes = 0;
    m
}

/// A viewer that subscribes between steps, after an abort and a removal
/// changed pages and pool blocks since the last memory event, replays to
/// the full capture at every later step.
#[test]
fn a_keyframe_sent_at_subscription_is_followed_by_the_next_deltas() {
    let path = tiny_model();
    let mut e = engine(&path, 16, 4);
    let ids: Vec<SeqId> = (0..3u32)
        .map(|i| {
            e.add_request((10..20 + i).collect(), params(20, i as u64))
                .unwrap()
        })
        .collect();
    let _warm = e.telemetry().subscribe(1 << 10, true);
    for _ in 0..3 {
        e.step().unwrap();
    }
    // Between steps: an abort frees pages, removal drops the request.
    e.abort(ids[0]).unwrap();
    e.remove_finished();
    let late = e.subscribe_telemetry_now(1 << 16, true);
    let at_once = without_live_readings(e.memory_state());
    let mut trace = Trace::default();
    for ev in late.try_iter() {
        trace.push(ev).unwrap();
    }
    let (_, first) = trace.replay().unwrap().pop().expect("a keyframe at once");
    assert_eq!(without_live_readings(first), at_once);
    while e.has_unfinished() {
        e.step().unwrap();
        for ev in late.try_iter() {
            trace.push(ev).unwrap();
        }
        let (_, replayed) = trace.replay().expect("no gap").pop().unwrap();
        assert_eq!(
            without_live_readings(replayed),
            without_live_readings(e.memory_state())
        );
    }
}

/// Pins the invariant: for every subscriber (from the start, late, slow),
/// keyframe + deltas equal a full capture at every step, on a run with
/// shared prefixes, preemption and an abort; the trace of the first replays
/// to the same states, by seeking to any step.
#[test]
fn keyframe_plus_deltas_equal_a_full_capture_at_every_step() {
    let path = tiny_model();
    // 16 pages of 4 tokens: four requests of up to 46 tokens must preempt.
    let mut e = engine(&path, 16, 4);
    e.telemetry().set_keyframe_interval(7);
    let first = e.telemetry().subscribe(1 << 16, true);
    let no_memory = e.telemetry().subscribe(1 << 16, false);
    let shared: Vec<u32> = (10..22).collect();
    for i in 0..4u32 {
        let mut prompt = shared.clone();
        prompt.extend((0..4 + i).map(|t| 100 + t * 3 + i));
        e.add_request(prompt, params(26 + 2 * i as usize, i as u64))
            .unwrap();
    }
    let mut late: Option<Receiver<TelemetryEvent>> = None;
    let mut slow: Option<Receiver<TelemetryEvent>> = None;
    let (mut t_first, mut t_late, mut t_slow) =
        (Trace::default(), Trace::default(), Trace::default());
    let mut truth: Vec<(u64, MemoryState)> = Vec::new();
    let (mut saw_shared, mut saw_cached_free) = (false, false);
    let mut step = 0;
    while e.has_unfinished() {
        e.step().unwrap();
        step += 1;
        let full = e.memory_state();
        saw_shared |= full.kv_pages.iter().any(|p| p.shared);
        saw_cached_free |= full.kv_pages.iter().any(|p| p.cached && p.refcount == 0);
        let step_id = e.scheduler().stats().num_steps;
        truth.push((step_id, full.clone()));
        let full = without_live_readings(full);
        for ev in first.try_iter() {
            t_first.push(ev).unwrap();
        }
        let (_, got) = t_first.replay().unwrap().pop().expect("a memory event");
        assert_eq!(
            without_live_readings(got),
            full,
            "first subscriber, step {step_id}"
        );
        if let Some(rx) = &late {
            for ev in rx.try_iter() {
                t_late.push(ev).unwrap();
            }
            let (_, got) = t_late.replay().unwrap().pop().expect("a keyframe first");
            assert_eq!(
                without_live_readings(got),
                full,
                "late subscriber, step {step_id}"
            );
        }
        // The slow one reads now and then, losing events in between.
        if let Some(rx) = slow.as_ref().filter(|_| step % 4 == 0) {
            for ev in rx.try_iter() {
                t_slow.push(ev).unwrap();
            }
        }
        assert!(
            no_memory
                .try_iter()
                .all(|e| matches!(e, TelemetryEvent::Step(_)))
        );
        // Between steps (the next delta carries these changes).
        if step == 8 {
            let id = e.scheduler().running_ids()[0];
            e.abort(id).unwrap();
            // A request arriving later shares the cached prefix.
            e.add_request(shared.clone(), params(5, 9)).unwrap();
        }
        if step == 3 {
            late = Some(e.telemetry().subscribe(1 << 16, true));
            slow = Some(e.telemetry().subscribe(2, true));
        }
    }
    assert!(
        e.scheduler().stats().num_preemptions > 0,
        "the run must preempt"
    );
    assert!(
        saw_shared && saw_cached_free,
        "the run must share and cache pages"
    );
    assert!(e.telemetry().dropped > 0, "the slow subscriber lost events");
    // The slow subscriber's events still replay without a gap.
    assert!(!t_slow.replay().unwrap().is_empty());
    let late_first = t_late
        .events()
        .iter()
        .find(|e| !matches!(e, TelemetryEvent::Step(_)));
    assert!(matches!(late_first, Some(TelemetryEvent::Keyframe(_))));

    // Every event carries a step id; steps increase.
    let ids: Vec<u64> = t_first.steps().map(|s| s.step_id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(t_first.memory_steps(), ids);

    // Written as JSON lines and read back, the trace replays to the same
    // states, seeking to every step from its nearest keyframe.
    let mut text = Vec::new();
    for ev in t_first.events() {
        serde_json::to_writer(&mut text, ev).unwrap();
        text.push(b'\n');
    }
    let read = Trace::read(&text[..]).unwrap();
    assert_eq!(read, t_first);
    let keys = read
        .events()
        .iter()
        .filter(|e| matches!(e, TelemetryEvent::Keyframe(_)))
        .count();
    assert!(
        keys >= 3 && keys < ids.len(),
        "keyframes every 7 events: {keys}"
    );
    for (step_id, full) in &truth {
        let got = read.memory_at(*step_id).unwrap().expect("state");
        assert_eq!(
            without_live_readings(got),
            without_live_readings(full.clone()),
            "seek to step {step_id}"
        );
    }
    assert_eq!(
        read.memory_at(0).unwrap(),
        None,
        "nothing before the first step"
    );
}

#[test]
fn a_missing_delta_is_a_gap_not_a_wrong_state() {
    let path = tiny_model();
    let mut e = engine(&path, 32, 4);
    let rx = e.telemetry().subscribe(1 << 10, true);
    e.add_request((1..20).collect(), params(6, 0)).unwrap();
    while e.has_unfinished() {
        e.step().unwrap();
    }
    let mut lines: Vec<String> = rx
        .try_iter()
        .map(|ev| serde_json::to_string(&ev).unwrap())
        .collect();
    let is_delta = |l: &String| l.contains(r#""type":"delta""#);
    let first_delta = lines.iter().position(is_delta).expect("deltas");
    lines.remove(first_delta);
    assert!(
        lines[first_delta..].iter().any(is_delta),
        "a delta after the lost one"
    );
    let trace = Trace::read(lines.join("\n").as_bytes()).unwrap();
    assert!(matches!(trace.replay(), Err(ReplayError::Gap { .. })));
    // A keyframe of another schema is refused.
    let other = lines[1].replace(SCHEMA, "pagoda-trace/999");
    assert!(Trace::read(other.as_bytes()).is_err());
}

/// The delta after a decode step reads only what changed: no pool block
/// (nothing was allocated) and about one page per decoding sequence, out of
/// hundreds of blocks and pages.
#[test]
fn a_decode_step_delta_touches_only_changed_pages_and_segments() {
    let path = tiny_model();
    let mut e = engine(&path, 512, 4);
    let rx = e.telemetry().subscribe(1 << 16, true);
    for i in 0..3u32 {
        e.add_request((1..30).map(|t| t + i).collect(), params(20, i as u64))
            .unwrap();
    }
    let mut decode_deltas = 0;
    while e.has_unfinished() {
        e.step().unwrap();
        let st = e.scheduler().stats().num_steps;
        let cost = e
            .telemetry()
            .last_delta_cost()
            .expect("a delta was computed");
        let evs: Vec<_> = rx.try_iter().collect();
        let Some(TelemetryEvent::Step(s)) = evs.first() else {
            panic!("a step event first");
        };
        // A pure decode step in which nobody finished (finishing frees pages).
        if st > 1 && s.num_prefill_tokens == 0 && s.num_running == s.batch_size {
            decode_deltas += 1;
            assert_eq!(cost.blocks_visited, 0, "step {st}: no pool change");
            assert!(
                cost.pages_visited <= 2 * s.batch_size,
                "step {st}: {} pages read for {} sequences",
                cost.pages_visited,
                s.batch_size
            );
            let Some(TelemetryEvent::Delta(d)) = evs.get(1) else {
                panic!("a delta after a decode step");
            };
            assert!(d.segments.is_empty() && d.kv_pages.len() == cost.pages_visited);
        }
    }
    assert!(decode_deltas >= 10);
    let full = e.memory_state();
    let blocks: usize = full.segments.iter().map(|s| s.blocks.len()).sum();
    assert!(blocks > 40 && full.kv_pages.len() == 512);
}

/// Labels, base addresses, page locations and totals reach the state.
#[test]
fn the_state_names_blocks_and_places_pages() {
    let path = tiny_model();
    let e = engine(&path, 16, 4);
    let m = e.memory_state();
    let labels: Vec<&str> = m
        .segments
        .iter()
        .flat_map(|s| s.blocks.iter().map(|b| b.label.as_str()))
        .collect();
    for want in [
        "blk.1.attn_q.weight",
        "kv.layer.1.page_table",
        "ws.logits",
        "token_embd.weight",
    ] {
        assert!(
            labels.contains(&want),
            "no block labelled {want}: {labels:?}"
        );
    }
    assert!(m.segments.iter().all(|s| s.base_addr != 0));
    let plan = e.memory_plan();
    assert_eq!(m.plan.kv_bytes, plan.kv_bytes);
    // The arena's reservation (outside the pool) plus the page tables make the plan's KV.
    let kv_tables = m.totals.pool.tag(MemoryTag::Kv).unwrap().requested_bytes;
    assert_eq!(m.totals.kv.reserved_bytes + kv_tables, plan.kv_bytes);
    // Everything is committed while the block manager does not grow.
    assert_eq!(m.totals.kv.committed_bytes, m.totals.kv.reserved_bytes);
    assert_eq!(m.totals.kv.num_pages, 16);
    assert_eq!(m.totals.kv.num_pieces, 1);
    let pb = e.runner().kv_layout().page_bytes() as u64;
    for p in &m.kv_pages {
        assert_eq!((p.piece, p.offset_bytes), (0, p.page as u64 * pb));
    }
    assert_eq!(m.totals.graphs, GraphTotals::default());
    let w = m.totals.pool.tag(MemoryTag::Weights).unwrap();
    assert_eq!(w.requested_bytes, plan.weights_bytes);
    assert!(w.live_blocks > 10);
    assert!(m.totals.pool.peak_allocated_bytes >= m.totals.pool.allocated_bytes);
}

/// One request of a random workload.
#[derive(Debug, Clone)]
struct Req {
    arrive: usize,
    shared_prefix: bool,
    suffix: Vec<u32>,
    max_tokens: usize,
    abort_after: Option<usize>,
}

fn req_strategy() -> impl proptest::strategy::Strategy<Value = Req> {
    use proptest::prelude::*;
    (
        0usize..6,
        any::<bool>(),
        prop::collection::vec(1u32..290, 1..20),
        1usize..24,
        prop::option::weighted(0.2, 0usize..6),
    )
        .prop_map(
            |(arrive, shared_prefix, suffix, max_tokens, abort_after)| Req {
                arrive,
                shared_prefix,
                suffix,
                max_tokens,
                abort_after,
            },
        )
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Random arrivals, shared prefixes, aborts, page counts, keyframe
    /// intervals and channel sizes: every subscriber's replay equals a full
    /// capture whenever it has read everything sent to it.
    #[test]
    fn random_workloads_replay_to_full_captures(
        reqs in proptest::collection::vec(req_strategy(), 1..7),
        num_pages in 16usize..40,
        interval in 1u64..9,
        slow_capacity in 2usize..12,
    ) {
        let path = tiny_model();
        let mut e = engine(&path, num_pages, 4);
        e.telemetry().set_keyframe_interval(interval);
        let fast = e.telemetry().subscribe(1 << 16, true);
        let slow = e.telemetry().subscribe(slow_capacity, true);
        let (mut t_fast, mut t_slow) = (Trace::default(), Trace::default());
        let prefix: Vec<u32> = (30..42).collect();
        let mut pending: Vec<&Req> = reqs.iter().collect();
        let mut aborts: Vec<(usize, SeqId)> = Vec::new();
        let mut step = 0;
        while e.has_unfinished() || !pending.is_empty() {
            pending.retain(|q| {
                if q.arrive > step {
                    return true;
                }
                let mut prompt = if q.shared_prefix { prefix.clone() } else { vec![] };
                prompt.extend(&q.suffix);
                let id = e.add_request(prompt, params(q.max_tokens, step as u64)).unwrap();
                if let Some(a) = q.abort_after {
                    aborts.push((step + a, id));
                }
                false
            });
            for &(at, id) in &aborts {
                if at == step {
                    let _ = e.abort(id);
                }
            }
            if e.has_unfinished() {
                e.step().unwrap();
            }
            step += 1;
            proptest::prop_assert!(step < 2000, "no progress");
            let full = without_live_readings(e.memory_state());
            let mut published = false;
            for ev in fast.try_iter() {
                t_fast.push(ev).unwrap();
                published = true;
            }
            // (Aborts and arrivals change pages between steps: compare only
            // right after a step published.)
            if published {
                let (_, got) = t_fast.replay().unwrap().pop().expect("a memory event");
                proptest::prop_assert_eq!(&without_live_readings(got), &full);
            }
            if step % 3 == 0 {
                for ev in slow.try_iter() {
                    t_slow.push(ev).unwrap();
                }
            }
        }
        // Whatever the slow subscriber got replays without a gap.
        t_slow.replay().unwrap();
    }
}
