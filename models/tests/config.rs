//! Config schema: presets as the paper specifies, JSON round trip, and clear errors.

use kosmos_models::{KosmosConfig, ModelsError};

#[test]
fn kosmos1_preset_is_the_seed() {
    let c = KosmosConfig::preset("kosmos-1").unwrap();
    let v = &c.vision;
    assert_eq!(
        (
            v.hidden_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.intermediate_size
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!((v.image_size, v.patch_size, v.num_positions()), (224, 14, 257));
    assert_eq!(v.hidden_act, "quick_gelu");
    let r = &c.resampler;
    assert_eq!(
        (
            r.dim,
            r.depth,
            r.dim_head,
            r.heads,
            r.num_latents,
            r.num_media_embeds,
            r.ff_mult
        ),
        (1024, 2, 64, 8, 64, 256, 4)
    );
    let d = &c.decoder;
    assert_eq!(
        (
            d.decoder_layers,
            d.decoder_embed_dim,
            d.decoder_ffn_embed_dim,
            d.decoder_attention_heads
        ),
        (24, 2048, 8192, 32)
    );
    assert_eq!(d.vocab_size, 32002);
    assert!(d.subln && d.xpos_rel_pos && d.no_scale_embedding);
    assert_eq!(
        (d.xpos_scale_base, d.dropout, d.attention_dropout, d.layernorm_eps),
        (512.0, 0.1, 0.1, 1e-5)
    );
    assert_eq!(d.activation_fn, "gelu");
    assert_eq!(d.embed_scale(), 1.0);
}

#[test]
fn json_round_trip() {
    for name in kosmos_models::config::PRESETS {
        let c = KosmosConfig::preset(name).unwrap();
        let back: KosmosConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let e = KosmosConfig::preset("kosmos-9").unwrap_err();
    assert!(matches!(e, ModelsError::UnknownPreset { .. }));
    assert!(e.to_string().contains("tiny") && e.to_string().contains("kosmos-1"));
}

#[test]
fn inconsistent_sizes_are_named() {
    let mut c = KosmosConfig::tiny();
    c.decoder.decoder_attention_heads = 3; // 256 / 3
    c.resampler.dim = 64; // != vision hidden 128
    let msg = c.validate().unwrap_err().to_string();
    assert!(
        msg.contains("decoder_attention_heads") && msg.contains("resampler.dim"),
        "{msg}"
    );

    let mut c = KosmosConfig::tiny();
    c.decoder.moe_freq = 2;
    assert!(c.validate().unwrap_err().to_string().contains("moe_freq"));
}

#[test]
fn load_names_the_file_and_rejects_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let e = KosmosConfig::load(&path).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&KosmosConfig::tiny().to_json()).unwrap();
    v["decoder"]["decoder_layerz"] = 3.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = KosmosConfig::load(&path).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("decoder_layerz"), "{e}");

    std::fs::write(&path, "{ not json").unwrap();
    assert!(
        KosmosConfig::load(&path)
            .unwrap_err()
            .to_string()
            .contains("config.json")
    );
}
