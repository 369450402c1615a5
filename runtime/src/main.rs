use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kosmos_grammar::{Constraint, Json};
use kosmos_rt::{
    Device, GenerateParams, GuessSchedule, ImageInput, Package, Prompt, SessionOptions, Speculation,
    VisionCache,
};

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
    /// Do not register the fused ai.kosmos kernels (their ONNX function bodies run instead).
    #[arg(long)]
    without_custom_ops: bool,
    #[command(flatten)]
    speculate: Speculate,
}

/// Speculative decoding by prompt lookup (vLLM's `ngram` method).
#[derive(clap::Args)]
struct Speculate {
    /// Guess up to K tokens per decoder call from the text so far (what followed the latest
    /// earlier occurrence of its last n tokens, in the prompt or the output) and keep those the
    /// sampler picks too. The output does not change; repetitive output (extraction, code,
    /// JSON, quoting the prompt) comes faster. Needs a `--kv-cache buffer` package; `run`,
    /// `bench` and `eval` generate one prompt at a time with it. 0: off.
    #[arg(long, default_value_t = 0, value_name = "K")]
    speculative_tokens: usize,
    /// The longest n-gram looked up.
    #[arg(long, default_value_t = Speculation::default().ngram_max, value_name = "N")]
    prompt_lookup_max: usize,
    /// The shortest n-gram looked up.
    #[arg(long, default_value_t = Speculation::default().ngram_min, value_name = "N")]
    prompt_lookup_min: usize,
    /// serve, batch: speculate only while at most this many sequences decode together (with
    /// more, the guesses' compute costs more than the calls they save on a CPU).
    #[arg(long, default_value_t = Speculation::default().max_batch, value_name = "N")]
    speculative_max_batch: usize,
    /// How many guesses each call feeds: `adaptive` (two more after a call that kept them
    /// all, one fewer after one that did not) suits int4 / int8 packages, whose decoder calls
    /// on a CPU cost more with every position; `fixed` (K every time) suits fp32 ones; `auto`
    /// picks by the package.
    #[arg(long, value_enum, default_value = "auto")]
    speculative_schedule: ScheduleArg,
    /// A smaller `--kv-cache buffer` package with the same tokenizer that guesses instead of
    /// prompt lookup: it reads the prompt (images too) and what is generated, and proposes its
    /// most likely next tokens (llama.cpp's `--model-draft`). The output is still the model's
    /// own. Turns speculation on (`--speculative-tokens` defaults to 4). serve and batch need
    /// the draft's image size to be the model's.
    #[arg(long, value_name = "PACKAGE")]
    draft_model: Option<PathBuf>,
    /// The draft stops guessing at a token it gives less than this probability.
    #[arg(long, default_value_t = kosmos_rt::draft::default_p_min(), value_name = "P")]
    draft_p_min: f32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Auto,
    Fixed,
    Adaptive,
}

impl Speculate {
    /// Whether generation speculates (a number of guesses, or a draft model to make them).
    fn on(&self) -> bool {
        self.speculative_tokens > 0 || self.draft_model.is_some()
    }

    fn settings(&self) -> Result<Option<Speculation>> {
        if !self.on() {
            return Ok(None);
        }
        let s = Speculation {
            tokens: match self.speculative_tokens {
                0 => Speculation::default().tokens,
                k => k,
            },
            ngram_max: self.prompt_lookup_max,
            ngram_min: self.prompt_lookup_min,
            max_batch: self.speculative_max_batch,
            schedule: match self.speculative_schedule {
                ScheduleArg::Auto => GuessSchedule::Auto,
                ScheduleArg::Fixed => GuessSchedule::Fixed,
                ScheduleArg::Adaptive => GuessSchedule::Adaptive,
            },
        };
        s.check()
            .map_err(|m| anyhow::anyhow!("--speculative-tokens: {m}"))?;
        Ok(Some(s))
    }
}

