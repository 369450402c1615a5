use kosmos_train::data::{DataStream, open_source};
use kosmos_train::synthetic::Split;
fn main() {
    let mut cfg = kosmos_models::KosmosConfig::tiny();
    let tok = kosmos_train::init::tokenizer_for(&mut cfg, kosmos_train::init::TokenizerSource::Builtin).unwrap();
    let src = open_source("synthetic:shapes", Split::Train, 0, None).unwrap();
    let mut s = DataStream::new(vec![(src, 1.0)], 0, tok, cfg, 32, 48).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 { s.next_batch().unwrap(); }
    println!("{:.1} ms/batch", t.elapsed().as_secs_f64() * 50.0);
}
