//! bf16 mixed precision (the CUDA default) runs and stays close to fp32. Its own test binary:
//! the precision switch is process-wide.

use kosmos_models::KosmosConfig;
use kosmos_train::model::Kosmos;
use kosmos_train::model::layers::set_bf16_matmuls;
use tch::{Device, Kind, Tensor};

#[test]
fn bf16_matmuls_track_fp32() {
    let cfg = KosmosConfig::tiny();
    let (_vs, model) = Kosmos::build(&cfg, Device::Cpu, Some(2));
    let s = cfg.vision.image_size as i64;
    let (px, ids) = kosmos_train::rng::seeded(1, || {
        (
            Tensor::randn([1, 3, s, s], (Kind::Float, Device::Cpu)),
            Tensor::randint_low(6, 500, [1, 30], (Kind::Int64, Device::Cpu)),
        )
    });
    let l = cfg.image_tokens() as i64;
    let mask = Tensor::zeros([1, 30], (Kind::Bool, Device::Cpu));
    let _ = mask.narrow(1, 2, l).fill_(1);
    let run = || {
        tch::no_grad(|| {
            model
                .forward(&ids, Some(&px), &mask, &ids.ones_like(), false)
                .unwrap()
        })
    };
    let fp32 = run();
    set_bf16_matmuls(true);
    let bf16 = run();
    set_bf16_matmuls(false);
    assert_eq!(bf16.kind(), Kind::Float, "activations stay fp32");
    let diff = (&fp32 - &bf16).abs().max().double_value(&[]);
    let scale = fp32.abs().max().double_value(&[]);
    assert!(diff > 0.0, "bf16 path was taken");
    assert!(
        diff < 0.05 * scale.max(1.0),
        "bf16 logits off by {diff} (scale {scale})"
    );
}
