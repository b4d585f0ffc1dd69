//! The KV page grid: one cell per page, in page order, coloured by the
//! sequence that owns it; the lower part of a cell filled to the page's
//! fill (tokens written / page size); shared pages (prefix-cached,
//! refcount > 1) carry a corner mark; free pages that still hold a cached
//! prefix are grey with a dot. Hovering a cell shows its sequence(s),
//! tokens and refcount; a click on a cell or on a sequence in the legend
//! highlights that sequence's pages and joins them in token order.
//!
//! When cells would be smaller than [`MIN_CELL`] points, consecutive pages
//! share a cell ([`GridLayout::pages_per_cell`], said in the heading):
//! coloured by the owner holding most of them, filled to their tokens.

use std::collections::BTreeMap;

use egui::{Align2, Color32, FontId, Mesh, Pos2, Rect, Sense, Shape, Stroke, pos2, vec2};
use pagoda::telemetry::{KvPageSnapshot, MemoryState};

use crate::palette::Palette;
use crate::units;
use crate::views::{ViewCtx, heading, swatch_item};

/// Smallest cell drawn, points.
pub const MIN_CELL: f32 = 4.0;
/// Largest cell drawn, points.
pub const MAX_CELL: f32 = 18.0;
/// Gap between cells.
pub const GAP: f32 = 1.0;

/// Where cells go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridLayout {
    /// Cell side.
    pub cell: f32,
    /// Cells per row.
    pub cols: usize,
    /// Rows.
    pub rows: usize,
    /// Consecutive pages per cell (1 unless the grid is aggregated).
    pub pages_per_cell: usize,
}

impl GridLayout {
    /// The largest cells that fit `n` pages in `width` × `max_height`;
    /// aggregated when even [`MIN_CELL`] does not fit.
    pub fn fit(n: usize, width: f32, max_height: f32) -> GridLayout {
        let n = n.max(1);
        let cols_of = |s: f32| (((width + GAP) / (s + GAP)).floor() as usize).max(1);
        let mut s = MAX_CELL;
        while s >= MIN_CELL {
            let cols = cols_of(s);
            let rows = n.div_ceil(cols);
            if rows as f32 * (s + GAP) <= max_height {
                return GridLayout {
                    cell: s,
                    cols,
                    rows,
                    pages_per_cell: 1,
                };
            }
            s -= 1.0;
        }
        let cols = cols_of(MIN_CELL);
        let max_rows = ((max_height / (MIN_CELL + GAP)).floor() as usize).max(1);
        let per = n.div_ceil(cols * max_rows);
        let cells = n.div_ceil(per);
        GridLayout {
            cell: MIN_CELL,
            cols,
            rows: cells.div_ceil(cols),
            pages_per_cell: per,
        }
    }

    /// Cells drawn for `n` pages.
    pub fn cells(&self, n: usize) -> usize {
        n.div_ceil(self.pages_per_cell)
    }

    /// The rectangle of cell `i` in a grid starting at `origin`.
    pub fn cell_rect(&self, origin: Pos2, i: usize) -> Rect {
        let (r, c) = (i / self.cols, i % self.cols);
        Rect::from_min_size(
            origin + vec2(c as f32 * (self.cell + GAP), r as f32 * (self.cell + GAP)),
            vec2(self.cell, self.cell),
        )
    }

    /// The cell under `p`, if any.
    pub fn cell_at(&self, origin: Pos2, p: Pos2, n: usize) -> Option<usize> {
        let d = p - origin;
        if d.x < 0.0 || d.y < 0.0 {
            return None;
        }
        let (c, r) = (
            (d.x / (self.cell + GAP)) as usize,
            (d.y / (self.cell + GAP)) as usize,
        );
        let i = r * self.cols + c;
        (c < self.cols && i < self.cells(n)).then_some(i)
    }
}

