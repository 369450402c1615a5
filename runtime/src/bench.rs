//! `kosmos-rt bench`: time to first token (vision + prefill), decode latency per token, decode
//! throughput at several batch sizes, and peak memory, on a synthetic image + text prompt.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::generate::{GenerateParams, ImageInput, Prompt, VisionCache};
use crate::package::Package;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Words of text after the image (of the built-in prompt; ignored with `prompt`).
    pub prompt_words: usize,
    /// The user's own prompt (with `<image>` markers or not) and images, instead of the
    /// built-in synthetic ones: what speculative decoding gains depends on the text.
    pub prompt: Option<String>,
    pub images: Vec<std::path::PathBuf>,
    /// Tokens generated per prompt (`</s>` ignored).
    pub new_tokens: usize,
    pub batches: Vec<usize>,
    /// Timed runs per batch size (after one warm-up).
    pub runs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_words: 32,
            prompt: None,
            images: Vec::new(),
            new_tokens: 32,
            batches: vec![1, 4, 8],
            runs: 3,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// Session creation for both graphs when the package was opened.
    pub load_ms: f64,
    /// The batch size the latency figures below were measured at: the smallest one run.
    pub latency_batch: usize,
    /// Image preprocessing + vision + prefill + first token, median over runs.
    pub ttft_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub prompt_tokens: usize,
    /// One decode step, median and 90th percentile over all steps of all runs.
    pub decode_ms_median: f64,
    pub decode_ms_p90: f64,
    /// Decode throughput (tokens of all rows per second of decode steps) by batch size.
    pub tokens_per_s: BTreeMap<usize, f64>,
    /// Whole-request throughput (generated tokens / wall time incl. vision and prefill).
    pub end_to_end_tokens_per_s: BTreeMap<usize, f64>,
    pub peak_rss_mb: f64,
    /// Speculating: guessed tokens fed, over all timed runs at the latency batch, and the share
    /// the sampler picked too (each a token without a decoder call of its own).
    pub drafted: usize,
    pub acceptance: Option<f64>,
    /// Tokens per decode call, at the latency batch (1 without speculation).
    pub tokens_per_call: f64,
    /// With a draft model: its time per generation (vision, prefill and guessing calls),
    /// median over runs. It counts as decode time in `tokens_per_s`.
    pub draft_ms: Option<f64>,
    pub new_tokens: usize,
    pub runs: usize,
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A deterministic test image (gradient with a square), so no file is needed.
fn bench_image(seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(256, 256, |x, y| {
        let inside = (64..192).contains(&x) && (64..192).contains(&y);
        if inside {
            image::Rgb([200, (seed * 40 % 255) as u8, 40])
        } else {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        }
    })
}

pub fn run(pkg: &mut Package, opts: &BenchOptions) -> Result<BenchReport> {
    let words: Vec<&str> = [
        "a", "red", "circle", "on", "the", "left", "and", "a", "blue", "square",
    ]
    .iter()
    .copied()
    .cycle()
    .take(opts.prompt_words)
    .collect();
    let text = opts.prompt.clone().unwrap_or_else(|| words.join(" "));
    // Each prompt of a batch gets its own synthetic image, so the vision graph runs for each.
    let prompt = |i: u32| match (&opts.prompt, opts.images.is_empty()) {
        (Some(_), true) => Prompt::parse(&text, Vec::new()),
        (_, false) => Prompt::parse(&text, opts.images.iter().cloned().map(ImageInput::Path).collect()),
        (None, true) => Prompt::parse(&text, vec![ImageInput::Rgb(bench_image(i))]),
    };
    let params = GenerateParams {
        max_tokens: opts.new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    // No embedding cache: every run pays for the vision graph, as a new image would.
    let mut cache = VisionCache::new(0);
    let mut ttft = Vec::new();
    let mut vision = Vec::new();
    let mut prefill = Vec::new();
    let mut decode1 = Vec::new();
    let mut draft = Vec::new();
    let mut tokens_per_s = BTreeMap::new();
    let mut e2e = BTreeMap::new();
    let mut prompt_tokens = 0;
    let (mut drafted, mut accepted, mut calls, mut decoded) = (0, 0, 0, 0);
    let latency_batch = opts.batches.iter().copied().min().unwrap_or(1);
    for &b in &opts.batches {
        let prompts: Vec<Prompt> = (0..b as u32).map(prompt).collect::<Result<_>>()?;
        pkg.generate(&mut cache, &prompts, &params, &mut |_, _| true)?; // warm-up
        let mut decode_total = 0.0;
        let mut decode_tokens = 0usize;
        let mut wall_total = 0.0;
        let mut generated = 0usize;
        for _ in 0..opts.runs {
            let t0 = std::time::Instant::now();
            let g = pkg.generate(&mut cache, &prompts, &params, &mut |_, _| true)?;
            wall_total += t0.elapsed().as_secs_f64();
            let t = &g[0].timings;
            generated += g.iter().map(|x| x.tokens.len()).sum::<usize>();
            // A draft model's calls are part of decoding: without them no guess.
            decode_total += (t.decode_ms.iter().sum::<f64>() + t.draft_ms) / 1e3;
            // The first token of each prompt comes from the prefill.
            let after_first = g.iter().map(|x| x.tokens.len().saturating_sub(1)).sum::<usize>();
            decode_tokens += after_first;
            if b == latency_batch {
                drafted += t.drafted;
                accepted += t.accepted;
                calls += t.decode_ms.len();
                decoded += after_first;
                prompt_tokens = g[0].prompt_tokens;
                vision.push(t.vision_ms);
                prefill.push(t.prefill_ms);
                ttft.push(t.vision_ms + t.prefill_ms);
                decode1.extend_from_slice(&t.decode_ms);
                draft.push(t.draft_ms);
            }
        }
        tokens_per_s.insert(b, decode_tokens as f64 / decode_total.max(1e-9));
        e2e.insert(b, generated as f64 / wall_total.max(1e-9));
    }
    Ok(BenchReport {
        load_ms: pkg.load_ms,
        latency_batch,
        ttft_ms: median(&mut ttft),
        vision_ms: median(&mut vision),
        prefill_ms: median(&mut prefill),
        prompt_tokens,
        decode_ms_median: median(&mut decode1.clone()),
        decode_ms_p90: percentile(&mut decode1, 0.9),
        tokens_per_s,
        end_to_end_tokens_per_s: e2e,
        peak_rss_mb: peak_rss_mb(),
        drafted,
        acceptance: (drafted > 0).then(|| accepted as f64 / drafted as f64),
        tokens_per_call: decoded as f64 / calls.max(1) as f64 / latency_batch as f64,
        draft_ms: pkg.draft().is_some().then(|| median(&mut draft)),
        new_tokens: opts.new_tokens,
        runs: opts.runs,
    })
}
