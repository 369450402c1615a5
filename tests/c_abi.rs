//! The C ABI from C++: `runtime/examples/cpp` is built with CMake and the system compiler against
//! `libkosmos_rt.so`, captions an image of the tiny package exactly as the Rust API does, and
//! every failure path returns its status code (abi_errors); the engine decodes requests from
//! several threads together, each as the Rust API decodes it alone (engine).

use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_export::Profile;
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, PackageDtype};
use kosmos_rt::{FinishReason, GenerateParams, ImageInput, Package, Prompt, SessionOptions, VisionCache};
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

    // The same from plain C, with the answer's token count from kosmos_tokenize.
    let out = run(Command::new(build.join("caption_c"))
        .env("ORT_DYLIB_PATH", &ort)
        .arg(&pkg)
        .arg(&image)
        .arg("10"));
    let got = String::from_utf8_lossy(&out.stdout);
    let (text, count) = got.trim_end_matches('\n').rsplit_once('\n').expect("two lines");
    assert_eq!(text, want, "C caption vs Rust API");
    assert_eq!(count, package.tokenizer.encode(&want).unwrap().len().to_string());

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

/// `kosmos_score` gives `Package::score`'s tokens and log-probabilities (NaN where the Rust
/// API has none: the first token, image slots); NULL outputs, an over-long prompt and a freed
/// model are refused with their status codes.
#[test]
fn c_abi_score_equals_the_rust_api() {
    use kosmos_rt::ffi::*;
    use std::ffi::CString;

    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg) = kosmos_e2e::tiny_package(dir.path(), 6);
    let image = dir.path().join("shape.png");
    item(Task::Shapes, Split::Test, 0, 1).image.save(&image).unwrap();
    let text = "<image> a red circle on the left";

    let mut package = Package::open(&pkg, &SessionOptions::default()).unwrap();
    let prompt = Prompt::parse(text, vec![ImageInput::Path(image.clone())]).unwrap();
    let want = package
        .score(&mut VisionCache::new(0), &[prompt], true)
        .unwrap()
        .remove(0);
    drop(package);

    let dir_c = CString::new(pkg.to_str().unwrap()).unwrap();
    let mut model: *mut kosmos_model = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    assert_eq!(
        unsafe { kosmos_model_open(dir_c.as_ptr(), std::ptr::null(), &mut model) },
        kosmos_status::KOSMOS_OK
    );
    let path = CString::new(image.to_str().unwrap()).unwrap();
    let img = kosmos_image {
        path: path.as_ptr(),
        data: std::ptr::null(),
        size: 0,
    };
    let score = |model: *mut kosmos_model, prompt: &str, outputs: bool| {
        let prompt = CString::new(prompt).unwrap();
        let (mut tokens, mut logprobs, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0usize);
        let out_tokens = if outputs {
            &raw mut tokens
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: valid strings, one image, writable outputs (or NULL, which must be refused).
        let st = unsafe {
            kosmos_score(
                model,
                prompt.as_ptr(),
                &img,
                1,
                true,
                out_tokens,
                &mut logprobs,
                &mut n,
            )
        };
        let got = (n > 0).then(|| {
            // SAFETY: `n` entries each, from kosmos_score.
            let pair = unsafe {
                (
                    std::slice::from_raw_parts(tokens, n).to_vec(),
                    std::slice::from_raw_parts(logprobs, n).to_vec(),
                )
            };
            // SAFETY: returned by kosmos_score with `n` entries, freed once.
            unsafe {
                kosmos_tokens_free(tokens, n);
                kosmos_logprobs_free(logprobs, n);
            }
            pair
        });
        (st, got)
    };
    let (st, got) = score(model, text, true);
    assert_eq!(st, kosmos_status::KOSMOS_OK);
    let (tokens, logprobs) = got.expect("scored");
    assert_eq!(tokens, want.tokens);
    assert_eq!(tokens.last(), Some(&KosmosConfig::tiny().tokenizer.eos_token_id));
    for (i, (c, rust)) in logprobs.iter().zip(&want.logprobs).enumerate() {
        match rust {
            None => assert!(c.is_nan(), "position {i}: {c}"),
            Some(r) => assert_eq!(c, r, "position {i}"),
        }
    }
    assert!(logprobs.iter().filter(|l| !l.is_nan()).all(|&l| l <= 0.0));

    assert_eq!(
        score(model, text, false).0,
        kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT
    );
    let long = format!("<image>{}", " a red circle".repeat(400));
    assert_eq!(score(model, &long, true).0, kosmos_status::KOSMOS_ERR_CONTEXT);
    // SAFETY: the handle is live; freed once, then used once more, which must be refused.
    assert_eq!(unsafe { kosmos_model_free(model) }, kosmos_status::KOSMOS_OK);
    assert_eq!(
        score(model, text, true).0,
        kosmos_status::KOSMOS_ERR_INVALID_HANDLE
    );
}

