//! CLIP ViT vision tower, as Hugging Face `CLIPVisionModel` (transformers 5): parameter names,
//! initialisation and forward. KOSMOS uses `last_hidden_state` (no `post_layernorm`, which is
//! kept as a parameter so HF loads the checkpoint strictly).

use kosmos_models::VisionConfig;
use tch::Tensor;
use tch::nn::Path;

use super::layers::{InitMode, LayerNorm, Linear, matmul, merge_heads, normal, softmax_f32, split_heads};

#[derive(Debug)]
struct ClipLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

#[derive(Debug)]
pub struct ClipVision {
    cfg: VisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    _post_layernorm: LayerNorm,
}

impl ClipVision {
    pub fn new(p: &Path, cfg: &VisionConfig, m: InitMode) -> Self {
        let h = cfg.hidden_size;
        let f = cfg.initializer_factor;
        let eps = cfg.layer_norm_eps;
        let n_layers = cfg.num_hidden_layers as f64;
        let emb = p / "embeddings";
        let class_embedding = emb.var(
            "class_embedding",
            &[h as i64],
            m.init(normal((h as f64).powf(-0.5) * f)),
        );
        let patch_embedding = (&emb / "patch_embedding").var(
            "weight",
            &[
                h as i64,
                cfg.num_channels as i64,
                cfg.patch_size as i64,
                cfg.patch_size as i64,
            ],
            m.init(normal(cfg.initializer_range * f)),
        );
        let position_embedding = (&emb / "position_embedding").var(
            "weight",
            &[cfg.num_positions() as i64, h as i64],
            m.init(normal(cfg.initializer_range * f)),
        );
        if m.random {
            init_position_sincos(&position_embedding, cfg.grid(), h);
        }
        let pre_layrnorm = LayerNorm::new(p, "pre_layrnorm", h, eps);
        // HF CLIPPreTrainedModel._init_weights: normal weights, zero biases.
        let zero = Some(tch::nn::Init::Const(0.0));
        let in_std = (h as f64).powf(-0.5) * (2.0 * n_layers).powf(-0.5) * f;
        let out_std = (h as f64).powf(-0.5) * f;
        let fc1_std = (2.0 * h as f64).powf(-0.5) * f;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = p / "encoder" / "layers" / l;
                let a = &p / "self_attn";
                ClipLayer {
                    k_proj: Linear::new(&a, "k_proj", h, h, normal(in_std), zero, m),
                    v_proj: Linear::new(&a, "v_proj", h, h, normal(in_std), zero, m),
                    q_proj: Linear::new(&a, "q_proj", h, h, normal(in_std), zero, m),
                    out_proj: Linear::new(&a, "out_proj", h, h, normal(out_std), zero, m),
                    layer_norm1: LayerNorm::new(&p, "layer_norm1", h, eps),
                    fc1: Linear::new(
                        &(&p / "mlp"),
                        "fc1",
                        h,
                        cfg.intermediate_size,
                        normal(fc1_std),
                        zero,
                        m,
                    ),
                    fc2: Linear::new(
                        &(&p / "mlp"),
                        "fc2",
                        cfg.intermediate_size,
                        h,
                        normal(in_std),
                        zero,
                        m,
                    ),
                    layer_norm2: LayerNorm::new(&p, "layer_norm2", h, eps),
                }
            })
            .collect();
        let _post_layernorm = LayerNorm::new(p, "post_layernorm", h, eps);
        ClipVision {
            cfg: cfg.clone(),
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            _post_layernorm,
        }
    }

    /// `pixel_values` [n, 3, H, W] (already normalised) → `last_hidden_state` [n, 1 + patches, hidden].
    pub fn forward(&self, pixel_values: &Tensor, train: bool) -> Tensor {
        let n = pixel_values.size()[0];
        let h = self.cfg.hidden_size as i64;
        let p = self.cfg.patch_size as i64;
        let patches = pixel_values
            .to_kind(self.patch_embedding.kind())
            .conv2d(&self.patch_embedding, None::<Tensor>, [p, p], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2);
        let cls = self.class_embedding.view([1, 1, h]).expand([n, 1, h], false);
        let mut x = Tensor::cat(&[cls, patches], 1) + self.position_embedding.unsqueeze(0);
        x = self.pre_layrnorm.forward(&x);
        let heads = self.cfg.num_attention_heads;
        let scale = (self.cfg.head_dim() as f64).powf(-0.5);
        for layer in &self.layers {
            let r = &x;
            let y = layer.layer_norm1.forward(r);
            let q = split_heads(&layer.q_proj.forward(&y), heads);
            let k = split_heads(&layer.k_proj.forward(&y), heads);
            let v = split_heads(&layer.v_proj.forward(&y), heads);
            let w = softmax_f32(&(matmul(&q, &k.transpose(-2, -1)) * scale))
                .dropout(self.cfg.attention_dropout, train);
            let y = layer.out_proj.forward(&merge_heads(&matmul(&w, &v)));
            x = r + y;
            let y = layer.layer_norm2.forward(&x);
            let y = layer.fc1.forward(&y);
            let y = &y * (&y * 1.702).sigmoid(); // quick_gelu
            x = &x + layer.fc2.forward(&y);
        }
        x
    }
}

/// Patch positions start from a fixed 2-D sine-cosine table (as MAE and other from-scratch ViTs
/// do) instead of HF's N(0, 0.02): at that scale the position signal is ~20× weaker than the patch
/// content, and a tower trained from scratch first learns bag-of-patches features that cannot tell
/// left from right. Half the channels encode the row, half the column; amplitude 0.5. The CLS row
/// keeps its random init. (Loading CLIP weights overwrites all of this.)
fn init_position_sincos(table: &Tensor, grid: usize, hidden: usize) {
    let quarter = (hidden / 4).max(1);
    let mut values = vec![0f32; grid * grid * hidden];
    for y in 0..grid {
        for x in 0..grid {
            let row = &mut values[(y * grid + x) * hidden..(y * grid + x + 1) * hidden];
            for i in 0..quarter {
                let freq = 1.0 / 10000f64.powf(i as f64 / quarter as f64);
                let (py, px) = (y as f64 * freq, x as f64 * freq);
                let put = |row: &mut [f32], j: usize, v: f64| {
                    if j < row.len() {
                        row[j] = (0.5 * v) as f32;
                    }
                };
                put(row, i, py.sin());
                put(row, quarter + i, py.cos());
                put(row, 2 * quarter + i, px.sin());
                put(row, 3 * quarter + i, px.cos());
            }
        }
    }
    let patches = Tensor::from_slice(&values).view([(grid * grid) as i64, hidden as i64]);
    tch::no_grad(|| {
        table
            .narrow(0, 1, (grid * grid) as i64)
            .copy_(&patches.to_device(table.device()));
    });
}
