//! Every view, rendered from every fixture trace at its busiest moment on
//! the software renderer (wgpu on Mesa lavapipe, `shared/HEADLESS.md`), is
//! compared with the PNG kept in `tests/snapshots/`. A trace dropped into
//! `tests/traces/` gets its own snapshots (`UPDATE_SNAPSHOTS=1` writes them).
//!
//! Tolerance: egui_kittest's per-pixel threshold 0.6 (weighted squared YIQ
//! distance, its default) and at most [`MAX_FAILED_PIXELS`] pixels over it;
//! lavapipe renders the same image bit for bit run after run, so the
//! budget is only for a text-antialiasing pixel or two.

use egui_kittest::{Harness, SnapshotOptions};
use pagoda_viewer::dashboard;
use pagoda_viewer::palette::Palette;
use pagoda_viewer::source::replay::Replay;
use pagoda_viewer::timeline::Timeline;
use pagoda_viewer::views::{
    ViewCtx, graphs, kv_grid, kv_units, memory_chart, pool_map, step_stats,
};

use crate::common::{MACHINE, peak_frame, stem, traces};

/// Pixels allowed over the threshold per image.
pub const MAX_FAILED_PIXELS: usize = 8;

type View = fn(&mut egui::Ui, &mut ViewCtx<'_>);

const VIEWS: [(&str, f32, f32, View); 7] = [
    ("dashboard", 1280.0, 800.0, |ui, v| dashboard::show(ui, v)),
    ("memory_chart", 640.0, 280.0, |ui, v| {
        memory_chart::show(ui, v, 240.0)
    }),
    ("step_stats", 480.0, 320.0, |ui, v| {
        step_stats::show(ui, v, 60.0)
    }),
    ("kv_grid", 640.0, 300.0, |ui, v| kv_grid::show(ui, v, 220.0)),
    ("kv_units", 480.0, 160.0, |ui, v| {
        kv_units::show(ui, v, 100.0)
    }),
    ("graphs", 480.0, 90.0, |ui, v| graphs::show(ui, v)),
    ("pool_map", 1000.0, 360.0, |ui, v| {
        pool_map::show(ui, v, 320.0)
    }),
];

fn render(
    tl: &Timeline,
    dark: bool,
    selected: Option<u64>,
    size: (f32, f32),
    view: View,
) -> Harness<'_> {
    let mut sel = selected;
    let mut h = Harness::builder()
        .with_size(egui::vec2(size.0, size.1))
        .with_theme(if dark {
            egui::Theme::Dark
        } else {
            egui::Theme::Light
        })
        .wgpu()
        .build_ui(move |ui| {
            let mut v = ViewCtx {
                timeline: tl,
                palette: Palette::new(dark),
                selected_seq: &mut sel,
            };
            view(ui, &mut v);
        });
    h.run();
    h
}

#[test]
fn every_view_of_every_trace_matches_its_snapshot() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let opts = SnapshotOptions::new()
        .threshold(0.6)
        .max_failed_pixels(MAX_FAILED_PIXELS);
    let mut failures = Vec::new();
    for path in traces() {
        let name = stem(&path);
        let mut r = Replay::open(&path).unwrap();
        let mut tl = Timeline::default();
        let peak = peak_frame(&r);
        r.seek(peak, &mut tl);
        let mut check = |snap: String, h: &mut Harness<'_>| {
            if let Err(e) = h.try_snapshot_options(&snap, &opts) {
                failures.push(format!("{snap}: {e}"));
            }
        };
        for (view, w, hgt, f) in VIEWS {
            let mut h = render(&tl, true, None, (w, hgt), f);
            check(format!("{name}_{view}"), &mut h);
        }
        let mut h = render(&tl, false, None, (1280.0, 800.0), VIEWS[0].3);
        check(format!("{name}_dashboard_light"), &mut h);
        // A selected sequence: its pages highlighted and joined in order.
        let first_owner = tl
            .state()
            .and_then(|s| s.kv_pages.iter().find_map(|p| p.owners.first().copied()));
        let mut h = render(&tl, true, first_owner, (640.0, 300.0), VIEWS[3].3);
        check(format!("{name}_kv_grid_selected"), &mut h);
    }
    assert!(
        failures.is_empty(),
        "snapshots differ:\n{}",
        failures.join("\n")
    );
}