/// Page counts of the heading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KvCounts {
    /// Pages held by a sequence.
    pub used: usize,
    /// Pages held by more than one.
    pub shared: usize,
    /// Free pages that still hold a cached prefix.
    pub cached_free: usize,
    /// Tokens written in used pages.
    pub tokens: u64,
}

/// Counts the pages of a state.
pub fn counts(pages: &[KvPageSnapshot]) -> KvCounts {
    let mut c = KvCounts::default();
    for p in pages {
        if p.refcount > 0 {
            c.used += 1;
            c.tokens += u64::from(p.tokens_used);
            if p.refcount > 1 {
                c.shared += 1;
            }
        } else if p.cached {
            c.cached_free += 1;
        }
    }
    c
}

/// Per sequence: (pages, tokens in them), by id.
pub fn sequences(pages: &[KvPageSnapshot]) -> BTreeMap<u64, (usize, u64)> {
    let mut m: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for p in pages {
        for &o in &p.owners {
            let e = m.entry(o).or_default();
            e.0 += 1;
            e.1 += u64::from(p.tokens_used);
        }
    }
    m
}

/// Draws the grid in at most `max_height` points, and the sequence legend.
pub fn show(ui: &mut egui::Ui, v: &mut ViewCtx<'_>, max_height: f32) {
    let Some(state) = v.timeline.state() else {
        heading(ui, "KV pages", "waiting for the first memory event");
        return;
    };
    let pages = &state.kv_pages;
    let kv = &state.totals.kv;
    let c = counts(pages);
    let width = ui.available_width();
    let layout = GridLayout::fit(pages.len(), width, max_height);
    let fill = if c.used > 0 {
        c.tokens as f64 / (c.used as f64 * kv.page_size.max(1) as f64)
    } else {
        0.0
    };
    let mut context = format!(
        "{} of {} pages used ({}) · {} tokens/page · fill {} · shared {} · cached free {}",
        c.used,
        pages.len(),
        units::percent(c.used as f64 / pages.len().max(1) as f64),
        kv.page_size,
        units::percent(fill),
        c.shared,
        c.cached_free
    );
    if layout.pages_per_cell > 1 {
        context.push_str(&format!(" · 1 cell = {} pages", layout.pages_per_cell));
    }
    heading(ui, "KV pages", &context);
    let h = layout.rows as f32 * (layout.cell + GAP);
    let (rect, resp) = ui.allocate_exact_size(vec2(width, h.max(layout.cell)), Sense::click());
    let painter = ui.painter_at(rect);
    let origin = rect.min;
    let pal = v.palette;
    let selected = *v.selected_seq;
    painter.add(Shape::mesh(grid_mesh(
        state, &layout, origin, &pal, selected,
    )));
    if let Some(sel) = selected {
        order_path(&painter, pages, &layout, origin, &pal, sel);
    }
    if let Some(pos) = resp.hover_pos()
        && let Some(i) = layout.cell_at(origin, pos, pages.len())
    {
        painter.rect_stroke(
            layout.cell_rect(origin, i),
            0.0,
            Stroke::new(1.5, pal.mark()),
            egui::StrokeKind::Outside,
        );
        let per = layout.pages_per_cell;
        let range = i * per..((i + 1) * per).min(pages.len());
        let ps = kv.page_size;
        let resp = resp.clone();
        resp.on_hover_ui_at_pointer(|ui| cell_tooltip(ui, &pages[range], ps));
    }
    if resp.clicked()
        && let Some(pos) = resp.interact_pointer_pos()
    {
        let owner = layout
            .cell_at(origin, pos, pages.len())
            .and_then(|i| pages.get(i * layout.pages_per_cell))
            .and_then(|p| p.owners.first().copied());
        *v.selected_seq = if owner == selected { None } else { owner };
    }
    sequence_legend(ui, pages, &pal, v.selected_seq);
}

