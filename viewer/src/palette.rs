//! One colour per pool tag and one per sequence, the same in every view
//! (charts, pool map, KV grid, chat tabs, legends), in light and dark themes.
//!
//! Tag colours are fixed (a person learns them once). Sequence colours come
//! from the sequence id through the golden angle, so neighbouring ids get
//! far-apart hues and a sequence keeps its colour for its whole life, in
//! every view and every run.

use egui::Color32;
use egui::ecolor::Hsva;

/// Colours of one theme.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Palette {
    /// Dark theme.
    pub dark: bool,
}

/// The tags in legend order, with the names a person reads.
pub const TAG_LEGEND: [(&str, &str); 5] = [
    ("weights", "weights"),
    ("activations", "activations"),
    ("kv", "KV cache"),
    ("graph", "graphs"),
    ("scratch", "scratch"),
];

impl Palette {
    /// The palette of a theme.
    pub fn new(dark: bool) -> Palette {
        Palette { dark }
    }

    /// The colour of a pool tag (`weights`, `activations`, `kv`, `graph`,
    /// `scratch`; `free` and anything unknown get the free colour).
    pub fn tag(&self, tag: &str) -> Color32 {
        match tag {
            "weights" => Color32::from_rgb(66, 133, 244),
            "activations" => Color32::from_rgb(255, 152, 0),
            "kv" => Color32::from_rgb(52, 168, 83),
            "graph" => Color32::from_rgb(171, 71, 188),
            "scratch" => Color32::from_rgb(0, 172, 193),
            _ => self.free(),
        }
    }

    /// Free memory (holes in the pool map, free KV pages).
    pub fn free(&self) -> Color32 {
        if self.dark {
            Color32::from_gray(48)
        } else {
            Color32::from_gray(222)
        }
    }

    /// The unfilled part of a page (tokens not yet written).
    pub fn unfilled(&self, c: Color32) -> Color32 {
        let bg = self.free();
        lerp(bg, c, 0.35)
    }

    /// A free page that still holds a cached prefix.
    pub fn cached_free(&self) -> Color32 {
        if self.dark {
            Color32::from_gray(105)
        } else {
            Color32::from_gray(165)
        }
    }

    /// The colour of a sequence, from its id.
    pub fn sequence(&self, id: u64) -> Color32 {
        // Golden-angle hues; saturation and value alternate a little so that
        // hues that come round again still differ.
        let h = ((id as f64 * 0.618_033_988_75 + 0.11) % 1.0) as f32;
        let s = if id.is_multiple_of(2) { 0.72 } else { 0.55 };
        let v = if self.dark { 0.92 } else { 0.80 };
        Hsva::new(h, s, v, 1.0).into()
    }

    /// Marks (shared pages, the plan's lines, outlines).
    pub fn mark(&self) -> Color32 {
        if self.dark {
            Color32::WHITE
        } else {
            Color32::BLACK
        }
    }

    /// Dimmed colour (a page not of the selected sequence).
    pub fn dim(&self, c: Color32) -> Color32 {
        lerp(self.free(), c, 0.25)
    }

    /// Grid lines of charts.
    pub fn grid(&self) -> Color32 {
        if self.dark {
            Color32::from_gray(70)
        } else {
            Color32::from_gray(200)
        }
    }

    /// Line colours of the chart's totals: reserved, device used, budget.
    pub fn reserved_line(&self) -> Color32 {
        if self.dark {
            Color32::from_rgb(230, 230, 230)
        } else {
            Color32::from_rgb(40, 40, 40)
        }
    }

    /// The budget line (and plan lines).
    pub fn budget_line(&self) -> Color32 {
        Color32::from_rgb(229, 57, 53)
    }

    /// The plan's total line.
    pub fn plan_line(&self) -> Color32 {
        if self.dark {
            Color32::from_rgb(255, 193, 7)
        } else {
            Color32::from_rgb(176, 112, 0)
        }
    }
}

/// `a` + (`b` − `a`) · `t`, per channel.
pub fn lerp(a: Color32, b: Color32, t: f32) -> Color32 {
    let m = |x: u8, y: u8| (x as f32 + (y as f32 - x as f32) * t).round() as u8;
    Color32::from_rgb(m(a.r(), b.r()), m(a.g(), b.g()), m(a.b(), b.b()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_has_its_own_colour() {
        let p = Palette::new(true);
        let mut cs: Vec<Color32> = TAG_LEGEND.iter().map(|(t, _)| p.tag(t)).collect();
        cs.push(p.free());
        let n = cs.len();
        cs.sort_by_key(|c| c.to_array());
        cs.dedup();
        assert_eq!(cs.len(), n);
    }

    #[test]
    fn neighbouring_sequences_get_different_colours() {
        let p = Palette::new(false);
        for id in 0..64u64 {
            let (a, b) = (p.sequence(id), p.sequence(id + 1));
            let d: i32 = (0..3)
                .map(|i| (a.to_array()[i] as i32 - b.to_array()[i] as i32).abs())
                .sum();
            assert!(d > 60, "sequences {id} and {} look alike", id + 1);
        }
    }
}
