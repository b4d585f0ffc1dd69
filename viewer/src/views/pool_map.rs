//! The pool map: every segment as a bar, its blocks at their offset and
//! size, coloured by tag, free holes in the free colour; each segment's
//! fragmentation (`1 − largest free / free`) beside it and the pool's
//! overall in the heading. Hovering a block shows its label, tag, offset,
//! size (held and asked for) and age (steps since it was allocated).
//!
//! Blocks narrower than a pixel are merged into one pixel column coloured
//! by the tag holding most of its bytes, so 5,000 blocks cost no more than
//! the bar's width in rectangles.

use egui::{Align2, Color32, FontId, Mesh, Rect, Sense, Stroke, pos2, vec2};
use pagoda::telemetry::{BlockSnapshot, SegmentSnapshot};

use crate::timeline::TAGS;
use crate::units;
use crate::views::{ViewCtx, heading};

/// Height of one segment's bar.
pub const BAR_HEIGHT: f32 = 16.0;
/// Width of the label column left of the bars.
pub const LABEL_WIDTH: f32 = 210.0;

/// Draws the map; at most `max_height` points high (scrolls beyond).
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>, max_height: f32) {
    let Some(state) = v.timeline.state() else {
        heading(ui, "Pool map", "waiting for the first memory event");
        return;
    };
    let p = &state.totals.pool;
    heading(
        ui,
        "Pool map",
        &format!(
            "{} segments · {} blocks · reserved {} · free {} · largest free {} · fragmentation {}",
            state.segments.len(),
            state.segments.iter().map(|s| s.blocks.len()).sum::<usize>(),
            units::bytes(p.reserved_bytes),
            units::bytes(p.free_bytes),
            units::bytes(p.largest_free_bytes),
            units::percent(p.fragmentation)
        ),
    );
    let step_now = v.timeline.state_step();
    let pal = v.palette;
    egui::ScrollArea::vertical()
        .id_salt("pool_map")
        .max_height(max_height)
        .auto_shrink([false, true])
        .show(ui, |ui| {
            for seg in &state.segments {
                segment_row(ui, seg, step_now, &pal);
            }
        });
}

fn segment_row(
    ui: &mut egui::Ui,
    seg: &SegmentSnapshot,
    step_now: u64,
    pal: &crate::palette::Palette,
) {
    let width = ui.available_width();
    let (rect, resp) = ui.allocate_exact_size(vec2(width, BAR_HEIGHT + 2.0), Sense::hover());
    if !ui.is_rect_visible(rect) {
        return;
    }
    let painter = ui.painter_at(rect);
    let text = ui.visuals().text_color();
    painter.text(
        pos2(rect.left(), rect.center().y),
        Align2::LEFT_CENTER,
        format!(
            "seg {} · {} · frag {}",
            seg.id,
            units::bytes(seg.bytes),
            units::percent(seg.fragmentation)
        ),
        FontId::proportional(11.0),
        text,
    );
    let bar = Rect::from_min_max(
        pos2(rect.left() + LABEL_WIDTH, rect.top() + 1.0),
        pos2(rect.right(), rect.bottom() - 1.0),
    );
    let mut mesh = Mesh::default();
    mesh.add_colored_rect(bar, pal.free());
    paint_blocks(&mut mesh, bar, seg, pal);
    painter.add(egui::Shape::mesh(mesh));
    painter.rect_stroke(
        bar,
        0.0,
        Stroke::new(1.0, pal.grid()),
        egui::StrokeKind::Outside,
    );
    if let Some(pos) = resp.hover_pos()
        && bar.contains(pos)
        && seg.bytes > 0
    {
        let off = ((pos.x - bar.left()) / bar.width()) as f64 * seg.bytes as f64;
        let i = seg
            .blocks
            .partition_point(|b| b.offset + b.bytes <= off as u64)
            .min(seg.blocks.len().saturating_sub(1));
        if let Some(b) = seg.blocks.get(i) {
            let (x0, x1) = x_range(bar, seg, b);
            painter.rect_stroke(
                Rect::from_min_max(pos2(x0, bar.top()), pos2(x1.max(x0 + 1.0), bar.bottom())),
                0.0,
                Stroke::new(1.5, pal.mark()),
                egui::StrokeKind::Outside,
            );
            let b = b.clone();
            let id = seg.id;
            resp.on_hover_ui_at_pointer(|ui| block_tooltip(ui, id, &b, step_now));
        }
    }
}