/// Structured output: at most one of these.
#[derive(clap::Args)]
#[group(multiple = false)]
struct Structured {
    /// Output a JSON object.
    #[arg(long)]
    json: bool,
    /// Output JSON that this JSON Schema (a file) accepts.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Output text this regular expression matches in full.
    #[arg(long, value_name = "PATTERN")]
    regex: Option<String>,
    /// Output exactly one of these strings (repeat for each choice).
    #[arg(long)]
    choice: Vec<String>,
    /// Output text this GBNF grammar (llama.cpp's format, a file) accepts from its rule `root`.
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
}

impl Structured {
    fn constraint(&self) -> Result<Option<Constraint>> {
        let read =
            |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        Ok(if self.json {
            Some(Constraint::JsonObject)
        } else if let Some(p) = &self.json_schema {
            let schema = Json::parse(&read(p)?).with_context(|| format!("{}: not JSON", p.display()))?;
            Some(Constraint::JsonSchema(schema))
        } else if let Some(r) = &self.regex {
            Some(Constraint::Regex(r.clone()))
        } else if !self.choice.is_empty() {
            Some(Constraint::Choice(self.choice.clone()))
        } else if let Some(p) = &self.grammar {
            Some(Constraint::Grammar(read(p)?))
        } else {
            None
        })
    }
}

