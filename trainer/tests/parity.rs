//! Verification ladder step 1: the tch model equals the reference PyTorch modules (HF
//! CLIPVisionModel + flamingo-pytorch PerceiverResampler + torchscale Decoder, loaded strictly
//! from the same checkpoint by scripts/oracles/kosmos1_reference.py) to ≤1e-4 max abs on logits.

mod common;

use common::*;
use kosmos_models::{Checkpoint, KosmosConfig};
use kosmos_train::checkpoint;
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn check_parity(config: &KosmosConfig, seed: i64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_checkpoint(config, seed, &tmp.path().join("ckpt"));
    let (_vs, model, ckpt) = checkpoint::load(&dir, tch::Device::Cpu).unwrap();
    let tok = &ckpt.tokenizer;

    // Two prompts, each with an image between two pieces of text, of equal length.
    let a = image_in_middle(
        tok,
        config,
        "a red circle on the left",
        "and a blue square on the right",
    );
    let b = image_in_middle(
        tok,
        config,
        "a blue square on the right",
        "and a red circle on the left",
    );
    assert_eq!(a.len(), b.len());
    let (input_ids, image_mask) = batch(&[a, b]);
    let pixel_values = pixels(config, 2, seed + 1);

    let inputs = tmp.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("pixel_values", &pixel_values),
            ("input_ids", &input_ids),
            ("image_mask", &image_mask.to_kind(Kind::Uint8)),
        ],
        &inputs,
    )
    .unwrap();
    let reference = tmp.path().join("reference.safetensors");
    run_python(
        "oracles/kosmos1_reference.py",
        &[
            "--checkpoint",
            dir.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--output",
            reference.to_str().unwrap(),
        ],
    );
    let expected = Tensor::read_safetensors(&reference).unwrap().remove(0).1;

    let attention_mask = input_ids.ones_like();
    let logits = tch::no_grad(|| {
        model.forward(
            &input_ids,
            Some(&pixel_values),
            &image_mask,
            &attention_mask,
            false,
        )
    })
    .unwrap();
    let diff = max_abs_diff(&logits, &expected);
    let scale = expected.abs().max().double_value(&[]);
    eprintln!("max |tch - reference| = {diff:.3e} (logits up to {scale:.2})");
    assert!(
        diff <= TOLERANCE,
        "tch logits differ from the reference by {diff:e} > {TOLERANCE:e}"
    );
    // A real signal: the logits are far from constant, so agreement is not vacuous.
    assert!(scale > 0.1, "degenerate logits");
    let _ = Checkpoint::open(&dir).unwrap();
}

#[test]
fn tiny_preset_matches_reference() {
    check_parity(&KosmosConfig::tiny(), 11);
}

#[test]
fn odd_sized_config_matches_reference() {
    check_parity(&odd_config(), 23);
}
