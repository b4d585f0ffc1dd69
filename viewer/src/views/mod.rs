//! The memory views. Each is one function `show(ui, &mut ViewCtx)` that
//! draws from the [`Timeline`] alone (so a live engine, an attached server
//! and a replay draw the same), in the space the caller gives it.
//!
//! Views paint with one mesh per layer, never one widget per cell or block,
//! and aggregate what would be smaller than a few pixels (pages into cells,
//! blocks into pixel columns), so the cost of a frame follows the screen,
//! not the size of the memory (the benchmark in `benches/` holds it under
//! 16 ms for 100,000 pages and 5,000 blocks).

pub mod graphs;
pub mod kv_grid;
pub mod kv_units;
pub mod legend;
pub mod memory_chart;
pub mod pool_map;
pub mod step_stats;

use crate::palette::Palette;
use crate::timeline::Timeline;

/// What every view needs: the data, the colours, and the one piece of
/// state views share (the selected sequence).
#[derive(Debug)]
pub struct ViewCtx<'a> {
    /// The data.
    pub timeline: &'a Timeline,
    /// The colours.
    pub palette: Palette,
    /// The sequence whose pages are highlighted (a click on the KV grid,
    /// its legend or a chat tab).
    pub selected_seq: &'a mut Option<u64>,
}

/// A view's heading: a strong title and a weak line of context.
pub fn heading(ui: &mut egui::Ui, title: &str, context: &str) {
    ui.horizontal(|ui| {
        ui.strong(title);
        if !context.is_empty() {
            ui.weak(context);
        }
    });
}

/// Draws `text` in a small chip of `color` (legends).
pub fn swatch(ui: &mut egui::Ui, color: egui::Color32, text: &str) -> egui::Response {
    ui.horizontal(|ui| {
        let (r, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
        ui.painter().rect_filled(r, 2.0, color);
        ui.label(text)
    })
    .inner
}
