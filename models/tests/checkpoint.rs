//! Checkpoint directories: round trip, atomic replacement, and one clear error naming the file
//! for each kind of damage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kosmos_models::{
    Checkpoint, KosmosConfig, KosmosTokenizer, TensorBytes, expected_params, write_checkpoint,
};

fn tokenizer(cfg: &KosmosConfig) -> KosmosTokenizer {
    let corpus = [
        "a red circle on the left",
        "Question: what colour is the square? Answer: blue",
    ];
    KosmosTokenizer::train(|| corpus.iter(), cfg.decoder.vocab_size, &cfg.tokenizer).unwrap()
}

/// Write a checkpoint whose every tensor holds `value`.
fn write(cfg: &KosmosConfig, dir: &Path, value: f32, overwrite: bool) -> kosmos_models::Result<PathBuf> {
    let specs = expected_params(cfg);
    let buffers: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| value.to_le_bytes().repeat(s.shape.iter().product()))
        .collect();
    let tensors: BTreeMap<String, TensorBytes<'_>> = specs
        .iter()
        .zip(&buffers)
        .map(|(s, b)| {
            (
                s.name.clone(),
                TensorBytes {
                    shape: s.shape.clone(),
                    data: b,
                },
            )
        })
        .collect();
    write_checkpoint(dir, cfg, &tokenizer(cfg), &tensors, overwrite, None)
}

fn small() -> KosmosConfig {
    let mut c = KosmosConfig::tiny();
    c.decoder.vocab_size = 64;
    c.decoder.decoder_layers = 1;
    c.vision.num_hidden_layers = 1;
    c
}

#[test]
fn round_trip_and_refuse_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    write(&small(), &dir, 0.5, false).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config, small());
    let t = ck.tensor("decoder.layer_norm.weight").unwrap();
    assert_eq!(&t.data()[..4], &0.5f32.to_le_bytes());

    let e = write(&small(), &dir, 1.0, false).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    write(&small(), &dir, 1.0, true).unwrap();
    let t = Checkpoint::open(&dir).unwrap();
    assert_eq!(
        &t.tensor("decoder.layer_norm.weight").unwrap().data()[..4],
        &1.0f32.to_le_bytes()
    );
    // Nothing left behind by the staging.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["ckpt".to_string()]);
}

#[test]
fn wrong_tensors_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let cfg = small();
    let data = vec![0u8; 16];
    let tensors = BTreeMap::from([(
        "decoder.layer_norm.weight".to_string(),
        TensorBytes {
            shape: vec![4],
            data: &data,
        },
    )]);
    let e = write_checkpoint(&dir, &cfg, &tokenizer(&cfg), &tensors, false, None).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(!dir.exists());
}

fn assert_names(err: kosmos_models::ModelsError, file: &str, also: &str) {
    let msg = err.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    assert!(msg.contains(also), "error does not say {also:?}: {msg}");
}

#[test]
fn truncated_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write(&small(), &tmp.path().join("c"), 0.0, false).unwrap();
    let w = dir.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
    f.set_len(len / 2).unwrap();
    assert_names(
        Checkpoint::open(&dir).unwrap_err(),
        "model.safetensors",
        "truncated",
    );
}

#[test]
fn config_sizes_disagree_with_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write(&small(), &tmp.path().join("c"), 0.0, false).unwrap();
    let mut cfg = small();
    cfg.decoder.decoder_ffn_embed_dim = 2048;
    std::fs::write(dir.join("config.json"), cfg.to_json()).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err();
    assert_names(
        e,
        "model.safetensors",
        "ffn.fc1.weight has shape [1024, 256], config implies [2048, 256]",
    );
}

#[test]
fn missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write(&small(), &tmp.path().join("c"), 0.0, false).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_names(Checkpoint::open(&dir).unwrap_err(), "tokenizer.json", "missing");

    let dir = write(&small(), &tmp.path().join("d"), 0.0, false).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_names(
        Checkpoint::open(&dir).unwrap_err(),
        "model.safetensors",
        "missing",
    );

    assert_names(
        Checkpoint::open(&tmp.path().join("nowhere")).unwrap_err(),
        "nowhere",
        "missing",
    );
}

#[test]
fn tokenizer_size_disagrees_with_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write(&small(), &tmp.path().join("c"), 0.0, false).unwrap();
    let mut other = small();
    other.decoder.vocab_size = 80;
    tokenizer(&other).save(&dir.join("tokenizer.json")).unwrap();
    assert_names(
        Checkpoint::open(&dir).unwrap_err(),
        "tokenizer.json",
        "80 entries",
    );
}
