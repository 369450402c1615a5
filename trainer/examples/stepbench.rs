use kosmos_train::data::{DataStream, open_source};
use kosmos_train::fit::{batch_loss, to_tensors};
use kosmos_train::synthetic::Split;
use std::time::Instant;
fn main() {
    let mut cfg = kosmos_models::KosmosConfig::tiny();
    if let Ok(d) = std::env::var("DROPOUT") {
        let d: f64 = d.parse().unwrap();
        cfg.decoder.dropout = d;
        cfg.decoder.attention_dropout = d;
    }
    let tok =
        kosmos_train::init::tokenizer_for(&mut cfg, kosmos_train::init::TokenizerSource::Builtin).unwrap();
    let src = open_source("synthetic:shapes", Split::Train, 0, None).unwrap();
    let mut s = DataStream::new(vec![(src, 1.0)], 0, tok, cfg.clone(), 32, 48).unwrap();
    let (vs, model) = kosmos_train::Kosmos::build(&cfg, tch::Device::Cpu, Some(0));
    let params: std::collections::BTreeMap<_, _> = vs.variables().into_iter().collect();
    let mut opt = kosmos_train::optim::AdamW::new(
        params,
        kosmos_train::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.01,
        },
    );
    println!("threads {}", tch::get_num_threads());
    let (mut tf, mut tb, mut to, mut tv) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..15 {
        let b = s.next_batch().unwrap();
        let t = to_tensors(&b, &cfg, tch::Device::Cpu);
        let t0 = Instant::now();
        let _ = tch::no_grad(|| model.encode_images(t.pixels.as_ref().unwrap(), true).unwrap());
        let t1 = Instant::now();
        let loss = batch_loss(&model, &t, true).unwrap();
        let t2 = Instant::now();
        loss.backward();
        let t3 = Instant::now();
        opt.clip_grad_norm(2.0);
        opt.step(1e-3);
        opt.zero_grad();
        let t4 = Instant::now();
        if i >= 5 {
            tv += (t1 - t0).as_secs_f64();
            tf += (t2 - t1).as_secs_f64();
            tb += (t3 - t2).as_secs_f64();
            to += (t4 - t3).as_secs_f64();
        }
    }
    println!(
        "vision fwd {:.0} ms, full fwd {:.0} ms, bwd {:.0} ms, opt {:.0} ms",
        tv * 100.0,
        tf * 100.0,
        tb * 100.0,
        to * 100.0
    );
}
