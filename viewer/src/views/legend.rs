//! The tag legend: one colour per pool tag with the bytes it holds now, the
//! same colours as every chart and the pool map. KV counts the KV arena's
//! committed bytes (outside the pool) and its page tables (pool blocks).

use crate::palette::TAG_LEGEND;
use crate::timeline::tag_bytes;
use crate::units;
use crate::views::{ViewCtx, swatch};

/// Draws the legend in one wrapped row.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>) {
    let totals = v.timeline.state().map(|s| &s.totals);
    ui.horizontal_wrapped(|ui| {
        for (tag, name) in TAG_LEGEND {
            let bytes = totals.map_or(0, |t| tag_bytes(t, tag));
            swatch(
                ui,
                v.palette.tag(tag),
                &format!("{name} {}", units::bytes(bytes)),
            );
        }
        let free = totals.map_or(0, |t| t.pool.free_bytes);
        swatch(
            ui,
            v.palette.free(),
            &format!("free in pool {}", units::bytes(free)),
        );
    });
}
