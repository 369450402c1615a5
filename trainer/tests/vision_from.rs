//! `--vision-from`: a Hugging Face CLIP checkpoint (CLIPModel layout, `vision_model.` keys, text
//! tower present) starts the vision tower, and the tower then computes what transformers'
//! CLIPVisionModel computes on the same pixels.

mod common;

use kosmos_models::KosmosConfig;
use kosmos_train::Kosmos;
use kosmos_train::checkpoint::load_hf_clip_vision;
use tch::{Device, Tensor};

#[test]
fn hf_clip_checkpoint_starts_the_vision_tower() {
    let dir = tempfile::tempdir().unwrap();
    let config = KosmosConfig::tiny();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, config.to_json()).unwrap();
    let clip = dir.path().join("model.safetensors");
    let reference = dir.path().join("reference.safetensors");
    common::run_python(
        "oracles/clip_checkpoint.py",
        &[
            cfg.to_str().unwrap(),
            clip.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );

    let (vs, model): (_, Kosmos) = Kosmos::build(&config, Device::Cpu, Some(3));
    load_hf_clip_vision(&vs, &clip).expect("load the CLIP tower");
    let refs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&reference)
        .unwrap()
        .into_iter()
        .collect();
    let got = tch::no_grad(|| model.vision.forward(&refs["pixel_values"], false));
    let diff = common::max_abs_diff(&got, &refs["last_hidden_state"]);
    eprintln!("vision tower vs CLIPVisionModel: max |diff| {diff:.2e}");
    assert!(diff <= 1e-4, "{diff}");

    // A checkpoint for another tower size is refused with the tensor named.
    let mut other = config.clone();
    other.vision.intermediate_size = 256;
    let (vs2, _) = Kosmos::build(&other, Device::Cpu, Some(3));
    let err = load_hf_clip_vision(&vs2, &clip).unwrap_err().to_string();
    assert!(
        err.contains("encoder.layers.0.mlp.fc1.bias has shape [512]") && err.contains("model.safetensors"),
        "{err}"
    );
}