/// What a `kosmos_logprob` holds: token, log-probability, alternatives.
type CLogprob = (u32, f32, Vec<(u32, f32)>);

/// What the callback of `c_abi_engine_takes_every_generation_setting` received.
#[derive(Default)]
struct Received {
    text: String,
    logprobs: Vec<CLogprob>,
    done: Option<(kosmos_rt::ffi::kosmos_finish_reason, Vec<u32>, String)>,
    failed: Option<String>,
}

type Shared = (std::sync::Mutex<Received>, std::sync::Condvar);

extern "C" fn collect(ev: *const kosmos_rt::ffi::kosmos_event, user_data: *mut std::ffi::c_void) -> bool {
    use kosmos_rt::ffi::kosmos_event_kind::*;
    // SAFETY: the engine passes a valid event; user_data is the test's `Shared`, alive until
    // the final event is seen.
    let (ev, shared) = unsafe { (&*ev, &*(user_data as *const Shared)) };
    let text = unsafe { std::ffi::CStr::from_ptr(ev.text) }
        .to_string_lossy()
        .into_owned();
    let slice = |p: *const u32, n: usize| {
        if n == 0 {
            Vec::new()
        } else {
            // SAFETY: the event holds `n` elements at `p` during the callback.
            unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
        }
    };
    let mut r = shared.0.lock().unwrap();
    match ev.kind {
        KOSMOS_EVENT_TEXT => {
            r.text.push_str(&text);
            for i in 0..ev.n_logprobs {
                // SAFETY: `n_logprobs` entries, each with `n_top` alternatives.
                let e = unsafe { *ev.logprobs.add(i) };
                let top = (0..e.n_top)
                    .map(|j| {
                        let t = unsafe { *e.top.add(j) };
                        (t.token, t.logprob)
                    })
                    .collect();
                r.logprobs.push((e.token, e.logprob, top));
            }
        }
        KOSMOS_EVENT_DONE => {
            assert_eq!(
                ev.generated_tokens as usize,
                slice(ev.tokens, ev.generated_tokens as usize).len()
            );
            r.done = Some((
                ev.finish_reason,
                slice(ev.tokens, ev.generated_tokens as usize),
                text,
            ));
        }
        KOSMOS_EVENT_FAILED => r.failed = Some(text),
    }
    shared.1.notify_all();
    true
}

