//! Step statistics: the last step's batch, tokens, throughput and time,
//! the queues, preemptions and swaps, and the prefix-cache hit rate, with
//! a strip of batch size and step time over the history.
//!
//! Every number comes from the last `step` event the timeline holds
//! ([`readout`]); nothing is smoothed or estimated, so what is shown is
//! what the trace says (a test replays a trace and compares).

use egui::{Sense, Shape, Stroke, pos2, vec2};
use pagoda::telemetry::StepStats;

use crate::units;
use crate::views::{ViewCtx, heading};

/// The rows the view shows: (name, value).
pub fn readout(s: &StepStats) -> Vec<(&'static str, String)> {
    let tps = if s.step_us > 0 {
        format!("{:.1}", s.num_tokens as f64 * 1e6 / s.step_us as f64)
    } else {
        "—".into()
    };
    let hit = if s.total_prefix_cache_queried_tokens > 0 {
        units::percent(
            s.total_prefix_cache_hit_tokens as f64 / s.total_prefix_cache_queried_tokens as f64,
        )
    } else {
        "—".into()
    };
    vec![
        ("step", s.step_id.to_string()),
        ("batch size", s.batch_size.to_string()),
        (
            "tokens in step",
            format!(
                "{} ({} prefill, {} decode)",
                s.num_tokens, s.num_prefill_tokens, s.num_decode_tokens
            ),
        ),
        ("tokens/s", tps),
        (
            "time per step",
            format!(
                "{} (schedule {}, forward {})",
                units::micros(s.step_us),
                units::micros(s.schedule_us),
                units::micros(s.forward_us)
            ),
        ),
        (
            "queue",
            format!(
                "{} running · {} waiting · {} swapped",
                s.num_running, s.num_waiting, s.num_swapped
            ),
        ),
        ("preemptions", s.total_preemptions.to_string()),
        (
            "swaps",
            format!(
                "{} to host · {} pages out · {} pages in",
                s.total_swap_preemptions, s.total_swap_out_pages, s.total_swap_in_pages
            ),
        ),
        (
            "prefix-cache hit rate",
            format!(
                "{hit} ({} of {} tokens)",
                s.total_prefix_cache_hit_tokens, s.total_prefix_cache_queried_tokens
            ),
        ),
        (
            "free KV pages",
            format!("{} of {}", s.free_pages, s.num_pages),
        ),
    ]
}

/// Draws the view with a strip of `strip_height` points.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>, strip_height: f32) {
    // Taken first: the table must not widen the strip past the column.
    let width = ui.available_width();
    let Some(last) = v.timeline.last_step() else {
        heading(ui, "Steps", "no step yet");
        return;
    };
    heading(ui, "Steps", "");
    egui::Grid::new("step_stats")
        .num_columns(2)
        .spacing(vec2(12.0, 2.0))
        .striped(true)
        .show(ui, |ui| {
            for (name, value) in readout(last) {
                ui.weak(name);
                ui.label(value);
                ui.end_row();
            }
        });
    // Batch size (bars) and step time (line) over the history.
    let hist = v.timeline.step_history();
    let (rect, resp) = ui.allocate_exact_size(vec2(width, strip_height), Sense::hover());
    let painter = ui.painter_at(rect);
    let pal = v.palette;
    painter.rect_stroke(
        rect,
        0.0,
        Stroke::new(1.0, pal.grid()),
        egui::StrokeKind::Inside,
    );
    let n = hist.len().min(rect.width() as usize / 2).max(1);
    let shown: Vec<&StepStats> = hist.iter().skip(hist.len().saturating_sub(n)).collect();
    let max_batch = shown.iter().map(|s| s.batch_size).max().unwrap_or(1).max(1) as f32;
    let max_us = shown.iter().map(|s| s.step_us).max().unwrap_or(1).max(1) as f32;
    let w = rect.width() / n as f32;
    let mut mesh = egui::Mesh::default();
    let bar = pal.tag("activations");
    for (i, s) in shown.iter().enumerate() {
        let h = s.batch_size as f32 / max_batch * (rect.height() - 12.0);
        let x = rect.left() + i as f32 * w;
        mesh.add_colored_rect(
            egui::Rect::from_min_max(
                pos2(x, rect.bottom() - h),
                pos2(x + (w - 1.0).max(1.0), rect.bottom()),
            ),
            bar,
        );
    }
    painter.add(Shape::mesh(mesh));
    let line: Vec<egui::Pos2> = shown
        .iter()
        .enumerate()
        .map(|(i, s)| {
            pos2(
                rect.left() + (i as f32 + 0.5) * w,
                rect.bottom() - s.step_us as f32 / max_us * (rect.height() - 12.0),
            )
        })
        .collect();
    painter.add(Shape::line(line, Stroke::new(1.2, pal.reserved_line())));
    let font = egui::FontId::proportional(10.0);
    painter.text(
        rect.left_top() + vec2(4.0, 1.0),
        egui::Align2::LEFT_TOP,
        format!("bars: batch size (max {max_batch})"),
        font.clone(),
        bar,
    );
    painter.text(
        rect.right_top() + vec2(-4.0, 1.0),
        egui::Align2::RIGHT_TOP,
        format!("line: step time (max {})", units::micros(max_us as u64)),
        font,
        pal.reserved_line(),
    );
    if let Some(p) = resp.hover_pos() {
        let i = (((p.x - rect.left()) / w) as usize).min(shown.len().saturating_sub(1));
        if let Some(s) = shown.get(i) {
            let s = (*s).clone();
            resp.on_hover_ui_at_pointer(|ui| {
                ui.strong(format!("step {}", s.step_id));
                ui.label(format!("batch {} · {} tokens", s.batch_size, s.num_tokens));
                ui.label(format!("step time {}", units::micros(s.step_us)));
            });
        }
    }
}