/// `--logit-bias ID=BIAS`.
/// Seconds as a positive, finite number (a `Duration` cannot hold anything else).
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s} seconds: give a positive number"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or("expected ID=BIAS, e.g. 42=-100")?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' is not a token id"))?;
    let bias = bias
        .trim()
        .parse()
        .map_err(|_| format!("'{bias}' is not a number"))?;
    Ok((id, bias))
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt; prints only the generated text on stdout.
    #[command(after_help = "Examples:\n  \
        kosmos-rt run pkg/tiny --image cat.png                      # caption\n  \
        kosmos-rt run pkg/tiny --image a.png --prompt 'Question: what colour is the circle? Answer:'\n  \
        kosmos-rt run pkg/tiny --image a.png --image b.png --prompt '<image> left, <image> right:'\n  \
        kosmos-rt run pkg/k1 --image cat.jpg --beams 5 --max-tokens 20\n  \
        kosmos-rt run pkg/tiny --image a.png --json-schema shape.json   # JSON the schema accepts\n  \
        kosmos-rt run pkg/k1 --image form.png --prompt '...' --speculative-tokens 4   # same output, faster\n  \
        kosmos-rt run pkg/k1 --image cat.jpg --draft-model pkg/k1-small   # a smaller model guesses\n  \
        kosmos-rt run pkg/tiny --image a.png --prompt 'Question: what colour is the circle? Answer:' --choice red --choice blue")]
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
        /// OpenAI's presence penalty: subtracted once from every token generated so far.
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        presence_penalty: f32,
        /// OpenAI's frequency penalty: subtracted once per time a token was generated so far.
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        frequency_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Also stop at this token id (repeatable; not part of the text).
        #[arg(long = "stop-token-id")]
        stop_token_ids: Vec<u32>,
        /// Add BIAS (-100 to 100) to token ID's logit: ID=BIAS (repeatable).
        #[arg(long, value_name = "ID=BIAS", value_parser = parse_bias, allow_hyphen_values = true)]
        logit_bias: Vec<(u32, f32)>,
        /// Sample only tokens at least this fraction as likely as the most likely one (0: off).
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        /// No `</s>` or stop token before this many tokens.
        #[arg(long, default_value_t = 0)]
        min_tokens: usize,
        /// Generate only these token ids (repeatable; `</s>` too only if given).
        #[arg(long = "allowed-token-id")]
        allowed_token_ids: Vec<u32>,
        /// Never generate this word (repeatable).
        #[arg(long = "bad-word")]
        bad_words: Vec<String>,
        /// Beam search width (the paper captions with 5).
        #[arg(long, default_value_t = 1)]
        beams: usize,
        /// Print tokens as they are generated.
        #[arg(long)]
        stream: bool,
        #[command(flatten)]
        structured: Structured,
        #[command(flatten)]
        engine: Engine,
    },
    /// Print the GBNF grammar a structured-output option compiles to, and check texts against it.
    #[command(after_help = "Examples:\n  \
        kosmos-rt grammar --json-schema person.json            # the grammar generation follows\n  \
        kosmos-rt grammar --regex '[0-9]{3}-[0-9]{4}' --check 555-1234 --check 5551234\n  \
        kosmos-rt grammar --grammar list.gbnf --check $'- a\\n- b\\n'")]
    Grammar {
        #[command(flatten)]
        structured: Structured,
        /// Say whether the grammar accepts this whole text (repeatable); exit status 1 if one
        /// is rejected.
        #[arg(long)]
        check: Vec<String>,
    },
    /// Loss and perplexity of the data's target text (teacher-forced), and greedy exact match
    /// on its caption/VQA examples, as `kosmos-train eval` measures them on the same data specs:
    /// compare a quantised package with its float export on your own data.
    #[command(after_help = "Examples:\n  \
        kosmos-rt eval pkg/tiny --data synthetic:shapes-vqa\n  \
        kosmos-train data synth --task shapes --split test --count 200 -o test-captions\n  \
        kosmos-rt eval pkg/tiny --data test-captions/manifest.jsonl\n  \
        kosmos-rt eval pkg/k1 --data 'shards/{00000..00009}.tar' --limit 1000 --json")]
    Eval {
        package: PathBuf,
        /// What `kosmos-train eval --data` reads: a JSONL manifest ({"image": path, "prompt"?:
        /// text, "text": reference}, {"text": ...} or {"segments": [{"text": ...}, {"image":
        /// path}, ...]}), WebDataset tar shards (brace ranges allowed), or synthetic:shapes,
        /// shapes-captions or shapes-vqa (the test split; 200 examples unless --limit).
        #[arg(long)]
        data: String,
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
        kosmos-rt bench pkg/k1 --json --new-tokens 64 --batch 1 --batch 8\n  \
        kosmos-rt bench pkg/k1 --image form.png --prompt 'Fields as JSON:' --batch 1 --speculative-tokens 4\n  \
        kosmos-rt bench pkg/k1 --batch 1 --draft-model pkg/k1-int4 --speculative-tokens 6")]
    Bench {
        package: PathBuf,
        /// Words of the built-in prompt's text after its image.
        #[arg(long, default_value_t = 32)]
        prompt_words: usize,
        /// Your own prompt instead (text with <image> markers, or after the images).
        #[arg(long)]
        prompt: Option<String>,
        /// Your own image (repeatable); with --prompt or without (captioning).
        #[arg(long)]
        image: Vec<PathBuf>,
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
    /// Run an OpenAI Batch API file (JSONL) offline through the server's handlers and engine.
    #[command(after_help = "Examples:\n  \
        kosmos-rt batch pkg/k1 -i requests.jsonl -o results.jsonl --allow-file-root images/\n  \
        kosmos-rt batch pkg/k1 -i requests.jsonl -o results.jsonl --resume   # after Ctrl-C or a crash\n\n\
        Each input line: {\"custom_id\": \"img-1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\",\n  \
          \"body\": {\"model\": \"k1\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": [\n    \
            {\"type\": \"image_url\", \"image_url\": {\"url\": \"file:///data/images/1.jpg\"}}]}]}}\n\
        (url may also be /v1/completions or /v1/responses; the body is what the server takes, without stream).\n\
        Each output line, in input order: {\"id\", \"custom_id\", \"response\": {\"status_code\", \"request_id\",\n  \
        \"body\"}, \"error\"}; error is null on success. Every line's envelope is checked before the model\n\
        loads. Results go to OUTPUT.partial until the last one is written; exit status 130 after Ctrl-C.")]
    Batch {
        /// Package directory (exported with `--kv-cache buffer`).
        package: PathBuf,
        /// The requests, one JSON object per line.
        #[arg(short, long)]
        input: PathBuf,
        /// Where the results go (written as OUTPUT.partial until complete).
        #[arg(short, long)]
        output: PathBuf,
        /// Continue OUTPUT.partial, left by an interrupted run, after its last whole line.
        #[arg(long)]
        resume: bool,
        /// Replace an existing OUTPUT (or OUTPUT.partial, without --resume).
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        settings: ServerSettings,
        #[command(flatten)]
        engine: Engine,
    },
    /// OpenAI-compatible HTTP server with continuous batching (needs a `--kv-cache buffer` package).
    #[command(after_help = "Examples:\n  \
        kosmos-export ckpt --to onnx --kv-cache buffer -o pkg/tiny\n  \
        kosmos-rt serve pkg/tiny --port 8000\n  \
        kosmos-rt serve pkg/k1 --host 0.0.0.0 --api-key \"$KEY\" --max-batch 16\n  \
        kosmos-rt serve pkg/k1 --device cuda --prefill-chunk 2048   # GPU: bigger prefill chunks\n  \
        kosmos-rt serve pkg/k1 --allowed-media-domains images.example.com   # fetch https image URLs from there\n  \
        kosmos-rt serve pkg/k1 --speculative-tokens 4   # the same answers in fewer decoder calls\n  \
        kosmos-rt serve pkg/k1 --draft-model pkg/k1-small   # guesses from a smaller model\n\n\
        curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\n  \
          \"model\": \"tiny\", \"max_tokens\": 16, \"temperature\": 0,\n  \
          \"messages\": [{\"role\": \"user\", \"content\": [\n    \
            {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}]}]}'\n\n\
        Structured output: add \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": ...}},\n\
        or vLLM's guided_json / guided_regex / guided_choice / guided_grammar, or tools with a forced tool_choice.\n\
        Also POST /v1/completions, OpenAI's Responses API (POST /v1/responses, stateless), vLLM's /tokenize,\n\
        /detokenize, /tokenizer_info; GET /v1/models, /health, /metrics. A request's \"priority\" (lower first)\n\
        may take a less urgent running request's row (--no-priority-preemption to wait instead).\n\n\
        KV memory: max-batch x capacity x 2 x layers x hidden x 4 bytes (fp32); the capacity follows\n\
        the longest prompt + max_tokens among running requests.")]
    Serve {
        /// Package directory (exported with `--kv-cache buffer`).
        package: PathBuf,
        /// Address to listen on (0.0.0.0 exposes the server to the network).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0: any free port; the bound address is printed on stdout).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Require `Authorization: Bearer KEY` on every endpoint but /health (or set KOSMOS_API_KEY).
        #[arg(long, env = "KOSMOS_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Sequences waiting for a row before requests get HTTP 429.
        #[arg(long, default_value_t = 256)]
        max_queue: usize,
        #[command(flatten)]
        settings: ServerSettings,
        #[command(flatten)]
        engine: Engine,
    },
}

