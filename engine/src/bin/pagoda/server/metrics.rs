//! `GET /metrics`: the engine's state in Prometheus' text format (version
//! 0.0.4), from the handle's stats snapshot (no round trip to the engine
//! thread) plus what only the server sees: time to first token and
//! inter-token latency histograms, and a tokens/s gauge.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pagoda::{EngineInfo, EngineStats};
use pagoda_backend::{ClassStats, MemoryTag};

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A Prometheus histogram (cumulative buckets, a sum and a count).
#[derive(Debug)]
pub struct Histogram {
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Clone, Default)]
struct HistogramData {
    /// Observations at or below each bound (not yet cumulative).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            inner: Mutex::new(HistogramData {
                counts: vec![0; LATENCY_BUCKETS.len()],
                ..HistogramData::default()
            }),
        }
    }
}

impl Histogram {
    /// Records one value (seconds).
    pub fn observe(&self, v: f64) {
        let mut d = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| v <= b) {
            d.counts[i] += 1;
        }
        d.sum += v;
        d.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let d = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&d.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", d.count);
        let _ = writeln!(out, "{name}_sum {}", d.sum);
        let _ = writeln!(out, "{name}_count {}", d.count);
    }
}

/// Window of the tokens/s gauge.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the server measures itself.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Request arrival to its first token.
    pub ttft: Histogram,
    /// Between two tokens of one request.
    pub itl: Histogram,
    /// `(when, generated tokens so far)`, sampled at every scrape, for the
    /// tokens/s gauge over [`RATE_WINDOW`].
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// HTTP requests refused with 429.
    pub rejected_queue_full: std::sync::atomic::AtomicU64,
}

