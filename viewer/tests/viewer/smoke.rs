//! The real binary, as a person starts it: `pagoda-viewer --replay` under
//! Xvfb (a real X server in memory, the window drawn by wgpu on lavapipe),
//! a screenshot of the screen with ImageMagick's `import`, and the pixels
//! checked: every tag colour of the legend and the colour of every sequence
//! that holds KV pages at that moment (the KV grid) are on screen. And a
//! broken trace file is a clear error and a non-zero exit, not a window.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pagoda_viewer::palette::{Palette, TAG_LEGEND};
use pagoda_viewer::source::replay::Replay;
use pagoda_viewer::timeline::Timeline;

use crate::common::{MACHINE, peak_frame, traces};

const BIN: &str = env!("CARGO_BIN_EXE_pagoda-viewer");

/// Kills a child when dropped (a failing assertion must not leave it running).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pixels of `img` within 3 of `c` in every channel.
fn count(img: &image::RgbaImage, c: egui::Color32) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|i| (p.0[i] as i32 - c.to_array()[i] as i32).abs() <= 3))
        .count()
}

fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} is not installed (.ci/run installs xvfb and imagemagick)"
    );
}

#[test]
fn the_binary_shows_the_legend_and_the_kv_grid_under_xvfb() {
    let _g = MACHINE.read().unwrap_or_else(|e| e.into_inner());
    need("Xvfb");
    need("import");
    let trace = &traces()[0];
    let r = Replay::open(trace).unwrap();
    let peak = r.frames()[peak_frame(&r)];
    let mut tl = Timeline::default();
    let mut r2 = Replay::open(trace).unwrap();
    r2.seek(peak_frame(&r2), &mut tl);
    let owners: std::collections::BTreeSet<u64> = tl
        .state()
        .unwrap()
        .kv_pages
        .iter()
        .flat_map(|p| p.owners.iter().copied())
        .collect();
    assert!(
        !owners.is_empty(),
        "the fixture's busiest moment has pages in use"
    );

    // A display no X server holds (its lock file tells).
    let mut n = 90 + std::process::id() % 800;
    while Path::new(&format!("/tmp/.X{n}-lock")).exists() {
        n += 1;
    }
    let display = format!(":{n}");
    let _x = Guard(
        Command::new("Xvfb")
            .args([
                display.as_str(),
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb starts"),
    );
    std::thread::sleep(Duration::from_millis(800));
    let runtime = tempfile_dir();
    let mut viewer = Guard(
        Command::new(BIN)
            .args([
                "--replay",
                trace.to_str().unwrap(),
                "--paused",
                "--exit-after",
                "60",
            ])
            .args(["--start-at", &peak.step_id.to_string()])
            .env("DISPLAY", &display)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env_remove("WAYLAND_DISPLAY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the viewer starts"),
    );
    let shot = Path::new(&runtime).join("shot.png");
    let pal = Palette::new(true);
    let t0 = Instant::now();
    // Screenshots until everything is there (the window takes a moment).
    let mut missing: Vec<String>;
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        if let Ok(Some(st)) = viewer.0.try_wait() {
            panic!("the viewer exited early ({st})");
        }
        let ok = Command::new("import")
            .args([
                "-display",
                &display,
                "-window",
                "root",
                shot.to_str().unwrap(),
            ])
            .status()
            .is_ok_and(|s| s.success());
        missing = vec!["a screenshot".into()];
        if ok && let Ok(img) = image::open(&shot) {
            let img = img.to_rgba8();
            missing.clear();
            for (tag, name) in TAG_LEGEND {
                let n = count(&img, pal.tag(tag));
                if n < 80 {
                    missing.push(format!("the {name} colour ({n} px)"));
                }
            }
            for &o in &owners {
                let n = count(&img, pal.sequence(o));
                if n < 60 {
                    missing.push(format!("sequence {o}'s colour in the KV grid ({n} px)"));
                }
            }
        }
        if missing.is_empty() || t0.elapsed() > Duration::from_secs(40) {
            break;
        }
    }
    let _ = std::fs::copy(&shot, std::env::temp_dir().join("pagoda-viewer-smoke.png"));
    assert!(missing.is_empty(), "not on screen: {}", missing.join(", "));
}

fn tempfile_dir() -> String {
    let d = std::env::temp_dir().join(format!("pagoda-viewer-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

#[test]
fn a_broken_trace_is_a_clear_error_and_a_non_zero_exit() {
    let dir = std::env::temp_dir().join(format!("pagoda-viewer-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("garbage.jsonl", "this is not json\n", "line 1"),
        ("empty.jsonl", "", "holds no memory event"),
        (
            "schema.jsonl",
            r#"{"type":"keyframe","schema":"pagoda-trace/1","step_id":1,"t_us":0,"unix_ms":0,"memory":{"totals":{"device_total_bytes":0,"device_free_bytes":0,"pool":{"reserved_bytes":0,"allocated_bytes":0,"free_bytes":0,"peak_allocated_bytes":0,"largest_free_bytes":0,"fragmentation":0.0,"num_segments":0,"num_live_blocks":0,"by_tag":[]},"kv":{"num_pages":0,"free_pages":0,"page_size":16,"page_bytes":0,"num_pieces":0,"reserved_bytes":0,"committed_bytes":0},"graphs":{"count":0,"bytes":0},"host_swap_bytes":0},"plan":{"budget_bytes":0,"weights_bytes":0,"workspace_bytes":0,"kv_bytes":0,"graph_bytes":0,"headroom_bytes":0,"total_bytes":0},"segments":[],"kv_pages":[]}}"#,
            "schema",
        ),
        ("missing.jsonl", "", "cannot open trace"),
    ];
    for (name, body, says) in cases {
        let p = dir.join(name);
        if name != "missing.jsonl" {
            std::fs::write(&p, body).unwrap();
        }
        let out = Command::new(BIN)
            .args(["--replay", p.to_str().unwrap()])
            .env_remove("DISPLAY")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: exit status {}", out.status);
        assert!(
            err.contains(says),
            "{name}: stderr {err:?} does not say {says:?}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    // A truncated line in the middle of a real trace.
    let real = std::fs::read_to_string(&traces()[0]).unwrap();
    let cut = &real[..real.len() / 2];
    let p = dir.join("cut.jsonl");
    std::fs::write(&p, cut).unwrap();
    let out = Command::new(BIN)
        .args(["--replay", p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line"),
        "cut trace: {err}"
    );
}
