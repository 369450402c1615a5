//! The Rust AdamW (with gradient clipping and the warm-up/decay schedule) against
//! torch.optim.AdamW + clip_grad_norm_ (scripts/oracles/adamw_reference.py).

mod common;

use std::collections::BTreeMap;

use kosmos_train::optim::{AdamW, AdamWConfig, learning_rate};
use tch::{Kind, Tensor};

#[test]
fn adamw_matches_torch() {
    let steps = 12;
    let (p0, grads) = kosmos_train::rng::seeded(5, || {
        (
            Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu)),
            Tensor::randn([steps, 7, 5], (Kind::Float, tch::Device::Cpu)) * 3.0,
        )
    });
    let lrs: Vec<f64> = (0..steps as u64)
        .map(|s| learning_rate(s, 0.05, 4, steps as u64))
        .collect();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.01,
    };
    let clip = 2.0;

    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let lr_t = Tensor::from_slice(&lrs);
    Tensor::write_safetensors(&[("param", &p0), ("grads", &grads), ("lrs", &lr_t)], &inputs).unwrap();
    let output = tmp.path().join("out.safetensors");
    common::run_python(
        "oracles/adamw_reference.py",
        &[
            "--inputs",
            inputs.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--beta1",
            "0.9",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--weight-decay",
            "0.01",
            "--clip",
            "2.0",
        ],
    );
    let expected = Tensor::read_safetensors(&output).unwrap().remove(0).1;

    let p = p0.copy().set_requires_grad(true);
    let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), cfg);
    for (s, lr) in lrs.iter().enumerate() {
        // Make p.grad equal the given gradient through autograd: d(sum(p * g))/dp = g.
        (&p * grads.get(s as i64)).sum(Kind::Float).backward();
        opt.clip_grad_norm(clip);
        opt.step(*lr);
        opt.zero_grad();
    }
    let diff = common::max_abs_diff(&p.detach(), &expected);
    let moved = common::max_abs_diff(&p0, &expected);
    assert!(moved > 0.1, "the parameters moved ({moved})");
    assert!(diff < 1e-6, "AdamW differs from torch by {diff:e}");
}

#[test]
fn schedule_warms_up_then_decays_to_zero() {
    assert!((learning_rate(0, 2e-4, 375, 1000) - 2e-4 / 375.0).abs() < 1e-12);
    assert!((learning_rate(374, 2e-4, 375, 1000) - 2e-4).abs() < 1e-12);
    assert!((learning_rate(375, 2e-4, 375, 1000) - 2e-4).abs() < 1e-12);
    assert!(learning_rate(999, 2e-4, 375, 1000) > 0.0);
    assert_eq!(learning_rate(1000, 2e-4, 375, 1000), 0.0);
}
