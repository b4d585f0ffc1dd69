//! The eframe application: a top bar (source, replay controls, theme,
//! frame time), the chat panel on the left for an in-process engine, the
//! memory views in the middle.
//!
//! Every frame drains the source into the [`Timeline`] (never waiting on
//! it) and asks for the next frame within [`REFRESH`], so the views update
//! at least ten times a second while anything can change.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use pagoda::plan::MemoryPlan;

use crate::chat::panel::ChatPanel;
use crate::dashboard;
use crate::palette::Palette;
use crate::source::attach::{Attach, AttachStatus};
use crate::source::in_process::{InProcess, LoadEvent};
use crate::source::replay::Replay;
use crate::timeline::Timeline;
use crate::views::ViewCtx;

/// Longest wait between two frames while a source is live or playing.
pub const REFRESH: Duration = Duration::from_millis(50);

/// Replay speeds offered.
pub const SPEEDS: [f32; 8] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0];

/// An in-process engine, from loading to running.
#[derive(Debug)]
pub struct Local {
    /// A short description (model, backend).
    pub describe: String,
    loading: Option<Receiver<LoadEvent>>,
    /// The plan, once computed (before loading).
    pub plan: Option<MemoryPlan>,
    /// The engine, once running.
    pub engine: Option<InProcess>,
    /// What loading is doing, or why it failed.
    pub status: String,
    /// Prompts to start in chats of their own once the engine runs.
    pub demo_prompts: Vec<String>,
    /// The chats.
    pub chat: ChatPanel,
}

impl Local {
    /// A source that is loading (see [`crate::source::in_process::load`]).
    pub fn new(describe: String, loading: Receiver<LoadEvent>, demo_prompts: Vec<String>) -> Local {
        Local {
            describe,
            loading: Some(loading),
            plan: None,
            engine: None,
            status: "starting".into(),
            demo_prompts,
            chat: ChatPanel::default(),
        }
    }
}

/// Where the application's telemetry comes from.
#[derive(Debug)]
pub enum Source {
    /// A recorded trace.
    Replay(Box<Replay>),
    /// A running server.
    Attach(Attach),
    /// An engine in this process.
    Local(Box<Local>),
}

/// The application.
#[derive(Debug)]
pub struct ViewerApp {
    /// The source.
    pub source: Source,
    /// What the views draw.
    pub timeline: Timeline,
    /// Dark or light.
    pub dark: bool,
    /// The highlighted sequence.
    pub selected_seq: Option<u64>,
    /// CPU time of the last frame's UI, ms.
    pub frame_ms: f32,
    /// Close the window after this long (smoke tests, screenshots).
    pub exit_after: Option<Duration>,
    started: Instant,
    theme_set: Option<bool>,
}

impl ViewerApp {
    /// An application showing `source`.
    pub fn new(mut source: Source, dark: bool) -> ViewerApp {
        let mut timeline = Timeline::default();
        if let Source::Replay(r) = &mut source {
            r.start(&mut timeline);
        }
        ViewerApp {
            source,
            timeline,
            dark,
            selected_seq: None,
            frame_ms: 0.0,
            exit_after: None,
            started: Instant::now(),
            theme_set: None,
        }
    }

    /// Drains the source into the timeline; `dt` is the wall time since the
    /// last frame (replay pacing).
    pub fn pump(&mut self, dt: f32) {
        match &mut self.source {
            Source::Replay(r) => {
                r.advance(dt, &mut self.timeline);
            }
            Source::Attach(a) => {
                for ev in a.drain() {
                    self.timeline.push(&ev);
                }
            }
            Source::Local(l) => pump_local(l, &mut self.timeline),
        }
    }

    /// Whether the source may change the picture without input.
    fn live(&self) -> bool {
        match &self.source {
            Source::Replay(r) => r.playing,
            Source::Attach(_) => true,
            Source::Local(_) => true,
        }
    }

