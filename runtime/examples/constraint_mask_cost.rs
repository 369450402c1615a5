//! What one structured-output mask costs on a package's vocabulary: the time to find every
//! token allowed after a few texts under a JSON object and a JSON Schema (a fresh matcher each
//! time, median of 20), then along a JSON string character by character as generation meets it
//! (the matcher's cache serves a state that comes back).
//!
//!     cargo run --release -p kosmos-rt --example constraint_mask_cost -- <checkpoint or package dir>

use std::sync::Arc;
use std::time::Instant;

use kosmos_models::{KosmosConfig, KosmosTokenizer};
use kosmos_rt::constrain::ConstraintVocab;
use kosmos_rt::grammar::{Constraint, Json, Matcher};

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("a checkpoint or package directory"),
    );
    let config = if dir.join("config.json").exists() {
        KosmosConfig::load(&dir.join("config.json"))?
    } else {
        kosmos_models::package::PackageManifest::load(&dir)?.config
    };
    let tok = KosmosTokenizer::load(&dir.join("tokenizer.json"), &config.tokenizer)?;
    let t0 = Instant::now();
    let vocab = ConstraintVocab::new(&tok, config.decoder.vocab_size);
    println!(
        "{} tokens: tries built in {:.1} ms",
        config.decoder.vocab_size,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let schema = Json::parse(
        r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"tags":{"type":"array","items":{"type":"string"}}},"required":["name","age","tags"]}"#,
    )?;
    for (what, c) in [
        ("json_object", Constraint::JsonObject),
        ("json_schema", Constraint::JsonSchema(schema)),
    ] {
        let g = c.compile()?;
        for text in ["", "{", "{\"name\": \"Jo", "{\"name\": \"Jo\", \"age\": 4"] {
            let mut times = Vec::new();
            let mut allowed = 0;
            for _ in 0..20 {
                let t0 = Instant::now();
                let mask = vocab
                    .allowed_after(&Arc::clone(&g), text)
                    .expect("a valid prefix");
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                allowed = mask.iter().filter(|&&a| a).count();
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{what:12} after {text:28} {:7.3} ms, {allowed} tokens allowed",
                times[10]
            );
        }
    }
    let g = Constraint::JsonObject.compile()?;
    let mut m = Matcher::new(g);
    assert!(m.accept(b"{\"caption\": \""));
    let mut steps = Vec::new();
    for _ in 0..40 {
        let mut allowed = vec![false; config.decoder.vocab_size];
        let t0 = Instant::now();
        m.fill_allowed(vocab.trie(false), &mut allowed);
        steps.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(m.accept(b"a"));
    }
    let first = steps[0];
    steps.sort_by(f64::total_cmp);
    println!(
        "inside a JSON string, step by step: first {first:.3} ms, then median {:.3} ms",
        steps[20]
    );
    Ok(())
}
