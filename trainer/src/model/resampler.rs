//! Flamingo Perceiver resampler, as flamingo-pytorch 0.1.2 `PerceiverResampler`: names
//! (`layers.N.0` attention, `layers.N.1.{0,1,3}` LayerNorm/Linear/Linear of the feed-forward),
//! initialisation (randn latents and media embeddings, PyTorch-default Linear) and forward.

use kosmos_models::ResamplerConfig;
use tch::Tensor;
use tch::nn::{Init, Path};

use super::layers::{
    InitMode, LayerNorm, Linear, matmul, merge_heads, softmax_f32, split_heads, torch_default,
};

const LN_EPS: f64 = 1e-5; // torch.nn.LayerNorm default, as flamingo-pytorch uses

#[derive(Debug)]
struct PerceiverLayer {
    norm_media: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

#[derive(Debug)]
pub struct PerceiverResampler {
    cfg: ResamplerConfig,
    latents: Tensor,
    media_pos_emb: Tensor,
    layers: Vec<PerceiverLayer>,
    norm: LayerNorm,
}

impl PerceiverResampler {
    pub fn new(p: &Path, cfg: &ResamplerConfig, m: InitMode) -> Self {
        let d = cfg.dim;
        let inner = cfg.dim_head * cfg.heads;
        let randn = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let latents = p.var("latents", &[cfg.num_latents as i64, d as i64], m.init(randn));
        let media_pos_emb = p.var(
            "media_pos_emb",
            &[cfg.num_media_embeds as i64, 1, d as i64],
            m.init(randn),
        );
        let no_bias =
            |p: &Path, name: &str, i: usize, o: usize| Linear::new(p, name, i, o, torch_default(i), None, m);
        let layers = (0..cfg.depth)
            .map(|l| {
                let a = p / "layers" / l / 0;
                let f = p / "layers" / l / 1;
                PerceiverLayer {
                    norm_media: LayerNorm::new(&a, "norm_media", d, LN_EPS),
                    norm_latents: LayerNorm::new(&a, "norm_latents", d, LN_EPS),
                    to_q: no_bias(&a, "to_q", d, inner),
                    to_kv: no_bias(&a, "to_kv", d, 2 * inner),
                    to_out: no_bias(&a, "to_out", inner, d),
                    ff_norm: LayerNorm::new(&f, "0", d, LN_EPS),
                    ff_in: no_bias(&f, "1", d, d * cfg.ff_mult),
                    ff_out: no_bias(&f, "3", d * cfg.ff_mult, d),
                }
            })
            .collect();
        let norm = LayerNorm::new(p, "norm", d, LN_EPS);
        PerceiverResampler {
            cfg: cfg.clone(),
            latents,
            media_pos_emb,
            layers,
            norm,
        }
    }

    /// One image's features per row: [n, tokens, dim] → latents [n, num_latents, dim].
    pub fn forward(&self, features: &Tensor) -> Tensor {
        let n = features.size()[0];
        // Each image is its own media item (times = 1): add media_pos_emb[0].
        let x = features + self.media_pos_emb.get(0);
        let (l, d) = (self.cfg.num_latents as i64, self.cfg.dim as i64);
        let mut latents = self.latents.unsqueeze(0).expand([n, l, d], false);
        let heads = self.cfg.heads;
        let scale = (self.cfg.dim_head as f64).powf(-0.5);
        for layer in &self.layers {
            let xm = layer.norm_media.forward(&x);
            let lat = layer.norm_latents.forward(&latents);
            let q = split_heads(&layer.to_q.forward(&lat), heads) * scale;
            let kv = layer.to_kv.forward(&Tensor::cat(&[&xm, &lat], 1));
            let kv = kv.chunk(2, -1);
            let (k, v) = (split_heads(&kv[0], heads), split_heads(&kv[1], heads));
            let sim = matmul(&q, &k.transpose(-2, -1));
            let attn = softmax_f32(&sim);
            latents = layer.to_out.forward(&merge_heads(&matmul(&attn, &v))) + latents;
            let y = layer.ff_norm.forward(&latents);
            let y = layer.ff_out.forward(&layer.ff_in.forward(&y).gelu("none"));
            latents = y + latents;
        }
        self.norm.forward(&latents)
    }
}
