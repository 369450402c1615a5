//! `kosmos-train`: create, train and evaluate KOSMOS-1 checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kosmos_models::config::PRESETS;
use kosmos_models::{KosmosConfig, param_count};
use kosmos_train::checkpoint;
use kosmos_train::device::{DeviceArg, resolve};
use kosmos_train::fit::{FitOptions, FreezeVision, Precision, Recipe, Start};
use kosmos_train::init::{TokenizerSource, init_checkpoint};
use kosmos_train::synthetic::Split;

#[derive(Parser)]
#[command(
    name = "kosmos-train",
    version,
    about = "Create, train and evaluate KOSMOS-1 checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a freshly initialised checkpoint (config.json, model.safetensors, tokenizer.json).
    #[command(
        after_help = "Examples:\n  kosmos-train init --preset tiny -o runs/tiny-init\n  \
        kosmos-train init --preset kosmos-1 --seed 7 -o runs/kosmos1-random\n  \
        kosmos-train init --preset kosmos-1 --tokenizer my/tokenizer.json -o runs/k1"
    )]
    Init {
        /// Built-in model config.
        #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: String,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Use this tokenizer.json instead of training the built-in one; the decoder's vocab_size
        /// follows it. Its special tokens must be <s>=0 <pad>=1 </s>=2 <unk>=3 <image>=4 </image>=5.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Output checkpoint directory.
        #[arg(short, long)]
        output: PathBuf,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
    },
    /// Print a built-in preset's config.json (what `init --preset` writes) to stdout.
    #[command(after_help = "Example:\n  kosmos-train preset kosmos-1 > config.json")]
    Preset {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        name: String,
    },
    /// Train: from a preset (random init) or a checkpoint, on mixed data sources.
    #[command(after_help = "Examples:\n  \
        kosmos-train fit --preset tiny --data synthetic:shapes -o runs/tiny\n  \
        kosmos-train fit --preset tiny --data synthetic:shapes -o runs/tiny --resume\n  \
        kosmos-train fit --init runs/k1 --data text.jsonl:0.5 --data 'laion/{00000..00009}.tar:0.5' \\\n      \
        --data interleaved.jsonl:0.2 --steps 10000 --batch-size 8 --device cuda -o runs/k1-fit\n\n\
        Data specs: synthetic:shapes (captions + VQA), synthetic:shapes-captions, synthetic:shapes-vqa,\n\
        a JSONL manifest, or WebDataset .tar shards (brace ranges allowed); ':W' sets a mixing weight.\n\
        Unset recipe flags take the preset's default recipe (tiny: its own; otherwise the paper's).")]
    Fit(Box<FitArgs>),
    /// Loss, perplexity and (for caption/VQA data) greedy exact match of a checkpoint.
    #[command(
        after_help = "Examples:\n  kosmos-train eval runs/tiny --data synthetic:shapes-captions --limit 200\n  \
        kosmos-train eval runs/tiny --data data/test/manifest.jsonl --json"
    )]
    Eval {
        checkpoint: PathBuf,
        #[arg(long)]
        data: String,
        /// At most this many examples (synthetic data: how many to draw from the test split).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Print one JSON object (loss, perplexity, exact_match, ...).
        #[arg(long)]
        json: bool,
        /// Print every generated caption/answer next to its reference (stderr).
        #[arg(long)]
        show: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
    },
    /// Data utilities.
    #[command(subcommand)]
    Data(DataCommand),
    /// Tokenizer utilities.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Load a checkpoint fully (every file validated, every tensor loaded) and summarise it.
    #[command(after_help = "Example:\n  kosmos-train info runs/tiny-init")]
    Info {
        /// Checkpoint directory.
        checkpoint: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write synthetic items as PNG files plus DIR/manifest.jsonl.
    #[command(
        after_help = "Example:\n  kosmos-train data synth --task shapes --split test --count 200 -o data/shapes-test"
    )]
    Synth {
        #[arg(long, value_parser = ["shapes", "shapes-vqa"])]
        task: String,
        #[arg(long, default_value = "train")]
        split: Split,
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a Unigram tokenizer with the KOSMOS special tokens from text files (one text per line).
    #[command(
        after_help = "Example:\n  kosmos-train tokenizer train --corpus a.txt b.txt --vocab-size 32002 -o tokenizer.json"
    )]
    Train {
        #[arg(long, num_args = 1.., required = true)]
        corpus: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct FitArgs {
    /// Start from a built-in config with random weights.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS), conflicts_with = "init", required_unless_present = "init")]
    preset: Option<String>,
    /// Start from this checkpoint.
    #[arg(long)]
    init: Option<PathBuf>,
    /// A data source (repeatable), with an optional :weight.
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Output checkpoint directory (also holds metrics.jsonl, loss.png, trainer_state/).
    #[arg(short, long)]
    output: PathBuf,
    /// Continue the run saved in --output exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Replace an existing --output.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Tokens per packed sequence.
    #[arg(long)]
    max_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup: Option<u64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    eps: Option<f64>,
    /// Gradient-norm clip (0: off).
    #[arg(long)]
    clip: Option<f64>,
    #[arg(long, value_enum)]
    freeze_vision: Option<FreezeVision>,
    /// Default: bf16 on CUDA, fp32 on CPU.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    #[arg(long)]
    save_every: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Hugging Face CLIP safetensors to start the vision tower from.
    #[arg(long)]
    vision_from: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
        Command::Init {
            preset,
            seed,
            tokenizer,
            output,
            force,
        } => init(&preset, seed, tokenizer, output, force),
        Command::Info { checkpoint } => info(&checkpoint),
        Command::Preset { name } => {
            let config = KosmosConfig::preset(&name)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Fit(args) => fit(*args),
        Command::Eval {
            checkpoint,
            data,
            limit,
            batch_size,
            json,
            show,
            device,
        } => eval(&checkpoint, &data, limit, batch_size, json, show, device),
        Command::Data(DataCommand::Synth {
            task,
            split,
            count,
            seed,
            output,
            force,
        }) => synth(&task, split, count, seed, &output, force),
        Command::Tokenizer(TokenizerCommand::Train {
            corpus,
            vocab_size,
            output,
        }) => train_tokenizer(&corpus, vocab_size, &output),
    }
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn init(preset: &str, seed: i64, tokenizer: Option<PathBuf>, output: PathBuf, force: bool) -> Result<()> {
    let config = KosmosConfig::preset(preset)?;
    let source = match &tokenizer {
        Some(path) => TokenizerSource::File(path),
        None => TokenizerSource::Builtin,
    };
    tracing::info!(preset, seed, params = param_count(&config), "initialising");
    let t0 = Instant::now();
    let pb = spinner("initialising and writing the checkpoint");
    let dir = init_checkpoint(config, seed, source, &output, force)
        .with_context(|| format!("writing checkpoint {}", output.display()))?;
    pb.finish_and_clear();
    tracing::info!(dir = %dir.display(), secs = t0.elapsed().as_secs_f32(), "checkpoint written");
    println!("{}", dir.display());
    Ok(())
}

/// Load a checkpoint completely (config, tokenizer, every tensor into the model) and summarise it.
fn info(dir: &Path) -> Result<()> {
    let (_vs, model, ckpt) = checkpoint::load(dir, tch::Device::Cpu)?;
    let c = &model.config;
    println!("checkpoint   {}", ckpt.dir.display());
    println!("variant      {}", c.variant);
    println!("parameters   {}", param_count(c));
    println!(
        "vision       CLIP ViT {} layers x {} ({} heads), {} px, patch {}, {} tokens",
        c.vision.num_hidden_layers,
        c.vision.hidden_size,
        c.vision.num_attention_heads,
        c.vision.image_size,
        c.vision.patch_size,
        c.vision.num_positions()
    );
    println!(
        "resampler    depth {}, {} latents, {} heads x {}",
        c.resampler.depth, c.resampler.num_latents, c.resampler.heads, c.resampler.dim_head
    );
    println!(
        "decoder      {} layers x {} ({} heads), FFN {}, vocab {}, context {}",
        c.decoder.decoder_layers,
        c.decoder.decoder_embed_dim,
        c.decoder.decoder_attention_heads,
        c.decoder.decoder_ffn_embed_dim,
        c.decoder.vocab_size,
        c.decoder.max_target_positions
    );
    println!("tokenizer    {} entries", ckpt.tokenizer.vocab_size());
    Ok(())
}

fn fit(a: FitArgs) -> Result<()> {
    let device = resolve(a.device)?;
    let preset = a.preset.as_deref().unwrap_or("kosmos-1");
    let mut r = if a.init.is_some() {
        Recipe::paper()
    } else {
        Recipe::for_preset(preset)
    };
    r.data = a.data.clone();
    r.seed = a.seed;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { r.$f = v; } )* };
    }
    set!(
        steps,
        batch_size,
        grad_accum,
        max_len,
        lr,
        warmup,
        weight_decay,
        beta1,
        beta2,
        eps,
        clip,
        freeze_vision,
        save_every
    );
    r.precision = a.precision.unwrap_or(if device.is_cuda() {
        Precision::Bf16
    } else {
        Precision::Fp32
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let start = match &a.init {
        Some(p) => Start::Init(p),
        None => Start::Preset(preset),
    };
    let summary = kosmos_train::fit::fit(FitOptions {
        start,
        recipe: r,
        output: a.output.clone(),
        resume: a.resume,
        force: a.force,
        device,
        vision_from: a.vision_from.clone(),
        stop,
        progress: !a.quiet,
    })
    .with_context(|| format!("training into {}", a.output.display()))?;
    eprintln!(
        "{} after {} steps: loss {} -> {}; checkpoint {}{}",
        if summary.interrupted {
            "interrupted"
        } else {
            "done"
        },
        summary.steps_done,
        summary.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.checkpoint.display(),
        if summary.skipped_records > 0 {
            format!(" ({} bad records skipped)", summary.skipped_records)
        } else {
            String::new()
        }
    );
    if summary.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn eval(
    dir: &Path,
    data: &str,
    limit: Option<usize>,
    batch: usize,
    json: bool,
    show: bool,
    device: DeviceArg,
) -> Result<()> {
    let device = resolve(device)?;
    let (_vs, model, ckpt) = checkpoint::load(dir, device)?;
    let synthetic = data.starts_with("synthetic:");
    let limit = limit.or(synthetic.then_some(200));
    let mut source = kosmos_train::data::open_source(
        data,
        Split::Test,
        0,
        limit.map(|l| l as u64).filter(|_| synthetic),
    )?;
    let report = kosmos_train::eval::evaluate(
        &model,
        &ckpt.tokenizer,
        source.as_mut(),
        limit,
        batch.max(1),
        |p| {
            if show {
                let mark = if p.generated.trim() == p.reference.trim() {
                    "ok "
                } else {
                    "BAD"
                };
                eprintln!(
                    "{mark} {}: {:?} (reference {:?})",
                    p.origin, p.generated, p.reference
                );
            }
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("examples     {}", report.examples);
        println!("loss         {:.4}", report.loss);
        println!("perplexity   {:.3}", report.perplexity);
        match report.exact_match {
            Some(em) => println!("exact match  {:.1} % of {}", em * 100.0, report.captioned),
            None => println!("exact match  - (no caption/VQA items)"),
        }
        if report.skipped > 0 {
            println!("skipped      {}", report.skipped);
        }
    }
    Ok(())
}

fn synth(task: &str, split: Split, count: u64, seed: u64, out: &Path, force: bool) -> Result<()> {
    use kosmos_train::synthetic::{Task, item};
    let task_kind = if task == "shapes" {
        Task::Shapes
    } else {
        Task::ShapesVqa
    };
    let staged = kosmos_models::atomic::StagedDir::new(out, force)?;
    let mut manifest = String::new();
    let pb = indicatif::ProgressBar::new(count);
    for i in 0..count {
        let it = item(task_kind, split, seed, i);
        let name = format!("{i:06}.png");
        it.image
            .save(staged.path().join(&name))
            .with_context(|| format!("writing {name}"))?;
        let mut rec = serde_json::json!({ "image": name, "text": it.text });
        if let Some(p) = it.prompt {
            rec["prompt"] = p.into();
        }
        manifest.push_str(&rec.to_string());
        manifest.push('\n');
        pb.inc(1);
    }
    pb.finish_and_clear();
    kosmos_models::atomic::write_atomic(&staged.path().join("manifest.jsonl"), manifest.as_bytes())?;
    let dir = staged.commit()?;
    println!("{}", dir.join("manifest.jsonl").display());
    Ok(())
}

fn train_tokenizer(corpus: &[PathBuf], vocab_size: usize, out: &Path) -> Result<()> {
    for f in corpus {
        std::fs::metadata(f).with_context(|| format!("corpus file {}", f.display()))?;
    }
    let lines = || {
        corpus.iter().flat_map(|f| {
            let file = std::fs::File::open(f).expect("checked above");
            std::io::BufRead::lines(std::io::BufReader::new(file)).map_while(std::result::Result::ok)
        })
    };
    let special = kosmos_models::SpecialTokens::default();
    let pb = spinner("training the tokenizer");
    let tok = kosmos_models::KosmosTokenizer::train(lines, vocab_size, &special)?;
    pb.finish_and_clear();
    tok.save(out)?;
    eprintln!("{} entries -> {}", tok.vocab_size(), out.display());
    Ok(())
}