/// What `serve` and `batch` share: the engine's sizes and the requests' limits.
#[derive(clap::Args)]
struct ServerSettings {
    /// Model id clients send (default: the package directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together (rows of the KV pool).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most prompt tokens (rows x width) one prefill call writes. Longer prefills are split,
    /// with a decode step for the running sequences between chunks, so a long prompt delays
    /// their next token by one chunk. 0: each admitted group in one call.
    #[arg(long, default_value_t = kosmos_rt::batch::EngineConfig::default().prefill_chunk)]
    prefill_chunk: usize,
    /// Allocate the KV pool for max-batch x the whole context at start (max-batch x context
    /// x 2 x layers x hidden x 4 bytes in fp32), so no request waits while it grows.
    #[arg(long)]
    kv_preallocate: bool,
    /// MiB of finished requests' keys and values kept so that a prompt starting the same way
    /// (the same image and instructions, a chat's earlier turns) skips that part of its
    /// prefill. 0: off.
    #[arg(long, default_value_t = kosmos_rt::batch::EngineConfig::default().prefix_cache_bytes >> 20)]
    prefix_cache_mb: usize,
    /// Never preempt: a request with a lower `priority` waits for a free row instead of taking
    /// the row of the least urgent running one (which would resume later where it was).
    #[arg(long)]
    no_priority_preemption: bool,
    /// max_tokens for requests that give none (bounded by the context left).
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Seconds before a request ends with HTTP 504 (in a batch, an error line with status 504)
    /// [default: serve 600, batch no limit, since a batch's requests wait for rows by design].
    #[arg(long)]
    request_timeout: Option<u64>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest encoded image in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_image_bytes: usize,
    /// Largest image side in pixels (checked before decoding).
    #[arg(long, default_value_t = 4096)]
    max_image_side: u32,
    /// Images per request.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Allow `file://` image URLs, only for files under this directory.
    #[arg(long)]
    allow_file_root: Option<PathBuf>,
    /// Download `http(s)://` image URLs (off: the server makes no network requests). Proxies
    /// come from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY.
    #[arg(long)]
    allow_remote_images: bool,
    /// Only from these hosts (exact names, comma-separated; redirects checked too). Implies
    /// --allow-remote-images.
    #[arg(long, value_delimiter = ',')]
    allowed_media_domains: Vec<String>,
    /// Seconds one image's download may take, redirects included.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    image_fetch_timeout: std::time::Duration,
}

