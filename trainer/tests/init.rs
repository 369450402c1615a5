//! Magneto initialisation, checked statistically: fc1, fc2, v_proj and out_proj (weights and
//! biases) are PyTorch-default Linear draws scaled by γ = sqrt(ln 2N); q/k are not scaled; the
//! output projection is N(0, D^-0.5). Also: the tch model's variables are exactly the checkpoint
//! parameter list of `kosmos-models`.

use std::collections::BTreeMap;

use kosmos_models::{KosmosConfig, expected_params, param_count};
use kosmos_train::model::Kosmos;
use tch::{Device, Tensor};

/// 24 layers as in KOSMOS-1 (γ = 1.9675), narrow so the test is quick, wide enough for tight
/// statistics (≥65k draws per tensor kind).
fn config() -> KosmosConfig {
    let mut c = KosmosConfig::tiny();
    c.decoder.decoder_layers = 24;
    c.decoder.decoder_embed_dim = 128;
    c.decoder.decoder_attention_heads = 4;
    c.decoder.decoder_ffn_embed_dim = 512;
    c.validate().unwrap();
    c
}

fn std_of(ts: &[&Tensor]) -> f64 {
    let flat: Vec<Tensor> = ts.iter().map(|t| t.flatten(0, -1)).collect();
    Tensor::cat(&flat, 0).std(false).double_value(&[])
}

#[test]
fn magneto_gamma_scales_fc1_fc2_v_out_only() {
    let cfg = config();
    let gamma = cfg.decoder.magneto_gamma();
    assert!(
        (gamma - 1.9675).abs() < 1e-3,
        "γ for 24 layers is sqrt(ln 48) = 1.9675, got {gamma}"
    );
    let (vs, _m) = Kosmos::build(&cfg, Device::Cpu, Some(1));
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let d = cfg.decoder.decoder_embed_dim as f64;
    let ffn = cfg.decoder.decoder_ffn_embed_dim as f64;
    // PyTorch default: U(±1/sqrt(fan_in)), whose standard deviation is 1/sqrt(3·fan_in).
    let default_std = |fan_in: f64| 1.0 / (3.0 * fan_in).sqrt();
    let collect = |suffix: &str| -> Vec<&Tensor> {
        vars.iter()
            .filter(|(n, _)| n.starts_with("decoder.layers.") && n.ends_with(suffix))
            .map(|(_, t)| t)
            .collect()
    };
    let cases = [
        ("self_attn.q_proj.weight", d, 1.0),
        ("self_attn.k_proj.weight", d, 1.0),
        ("self_attn.q_proj.bias", d, 1.0),
        ("self_attn.v_proj.weight", d, gamma),
        ("self_attn.v_proj.bias", d, gamma),
        ("self_attn.out_proj.weight", d, gamma),
        ("self_attn.out_proj.bias", d, gamma),
        ("ffn.fc1.weight", d, gamma),
        ("ffn.fc1.bias", d, gamma),
        ("ffn.fc2.weight", ffn, gamma),
        ("ffn.fc2.bias", ffn, gamma),
    ];
    for (suffix, fan_in, gain) in cases {
        let ts = collect(suffix);
        assert_eq!(ts.len(), cfg.decoder.decoder_layers, "{suffix} in every layer");
        let ratio = std_of(&ts) / default_std(fan_in);
        // Bias tensors hold fewer draws (24·128 = 3072): allow for their sampling error.
        let tol = if suffix.ends_with("bias") { 0.05 } else { 0.01 };
        assert!(
            (ratio / gain - 1.0).abs() < tol,
            "{suffix}: std ratio {ratio:.4}, expected gain {gain:.4}"
        );
    }
    let out = std_of(&[&vars["decoder.output_projection.weight"]]);
    assert!(
        (out * d.sqrt() - 1.0).abs() < 0.02,
        "output projection std {out} vs D^-0.5"
    );
    for ln in [
        "self_attn.inner_attn_ln.weight",
        "ffn.ffn_layernorm.weight",
        "final_layer_norm.weight",
    ] {
        for t in collect(ln) {
            assert_eq!(
                t.ones_like().ne_tensor(t).sum(tch::Kind::Int64).int64_value(&[]),
                0,
                "{ln} starts at 1"
            );
        }
    }
}

#[test]
fn model_variables_are_the_checkpoint_parameter_list() {
    for cfg in [KosmosConfig::tiny(), config()] {
        let (vs, _m) = Kosmos::build(&cfg, Device::Cpu, None);
        let got: BTreeMap<String, Vec<usize>> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size().iter().map(|&d| d as usize).collect()))
            .collect();
        let want: BTreeMap<String, Vec<usize>> = expected_params(&cfg)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn kosmos1_preset_has_1_6b_parameters() {
    let n = param_count(&KosmosConfig::kosmos1());
    // Paper: ~1.6 B in total (1.3 B decoder + vision side); DESIGN: 1.66 B.
    assert!((1_600_000_000..1_700_000_000).contains(&n), "{n}");
}

#[test]
fn same_seed_same_weights_other_seed_differs() {
    let cfg = KosmosConfig::tiny();
    let w = |seed| {
        let (vs, _m) = Kosmos::build(&cfg, Device::Cpu, Some(seed));
        vs.variables()["decoder.layers.0.ffn.fc1.weight"].copy()
    };
    assert!(w(3).equal(&w(3)));
    assert!(!w(3).equal(&w(4)));
}
