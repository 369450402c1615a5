//! The `kosmos-train` command line: `init` writes a complete checkpoint, `info` loads it, and
//! each kind of damage gives one clear error line naming the file, exit code 1, no panic.

use std::path::Path;
use std::process::{Command, Output};

fn kosmos_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kosmos-train"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kosmos-train")
}

fn init(dir: &Path) {
    let out = kosmos_train(&[
        "init",
        "--preset",
        "tiny",
        "--seed",
        "1",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Exit code 1 and exactly one line on stderr that names `file` and says `what`.
fn assert_one_line_error(out: &Output, file: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(file) && lines[0].contains(what), "{stderr}");
}

#[test]
fn init_writes_a_checkpoint_that_info_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    init(&dir);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let out = kosmos_train(&["info", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("vocab 512") && stdout.contains("tokenizer    512 entries"),
        "{stdout}"
    );
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    init(&dir);
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let args = [
        "init",
        "--preset",
        "tiny",
        "--seed",
        "2",
        "-o",
        dir.to_str().unwrap(),
    ];
    let out = kosmos_train(&args);
    assert_one_line_error(&out, "tiny", "--force");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        before,
        "untouched"
    );
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(kosmos_train(&forced).status.success());
    assert_ne!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        before,
        "replaced"
    );
}

#[test]
fn truncated_weights_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    init(&dir);
    let w = dir.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    assert_one_line_error(
        &kosmos_train(&["info", dir.to_str().unwrap()]),
        "model.safetensors",
        "truncated",
    );
}

#[test]
fn config_disagreeing_with_weights_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    init(&dir);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["decoder"]["decoder_layers"] = 5.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    assert_one_line_error(
        &kosmos_train(&["info", dir.to_str().unwrap()]),
        "model.safetensors",
        "missing decoder.layers.4",
    );
}

#[test]
fn missing_tokenizer_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    init(&dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_one_line_error(
        &kosmos_train(&["info", dir.to_str().unwrap()]),
        "tokenizer.json",
        "missing",
    );
}

#[test]
fn unknown_preset_is_refused_with_the_choices() {
    let out = kosmos_train(&["init", "--preset", "huge", "-o", "/nonexistent/x"]);
    assert_eq!(out.status.code(), Some(2)); // clap usage error
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tiny") && stderr.contains("kosmos-1"), "{stderr}");
}
