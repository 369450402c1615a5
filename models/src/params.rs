//! Checkpoint parameter names and shapes: the single list every crate agrees on.
//!
//! Names are the reference implementations' own `state_dict` keys behind one prefix per module
//! (DESIGN §3), so the Python reference modules load a checkpoint with `strict=True` after
//! stripping the prefix. The tch model is checked against this list, the exporter reads by it.

use crate::config::KosmosConfig;

/// Module prefixes in the checkpoint.
pub const VISION: &str = "vision";
pub const RESAMPLER: &str = "resampler";
pub const IMAGE_PROJ: &str = "image_proj";
pub const DECODER: &str = "decoder";

/// One expected tensor: its full name and shape (all are f32 in a checkpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every parameter of a KOSMOS-1 model with this config, in module order.
pub fn expected_params(cfg: &KosmosConfig) -> Vec<ParamSpec> {
    let mut c = Collector(Vec::new());
    let v = &cfg.vision;
    let h = v.hidden_size;
    c.tensor(format!("{VISION}.embeddings.class_embedding"), &[h]);
    c.tensor(
        format!("{VISION}.embeddings.patch_embedding.weight"),
        &[h, v.num_channels, v.patch_size, v.patch_size],
    );
    c.tensor(
        format!("{VISION}.embeddings.position_embedding.weight"),
        &[v.num_positions(), h],
    );
    c.norm(&format!("{VISION}.pre_layrnorm"), h);
    for l in 0..v.num_hidden_layers {
        let p = format!("{VISION}.encoder.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            c.linear(&format!("{p}.self_attn.{proj}"), h, h, true);
        }
        c.norm(&format!("{p}.layer_norm1"), h);
        c.linear(&format!("{p}.mlp.fc1"), h, v.intermediate_size, true);
        c.linear(&format!("{p}.mlp.fc2"), v.intermediate_size, h, true);
        c.norm(&format!("{p}.layer_norm2"), h);
    }
    c.norm(&format!("{VISION}.post_layernorm"), h);

    let r = &cfg.resampler;
    let inner = r.dim_head * r.heads;
    c.tensor(format!("{RESAMPLER}.latents"), &[r.num_latents, r.dim]);
    c.tensor(
        format!("{RESAMPLER}.media_pos_emb"),
        &[r.num_media_embeds, 1, r.dim],
    );
    for l in 0..r.depth {
        let a = format!("{RESAMPLER}.layers.{l}.0");
        c.norm(&format!("{a}.norm_media"), r.dim);
        c.norm(&format!("{a}.norm_latents"), r.dim);
        c.linear(&format!("{a}.to_q"), r.dim, inner, false);
        c.linear(&format!("{a}.to_kv"), r.dim, 2 * inner, false);
        c.linear(&format!("{a}.to_out"), inner, r.dim, false);
        let f = format!("{RESAMPLER}.layers.{l}.1");
        c.norm(&format!("{f}.0"), r.dim);
        c.linear(&format!("{f}.1"), r.dim, r.dim * r.ff_mult, false);
        c.linear(&format!("{f}.3"), r.dim * r.ff_mult, r.dim, false);
    }
    c.norm(&format!("{RESAMPLER}.norm"), r.dim);

    let d = &cfg.decoder;
    let dm = d.decoder_embed_dim;
    c.linear(IMAGE_PROJ, r.dim, dm, false);

    c.tensor(format!("{DECODER}.embed_tokens.weight"), &[d.vocab_size, dm]);
    for l in 0..d.decoder_layers {
        let p = format!("{DECODER}.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            c.linear(&format!("{p}.self_attn.{proj}"), dm, dm, true);
        }
        c.norm(&format!("{p}.self_attn.inner_attn_ln"), dm);
        c.norm(&format!("{p}.self_attn_layer_norm"), dm);
        c.linear(&format!("{p}.ffn.fc1"), dm, d.decoder_ffn_embed_dim, true);
        c.linear(&format!("{p}.ffn.fc2"), d.decoder_ffn_embed_dim, dm, true);
        c.norm(&format!("{p}.ffn.ffn_layernorm"), d.decoder_ffn_embed_dim);
        c.norm(&format!("{p}.final_layer_norm"), dm);
    }
    c.norm(&format!("{DECODER}.layer_norm"), dm);
    c.linear(&format!("{DECODER}.output_projection"), dm, d.vocab_size, false);
    c.0
}

