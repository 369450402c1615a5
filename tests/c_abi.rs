//! The C ABI from C++: `runtime/examples/cpp` is built with CMake and the system compiler against
//! `libkosmos_rt.so`, captions an image of the tiny package exactly as the Rust API does, and
//! every failure path returns its status code (abi_errors); the engine decodes requests from
//! several threads together, each as the Rust API decodes it alone (engine).

use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_export::Profile;
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, PackageDtype};
use kosmos_rt::{GenerateParams, ImageInput, Package, Prompt, SessionOptions, VisionCache};
use kosmos_train::synthetic::{Split, Task, item};

fn root() -> PathBuf {
    kosmos_e2e::workspace_root()
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Build libkosmos_rt.so (debug) and the C++ examples; returns the examples' build dir.
pub fn build_examples(build: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(root())
        .args(["build", "-p", "kosmos-rt", "--lib"]));
    let lib_dir = root().join("target/debug");
    assert!(lib_dir.join("libkosmos_rt.so").exists());
    let cmake = root().join(".venv/bin/cmake");
    run(Command::new(&cmake)
        .arg("-S")
        .arg(root().join("runtime/examples/cpp"))
        .arg("-B")
        .arg(build)
        .arg(format!("-DKOSMOS_RT_LIB_DIR={}", lib_dir.display()))
        .arg("-DCMAKE_BUILD_TYPE=Debug"));
    run(Command::new(&cmake).arg("--build").arg(build));
    build.to_path_buf()
}

#[test]
fn cpp_example_captions_like_the_rust_api_and_errors_are_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_package(dir.path(), 4);
    let image = dir.path().join("shape.png");
    item(Task::Shapes, Split::Test, 0, 0).image.save(&image).unwrap();

    let mut package = Package::open(&pkg, &SessionOptions::default()).unwrap();
    let prompt = Prompt::parse("", vec![ImageInput::Path(image.clone())]).unwrap();
    let params = GenerateParams {
        max_tokens: 10,
        ..Default::default()
    };
    let want = package
        .generate(&mut VisionCache::new(1), &[prompt], &params, &mut |_, _| true)
        .unwrap()
        .remove(0)
        .text;

    let build = build_examples(&dir.path().join("build"));
    let ort = kosmos_rt::ort_env::ort_dylib_path();
    let out = run(Command::new(build.join("caption"))
        .env("ORT_DYLIB_PATH", &ort)
        .arg(&pkg)
        .arg(&image)
        .arg("")
        .arg("10"));
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(got.trim_end_matches('\n'), want, "C++ caption vs Rust API");

    let not_image = dir.path().join("notes.txt");
    std::fs::write(&not_image, "not an image").unwrap();
    let mixed = mixed_package(dir.path(), &pkg);
    let out = run(Command::new(build.join("abi_errors"))
        .env("ORT_DYLIB_PATH", &ort)
        .arg(&pkg)
        .arg(&not_image)
        .arg(&mixed));
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(report.contains("all failure paths behave"), "{report}");
}

/// `kosmos_engine` from C++: prompts submitted from one thread each, with and without an image,
/// decoded together in 3 rows with 16-token prefill chunks, each get what the Rust API gives it
/// alone; cancellation, freeing with requests in flight and the failure paths behave (engine).
#[test]
fn cpp_engine_decodes_concurrent_requests_like_the_rust_api() {
    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_buffer_package(dir.path(), 5);
    let image = dir.path().join("shape.png");
    item(Task::Shapes, Split::Test, 0, 2).image.save(&image).unwrap();
    let prompts = [
        "<image>",
        "a red circle on the left and",
        "<image> Question: what colour is the circle? Answer:",
        "",
        "Question: what shape is on the right of the green square and the blue triangle? Answer:",
    ];
    let max_tokens = 12;

    let mut package = Package::open(&pkg, &SessionOptions::default()).unwrap();
    let params = GenerateParams {
        max_tokens,
        ..Default::default()
    };
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let images = if p.contains("<image>") {
                vec![ImageInput::Path(image.clone())]
            } else {
                vec![]
            };
            let prompt = Prompt::parse(p, images).unwrap();
            package
                .generate(&mut VisionCache::new(1), &[prompt], &params, &mut |_, _| true)
                .unwrap()
                .remove(0)
                .text
        })
        .collect();
    drop(package);

    let build = build_examples(&dir.path().join("build"));
    let out = run(Command::new(build.join("engine"))
        .env("ORT_DYLIB_PATH", kosmos_rt::ort_env::ort_dylib_path())
        .arg(&pkg)
        .arg(&image)
        .arg(max_tokens.to_string())
        .args(prompts));
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    let lines: Vec<&str> = report.lines().collect();
    for (i, want) in want.iter().enumerate() {
        let fields: Vec<&str> = lines[i].splitn(4, '\t').collect();
        assert_eq!(fields[0], i.to_string(), "{report}");
        assert_ne!(fields[1], "cancelled", "prompt {i}");
        assert_eq!(
            fields[3], want,
            "prompt {i} ({:?}): engine vs Rust API",
            prompts[i]
        );
    }
    assert!(report.contains("all engine checks passed"), "{report}");
}

