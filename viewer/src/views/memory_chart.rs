//! Device memory over time: the pool's live bytes stacked by tag (weights,
//! activations, KV, graphs, scratch; KV includes the KV arena's committed
//! bytes, which live outside the pool), the bytes held from the device as a
//! line (pool segments + committed KV arena; held − live = free inside the
//! pool), and the memory plan's lines drawn across: its parts stacked in
//! the same order, its total with headroom, the budget. Lines far above
//! what is used (the CPU backend budgets against host RAM) are written at
//! the top instead of drawn, so the scale stays readable.

use egui::{Align2, Color32, FontId, Mesh, Pos2, Rect, Sense, Shape, Stroke, pos2, vec2};

use crate::timeline::{MemorySample, TAGS};
use crate::units;
use crate::views::{ViewCtx, heading};

/// Draws the chart in `height` points.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>, height: f32) {
    let hist = v.timeline.memory_history();
    let plan = v
        .timeline
        .state()
        .map(|s| s.plan.clone())
        .unwrap_or_default();
    let last = hist.back();
    let ctx_line = match last {
        Some(s) => format!(
            "in use {} · held {} · free in pool {} · budget {}",
            units::bytes(s.allocated_bytes),
            units::bytes(s.reserved_bytes),
            units::bytes(s.reserved_bytes.saturating_sub(s.allocated_bytes)),
            units::bytes(plan.budget_bytes)
        ),
        None => "waiting for the first memory event".into(),
    };
    heading(ui, "Device memory over time", &ctx_line);
    let width = ui.available_width();
    let (rect, resp) = ui.allocate_exact_size(vec2(width, height), Sense::hover());
    let painter = ui.painter_at(rect);
    let pal = v.palette;
    let text = ui.visuals().text_color();
    let font = FontId::proportional(11.0);
    let plot = Rect::from_min_max(rect.min + vec2(58.0, 8.0), rect.max - vec2(8.0, 18.0));
    painter.rect_stroke(
        plot,
        0.0,
        Stroke::new(1.0, pal.grid()),
        egui::StrokeKind::Inside,
    );
    if hist.is_empty() {
        return;
    }
    let peak = hist
        .iter()
        .map(|s| s.reserved_bytes.max(s.allocated_bytes))
        .max()
        .unwrap_or(0);
    // The scale: what is used and what the plan expects to use (its parts
    // without the headroom); the plan's total and the budget are drawn when
    // they are not far above that, else written at the top.
    let planned_use = plan.weights_bytes + plan.workspace_bytes + plan.kv_bytes + plan.graph_bytes;
    let mut ymax = peak.max(planned_use);
    let total_on_scale = plan.total_bytes > 0 && plan.total_bytes <= ymax.saturating_mul(2);
    if total_on_scale {
        ymax = ymax.max(plan.total_bytes);
    }
    let budget_on_scale = plan.budget_bytes > 0 && plan.budget_bytes <= ymax.saturating_mul(2);
    if budget_on_scale {
        ymax = ymax.max(plan.budget_bytes);
    }
    let ymax = (ymax as f64 * 1.08).max(1.0);
    let t0 = hist.front().map_or(0, |s| s.t_us);
    let t1 = hist.back().map_or(1, |s| s.t_us).max(t0 + 1);
    let x_of = |t: u64| plot.left() + ((t - t0) as f64 / (t1 - t0) as f64) as f32 * plot.width();
    let y_of = |b: u64| plot.bottom() - (b as f64 / ymax) as f32 * plot.height();

    // Grid and y labels.
    let step = units::nice_byte_step(ymax as u64, 4);
    let mut y = step;
    while (y as f64) < ymax {
        let py = y_of(y);
        painter.hline(plot.x_range(), py, Stroke::new(0.5, pal.grid()));
        painter.text(
            pos2(plot.left() - 4.0, py),
            Align2::RIGHT_CENTER,
            units::bytes(y),
            font.clone(),
            text,
        );
        y += step;
    }
    painter.text(
        pos2(plot.left(), plot.bottom() + 2.0),
        Align2::LEFT_TOP,
        "0 s",
        font.clone(),
        text,
    );
    painter.text(
        pos2(plot.right(), plot.bottom() + 2.0),
        Align2::RIGHT_TOP,
        format!("{:.1} s", (t1 - t0) as f64 / 1e6),
        font.clone(),
        text,
    );

    // At most one sample per pixel column.
    let stride = (hist.len() as f32 / plot.width().max(1.0)).ceil().max(1.0) as usize;
    let pts: Vec<&MemorySample> = hist
        .iter()
        .enumerate()
        .filter(|(i, _)| i % stride == 0 || *i + 1 == hist.len())
        .map(|(_, s)| s)
        .collect();
    let mut mesh = Mesh::default();
    for (tag_i, tag) in TAGS.iter().enumerate() {
        let color = pal.tag(tag);
        let bottom = |s: &MemorySample| s.allocated_by_tag[..tag_i].iter().sum::<u64>();
        let top = |s: &MemorySample| s.allocated_by_tag[..=tag_i].iter().sum::<u64>();
        if pts.len() == 1 {
            let s = pts[0];
            let r = Rect::from_min_max(
                pos2(plot.left(), y_of(top(s))),
                pos2(plot.right(), y_of(bottom(s))),
            );
            mesh.add_colored_rect(r, color);
            continue;
        }
        for w in pts.windows(2) {
            let (a, b) = (w[0], w[1]);
            if top(a) == bottom(a) && top(b) == bottom(b) {
                continue;
            }
            quad(
                &mut mesh,
                [
                    pos2(x_of(a.t_us), y_of(bottom(a))),
                    pos2(x_of(a.t_us), y_of(top(a))),
                    pos2(x_of(b.t_us), y_of(top(b))),
                    pos2(x_of(b.t_us), y_of(bottom(b))),
                ],
                color,
            );
        }
    }
    painter.add(Shape::mesh(mesh));
    // Pool reserved (live + free inside the pool).
    let line: Vec<Pos2> = if pts.len() == 1 {
        vec![
            pos2(plot.left(), y_of(pts[0].reserved_bytes)),
            pos2(plot.right(), y_of(pts[0].reserved_bytes)),
        ]
    } else {
        pts.iter()
            .map(|s| pos2(x_of(s.t_us), y_of(s.reserved_bytes)))
            .collect()
    };
    painter.add(Shape::line(line, Stroke::new(1.5, pal.reserved_line())));
    // The plan's lines.
    // Labels closer than a line of text to the one before are left out
    // (the line is still drawn; the hover shows the numbers).
    let last_label = std::cell::Cell::new(f32::INFINITY);
    let plan_line = |bytes: u64, color: Color32, label: String| {
        let py = y_of(bytes);
        let show_label = (last_label.get() - py).abs() >= 13.0;
        painter.add(Shape::dashed_line(
            &[pos2(plot.left(), py), pos2(plot.right(), py)],
            Stroke::new(1.2, color),
            6.0,
            4.0,
        ));
        if show_label {
            painter.text(
                pos2(plot.right() - 4.0, py - 1.0),
                Align2::RIGHT_BOTTOM,
                label,
                font.clone(),
                color,
            );
            last_label.set(py);
        }
    };
    // The plan's parts, stacked in the chart's order.
    let mut level = 0;
    for (bytes, name) in [
        (plan.weights_bytes, "weights"),
        (plan.workspace_bytes, "+ activations"),
        (plan.kv_bytes, "+ KV"),
        (plan.graph_bytes, "+ graphs"),
    ] {
        if bytes == 0 {
            continue;
        }
        level += bytes;
        plan_line(
            level,
            pal.plan_line(),
            format!("plan {name} {}", units::bytes(level)),
        );
    }
    let mut off = Vec::new();
    if total_on_scale {
        plan_line(
            plan.total_bytes,
            pal.plan_line(),
            format!("plan + headroom {}", units::bytes(plan.total_bytes)),
        );
    } else if plan.total_bytes > 0 {
        off.push(format!(
            "plan + headroom {}",
            units::bytes(plan.total_bytes)
        ));
    }
    if budget_on_scale {
        plan_line(
            plan.budget_bytes,
            pal.budget_line(),
            format!("budget {}", units::bytes(plan.budget_bytes)),
        );
    } else if plan.budget_bytes > 0 {
        off.push(format!("budget {}", units::bytes(plan.budget_bytes)));
    }
    if !off.is_empty() {
        painter.text(
            pos2(plot.left() + 4.0, plot.top() + 2.0),
            Align2::LEFT_TOP,
            format!("above the scale: {}", off.join(" · ")),
            font.clone(),
            pal.budget_line(),
        );
    }
    // Hover: the sample under the pointer.
    if let Some(p) = resp.hover_pos()
        && plot.contains(p)
    {
        let t = t0 + (((p.x - plot.left()) / plot.width()) as f64 * (t1 - t0) as f64) as u64;
        let i = hist.partition_point(|s| s.t_us < t).min(hist.len() - 1);
        let s = &hist[i];
        painter.vline(x_of(s.t_us), plot.y_range(), Stroke::new(1.0, pal.mark()));
        let s = s.clone();
        resp.on_hover_ui_at_pointer(|ui| {
            ui.strong(format!(
                "step {} · {:.2} s",
                s.step_id,
                (s.t_us - t0) as f64 / 1e6
            ));
            for (k, tag) in TAGS.iter().enumerate() {
                ui.label(format!("{tag}: {}", units::bytes(s.allocated_by_tag[k])));
            }
            ui.label(format!(
                "held from the device: {}",
                units::bytes(s.reserved_bytes)
            ));
            ui.label(format!(
                "fragmentation: {}",
                units::percent(s.fragmentation)
            ));
        });
    }
}

/// A convex quad (corners in order) of one colour.
fn quad(mesh: &mut Mesh, p: [Pos2; 4], color: Color32) {
    let i = mesh.vertices.len() as u32;
    for q in p {
        mesh.colored_vertex(q, color);
    }
    mesh.add_triangle(i, i + 1, i + 2);
    mesh.add_triangle(i, i + 2, i + 3);
}