impl ServerSettings {
    fn config(self) -> kosmos_rt::serve::ServeConfig {
        kosmos_rt::serve::ServeConfig {
            model_name: self.served_model_name,
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
            kv_preallocate: self.kv_preallocate,
            prefix_cache_bytes: self.prefix_cache_mb << 20,
            priority_preemption: !self.no_priority_preemption,
            default_max_tokens: self.default_max_tokens,
            request_timeout: self.request_timeout.map(std::time::Duration::from_secs),
            max_body_bytes: self.max_body_bytes,
            max_image_bytes: self.max_image_bytes,
            max_image_side: self.max_image_side,
            max_images: self.max_images,
            allow_file_root: self.allow_file_root,
            remote_images: (self.allow_remote_images || !self.allowed_media_domains.is_empty()).then_some(
                kosmos_rt::serve::RemoteImagesConfig {
                    allowed_domains: self.allowed_media_domains,
                    timeout: self.image_fetch_timeout,
                },
            ),
            ..Default::default()
        }
    }
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
        without_custom_ops: e.without_custom_ops,
        // A draft's calls and the model's alternate: neither's threads may spin through the other's.
        without_spinning: e.speculate.draft_model.is_some(),
    }
}

fn open(package: &std::path::Path, engine: &Engine) -> Result<Package> {
    // Settings are checked before the model loads.
    let speculation = engine.speculate.settings()?;
    kosmos_rt::draft::check_p_min(engine.speculate.draft_p_min)
        .map_err(|m| anyhow::anyhow!("--draft-p-min: {m}"))?;
    let mut pkg = Package::open(package, &session_options(engine, package))
        .with_context(|| format!("opening package {}", package.display()))?;
    pkg.set_speculation(speculation).context("--speculative-tokens")?;
    if let Some(dir) = &engine.speculate.draft_model {
        let draft = Package::open(dir, &session_options(engine, dir))
            .with_context(|| format!("opening the draft model {}", dir.display()))?;
        let draft = kosmos_rt::Draft::new(draft, engine.speculate.draft_p_min).context("--draft-model")?;
        pkg.set_draft(Some(draft)).context("--draft-model")?;
    }
    Ok(pkg)
}

