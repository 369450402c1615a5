//! `kosmos-train`: create, train and evaluate KOSMOS-1 checkpoints.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kosmos_models::config::PRESETS;
use kosmos_models::{KosmosConfig, param_count};
use kosmos_train::checkpoint;
use kosmos_train::init::{TokenizerSource, init_checkpoint};

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
    /// Load a checkpoint fully (every file validated, every tensor loaded) and summarise it.
    #[command(after_help = "Example:\n  kosmos-train info runs/tiny-init")]
    Info {
        /// Checkpoint directory.
        checkpoint: PathBuf,
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
        Command::Info { checkpoint } => info(&checkpoint),
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