/// The mesh of every cell.
pub fn grid_mesh(
    state: &MemoryState,
    layout: &GridLayout,
    origin: Pos2,
    pal: &Palette,
    selected: Option<u64>,
) -> Mesh {
    let pages = &state.kv_pages;
    let ps = state.totals.kv.page_size.max(1) as f32;
    let mut mesh = Mesh::default();
    let n_cells = layout.cells(pages.len());
    mesh.reserve_triangles(n_cells * 4);
    mesh.reserve_vertices(n_cells * 8);
    let per = layout.pages_per_cell;
    for i in 0..n_cells {
        let r = layout.cell_rect(origin, i);
        let group = &pages[i * per..((i + 1) * per).min(pages.len())];
        let (owner, used, tokens, shared, cached) = summarize(group);
        let fill = (tokens as f32 / (ps * group.len() as f32)).clamp(0.0, 1.0);
        match owner {
            Some(o) => {
                let mut col = pal.sequence(o);
                if selected.is_some_and(|s| !group.iter().any(|p| p.owners.contains(&s))) {
                    col = pal.dim(col);
                }
                let _ = used;
                let split = r.bottom() - r.height() * fill;
                mesh.add_colored_rect(
                    Rect::from_min_max(r.min, pos2(r.right(), split)),
                    pal.unfilled(col),
                );
                mesh.add_colored_rect(Rect::from_min_max(pos2(r.left(), split), r.max), col);
                if shared {
                    let k = (r.width() * 0.45).max(2.0);
                    let i0 = mesh.vertices.len() as u32;
                    mesh.colored_vertex(r.right_top(), pal.mark());
                    mesh.colored_vertex(r.right_top() - vec2(k, 0.0), pal.mark());
                    mesh.colored_vertex(r.right_top() + vec2(0.0, k), pal.mark());
                    mesh.add_triangle(i0, i0 + 1, i0 + 2);
                }
            }
            None if cached > 0 => {
                mesh.add_colored_rect(r, pal.cached_free());
                if r.width() >= 6.0 {
                    let d = r.width() * 0.18;
                    mesh.add_colored_rect(
                        Rect::from_center_size(r.center(), vec2(d, d) * 2.0),
                        pal.free(),
                    );
                }
            }
            None => mesh.add_colored_rect(r, pal.free()),
        }
    }
    mesh
}

/// (owner with most pages, used pages, tokens, any shared, cached free pages).
fn summarize(group: &[KvPageSnapshot]) -> (Option<u64>, usize, u64, bool, usize) {
    let mut best: [(u64, usize); 4] = [(0, 0); 4];
    let (mut used, mut tokens, mut shared, mut cached) = (0, 0u64, false, 0);
    for p in group {
        if p.refcount > 0 {
            used += 1;
            tokens += u64::from(p.tokens_used);
            shared |= p.refcount > 1;
            if let Some(&o) = p.owners.first() {
                match best.iter_mut().find(|(id, n)| *n > 0 && *id == o) {
                    Some(e) => e.1 += 1,
                    None => {
                        if let Some(e) = best.iter_mut().min_by_key(|(_, n)| *n)
                            && e.1 == 0
                        {
                            *e = (o, 1);
                        }
                    }
                }
            }
        } else if p.cached {
            cached += 1;
        }
    }
    let owner = best
        .iter()
        .filter(|(_, n)| *n > 0)
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| *id);
    (owner, used, tokens, shared, cached)
}

/// Joins the selected sequence's pages in token order (block-table index),
/// and numbers them where cells are large enough.
fn order_path(
    painter: &egui::Painter,
    pages: &[KvPageSnapshot],
    layout: &GridLayout,
    origin: Pos2,
    pal: &Palette,
    sel: u64,
) {
    let mut held: Vec<(u32, usize)> = pages
        .iter()
        .filter_map(|p| {
            let k = p.owners.iter().position(|&o| o == sel)?;
            let pos = p.positions.get(k).copied().unwrap_or(p.page);
            Some((pos, p.page as usize))
        })
        .collect();
    held.sort_unstable();
    let pts: Vec<Pos2> = held
        .iter()
        .map(|&(_, page)| {
            layout
                .cell_rect(origin, page / layout.pages_per_cell)
                .center()
        })
        .collect();
    if pts.len() > 1 {
        painter.add(Shape::line(pts.clone(), Stroke::new(1.5, pal.mark())));
    }
    if layout.cell >= 14.0 && layout.pages_per_cell == 1 {
        for (k, p) in pts.iter().enumerate() {
            painter.text(
                *p,
                Align2::CENTER_CENTER,
                format!("{k}"),
                FontId::monospace(8.0),
                pal.mark(),
            );
        }
    }
}

