//! The numbers the viewer shows equal the trace's: every fixture trace is
//! played memory event by memory event (and scrubbed back and forth), and
//! at each one the step table, the KV grid's counts, the legend's bytes and
//! the pool map's counts on screen (read through the accessibility tree, as
//! a screen reader would) are compared with values computed here straight
//! from the JSON lines, with no code shared with the viewer's model.

use std::collections::BTreeMap;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use pagoda_viewer::palette::Palette;
use pagoda_viewer::source::replay::Replay;
use pagoda_viewer::timeline::Timeline;
use pagoda_viewer::units;
use pagoda_viewer::views::ViewCtx;
use serde_json::Value;

use crate::common::{MACHINE, stem, traces};

/// What the screen must say at one memory event.
#[derive(Debug, Clone)]
struct Expected {
    step_id: u64,
    texts: Vec<String>,
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Walks the raw events: the page map, the segments and the last step,
/// and writes down, per memory event, the texts the viewer must show.
fn expected(path: &std::path::Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut pages: Vec<Value> = Vec::new();
    let mut segs: BTreeMap<u64, Value> = BTreeMap::new();
    let mut last_step: Option<Value> = None;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ev: Value = serde_json::from_str(line).unwrap();
        let (totals, step_id) = match ev["type"].as_str().unwrap() {
            "step" => {
                last_step = Some(ev);
                continue;
            }
            "keyframe" => {
                let m = &ev["memory"];
                pages = m["kv_pages"].as_array().unwrap().clone();
                segs = m["segments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| (u(s, "id"), s.clone()))
                    .collect();
                (m["totals"].clone(), u(&ev, "step_id"))
            }
            "delta" => {
                for id in ev["removed_segments"].as_array().unwrap() {
                    segs.remove(&id.as_u64().unwrap());
                }
                for s in ev["segments"].as_array().unwrap() {
                    segs.insert(u(s, "id"), s.clone());
                }
                let n = u(&ev["totals"]["kv"], "num_pages") as usize;
                pages.resize(
                    n,
                    serde_json::json!({"refcount": 0, "cached": false, "tokens_used": 0}),
                );
                for p in ev["kv_pages"].as_array().unwrap() {
                    pages[u(p, "page") as usize] = p.clone();
                }
                (ev["totals"].clone(), u(&ev, "step_id"))
            }
            other => panic!("unknown event {other}"),
        };
        let mut texts = Vec::new();
        // The KV grid's heading.
        let used: Vec<&Value> = pages.iter().filter(|p| u(p, "refcount") > 0).collect();
        let shared = used.iter().filter(|p| u(p, "refcount") > 1).count();
        let cached_free = pages
            .iter()
            .filter(|p| u(p, "refcount") == 0 && p["cached"].as_bool().unwrap_or(false))
            .count();
        let tokens: u64 = used.iter().map(|p| u(p, "tokens_used")).sum();
        let ps = u(&totals["kv"], "page_size");
        let fill = if used.is_empty() {
            0.0
        } else {
            tokens as f64 / (used.len() as f64 * ps as f64)
        };
        let mut kv = format!(
            "{} of {} pages used ({:.1} %) · {ps} tokens/page · fill {:.1} % · shared {shared} · cached free {cached_free}",
            used.len(),
            pages.len(),
            used.len() as f64 * 100.0 / pages.len().max(1) as f64,
            fill * 100.0
        );
        let _ = &mut kv;
        texts.push(kv);
        // The legend: KV = page tables in the pool + the committed arena.
        let tag = |t: &str| {
            totals["pool"]["by_tag"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["tag"] == t)
                .map_or(0, |x| u(x, "allocated_bytes"))
        };
        texts.push(format!("weights {}", units::bytes(tag("weights"))));
        texts.push(format!("activations {}", units::bytes(tag("activations"))));
        texts.push(format!(
            "KV cache {}",
            units::bytes(tag("kv") + u(&totals["kv"], "committed_bytes"))
        ));
        // The pool map's heading starts with the counts.
        let blocks: usize = segs
            .values()
            .map(|s| s["blocks"].as_array().unwrap().len())
            .sum();
        texts.push(format!(
            "{} segments · {blocks} blocks · reserved {} · free {}",
            segs.len(),
            units::bytes(u(&totals["pool"], "reserved_bytes")),
            units::bytes(u(&totals["pool"], "free_bytes")),
        ));
        // The step table.
        if let Some(s) = &last_step {
            texts.push(u(s, "step_id").to_string());
            texts.push(format!(
                "{} ({} prefill, {} decode)",
                u(s, "num_tokens"),
                u(s, "num_prefill_tokens"),
                u(s, "num_decode_tokens")
            ));
            texts.push(format!(
                "{:.1}",
                u(s, "num_tokens") as f64 * 1e6 / u(s, "step_us") as f64
            ));
            texts.push(format!(
                "{} running · {} waiting · {} swapped",
                u(s, "num_running"),
                u(s, "num_waiting"),
                u(s, "num_swapped")
            ));
            texts.push(format!("{} of {}", u(s, "free_pages"), u(s, "num_pages")));
            let (hit, q) = (
                u(s, "total_prefix_cache_hit_tokens"),
                u(s, "total_prefix_cache_queried_tokens"),
            );
            if q > 0 {
                texts.push(format!(
                    "{:.1} % ({hit} of {q} tokens)",
                    hit as f64 * 100.0 / q as f64
                ));
            }
        }
        out.push(Expected { step_id, texts });
    }
    out
}

fn assert_shown(h: &Harness<'_, (Replay, Timeline)>, e: &Expected, how: &str) {
    for t in &e.texts {
        let found = h.query_all_by_label_contains(t).next().is_some();
        assert!(
            found,
            "{how}: at step {} the screen does not show {t:?}",
            e.step_id
        );
    }
}

#[test]
fn the_numbers_shown_are_the_traces_at_every_event() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    for path in traces() {
        let want = expected(&path);
        let mut r = Replay::open(&path).unwrap();
        r.playing = false;
        let mut tl = Timeline::default();
        r.seek(0, &mut tl);
        assert_eq!(
            want.len(),
            r.frames().len(),
            "{}: memory events",
            stem(&path)
        );
        let mut h = Harness::builder()
            .with_size(egui::vec2(1280.0, 1600.0))
            .build_ui_state(
                |ui, (_, tl): &mut (Replay, Timeline)| {
                    let mut sel = None;
                    let mut v = ViewCtx {
                        timeline: tl,
                        palette: Palette::new(true),
                        selected_seq: &mut sel,
                    };
                    pagoda_viewer::dashboard::show(ui, &mut v);
                },
                (r, tl),
            );
        h.run();
        // Played forward one event at a time, as a live viewer gets them.
        for (i, e) in want.iter().enumerate() {
            if i > 0 {
                let (r, tl) = h.state_mut();
                r.step_by(1, tl);
                h.run();
            }
            assert_eq!(h.state().1.state_step(), e.step_id);
            assert_shown(&h, e, "playing");
        }
        // Scrubbed: back to the middle, to the start, to the end.
        for i in [want.len() / 2, 0, want.len() - 1, want.len() / 3] {
            let (r, tl) = h.state_mut();
            r.seek(i, tl);
            h.run();
            assert_shown(&h, &want[i], "after a seek");
        }
    }
}
