//! `kosmos-train`: create, train and evaluate KOSMOS-1 checkpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kosmos_models::config::PRESETS;
use kosmos_models::{KosmosConfig, KosmosTokenizer, param_count};
use kosmos_train::{checkpoint, corpus, model::Kosmos};

#[derive(Parser)]
#[command(name = "kosmos-train", version, about = "Create, train and evaluate KOSMOS-1 checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a freshly initialised checkpoint (config.json, model.safetensors, tokenizer.json).
    #[command(after_help = "Examples:\n  kosmos-train init --preset tiny -o runs/tiny-init\n  \
        kosmos-train init --preset kosmos-1 --seed 7 -o runs/kosmos1-random\n  \
        kosmos-train init --preset kosmos-1 --tokenizer my/tokenizer.json -o runs/k1")]
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
    }
}

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn init(preset: &str, seed: i64, tokenizer: Option<PathBuf>, output: PathBuf, force: bool) -> Result<()> {
    let mut config = KosmosConfig::preset(preset)?;
    if output.exists() && !force && output.read_dir().map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{}: output exists; pass --force to replace it", output.display());
    }
    let tok = match tokenizer {
        Some(path) => {
            let tok = KosmosTokenizer::load(&path, &config.tokenizer)
                .with_context(|| format!("loading tokenizer {}", path.display()))?;
            config.decoder.vocab_size = tok.vocab_size();
            config.validate()?;
            tok
        }
        None => {
            let pb = spinner("training the built-in tokenizer");
            let tok = KosmosTokenizer::train(
                corpus::builtin_corpus().into_iter(),
                config.decoder.vocab_size,
                &config.tokenizer,
            )?;
            pb.finish_and_clear();
            tok
        }
    };
    let n = param_count(&config);
    tracing::info!(preset, seed, params = n, "initialising");
    let t0 = Instant::now();
    let pb = spinner(&format!("initialising {n} parameters"));
    let (vs, _model) = Kosmos::build(&config, tch::Device::Cpu, Some(seed));
    pb.finish_and_clear();
    let pb = spinner(&format!("writing {}", output.display()));
    let dir = checkpoint::save(&vs, &output, &config, &tok, force, None)
        .with_context(|| format!("writing checkpoint {}", output.display()))?;
    pb.finish_and_clear();
    tracing::info!(dir = %dir.display(), secs = t0.elapsed().as_secs_f32(), "checkpoint written");
    println!("{}", dir.display());
    Ok(())
}
