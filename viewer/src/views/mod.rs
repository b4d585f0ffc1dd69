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
/// Wraps within the space given (a long context never widens a column).
pub fn heading(ui: &mut egui::Ui, title: &str, context: &str) {
    ui.horizontal_wrapped(|ui| {
        ui.strong(title);
        if !context.is_empty() {
            ui.weak(context);
        }
    });
}

/// A colour chip and its text as one widget (so a wrapped row never puts
/// the chip on one line and its text on the next), selectable when
/// `selected` is given; labelled for screen readers with `text`.
pub fn swatch_item(
    ui: &mut egui::Ui,
    color: egui::Color32,
    text: &str,
    selected: Option<bool>,
) -> egui::Response {
    let font = egui::TextStyle::Body.resolve(ui.style());
    let text_color = ui.visuals().text_color();
    let galley = ui
        .painter()
        .layout_no_wrap(text.to_string(), font, text_color);
    let pad = egui::vec2(4.0, 2.0);
    let size = egui::vec2(12.0 + 6.0 + galley.size().x, galley.size().y.max(12.0)) + pad * 2.0;
    let sense = if selected.is_some() {
        egui::Sense::click()
    } else {
        egui::Sense::hover()
    };
    let (rect, resp) = ui.allocate_exact_size(size, sense);
    resp.widget_info(|| match selected {
        Some(on) => egui::WidgetInfo::selected(egui::Role::Button, true, on, text),
        None => egui::WidgetInfo::labeled(egui::Role::Label, true, text),
    });
    if ui.is_rect_visible(rect) {
        if selected == Some(true) {
            ui.painter()
                .rect_filled(rect, 3.0, ui.visuals().selection.bg_fill);
        } else if selected.is_some() && resp.hovered() {
            ui.painter()
                .rect_filled(rect, 3.0, ui.visuals().widgets.hovered.weak_bg_fill);
        }
        let chip = egui::Rect::from_min_size(
            egui::pos2(rect.left() + pad.x, rect.center().y - 6.0),
            egui::vec2(12.0, 12.0),
        );
        ui.painter().rect_filled(chip, 2.0, color);
        ui.painter().galley(
            egui::pos2(chip.right() + 6.0, rect.center().y - galley.size().y / 2.0),
            galley,
            text_color,
        );
    }
    resp
}

/// Draws `text` after a small chip of `color` (legends).
pub fn swatch(ui: &mut egui::Ui, color: egui::Color32, text: &str) -> egui::Response {
    swatch_item(ui, color, text, None)
}
