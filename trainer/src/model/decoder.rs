//! The Magneto (sub-LN) decoder with xPos, as torchscale 0.3.0 `Decoder` with
//! `subln=True, xpos_rel_pos=True`: names, initialisation (PyTorch-default Linear, then
//! fc1/fc2/v_proj/out_proj weights and biases ×γ = sqrt(ln 2N)) and forward, plus an incremental
//! forward over a KV cache whose keys are stored after xPos with a fixed centre.

use kosmos_models::DecoderConfig;
use tch::nn::Path;
use tch::{Kind, Tensor};

use super::layers::{InitMode, LayerNorm, Linear, matmul, merge_heads, normal, softmax_f32, split_heads};
use super::xpos::{Xpos, XposTables};

/// Cached keys (after xPos) and values of one layer: [b, heads, past, head_dim] each.
#[derive(Debug)]
pub struct LayerKv {
    pub key: Tensor,
    pub value: Tensor,
}

impl LayerKv {
    pub fn len(&self) -> i64 {
        self.key.size()[2]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct SelfAttention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    inner_attn_ln: LayerNorm,
}

#[derive(Debug)]
struct Ffn {
    fc1: Linear,
    fc2: Linear,
    ffn_layernorm: LayerNorm,
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: SelfAttention,
    self_attn_layer_norm: LayerNorm,
    ffn: Ffn,
    final_layer_norm: LayerNorm,
}

/// Called with a LayerNorm's parameter prefix and its output ([`Decoder::forward_observed`]).
pub type NormObserver<'a> = dyn FnMut(&str, &Tensor) + 'a;

#[derive(Debug)]
pub struct Decoder {
    cfg: DecoderConfig,
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    layer_norm: LayerNorm,
    output_projection: Linear,
    xpos: Xpos,
}

impl Decoder {
    /// `pad_id`'s embedding row starts at zero (fairseq `Embedding(padding_idx=...)`).
    pub fn new(p: &Path, cfg: &DecoderConfig, pad_id: u32, m: InitMode) -> Self {
        let d = cfg.decoder_embed_dim;
        let eps = cfg.layernorm_eps;
        let std = (d as f64).powf(-0.5);
        let embed_tokens =
            (p / "embed_tokens").var("weight", &[cfg.vocab_size as i64, d as i64], m.init(normal(std)));
        tch::no_grad(|| {
            let _ = embed_tokens.get(pad_id as i64).fill_(0.0);
        });
        let gamma = cfg.magneto_gamma();
        let layers = (0..cfg.decoder_layers)
            .map(|l| {
                let p = p / "layers" / l;
                let a = &p / "self_attn";
                let f = &p / "ffn";
                let layer = DecoderLayer {
                    self_attn: SelfAttention {
                        k_proj: Linear::torch(&a, "k_proj", d, d, m),
                        v_proj: Linear::torch(&a, "v_proj", d, d, m),
                        q_proj: Linear::torch(&a, "q_proj", d, d, m),
                        out_proj: Linear::torch(&a, "out_proj", d, d, m),
                        inner_attn_ln: LayerNorm::new(&a, "inner_attn_ln", d, eps),
                    },
                    self_attn_layer_norm: LayerNorm::new(&p, "self_attn_layer_norm", d, eps),
                    ffn: Ffn {
                        fc1: Linear::torch(&f, "fc1", d, cfg.decoder_ffn_embed_dim, m),
                        fc2: Linear::torch(&f, "fc2", cfg.decoder_ffn_embed_dim, d, m),
                        ffn_layernorm: LayerNorm::new(&f, "ffn_layernorm", cfg.decoder_ffn_embed_dim, eps),
                    },
                    final_layer_norm: LayerNorm::new(&p, "final_layer_norm", d, eps),
                };
                if m.random {
                    for lin in [
                        &layer.ffn.fc1,
                        &layer.ffn.fc2,
                        &layer.self_attn.v_proj,
                        &layer.self_attn.out_proj,
                    ] {
                        lin.scale_(gamma);
                    }
                }
                layer
            })
            .collect();
        let layer_norm = LayerNorm::new(p, "layer_norm", d, eps);
        let output_projection = Linear::new(p, "output_projection", d, cfg.vocab_size, normal(std), None, m);
        Decoder {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            layer_norm,
            output_projection,
            xpos: Xpos::new(cfg.head_dim(), cfg.xpos_scale_base, cfg.xpos_centre()),
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Token embeddings of `input_ids` [b, s] (before `embed_scale`).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Forward `embeds` [b, s, D] (token embeddings with image slots filled in) given
    /// `attention_mask` [b, past + s] (1 = real token, left padding allowed) and the cache of the
    /// `past` tokens. Returns logits [b, s, vocab] and the cache of all past + s tokens.
    pub fn forward(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[LayerKv]>,
        train: bool,
    ) -> (Tensor, Vec<LayerKv>) {
        self.forward_with(embeds, attention_mask, past, train, None)
    }

    /// [`Decoder::forward`] without a cache (inference) that also hands `observe` each
    /// LayerNorm output a linear reads, with the LayerNorm's parameter prefix (the groups of
    /// `kosmos_models::params::decoder_normed_linears`): the activations a quantiser calibrates on.
    pub fn forward_observed(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        observe: &mut NormObserver<'_>,
    ) -> Tensor {
        self.forward_with(embeds, attention_mask, None, false, Some(observe))
            .0
    }

    fn forward_with(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[LayerKv]>,
        train: bool,
        mut observe: Option<&mut NormObserver<'_>>,
    ) -> (Tensor, Vec<LayerKv>) {
        let mut norm = |ln: &LayerNorm, x: &Tensor| {
            let y = ln.forward(x);
            if let Some(f) = observe.as_mut() {
                f(&ln.name, &y);
            }
            y
        };
        let (b, s, _) = embeds.size3().expect("embeds [b, s, D]");
        let past_len = past.and_then(|p| p.first()).map_or(0, |kv| kv.len());
        let total = past_len + s;
        let device = embeds.device();

        // Positions of the new tokens: cumsum(mask) − 1, so left padding does not shift them.
        let positions = (attention_mask.cumsum(-1, Kind::Int64) - 1)
            .narrow(1, past_len, s)
            .clamp_min(0);
        let tables = self.xpos.tables(&positions);

        // Key j is visible to new token i when j ≤ past + i and key j is a real token.
        let key_idx = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
        let query_idx = (Tensor::arange(s, (Kind::Int64, device)) + past_len).view([s, 1]);
        let causal = key_idx.le_tensor(&query_idx).view([1, 1, s, total]);
        let real = attention_mask.ne(0).view([b, 1, 1, total]);
        let blocked = causal.logical_and(&real).logical_not();

        let mut x = embeds * self.cfg.embed_scale();
        x = x.dropout(self.cfg.dropout, train);
        let mut present = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = past.map(|p| &p[i]);
            let h = norm(&layer.self_attn_layer_norm, &x);
            let (h, kv) = self.attention(
                &layer.self_attn,
                &h,
                &tables,
                &blocked,
                layer_past,
                train,
                &mut norm,
            );
            x = &x + h.dropout(self.cfg.dropout, train); // out of place: autograd saved x
            present.push(kv);
            let h = norm(&layer.final_layer_norm, &x);
            let ffn = &layer.ffn;
            let h = ffn
                .fc1
                .forward(&h)
                .to_kind(Kind::Float)
                .gelu("none")
                .to_kind(h.kind());
            let h = h.dropout(self.cfg.activation_dropout, train);
            let h = ffn.fc2.forward(&norm(&ffn.ffn_layernorm, &h));
            x = &x + h.dropout(self.cfg.dropout, train); // out of place: autograd saved x
        }
        let x = norm(&self.layer_norm, &x);
        (self.output_projection.forward(&x), present)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &SelfAttention,
        h: &Tensor,
        tables: &XposTables,
        blocked: &Tensor,
        past: Option<&LayerKv>,
        train: bool,
        norm: &mut dyn FnMut(&LayerNorm, &Tensor) -> Tensor,
    ) -> (Tensor, LayerKv) {
        let heads = self.cfg.decoder_attention_heads;
        let scaling = (self.cfg.head_dim() as f64).powf(-0.5);
        let q = split_heads(&(a.q_proj.forward(h) * scaling), heads);
        let k = split_heads(&a.k_proj.forward(h), heads);
        let v = split_heads(&a.v_proj.forward(h), heads);
        let q = tables.apply_q(&q);
        let mut k = tables.apply_k(&k);
        let mut v = v;
        if let Some(p) = past.filter(|p| !p.is_empty()) {
            k = Tensor::cat(&[&p.key, &k], 2);
            v = Tensor::cat(&[&p.value, &v], 2);
        }
        // A finite fill keeps rows with no visible key (left-padding queries) free of NaN.
        let scores = matmul(&q, &k.transpose(-2, -1)).masked_fill(blocked, f64::from(f32::MIN));
        let probs = softmax_f32(&scores).dropout(self.cfg.attention_dropout, train);
        let out = merge_heads(&matmul(&probs, &v));
        let out = a.out_proj.forward(&norm(&a.inner_attn_ln, &out));
        (out, LayerKv { key: k, value: v })
    }
}
