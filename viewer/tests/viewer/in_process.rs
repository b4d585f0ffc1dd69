//! The in-process source with the chat panel, as the window drives them:
//! the default model on the CPU, three chats started at once. The plan
//! arrives before the engine, the replies stream, and the telemetry the
//! views draw shows the three sequences in the KV grid and a batch of 3.

use std::time::{Duration, Instant};

use pagoda_viewer::chat::panel::ChatPanel;
use pagoda_viewer::source::in_process::{BackendChoice, EngineOptions, InProcess, LoadEvent, load};
use pagoda_viewer::timeline::Timeline;

use crate::common::MACHINE;

#[test]
fn three_chats_at_once_fill_the_kv_grid_and_the_batch() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    let rx = load(EngineOptions {
        model: None,
        backend: BackendChoice::Cpu,
        threads: 0,
        ctx: Some(512),
        max_seqs: 4,
        memory_budget: None,
    });
    let mut planned = false;
    let engine = loop {
        match rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the loader answers")
        {
            LoadEvent::Status(_) => {}
            LoadEvent::Planned(p) => {
                assert!(p.weights_bytes > 0 && p.kv_bytes > 0);
                planned = true;
            }
            LoadEvent::Ready(h) => break InProcess::new(h).unwrap(),
            LoadEvent::Failed(e) => panic!("the engine did not start: {e}"),
        }
    };
    assert!(planned, "the plan comes before the engine");
    let mut chat = ChatPanel::default();
    chat.defaults.max_tokens = 24;
    for p in [
        "Why is the sky blue?",
        "Name three rivers.",
        "Say a short poem.",
    ] {
        chat.start(&engine.handle, p);
    }
    let mut tl = Timeline::default();
    let mut max_batch = 0;
    let mut max_owners = 0;
    let t0 = Instant::now();
    while chat.busy() || t0.elapsed() < Duration::from_millis(200) {
        chat.poll();
        for ev in engine.drain() {
            tl.push(&ev);
        }
        if let Some(s) = tl.last_step() {
            max_batch = max_batch.max(s.batch_size);
        }
        if let Some(st) = tl.state() {
            let owners = pagoda_viewer::views::kv_grid::sequences(&st.kv_pages).len();
            max_owners = max_owners.max(owners);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the chats did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(max_batch, 3, "the three chats ran in one batch");
    assert_eq!(max_owners, 3, "the KV grid showed three sequences");
    for c in &chat.chats {
        let reply = &c.messages.last().unwrap().content;
        assert!(
            c.reply_tokens > 0 && !reply.is_empty(),
            "{}: {:?}",
            c.title,
            c.status
        );
        assert!(c.seq.is_some());
    }
    assert!(!tl.is_stale(), "no telemetry event was lost");
    engine.handle.shutdown().unwrap();
}
