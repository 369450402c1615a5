//! Serving metrics in the Prometheus text exposition format (version 0.0.4): counters, gauges
//! and histograms kept with atomics and small mutexes, written by the engine and the HTTP layer
//! and rendered by `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds (upper bounds; `+Inf` is implied).
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData {
                counts: vec![0; bounds.len() + 1],
                ..Default::default()
            }),
        }
    }

    fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        d.counts[i] += 1;
        d.sum += v;
        d.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += d.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += d.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(out, "{name}_sum {}", d.sum);
        let _ = writeln!(out, "{name}_count {}", d.count);
    }
}

/// Everything `/metrics` reports.
pub struct Metrics {
    /// (endpoint, HTTP status) → responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Finish reason → sequences (one per choice).
    finished: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    vision_cache_hits: AtomicU64,
    pub prefill_calls: AtomicU64,
    /// Positions prefill calls computed: rows × positions, padding and recomputed cached
    /// tokens included.
    pub prefill_positions: AtomicU64,
    /// Prompt tokens whose keys and values were copied from the prefix cache.
    pub prefix_cache_hit_tokens: AtomicU64,
    pub prefix_cache_bytes: AtomicU64,
    /// Prompt tokens whose keys and values were copied from an identical prompt prefilled in
    /// the same group (`n` > 1, or the same request twice at once).
    pub shared_prefill_tokens: AtomicU64,
    /// Running sequences that gave their row to a more urgent one (to resume later).
    pub preemptions: AtomicU64,
    /// Speculative decoding: guessed tokens fed to the decoder, and those the sampler picked
    /// too (kept; vLLM's `spec_decode_num_draft_tokens` / `num_accepted_tokens`).
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    /// Decoder calls of the draft model (its reading of prompts and of the tokens kept, and
    /// its guesses), one per call however many sequences it guesses for.
    pub spec_draft_model_calls: AtomicU64,
    /// Tokens chosen under a structured-output constraint, and the microseconds spent choosing
    /// them (the grammar's mask and the sampling after it).
    pub constrained_tokens: AtomicU64,
    pub constrained_pick_us: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
    pub queue_depth: AtomicU64,
    pub active_sequences: AtomicU64,
    pub kv_slots_used: AtomicU64,
    pub kv_slots_total: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            finished: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            vision_cache_hits: AtomicU64::new(0),
            prefill_calls: AtomicU64::new(0),
            prefill_positions: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            prefix_cache_bytes: AtomicU64::new(0),
            shared_prefill_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            spec_draft_tokens: AtomicU64::new(0),
            spec_accepted_tokens: AtomicU64::new(0),
            spec_draft_model_calls: AtomicU64::new(0),
            constrained_tokens: AtomicU64::new(0),
            constrained_pick_us: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            queue_depth: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            kv_slots_used: AtomicU64::new(0),
            kv_slots_total: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// A sequence ended; `reason` is `stop`, `length`, `cancelled`, `timeout` or `error`.
    pub fn finished(&self, reason: &'static str, prompt_tokens: usize, generated: usize) {
        let mut m = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(reason).or_default() += 1;
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }

    pub fn time_to_first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    pub fn inter_token(&self, seconds: f64) {
        self.itl.observe(seconds);
    }

    pub fn set_vision_cache_hits(&self, hits: u64) {
        self.vision_cache_hits.store(hits, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kosmos_requests_total HTTP responses by endpoint and status code.\n\
             # TYPE kosmos_requests_total counter"
        );
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "kosmos_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kosmos_sequences_finished_total Generated sequences (one per choice) by finish reason.\n\
             # TYPE kosmos_sequences_finished_total counter"
        );
        for (reason, n) in self.finished.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "kosmos_sequences_finished_total{{reason=\"{reason}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64, kind: &str| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            &mut out,
            "kosmos_prompt_tokens_total",
            "Prompt tokens (image slots included) of finished sequences.",
            &self.prompt_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_generation_tokens_total",
            "Generated tokens of finished sequences.",
            &self.generation_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_vision_cache_hits_total",
            "Images whose embeddings came from the cache.",
            &self.vision_cache_hits,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_prefill_calls_total",
            "Prefill decoder calls (a group of prompts longer than --prefill-chunk takes several).",
            &self.prefill_calls,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_prefill_positions_total",
            "Positions prefill calls computed (rows x positions, padding and recomputed cached tokens included); against kosmos_prompt_tokens_total it shows what grouping prompts costs.",
            &self.prefill_positions,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache instead of a prefill.",
            &self.prefix_cache_hit_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_shared_prefill_tokens_total",
            "Prompt tokens copied from an identical prompt prefilled at the same time (n > 1) instead of prefilled again.",
            &self.shared_prefill_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_preemptions_total",
            "Running sequences that gave their row to a more urgent waiting one (lower priority), to resume later where they were.",
            &self.preemptions,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_spec_decode_draft_tokens_total",
            "Speculative decoding: guessed tokens (by prompt lookup, a draft model or a grammar's forced text) fed to the decoder.",
            &self.spec_draft_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_spec_decode_accepted_tokens_total",
            "Speculative decoding: guessed tokens the sampler picked too, each a token gained without a decoder call of its own.",
            &self.spec_accepted_tokens,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_spec_decode_draft_model_calls_total",
            "Speculative decoding with a draft model: the draft's decoder calls (reading prompts and kept tokens, and guessing), one per call for every sequence it guesses for.",
            &self.spec_draft_model_calls,
            "counter",
        );
        counter(
            &mut out,
            "kosmos_constrained_tokens_total",
            "Tokens chosen under a structured-output constraint (JSON schema, regex, choices, grammar, forced tool call).",
            &self.constrained_tokens,
            "counter",
        );
        let _ = writeln!(
            out,
            "# HELP kosmos_constrained_pick_seconds_total Time spent choosing those tokens: the grammar's vocabulary mask and the sampling after it.\n# TYPE kosmos_constrained_pick_seconds_total counter\nkosmos_constrained_pick_seconds_total {}",
            self.constrained_pick_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        counter(
            &mut out,
            "kosmos_prefix_cache_bytes",
            "Bytes of keys and values the prefix cache holds.",
            &self.prefix_cache_bytes,
            "gauge",
        );
        counter(
            &mut out,
            "kosmos_queue_depth",
            "Requests waiting for the engine.",
            &self.queue_depth,
            "gauge",
        );
        counter(
            &mut out,
            "kosmos_active_sequences",
            "Sequences in the running batch.",
            &self.active_sequences,
            "gauge",
        );
        counter(
            &mut out,
            "kosmos_kv_slots_used",
            "KV cache slots holding tokens of running sequences.",
            &self.kv_slots_used,
            "gauge",
        );
        counter(
            &mut out,
            "kosmos_kv_slots_total",
            "KV cache slots allocated (rows x capacity).",
            &self.kv_slots_total,
            "gauge",
        );
        self.ttft.render(
            &mut out,
            "kosmos_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.itl.render(
            &mut out,
            "kosmos_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token(0.003);
        m.time_to_first_token(0.2);
        m.time_to_first_token(100.0);
        let text = m.render();
        assert!(text.contains("kosmos_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("kosmos_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("kosmos_time_to_first_token_seconds_bucket{le=\"60\"} 2"));
        assert!(text.contains("kosmos_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("kosmos_time_to_first_token_seconds_count 3"));
    }

    #[test]
    fn requests_are_counted_by_endpoint_and_status() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        let text = m.render();
        assert!(text.contains("kosmos_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"));
        assert!(text.contains("kosmos_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1"));
    }
}
