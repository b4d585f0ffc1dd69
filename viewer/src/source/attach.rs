//! `--attach URL`: the telemetry stream of a running `pagoda serve`
//! (`GET /v1/telemetry`, server-sent events, one telemetry event per
//! `data:` line).
//!
//! A reader thread does the HTTP and the parsing and hands events to the UI
//! through a channel; the UI thread never waits on the network. On a broken
//! connection the thread says why (shown in the status line) and connects
//! again after [`RETRY`]; a new connection starts with a keyframe (the
//! server's rule), so the picture is whole again at once. A line that is not
//! a telemetry event is reported and skipped.

use std::io::{BufRead, BufReader};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pagoda::telemetry::TelemetryEvent;

/// Wait before connecting again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What the reader thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachStatus {
    /// Connecting.
    Connecting,
    /// Reading events.
    Connected,
    /// The last attempt failed (why); retrying.
    Failed(String),
}

/// A running `pagoda serve`'s telemetry, read on a thread.
#[derive(Debug)]
pub struct Attach {
    url: String,
    events: Receiver<TelemetryEvent>,
    status: Arc<Mutex<AttachStatus>>,
}

/// The telemetry URL of a server address: `http://host:port` gets
/// `/v1/telemetry`; a URL with that path already is kept.
pub fn telemetry_url(url: &str) -> String {
    let u = url.trim_end_matches('/');
    let u = if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    };
    if u.ends_with("/v1/telemetry") {
        u
    } else {
        format!("{u}/v1/telemetry")
    }
}

/// The event of one SSE line, if it is a `data:` line (`None` for
/// comments, blank lines and other fields).
pub fn parse_sse_line(line: &str) -> Option<Result<TelemetryEvent, serde_json::Error>> {
    let data = line.strip_prefix("data:")?;
    Some(serde_json::from_str(data.trim_start()))
}

impl Attach {
    /// Starts reading `url` (see [`telemetry_url`]) with an optional API
    /// key; `wake` is called after each batch of events (to repaint).
    pub fn start(
        url: &str,
        api_key: Option<String>,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<Attach> {
        let url = telemetry_url(url);
        let (tx, events) = channel();
        let status = Arc::new(Mutex::new(AttachStatus::Connecting));
        let st = status.clone();
        let u = url.clone();
        std::thread::Builder::new()
            .name("pagoda-viewer-attach".into())
            .spawn(move || read_loop(&u, api_key.as_deref(), &tx, &st, &wake))?;
        Ok(Attach {
            url,
            events,
            status,
        })
    }

    /// The telemetry URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Events received since the last call.
    pub fn drain(&self) -> impl Iterator<Item = TelemetryEvent> + '_ {
        self.events.try_iter()
    }

    /// What the reader is doing.
    pub fn status(&self) -> AttachStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn set(status: &Mutex<AttachStatus>, s: AttachStatus) {
    *status.lock().unwrap_or_else(PoisonError::into_inner) = s;
}

/// Connects, reads until the stream ends or the UI is gone, retries.
fn read_loop(
    url: &str,
    api_key: Option<&str>,
    tx: &Sender<TelemetryEvent>,
    status: &Mutex<AttachStatus>,
    wake: &dyn Fn(),
) {
    loop {
        set(status, AttachStatus::Connecting);
        let mut req = ureq::get(url).header("Accept", "text/event-stream");
        if let Some(k) = api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        match req.call() {
            Ok(resp) => {
                set(status, AttachStatus::Connected);
                let reader = BufReader::new(resp.into_body().into_reader());
                for line in reader.lines() {
                    let line = match line {
                        Ok(l) => l,
                        Err(e) => {
                            set(status, AttachStatus::Failed(format!("stream broke: {e}")));
                            break;
                        }
                    };
                    match parse_sse_line(&line) {
                        Some(Ok(ev)) => {
                            if tx.send(ev).is_err() {
                                return; // the viewer is gone
                            }
                            wake();
                        }
                        Some(Err(e)) => {
                            set(
                                status,
                                AttachStatus::Failed(format!("not a telemetry event: {e}")),
                            );
                        }
                        None => {}
                    }
                }
                if matches!(
                    *status.lock().unwrap_or_else(PoisonError::into_inner),
                    AttachStatus::Connected
                ) {
                    set(
                        status,
                        AttachStatus::Failed("the server ended the stream".into()),
                    );
                }
            }
            Err(e) => set(status, AttachStatus::Failed(format!("{url}: {e}"))),
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_become_telemetry_urls() {
        assert_eq!(
            telemetry_url("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/v1/telemetry"
        );
        assert_eq!(
            telemetry_url("127.0.0.1:8080/"),
            "http://127.0.0.1:8080/v1/telemetry"
        );
        assert_eq!(
            telemetry_url("http://h:1/v1/telemetry"),
            "http://h:1/v1/telemetry"
        );
    }

    #[test]
    fn only_data_lines_are_events() {
        assert!(parse_sse_line(": keep-alive").is_none());
        assert!(parse_sse_line("").is_none());
        assert!(matches!(
            parse_sse_line("data: {\"type\":\"nope\"}"),
            Some(Err(_))
        ));
    }
}
