//! Verification ladder step 2: decoding over the KV cache equals the full forward (≤1e-5), for a
//! prompt with an image, then single-token steps; and left-padded batches equal single rows.

mod common;

use common::*;
use kosmos_models::KosmosConfig;
use kosmos_train::model::Kosmos;
use tch::{Device, IndexOp, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;
const DECODE_STEPS: i64 = 10;

fn model(config: &KosmosConfig, seed: i64) -> (tch::nn::VarStore, Kosmos, kosmos_models::KosmosTokenizer) {
    let mut cfg = config.clone();
    let tok =
        kosmos_train::init::tokenizer_for(&mut cfg, kosmos_train::init::TokenizerSource::Builtin).unwrap();
    let (vs, m) = Kosmos::build(&cfg, Device::Cpu, Some(seed));
    (vs, m, tok)
}

fn cached_equals_full(config: &KosmosConfig) {
    let (_vs, model, tok) = model(config, 5);
    let prompt = image_in_middle(&tok, config, "Question: what colour is", "the circle? Answer:");
    let (prompt_ids, prompt_mask) = batch(&[prompt]);
    let p = prompt_ids.size()[1];
    let vocab = config.decoder.vocab_size as i64;
    let continuation = kosmos_train::rng::seeded(9, || {
        Tensor::randint_low(6, vocab, [1, DECODE_STEPS], (Kind::Int64, Device::Cpu))
    });
    let pixel_values = pixels(config, 1, 3);

    tch::no_grad(|| {
        let image_embeds = model.encode_images(&pixel_values, false).unwrap();
        // Full forward over prompt + continuation.
        let all_ids = Tensor::cat(&[&prompt_ids, &continuation], 1);
        let all_img = Tensor::cat(
            &[
                &prompt_mask,
                &Tensor::zeros([1, DECODE_STEPS], (Kind::Bool, Device::Cpu)),
            ],
            1,
        );
        let full = model
            .step(
                &all_ids,
                Some(&image_embeds),
                &all_img,
                &all_ids.ones_like(),
                None,
                false,
            )
            .unwrap()
            .logits;

        // Prefill, then one token at a time over the cache.
        let mut out = model
            .step(
                &prompt_ids,
                Some(&image_embeds),
                &prompt_mask,
                &prompt_ids.ones_like(),
                None,
                false,
            )
            .unwrap();
        let prefill_diff = max_abs_diff(&out.logits, &full.narrow(1, 0, p));
        assert!(prefill_diff <= TOLERANCE, "prefill differs by {prefill_diff:e}");
        let mut worst = prefill_diff;
        for t in 0..DECODE_STEPS {
            let ids = continuation.narrow(1, t, 1);
            let mask = Tensor::ones([1, p + t + 1], (Kind::Int64, Device::Cpu));
            let no_img = Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu));
            out = model
                .step(&ids, None, &no_img, &mask, Some(&out.present), false)
                .unwrap();
            assert_eq!(out.present[0].key.size()[2], p + t + 1, "cache grows by one");
            let diff = max_abs_diff(&out.logits, &full.narrow(1, p + t, 1));
            worst = worst.max(diff);
            assert!(diff <= TOLERANCE, "decode step {t} differs by {diff:e}");
        }
        eprintln!("max |cached - full| over prefill + {DECODE_STEPS} steps = {worst:.3e}");
    });
}

#[test]
fn cached_decoding_equals_full_forward_tiny() {
    cached_equals_full(&KosmosConfig::tiny());
}

#[test]
fn cached_decoding_equals_full_forward_odd() {
    cached_equals_full(&odd_config());
}

/// Left padding through `attention_mask` (positions = cumsum − 1) leaves each row's logits as
/// they are alone, in prefill and over cached steps.
#[test]
fn left_padded_batch_equals_single_rows() {
    let config = KosmosConfig::tiny();
    let (_vs, model, tok) = model(&config, 8);
    let long = image_in_middle(
        &tok,
        &config,
        "a green triangle on the left and",
        "a yellow circle on the right",
    );
    let short = image_in_middle(&tok, &config, "a", "circle");
    let pixel_values = pixels(&config, 2, 4);
    let (lp, sp) = (long.len() as i64, short.len() as i64);
    let pad = lp - sp;

    tch::no_grad(|| {
        let emb = model.encode_images(&pixel_values, false).unwrap();
        let single = |a: &kosmos_models::sequence::Assembled, e: Tensor| {
            let (ids, m) = batch(std::slice::from_ref(a));
            model
                .step(&ids, Some(&e), &m, &ids.ones_like(), None, false)
                .unwrap()
        };
        let long_alone = single(&long, emb.i(0..1));
        let short_alone = single(&short, emb.i(1..2));

        let mut padded = short.clone();
        padded.input_ids.splice(
            0..0,
            std::iter::repeat_n(config.tokenizer.pad_token_id, pad as usize),
        );
        padded
            .image_mask
            .splice(0..0, std::iter::repeat_n(false, pad as usize));
        let (ids, img) = batch(&[long.clone(), padded]);
        let attn = ids.ones_like();
        let _ = attn.i((1, 0..pad)).fill_(0);
        let out = model.step(&ids, Some(&emb), &img, &attn, None, false).unwrap();
        let d_long = max_abs_diff(&out.logits.i(0..1), &long_alone.logits);
        let d_short = max_abs_diff(&out.logits.i((1..2, pad..)), &short_alone.logits);
        assert!(
            d_long <= TOLERANCE && d_short <= TOLERANCE,
            "prefill: {d_long:e} {d_short:e}"
        );

        // One cached step with the same next token in both rows.
        let next = Tensor::from_slice(&[7i64, 7]).view([2, 1]);
        let attn2 = Tensor::cat(&[&attn, &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu))], 1);
        let no_img = Tensor::zeros([2, 1], (Kind::Bool, Device::Cpu));
        let step = model
            .step(&next, None, &no_img, &attn2, Some(&out.present), false)
            .unwrap();
        let alone = |o: &kosmos_train::StepOutput, len: i64| {
            let ids = Tensor::from_slice(&[7i64]).view([1, 1]);
            let m = Tensor::ones([1, len + 1], (Kind::Int64, Device::Cpu));
            model
                .step(
                    &ids,
                    None,
                    &Tensor::zeros([1, 1], (Kind::Bool, Device::Cpu)),
                    &m,
                    Some(&o.present),
                    false,
                )
                .unwrap()
        };
        let d_long = max_abs_diff(&step.logits.i(0..1), &alone(&long_alone, lp).logits);
        let d_short = max_abs_diff(&step.logits.i(1..2), &alone(&short_alone, sp).logits);
        assert!(
            d_long <= TOLERANCE && d_short <= TOLERANCE,
            "cached step: {d_long:e} {d_short:e}"
        );
        assert_eq!(
            out.logits.isnan().any().int64_value(&[]),
            0,
            "no NaN from fully padded rows"
        );
    });
}
