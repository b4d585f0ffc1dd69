//! The memory views laid out together: the tag legend, memory over time
//! beside the step statistics, the KV grid beside KV commitment and graphs,
//! the pool map across the bottom. Sized from the space given, so 1280×800
//! shows everything and larger windows give the views more room.

use crate::views::{
    ViewCtx, graphs, kv_grid, kv_units, legend, memory_chart, pool_map, step_stats,
};

/// Draws every view into `ui`.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>) {
    let h = ui.available_height().max(500.0);
    if v.timeline.is_stale() {
        ui.colored_label(
            v.palette.budget_line(),
            "telemetry events were lost: the memory views wait for the next keyframe",
        );
    }
    legend::show(ui, v);
    ui.separator();
    let top_h = (h * 0.30).clamp(150.0, 320.0);
    ui.columns(2, |cols| {
        memory_chart::show(&mut cols[0], v, top_h - 20.0);
        step_stats::show(&mut cols[1], v, (top_h - 210.0).max(36.0));
    });
    ui.separator();
    let mid_h = (h * 0.34).clamp(140.0, 420.0);
    ui.columns(2, |cols| {
        kv_grid::show(&mut cols[0], v, mid_h - 40.0);
        kv_units::show(&mut cols[1], v, (mid_h - 120.0).max(40.0));
        cols[1].separator();
        graphs::show(&mut cols[1], v);
    });
    ui.separator();
    let rest = ui.available_height().max(80.0);
    pool_map::show(ui, v, rest - 24.0);
}
