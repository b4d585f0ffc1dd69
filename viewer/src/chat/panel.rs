//! The chat panel: the memory plan (shown before the model loads), tabs
//! of conversations (a colour dot per tab: its sequence's colour in the KV
//! grid), the selected conversation, its input, stop button and settings.

use pagoda::EngineHandle;
use pagoda::plan::MemoryPlan;

use crate::chat::session::ChatSession;
use crate::chat::settings::ChatSettings;
use crate::palette::Palette;
use crate::units;

/// All chats and which one is shown.
#[derive(Debug, Default)]
pub struct ChatPanel {
    /// The conversations.
    pub chats: Vec<ChatSession>,
    /// The tab shown.
    pub active: usize,
    /// Settings new chats start with.
    pub defaults: ChatSettings,
    opened: usize,
}

impl ChatPanel {
    /// Opens a new chat tab and shows it; returns its index.
    pub fn open(&mut self) -> usize {
        self.opened += 1;
        let mut settings = self.defaults.clone();
        settings.seed = settings.seed.wrapping_add(self.opened as u64);
        self.chats
            .push(ChatSession::new(format!("Chat {}", self.opened), settings));
        self.active = self.chats.len() - 1;
        self.active
    }

    /// Opens a chat and sends `prompt` in it (`--demo-prompts`).
    pub fn start(&mut self, handle: &EngineHandle, prompt: &str) {
        let i = self.open();
        self.chats[i].send(handle, prompt.to_string());
    }

    /// Drains every chat's stream; whether anything changed.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        for c in &mut self.chats {
            any |= c.poll();
        }
        any
    }

    /// Whether a reply is being generated in any chat.
    pub fn busy(&self) -> bool {
        self.chats.iter().any(ChatSession::busy)
    }

    /// Draws the panel. `selected_seq` follows the tab shown.
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        handle: Option<&EngineHandle>,
        plan: Option<&MemoryPlan>,
        status: &str,
        pal: &Palette,
        selected_seq: &mut Option<u64>,
    ) {
        ui.heading("Chat");
        if let Some(p) = plan {
            plan_ui(ui, p);
        }
        if !status.is_empty() {
            ui.label(status);
        }
        let Some(handle) = handle else {
            return;
        };
        ui.separator();
        ui.horizontal_wrapped(|ui| {
            for (i, c) in self.chats.iter().enumerate() {
                let col = c.seq.map_or(pal.free(), |s| pal.sequence(s.0));
                let label = if c.busy() {
                    format!("{} (writing)", c.title)
                } else {
                    c.title.clone()
                };
                if crate::views::swatch_item(ui, col, &label, Some(i == self.active)).clicked() {
                    self.active = i;
                    *selected_seq = c.seq.map(|s| s.0);
                }
            }
            if ui.button("+ new chat").clicked() {
                self.open();
            }
        });
        if self.chats.is_empty() {
            self.open();
        }
        let active = self.active.min(self.chats.len() - 1);
        let chat = &mut self.chats[active];
        ui.separator();
        egui::CollapsingHeader::new("Sampling settings")
            .id_salt(("settings", active))
            .show(ui, |ui| chat.settings.ui(ui));
        let input_h = 64.0;
        egui::ScrollArea::vertical()
            .id_salt(("messages", active))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .max_height((ui.available_height() - input_h).max(80.0))
            .show(ui, |ui| {
                for m in &chat.messages {
                    let who = if m.role == "user" { "you" } else { "model" };
                    ui.strong(who);
                    ui.label(if m.content.is_empty() {
                        "…"
                    } else {
                        m.content.as_str()
                    });
                    ui.add_space(4.0);
                }
            });
        ui.horizontal(|ui| {
            if !chat.status.is_empty() {
                ui.weak(&chat.status);
            }
            if let Some(s) = chat.seq {
                ui.weak(format!("· sequence {}", s.0));
            }
        });
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut chat.input)
                    .hint_text("Message")
                    .desired_width(ui.available_width() - 70.0),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if chat.busy() {
                if ui.button("Stop").clicked() {
                    chat.stop(handle);
                }
            } else if ui.button("Send").clicked() || enter {
                let text = std::mem::take(&mut chat.input);
                chat.send(handle, text);
                edit.request_focus();
            }
        });
    }
}

/// The memory plan as a small table.
pub fn plan_ui(ui: &mut egui::Ui, p: &MemoryPlan) {
    egui::CollapsingHeader::new(format!(
        "Memory plan: {} of {} budget",
        units::bytes(p.total_bytes),
        units::bytes(p.budget_bytes)
    ))
    .default_open(true)
    .show(ui, |ui| {
        egui::Grid::new("plan")
            .num_columns(2)
            .striped(true)
            .show(ui, |ui| {
                let rows = [
                    ("weights", p.weights_bytes),
                    ("activations", p.workspace_bytes),
                    ("KV cache", p.kv_bytes),
                    ("graphs", p.graph_bytes),
                    ("headroom", p.headroom_bytes),
                    ("total", p.total_bytes),
                ];
                for (name, b) in rows {
                    ui.label(name);
                    ui.label(units::bytes(b));
                    ui.end_row();
                }
            });
        ui.weak(format!(
            "{} backend · {} pages of {} tokens ({}) · {} sequences × {} context",
            p.backend, p.num_pages, p.page_size, p.kv_dtype, p.max_seqs, p.ctx
        ));
    });
}
