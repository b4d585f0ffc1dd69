//! Shared by the viewer's tests: the fixture traces and a lock that keeps
//! the frame-time benchmark alone on the machine.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use pagoda_viewer::source::replay::Replay;

/// Tests take it shared; the benchmark takes it alone.
pub static MACHINE: RwLock<()> = RwLock::new(());

/// Every fixture trace (`tests/traces/*.jsonl`), by name.
pub fn traces() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/traces exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixture trace in {}", dir.display());
    v
}

/// The trace's stem (`cpu`, `cuda`).
pub fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The memory frame with the most KV pages in use (first of equals): the
/// moment the snapshots show.
pub fn peak_frame(r: &Replay) -> usize {
    let states = r.trace().replay().expect("fixture replays");
    let mut best = (0, 0);
    for (i, (_, s)) in states.iter().enumerate() {
        let used = s.kv_pages.iter().filter(|p| p.refcount > 0).count();
        if used > best.1 {
            best = (i, used);
        }
    }
    best.0
}
