//! The Python bindings (`python/kosmos_rt`, ctypes over `libkosmos_rt.so`): `python/tests` runs
//! under `.venv` against the debug library, expecting for each case what the Rust API generates
//! from the same package, and checks the bindings' structs against the C compiler's layout of
//! the header and the tokenizer against Hugging Face `tokenizers`.

use std::path::Path;
use std::process::Command;

use kosmos_models::KosmosConfig;
use kosmos_rt::{GenerateParams, ImageInput, Package, Prompt, SessionOptions, VisionCache};
use kosmos_train::synthetic::{Split, Task, item};
use serde_json::{Value, json};

/// What `Package::generate` makes of `prompt` under `params`, as the Python test expects it.
fn expect(package: &mut Package, image: &Path, prompt: &str, params: &GenerateParams) -> Value {
    let images = if prompt.contains("<image>") {
        vec![ImageInput::Path(image.to_path_buf())]
    } else {
        vec![]
    };
    let parsed = Prompt::parse(prompt, images).unwrap();
    let g = package
        .generate(&mut VisionCache::new(1), &[parsed], params, &mut |_, _| true)
        .unwrap()
        .remove(0);
    let mut case = json!({
        "prompt": prompt,
        "max_tokens": params.max_tokens,
        "text": g.text,
        "tokens": g.tokens,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_tokens,
    });
    // Every setting is passed, so that a field the bindings put in the wrong place shows.
    for (name, value) in [
        ("temperature", json!(params.temperature)),
        ("top_k", json!(params.top_k)),
        ("top_p", json!(params.top_p)),
        ("min_p", json!(params.min_p)),
        ("repetition_penalty", json!(params.repetition_penalty)),
        ("presence_penalty", json!(params.presence_penalty)),
        ("frequency_penalty", json!(params.frequency_penalty)),
        ("seed", json!(params.seed)),
        ("stop", json!(params.stop)),
    ] {
        case[name] = value;
    }
    case
}

#[test]
fn python_bindings_equal_the_rust_api() {
    let root = kosmos_e2e::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_buffer_package(dir.path(), 8);
    let image = dir.path().join("shape.png");
    item(Task::Shapes, Split::Test, 0, 3).image.save(&image).unwrap();

    let mut package = Package::open(&pkg, &SessionOptions::default()).unwrap();
    let greedy = |max_tokens| GenerateParams {
        max_tokens,
        ..Default::default()
    };
    let mut cases = vec![
        expect(&mut package, &image, "<image>", &greedy(12)),
        expect(
            &mut package,
            &image,
            "<image> Question: what colour is the circle? Answer:",
            &greedy(10),
        ),
        expect(
            &mut package,
            &image,
            "",
            &GenerateParams {
                max_tokens: 12,
                temperature: 0.9,
                top_k: 20,
                seed: 11,
                ..Default::default()
            },
        ),
    ];
    cases.push(expect(
        &mut package,
        &image,
        "<image> a",
        &GenerateParams {
            max_tokens: 12,
            temperature: 1.2,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.3,
            presence_penalty: 0.7,
            frequency_penalty: 0.4,
            seed: 5,
            ..Default::default()
        },
    ));
    // A stop string from the middle of a greedy answer: the text ends before it.
    let free = expect(&mut package, &image, "a red circle on the left and", &greedy(16));
    let text: Vec<char> = free["text"].as_str().unwrap().chars().collect();
    assert!(text.len() >= 6, "{free}");
    let stop: String = text[text.len() / 2..text.len() / 2 + 2].iter().collect();
    let stopped = GenerateParams {
        stop: vec![stop],
        ..greedy(16)
    };
    let case = expect(&mut package, &image, "a red circle on the left and", &stopped);
    assert_eq!(case["finish_reason"], "stop", "{case}");
    cases.push(case);
    let mut scores = Vec::new();
    for (prompt, add_eos) in [
        ("<image> a red circle on the left", true),
        ("a red circle", false),
    ] {
        let images = if prompt.contains("<image>") {
            vec![ImageInput::Path(image.clone())]
        } else {
            Vec::new()
        };
        let p = Prompt::parse(prompt, images).unwrap();
        let s = package
            .score(&mut VisionCache::new(0), &[p], add_eos)
            .unwrap()
            .remove(0);
        scores
            .push(json!({"prompt": prompt, "add_eos": add_eos, "tokens": s.tokens, "logprobs": s.logprobs}));
    }
    let special = package.tokenizer.special().clone();
    drop(package);

    let expected = json!({
        "package": pkg,
        "image": image,
        "cases": cases,
        "scores": scores,
        "texts": [
            "a red circle on the left and a blue square on the right",
            "Question: what colour is the <image> circle? Answer:",
            "naïve café — 東京 🙂",
            "",
        ],
        "bos": special.bos_token_id,
        "bos_token": special.bos_token,
        "eos_token": special.eos_token,
        "max_positions": KosmosConfig::tiny().decoder.max_target_positions,
    });
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec_pretty(&expected).unwrap()).unwrap();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "-p", "kosmos-rt", "--lib"])
        .status()
        .unwrap();
    assert!(built.success());
    let out = Command::new(root.join(".venv/bin/python"))
        .current_dir(&root)
        .args(["-m", "unittest", "discover", "-s", "python/tests", "-v"])
        .env("PYTHONPATH", root.join("python"))
        .env("KOSMOS_RT_LIB", root.join("target/debug/libkosmos_rt.so"))
        .env("KOSMOS_PY_EXPECTED", &expected_path)
        .env("ORT_DYLIB_PATH", kosmos_rt::ort_env::ort_dylib_path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(out.status.success(), "python/tests failed:\n{log}");
    assert!(log.contains("OK"), "{log}");
}