/// Every generation setting of `kosmos_params` reaches the engine: sampling with penalties and a
/// seed, stop strings and `ignore_eos` give `Package::generate`'s text and tokens, and the
/// log-probabilities in the TEXT events are the Rust engine's, one entry per generated token.
/// Out-of-range settings are refused with a message naming them.
#[test]
fn c_abi_engine_takes_every_generation_setting() {
    use kosmos_rt::batch::{Engine, EngineConfig, SeqEvent, SeqRequest};
    use kosmos_rt::ffi::*;
    use std::ffi::{CStr, CString};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 5);
    let mut pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let alone = |pkg: &mut Package, prompt: &str, params: &GenerateParams| {
        pkg.generate(
            &mut VisionCache::new(0),
            &[Prompt::parse(prompt, vec![]).unwrap()],
            params,
            &mut |_, _| true,
        )
        .unwrap()
        .remove(0)
    };
    let prompt = "a red circle on the left and";
    let sampled = GenerateParams {
        max_tokens: 12,
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.2,
        presence_penalty: 0.6,
        frequency_penalty: 0.4,
        seed: 9,
        ignore_eos: true,
        ..Default::default()
    };
    // A stop string from the middle of the greedy answer: the answer must end before it.
    let greedy = GenerateParams {
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let full = alone(&mut pkg, prompt, &greedy).text;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let stopped = GenerateParams {
        stop: vec!["never generated \u{1F600}".into(), stop.clone()],
        ..greedy.clone()
    };
    // Structured output, sampled: the engine masks exactly as Package::generate does.
    let schema = r#"{"type":"object","properties":{"a":{"enum":["x","yes"]},"n":{"type":"integer","minimum":0,"maximum":99}},"required":["a","n"]}"#;
    let constrained = GenerateParams {
        max_tokens: 60,
        temperature: 0.9,
        top_p: 0.9,
        seed: 3,
        constraint: Some(
            kosmos_rt::grammar::Constraint::JsonSchema(kosmos_rt::grammar::Json::parse(schema).unwrap())
                .compile()
                .unwrap(),
        ),
        ..Default::default()
    };
    let schema_c = CString::new(schema).unwrap();
    // OpenAI's logit_bias and vLLM's min_p / min_tokens / stop_token_ids, sampled.
    let red = pkg.tokenizer.encode("red").unwrap()[0];
    let biased = GenerateParams {
        max_tokens: 12,
        temperature: 1.0,
        min_p: 0.05,
        seed: 4,
        min_tokens: 3,
        logit_bias: vec![(red, 4.0), (7, -100.0)],
        stop_token_ids: vec![red],
        ..Default::default()
    };
    let (bias_ids, bias_values): (Vec<u32>, Vec<f32>) = biased.logit_bias.iter().copied().unzip();
    // vLLM's allowed_token_ids and bad_words, sampled: the C strings are tokenized as the
    // server's and `kosmos-rt run`'s are.
    let words = ["red", "on the"];
    let words_c: Vec<CString> = words.iter().map(|w| CString::new(*w).unwrap()).collect();
    let words_ptrs: Vec<*const std::ffi::c_char> = words_c.iter().map(|w| w.as_ptr()).collect();
    let masked = GenerateParams {
        max_tokens: 12,
        temperature: 1.0,
        seed: 6,
        allowed_token_ids: (0..120).chain([red]).collect(),
        bad_words: kosmos_rt::bad_word_tokens(&pkg.tokenizer, &words.map(String::from)).unwrap(),
        logit_bias: vec![(red, 50.0)],
        ..Default::default()
    };
    let cases = [sampled, stopped, constrained, biased, masked];
    let want: Vec<_> = cases.iter().map(|p| alone(&mut pkg, prompt, p)).collect();
    // Output that repeats itself (a regular expression makes it), where prompt lookup guesses:
    // for the speculating engine.
    let repeat = "(red |blue |a circle )+";
    let repeat_c = CString::new(repeat).unwrap();
    let repeat_want = alone(
        &mut pkg,
        prompt,
        &GenerateParams {
            max_tokens: 16,
            constraint: Some(
                kosmos_rt::grammar::Constraint::Regex(repeat.into())
                    .compile()
                    .unwrap(),
            ),
            ..greedy.clone()
        },
    );
    assert!(
        want[1].text.len() < full.len() && !want[1].text.contains(&stop),
        "{want:?}"
    );
    assert!(
        !want[4].tokens.contains(&red) && want[4].tokens.iter().all(|&t| t < 120),
        "{:?}",
        want[4]
    );

    // The Rust engine's log-probabilities of the sampled case, 3 alternatives each.
    let mut engine = Engine::new(pkg, EngineConfig::default(), Arc::default()).unwrap();
    let rust_logprobs = Arc::new(Mutex::new(Vec::new()));
    let sink = rust_logprobs.clone();
    let p = Prompt::parse(prompt, vec![]).unwrap();
    engine.submit(SeqRequest {
        assembled: engine.package().assemble(&p).unwrap(),
        pixels: vec![],
        params: cases[0].clone(),
        logprobs: Some(3),
        prompt_logprobs: None,
        priority: 0,
        arrived: std::time::Instant::now(),
        deadline: None,
        cancel: Arc::default(),
        sink: Box::new(move |ev| {
            if let SeqEvent::Text { logprobs, .. } = ev {
                sink.lock().unwrap().extend(logprobs);
            }
            true
        }),
    });
    while !engine.is_idle() {
        engine.step();
    }
    drop(engine);
    let rust_logprobs = rust_logprobs.lock().unwrap().clone();

    let dir_c = CString::new(pkg_dir.to_str().unwrap()).unwrap();
    let mut e: *mut kosmos_engine = std::ptr::null_mut();
    // Size-aware defaults: this header's size gets kosmos_default_params(); sizes no header had,
    // or a newer header's, are refused, naming the size.
    assert_eq!(kosmos_abi_version(), KOSMOS_ABI_VERSION);
    let mut p = std::mem::MaybeUninit::<kosmos_params>::zeroed();
    // SAFETY: `p` has size_of::<kosmos_params>() writable bytes.
    let st = unsafe { kosmos_params_init(p.as_mut_ptr(), size_of::<kosmos_params>()) };
    assert_eq!(st, kosmos_status::KOSMOS_OK);
    // SAFETY: fully written by kosmos_params_init.
    let p = unsafe { p.assume_init() };
    assert_eq!(format!("{p:?}"), format!("{:?}", kosmos_default_params()));
    for size in [8, size_of::<kosmos_params>() + 8] {
        let mut q = kosmos_default_params();
        // SAFETY: `size` is refused before anything is written.
        let st = unsafe { kosmos_params_init(&mut q, size) };
        assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
        // SAFETY: the thread's last error is a valid C string.
        let err = unsafe { CStr::from_ptr(kosmos_last_error()) }
            .to_string_lossy()
            .into_owned();
        assert!(err.contains(&format!("struct_size is {size}")), "{err}");
    }
    // SAFETY: NULL is refused.
    let st = unsafe { kosmos_engine_config_init(std::ptr::null_mut(), size_of::<kosmos_engine_config>()) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    // A config whose size is not this library's is refused before anything loads.
    let stale = kosmos_engine_config {
        struct_size: 12,
        ..kosmos_engine_default_config()
    };
    // SAFETY: valid strings, config and out pointer.
    let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), &stale, &mut e) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    // SAFETY: the thread's last error is a valid C string.
    let err = unsafe { CStr::from_ptr(kosmos_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(err.contains("config: struct_size is 12"), "{err}");
    assert!(e.is_null());
    // A program compiled before `priority_preemption` was appended (its struct ends before the
    // field) still opens an engine; the library does not read past its struct.
    let older = kosmos_engine_config {
        struct_size: std::mem::offset_of!(kosmos_engine_config, priority_preemption) as u32,
        ..kosmos_engine_default_config()
    };
    // SAFETY: valid strings, config (read up to its struct_size) and out pointer.
    let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), &older, &mut e) };
    assert_eq!(st, kosmos_status::KOSMOS_OK, "a config of ABI 1's first size");
    // SAFETY: the engine just opened.
    assert_eq!(unsafe { kosmos_engine_free(e) }, kosmos_status::KOSMOS_OK);
    e = std::ptr::null_mut();
    // Speculative settings are checked before anything loads.
    let contradictory = kosmos_engine_config {
        speculative_tokens: 4,
        prompt_lookup_min: 3,
        prompt_lookup_max: 2,
        ..kosmos_engine_default_config()
    };
    // SAFETY: valid strings, config and out pointer.
    let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), &contradictory, &mut e) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    // SAFETY: the thread's last error is a valid C string.
    let err = unsafe { CStr::from_ptr(kosmos_last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(
        err.contains("config: the longest prompt-lookup n-gram (2)"),
        "{err}"
    );
    assert!(e.is_null());
    // SAFETY: valid strings and out pointer.
    let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), std::ptr::null(), &mut e) };
    assert_eq!(st, kosmos_status::KOSMOS_OK);
    let prompt_c = CString::new(prompt).unwrap();
    let stop_c: Vec<CString> = cases[1]
        .stop
        .iter()
        .map(|s| CString::new(s.as_str()).unwrap())
        .collect();
    let stop_ptrs: Vec<*const std::ffi::c_char> = stop_c.iter().map(|s| s.as_ptr()).collect();
    let c_params = |g: &GenerateParams, logprobs: i32| kosmos_params {
        struct_size: size_of::<kosmos_params>() as u32,
        max_tokens: g.max_tokens as u32,
        temperature: g.temperature,
        top_k: g.top_k as u32,
        top_p: g.top_p,
        repetition_penalty: g.repetition_penalty,
        presence_penalty: g.presence_penalty,
        frequency_penalty: g.frequency_penalty,
        seed: g.seed,
        beams: 1,
        stop: if g.stop.is_empty() {
            std::ptr::null()
        } else {
            stop_ptrs.as_ptr()
        },
        n_stop: g.stop.len(),
        ignore_eos: g.ignore_eos,
        logprobs,
        constraint_kind: if g.constraint.is_some() {
            KOSMOS_CONSTRAINT_JSON_SCHEMA
        } else {
            KOSMOS_CONSTRAINT_NONE
        },
        constraint: if g.constraint.is_some() {
            schema_c.as_ptr()
        } else {
            std::ptr::null()
        },
        min_p: g.min_p,
        min_tokens: g.min_tokens as u32,
        logit_bias_tokens: if g.logit_bias.is_empty() {
            std::ptr::null()
        } else {
            bias_ids.as_ptr()
        },
        logit_bias_values: if g.logit_bias.is_empty() {
            std::ptr::null()
        } else {
            bias_values.as_ptr()
        },
        n_logit_bias: g.logit_bias.len(),
        stop_token_ids: if g.stop_token_ids.is_empty() {
            std::ptr::null()
        } else {
            g.stop_token_ids.as_ptr()
        },
        n_stop_token_ids: g.stop_token_ids.len(),
        allowed_token_ids: if g.allowed_token_ids.is_empty() {
            std::ptr::null()
        } else {
            g.allowed_token_ids.as_ptr()
        },
        n_allowed_token_ids: g.allowed_token_ids.len(),
        bad_words: if g.bad_words.is_empty() {
            std::ptr::null()
        } else {
            words_ptrs.as_ptr()
        },
        n_bad_words: if g.bad_words.is_empty() { 0 } else { words.len() },
        priority: 0,
    };
    let submit = |params: &kosmos_params, shared: &Shared| {
        // SAFETY: live engine, valid strings; `shared` outlives the request (waited for below).
        unsafe {
            kosmos_engine_submit(
                e,
                prompt_c.as_ptr(),
                std::ptr::null(),
                0,
                params,
                Some(collect),
                shared as *const Shared as *mut std::ffi::c_void,
                std::ptr::null_mut(),
            )
        }
    };
    let last_error = || {
        unsafe { CStr::from_ptr(kosmos_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    for (case, (g, want)) in cases.iter().zip(&want).enumerate() {
        let shared: Shared = Default::default();
        let logprobs = if case == 0 { 3 } else { -1 };
        assert_eq!(
            submit(&c_params(g, logprobs), &shared),
            kosmos_status::KOSMOS_OK,
            "{}",
            last_error()
        );
        let r = shared
            .1
            .wait_while(shared.0.lock().unwrap(), |r| {
                r.done.is_none() && r.failed.is_none()
            })
            .unwrap();
        assert_eq!(r.failed, None, "case {case}");
        let (finish, tokens, text) = r.done.clone().unwrap();
        assert_eq!(text, want.text, "case {case}: C engine vs Package::generate");
        assert_eq!(r.text, want.text, "case {case}: streamed");
        assert_eq!(tokens, want.tokens, "case {case}: DONE's token ids");
        let want_finish = if case == 0 || (case == 3 && want.finish_reason == FinishReason::Length) {
            kosmos_finish_reason::KOSMOS_FINISH_LENGTH
        } else {
            kosmos_finish_reason::KOSMOS_FINISH_STOP
        };
        assert_eq!(finish, want_finish, "case {case}");
        if case == 2 {
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(v["a"] == "x" || v["a"] == "yes", "{text}");
            assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
        }
        if case == 0 {
            assert_eq!(tokens.len(), 12, "ignore_eos: all max_tokens");
            assert_eq!(r.logprobs.len(), tokens.len(), "one entry per generated token");
            for (i, ((token, logprob, top), rust)) in r.logprobs.iter().zip(&rust_logprobs).enumerate() {
                assert_eq!(*token, tokens[i], "step {i}");
                assert_eq!(*token, rust.token, "step {i}");
                assert_eq!(logprob.to_bits(), rust.logprob.to_bits(), "step {i}");
                assert_eq!(*top, rust.top, "step {i}: the 3 most likely");
            }
        } else {
            assert!(r.logprobs.is_empty(), "logprobs -1: none reported");
        }
    }

    // Refused settings: a status, a message naming the setting, and no events.
    let base = c_params(&greedy, -1);
    let empty = CString::new("").unwrap();
    let empty_stop = [empty.as_ptr()];
    let seventeen = [stop_ptrs[1]; 17];
    let bad_grammar = CString::new("root ::= item+").unwrap();
    let seven_hundred = [700u32];
    let bad: Vec<(kosmos_params, &str)> = vec![
        // A struct not started from kosmos_default_params, or from a newer header.
        (
            kosmos_params {
                struct_size: 0,
                ..base
            },
            "struct_size is 0",
        ),
        (
            kosmos_params {
                struct_size: base.struct_size + 8,
                ..base
            },
            "newer kosmos_rt.h",
        ),
        (kosmos_params { n_stop: 2, ..base }, "stop is NULL"),
        (
            kosmos_params {
                n_allowed_token_ids: 3,
                ..base
            },
            "allowed_token_ids is NULL",
        ),
        (
            kosmos_params {
                allowed_token_ids: seven_hundred.as_ptr(),
                n_allowed_token_ids: 1,
                ..base
            },
            "allowed token 700 is not below the vocabulary size",
        ),
        (
            kosmos_params {
                bad_words: empty_stop.as_ptr(),
                n_bad_words: 1,
                ..base
            },
            "bad_words entries must not be empty",
        ),
        (
            kosmos_params {
                n_bad_words: 2,
                ..base
            },
            "bad_words is NULL",
        ),
        (
            kosmos_params {
                stop: empty_stop.as_ptr(),
                n_stop: 1,
                ..base
            },
            "stop",
        ),
        (
            kosmos_params {
                n_stop: 17,
                stop: seventeen.as_ptr(),
                ..base
            },
            "up to 16",
        ),
        (kosmos_params { logprobs: 21, ..base }, "logprobs"),
        (kosmos_params { logprobs: -2, ..base }, "logprobs"),
        (
            kosmos_params {
                presence_penalty: 2.5,
                ..base
            },
            "presence_penalty",
        ),
        (
            kosmos_params {
                frequency_penalty: f32::NAN,
                ..base
            },
            "frequency_penalty",
        ),
        (
            kosmos_params {
                repetition_penalty: 0.0,
                ..base
            },
            "repetition_penalty",
        ),
        (
            kosmos_params {
                temperature: f32::INFINITY,
                ..base
            },
            "temperature",
        ),
        (kosmos_params { top_p: 0.0, ..base }, "top_p"),
        (
            kosmos_params {
                n_logit_bias: 2,
                ..base
            },
            "logit_bias_tokens is NULL",
        ),
        (
            kosmos_params {
                stop_token_ids: seven_hundred.as_ptr(),
                n_stop_token_ids: 1,
                ..base
            },
            "stop token 700 is not below the vocabulary size 512",
        ),
        (kosmos_params { min_p: -0.1, ..base }, "min_p"),
        (
            kosmos_params {
                constraint_kind: 9,
                ..base
            },
            "constraint_kind 9",
        ),
        (
            kosmos_params {
                constraint_kind: KOSMOS_CONSTRAINT_REGEX,
                ..base
            },
            "constraint is NULL",
        ),
        (
            kosmos_params {
                constraint_kind: KOSMOS_CONSTRAINT_GRAMMAR,
                constraint: bad_grammar.as_ptr(),
                ..base
            },
            "rule 'item' is used but not defined",
        ),
    ];
    for (params, names) in &bad {
        let shared: Shared = Default::default();
        assert_eq!(
            submit(params, &shared),
            kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
            "{names}"
        );
        let err = last_error();
        assert!(err.contains(names), "{names}: {err}");
        let r = shared.0.lock().unwrap();
        assert!(r.done.is_none() && r.failed.is_none() && r.text.is_empty());
    }
    // SAFETY: the handle is live; freed once.
    assert_eq!(unsafe { kosmos_engine_free(e) }, kosmos_status::KOSMOS_OK);

    // The same requests, and the repeating one, through an engine that speculates by prompt
    // lookup and one whose draft model (the package itself) guesses: the same tokens and text.
    let bad_draft = kosmos_engine_config {
        draft_package: dir_c.as_ptr(),
        draft_p_min: -0.5,
        ..kosmos_engine_default_config()
    };
    let mut none: *mut kosmos_engine = std::ptr::null_mut();
    // SAFETY: valid strings, config and out pointer.
    let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), &bad_draft, &mut none) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("-0.5"), "{}", last_error());
    let lookup = kosmos_engine_config {
        speculative_tokens: 4,
        ..kosmos_engine_default_config()
    };
    let drafted = kosmos_engine_config {
        draft_package: dir_c.as_ptr(),
        draft_p_min: 0.0,
        ..kosmos_engine_default_config()
    };
    let repeating = kosmos_params {
        max_tokens: 16,
        constraint_kind: KOSMOS_CONSTRAINT_REGEX,
        constraint: repeat_c.as_ptr(),
        ..c_params(&greedy, -1)
    };
    for speculating in [lookup, drafted] {
        let mut fast: *mut kosmos_engine = std::ptr::null_mut();
        // SAFETY: valid strings, config and out pointer.
        let st = unsafe { kosmos_engine_open(dir_c.as_ptr(), std::ptr::null(), &speculating, &mut fast) };
        assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
        let runs = cases.iter().map(|g| c_params(g, -1)).chain([repeating]);
        for (case, (params, want)) in runs.zip(want.iter().chain([&repeat_want])).enumerate() {
            let shared: Shared = Default::default();
            // SAFETY: live engine, valid strings; `shared` outlives the request (waited for below).
            let st = unsafe {
                kosmos_engine_submit(
                    fast,
                    prompt_c.as_ptr(),
                    std::ptr::null(),
                    0,
                    &params,
                    Some(collect),
                    &shared as *const Shared as *mut std::ffi::c_void,
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
            let r = shared
                .1
                .wait_while(shared.0.lock().unwrap(), |r| {
                    r.done.is_none() && r.failed.is_none()
                })
                .unwrap();
            let (_, tokens, text) = r
                .done
                .clone()
                .unwrap_or_else(|| panic!("case {case}: {:?}", r.failed));
            assert_eq!(tokens, want.tokens, "speculating, case {case}");
            assert_eq!(text, want.text, "speculating, case {case}");
            assert_eq!(r.text, want.text, "speculating, case {case}: streamed");
        }
        // SAFETY: the handle is live; freed once.
        assert_eq!(unsafe { kosmos_engine_free(fast) }, kosmos_status::KOSMOS_OK);
    }

    // kosmos_generate has no log-probabilities to report: asking is refused, not ignored.
    let mut model: *mut kosmos_model = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    let st = unsafe { kosmos_model_open(dir_c.as_ptr(), std::ptr::null(), &mut model) };
    assert_eq!(st, kosmos_status::KOSMOS_OK);
    let mut out: *mut std::ffi::c_char = std::ptr::null_mut();
    let generate = |params: &kosmos_params, out: &mut *mut std::ffi::c_char| unsafe {
        kosmos_generate(
            model,
            prompt_c.as_ptr(),
            std::ptr::null(),
            0,
            params,
            None,
            std::ptr::null_mut(),
            out,
        )
    };
    let st = generate(&kosmos_params { logprobs: 0, ..base }, &mut out);
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("logprobs"), "{}", last_error());
    // Stop strings and penalties work there too.
    let st = generate(&c_params(&cases[1], -1), &mut out);
    assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
    // SAFETY: `out` came from kosmos_generate.
    let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
    unsafe { kosmos_string_free(out) };
    assert_eq!(text, want[1].text);
    // Speculating, the same texts (the repeating one is where guesses are made); bad settings
    // refused, naming them.
    // SAFETY: live handle.
    let st = unsafe { kosmos_model_set_speculation(model, 4, 3, 2, KOSMOS_SPECULATE_AUTO) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("longest prompt-lookup n-gram (2)"),
        "{}",
        last_error()
    );
    // SAFETY: live handle.
    let st = unsafe { kosmos_model_set_speculation(model, 4, 1, 3, 7) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("speculative schedule 7"),
        "{}",
        last_error()
    );
    // SAFETY: live handle.
    let st = unsafe { kosmos_model_set_speculation(model, 4, 1, 3, KOSMOS_SPECULATE_ADAPTIVE) };
    assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
    for (params, want) in [(c_params(&cases[1], -1), &want[1]), (repeating, &repeat_want)] {
        let st = generate(&params, &mut out);
        assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
        // SAFETY: `out` came from kosmos_generate.
        let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        unsafe { kosmos_string_free(out) };
        assert_eq!(text, want.text, "kosmos_generate speculating");
    }
    // A draft model (here the package itself) guesses instead: the same texts, sampled,
    // constrained and greedy. Bad settings and packages are refused with their status; NULL drops it.
    let set_draft = |dir: *const std::ffi::c_char, p_min: f32| unsafe {
        kosmos_model_set_draft(model, dir, std::ptr::null(), p_min)
    };
    let st = set_draft(dir_c.as_ptr(), 1.5);
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("1.5"), "{}", last_error());
    let missing = CString::new(dir.path().join("nowhere").to_str().unwrap()).unwrap();
    let st = set_draft(missing.as_ptr(), 0.5);
    assert_eq!(st, kosmos_status::KOSMOS_ERR_PACKAGE);
    assert!(last_error().contains("nowhere"), "{}", last_error());
    for draft in [dir_c.as_ptr(), std::ptr::null()] {
        let st = set_draft(draft, 0.0);
        assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
        let runs = [
            (c_params(&cases[0], -1), &want[0]),
            (c_params(&cases[2], -1), &want[2]),
            (repeating, &repeat_want),
        ];
        for (params, want) in runs {
            let st = generate(&params, &mut out);
            assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
            // SAFETY: `out` came from kosmos_generate.
            let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
            unsafe { kosmos_string_free(out) };
            assert_eq!(text, want.text, "kosmos_generate with a draft");
        }
    }
    // SAFETY: the handle is live; freed once.
    assert_eq!(unsafe { kosmos_model_free(model) }, kosmos_status::KOSMOS_OK);
    // SAFETY: NULL is refused.
    let st = unsafe { kosmos_model_set_draft(std::ptr::null_mut(), dir_c.as_ptr(), std::ptr::null(), 0.5) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_HANDLE);
    // SAFETY: NULL is refused.
    let st = unsafe { kosmos_model_set_speculation(std::ptr::null_mut(), 4, 1, 3, KOSMOS_SPECULATE_FIXED) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_HANDLE);
}

