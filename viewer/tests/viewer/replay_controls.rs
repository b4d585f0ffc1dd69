//! The replay's controls, clicked as a person would in the whole
//! application (top bar, chat-less layout, views): one event forward, back
//! to the start, play, pause.

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use pagoda_viewer::app::{Source, ViewerApp};
use pagoda_viewer::source::replay::Replay;

use crate::common::{MACHINE, traces};

fn step_of(h: &Harness<'_, ViewerApp>) -> u64 {
    h.state().timeline.state_step()
}

#[test]
fn forward_start_play_and_pause_move_the_picture() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let path = &traces()[0];
    let mut r = Replay::open(path).unwrap();
    r.playing = false;
    let steps: Vec<u64> = r.frames().iter().map(|f| f.step_id).collect();
    let app = ViewerApp::new(Source::Replay(Box::new(r)), true);
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_ui_state(|ui, app: &mut ViewerApp| app.frame(ui), app);
    h.run_steps(2);
    assert_eq!(step_of(&h), steps[0]);
    h.get_by_label(">").click();
    h.run_steps(2);
    assert_eq!(step_of(&h), steps[1], "one memory event forward");
    h.get_by_label(">").click();
    h.run_steps(2);
    assert_eq!(step_of(&h), steps[2]);
    h.get_by_label("|<").click();
    h.run_steps(2);
    assert_eq!(step_of(&h), steps[0], "back to the start");
    h.get_by_label("<").click();
    h.run_steps(2);
    assert_eq!(step_of(&h), steps[0], "nothing before the start");
    // Play at 1x for 1.5 s (6 steps of 0.25 s) of a 3 s trace.
    if let Source::Replay(r) = &mut h.state_mut().source {
        r.speed = 1.0;
    }
    h.get_by_label("play").click();
    h.run_steps(6);
    let playing_at = step_of(&h);
    assert!(playing_at > steps[0], "playing moves forward");
    h.get_by_label("pause").click();
    h.run_steps(2);
    let paused_at = step_of(&h);
    h.run_steps(6);
    assert_eq!(step_of(&h), paused_at, "paused stays");
    assert!(
        h.query_all_by_label_contains(&format!("step {paused_at}"))
            .next()
            .is_some()
    );
}
