//! `vision.onnx`: CLIP ViT tower (`last_hidden_state`, no post_layernorm) → Perceiver resampler
//! → image projection. `pixel_values` f32 [batch, 3, S, S] → `image_embeds` f32
//! [batch, num_latents, D].

use kosmos_models::KosmosConfig;
use kosmos_models::package::io;
use kosmos_models::params::{IMAGE_PROJ, RESAMPLER, VISION};

use super::{Lower, MS_DOMAIN};
use crate::Profile;
use crate::error::{ExportError, Result};
use crate::onnx::builder::{Attr, DType, Dim, Value};
use crate::shape;

/// Where the softmax scale goes, as in each reference module.
#[derive(Clone, Copy)]
pub enum ScaleAt {
    /// (q·kᵀ)·scale (HF CLIP).
    Scores,
    /// (q·scale)·kᵀ (flamingo, torchscale).
    Query,
}

impl Lower<'_, '_, '_> {
    /// Unmasked multi-head attention of q [b, s, H·hd] over k, v [b, t, H·hd] → [b, s, H·hd].
    pub fn attention(&mut self, q: &Value, k: &Value, v: &Value, heads: usize, at: ScaleAt) -> Result<Value> {
        let width = match q.dim(-1) {
            Dim::Fixed(w) => *w,
            d => return Err(ExportError::Graph(format!("attention: symbolic width {d}"))),
        };
        let scale = ((width / heads as i64) as f64).powf(-0.5) as f32;
        if self.profile == Profile::Ort {
            self.g.use_domain(MS_DOMAIN, 1);
            return Ok(self
                .g
                .node_in(
                    MS_DOMAIN,
                    "MultiHeadAttention",
                    &[Some(q), Some(k), Some(v)],
                    vec![
                        ("num_heads", Attr::Int(heads as i64)),
                        ("scale", Attr::Float(scale)),
                    ],
                    vec![(q.dtype, q.shape.clone())],
                )
                .remove(0));
        }
        let mut qh = self.split_heads(q, heads)?;
        if let ScaleAt::Query = at {
            qh = self.g.mul_scalar(&qh, scale)?;
        }
        let kh = self.split_heads(k, heads)?;
        let vh = self.split_heads(v, heads)?;
        let kt = self.g.transpose(&kh, &[0, 1, 3, 2]);
        let mut scores = self.g.matmul(&qh, &kt)?;
        if let ScaleAt::Scores = at {
            scores = self.g.mul_scalar(&scores, scale)?;
        }
        let probs = self.softmax_f32(&scores);
        let out = self.g.matmul(&probs, &vh)?;
        self.merge_heads(&out)
    }

    pub fn vision_graph(&mut self, cfg: &KosmosConfig) -> Result<()> {
        let v = &cfg.vision;
        if v.hidden_act != "quick_gelu" {
            return Err(ExportError::Unsupported(format!(
                "vision.hidden_act '{}' (the exporter lowers CLIP's quick_gelu)",
                v.hidden_act
            )));
        }
        let dt = self.dtype();
        let (h, size, p) = (v.hidden_size as i64, v.image_size as i64, v.patch_size as i64);
        let grid = v.grid() as i64;
        let tokens = v.num_positions() as i64;
        let pixels = self
            .g
            .input(io::PIXEL_VALUES, DType::F32, shape!["batch", 3i64, size, size]);
        let batch = Dim::sym("batch");
        let x = self.in_module(VISION, |l| Ok(l.g.cast(&pixels, dt)))?;

        let emb = format!("{VISION}.embeddings");
        let w = self.w;
        let x = self.in_module(&emb, |l| {
            let kernel = w.param(&mut l.g, &format!("{emb}.patch_embedding.weight"))?;
            let conv = l.g.node(
                "Conv",
                &[&x, &kernel],
                vec![
                    ("kernel_shape", Attr::Ints(vec![p, p])),
                    ("strides", Attr::Ints(vec![p, p])),
                ],
                dt,
                shape![&batch, h, grid, grid],
            );
            let flat =
                l.g.reshape(&conv, &[0, h, grid * grid], shape![&batch, h, grid * grid])?;
            let patches = l.g.transpose(&flat, &[0, 2, 1]);
            // cat(cls, patches) + pos, with the CLS row's sum formed once at export time.
            let (pos, _) = w.read(&format!("{emb}.position_embedding.weight"))?;
            let (cls, _) = w.read(&format!("{emb}.class_embedding"))?;
            let hu = h as usize;
            let cls_pos: Vec<f32> = cls.iter().zip(&pos[..hu]).map(|(a, b)| a + b).collect();
            let cls_pos = w.put(
                &mut l.g,
                &format!("{emb}.class_embedding+position_embedding[0]"),
                &[1, 1, hu],
                &cls_pos,
            )?;
            let patch_pos = w.put(
                &mut l.g,
                &format!("{emb}.position_embedding.weight[1:]"),
                &[(grid * grid) as usize, hu],
                &pos[hu..],
            )?;
            let patches = l.g.add(&patches, &patch_pos)?;
            let b = l.g.shape_of(&pixels, 0, 1);
            let rest = l.g.i64s(&[1, h])?;
            let target = l.g.concat(&[&b, &rest], 0, Dim::Fixed(3));
            let cls = l.g.node(
                "Expand",
                &[&cls_pos, &target],
                vec![],
                dt,
                shape![&batch, 1i64, h],
            );
            Ok(l.g.concat(&[&cls, &patches], 1, Dim::Fixed(tokens)))
        })?;
        let mut x = self.layer_norm(&x, &format!("{VISION}.pre_layrnorm"), v.layer_norm_eps)?;

        for i in 0..v.num_hidden_layers {
            let pl = format!("{VISION}.encoder.layers.{i}");
            let y = self.layer_norm(&x, &format!("{pl}.layer_norm1"), v.layer_norm_eps)?;
            let a = format!("{pl}.self_attn");
            let q = self.linear(&y, &format!("{a}.q_proj"), true)?;
            let k = self.linear(&y, &format!("{a}.k_proj"), true)?;
            let vv = self.linear(&y, &format!("{a}.v_proj"), true)?;
            let att = self.in_module(&a, |l| {
                l.attention(&q, &k, &vv, v.num_attention_heads, ScaleAt::Scores)
            })?;
            let o = self.linear(&att, &format!("{a}.out_proj"), true)?;
            x = self.in_module(&pl, |l| l.g.add(&x, &o))?;
            let y = self.layer_norm(&x, &format!("{pl}.layer_norm2"), v.layer_norm_eps)?;
            let y = self.linear(&y, &format!("{pl}.mlp.fc1"), true)?;
            let y = self.in_module(&format!("{pl}.mlp"), |l| l.quick_gelu(&y))?;
            let y = self.linear(&y, &format!("{pl}.mlp.fc2"), true)?;
            x = self.in_module(&pl, |l| l.g.add(&x, &y))?;
        }

        let latents = self.resampler(cfg, &x)?;
        let embeds = self.linear(&latents, IMAGE_PROJ, false)?;
        let embeds = self.in_module(IMAGE_PROJ, |l| Ok(l.g.cast(&embeds, DType::F32)))?;
        self.g.output(&embeds, io::IMAGE_EMBEDS)
    }

    /// Perceiver resampler over one image per row: [b, tokens, dim] → [b, num_latents, dim].
    fn resampler(&mut self, cfg: &KosmosConfig, features: &Value) -> Result<Value> {
        let r = &cfg.resampler;
        const EPS: f64 = 1e-5; // torch.nn.LayerNorm default, as flamingo-pytorch uses
        let w = self.w;
        let batch = features.shape[0].clone();
        let (l_n, dim) = (r.num_latents as i64, r.dim as i64);
        let (x, mut latents) = self.in_module(RESAMPLER, |l| {
            // Each image is its own media item (times = 1): add media_pos_emb[0].
            let (media, _) = w.read(&format!("{RESAMPLER}.media_pos_emb"))?;
            let pos0 = w.put(
                &mut l.g,
                &format!("{RESAMPLER}.media_pos_emb[0]"),
                &[1, r.dim],
                &media[..r.dim],
            )?;
            let x = l.g.add(features, &pos0)?;
            let lat = w.param(&mut l.g, &format!("{RESAMPLER}.latents"))?;
            let b = l.g.shape_of(features, 0, 1);
            let rest = l.g.i64s(&[l_n, dim])?;
            let target = l.g.concat(&[&b, &rest], 0, Dim::Fixed(3));
            let latents = l.g.node(
                "Expand",
                &[&lat, &target],
                vec![],
                lat.dtype,
                shape![&batch, l_n, dim],
            );
            Ok((x, latents))
        })?;
        let inner = (r.heads * r.dim_head) as i64;
        let kv_len = match features.dim(1) {
            Dim::Fixed(t) => Dim::Fixed(t + l_n),
            d => return Err(ExportError::Graph(format!("resampler: symbolic token count {d}"))),
        };
        for i in 0..r.depth {
            let a = format!("{RESAMPLER}.layers.{i}.0");
            let xm = self.layer_norm(&x, &format!("{a}.norm_media"), EPS)?;
            let lat = self.layer_norm(&latents, &format!("{a}.norm_latents"), EPS)?;
            let q = self.linear(&lat, &format!("{a}.to_q"), false)?;
            let kv_in = self.in_module(&a, |l| Ok(l.g.concat(&[&xm, &lat], 1, kv_len.clone())))?;
            // to_kv's output is chunk(2): its weight rows split into a k and a v projection.
            let (k, v) = self.in_module(&format!("{a}.to_kv"), |l| {
                let name = format!("{a}.to_kv.weight");
                let (wkv, _) = w.read(&name)?;
                let half = (inner * dim) as usize;
                let (ru, du) = (inner as usize, r.dim);
                let wk = super::transpose(&wkv[..half], ru, du);
                let wv = super::transpose(&wkv[half..], ru, du);
                let wk = w.put(&mut l.g, &format!("{name}[:{inner}].T"), &[du, ru], &wk)?;
                let wv = w.put(&mut l.g, &format!("{name}[{inner}:].T"), &[du, ru], &wv)?;
                Ok((l.g.linear(&kv_in, &wk, None)?, l.g.linear(&kv_in, &wv, None)?))
            })?;
            let att = self.in_module(&a, |l| l.attention(&q, &k, &v, r.heads, ScaleAt::Query))?;
            let o = self.linear(&att, &format!("{a}.to_out"), false)?;
            latents = self.in_module(&a, |l| l.g.add(&o, &latents))?;
            let f = format!("{RESAMPLER}.layers.{i}.1");
            let y = self.layer_norm(&latents, &format!("{f}.0"), EPS)?;
            let y = self.linear(&y, &format!("{f}.1"), false)?;
            let y = self.in_module(&f, |l| l.gelu(&y))?;
            let y = self.linear(&y, &format!("{f}.3"), false)?;
            latents = self.in_module(&f, |l| l.g.add(&y, &latents))?;
        }
        self.layer_norm(&latents, &format!("{RESAMPLER}.norm"), EPS)
    }
}