/// `kosmos_tokenize` / `kosmos_detokenize` give the package tokenizer's ids and text (what the
/// server's `/tokenize`, checked against Hugging Face `tokenizers`, gives), `<s>` first on
/// request; bad ids and handles are refused with their status.
#[test]
fn c_abi_tokenizer_equals_the_package_tokenizer() {
    use kosmos_rt::ffi::*;
    use std::ffi::{CStr, CString};

    let dir = tempfile::tempdir().unwrap();
    let (_ckpt, pkg_dir) = kosmos_e2e::tiny_package(dir.path(), 6);
    let reference = Package::open(&pkg_dir, &SessionOptions::default())
        .unwrap()
        .tokenizer;
    let dir_c = CString::new(pkg_dir.to_str().unwrap()).unwrap();
    let mut tok: *mut kosmos_tokenizer = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    assert_eq!(
        unsafe { kosmos_tokenizer_open(dir_c.as_ptr(), &mut tok) },
        kosmos_status::KOSMOS_OK
    );
    let last_error = || {
        unsafe { CStr::from_ptr(kosmos_last_error()) }
            .to_string_lossy()
            .into_owned()
    };

    let tokenize = |text: &str, add_bos: bool| -> Vec<u32> {
        let text = CString::new(text).unwrap();
        let (mut ids, mut n): (*mut u32, usize) = (std::ptr::null_mut(), 7);
        // SAFETY: live handle, valid string and out pointers.
        let st = unsafe { kosmos_tokenize(tok, text.as_ptr(), add_bos, &mut ids, &mut n) };
        assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
        if n == 0 {
            assert!(ids.is_null());
            return Vec::new();
        }
        // SAFETY: the library returned `n` ids at `ids`; freed once below.
        let out = unsafe { std::slice::from_raw_parts(ids, n) }.to_vec();
        unsafe { kosmos_tokens_free(ids, n) };
        out
    };
    let detokenize = |ids: &[u32]| -> Result<String, (kosmos_status, String)> {
        let mut out: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: live handle, `ids.len()` ids, writable out pointer.
        let st = unsafe { kosmos_detokenize(tok, ids.as_ptr(), ids.len(), &mut out) };
        if st != kosmos_status::KOSMOS_OK {
            return Err((st, last_error()));
        }
        // SAFETY: the library returned a string; freed once.
        let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        unsafe { kosmos_string_free(out) };
        Ok(text)
    };
    let bos = reference.special().bos_token_id;
    for text in [
        "a red circle on the left and a blue square on the right",
        "Question: what colour is the <image> circle? Answer:",
        "naïve café — 東京 🙂",
        "",
    ] {
        let want = reference.encode(text).unwrap();
        assert_eq!(tokenize(text, false), want, "{text:?}");
        let mut with_bos = vec![bos];
        with_bos.extend(&want);
        assert_eq!(tokenize(text, true), with_bos, "{text:?} with <s>");
        assert_eq!(
            detokenize(&with_bos).unwrap(),
            reference.decode(&want).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(
        detokenize(&tokenize("a red circle", false)).unwrap(),
        "a red circle",
        "round trip"
    );
    // A chat's prompt: the parts in order (this package has no chat template), the image count
    // beside it; a NULL out pointer is refused, a NULL count is allowed.
    let chat = CString::new(
        r#"[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
            {"type": "text", "text": "what colour?"}]}, {"role": "assistant", "content": "red"}]"#,
    )
    .unwrap();
    let (mut prompt, mut n_images): (*mut std::ffi::c_char, usize) = (std::ptr::null_mut(), 9);
    // SAFETY: live handle, valid string and out pointers.
    let st = unsafe { kosmos_chat_prompt(tok, chat.as_ptr(), true, false, &mut prompt, &mut n_images) };
    assert_eq!(st, kosmos_status::KOSMOS_OK, "{}", last_error());
    // SAFETY: the library returned a string; freed once.
    assert_eq!(
        unsafe { CStr::from_ptr(prompt) }.to_str().unwrap(),
        "<image>what colour?\nred"
    );
    unsafe { kosmos_string_free(prompt) };
    assert_eq!(n_images, 1);
    // SAFETY: a NULL count is allowed; a NULL out_prompt is refused before anything is read.
    let st =
        unsafe { kosmos_chat_prompt(tok, chat.as_ptr(), true, false, &mut prompt, std::ptr::null_mut()) };
    assert_eq!(st, kosmos_status::KOSMOS_OK);
    unsafe { kosmos_string_free(prompt) };
    let st = unsafe {
        kosmos_chat_prompt(
            tok,
            chat.as_ptr(),
            true,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    let bad = CString::new(r#"[{"role": "user", "content": 5}]"#).unwrap();
    // SAFETY: as above.
    let st = unsafe { kosmos_chat_prompt(tok, bad.as_ptr(), true, false, &mut prompt, &mut n_images) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(prompt.is_null() && n_images == 0);
    assert!(last_error().contains("[0].content"), "{}", last_error());

    let vocab = reference.vocab_size() as u32;
    let (st, err) = detokenize(&[5, vocab]).unwrap_err();
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT);
    assert!(err.contains(&format!("ids[1] = {vocab}")), "{err}");

    // SAFETY: the handle is live; freed once, then refused.
    assert_eq!(unsafe { kosmos_tokenizer_free(tok) }, kosmos_status::KOSMOS_OK);
    assert_eq!(
        unsafe { kosmos_tokenizer_free(tok) },
        kosmos_status::KOSMOS_ERR_INVALID_HANDLE
    );
    let (mut ids, mut n): (*mut u32, usize) = (std::ptr::null_mut(), 0);
    let a = CString::new("a").unwrap();
    // SAFETY: a freed handle is refused before use.
    let st = unsafe { kosmos_tokenize(tok, a.as_ptr(), true, &mut ids, &mut n) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_INVALID_HANDLE);
    let missing = CString::new(dir.path().join("nowhere").to_str().unwrap()).unwrap();
    // SAFETY: valid strings and out pointer.
    let st = unsafe { kosmos_tokenizer_open(missing.as_ptr(), &mut tok) };
    assert_eq!(st, kosmos_status::KOSMOS_ERR_PACKAGE);
    assert!(tok.is_null());
    assert!(last_error().contains("nowhere"), "{}", last_error());
}