impl Metrics {
    /// Generated tokens per second over the last [`RATE_WINDOW`] (measured
    /// between scrapes; 0 at the first).
    fn tokens_per_s(&self, now: Instant, generated: u64) -> f64 {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((now, generated));
        while s.len() > 2 && s.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            s.pop_front();
        }
        match s.front() {
            Some((t, g)) if now > *t => (generated - g) as f64 / (now - *t).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Writes one gauge or counter with optional labels.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    fn labelled<V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: impl IntoIterator<Item = (String, V)>,
    ) {
        self.head(name, kind, help);
        for (l, v) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{l}\"}} {v}");
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The whole exposition.
pub fn render(
    s: &EngineStats,
    info: &EngineInfo,
    m: &Metrics,
    held: usize,
    limit: usize,
) -> String {
    let mut o = Out(String::with_capacity(8192));
    let page_size = info.memory_plan.page_size as u64;
    let pages = s.num_kv_pages as u64;
    let used = pages - s.num_kv_pages_free as u64;
    o.one("pagoda_kv_pages_total", "gauge", "KV cache pages.", pages);
    o.one(
        "pagoda_kv_pages_used",
        "gauge",
        "KV pages held by requests.",
        used,
    );
    o.one(
        "pagoda_kv_pages_cached",
        "gauge",
        "Free KV pages that still hold a cached prefix.",
        s.num_kv_pages_cached,
    );
    o.one(
        "pagoda_kv_page_size_tokens",
        "gauge",
        "Token positions per KV page.",
        page_size,
    );
    o.one(
        "pagoda_kv_tokens_capacity",
        "gauge",
        "Token positions the whole KV cache holds.",
        pages * page_size,
    );
    o.one(
        "pagoda_kv_tokens_used",
        "gauge",
        "Token positions whose K/V running requests hold (shared prefix pages count per request).",
        s.num_kv_tokens,
    );
    o.one(
        "pagoda_kv_token_usage_ratio",
        "gauge",
        "KV usage by tokens: used token positions over the cache's capacity.",
        ratio(s.num_kv_tokens as f64, (pages * page_size) as f64),
    );
    o.one(
        "pagoda_kv_page_fill_ratio",
        "gauge",
        "Used token positions over the positions of the pages in use (1 - the pages' internal waste).",
        ratio(s.num_kv_tokens as f64, (used * page_size) as f64).min(1.0),
    );
    o.one(
        "pagoda_kv_page_usage_ratio",
        "gauge",
        "KV usage by pages: pages in use over all pages.",
        ratio(used as f64, pages as f64),
    );
    let sch = &s.scheduler;
    o.one(
        "pagoda_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache.",
        sch.num_prefix_cache_hit_tokens,
    );
    o.one(
        "pagoda_prefix_cache_queried_tokens_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        sch.num_prefix_cache_queried_tokens,
    );
    o.one(
        "pagoda_prefix_cache_hit_rate",
        "gauge",
        "Prefix-cache hits over lookups, in tokens, since the start.",
        ratio(
            sch.num_prefix_cache_hit_tokens as f64,
            sch.num_prefix_cache_queried_tokens as f64,
        ),
    );

    let p = &s.pool;
    o.one(
        "pagoda_pool_reserved_bytes",
        "gauge",
        "Bytes the pool holds from the backend.",
        p.reserved_bytes,
    );
    o.one(
        "pagoda_pool_allocated_bytes",
        "gauge",
        "Bytes in live pool blocks.",
        p.allocated_bytes,
    );
    o.one(
        "pagoda_pool_peak_allocated_bytes",
        "gauge",
        "Highest allocated bytes seen.",
        p.peak_allocated_bytes,
    );
    let tags = || MemoryTag::ALL.iter().map(|&t| (t, t.name().to_string()));
    o.labelled(
        "pagoda_pool_allocated_bytes_by_tag",
        "gauge",
        "Bytes in live pool blocks, by tag (block sizes).",
        "tag",
        tags().map(|(t, n)| (n, p.allocated(t))),
    );
    o.labelled(
        "pagoda_pool_requested_bytes_by_tag",
        "gauge",
        "Bytes asked of the pool, by tag (before rounding).",
        "tag",
        tags().map(|(t, n)| (n, p.requested(t))),
    );
    let classes = || {
        ClassStats::NAMES
            .iter()
            .zip(p.by_class.iter())
            .map(|(n, c)| (n.to_string(), c))
    };
    o.labelled(
        "pagoda_pool_segments",
        "gauge",
        "Pool segments, by size class.",
        "class",
        classes().map(|(n, c)| (n, c.num_segments)),
    );
    o.labelled(
        "pagoda_pool_reserved_bytes_by_class",
        "gauge",
        "Bytes of pool segments, by size class.",
        "class",
        classes().map(|(n, c)| (n, c.reserved_bytes)),
    );
    o.labelled(
        "pagoda_pool_free_bytes_by_class",
        "gauge",
        "Bytes in free pool blocks, by size class.",
        "class",
        classes().map(|(n, c)| (n, c.free_bytes)),
    );
    o.labelled(
        "pagoda_pool_fragmentation",
        "gauge",
        "1 - largest free block / free bytes, by segment size class (and `all`).",
        "class",
        classes()
            .map(|(n, c)| (n, c.fragmentation))
            .chain([("all".to_string(), p.fragmentation)]),
    );

    let mem = &s.memory;
    o.one(
        "pagoda_device_memory_total_bytes",
        "gauge",
        "Device memory (host RAM on the CPU backend).",
        mem.device_total_bytes,
    );
    o.one(
        "pagoda_device_memory_free_bytes",
        "gauge",
        "Free device memory, a live reading.",
        mem.device_free_bytes,
    );
    o.one(
        "pagoda_kv_reserved_bytes",
        "gauge",
        "Address space reserved for KV pages, all layers.",
        mem.kv.reserved_bytes,
    );
    o.one(
        "pagoda_kv_committed_bytes",
        "gauge",
        "KV bytes backed by memory now.",
        mem.kv.committed_bytes,
    );
    o.one(
        "pagoda_graphs",
        "gauge",
        "Captured graphs held.",
        mem.graphs.count,
    );
    o.one(
        "pagoda_graph_memory_bytes",
        "gauge",
        "Bytes of the captured graphs.",
        mem.graphs.bytes,
    );
    o.one(
        "pagoda_host_swap_bytes",
        "gauge",
        "KV bytes swapped out to host memory.",
        mem.host_swap_bytes,
    );
    let plan = &info.memory_plan;
    o.labelled(
        "pagoda_memory_plan_bytes",
        "gauge",
        "The memory plan's lines.",
        "line",
        [
            ("budget".to_string(), plan.budget_bytes),
            ("weights".to_string(), plan.weights_bytes),
            ("activations".to_string(), plan.workspace_bytes),
            ("kv".to_string(), plan.kv_bytes),
            ("graphs".to_string(), plan.graph_bytes),
            ("headroom".to_string(), plan.headroom_bytes),
            ("total".to_string(), plan.total_bytes),
        ],
    );

    o.one(
        "pagoda_requests_running",
        "gauge",
        "Requests admitted and holding KV pages.",
        s.num_running,
    );
    o.one(
        "pagoda_requests_waiting",
        "gauge",
        "Requests queued for admission.",
        s.num_waiting,
    );
    o.one(
        "pagoda_requests_swapped",
        "gauge",
        "Preempted requests swapped out to host memory.",
        s.num_swapped,
    );
    o.one(
        "pagoda_server_requests_held",
        "gauge",
        "Engine requests the server holds (submitted, response not done).",
        held,
    );
    o.one(
        "pagoda_server_requests_limit",
        "gauge",
        "Engine requests the server holds at most (max seqs + --max-queue).",
        limit,
    );
    o.one(
        "pagoda_server_rejected_queue_full_total",
        "counter",
        "Requests refused with 429 (queue full).",
        m.rejected_queue_full
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    o.one(
        "pagoda_preemptions_total",
        "counter",
        "Preemptions (recompute and swap).",
        sch.num_preemptions,
    );
    o.one(
        "pagoda_swap_preemptions_total",
        "counter",
        "Preemptions that swapped pages to host memory.",
        sch.num_swap_preemptions,
    );
    o.labelled(
        "pagoda_requests_total",
        "counter",
        "Requests by outcome.",
        "outcome",
        [
            ("submitted".to_string(), s.num_requests_submitted),
            ("refused".to_string(), s.num_requests_refused),
            ("completed".to_string(), s.num_requests_completed),
            ("aborted".to_string(), s.num_requests_aborted),
            ("failed".to_string(), s.num_requests_failed),
        ],
    );
    o.one(
        "pagoda_prompt_tokens_total",
        "counter",
        "Prompt tokens of accepted requests.",
        s.num_prompt_tokens,
    );
    o.one(
        "pagoda_generation_tokens_total",
        "counter",
        "Tokens generated.",
        s.num_generated_tokens,
    );
    o.one(
        "pagoda_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second, between scrapes over the last 10 s.",
        m.tokens_per_s(Instant::now(), s.num_generated_tokens),
    );
    o.one(
        "pagoda_engine_steps_total",
        "counter",
        "Engine steps run.",
        s.num_steps,
    );
    m.ttft.render(
        &mut o.0,
        "pagoda_time_to_first_token_seconds",
        "Request arrival to its first token.",
    );
    m.itl.render(
        &mut o.0,
        "pagoda_inter_token_latency_seconds",
        "Time between two tokens of one request.",
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for v in [0.0005, 0.003, 0.003, 100.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.001\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.005\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"60\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
    }

    #[test]
    fn token_rate_is_measured_between_scrapes() {
        let m = Metrics::default();
        let t = Instant::now();
        assert_eq!(m.tokens_per_s(t, 0), 0.0);
        let r = m.tokens_per_s(t + Duration::from_secs(2), 100);
        assert!((r - 50.0).abs() < 1e-9, "{r}");
    }
}
