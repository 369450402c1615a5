//! The checkpoint config schema (`config.json`) and the built-in presets.
//!
//! Each section uses the field names of the reference implementation it mirrors, so the Python
//! oracles build the reference modules straight from a section:
//! `vision` → Hugging Face `CLIPVisionConfig(**vision)`, `resampler` → flamingo-pytorch
//! `PerceiverResampler(**resampler)`, `decoder` → torchscale `DecoderConfig(**decoder)`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::tokenizer::SpecialTokens;

/// Which member of the family a checkpoint holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    #[serde(rename = "kosmos-1")]
    Kosmos1,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Kosmos1 => "kosmos-1",
        })
    }
}

/// Hugging Face `CLIPVisionConfig` fields (the ones that shape the model).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_one")]
    pub initializer_factor: f64,
}

/// flamingo-pytorch `PerceiverResampler` constructor arguments.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResamplerConfig {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_latents: usize,
    pub num_media_embeds: usize,
    pub ff_mult: usize,
}

/// torchscale `DecoderConfig` fields. Values torchscale allows but this toolchain does not
/// implement (MoE, deepnorm, relative position buckets, ...) are rejected by [`KosmosConfig::validate`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    pub decoder_embed_dim: usize,
    pub decoder_attention_heads: usize,
    pub decoder_ffn_embed_dim: usize,
    pub decoder_layers: usize,
    pub vocab_size: usize,
    pub max_target_positions: usize,
    #[serde(default = "default_true")]
    pub decoder_normalize_before: bool,
    #[serde(default = "default_gelu")]
    pub activation_fn: String,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub activation_dropout: f64,
    #[serde(default)]
    pub drop_path_rate: f64,
    #[serde(default = "default_true")]
    pub no_scale_embedding: bool,
    #[serde(default)]
    pub layernorm_embedding: bool,
    #[serde(default = "default_true")]
    pub subln: bool,
    #[serde(default)]
    pub deepnorm: bool,
    #[serde(default)]
    pub share_decoder_input_output_embed: bool,
    #[serde(default)]
    pub no_output_layer: bool,
    #[serde(default = "default_eps")]
    pub layernorm_eps: f64,
    #[serde(default)]
    pub xpos_rel_pos: bool,
    #[serde(default = "default_xpos_scale_base")]
    pub xpos_scale_base: f64,
    #[serde(default)]
    pub rel_pos_buckets: usize,
    #[serde(default)]
    pub max_rel_pos: usize,
    #[serde(default)]
    pub multiway: bool,
    #[serde(default)]
    pub moe_freq: usize,
    #[serde(default)]
    pub bert_init: bool,
}

/// The whole `config.json` of a checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KosmosConfig {
    pub variant: Variant,
    pub vision: VisionConfig,
    pub resampler: ResamplerConfig,
    pub decoder: DecoderConfig,
    pub tokenizer: SpecialTokens,
}