/// `scripts/python_wheel.sh` makes a wheel that installs and runs away from the checkout: the
/// library inside it is the one loaded, and it captions as the Rust API does.
#[test]
fn python_wheel_installs_and_runs_outside_the_checkout() {
    let root = kosmos_e2e::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_package(dir.path(), 9);
    let image = dir.path().join("shape.png");
    item(Task::Shapes, Split::Test, 0, 1).image.save(&image).unwrap();
    let mut package = Package::open(&pkg, &SessionOptions::default()).unwrap();
    let want = expect(
        &mut package,
        &image,
        "<image>",
        &GenerateParams {
            max_tokens: 8,
            ..Default::default()
        },
    );
    drop(package);

    let wheels = dir.path().join("wheels");
    let built = Command::new(root.join("scripts/python_wheel.sh"))
        .arg("--debug")
        .arg("-o")
        .arg(&wheels)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    let prefix = format!("kosmos_rt-{}-py3-none-manylinux_2_", env!("CARGO_PKG_VERSION"));
    let glibc_minor: u32 = name
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split('_').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: not {prefix}<N>_<arch>.whl"));
    // A platform wheel: the library at its root (platlib), none under `.data/purelib`, where
    // PyPI and auditwheel refuse native code.
    let listing = Command::new(root.join(".venv/bin/python"))
        .args(["-m", "zipfile", "-l"])
        .arg(&wheel)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("kosmos_rt/libkosmos_rt.so"), "{listing}");
    assert!(!listing.contains(".data/"), "{listing}");
    let inner = |path: &str| {
        let out = Command::new(root.join(".venv/bin/python"))
            .args([
                "-c",
                "import sys, zipfile; sys.stdout.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]).decode())",
            ])
            .arg(&wheel)
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metadata = inner(&format!(
        "kosmos_rt-{}.dist-info/WHEEL",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(metadata.contains("Root-Is-Purelib: false"), "{metadata}");
    // The tag's glibc is no older than the newest GLIBC_2.x symbol version the library needs,
    // as binutils reads them.
    let lib = root.join("target/debug/libkosmos_rt.so");
    let symbols = Command::new("objdump").arg("-T").arg(&lib).output().unwrap();
    assert!(symbols.status.success(), "objdump -T {}", lib.display());
    let needed = String::from_utf8_lossy(&symbols.stdout)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_2."))
        .filter_map(|v| v.split('.').next()?.parse::<u32>().ok())
        .max()
        .expect("the library uses versioned glibc symbols");
    assert!(
        glibc_minor >= needed,
        "{name}: tagged for glibc 2.{glibc_minor}, the library needs 2.{needed}"
    );
    let site = dir.path().join("site");
    let python = root.join(".venv/bin/python");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
        ])
        .arg(&site)
        .arg(&wheel)
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );

    let script = r#"
import json, sys, kosmos_rt
from kosmos_rt import _lib
print(json.dumps({"lib": str(_lib.library_path()),
                  "text": kosmos_rt.Model(sys.argv[1]).generate("<image>", [sys.argv[2]], max_tokens=8)}))
"#;
    let out = Command::new(&python)
        .current_dir(dir.path())
        .arg("-c")
        .arg(script)
        .arg(&pkg)
        .arg(&image)
        .env("PYTHONPATH", &site)
        .env_remove("KOSMOS_RT_LIB")
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["lib"].as_str().unwrap(),
        site.join("kosmos_rt/libkosmos_rt.so").to_str().unwrap(),
        "the wheel's own library"
    );
    assert_eq!(got["text"], want["text"], "wheel vs Rust API");
}