fn cell_tooltip(ui: &mut egui::Ui, group: &[KvPageSnapshot], page_size: u64) {
    if let [p] = group {
        ui.strong(format!("page {}", p.page));
        ui.label(format!(
            "piece {} · offset {}",
            p.piece,
            units::bytes(p.offset_bytes)
        ));
        if p.owners.is_empty() {
            ui.label(if p.cached {
                "free, holds a cached prefix"
            } else {
                "free"
            });
        } else {
            for (k, o) in p.owners.iter().enumerate() {
                match p.positions.get(k) {
                    Some(pos) => ui.label(format!("sequence {o} (its page {pos})")),
                    None => ui.label(format!("sequence {o}")),
                };
            }
        }
        ui.label(format!("tokens: {} / {page_size}", p.tokens_used));
        ui.label(format!("refcount: {}", p.refcount));
        if p.shared {
            ui.label("shared (prefix cache)");
        }
        if p.cached && !p.owners.is_empty() {
            ui.label("in the prefix cache");
        }
    } else if let (Some(a), Some(b)) = (group.first(), group.last()) {
        let c = counts(group);
        ui.strong(format!("pages {}–{}", a.page, b.page));
        ui.label(format!(
            "{} used · {} shared · {} cached free",
            c.used, c.shared, c.cached_free
        ));
        ui.label(format!("tokens: {}", c.tokens));
        let seqs = sequences(group);
        let ids: Vec<String> = seqs.keys().take(8).map(u64::to_string).collect();
        if !ids.is_empty() {
            ui.label(format!("sequences: {}", ids.join(", ")));
        }
    }
}

/// The sequences holding pages, with their colour: click to highlight.
fn sequence_legend(
    ui: &mut egui::Ui,
    pages: &[KvPageSnapshot],
    pal: &Palette,
    selected: &mut Option<u64>,
) {
    let seqs = sequences(pages);
    ui.horizontal_wrapped(|ui| {
        if seqs.is_empty() {
            ui.weak("no sequence holds pages");
        }
        for (id, (n, tokens)) in seqs.iter().take(64) {
            let on = *selected == Some(*id);
            let text = format!("seq {id}: {n} pages, {tokens} tok");
            if swatch_item(ui, pal.sequence(*id), &text, Some(on)).clicked() {
                *selected = if on { None } else { Some(*id) };
            }
        }
        if seqs.len() > 64 {
            ui.weak(format!("and {} more", seqs.len() - 64));
        }
    });
    ui.horizontal_wrapped(|ui| {
        mark_key(ui, pal.cached_free(), "cached free");
        mark_key(ui, pal.free(), "free");
        ui.horizontal(|ui| {
            let (r, _) = ui.allocate_exact_size(vec2(12.0, 12.0), Sense::hover());
            ui.painter()
                .rect_filled(r, 0.0, pal.unfilled(pal.sequence(0)));
            ui.painter().add(Shape::convex_polygon(
                vec![
                    r.right_top(),
                    r.right_top() + vec2(0.0, 6.0),
                    r.right_top() - vec2(6.0, 0.0),
                ],
                pal.mark(),
                Stroke::NONE,
            ));
            ui.weak("shared (refcount > 1) · lower part = fill");
        });
    });
}

fn mark_key(ui: &mut egui::Ui, c: Color32, text: &str) {
    swatch_item(ui, c, text, None);
}