fn default_num_channels() -> usize {
    3
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_one() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_xpos_scale_base() -> f64 {
    512.0
}

/// Names of the built-in presets, in the order `--help` lists them.
pub const PRESETS: &[&str] = &["tiny", "kosmos-1"];

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens out of the tower: one per patch plus CLS.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl DecoderConfig {
    pub fn head_dim(&self) -> usize {
        self.decoder_embed_dim / self.decoder_attention_heads
    }
    /// Multiplier of the token embeddings (torchscale: 1 when `no_scale_embedding`, else sqrt(D)).
    pub fn embed_scale(&self) -> f64 {
        if self.no_scale_embedding {
            1.0
        } else {
            (self.decoder_embed_dim as f64).sqrt()
        }
    }
    /// Magneto (sub-LN) init gain γ = sqrt(ln 2N) for fc1, fc2, v_proj and out_proj.
    pub fn magneto_gamma(&self) -> f64 {
        ((2 * self.decoder_layers) as f64).ln().sqrt()
    }
    /// The fixed xPos centre used for cached keys. torchscale centres on ⌈S/2⌉ of the current
    /// length and re-applies xPos to every key each step; the centre cancels in q·k, so one fixed
    /// centre lets a KV cache keep keys after xPos (DESIGN §3).
    pub fn xpos_centre(&self) -> f64 {
        (self.max_target_positions / 2) as f64
    }
}

impl KosmosConfig {
    /// A built-in preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "kosmos-1" => Self::kosmos1(),
            "tiny" => Self::tiny(),
            _ => {
                return Err(ModelsError::UnknownPreset {
                    name: name.to_string(),
                    available: PRESETS.join(", "),
                });
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// KOSMOS-1 exactly as the paper specifies it (DESIGN §3).
    pub fn kosmos1() -> Self {
        KosmosConfig {
            variant: Variant::Kosmos1,
            vision: VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                num_channels: 3,
                image_size: 224,
                patch_size: 14,
                hidden_act: "quick_gelu".into(),
                layer_norm_eps: 1e-5,
                attention_dropout: 0.0,
                initializer_range: 0.02,
                initializer_factor: 1.0,
            },
            resampler: ResamplerConfig {
                dim: 1024,
                depth: 2,
                dim_head: 64,
                heads: 8,
                num_latents: 64,
                num_media_embeds: 256,
                ff_mult: 4,
            },
            decoder: DecoderConfig {
                decoder_embed_dim: 2048,
                decoder_attention_heads: 32,
                decoder_ffn_embed_dim: 8192,
                decoder_layers: 24,
                vocab_size: 32002,
                max_target_positions: 2048,
                dropout: 0.1,
                attention_dropout: 0.1,
                xpos_rel_pos: true,
                ..DecoderConfig::base()
            },
            tokenizer: SpecialTokens::default(),
        }
    }

    /// A model small enough to train on a 2-core CPU in minutes (ViT 4×128 on 32 px with patch 4,
    /// 16 latents, decoder 4×256).
    pub fn tiny() -> Self {
        KosmosConfig {
            variant: Variant::Kosmos1,
            vision: VisionConfig {
                hidden_size: 128,
                intermediate_size: 512,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_channels: 3,
                image_size: 32,
                patch_size: 4,
                hidden_act: "quick_gelu".into(),
                layer_norm_eps: 1e-5,
                attention_dropout: 0.0,
                initializer_range: 0.02,
                initializer_factor: 1.0,
            },
            resampler: ResamplerConfig {
                dim: 128,
                depth: 2,
                dim_head: 32,
                heads: 4,
                num_latents: 16,
                num_media_embeds: 4,
                ff_mult: 4,
            },
            decoder: DecoderConfig {
                decoder_embed_dim: 256,
                decoder_attention_heads: 4,
                decoder_ffn_embed_dim: 1024,
                decoder_layers: 4,
                vocab_size: 512,
                max_target_positions: 256,
                // Trained on endless generated data, the tiny model does not overfit: no dropout.
                dropout: 0.0,
                attention_dropout: 0.0,
                xpos_rel_pos: true,
                ..DecoderConfig::base()
            },
            tokenizer: SpecialTokens::default(),
        }
    }

    /// Read and validate `config.json`; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelsError::MissingFile {
                    path: path.to_path_buf(),
                    what: "checkpoint config",
                }
            } else {
                ModelsError::io(path, e)
            }
        })?;
        let cfg: KosmosConfig = serde_json::from_str(&text).map_err(|source| ModelsError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate().map_err(|e| match e {
            ModelsError::InvalidConfig { message, .. } => ModelsError::InvalidConfig {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Checks the sizes fit together and that only implemented options are set.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let r = &self.resampler;
        let d = &self.decoder;
        let mut problems = Vec::new();
        let positive = [
            ("vision.hidden_size", v.hidden_size),
            ("vision.intermediate_size", v.intermediate_size),
            ("vision.num_hidden_layers", v.num_hidden_layers),
            ("vision.num_attention_heads", v.num_attention_heads),
            ("vision.image_size", v.image_size),
            ("vision.patch_size", v.patch_size),
            ("resampler.dim", r.dim),
            ("resampler.dim_head", r.dim_head),
            ("resampler.heads", r.heads),
            ("resampler.num_latents", r.num_latents),
            ("resampler.num_media_embeds", r.num_media_embeds),
            ("resampler.ff_mult", r.ff_mult),
            ("decoder.decoder_embed_dim", d.decoder_embed_dim),
            ("decoder.decoder_attention_heads", d.decoder_attention_heads),
            ("decoder.decoder_ffn_embed_dim", d.decoder_ffn_embed_dim),
            ("decoder.decoder_layers", d.decoder_layers),
            ("decoder.vocab_size", d.vocab_size),
            ("decoder.max_target_positions", d.max_target_positions),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("{name} must be positive"));
            }
        }
        if !problems.is_empty() {
            return Err(ModelsError::config(problems.join("; ")));
        }
        need(
            &mut problems,
            v.hidden_size.is_multiple_of(v.num_attention_heads),
            format!(
                "vision.hidden_size {} is not divisible by vision.num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ),
        );
        need(
            &mut problems,
            v.image_size.is_multiple_of(v.patch_size),
            format!(
                "vision.image_size {} is not a multiple of vision.patch_size {}",
                v.image_size, v.patch_size
            ),
        );
        need(
            &mut problems,
            v.num_channels == 3,
            format!("vision.num_channels must be 3 (RGB), got {}", v.num_channels),
        );
        need(
            &mut problems,
            v.hidden_act == "quick_gelu",
            format!(
                "vision.hidden_act {:?} is not supported (quick_gelu)",
                v.hidden_act
            ),
        );
        need(
            &mut problems,
            r.dim == v.hidden_size,
            format!(
                "resampler.dim {} must equal vision.hidden_size {} (it resamples the tower's features)",
                r.dim, v.hidden_size
            ),
        );
        need(
            &mut problems,
            d.decoder_embed_dim.is_multiple_of(d.decoder_attention_heads),
            format!(
                "decoder.decoder_embed_dim {} is not divisible by decoder.decoder_attention_heads {}",
                d.decoder_embed_dim, d.decoder_attention_heads
            ),
        );
        need(
            &mut problems,
            d.head_dim().is_multiple_of(2),
            format!(
                "decoder head dim {} must be even (xPos rotates pairs)",
                d.head_dim()
            ),
        );
        need(
            &mut problems,
            d.activation_fn == "gelu",
            format!(
                "decoder.activation_fn {:?} is not supported (gelu)",
                d.activation_fn
            ),
        );
        let unsupported = [
            ("decoder.subln = false", !d.subln),
            (
                "decoder.decoder_normalize_before = false",
                !d.decoder_normalize_before,
            ),
            ("decoder.deepnorm", d.deepnorm),
            ("decoder.layernorm_embedding", d.layernorm_embedding),
            (
                "decoder.share_decoder_input_output_embed",
                d.share_decoder_input_output_embed,
            ),
            ("decoder.no_output_layer", d.no_output_layer),
            ("decoder.xpos_rel_pos = false", !d.xpos_rel_pos),
            ("decoder.rel_pos_buckets", d.rel_pos_buckets != 0),
            ("decoder.multiway", d.multiway),
            ("decoder.moe_freq", d.moe_freq != 0),
            ("decoder.bert_init", d.bert_init),
            ("decoder.drop_path_rate", d.drop_path_rate != 0.0),
        ];
        for (what, set) in unsupported {
            need(
                &mut problems,
                !set,
                format!("{what} is not supported by this toolchain"),
            );
        }
        for (name, p) in [
            ("decoder.dropout", d.dropout),
            ("decoder.attention_dropout", d.attention_dropout),
            ("decoder.activation_dropout", d.activation_dropout),
            ("vision.attention_dropout", v.attention_dropout),
        ] {
            need(
                &mut problems,
                (0.0..1.0).contains(&p),
                format!("{name} {p} must be in [0, 1)"),
            );
        }
        need(
            &mut problems,
            self.decoder.vocab_size > self.tokenizer.max_id() as usize,
            format!(
                "decoder.vocab_size {} does not cover the special token ids (largest {})",
                d.vocab_size,
                self.tokenizer.max_id()
            ),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelsError::config(problems.join("; ")))
        }
    }

    /// Image embeddings each image contributes to the decoder sequence.
    pub fn image_tokens(&self) -> usize {
        self.resampler.num_latents
    }
}

/// Record `msg` unless `ok`.
fn need(problems: &mut Vec<String>, ok: bool, msg: String) {
    if !ok {
        problems.push(msg);
    }
}

impl DecoderConfig {
    /// torchscale's defaults for the fields the presets leave alone.
    fn base() -> Self {
        DecoderConfig {
            decoder_embed_dim: 0,
            decoder_attention_heads: 0,
            decoder_ffn_embed_dim: 0,
            decoder_layers: 0,
            vocab_size: 0,
            max_target_positions: 0,
            decoder_normalize_before: true,
            activation_fn: default_gelu(),
            dropout: 0.0,
            attention_dropout: 0.0,
            activation_dropout: 0.0,
            drop_path_rate: 0.0,
            no_scale_embedding: true,
            layernorm_embedding: false,
            subln: true,
            deepnorm: false,
            share_decoder_input_output_embed: false,
            no_output_layer: false,
            layernorm_eps: 1e-5,
            xpos_rel_pos: false,
            xpos_scale_base: 512.0,
            rel_pos_buckets: 0,
            max_rel_pos: 0,
            multiway: false,
            moe_freq: 0,
            bert_init: false,
        }
    }
}
