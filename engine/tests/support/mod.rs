//! A `pagoda serve` process for the server tests, and a small HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A running `pagoda serve --port 0 ...`; killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `host:port`.
    pub addr: String,
    /// Lines of stderr after the listening line.
    pub stderr: mpsc::Receiver<String>,
    key: Option<String>,
}

impl Server {
    /// Starts the server with `args` (after `serve --port 0`) and waits for
    /// its listening line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pagoda serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    if let Some(rest) = line.split("on http://").nth(1) {
                        break rest.split_whitespace().next().unwrap().to_string();
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not start; stderr:\n{}", seen.join("\n"));
                }
            }
        };
        let key = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| args[i + 1].to_string());
        Server {
            child: Some(child),
            base: format!("http://{addr}"),
            addr,
            stderr: rx,
            key,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (`"TERM"`, `"INT"`) to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (at most `limit`, then it is killed
    /// and the test fails); its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server runs");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(limit) {
            Ok(status) => status.expect("wait for the server"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("the server did not exit within {limit:?}");
            }
        }
    }

    /// A client that sends the server's key, if it has one.
    pub fn client(&self) -> Client {
        Client {
            base: self.base.clone(),
            key: self.key.clone(),
            agent: agent(),
        }
    }

    /// The parsed `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (status, text) = self.client().get("/metrics");
        assert_eq!(status, 200, "{text}");
        Metrics::parse(&text)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the server said, to explain the failure.
            for line in self.stderr.try_iter() {
                eprintln!("server: {line}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// A blocking HTTP client for one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

/// The lines of an SSE response, read as they come.
pub struct SseReader {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send + 'static>>>,
}

impl SseReader {
    /// The status and the body reader of a response.
    fn of(r: ureq::http::Response<ureq::Body>) -> (u16, SseReader) {
        let status = r.status().as_u16();
        let reader: Box<dyn Read + Send> = Box::new(r.into_body().into_reader());
        (
            status,
            SseReader {
                lines: BufReader::new(reader).lines(),
            },
        )
    }

    /// The next `data:` payload (`None` at the end of the stream).
    pub fn next_data(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if let Some(d) = line.strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
        None
    }

    /// The rest of the body as text (a non-SSE answer such as an error).
    pub fn text(&mut self) -> String {
        self.lines
            .by_ref()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every remaining payload.
    pub fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_data()).collect()
    }
}

impl Client {
    /// The same client on a connection pool of its own (a client that went
    /// away mid-stream leaves nothing behind for the next request).
    pub fn fresh(&self) -> Client {
        Client {
            agent: agent(),
            ..self.clone()
        }
    }

    /// The same client with another key (`None`: no header).
    pub fn with_key(&self, key: Option<&str>) -> Client {
        Client {
            key: key.map(str::to_string),
            ..self.clone()
        }
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => r.header("Authorization", format!("Bearer {k}")),
            None => r,
        }
    }

    /// GET: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = self
            .auth(self.agent.get(format!("{}{path}", self.base)))
            .call()
            .expect("GET answered");
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap())
    }

    /// POST raw bytes: status and body.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, String) {
        let mut r = self
            .auth(self.agent.post(format!("{}{path}", self.base)))
            .header("Content-Type", "application/json")
            .send(body)
            .expect("POST answered");
        let status = r.status().as_u16();
        (
            status,
            r.body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .unwrap(),
        )
    }

    /// POST JSON: status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, body.to_string().as_bytes());
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    /// POST JSON and read the answer as SSE: status and the reader.
    pub fn post_sse(&self, path: &str, body: &Value) -> (u16, SseReader) {
        let r = self
            .auth(self.agent.post(format!("{}{path}", self.base)))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .expect("POST answered");
        SseReader::of(r)
    }

    /// GET and read the answer as SSE.
    pub fn get_sse(&self, path: &str) -> (u16, SseReader) {
        let r = self
            .auth(self.agent.get(format!("{}{path}", self.base)))
            .call()
            .expect("GET answered");
        SseReader::of(r)
    }
}

/// `/metrics`, parsed by a Prometheus text parser.
pub struct Metrics {
    /// The samples.
    pub scrape: prometheus_parse::Scrape,
}

impl Metrics {
    /// Parses the exposition (panics on text the parser refuses).
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Metrics {
            scrape: prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text"),
        }
    }

    /// The value of a gauge or counter with these labels (`[]`: unlabelled).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let s = self
            .scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name} is not a single value: {other:?}"),
        }
    }

    /// Observations of a histogram.
    pub fn histogram_count(&self, name: &str) -> u64 {
        let s = self
            .scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no histogram {name}"));
        match &s.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map_or(0, |b| b.count as u64)
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

/// Polls `f` every 10 ms until it holds, at most `limit`; whether it did.
/// For state another process reaches (it has no event to wait on here).
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