    /// The whole UI (what eframe calls every frame).
    pub fn frame(&mut self, ui: &mut egui::Ui) {
        let t = Instant::now();
        let ctx = ui.ctx().clone();
        if self.theme_set != Some(self.dark) {
            ctx.set_theme(if self.dark {
                egui::Theme::Dark
            } else {
                egui::Theme::Light
            });
            self.theme_set = Some(self.dark);
        }
        let dt = ui.input(|i| i.unstable_dt).min(0.25);
        self.pump(dt);
        let pal = Palette::new(self.dark);
        egui::Panel::top("top_bar").show(ui, |ui| self.top_bar(ui));
        if let Source::Local(l) = &mut self.source {
            egui::Panel::left("chat")
                .default_size(340.0)
                .resizable(true)
                .show(ui, |ui| {
                    let handle = l.engine.as_ref().map(|e| &e.handle);
                    let status = if l.engine.is_some() {
                        String::new()
                    } else {
                        l.status.clone()
                    };
                    l.chat.ui(
                        ui,
                        handle,
                        l.plan.as_ref(),
                        &status,
                        &pal,
                        &mut self.selected_seq,
                    );
                });
        }
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("dashboard")
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    let mut v = ViewCtx {
                        timeline: &self.timeline,
                        palette: pal,
                        selected_seq: &mut self.selected_seq,
                    };
                    dashboard::show(ui, &mut v);
                });
        });
        if self.live() {
            ctx.request_repaint_after(REFRESH);
        }
        if let Some(d) = self.exit_after
            && self.started.elapsed() >= d
        {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        self.frame_ms = t.elapsed().as_secs_f32() * 1000.0;
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.strong("Pagoda viewer");
            ui.separator();
            match &mut self.source {
                Source::Replay(r) => replay_controls(ui, r, &mut self.timeline),
                Source::Attach(a) => {
                    let s = match a.status() {
                        AttachStatus::Connecting => "connecting".to_string(),
                        AttachStatus::Connected => "connected".to_string(),
                        AttachStatus::Failed(e) => e,
                    };
                    ui.label(format!("attached to {} · {s}", a.url()));
                }
                Source::Local(l) => {
                    ui.label(&l.describe);
                }
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let label = if self.dark {
                    "light theme"
                } else {
                    "dark theme"
                };
                if ui.button(label).clicked() {
                    self.dark = !self.dark;
                }
                ui.weak(format!("frame {:.1} ms", self.frame_ms));
                if self.timeline.state().is_some() {
                    ui.weak(format!("step {}", self.timeline.state_step()));
                }
            });
        });
    }
}

fn pump_local(l: &mut Local, tl: &mut Timeline) {
    if let Some(rx) = &l.loading {
        for ev in rx.try_iter() {
            match ev {
                LoadEvent::Status(s) => l.status = s,
                LoadEvent::Planned(p) => l.plan = Some(*p),
                LoadEvent::Failed(e) => l.status = format!("cannot start the engine: {e}"),
                LoadEvent::Ready(h) => match InProcess::new(h) {
                    Ok(e) => {
                        l.status = "running".into();
                        l.engine = Some(e);
                    }
                    Err(e) => l.status = format!("cannot subscribe to telemetry: {e}"),
                },
            }
        }
        if l.engine.is_some() {
            l.loading = None;
        }
    }
    if let Some(e) = &l.engine {
        for ev in e.drain() {
            tl.push(&ev);
        }
        for p in std::mem::take(&mut l.demo_prompts) {
            l.chat.start(&e.handle, &p);
        }
    }
    l.chat.poll();
}

fn replay_controls(ui: &mut egui::Ui, r: &mut Replay, tl: &mut Timeline) {
    let name = r.path().file_name().map_or_else(
        || r.path().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    ui.label(format!("replay {name}"));
    if ui.button("|<").on_hover_text("to the start").clicked() {
        r.seek(0, tl);
    }
    if ui
        .button("<")
        .on_hover_text("one memory event back")
        .clicked()
    {
        r.step_by(-1, tl);
    }
    let play = if r.playing { "pause" } else { "play" };
    if ui.button(play).clicked() {
        if r.at_end() && !r.playing {
            r.seek(0, tl);
        }
        r.playing = !r.playing;
    }
    if ui
        .button(">")
        .on_hover_text("one memory event forward")
        .clicked()
    {
        r.step_by(1, tl);
    }
    egui::ComboBox::new("speed", "speed")
        .selected_text(format!("{}×", r.speed))
        .width(60.0)
        .show_ui(ui, |ui| {
            for s in SPEEDS {
                ui.selectable_value(&mut r.speed, s, format!("{s}×"));
            }
        });
    let n = r.frames().len();
    let mut at = r.current();
    let slider = egui::Slider::new(&mut at, 0..=n.saturating_sub(1))
        .show_value(false)
        .trailing_fill(true)
        .text("position");
    if ui.add_sized([300.0, 18.0], slider).changed() {
        r.playing = false;
        r.seek(at, tl);
    }
    let f = r.frames()[r.current()];
    ui.weak(format!(
        "event {} of {n} · step {}{}",
        r.current() + 1,
        f.step_id,
        if f.keyframe { " · keyframe" } else { "" }
    ));
}

impl eframe::App for ViewerApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame(ui);
    }
}

/// Reads a `--demo-prompts` file: one prompt per non-empty line.
pub fn read_prompts(path: &PathBuf) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}