/// The tooltip of one block.
pub fn block_tooltip(ui: &mut egui::Ui, seg: u32, b: &BlockSnapshot, step_now: u64) {
    if b.tag == "free" {
        ui.strong("free");
    } else if b.label.is_empty() {
        ui.strong(format!("{} (unlabelled)", b.tag));
    } else {
        ui.strong(&b.label);
    }
    ui.label(format!("tag: {}", b.tag));
    ui.label(format!(
        "segment {seg} · offset {} ({})",
        b.offset,
        units::bytes(b.offset)
    ));
    ui.label(format!("size: {}", units::bytes(b.bytes)));
    if b.tag != "free" {
        ui.label(format!("asked for: {}", units::bytes(b.requested_bytes)));
        ui.label(format!(
            "age: {} steps (allocated at step {})",
            step_now.saturating_sub(b.alloc_step),
            b.alloc_step
        ));
    }
}

fn x_range(bar: Rect, seg: &SegmentSnapshot, b: &BlockSnapshot) -> (f32, f32) {
    let scale = bar.width() as f64 / seg.bytes.max(1) as f64;
    (
        bar.left() + (b.offset as f64 * scale) as f32,
        bar.left() + ((b.offset + b.bytes) as f64 * scale) as f32,
    )
}

/// Paints the live blocks of `seg` into `bar` (free is the background).
/// Runs of blocks inside one pixel column become one column of the tag
/// with most bytes there (free counts as a tag).
pub fn paint_blocks(
    mesh: &mut Mesh,
    bar: Rect,
    seg: &SegmentSnapshot,
    pal: &crate::palette::Palette,
) {
    let scale = bar.width() as f64 / seg.bytes.max(1) as f64;
    // Bytes per tag (TAGS order, then free) in the pixel column being merged.
    let mut column: Option<(i64, [u64; 6])> = None;
    let flush = |mesh: &mut Mesh, col: i64, acc: &[u64; 6]| {
        let (k, _) = acc
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| **b)
            .unwrap_or((5, &0));
        if k < 5 {
            let x = bar.left() + col as f32;
            mesh.add_colored_rect(
                Rect::from_min_max(
                    pos2(x, bar.top()),
                    pos2((x + 1.0).min(bar.right()), bar.bottom()),
                ),
                pal.tag(TAGS[k]),
            );
        }
    };
    for b in &seg.blocks {
        let x0 = b.offset as f64 * scale;
        let x1 = (b.offset + b.bytes) as f64 * scale;
        let k = TAGS.iter().position(|&t| t == b.tag).unwrap_or(5);
        if x1 - x0 >= 1.0 {
            if let Some((col, acc)) = column.take() {
                flush(mesh, col, &acc);
            }
            if k < 5 {
                let r = Rect::from_min_max(
                    pos2(bar.left() + x0 as f32, bar.top()),
                    pos2(bar.left() + x1 as f32, bar.bottom()),
                );
                mesh.add_colored_rect(r, pal.tag(b.tag.as_str()));
                // A hairline between neighbouring live blocks wide enough to see it.
                if x1 - x0 >= 4.0 {
                    mesh.add_colored_rect(
                        Rect::from_min_max(r.left_top(), pos2(r.left() + 1.0, r.bottom())),
                        darker(pal.tag(b.tag.as_str())),
                    );
                }
            }
            continue;
        }
        let col = x0.floor() as i64;
        match column.as_mut() {
            Some((c, acc)) if *c == col => acc[k] += b.bytes,
            _ => {
                if let Some((c, acc)) = column.take() {
                    flush(mesh, c, &acc);
                }
                let mut acc = [0u64; 6];
                acc[k] = b.bytes;
                column = Some((col, acc));
            }
        }
    }
    if let Some((col, acc)) = column {
        flush(mesh, col, &acc);
    }
}

fn darker(c: Color32) -> Color32 {
    Color32::from_rgb(
        (c.r() as f32 * 0.6) as u8,
        (c.g() as f32 * 0.6) as u8,
        (c.b() as f32 * 0.6) as u8,
    )
}
