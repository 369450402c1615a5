//! KOSMOS-1 in libtorch: CLIP vision tower → Perceiver resampler → image projection, whose
//! embeddings fill the image slots of the token sequence fed to the sub-LN/xPos decoder.

pub mod decoder;
pub mod layers;
pub mod resampler;
pub mod vision;
pub mod xpos;

use kosmos_models::KosmosConfig;
use kosmos_models::params::{DECODER, IMAGE_PROJ, RESAMPLER, VISION};
use tch::nn::{Path, VarStore};
use tch::{Kind, Tensor};

pub use decoder::{Decoder, LayerKv};
use layers::{InitMode, Linear, normal};
use resampler::PerceiverResampler;
use vision::ClipVision;

use crate::error::{Result, TrainError};

#[derive(Debug)]
pub struct Kosmos {
    pub config: KosmosConfig,
    pub vision: ClipVision,
    pub resampler: PerceiverResampler,
    pub image_proj: Linear,
    pub decoder: Decoder,
}

/// Output of one decoder call.
#[derive(Debug)]
pub struct StepOutput {
    /// [b, s, vocab]
    pub logits: Tensor,
    /// The cache of all tokens so far, one entry per layer.
    pub present: Vec<LayerKv>,
}

impl Kosmos {
    /// Build the model under `root`. With `random`, variables get the reference initialisation
    /// (from the global generator: seed it through [`crate::rng::seeded`]); without, zeros, to be
    /// overwritten by a load.
    pub fn new(root: &Path, config: &KosmosConfig, random: bool) -> Self {
        let m = InitMode { random };
        let d = config.decoder.decoder_embed_dim;
        let r = config.resampler.dim;
        Kosmos {
            config: config.clone(),
            vision: ClipVision::new(&(root / VISION), &config.vision, m),
            resampler: PerceiverResampler::new(&(root / RESAMPLER), &config.resampler, m),
            image_proj: Linear::new(root, IMAGE_PROJ, r, d, normal((d as f64).powf(-0.5)), None, m),
            decoder: Decoder::new(
                &(root / DECODER),
                &config.decoder,
                config.tokenizer.pad_token_id,
                m,
            ),
        }
    }

    /// A fresh VarStore on `device` holding a randomly initialised (seeded) or zeroed model.
    /// The same seed gives the same weights, also with other threads drawing random numbers.
    pub fn build(config: &KosmosConfig, device: tch::Device, seed: Option<i64>) -> (VarStore, Self) {
        let vs = VarStore::new(device);
        let model = match seed {
            Some(seed) => crate::rng::seeded(seed, || Kosmos::new(&vs.root(), config, true)),
            None => Kosmos::new(&vs.root(), config, false),
        };
        (vs, model)
    }

    /// `pixel_values` [n, 3, H, W] → image embeddings [n, num_latents, D].
    pub fn encode_images(&self, pixel_values: &Tensor, train: bool) -> Result<Tensor> {
        let v = &self.config.vision;
        let size = pixel_values.size();
        let want = [v.num_channels as i64, v.image_size as i64, v.image_size as i64];
        if size.len() != 4 || size[1..] != want {
            return Err(TrainError::Input(format!(
                "pixel_values has shape {size:?}, expected [n, {}, {}, {}]",
                want[0], want[1], want[2]
            )));
        }
        let features = self.vision.forward(pixel_values, train);
        Ok(self.image_proj.forward(&self.resampler.forward(&features)))
    }

    /// Token embeddings with the image slots (`image_mask` true) filled, in order, by the rows of
    /// `image_embeds` [n, num_latents, D] (or already flattened [n·num_latents, D]).
    pub fn embed(
        &self,
        input_ids: &Tensor,
        image_embeds: Option<&Tensor>,
        image_mask: &Tensor,
    ) -> Result<Tensor> {
        let vocab = self.config.decoder.vocab_size as i64;
        if input_ids.numel() > 0 {
            let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
            if lo < 0 || hi >= vocab {
                return Err(TrainError::Input(format!(
                    "input_ids out of range [{lo}, {hi}] for vocab size {vocab}"
                )));
            }
        }
        if image_mask.size() != input_ids.size() {
            return Err(TrainError::Input(format!(
                "image_mask shape {:?} differs from input_ids {:?}",
                image_mask.size(),
                input_ids.size()
            )));
        }
        let x = self.decoder.embed(input_ids);
        let slots = image_mask.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let d = self.config.decoder.decoder_embed_dim as i64;
        let rows = image_embeds.map_or(0, |e| e.numel() as i64 / d);
        if slots != rows {
            return Err(TrainError::Input(format!(
                "{slots} image slots in the sequence but {rows} image embedding rows"
            )));
        }
        match image_embeds {
            Some(e) if slots > 0 => {
                let mask = image_mask.to_kind(Kind::Bool).unsqueeze(-1).expand_as(&x);
                Ok(x.masked_scatter(&mask, &e.reshape([-1, d]).to_kind(x.kind())))
            }
            _ => Ok(x),
        }
    }

    /// One decoder call: embed (images into their slots), then decode over `past`.
    pub fn step(
        &self,
        input_ids: &Tensor,
        image_embeds: Option<&Tensor>,
        image_mask: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[LayerKv]>,
        train: bool,
    ) -> Result<StepOutput> {
        let (b, s) = input_ids
            .size2()
            .map_err(|_| TrainError::Input("input_ids must be [batch, seq]".into()))?;
        let past_len = past.and_then(|p| p.first()).map_or(0, |kv| kv.len());
        if attention_mask.size() != [b, past_len + s] {
            return Err(TrainError::Input(format!(
                "attention_mask has shape {:?}, expected [{b}, {}]",
                attention_mask.size(),
                past_len + s
            )));
        }
        let embeds = self.embed(input_ids, image_embeds, image_mask)?;
        let (logits, present) = self.decoder.forward(&embeds, attention_mask, past, train);
        Ok(StepOutput { logits, present })
    }

    /// Full forward without a cache: images → embeddings → logits [b, s, vocab].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        image_mask: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let image_embeds = pixel_values.map(|p| self.encode_images(p, train)).transpose()?;
        Ok(self
            .step(
                input_ids,
                image_embeds.as_ref(),
                image_mask,
                attention_mask,
                None,
                train,
            )?
            .logits)
    }
}