fn main() {
    let cli = Cli::parse();
    // The server logs its address, pool sizes and shutdown; one-shot commands stay quiet.
    let default = if matches!(cli.command, Command::Serve { .. }) {
        "kosmos_rt=info,warn"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `kosmos-rt eval`'s progress on stderr (drawn on a terminal only): a bar where the number of
/// examples is known, a count otherwise.
fn eval_progress(data: &str, limit: Option<usize>) -> indicatif::ProgressBar {
    let (pb, template) = match kosmos_rt::eval::known_count(data, limit) {
        Some(n) => (
            indicatif::ProgressBar::new(n as u64),
            "{elapsed_precise} [{bar:30}] {pos}/{len} examples  {per_sec}  ETA {eta}",
        ),
        None => (
            indicatif::ProgressBar::no_length(),
            "{elapsed_precise} {spinner} {pos} examples  {per_sec}",
        ),
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    pb
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
            if engine.speculate.on() && batch_size > 1 {
                anyhow::bail!(
                    "--speculative-tokens / --draft-model: eval generates one prompt at a time with them; \
                     add --batch-size 1"
                );
            }
            let mut pkg = open(&package, &engine)?;
            let pb = eval_progress(&data, limit);
            let r = kosmos_rt::eval::evaluate(
                &mut pkg,
                &data,
                batch_size,
                limit,
                |want, got| {
                    if show {
                        pb.suspend(|| {
                            eprintln!(
                                "{} | {want} | {got}",
                                if want.trim() == got.trim() { "ok  " } else { "MISS" }
                            )
                        });
                    }
                },
                |done| pb.set_position(done as u64),
            )?;
            pb.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let exact = match r.exact_match {
                    Some(m) => format!("exact match {:.1}% ({}/{}), ", 100.0 * m, r.correct, r.captioned),
                    None => String::new(),
                };
                let skipped = match r.skipped {
                    0 => String::new(),
                    n => format!(" ({n} bad records skipped)"),
                };
                println!(
                    "{data}: {} examples{skipped}, {exact}loss {:.4}, perplexity {:.4} over {} target tokens",
                    r.items, r.loss, r.perplexity, r.scored_tokens
                );
            }
            Ok(())
        }
        Command::Bench {
            package,
            prompt_words,
            prompt,
            image,
            new_tokens,
            batches,
            runs,
            json,
            engine,
        } => {
            let speculating = engine.speculate.on();
            if speculating && batches.iter().any(|&b| b > 1) {
                anyhow::bail!(
                    "--speculative-tokens / --draft-model: bench generates one prompt at a time with them; measure --batch 1 \
                     (kosmos-rt serve speculates for several sequences at once)"
                );
            }
            let mut pkg = open(&package, &engine)?;
            let opts = kosmos_rt::bench::BenchOptions {
                prompt_words,
                prompt,
                images: image,
                new_tokens,
                batches: match (batches.is_empty(), speculating) {
                    (false, _) => batches,
                    (true, false) => vec![1, 4, 8],
                    (true, true) => vec![1],
                },
                runs: runs.max(1),
            };
            let r = kosmos_rt::bench::run(&mut pkg, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("package          {}", package.display());
                println!("load             {:.0} ms (ONNX Runtime sessions)", r.load_ms);
                println!(
                    "prompt           {} tokens (image + text), {} new tokens",
                    r.prompt_tokens, r.new_tokens
                );
                println!(
                    "ttft             {:.1} ms (vision {:.1} ms + prefill {:.1} ms) at batch {}",
                    r.ttft_ms, r.vision_ms, r.prefill_ms, r.latency_batch
                );
                println!(
                    "decode           {:.2} ms/step median, {:.2} p90 at batch {}",
                    r.decode_ms_median, r.decode_ms_p90, r.latency_batch
                );
                if let Some(a) = r.acceptance {
                    println!(
                        "speculation      {:.0}% of {} guesses kept, {:.2} tokens per decode step",
                        100.0 * a,
                        r.drafted,
                        r.tokens_per_call
                    );
                } else if engine.speculate.draft_model.is_some() {
                    println!("speculation      no guess: the draft was never sure enough (--draft-p-min)");
                } else if speculating {
                    println!("speculation      no guess: prompt lookup found no repeat");
                }
                if let Some(d) = r.draft_ms {
                    println!(
                        "draft            {d:.1} ms per generation (vision, prefill, guesses; in decode below)"
                    );
                }
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
        Command::Serve {
            package,
            host,
            port,
            api_key,
            max_queue,
            settings,
            engine,
        } => {
            let pkg = open(&package, &engine)?;
            let cfg = kosmos_rt::serve::ServeConfig {
                host,
                port,
                api_key: api_key.filter(|k| !k.is_empty()),
                max_queue,
                request_timeout: Some(std::time::Duration::from_secs(
                    settings.request_timeout.unwrap_or(600),
                )),
                ..settings.config()
            };
            // One async worker is plenty for HTTP and JSON (image decoding runs on the blocking
            // pool); the cores belong to the engine's ONNX Runtime threads.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(kosmos_rt::serve::serve(pkg, cfg, |addr| {
                // Scripts read this line to find a port chosen with --port 0.
                println!("listening on http://{addr}");
                let _ = std::io::stdout().flush();
            }))?;
            Ok(())
        }
        Command::Batch {
            package,
            input,
            output,
            resume,
            force,
            quiet,
            settings,
            engine,
        } => {
            use kosmos_rt::serve::batch_job::{BatchJob, plan, run_batch};
            // The file is checked before the model loads.
            let plan = plan(BatchJob {
                input,
                output,
                resume,
                overwrite: force,
                progress: !quiet,
            })?;
            if plan.resumed() > 0 {
                eprintln!(
                    "resuming: {} of {} requests already written",
                    plan.resumed(),
                    plan.requests()
                );
            }
            let pkg = open(&package, &engine)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let s = rt.block_on(run_batch(pkg, settings.config(), plan))?;
            let done = s.succeeded + s.failed;
            eprintln!(
                "{done} requests in {:.1} s: {} succeeded, {} failed; {} prompt + {} completion tokens ({:.1} completion tokens/s)",
                s.seconds,
                s.succeeded,
                s.failed,
                s.prompt_tokens,
                s.completion_tokens,
                s.completion_tokens as f64 / s.seconds.max(1e-9)
            );
            if s.interrupted {
                eprintln!(
                    "interrupted: {} of {} requests written to {}.partial; the same command with --resume continues",
                    s.resumed + done,
                    s.requests,
                    s.output.display()
                );
                std::process::exit(130);
            }
            eprintln!("wrote {}", s.output.display());
            Ok(())
        }
        Command::Grammar { structured, check } => {
            let c = structured
                .constraint()?
                .context("give one of --json, --json-schema, --regex, --choice, --grammar")?;
            let gbnf = c.to_gbnf()?;
            let grammar = c.compile()?;
            if check.is_empty() {
                print!("{gbnf}");
                return Ok(());
            }
            let mut rejected = 0;
            for text in &check {
                let ok = Constraint::matches(&grammar, text);
                rejected += usize::from(!ok);
                println!("{}\t{text:?}", if ok { "accepted" } else { "rejected" });
            }
            if rejected > 0 {
                std::process::exit(1);
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
            presence_penalty,
            frequency_penalty,
            seed,
            stop,
            stop_token_ids,
            logit_bias,
            min_p,
            min_tokens,
            allowed_token_ids,
            bad_words,
            beams,
            stream,
            structured,
            engine,
        } => {
            let constraint = match structured.constraint()? {
                Some(c) => Some(c.compile().context("structured output")?),
                None => None,
            };
            let mut pkg = open(&package, &engine)?;
            let images = image.into_iter().map(ImageInput::Path).collect();
            let prompt = Prompt::parse(&prompt, images)?;
            let params = GenerateParams {
                max_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed,
                stop,
                beams: beams.max(1),
                ignore_eos: false,
                logit_bias,
                min_p,
                min_tokens,
                stop_token_ids,
                constraint,
                bad_words: kosmos_rt::bad_word_tokens(&pkg.tokenizer, &bad_words)
                    .map_err(anyhow::Error::msg)?,
                allowed_token_ids,
            };
            if let Some((field, message)) = params
                .invalid_setting()
                .or_else(|| params.invalid_token(pkg.manifest.decoder.vocab_size))
            {
                anyhow::bail!("--{}: {message}", field.replace('_', "-"));
            }
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
