//! The `kosmos-export` command line: bad input gets one clear error and leaves no output behind;
//! inspect and verify work on a real package.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kosmos_models::KosmosConfig;
use kosmos_train::init::{TokenizerSource, init_checkpoint};

fn exporter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kosmos-export"))
        .args(args)
        .output()
        .expect("run kosmos-export")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_ckpt(dir: &Path) -> PathBuf {
    init_checkpoint(
        KosmosConfig::tiny(),
        0,
        TokenizerSource::Builtin,
        &dir.join("ckpt"),
        true,
    )
    .expect("init")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Nothing but the named entries in `dir` (no staging leftovers).
fn assert_only(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "entries of {}", dir.display());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn export_inspect_verify() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_ckpt(dir.path());
    let pkg = dir.path().join("pkg");
    let o = exporter(&[s(&ckpt), "--to", "onnx", "-o", s(&pkg), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_only(
        &pkg,
        &[
            "decoder.onnx",
            "decoder.onnx.data",
            "kosmos_rt.json",
            "tokenizer.json",
            "vision.onnx",
            "vision.onnx.data",
        ],
    );

    let o = exporter(&["inspect", s(&pkg.join("decoder.onnx"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("past_key_values.3.value"), "{text}");
    assert!(text.contains("present.0.key"), "{text}");
    assert!(text.contains("/decoder/layers.3 ("), "{text}");

    let o = exporter(&["verify", s(&ckpt), s(&pkg), "--steps", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(r["passed"], true);

    // An impossible tolerance fails with exit status 2.
    let o = exporter(&["verify", s(&ckpt), s(&pkg), "--steps", "1", "--tolerance", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
}

#[test]
fn bad_input_gets_one_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny_ckpt(dir.path());
    let out = dir.path().join("out");
    let nope = dir.path().join("nope");
    let missing_manifest = dir.path().join("calibration.jsonl");
    // Inside the checkpoint's directory, so that the checks below find nothing new beside it.
    let empty_manifest = dir.path().join("ckpt").join("empty.jsonl");
    std::fs::write(&empty_manifest, "{\"text\": \"\"}\n").unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![s(&nope), "-o", s(&out)], "checkpoint directory"),
        (
            vec![s(&ckpt), "-o", s(&out), "--profile", "fast"],
            "unknown profile 'fast'",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--dtype", "int3"],
            "unknown dtype 'int3'",
        ),
        (vec![s(&ckpt), "-o", s(&out), "--to", "trt"], "needs TensorRT"),
        (
            vec![s(&ckpt), "-o", s(&out), "--kv-cache", "ring"],
            "unknown --kv-cache 'ring'",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--kv-cache",
                "buffer",
                "--profile",
                "ort",
            ],
            "use --profile portable",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--packed-linears", "--dtype", "fp16"],
            "--packed-linears needs --dtype fp32",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--kv-cache",
                "buffer",
                "--kv-cache-dtype",
                "fp16",
            ],
            "--kv-cache-dtype fp16 with --dtype fp32: a cache type other than the model's is \
             read by --cached-attention's kernel",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--kv-cache-dtype", "int8"],
            "--kv-cache-dtype int8 with --dtype fp32: a cache type other than the model's is \
             read by --cached-attention's kernel",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--kv-cache-dtype", "int4"],
            "unknown --kv-cache-dtype 'int4' (available: fp32, fp16, int8)",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--dtype",
                "fp16",
                "--kv-cache-dtype",
                "int8",
            ],
            "--kv-cache-dtype int8 with --dtype fp16: the int8 cache is read by \
             --cached-attention's kernel, which is float32",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--packed-linears", "--profile", "trt"],
            "TensorRT has no plugin for it",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--quantize", "int2"],
            "unknown --quantize 'int2' (available: int8, int4)",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--quantize",
                "int4",
                "--quant-block-size",
                "48",
            ],
            "--quantize: block size 48 (available: 16, 32, 64, 128, 256)",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--quantize",
                "int8",
                "--quant-accuracy-level",
                "7",
            ],
            "accuracy level 7",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--quantize", "int8", "--profile", "trt"],
            "--quantize int8 with --profile trt: TensorRT's ONNX parser has no MatMulNBits",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--quantize", "int8", "--packed-linears"],
            "--packed-linears: both replace the decoder's linears",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--quant-block-size", "64"],
            "--quantize",
        ),
        (
            vec![s(&ckpt), "-o", s(&out), "--awq", "synthetic:shapes"],
            "--quantize",
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--quantize",
                "int4",
                "--awq",
                s(&missing_manifest),
            ],
            missing_manifest.to_str().unwrap(),
        ),
        (
            vec![
                s(&ckpt),
                "-o",
                s(&out),
                "--quantize",
                "int4",
                "--awq",
                s(&empty_manifest),
            ],
            "no usable example",
        ),
    ];
    for (args, want) in &cases {
        let o = exporter(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: expected '{want}' in: {e}");
        assert_eq!(e.matches("error:").count(), 1, "one error: {e}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    assert_only(dir.path(), &["ckpt"]);

    // An output that exists is refused without --force and left untouched.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = exporter(&[s(&ckpt), "-o", s(&out), "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("refusing to overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    let o = exporter(&[s(&ckpt), "-o", s(&out), "--quiet", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    std::fs::remove_dir_all(&out).unwrap();

    // Missing files, and a config that disagrees with the weights.
    for (file, want) in [
        ("model.safetensors", "model weights"),
        ("tokenizer.json", "tokenizer.json"),
    ] {
        let broken = dir.path().join(format!("no-{file}"));
        copy_dir(&ckpt, &broken);
        std::fs::remove_file(broken.join(file)).unwrap();
        let o = exporter(&[s(&broken), "-o", s(&out), "--quiet"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{file}: {}", stderr(&o));
        assert!(!out.exists());
    }
    let mismatch = dir.path().join("mismatch");
    copy_dir(&ckpt, &mismatch);
    let cfg_path = mismatch.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["decoder"]["decoder_ffn_embed_dim"] = serde_json::json!(768);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let o = exporter(&[s(&mismatch), "-o", s(&out), "--quiet"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("fc1.weight") && e.contains("768"), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out") || n.starts_with(".out"))
        .collect();
    assert!(leftovers.is_empty(), "staging leftovers: {leftovers:?}");

    // inspect on something that is not ONNX.
    let o = exporter(&["inspect", s(&ckpt.join("config.json"))]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a readable ONNX model"), "{}", stderr(&o));
}
