//! Sampling settings of one chat.

use pagoda::engine::GenerationParams;
use pagoda::sampler::SamplingParams;

/// What a person can set per chat.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSettings {
    /// Tokens to generate at most per reply.
    pub max_tokens: usize,
    /// Temperature (0 = greedy).
    pub temperature: f32,
    /// Nucleus sampling (1 = off).
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Seed of the draw.
    pub seed: u64,
    /// Optional system prompt.
    pub system: String,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            max_tokens: 256,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            seed: 0,
            system: String::new(),
        }
    }
}

impl ChatSettings {
    /// The engine's parameters.
    pub fn params(&self) -> GenerationParams {
        GenerationParams {
            max_tokens: self.max_tokens.max(1),
            sampling: SamplingParams {
                temperature: self.temperature.max(0.0),
                top_p: self.top_p.clamp(0.01, 1.0),
                top_k: self.top_k,
                seed: self.seed,
                ..SamplingParams::default()
            },
            ..GenerationParams::default()
        }
    }

    /// Edits the settings.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        egui::Grid::new(ui.scope_id().with("settings"))
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("max tokens");
                ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=4096));
                ui.end_row();
                ui.label("temperature");
                ui.add(egui::Slider::new(&mut self.temperature, 0.0..=2.0));
                ui.end_row();
                ui.label("top-p");
                ui.add(egui::Slider::new(&mut self.top_p, 0.05..=1.0));
                ui.end_row();
                ui.label("top-k");
                ui.add(egui::DragValue::new(&mut self.top_k).range(0..=1000));
                ui.end_row();
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut self.seed));
                ui.end_row();
                ui.label("system prompt");
                ui.text_edit_singleline(&mut self.system);
                ui.end_row();
            });
    }
}
