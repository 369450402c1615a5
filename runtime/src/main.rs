use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kosmos_rt::{Device, GenerateParams, ImageInput, Package, Prompt, SessionOptions, VisionCache};

#[derive(Parser)]
#[command(
    name = "kosmos-rt",
    version,
    about = "Run exported KOSMOS-1 packages over ONNX Runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Tensorrt,
}

#[derive(clap::Args)]
struct Engine {
    /// Execution provider; a missing one is an error unless --allow-fallback.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Run on the CPU when the requested provider is missing.
    #[arg(long)]
    allow_fallback: bool,
    /// TensorRT engine cache directory (default: <package>/trt_cache).
    #[arg(long)]
    engine_cache: Option<PathBuf>,
    /// Intra-op threads (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt; prints only the generated text on stdout.
    #[command(after_help = "Examples:\n  \
        kosmos-rt run pkg/tiny --image cat.png                      # caption\n  \
        kosmos-rt run pkg/tiny --image a.png --prompt 'Question: what colour is the circle? Answer:'\n  \
        kosmos-rt run pkg/tiny --image a.png --image b.png --prompt '<image> left, <image> right:'\n  \
        kosmos-rt run pkg/k1 --image cat.jpg --beams 5 --max-tokens 20")]
    Run {
        package: PathBuf,
        /// An image (PNG/JPEG/WebP); repeat for several, placed by <image> markers in the prompt.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Prompt text; without it, the model continues after the image(s) (captioning).
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// 0: greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Beam search width (the paper captions with 5).
        #[arg(long, default_value_t = 1)]
        beams: usize,
        /// Print tokens as they are generated.
        #[arg(long)]
        stream: bool,
        #[command(flatten)]
        engine: Engine,
    },
    /// Greedy exact match on a caption/VQA manifest (as `kosmos-train eval` measures it).
    #[command(after_help = "Example:\n  \
        kosmos-train data synth --task shapes --split test --count 200 -o test-captions\n  \
        kosmos-rt eval pkg/tiny --data test-captions/manifest.jsonl")]
    Eval {
        package: PathBuf,
        /// JSONL manifest: {"image": path, "prompt"?: text, "text": reference} per line.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long)]
        limit: Option<usize>,
        /// Print each reference and output on stderr.
        #[arg(long)]
        show: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        engine: Engine,
    },
    /// Measure time to first token, decode latency, throughput at batch 1/4/8 and peak memory.
    #[command(after_help = "Examples:\n  \
        kosmos-rt bench pkg/tiny\n  \
        kosmos-rt bench pkg/k1 --json --new-tokens 64 --batch 1 --batch 8")]
    Bench {
        package: PathBuf,
        /// Words of prompt text after the image.
        #[arg(long, default_value_t = 32)]
        prompt_words: usize,
        /// Tokens generated per prompt.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Batch sizes (repeatable; default 1, 4, 8).
        #[arg(long = "batch")]
        batches: Vec<usize>,
        /// Timed runs per batch size.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        engine: Engine,
    },
}

fn session_options(e: &Engine, package: &std::path::Path) -> SessionOptions {
    SessionOptions {
        device: match e.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
            DeviceArg::Tensorrt => Device::TensorRt {
                engine_cache: e
                    .engine_cache
                    .clone()
                    .unwrap_or_else(|| package.join("trt_cache")),
            },
        },
        allow_fallback: e.allow_fallback,
        threads: e.threads,
    }
}

fn open(package: &std::path::Path, engine: &Engine) -> Result<Package> {
    Package::open(package, &session_options(engine, package))
        .with_context(|| format!("opening package {}", package.display()))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval {
            package,
            data,
            batch_size,
            limit,
            show,
            json,
            engine,
        } => {
            let mut pkg = open(&package, &engine)?;
            let r = kosmos_rt::eval::evaluate(&mut pkg, &data, batch_size, limit, |want, got| {
                if show {
                    eprintln!(
                        "{} | {want} | {got}",
                        if want.trim() == got.trim() { "ok  " } else { "MISS" }
                    );
                }
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "exact match {:.1}% ({}/{}) on {}",
                    100.0 * r.exact_match,
                    r.correct,
                    r.items,
                    data.display()
                );
            }
            Ok(())
        }
        Command::Bench {
            package,
            prompt_words,
            new_tokens,
            batches,
            runs,
            json,
            engine,
        } => {
            let mut pkg = open(&package, &engine)?;
            let opts = kosmos_rt::bench::BenchOptions {
                prompt_words,
                new_tokens,
                batches: if batches.is_empty() {
                    vec![1, 4, 8]
                } else {
                    batches
                },
                runs: runs.max(1),
            };
            let r = kosmos_rt::bench::run(&mut pkg, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("package          {}", package.display());
                println!(
                    "prompt           {} tokens (image + text), {} new tokens",
                    r.prompt_tokens, r.new_tokens
                );
                println!(
                    "ttft             {:.1} ms (vision {:.1} ms + prefill {:.1} ms)",
                    r.ttft_ms, r.vision_ms, r.prefill_ms
                );
                println!(
                    "decode           {:.2} ms/token median, {:.2} p90",
                    r.decode_ms_median, r.decode_ms_p90
                );
                for (b, t) in &r.tokens_per_s {
                    println!(
                        "batch {b:<3}        {t:.1} tokens/s decode, {:.1} tokens/s end to end",
                        r.end_to_end_tokens_per_s[b]
                    );
                }
                println!("peak RSS         {:.0} MB", r.peak_rss_mb);
            }
            Ok(())
        }
        Command::Run {
            package,
            image,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            beams,
            stream,
            engine,
        } => {
            let mut pkg = open(&package, &engine)?;
            let images = image.into_iter().map(ImageInput::Path).collect();
            let prompt = Prompt::parse(&prompt, images)?;
            let params = GenerateParams {
                max_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
                beams: beams.max(1),
                ignore_eos: false,
            };
            let mut cache = VisionCache::new(16);
            let mut out = std::io::stdout();
            let mut on_token = |_: usize, piece: &str| {
                if stream {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }
                true
            };
            let g = pkg.generate(&mut cache, &[prompt], &params, &mut on_token)?;
            if stream {
                println!();
            } else {
                println!("{}", g[0].text.trim_start());
            }
            Ok(())
        }
    }
}
