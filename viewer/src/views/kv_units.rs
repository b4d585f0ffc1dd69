//! KV reservation vs commitment: the address space reserved for KV pages
//! and the part backed by memory (VMM-mapped chunks on CUDA, committed
//! granules on the CPU), now as a row of commit units, and over time as two
//! lines, so growth under load and shrinking after it are seen.

use egui::{Mesh, Rect, Sense, Shape, Stroke, pos2, vec2};

use crate::units;
use crate::views::{ViewCtx, heading};

/// Draws the view: the units row and a chart of `chart_height` points.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>, chart_height: f32) {
    let Some(state) = v.timeline.state() else {
        heading(
            ui,
            "KV reserved vs committed",
            "waiting for the first memory event",
        );
        return;
    };
    let kv = &state.totals.kv;
    let pal = v.palette;
    let units_text = if kv.num_units > 0 {
        format!(
            " · {} of {} units ({} pages each)",
            kv.committed_units, kv.num_units, kv.pages_per_unit
        )
    } else {
        String::new()
    };
    heading(
        ui,
        "KV reserved vs committed",
        &format!(
            "committed {} of {} reserved{units_text}",
            units::bytes(kv.committed_bytes),
            units::bytes(kv.reserved_bytes)
        ),
    );
    let width = ui.available_width();
    // The units row: one box per unit, filled when committed.
    let (rect, resp) = ui.allocate_exact_size(vec2(width, 14.0), Sense::hover());
    let painter = ui.painter_at(rect);
    let mut mesh = Mesh::default();
    let kv_color = pal.tag("kv");
    if kv.num_units > 0 {
        let n = kv.num_units as usize;
        let w = rect.width() / n as f32;
        // Units commit lowest first, so the committed count fills from the left.
        for u in 0..n {
            let r = Rect::from_min_size(
                pos2(rect.left() + u as f32 * w, rect.top()),
                vec2((w - 1.0).max(0.5), rect.height()),
            );
            let c = if (u as u64) < kv.committed_units {
                kv_color
            } else {
                pal.free()
            };
            mesh.add_colored_rect(r, c);
        }
    } else if kv.reserved_bytes > 0 {
        let f = kv.committed_bytes as f32 / kv.reserved_bytes as f32;
        mesh.add_colored_rect(rect, pal.free());
        mesh.add_colored_rect(
            Rect::from_min_max(
                rect.min,
                pos2(rect.left() + rect.width() * f, rect.bottom()),
            ),
            kv_color,
        );
    }
    painter.add(Shape::mesh(mesh));
    resp.on_hover_text(format!(
        "reserved {} · committed {} ({})",
        units::bytes(kv.reserved_bytes),
        units::bytes(kv.committed_bytes),
        units::percent(kv.committed_bytes as f64 / kv.reserved_bytes.max(1) as f64)
    ));
    // Over time.
    let hist = v.timeline.memory_history();
    let (rect, _) = ui.allocate_exact_size(vec2(width, chart_height), Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_stroke(
        rect,
        0.0,
        Stroke::new(1.0, pal.grid()),
        egui::StrokeKind::Inside,
    );
    if hist.len() < 2 {
        return;
    }
    let ymax = hist
        .iter()
        .map(|s| s.kv_reserved_bytes.max(s.kv_committed_bytes))
        .max()
        .unwrap_or(1)
        .max(1) as f32
        * 1.1;
    let t0 = hist.front().map_or(0, |s| s.t_us);
    let t1 = hist.back().map_or(1, |s| s.t_us).max(t0 + 1);
    let x = |t: u64| rect.left() + (t - t0) as f32 / (t1 - t0) as f32 * rect.width();
    let y = |b: u64| rect.bottom() - b as f32 / ymax * rect.height();
    let stride = (hist.len() as f32 / rect.width().max(1.0)).ceil().max(1.0) as usize;
    let pts = |f: &dyn Fn(&crate::timeline::MemorySample) -> u64| -> Vec<egui::Pos2> {
        hist.iter()
            .enumerate()
            .filter(|(i, _)| i % stride == 0 || *i + 1 == hist.len())
            .map(|(_, s)| pos2(x(s.t_us), y(f(s))))
            .collect()
    };
    painter.add(Shape::line(
        pts(&|s| s.kv_reserved_bytes),
        Stroke::new(1.2, pal.reserved_line()),
    ));
    painter.add(Shape::line(
        pts(&|s| s.kv_committed_bytes),
        Stroke::new(2.0, kv_color),
    ));
    let font = egui::FontId::proportional(10.0);
    painter.text(
        rect.left_top() + vec2(4.0, 2.0),
        egui::Align2::LEFT_TOP,
        "line: reserved",
        font.clone(),
        pal.reserved_line(),
    );
    painter.text(
        rect.left_top() + vec2(90.0, 2.0),
        egui::Align2::LEFT_TOP,
        "line: committed",
        font,
        kv_color,
    );
}