/// Linears that read one LayerNorm's output and nothing else, with that LayerNorm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormedLinears {
    /// The LayerNorm's prefix (`.weight`, `.bias`).
    pub norm: String,
    /// The linears' prefixes (`.weight` [out, in], optional `.bias`).
    pub linears: Vec<String>,
}

/// Every decoder linear grouped by the LayerNorm in front of it (sub-LN puts one before each):
/// a per-input-feature factor moves from such a LayerNorm's weight and bias into the linears'
/// weights without changing the model (`kosmos-export --awq`).
pub fn decoder_normed_linears(cfg: &KosmosConfig) -> Vec<NormedLinears> {
    let group = |norm: String, linears: &[String]| NormedLinears {
        norm,
        linears: linears.to_vec(),
    };
    let mut groups = Vec::new();
    for l in 0..cfg.decoder.decoder_layers {
        let p = format!("{DECODER}.layers.{l}");
        let a = format!("{p}.self_attn");
        let qkv = ["q_proj", "k_proj", "v_proj"].map(|x| format!("{a}.{x}"));
        groups.push(group(format!("{p}.self_attn_layer_norm"), &qkv));
        groups.push(group(format!("{a}.inner_attn_ln"), &[format!("{a}.out_proj")]));
        groups.push(group(format!("{p}.final_layer_norm"), &[format!("{p}.ffn.fc1")]));
        groups.push(group(format!("{p}.ffn.ffn_layernorm"), &[format!("{p}.ffn.fc2")]));
    }
    groups.push(group(
        format!("{DECODER}.layer_norm"),
        &[format!("{DECODER}.output_projection")],
    ));
    groups
}

/// Total number of parameters of a config.
pub fn param_count(cfg: &KosmosConfig) -> usize {
    expected_params(cfg)
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum()
}

struct Collector(Vec<ParamSpec>);

impl Collector {
    fn tensor(&mut self, name: String, shape: &[usize]) {
        self.0.push(ParamSpec {
            name,
            shape: shape.to_vec(),
        });
    }
    /// A torch `Linear(i, o)`: weight is [out, in].
    fn linear(&mut self, prefix: &str, i: usize, o: usize, bias: bool) {
        self.tensor(format!("{prefix}.weight"), &[o, i]);
        if bias {
            self.tensor(format!("{prefix}.bias"), &[o]);
        }
    }
    fn norm(&mut self, prefix: &str, d: usize) {
        self.tensor(format!("{prefix}.weight"), &[d]);
        self.tensor(format!("{prefix}.bias"), &[d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decoder_linear_has_exactly_one_layer_norm_in_front() {
        let cfg = KosmosConfig::tiny();
        let params = expected_params(&cfg);
        let shape = |name: &str| params.iter().find(|p| p.name == name).map(|p| p.shape.clone());
        let groups = decoder_normed_linears(&cfg);
        let mut seen = Vec::new();
        for g in &groups {
            let width = shape(&format!("{}.weight", g.norm)).expect("norm weight")[0];
            for lin in &g.linears {
                // The norm's width is the linear's input width.
                assert_eq!(
                    shape(&format!("{lin}.weight")).expect("linear")[1],
                    width,
                    "{lin}"
                );
                seen.push(format!("{lin}.weight"));
            }
        }
        seen.sort();
        let mut linears: Vec<String> = params
            .iter()
            .filter(|p| p.name.starts_with(DECODER) && p.shape.len() == 2 && !p.name.contains("embed_tokens"))
            .map(|p| p.name.clone())
            .collect();
        linears.sort();
        assert_eq!(seen, linears);
    }
}
