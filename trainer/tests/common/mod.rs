//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_models::KosmosConfig;
use kosmos_models::sequence::{Assembled, Segment, assemble};
use kosmos_train::init::{TokenizerSource, init_checkpoint};
use tch::{Kind, Tensor};

/// The Python of the venv made by scripts/setup.sh (path set by .cargo/config.toml).
pub fn venv_python() -> PathBuf {
    let venv =
        std::env::var("KOSMOS_VENV").unwrap_or_else(|_| format!("{}/../.venv", env!("CARGO_MANIFEST_DIR")));
    let py = Path::new(&venv).join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh", py.display());
    py
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Run a Python script from scripts/ in the venv; panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&str]) {
    let out = Command::new(venv_python())
        .arg(scripts_dir().join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config with odd sizes everywhere (head dims 24/30/20, 5×5 patch grid, 7 latents, embedding
/// scaling on, a context whose centre is not a power of two).
pub fn odd_config() -> KosmosConfig {
    let mut c = KosmosConfig::tiny();
    c.vision.hidden_size = 72;
    c.vision.intermediate_size = 100;
    c.vision.num_hidden_layers = 3;
    c.vision.num_attention_heads = 3;
    c.vision.image_size = 35;
    c.vision.patch_size = 7;
    c.resampler.dim = 72;
    c.resampler.depth = 2;
    c.resampler.dim_head = 20;
    c.resampler.heads = 3;
    c.resampler.num_latents = 7;
    c.resampler.num_media_embeds = 3;
    c.resampler.ff_mult = 3;
    c.decoder.decoder_embed_dim = 90;
    c.decoder.decoder_attention_heads = 3;
    c.decoder.decoder_ffn_embed_dim = 170;
    c.decoder.decoder_layers = 3;
    c.decoder.vocab_size = 301;
    c.decoder.max_target_positions = 97;
    c.decoder.no_scale_embedding = false;
    c.decoder.layernorm_eps = 1e-6;
    c.validate().expect("odd config is valid");
    c
}

/// Write a seeded random checkpoint for `config` under `dir`.
pub fn make_checkpoint(config: &KosmosConfig, seed: i64, dir: &Path) -> PathBuf {
    init_checkpoint(config.clone(), seed, TokenizerSource::Builtin, dir, true).expect("init checkpoint")
}

/// Deterministic pixels for `n` images (already normalised, roughly CLIP's range).
pub fn pixels(config: &KosmosConfig, n: i64, seed: i64) -> Tensor {
    let s = config.vision.image_size as i64;
    kosmos_train::rng::seeded(seed, || {
        Tensor::randn([n, 3, s, s], (Kind::Float, tch::Device::Cpu))
    })
}

/// Text, an image, more text: the parity prompt.
pub fn image_in_middle(
    tok: &kosmos_models::KosmosTokenizer,
    config: &KosmosConfig,
    before: &str,
    after: &str,
) -> Assembled {
    assemble(
        tok,
        &[
            Segment::Text(before.into()),
            Segment::Image,
            Segment::Text(after.into()),
        ],
        config.image_tokens(),
        false,
    )
    .expect("assemble")
}

/// Stack equally long prompts into (input_ids [b,s] i64, image_mask [b,s] bool).
pub fn batch(prompts: &[Assembled]) -> (Tensor, Tensor) {
    let s = prompts[0].len() as i64;
    assert!(prompts.iter().all(|p| p.len() as i64 == s), "equal lengths");
    let ids: Vec<i64> = prompts
        .iter()
        .flat_map(|p| p.input_ids.iter().map(|&i| i as i64))
        .collect();
    let mask: Vec<bool> = prompts
        .iter()
        .flat_map(|p| p.image_mask.iter().copied())
        .collect();
    let b = prompts.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, s]),
        Tensor::from_slice(&mask).view([b, s]),
    )
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a - b).abs().max().double_value(&[])
}
