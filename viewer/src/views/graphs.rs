//! Captured graphs (CUDA graphs): how many, for which padded decode batch
//! sizes, and the memory their pool holds.

use crate::units;
use crate::views::{ViewCtx, heading};

/// Draws the view.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>) {
    let Some(state) = v.timeline.state() else {
        heading(ui, "Graphs", "waiting for the first memory event");
        return;
    };
    let g = &state.totals.graphs;
    heading(
        ui,
        "Graphs",
        &format!("{} captured · {}", g.count, units::bytes(g.bytes)),
    );
    ui.horizontal_wrapped(|ui| {
        if g.count == 0 {
            ui.weak("none captured (this backend runs each step directly)");
        } else if g.batch_sizes.is_empty() {
            ui.weak("batch sizes not in this trace");
        } else {
            ui.label("batch sizes:");
            for b in &g.batch_sizes {
                egui::Frame::new()
                    .fill(v.palette.tag("graph"))
                    .corner_radius(3.0)
                    .inner_margin(egui::Margin::symmetric(4, 1))
                    .show(ui, |ui| {
                        ui.colored_label(egui::Color32::WHITE, b.to_string());
                    });
            }
        }
    });
    if state.plan.graph_bytes > 0 {
        ui.weak(format!("planned {}", units::bytes(state.plan.graph_bytes)));
    }
}