/// A copy of `pkg` whose decoder graph comes from a model with other sizes.
pub fn mixed_package(dir: &Path, pkg: &Path) -> PathBuf {
    let mut other = KosmosConfig::tiny();
    other.decoder.decoder_attention_heads = 8;
    let ckpt = kosmos_e2e::checkpoint(&other, 1, &dir.join("other-ckpt"));
    let other_pkg = dir.join("other-pkg");
    kosmos_e2e::export_package(
        &ckpt,
        &other_pkg,
        Profile::Portable,
        PackageDtype::Fp32,
        KvCacheLayout::Concat,
    );
    let mixed = dir.join("mixed-pkg");
    std::fs::create_dir(&mixed).unwrap();
    for e in std::fs::read_dir(pkg).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), mixed.join(e.file_name())).unwrap();
    }
    for f in ["decoder.onnx", "decoder.onnx.data"] {
        std::fs::copy(other_pkg.join(f), mixed.join(f)).unwrap();
    }
    mixed
}

/// One model used from several threads at once through the C ABI: every thread gets the
/// single-threaded answer, and each thread's `kosmos_last_error` is its own.
#[test]
fn c_abi_is_thread_safe() {
    use kosmos_rt::ffi::*;
    use std::ffi::{CStr, CString};

    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_package(dir.path(), 6);

    let dir_c = CString::new(pkg.to_str().unwrap()).unwrap();
    let mut model: *mut kosmos_model = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    let st = unsafe { kosmos_model_open(dir_c.as_ptr(), std::ptr::null(), &mut model) };
    assert_eq!(st, kosmos_status::KOSMOS_OK);

    let generate = |model: usize, prompt: &str| -> (kosmos_status, String, String) {
        let prompt = CString::new(prompt).unwrap();
        let mut params = kosmos_default_params();
        params.max_tokens = 8;
        let mut out: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: live handle, valid strings and out pointer.
        let st = unsafe {
            kosmos_generate(
                model as *mut kosmos_model,
                prompt.as_ptr(),
                std::ptr::null(),
                0,
                &params,
                None,
                std::ptr::null_mut(),
                &mut out,
            )
        };
        // SAFETY: the library returns NUL-terminated strings.
        let err = unsafe { CStr::from_ptr(kosmos_last_error()) }
            .to_string_lossy()
            .into_owned();
        let text = if out.is_null() {
            String::new()
        } else {
            // SAFETY: `out` came from kosmos_generate.
            let t = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
            unsafe { kosmos_string_free(out) };
            t
        };
        (st, text, err)
    };
    let (st, want, _) = generate(model as usize, "a red circle");
    assert_eq!(st, kosmos_status::KOSMOS_OK);

    let handle = model as usize;
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                if i == 3 {
                    // This thread fails; the others must not see its message.
                    let long = "a red circle ".repeat(400);
                    generate(handle, &long)
                } else {
                    generate(handle, "a red circle")
                }
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (st, text, err) = t.join().expect("no panic");
        if i == 3 {
            assert_eq!(st, kosmos_status::KOSMOS_ERR_CONTEXT);
            assert!(err.contains("context"), "{err}");
        } else {
            assert_eq!(st, kosmos_status::KOSMOS_OK, "{err}");
            assert_eq!(text, want);
            assert_eq!(err, "", "another thread's error leaked");
        }
    }
    // SAFETY: the handle is live; freed once.
    assert_eq!(unsafe { kosmos_model_free(model) }, kosmos_status::KOSMOS_OK);
}
