//! Continuous batching (`kosmos_rt::batch::Engine`): sequences admitted at different steps,
//! sharing decoder calls at different lengths, produce exactly what `Package::generate` produces
//! for each alone, with whole and with chunked prefills; running sequences keep decoding while a
//! prompt is prefilled chunk by chunk; cancelled and timed-out sequences free their rows. With
//! `ai.kosmos::CachedAttention` (its kernel reading each row's own keys and writing the bound
//! buffers in place) the engine equals generation alone with the standard-op attention.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kosmos_models::package::KvDtype;
use kosmos_rt::batch::{Engine, EngineConfig, SeqEvent, SeqFailure, SeqRequest};
use kosmos_rt::metrics::Metrics;
use kosmos_rt::{
    FinishReason, GenerateParams, Generation, GuessSchedule, ImageInput, Package, Prompt, SessionOptions,
    Speculation, VisionCache,
};
use kosmos_train::synthetic::{Split, Task, item};

fn buffer_package(dir: &Path) -> std::path::PathBuf {
    kosmos_e2e::tiny_buffer_package(dir, 7).1
}

fn png(i: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    item(Task::Shapes, Split::Test, 0, i)
        .image
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// Greedy decoding of exactly `n` tokens (`</s>` ignored).
fn greedy(n: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

/// What `Package::generate` makes of `prompt` alone (the reference every engine run must equal).
fn alone(pkg: &mut Package, prompt: &Prompt, params: &GenerateParams) -> Generation {
    pkg.generate(
        &mut VisionCache::new(0),
        std::slice::from_ref(prompt),
        params,
        &mut |_, _| true,
    )
    .unwrap()
    .remove(0)
}

/// Events of one sequence, collected.
#[derive(Default)]
struct Collected {
    text: String,
    logprobs: Vec<kosmos_rt::logprobs::TokenLogprob>,
    prompt_logprobs: Option<Vec<(u32, Option<kosmos_rt::logprobs::TokenLogprob>)>>,
    done: Option<kosmos_rt::batch::SeqSummary>,
    failed: Option<SeqFailure>,
}

fn request(
    pkg: &Package,
    prompt: &Prompt,
    params: &GenerateParams,
) -> (SeqRequest, Arc<Mutex<Collected>>, Arc<AtomicBool>) {
    let assembled = pkg.assemble(prompt).unwrap();
    let pixels = prompt.images.iter().map(|i| pkg.preprocess(i).unwrap()).collect();
    let out = Arc::new(Mutex::new(Collected::default()));
    let cancel = Arc::new(AtomicBool::new(false));
    let sink_out = out.clone();
    let req = SeqRequest {
        assembled,
        pixels,
        params: params.clone(),
        logprobs: None,
        prompt_logprobs: None,
        priority: 0,
        arrived: Instant::now(),
        deadline: None,
        cancel: cancel.clone(),
        sink: Box::new(move |ev| {
            let mut c = sink_out.lock().unwrap();
            match ev {
                SeqEvent::Text { text, logprobs } => {
                    c.text.push_str(&text);
                    c.logprobs.extend(logprobs);
                }
                SeqEvent::PromptLogprobs(p) => c.prompt_logprobs = Some(p),
                SeqEvent::Done(s) => c.done = Some(s),
                SeqEvent::Failed(f) => c.failed = Some(f),
            }
            true
        }),
    };
    (req, out, cancel)
}

/// Which package the engine runs in [`staggered_sequences`].
#[derive(Clone, Copy, PartialEq)]
enum EnginePackage {
    /// The standard-op buffer package that `Package::generate` ran.
    Standard,
    /// A `--cached-attention` export of the same checkpoint.
    CachedAttention,
    /// A `--cached-attention --quantize int8` export, against its own `Package::generate`.
    Int8,
    /// A `--cached-attention --kv-cache-dtype fp16|int8` export (narrow buffers, bound in
    /// place), against its own `Package::generate`.
    NarrowCache(KvDtype),
}

#[test]
fn staggered_sequences_equal_single_generation() {
    staggered_sequences(0, EnginePackage::Standard);
}

/// Chunks of 7 tokens over up to 3 rows: 2 positions per call, so every image's slots are split
/// across calls, and running sequences retire while a group is mid-prefill (its rows move down).
#[test]
fn staggered_sequences_with_chunked_prefill_equal_single_generation() {
    staggered_sequences(7, EnginePackage::Standard);
}

/// The same through `--cached-attention`'s kernel: rows at different lengths in one call, both
/// kernel paths (decode steps take the direct one; 24-token chunks, 8 or more positions per row,
/// the GEMM one), in-place cache writes.
#[test]
fn staggered_sequences_with_cached_attention_equal_standard_attention() {
    staggered_sequences(24, EnginePackage::CachedAttention);
}

/// Quantised linears (`MatMulNBits`, int8 activations per block) give each row the same
/// result whatever else shares the call: batched decoding and 24-token prefill chunks equal the
/// int8 package's own single generation. (Chunks under 8 positions per row take
/// `CachedAttention`'s direct path, whose sums are ordered differently from the GEMM path of
/// a whole prefill; the int8 rounding of the next linear's activations can turn that last-bit
/// difference into a step of its grid, so there a sampled sequence may differ: README,
/// Quantisation.)
#[test]
fn staggered_sequences_on_an_int8_package_equal_its_single_generation() {
    staggered_sequences(24, EnginePackage::Int8);
}

/// Float16 KV buffers: the pool's 2-byte rows moved as sequences come and go, the kernel writing
/// rounded keys into the bound buffers in place. A call reads its own keys unrounded and the
/// older ones as stored, so the engine equals generation alone where the calls split a sequence
/// alike: whole prefills, and no prefix cache (whose reuse would read a prompt's first keys
/// rounded where a fresh prefill reads them as computed).
#[test]
fn staggered_sequences_on_a_float16_kv_cache_equal_its_single_generation() {
    staggered_sequences(0, EnginePackage::NarrowCache(KvDtype::Fp16));
}

/// The same with int8 buffers: rows of head_dim + 1 bytes (values and the row's exponent)
/// moved by the pool and quantised in place by the kernel.
#[test]
fn staggered_sequences_on_an_int8_kv_cache_equal_its_single_generation() {
    staggered_sequences(0, EnginePackage::NarrowCache(KvDtype::Int8));
}

fn staggered_sequences(prefill_chunk: usize, engine_package: EnginePackage) {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let own = match engine_package {
        EnginePackage::Int8 => Some((
            "pkg-int8",
            kosmos_export::ExportOptions {
                quantization: Some(kosmos_models::package::Quantization {
                    bits: 8,
                    block_size: 32,
                    accuracy_level: 4,
                }),
                ..Default::default()
            },
        )),
        EnginePackage::NarrowCache(kv_dtype) => Some((
            "pkg-kv-narrow",
            kosmos_export::ExportOptions {
                kv_dtype: Some(kv_dtype),
                ..Default::default()
            },
        )),
        _ => None,
    };
    let mut pkg = if let Some((name, opts)) = own {
        let path = dir.path().join(name);
        let opts = kosmos_export::ExportOptions {
            kv_cache: kosmos_models::package::KvCacheLayout::Buffer,
            cached_attention: true,
            ..opts
        };
        kosmos_export::export(&ckpt, &path, &opts).unwrap();
        let pkg = Package::open(&path, &SessionOptions::default()).unwrap();
        assert_eq!(pkg.manifest.decoder.kv_dtype, opts.cache_dtype().element_type());
        pkg
    } else {
        Package::open(&pkg_dir, &SessionOptions::default()).unwrap()
    };
    let img = |i| ImageInput::Bytes(png(i));
    let cases: Vec<(Prompt, GenerateParams)> = vec![
        (Prompt::parse("", vec![img(0)]).unwrap(), greedy(12)),
        (Prompt::parse("a red circle", vec![]).unwrap(), greedy(5)),
        (
            Prompt::parse("Question: what colour is the circle? Answer:", vec![img(1)]).unwrap(),
            greedy(9),
        ),
        (
            Prompt::parse("<image> and <image> side by side:", vec![img(2), img(0)]).unwrap(),
            greedy(7),
        ),
        (
            Prompt::parse("", vec![img(1)]).unwrap(),
            GenerateParams {
                max_tokens: 10,
                temperature: 0.8,
                top_p: 0.9,
                seed: 42,
                ignore_eos: true,
                ..Default::default()
            },
        ),
        // Same image as the first (also in the fourth): embeddings come from the vision cache.
        (Prompt::parse("the", vec![img(0)]).unwrap(), greedy(3)),
        (Prompt::parse("a", vec![]).unwrap(), greedy(14)),
    ];
    let expected: Vec<_> = cases
        .iter()
        .map(|(p, params)| alone(&mut pkg, p, params))
        .collect();
    if engine_package == EnginePackage::CachedAttention {
        pkg = cached_attention_package(&ckpt, dir.path());
    }

    let metrics = Arc::new(Metrics::default());
    let config = EngineConfig {
        max_batch: 3,
        vision_cache: 16,
        prefill_chunk,
        prefix_cache_bytes: if matches!(engine_package, EnginePackage::NarrowCache(_)) {
            0
        } else {
            EngineConfig::default().prefix_cache_bytes
        },
        ..Default::default()
    };
    let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
    let mut outs = Vec::new();
    // Two now, then one more every other step, so admissions land between decode steps of
    // sequences at other lengths and a full batch makes later ones wait.
    let mut queue: Vec<_> = cases.iter().collect();
    queue.reverse();
    let mut steps = 0;
    while !queue.is_empty() || !engine.is_idle() {
        if steps == 0 || steps % 2 == 1 {
            for _ in 0..if steps == 0 { 2 } else { 1 } {
                if let Some((p, params)) = queue.pop() {
                    let (req, out, _) = request(engine.package(), p, params);
                    metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
                    engine.submit(req);
                    outs.push(out);
                }
            }
        }
        engine.step();
        steps += 1;
        assert!(steps < 500, "engine did not finish");
    }
    for (i, (out, want)) in outs.iter().zip(&expected).enumerate() {
        let c = out.lock().unwrap();
        let done = c
            .done
            .as_ref()
            .unwrap_or_else(|| panic!("sequence {i} did not finish"));
        assert_eq!(
            done.tokens, want.tokens,
            "sequence {i}: tokens differ from generate()"
        );
        assert_eq!(done.text, want.text, "sequence {i}");
        assert_eq!(c.text, want.text, "sequence {i}: streamed text");
        assert_eq!(done.finish_reason, want.finish_reason, "sequence {i}");
        assert_eq!(done.prompt_tokens, want.prompt_tokens, "sequence {i}");
    }
    let text = metrics.render();
    assert!(
        text.contains("kosmos_sequences_finished_total{reason=\"length\"} 7"),
        "{text}"
    );
    assert!(text.contains("kosmos_active_sequences 0"));
    assert!(text.contains("kosmos_queue_depth 0"));
    assert!(text.contains("kosmos_vision_cache_hits_total 3"), "{text}");
}

/// `ckpt` exported with `--kv-cache buffer --cached-attention` into `dir/pkg-cached`, opened.
/// An engine over the package `pkg_dir` exported from `ckpt`, or over a `--cached-attention`
/// export of `ckpt` (written next to `pkg_dir`), with its metrics.
fn engine_on(
    ckpt: &Path,
    pkg_dir: &Path,
    cached_attention: bool,
    config: EngineConfig,
) -> (Engine, Arc<Metrics>) {
    let pkg = if cached_attention {
        cached_attention_package(ckpt, pkg_dir.parent().unwrap())
    } else {
        Package::open(pkg_dir, &SessionOptions::default()).unwrap()
    };
    let metrics = Arc::new(Metrics::default());
    (Engine::new(pkg, config, metrics.clone()).unwrap(), metrics)
}

fn cached_attention_package(ckpt: &Path, dir: &Path) -> Package {
    let cached = dir.join("pkg-cached");
    let opts = kosmos_export::ExportOptions {
        kv_cache: kosmos_models::package::KvCacheLayout::Buffer,
        cached_attention: true,
        ..Default::default()
    };
    kosmos_export::export(ckpt, &cached, &opts).unwrap();
    Package::open(&cached, &SessionOptions::default()).unwrap()
}

/// Prompts that start like finished ones reuse their keys and values (the prefix cache) and
/// still generate exactly what `Package::generate` makes of each alone, with every token's
/// log-probability equal to tch's on the trainer's full forward: the same image with another
/// question, the same prompt sampled, a prompt followed by the tokens generated for it (a chat's
/// next turn), beside a prompt with nothing cached; and a prompt alone whose prefill shrinks to
/// its last token. Standard and `--cached-attention` packages, whole and 7-token prefill chunks.
#[test]
fn prefix_cache_reuse_equals_generation_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut reference = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let img = |i| ImageInput::Bytes(png(i));
    let question = "Question: what colour is the circle? Answer:";
    let caption = "a red circle on the left and a blue square on the right";
    let first = [
        (Prompt::parse(question, vec![img(5)]).unwrap(), greedy(6)),
        (Prompt::parse(caption, vec![]).unwrap(), greedy(6)),
    ];
    // The next turn after the caption: its prompt then its answer, as token ids (a random
    // model's answer does not survive a round trip through text).
    let answer = alone(&mut reference, &first[1].0, &first[1].1).tokens;
    let second = [
        (
            Prompt::parse("Question: what shape is on the left? Answer:", vec![img(5)]).unwrap(),
            greedy(5),
        ),
        (
            Prompt::parse(question, vec![img(5)]).unwrap(),
            GenerateParams {
                max_tokens: 6,
                temperature: 0.9,
                seed: 3,
                ignore_eos: true,
                ..Default::default()
            },
        ),
        (Prompt::parse(caption, vec![]).unwrap(), greedy(4)),
        (Prompt::parse("green", vec![]).unwrap(), greedy(3)),
    ];
    let appended = |w: usize, i: usize| -> &[u32] { if (w, i) == (2, 2) { &answer } else { &[] } };
    let third = [(Prompt::parse(question, vec![img(5)]).unwrap(), greedy(4))];
    // Unrelated prompts in every row between the waves: a row's stale keys and values must not
    // stand in for a copy that did not happen.
    let filler: Vec<(Prompt, GenerateParams)> = (0..4)
        .map(|i| {
            let text = format!("{} triangle", "yellow square and ".repeat(4 + i));
            (Prompt::parse(&text, vec![img(6 + i as u64)]).unwrap(), greedy(3))
        })
        .collect();
    let waves: [&[(Prompt, GenerateParams)]; 5] = [&first, &filler, &second, &filler, &third];
    let expected: Vec<Vec<Generation>> = waves
        .iter()
        .map(|w| {
            w.iter()
                .map(|(p, params)| alone(&mut reference, p, params))
                .collect()
        })
        .collect();

    for (cached_attention, prefill_chunk) in [(false, 0), (false, 7), (true, 7)] {
        let config = EngineConfig {
            max_batch: 4,
            prefill_chunk,
            ..Default::default()
        };
        let (mut engine, metrics) = engine_on(&ckpt, &pkg_dir, cached_attention, config);
        let case = format!("cached_attention {cached_attention}, chunk {prefill_chunk}");
        // A prompt's position keys: token ids, and for image slots the image (its bytes' hash).
        let keys = |engine: &Engine, p: &Prompt, appended: &[u32]| -> Vec<u64> {
            let a = engine.package().assemble(p).unwrap();
            let per = engine.package().manifest.vision.tokens_per_image;
            let mut slot = 0;
            let mut k: Vec<u64> = a
                .input_ids
                .iter()
                .zip(&a.image_mask)
                .map(|(&id, &image)| {
                    if !image {
                        return id as u64;
                    }
                    slot += 1;
                    let ImageInput::Bytes(b) = &p.images[(slot - 1) / per] else {
                        unreachable!()
                    };
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::hash::Hash::hash(b, &mut h);
                    std::hash::Hasher::finish(&h) | 1 << 63
                })
                .collect();
            k.extend(appended.iter().map(|&t| t as u64));
            k
        };
        // Every earlier sequence's keys: its prompt and the generated tokens fed back (all but
        // the last).
        let mut entries: Vec<Vec<u64>> = Vec::new();
        for (w, (wave, want)) in waves.iter().zip(&expected).enumerate() {
            let calls_before = metrics.prefill_calls.load(Ordering::Relaxed);
            let hits_before = metrics.prefix_cache_hit_tokens.load(Ordering::Relaxed);
            let next = std::cell::Cell::new(0);
            let outs = run_all(&mut engine, wave.iter().map(|(p, params)| (p, params)), |r| {
                r.logprobs = Some(0);
                let extra = appended(w, next.replace(next.get() + 1));
                r.assembled.input_ids.extend_from_slice(extra);
                r.assembled.image_mask.resize(r.assembled.input_ids.len(), false);
            });
            let mut expect_hits = 0;
            let mut finished = Vec::new();
            for (i, ((out, want), (prompt, _))) in outs.iter().zip(want).zip(wave.iter()).enumerate() {
                let c = out.lock().unwrap();
                let done = c
                    .done
                    .as_ref()
                    .unwrap_or_else(|| panic!("{case}: wave {w} #{i} did not finish"));
                let extra = appended(w, i);
                if extra.is_empty() {
                    assert_eq!(done.tokens, want.tokens, "{case}: wave {w} #{i} vs generate()");
                    assert_eq!(c.text, want.text, "{case}: wave {w} #{i}");
                }
                // Tokens alone barely depend on the context in a random model; the
                // log-probabilities do: each equals tch's on the trainer's full forward.
                let what = format!("{case}: wave {w} #{i}");
                assert_logprobs_are_the_trainers(
                    &ckpt,
                    &engine,
                    prompt,
                    extra,
                    &done.tokens,
                    &c.logprobs,
                    &what,
                );
                // Reused: the longest common prefix with an earlier sequence, short of the last
                // prompt token.
                let k = keys(&engine, prompt, extra);
                let common = entries
                    .iter()
                    .map(|e| e.iter().zip(&k).take_while(|(x, y)| x == y).count())
                    .max()
                    .unwrap_or(0);
                let reusable = common.min(k.len() - 1);
                expect_hits += reusable as u64;
                // What the summary reports as cached (OpenAI's cached_tokens): at most what
                // the cache held; all of it for a prompt prefilled alone.
                assert!(
                    done.cached_tokens <= reusable,
                    "{case}: wave {w} #{i}: {} cached of {reusable}",
                    done.cached_tokens
                );
                if wave.len() == 1 {
                    assert_eq!(
                        done.cached_tokens, reusable,
                        "{case}: wave {w} #{i} cached tokens"
                    );
                }
                let mut entry = k;
                entry.extend(done.tokens[..done.tokens.len() - 1].iter().map(|&t| t as u64));
                finished.push(entry);
            }
            entries.extend(finished);
            let hits = metrics.prefix_cache_hit_tokens.load(Ordering::Relaxed) - hits_before;
            assert_eq!(hits, expect_hits, "{case}: wave {w}: prompt tokens reused");
            let calls = metrics.prefill_calls.load(Ordering::Relaxed) - calls_before;
            match w {
                0 => assert_eq!(hits, 0, "{case}: nothing cached at first"),
                // The next turn reuses the caption and all but the last answer token.
                2 => assert!(hits > (caption.len() / 8 + answer.len()) as u64, "{case}: {hits}"),
                // The same prompt again computes only its last token: one call at any chunk size.
                4 => assert_eq!(calls, 1, "{case}"),
                _ => {}
            }
        }
        let text = metrics.render();
        assert!(!text.contains("kosmos_prefix_cache_bytes 0\n"), "{text}");
    }
}

/// Each of `logprobs` (one per generated token) equals tch's log-softmax on the trainer's full
/// forward over `prompt`, `extra` tokens after it, and `generated`.
fn assert_logprobs_are_the_trainers(
    ckpt: &Path,
    engine: &Engine,
    prompt: &Prompt,
    extra: &[u32],
    generated: &[u32],
    logprobs: &[kosmos_rt::logprobs::TokenLogprob],
    what: &str,
) {
    let a = engine.package().assemble(prompt).unwrap();
    let mut ids: Vec<i64> = a.input_ids.iter().map(|&t| t as i64).collect();
    ids.extend(extra.iter().map(|&t| t as i64));
    let prompt_len = ids.len();
    ids.extend(generated.iter().map(|&t| t as i64));
    let mut image_mask = a.image_mask.clone();
    image_mask.resize(ids.len(), false);
    let pixels: Vec<f32> = prompt
        .images
        .iter()
        .flat_map(|i| engine.package().preprocess(i).unwrap())
        .collect();
    let logp = trainer_log_softmax(ckpt, &ids, &image_mask, &pixels);
    assert_eq!(logprobs.len(), generated.len(), "{what}: one per generated token");
    for (j, e) in logprobs.iter().enumerate() {
        let want = logp
            .get(0)
            .get((prompt_len - 1 + j) as i64)
            .double_value(&[e.token as i64]);
        assert!(
            (e.logprob as f64 - want).abs() <= 1e-4,
            "{what} token {j}: {} vs the trainer's {want}",
            e.logprob
        );
    }
}

/// A chat's next turn: `prompt` followed by the `generated` tokens fed back, run to the end
/// (with the log-probabilities of two alternatives). Returns what it collected and its prompt's
/// length.
fn next_turn(
    engine: &mut Engine,
    prompt: &Prompt,
    generated: &[u32],
    params: &GenerateParams,
) -> (Arc<Mutex<Collected>>, usize) {
    let (mut req, out, _) = request(engine.package(), prompt, params);
    req.assembled.input_ids.extend_from_slice(generated);
    let len = req.assembled.input_ids.len();
    req.assembled.image_mask.resize(len, false);
    req.logprobs = Some(2);
    engine.submit(req);
    while !engine.is_idle() {
        engine.step();
    }
    (out, len)
}

/// Submit every request (`tweak` sets its options), run the engine until idle, and return what
/// each collected.
fn run_all<'a>(
    engine: &mut Engine,
    requests: impl IntoIterator<Item = (&'a Prompt, &'a GenerateParams)>,
    tweak: impl Fn(&mut SeqRequest),
) -> Vec<Arc<Mutex<Collected>>> {
    let mut outs = Vec::new();
    for (prompt, params) in requests {
        let (mut req, out, _) = request(engine.package(), prompt, params);
        tweak(&mut req);
        engine.submit(req);
        outs.push(out);
    }
    while !engine.is_idle() {
        engine.step();
    }
    outs
}

/// tch's log-softmax of the trainer's full forward over `ids` (image slots where `image_mask`,
/// filled from the preprocessed `pixels`): [1, len, vocab].
fn trainer_log_softmax(ckpt: &Path, ids: &[i64], image_mask: &[bool], pixels: &[f32]) -> tch::Tensor {
    let (_vs, model, ck) = kosmos_train::checkpoint::load(ckpt, tch::Device::Cpu).unwrap();
    let size = ck.config.vision.image_size as i64;
    let len = ids.len() as i64;
    let pv = (!pixels.is_empty()).then(|| tch::Tensor::from_slice(pixels).view([-1, 3, size, size]));
    tch::no_grad(|| {
        model
            .forward(
                &tch::Tensor::from_slice(ids).view([1, len]),
                pv.as_ref(),
                &tch::Tensor::from_slice(image_mask).view([1, len]),
                &tch::Tensor::ones([1, len], (tch::Kind::Int64, tch::Device::Cpu)),
                false,
            )
            .unwrap()
            .log_softmax(-1, tch::Kind::Float)
    })
}

/// Log-probabilities the engine reports are the trainer's: tch's log-softmax of the full forward
/// over prompt + generated tokens, for the chosen token and the three most likely, at every
/// step; sampling (temperature, repetition penalty) does not change them.
#[test]
fn logprobs_equal_the_trainers_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let prompt = Prompt::parse(
        "Question: what colour is the circle? Answer:",
        vec![ImageInput::Bytes(png(3))],
    )
    .unwrap();
    let assembled = pkg.assemble(&prompt).unwrap();
    let pixels = pkg.preprocess(&prompt.images[0]).unwrap();
    let cases = [
        greedy(6),
        GenerateParams {
            max_tokens: 6,
            temperature: 0.7,
            repetition_penalty: 1.3,
            seed: 5,
            ignore_eos: true,
            ..Default::default()
        },
    ];
    let mut engine = Engine::new(pkg, EngineConfig::default(), Arc::new(Metrics::default())).unwrap();
    let outs = run_all(&mut engine, cases.iter().map(|p| (&prompt, p)), |r| {
        r.logprobs = Some(3)
    });
    for (case, out) in outs.iter().enumerate() {
        let c = out.lock().unwrap();
        let done = c.done.as_ref().expect("finished");
        assert_eq!(
            c.logprobs.len(),
            done.tokens.len(),
            "case {case}: one entry per token"
        );
        let mut ids: Vec<i64> = assembled.input_ids.iter().map(|&t| t as i64).collect();
        ids.extend(done.tokens.iter().map(|&t| t as i64));
        let mut image_mask = assembled.image_mask.clone();
        image_mask.resize(ids.len(), false);
        let logp = trainer_log_softmax(&ckpt, &ids, &image_mask, &pixels);
        for (i, (e, &tok)) in c.logprobs.iter().zip(&done.tokens).enumerate() {
            let row = logp.get(0).get(assembled.len() as i64 - 1 + i as i64);
            let want: Vec<f32> = Vec::try_from(&row).unwrap();
            assert_eq!(e.token, tok, "case {case} step {i}");
            assert!(
                (e.logprob - want[tok as usize]).abs() <= 1e-4,
                "case {case} step {i}: {} vs {}",
                e.logprob,
                want[tok as usize]
            );
            let (top_v, top_i) = row.topk(3, -1, true, true);
            let (top_v, top_i): (Vec<f32>, Vec<i64>) =
                (Vec::try_from(&top_v).unwrap(), Vec::try_from(&top_i).unwrap());
            let got_i: Vec<i64> = e.top.iter().map(|&(t, _)| t as i64).collect();
            assert_eq!(got_i, top_i, "case {case} step {i}: the three most likely");
            for (&(_, lp), &v) in e.top.iter().zip(&top_v) {
                assert!((lp - v).abs() <= 1e-4, "case {case} step {i}: {lp} vs {v}");
            }
            if case == 0 {
                assert_eq!(tok as i64, top_i[0], "greedy picks the most likely");
            }
        }
    }
}

/// An echoed prompt's log-probabilities are the trainer's too: two prompts of different lengths
/// prefilled together (left padding) in 7-token chunks, one with an image (its slots have none),
/// the other with max_tokens 0 (scored only: it ends at its prefill).
#[test]
fn prompt_logprobs_equal_the_trainers_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let prompts = [
        Prompt::parse(
            "Question: what colour is the circle? Answer:",
            vec![ImageInput::Bytes(png(4))],
        )
        .unwrap(),
        Prompt::parse("a blue square on the left", vec![]).unwrap(),
    ];
    let config = EngineConfig {
        prefill_chunk: 7,
        ..Default::default()
    };
    let mut engine = Engine::new(pkg, config, Arc::new(Metrics::default())).unwrap();
    let params = [greedy(2), greedy(0)];
    let outs = run_all(&mut engine, prompts.iter().zip(&params), |r| {
        r.prompt_logprobs = Some(2)
    });
    for (k, ((prompt, params), out)) in prompts.iter().zip(&params).zip(&outs).enumerate() {
        let a = engine.package().assemble(prompt).unwrap();
        let c = out.lock().unwrap();
        assert!(c.failed.is_none(), "prompt {k}: {:?}", c.failed);
        let done = c.done.as_ref().expect("finished");
        assert!(
            c.logprobs.is_empty(),
            "prompt {k}: generated tokens' logprobs not asked for"
        );
        assert_eq!(
            done.tokens.len(),
            params.max_tokens,
            "prompt {k}: max_tokens tokens (greedy ignores </s>)"
        );
        if params.max_tokens == 0 {
            assert_eq!(done.finish_reason, FinishReason::Length, "prompt {k}");
            assert!(done.text.is_empty(), "prompt {k}");
        }
        let got = c.prompt_logprobs.as_ref().expect("prompt log-probabilities");
        assert_eq!(got.len(), a.len(), "prompt {k}: one entry per prompt token");
        let ids: Vec<i64> = a.input_ids.iter().map(|&t| t as i64).collect();
        let pixels: Vec<f32> = prompt
            .images
            .iter()
            .flat_map(|i| engine.package().preprocess(i).unwrap())
            .collect();
        let logp = trainer_log_softmax(&ckpt, &ids, &a.image_mask, &pixels);
        let mut scored = 0;
        for (i, (tok, e)) in got.iter().enumerate() {
            assert_eq!(*tok, a.input_ids[i], "prompt {k} token {i}");
            if i == 0 || a.image_mask[i] {
                assert!(
                    e.is_none(),
                    "prompt {k} token {i}: first token and image slots have none"
                );
                continue;
            }
            let e = e
                .as_ref()
                .unwrap_or_else(|| panic!("prompt {k} token {i} not scored"));
            let want: Vec<f32> = Vec::try_from(logp.get(0).get(i as i64 - 1)).unwrap();
            assert!(
                (e.logprob - want[*tok as usize]).abs() <= 1e-4,
                "prompt {k} token {i}"
            );
            assert_eq!(e.top.len(), 2);
            for &(t, lp) in &e.top {
                assert!(
                    (lp - want[t as usize]).abs() <= 1e-4,
                    "prompt {k} token {i}: alternative {t}"
                );
            }
            scored += 1;
        }
        assert!(scored >= 5, "prompt {k}: {scored} tokens scored");
    }
}

/// A prompt prefilled in chunks does not stall the running batch: a running sequence takes a
/// token at every step between the chunks, and finishes while the chunks go on (so the prefilled
/// row moves down to row 0 to join the batch); both equal generation alone.
#[test]
fn running_sequences_decode_between_prefill_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let pkg_dir = buffer_package(dir.path());
    let mut pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let short = (Prompt::parse("a", vec![]).unwrap(), greedy(3));
    let long = (
        Prompt::parse(
            "Question: what colour is the circle? Answer:",
            vec![ImageInput::Bytes(png(3))],
        )
        .unwrap(),
        greedy(6),
    );
    let want_short = alone(&mut pkg, &short.0, &short.1);
    let want_long = alone(&mut pkg, &long.0, &long.1);
    let long_tokens = pkg.assemble(&long.0).unwrap().len();
    let chunk = 4;
    assert!(long_tokens > 3 * chunk, "the long prompt needs several chunks");

    let metrics = Arc::new(Metrics::default());
    let config = EngineConfig {
        max_batch: 2,
        vision_cache: 0,
        prefill_chunk: chunk,
        ..Default::default()
    };
    let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
    let (req, short_out, _) = request(engine.package(), &short.0, &short.1);
    engine.submit(req);
    engine.step(); // the short prompt in one chunk: tokens 1 and 2
    let (req, long_out, _) = request(engine.package(), &long.0, &long.1);
    engine.submit(req);
    engine.step(); // the long prompt's first chunk, then the short one's third token
    {
        let s = short_out.lock().unwrap();
        let done = s
            .done
            .as_ref()
            .expect("the running sequence finished during the prefill");
        assert_eq!(done.tokens, want_short.tokens);
        assert_eq!(done.finish_reason, FinishReason::Length);
        let l = long_out.lock().unwrap();
        assert!(
            l.done.is_none() && l.text.is_empty(),
            "the long prompt is still prefilling"
        );
    }
    assert!(metrics.render().contains("kosmos_prefill_calls_total 2"));
    let mut steps = 0;
    while !engine.is_idle() {
        engine.step();
        steps += 1;
        assert!(steps < 100, "engine did not finish");
    }
    let l = long_out.lock().unwrap();
    let done = l.done.as_ref().expect("the long prompt finished");
    assert_eq!(
        done.tokens, want_long.tokens,
        "chunked prefill changed the tokens"
    );
    assert_eq!(l.text, want_long.text);
    let calls = long_tokens.div_ceil(chunk) + 1;
    let text = metrics.render();
    assert!(
        text.contains(&format!("kosmos_prefill_calls_total {calls}")),
        "{calls} calls expected: {text}"
    );
    // The short sequence's 2 later tokens and the long one's 5 each have an inter-token time.
    assert!(
        text.contains("kosmos_inter_token_latency_seconds_count 7"),
        "{text}"
    );
    assert!(text.contains("kosmos_kv_slots_used 0"), "{text}");
}

/// The KV pool keeps its buffers: after a long sequence it shrinks for a short one, then grows
/// again within the same memory while that one runs, moving its keys and values in place; both
/// later sequences still equal generation alone. With `kv_preallocate` it never grows.
#[test]
fn kv_pool_shrinks_and_grows_in_place_keeping_running_sequences() {
    for kv_preallocate in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pkg_dir = buffer_package(dir.path());
        let mut pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
        let cases = [
            (Prompt::parse("a", vec![]).unwrap(), greedy(40)),
            (Prompt::parse("a red", vec![]).unwrap(), greedy(12)),
            (Prompt::parse("a blue square", vec![]).unwrap(), greedy(40)),
        ];
        let want: Vec<_> = cases
            .iter()
            .map(|(p, params)| alone(&mut pkg, p, params))
            .collect();
        let metrics = Arc::new(Metrics::default());
        let config = EngineConfig {
            max_batch: 2,
            vision_cache: 0,
            kv_preallocate,
            ..Default::default()
        };
        let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
        let slots = |m: &Metrics| {
            let text = m.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("kosmos_kv_slots_total "))
                .unwrap()
                .to_string();
            line.rsplit(' ').next().unwrap().parse::<usize>().unwrap()
        };
        let mut outs = Vec::new();
        let mut sizes = Vec::new();
        for (i, (p, params)) in cases.iter().enumerate() {
            let (req, out, _) = request(engine.package(), p, params);
            engine.submit(req);
            outs.push(out);
            engine.step();
            sizes.push(slots(&metrics));
            // The first runs to its end alone; the second is two tokens in when the third comes.
            let steps = if i == 0 { 100 } else { 1 };
            for _ in 0..steps {
                if engine.is_idle() {
                    break;
                }
                engine.step();
            }
        }
        while !engine.is_idle() {
            engine.step();
        }
        assert!(
            sizes[1] < sizes[0] && sizes[2] > sizes[1],
            "the pool shrinks and grows: {sizes:?}"
        );
        for (i, (out, want)) in outs.iter().zip(&want).enumerate() {
            let c = out.lock().unwrap();
            assert_eq!(c.done.as_ref().unwrap().tokens, want.tokens, "sequence {i}");
        }
    }
}

#[test]
fn cancelled_and_timed_out_sequences_free_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pkg_dir = buffer_package(dir.path());
    let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let metrics = Arc::new(Metrics::default());
    let config = EngineConfig {
        max_batch: 1,
        vision_cache: 0,
        ..Default::default()
    };
    let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
    let params = GenerateParams {
        max_tokens: 50,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = Prompt::parse("a blue square", vec![]).unwrap();
    let (first, first_out, cancel) = request(engine.package(), &prompt, &params);
    let (mut late, late_out, _) = request(engine.package(), &prompt, &params);
    late.deadline = Some(Instant::now() + Duration::from_millis(1));
    let (short, short_out, _) = request(
        engine.package(),
        &prompt,
        &GenerateParams {
            max_tokens: 3,
            ..params.clone()
        },
    );
    let (waiting, waiting_out, cancel_waiting) = request(engine.package(), &prompt, &params);
    for r in [first, late, short, waiting] {
        metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        engine.submit(r);
    }
    engine.step();
    engine.step();
    cancel.store(true, Ordering::Relaxed);
    cancel_waiting.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(5));
    let mut steps = 0;
    while !engine.is_idle() {
        engine.step();
        steps += 1;
        assert!(steps < 100);
    }
    let first = first_out.lock().unwrap();
    let done = first
        .done
        .as_ref()
        .expect("the cancelled sequence reports its end");
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.tokens.len() < 50);
    // Cancelled before it had a row: it still ends with one Done.
    let waiting = waiting_out.lock().unwrap();
    let done = waiting.done.as_ref().expect("a waiting sequence reports its end");
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.tokens.is_empty() && waiting.failed.is_none());
    assert!(matches!(
        late_out.lock().unwrap().failed,
        Some(SeqFailure::Timeout)
    ));
    // The single row was freed twice over: the third sequence ran to its length.
    let short = short_out.lock().unwrap();
    assert_eq!(short.done.as_ref().unwrap().tokens.len(), 3);
    let text = metrics.render();
    assert!(text.contains("reason=\"cancelled\"} 2"), "{text}");
    assert!(text.contains("reason=\"timeout\"} 1"), "{text}");
    assert!(text.contains("reason=\"length\"} 1"), "{text}");
}

#[test]
fn concat_packages_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pkg_dir) = kosmos_e2e::tiny_package(dir.path(), 3);
    let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let err = Engine::new(pkg, EngineConfig::default(), Arc::new(Metrics::default()))
        .err()
        .expect("a concat package is refused")
        .to_string();
    assert!(err.contains("--kv-cache buffer"), "{err}");
}

/// Identical prompts admitted together (`n` > 1, the same request twice at once) are prefilled
/// once: the others copy that row and its last logits, then sample on their own. Each equals
/// `Package::generate` alone, whole or in 5-token chunks, with rows that held unrelated
/// sequences before; a prompt asking for its own log-probabilities, and the same text with
/// another image, are prefilled themselves.
#[test]
fn identical_prompts_share_one_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut reference = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let img = |i| ImageInput::Bytes(png(i));
    let question = "Question: what colour is the circle? Answer:";
    let sampled = |seed| GenerateParams {
        max_tokens: 7,
        temperature: 1.0,
        seed,
        ignore_eos: true,
        ..Default::default()
    };
    let filler: Vec<(Prompt, GenerateParams)> = (0..6)
        .map(|i| {
            let text = format!("{} circle", "purple triangle and ".repeat(3 + i));
            (Prompt::parse(&text, vec![img(20 + i as u64)]).unwrap(), greedy(2))
        })
        .collect();
    let same = || Prompt::parse(question, vec![img(4)]).unwrap();
    let wave = [
        (same(), greedy(6)),
        (Prompt::parse("a blue square", vec![]).unwrap(), greedy(5)),
        (same(), sampled(1)),
        (same(), sampled(2)),
        // Same text, another image: not identical.
        (Prompt::parse(question, vec![img(5)]).unwrap(), greedy(6)),
        // Identical, but scored: prefilled itself (below).
        (same(), greedy(3)),
    ];
    let expected_filler: Vec<Generation> = filler
        .iter()
        .map(|(p, params)| alone(&mut reference, p, params))
        .collect();
    let expected: Vec<Generation> = wave
        .iter()
        .map(|(p, params)| alone(&mut reference, p, params))
        .collect();
    assert_ne!(
        expected[2].tokens, expected[3].tokens,
        "the seeds sample differently"
    );
    let shared_len = reference.assemble(&same()).unwrap().len();
    drop(reference);

    for (cached_attention, prefill_chunk) in [(false, 0), (false, 5), (true, 5)] {
        let config = EngineConfig {
            max_batch: 6,
            prefill_chunk,
            // Off, so that only sharing within the group can skip a prefill.
            prefix_cache_bytes: 0,
            ..Default::default()
        };
        let (mut engine, metrics) = engine_on(&ckpt, &pkg_dir, cached_attention, config);
        let case = format!("cached_attention {cached_attention}, chunk {prefill_chunk}");
        let outs = run_all(&mut engine, filler.iter().map(|(p, g)| (p, g)), |_| {});
        for (out, want) in outs.iter().zip(&expected_filler) {
            assert_eq!(
                out.lock().unwrap().done.as_ref().unwrap().tokens,
                want.tokens,
                "{case}"
            );
        }
        let outs = run_all(&mut engine, wave.iter().map(|(p, g)| (p, g)), |r| {
            if r.params.max_tokens == 3 {
                r.prompt_logprobs = Some(0);
            }
        });
        for (i, (out, want)) in outs.iter().zip(&expected).enumerate() {
            let c = out.lock().unwrap();
            assert!(c.failed.is_none(), "{case}: request {i} failed");
            let done = c.done.as_ref().unwrap();
            assert_eq!(
                done.tokens, want.tokens,
                "{case}: request {i} vs Package::generate"
            );
            assert_eq!(c.text, want.text, "{case}: request {i}");
        }
        let scored = outs[5].lock().unwrap();
        let scored = scored
            .prompt_logprobs
            .as_ref()
            .expect("the scored prompt's log-probabilities");
        assert_eq!(scored.len(), shared_len, "{case}");
        assert_eq!(
            metrics.shared_prefill_tokens.load(Ordering::Relaxed),
            2 * shared_len as u64,
            "{case}: requests 2 and 3 copied request 0's prefill"
        );
    }
}

/// Admission groups prompts by what is left to prefill: a prompt mostly in the prefix cache and
/// short prompts arriving beside a long new one are not prefilled at its length. Every answer
/// still equals `Package::generate` alone, and the positions the prefill calls compute are
/// those of each group's own longest uncached part (where one group of four would compute four
/// rows of the long prompt).
#[test]
fn prompts_are_grouped_by_what_is_left_to_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut reference = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let long = "a red circle on the left and a blue square on the right, ".repeat(4);
    let first = [(Prompt::parse(&long, vec![]).unwrap(), greedy(3))];
    let wave = [
        // The first prompt again with a question after it: mostly cached.
        (
            Prompt::parse(&format!("{long}Question: what shape? Answer:"), vec![]).unwrap(),
            greedy(4),
        ),
        (
            Prompt::parse(&"yellow triangle and green square, ".repeat(12), vec![]).unwrap(),
            greedy(4),
        ),
        (Prompt::parse("purple", vec![]).unwrap(), greedy(4)),
        (Prompt::parse("an orange", vec![]).unwrap(), greedy(4)),
    ];
    let expected_first = alone(&mut reference, &first[0].0, &first[0].1);
    let expected: Vec<Generation> = wave
        .iter()
        .map(|(p, params)| alone(&mut reference, p, params))
        .collect();
    let ids = |p: &Prompt| reference.assemble(p).unwrap().input_ids;
    // What the cache holds after the first prompt: its tokens and the generated ones fed back.
    let mut held = ids(&first[0].0);
    held.extend(&expected_first.tokens[..expected_first.tokens.len() - 1]);
    let lens: Vec<usize> = wave.iter().map(|(p, _)| ids(p).len()).collect();
    let common = ids(&wave[0].0)
        .iter()
        .zip(&held)
        .take_while(|(a, b)| a == b)
        .count();
    let uncached = lens[0] - common.min(lens[0] - 1);
    assert!(
        uncached * 4 < lens[0] && lens[1] > 2 * lens[2].max(lens[3]) + 32,
        "{lens:?}"
    );
    drop(reference);

    for (cached_attention, prefill_chunk) in [(false, 0), (true, 0), (false, 16)] {
        let config = EngineConfig {
            max_batch: 4,
            prefill_chunk,
            ..Default::default()
        };
        let (mut engine, metrics) = engine_on(&ckpt, &pkg_dir, cached_attention, config);
        let case = format!("cached_attention {cached_attention}, chunk {prefill_chunk}");
        let out = run_all(&mut engine, first.iter().map(|(p, g)| (p, g)), |_| {});
        assert_eq!(
            out[0].lock().unwrap().done.as_ref().unwrap().tokens,
            expected_first.tokens
        );
        let before = metrics.prefill_positions.load(Ordering::Relaxed);
        let outs = run_all(&mut engine, wave.iter().map(|(p, g)| (p, g)), |_| {});
        for (i, (out, want)) in outs.iter().zip(&expected).enumerate() {
            let done = out.lock().unwrap().done.clone().unwrap();
            assert_eq!(
                done.tokens, want.tokens,
                "{case}: prompt {i} vs Package::generate"
            );
        }
        let computed = metrics.prefill_positions.load(Ordering::Relaxed) - before;
        // The cached prompt alone, the long one alone, the two short ones together (`<s>`, in
        // the cache too, can make each a little less). One group would compute 4 × the long one.
        let most = uncached + lens[1] + 2 * lens[2].max(lens[3]);
        assert!(
            computed as usize <= most && computed as usize >= lens[1] - 1,
            "{case}: {computed} positions computed, at most {most} ({lens:?}, {uncached} uncached)"
        );
    }
}

/// Waiting sequences are admitted lower priority first, equal ones in arrival order. Without
/// preemption the running one keeps its row; with it (the default) the running one, less urgent
/// than every newcomer but `late`, gives its row up and finishes last.
#[test]
fn waiting_sequences_are_admitted_by_priority() {
    let dir = tempfile::tempdir().unwrap();
    let pkg_dir = buffer_package(dir.path());
    for (preemption, want) in [
        (false, ["running", "urgent", "first of 0", "second of 0", "late"]),
        (true, ["urgent", "first of 0", "second of 0", "late", "running"]),
    ] {
        let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
        let config = EngineConfig {
            max_batch: 1,
            priority_preemption: preemption,
            ..Default::default()
        };
        let mut engine = Engine::new(pkg, config, Arc::default()).unwrap();
        let prompt = Prompt::parse("a blue square", vec![]).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let submit = |engine: &mut Engine, label: &'static str, priority: i64| {
            let (mut req, _, _) = request(engine.package(), &prompt, &greedy(4));
            req.priority = priority;
            let order = order.clone();
            req.sink = Box::new(move |ev| {
                if matches!(ev, SeqEvent::Done(_)) {
                    order.lock().unwrap().push(label);
                }
                true
            });
            engine.submit(req);
        };
        submit(&mut engine, "running", 9);
        engine.step();
        for (label, priority) in [("late", 5), ("first of 0", 0), ("urgent", -3), ("second of 0", 0)] {
            submit(&mut engine, label, priority);
        }
        while !engine.is_idle() {
            engine.step();
        }
        assert_eq!(*order.lock().unwrap(), want, "preemption {preemption}");
    }
}

/// Preemption changes when a sequence finishes, never what it generates: two running sequences
/// (greedy with an image and log-probabilities, and sampled) give their rows to two more urgent
/// ones mid-generation, resume, and still equal `Package::generate` alone token for token and
/// text for text (the sampler's state goes on), every log-probability equal to tch's on the
/// trainer's full forward, the streamed text arriving once. With and without the prefix cache
/// (resuming recomputes everything without it), whole and 7-token prefill chunks.
#[test]
fn preempted_sequences_resume_and_generate_what_they_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut reference = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let slow = [
        (
            Prompt::parse(
                "Question: what colour is the circle? Answer:",
                vec![ImageInput::Bytes(png(3))],
            )
            .unwrap(),
            greedy(14),
        ),
        (
            Prompt::parse("a red circle on the left", vec![]).unwrap(),
            GenerateParams {
                max_tokens: 14,
                temperature: 0.9,
                top_k: 20,
                repetition_penalty: 1.3,
                seed: 11,
                ignore_eos: true,
                ..Default::default()
            },
        ),
    ];
    let urgent = Prompt::parse("green", vec![]).unwrap();
    let want: Vec<Generation> = slow
        .iter()
        .map(|(p, params)| alone(&mut reference, p, params))
        .collect();
    for (prefix_cache_bytes, prefill_chunk) in [(512 << 20, 0), (0, 7)] {
        let case = format!("prefix cache {prefix_cache_bytes}, chunk {prefill_chunk}");
        let config = EngineConfig {
            max_batch: 2,
            prefix_cache_bytes,
            prefill_chunk,
            ..Default::default()
        };
        let (mut engine, metrics) = engine_on(&ckpt, &pkg_dir, false, config);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut outs = Vec::new();
        let mut submit = |engine: &mut Engine,
                          label: &'static str,
                          prompt: &Prompt,
                          params: &GenerateParams,
                          priority: i64| {
            let (mut req, out, _) = request(engine.package(), prompt, params);
            req.priority = priority;
            req.logprobs = Some(2);
            let order = order.clone();
            let mut inner = std::mem::replace(&mut req.sink, Box::new(|_| true));
            req.sink = Box::new(move |ev| {
                if matches!(ev, SeqEvent::Done(_)) {
                    order.lock().unwrap().push(label);
                }
                inner(ev)
            });
            engine.submit(req);
            outs.push(out);
        };
        submit(&mut engine, "slow greedy", &slow[0].0, &slow[0].1, 5);
        submit(&mut engine, "slow sampled", &slow[1].0, &slow[1].1, 5);
        // A few tokens in, every row taken: then the urgent ones come.
        for _ in 0..6 {
            engine.step();
        }
        assert!(order.lock().unwrap().is_empty(), "{case}");
        submit(&mut engine, "urgent 1", &urgent, &greedy(3), 0);
        submit(&mut engine, "urgent 2", &urgent, &greedy(3), 0);
        while !engine.is_idle() {
            engine.step();
        }
        let mut order = order.lock().unwrap().clone();
        // The urgent ones finish together (the same prompt, prefilled once), first.
        order[..2].sort();
        assert_eq!(&order[..2], ["urgent 1", "urgent 2"], "{case}: {order:?}");
        assert_eq!(metrics.preemptions.load(Ordering::Relaxed), 2, "{case}");
        for (i, ((prompt, _), want)) in slow.iter().zip(&want).enumerate() {
            let c = outs[i].lock().unwrap();
            let done = c
                .done
                .as_ref()
                .unwrap_or_else(|| panic!("{case}: #{i} did not finish"));
            assert_eq!(done.tokens, want.tokens, "{case}: #{i} tokens vs generate()");
            assert_eq!(c.text, want.text, "{case}: #{i} streamed text");
            assert_eq!(done.text, want.text, "{case}: #{i}");
            let a = engine.package().assemble(prompt).unwrap();
            assert_eq!(done.prompt_tokens, a.len(), "{case}: #{i} prompt tokens");
            let what = format!("{case}: #{i}");
            assert_logprobs_are_the_trainers(&ckpt, &engine, prompt, &[], &done.tokens, &c.logprobs, &what);
        }
        if prefix_cache_bytes > 0 {
            // The next turn of the resumed greedy sequence: the prefix cache holds its prompt
            // and every generated token fed back (all but the last), under the right keys.
            let tokens = outs[0].lock().unwrap().done.as_ref().unwrap().tokens.clone();
            let (out, len) = next_turn(&mut engine, &slow[0].0, &tokens, &greedy(2));
            let cached = out.lock().unwrap().done.as_ref().unwrap().cached_tokens;
            assert_eq!(cached, len - 1, "{case}: the next turn's cached prompt tokens");
        }
    }
}

/// A preempted sequence cancelled while it waits ends as cancelled with what it had generated
/// (a prefix of its generation alone) and its own prompt's length, not the prompt it waited with.
#[test]
fn a_preempted_sequence_cancelled_while_waiting_reports_what_it_generated() {
    let dir = tempfile::tempdir().unwrap();
    let pkg_dir = buffer_package(dir.path());
    let mut reference = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let slow = Prompt::parse("a red circle on the left", vec![]).unwrap();
    let want = alone(&mut reference, &slow, &greedy(14));
    let pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let config = EngineConfig {
        max_batch: 1,
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::default());
    let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
    let (mut req, out, cancel) = request(engine.package(), &slow, &greedy(14));
    req.priority = 5;
    let prompt_len = req.assembled.len();
    engine.submit(req);
    for _ in 0..4 {
        engine.step();
    }
    let urgent = Prompt::parse("green", vec![]).unwrap();
    let (req, _, _) = request(engine.package(), &urgent, &greedy(6));
    engine.submit(req);
    engine.step();
    assert_eq!(metrics.preemptions.load(Ordering::Relaxed), 1);
    cancel.store(true, Ordering::Relaxed);
    while !engine.is_idle() {
        engine.step();
    }
    let c = out.lock().unwrap();
    let done = c.done.as_ref().expect("done");
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(
        !done.tokens.is_empty() && done.tokens.len() < 14,
        "{:?}",
        done.tokens
    );
    assert_eq!(done.tokens[..], want.tokens[..done.tokens.len()]);
    assert_eq!(done.prompt_tokens, prompt_len);
}

fn speculation(max_batch: usize) -> Speculation {
    Speculation {
        tokens: 4,
        ngram_min: 1,
        ngram_max: 3,
        max_batch,
        schedule: GuessSchedule::Fixed,
    }
}

/// Requests the speculative tests run: an image question (greedy), a text prompt sampled with
/// top-k and a repetition penalty, and a constrained one (a regular expression that makes its
/// output repeat, where guesses pay most).
fn speculative_cases() -> Vec<(Prompt, GenerateParams)> {
    let repeat = kosmos_rt::grammar::Constraint::Regex("(red |blue |a circle )+".into());
    vec![
        (
            Prompt::parse(
                "Question: what colour is the circle? Answer: red. Question: what colour is the circle? Answer:",
                vec![ImageInput::Bytes(png(3))],
            )
            .unwrap(),
            greedy(24),
        ),
        (
            Prompt::parse("a red circle on the left and a red circle on the left and", vec![]).unwrap(),
            GenerateParams {
                max_tokens: 24,
                temperature: 0.8,
                top_k: 20,
                repetition_penalty: 1.2,
                seed: 5,
                ignore_eos: true,
                ..Default::default()
            },
        ),
        (
            Prompt::parse("colours:", vec![]).unwrap(),
            GenerateParams {
                constraint: Some(repeat.compile().unwrap()),
                ..greedy(24)
            },
        ),
        (
            Prompt::parse("json:", vec![]).unwrap(),
            GenerateParams {
                constraint: Some(keyed_schema().compile().unwrap()),
                ..greedy(40)
            },
        ),
    ]
}

/// `greedy`'s prompt with a stop string: the text of its answer's 10th–11th tokens, wherever
/// that ends a speculative call.
fn stop_case(plain: &mut Package, greedy: &(Prompt, GenerateParams)) -> (Prompt, GenerateParams) {
    let answer = alone(plain, &greedy.0, &greedy.1);
    let stop = plain.tokenizer.decode(&answer.tokens[9..11]).unwrap();
    assert!(!stop.trim().is_empty(), "{stop:?}");
    let params = GenerateParams {
        stop: vec![stop],
        ..greedy.1.clone()
    };
    (greedy.0.clone(), params)
}

/// A JSON Schema whose long keys the grammar forces once their first character is out.
fn keyed_schema() -> kosmos_rt::grammar::Constraint {
    let schema = r#"{"type": "object", "properties": {
        "description_of_the_picture": {"enum": ["a red circle", "a blue square"]},
        "number_of_shapes_in_the_picture": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["description_of_the_picture", "number_of_shapes_in_the_picture"]}"#;
    kosmos_rt::grammar::Constraint::JsonSchema(kosmos_rt::grammar::Json::parse(schema).unwrap())
}

/// Speculative decoding in `Package::generate` gives what plain generation gives, token for
/// token and text for text (streamed too), greedy, sampled and constrained, with a stop string
/// met inside a call's kept guesses; it really keeps guesses (fewer decoder calls than tokens;
/// under a JSON Schema, the keys the grammar forces), and each greedy token is the most likely
/// under the trainer's full forward in tch.
#[test]
fn speculative_generation_equals_plain_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut plain = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let mut spec = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    spec.set_speculation(Some(speculation(4))).unwrap();
    let mut cases = speculative_cases();
    cases.push(stop_case(&mut plain, &cases[0]));
    let greedy_text = alone(&mut plain, &cases[0].0, &cases[0].1);
    let (mut kept, mut calls, mut tokens) = (0, 0, 0);
    // (fed, kept) over the cases, with a fixed number of guesses and with the adaptive one.
    let mut fed = [(0, 0); 2];
    let adaptive = Speculation {
        schedule: GuessSchedule::Adaptive,
        ..speculation(4)
    };
    let runs = cases.iter().enumerate().flat_map(|c| [(c, false), (c, true)]);
    for ((i, (prompt, params)), adapt) in runs {
        let setting = if adapt { adaptive.clone() } else { speculation(4) };
        spec.set_speculation(Some(setting)).unwrap();
        let i = if adapt { i + 100 } else { i };
        let want = alone(&mut plain, prompt, params);
        let mut streamed = String::new();
        let got = spec
            .generate(
                &mut VisionCache::new(0),
                std::slice::from_ref(prompt),
                params,
                &mut |_, t| {
                    streamed.push_str(t);
                    true
                },
            )
            .unwrap()
            .remove(0);
        assert_eq!(got.tokens, want.tokens, "case {i}: tokens");
        assert_eq!(got.text, want.text, "case {i}: text");
        assert_eq!(streamed, want.text, "case {i}: streamed text");
        assert_eq!(got.finish_reason, want.finish_reason, "case {i}");
        assert!(got.timings.accepted <= got.timings.drafted, "case {i}");
        fed[usize::from(adapt)].0 += got.timings.drafted;
        fed[usize::from(adapt)].1 += got.timings.accepted;
        if adapt {
            continue;
        }
        kept += got.timings.accepted;
        calls += got.timings.decode_ms.len();
        tokens += got.tokens.len();
        if i == 3 {
            // The schema's keys are spelled as guesses and kept (the model may only follow them).
            assert!(
                got.timings.accepted >= 20,
                "{:?}: {} kept",
                got.text,
                got.timings.accepted
            );
        }
        if i == 4 {
            assert_eq!(got.finish_reason, FinishReason::Stop, "the stop string ends it");
            assert!(got.tokens.len() < 24, "{}", got.tokens.len());
        }
    }
    assert!(kept > 0, "no guess kept");
    // Adapting, fewer guesses are fed where they miss, and about as many kept.
    let [(fixed_fed, fixed_kept), (adapted_fed, adapted_kept)] = fed;
    assert!(
        adapted_fed < fixed_fed,
        "{adapted_fed} fed adapting, {fixed_fed} not"
    );
    assert!(
        2 * adapted_kept >= fixed_kept,
        "{adapted_kept} kept adapting, {fixed_kept} not"
    );
    spec.set_speculation(Some(speculation(4))).unwrap();
    // Forced text is spelled with the vocabulary's tokens, longest first, back to the same text.
    let text = r#"description_of_the_picture": "a red circle"#;
    let spelled = plain.constraint_vocab().spell(text.as_bytes(), 64);
    assert_eq!(plain.tokenizer.decode(&spelled).unwrap(), text);
    assert!(spelled.len() < text.len(), "{spelled:?}: one token per byte");
    assert_eq!(plain.constraint_vocab().spell(text.as_bytes(), 3).len(), 3);
    assert!(
        calls + cases.len() < tokens,
        "{calls} decode calls for {tokens} tokens"
    );

    // Independent of both: the greedy tokens are the trainer's most likely ones.
    let (prompt, _) = &cases[0];
    let a = plain.assemble(prompt).unwrap();
    let mut ids: Vec<i64> = a.input_ids.iter().map(|&t| t as i64).collect();
    ids.extend(greedy_text.tokens.iter().map(|&t| t as i64));
    let mut image_mask = a.image_mask.clone();
    image_mask.resize(ids.len(), false);
    let pixels = plain.preprocess(&prompt.images[0]).unwrap();
    let logp = trainer_log_softmax(&ckpt, &ids, &image_mask, &pixels);
    for (j, &tok) in greedy_text.tokens.iter().enumerate() {
        let row = logp.get(0).get((a.len() - 1 + j) as i64);
        let best = row.max().double_value(&[]);
        let chosen = row.double_value(&[tok as i64]);
        assert!(chosen >= best - 1e-4, "token {j}: {chosen} vs the best {best}");
    }

    // Several prompts at once, and a package that cannot forget guessed slots: clear errors.
    let two = [cases[0].0.clone(), cases[1].0.clone()];
    let e = spec
        .generate(&mut VisionCache::new(0), &two, &greedy(4), &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("one prompt at a time"), "{e}");
    let beams = GenerateParams {
        beams: 3,
        ..greedy(4)
    };
    let e = spec
        .generate(&mut VisionCache::new(0), &two[..1], &beams, &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("beam search with speculative decoding"), "{e}");
    let (_, concat) = kosmos_e2e::tiny_package(&dir.path().join("concat"), 7);
    let mut concat = Package::open(&concat, &SessionOptions::default()).unwrap();
    let e = concat
        .set_speculation(Some(speculation(4)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--kv-cache buffer"), "{e}");
}

/// The engine speculating for several running sequences (one admitted while the others decode,
/// prefilled in 7-token chunks, two waiting for a row; greedy, sampled, constrained, ended by a
/// stop string; a fixed and an adaptive number of guesses) gives what `Package::generate` gives
/// each alone; every reported log-probability is tch's on the trainer's full forward, so the
/// logits of each guessed position are right; guesses are kept (the metrics count them); with
/// more rows than its limit it does not speculate; and the prefix cache afterwards holds exactly
/// the prompt and the tokens fed back (a next turn reusing them scores as the trainer does).
#[test]
fn the_engine_speculating_generates_what_each_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let mut plain = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    let mut cases = speculative_cases();
    cases.push(stop_case(&mut plain, &cases[0]));
    let want: Vec<Generation> = cases
        .iter()
        .map(|(p, params)| alone(&mut plain, p, params))
        .collect();
    for (limit, adaptive) in [(4, false), (4, true), (2, false)] {
        // Speculating, the first three (the same length: 24 tokens, `</s>` ignored) run together
        // beside nothing else; otherwise all five, three rows at a time.
        let cases = if limit == 4 { &cases[..] } else { &cases[..3] };
        let mut pkg = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
        let schedule = match adaptive {
            true => GuessSchedule::Adaptive,
            false => GuessSchedule::Fixed,
        };
        let setting = Speculation {
            schedule,
            ..speculation(limit)
        };
        pkg.set_speculation(Some(setting)).unwrap();
        let metrics = Arc::new(Metrics::default());
        let config = EngineConfig {
            max_batch: 3,
            prefill_chunk: 7,
            ..Default::default()
        };
        let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
        let mut outs = Vec::new();
        for (i, (prompt, params)) in cases.iter().enumerate() {
            let (mut req, out, _) = request(engine.package(), prompt, params);
            req.logprobs = Some(2);
            engine.submit(req);
            outs.push(out);
            // Speculating, the third comes while two decode (the others wait for a row);
            // otherwise all three run together, so no fewer than three rows ever decode.
            if i == 1 && limit == 4 {
                for _ in 0..4 {
                    engine.step();
                }
            }
        }
        while !engine.is_idle() {
            engine.step();
        }
        let case = format!("speculating up to batch {limit}, adaptive {adaptive}");
        for (i, ((prompt, _), want)) in cases.iter().zip(&want).enumerate() {
            let c = outs[i].lock().unwrap();
            let done = c
                .done
                .as_ref()
                .unwrap_or_else(|| panic!("{case}: #{i} did not finish"));
            assert_eq!(done.tokens, want.tokens, "{case}: #{i} tokens vs generate()");
            assert_eq!(c.text, want.text, "{case}: #{i} streamed text");
            let what = format!("{case}: #{i}");
            assert_logprobs_are_the_trainers(&ckpt, &engine, prompt, &[], &done.tokens, &c.logprobs, &what);
        }
        let drafted = metrics.spec_draft_tokens.load(Ordering::Relaxed);
        let accepted = metrics.spec_accepted_tokens.load(Ordering::Relaxed);
        if limit == 4 {
            assert!(
                accepted > 0 && accepted <= drafted,
                "{case}: {accepted} of {drafted}"
            );
            // The next turn of the greedy sequence: its prompt and every token fed back (all
            // but the last) come from the prefix cache; guessed slots it did not keep do not.
            let tokens = want[0].tokens.clone();
            let (out, len) = next_turn(&mut engine, &cases[0].0, &tokens, &greedy(6));
            let c = out.lock().unwrap();
            let done = c.done.as_ref().unwrap();
            assert_eq!(
                done.cached_tokens,
                len - 1,
                "{case}: the next turn's cached tokens"
            );
            let what = format!("{case}: the next turn");
            let prompt = &cases[0].0;
            assert_logprobs_are_the_trainers(
                &ckpt,
                &engine,
                prompt,
                &tokens,
                &done.tokens,
                &c.logprobs,
                &what,
            );
        } else {
            assert_eq!(drafted, 0, "{case}: three rows, none guessed");
        }
    }
}

/// `GuessSchedule::Auto` adapts on a quantised package (whose decoder calls cost more per
/// position on a CPU) and stays fixed on fp32; an int8 package speculating still generates what
/// it does plainly.
#[test]
fn the_auto_schedule_follows_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg_dir) = kosmos_e2e::tiny_buffer_package(dir.path(), 7);
    let auto = Speculation::default();
    assert_eq!(auto.schedule, GuessSchedule::Auto);
    let mut fp32 = Package::open(&pkg_dir, &SessionOptions::default()).unwrap();
    fp32.set_speculation(Some(auto.clone())).unwrap();
    assert_eq!(fp32.speculation().unwrap().schedule, GuessSchedule::Fixed);
    let int8 = dir.path().join("pkg-int8");
    let opts = kosmos_export::ExportOptions {
        kv_cache: kosmos_models::package::KvCacheLayout::Buffer,
        quantization: Some(kosmos_models::package::Quantization {
            bits: 8,
            block_size: 32,
            accuracy_level: 4,
        }),
        ..Default::default()
    };
    kosmos_export::export(&ckpt, &int8, &opts).unwrap();
    let mut plain = Package::open(&int8, &SessionOptions::default()).unwrap();
    let mut spec = Package::open(&int8, &SessionOptions::default()).unwrap();
    spec.set_speculation(Some(auto)).unwrap();
    assert_eq!(spec.speculation().unwrap().schedule, GuessSchedule::Adaptive);
    let mut kept = 0;
    for (i, (prompt, params)) in speculative_cases().iter().enumerate() {
        let want = alone(&mut plain, prompt, params);
        let got = alone(&mut spec, prompt, params);
        assert_eq!(got.tokens, want.tokens, "case {i}");
        kept += got.timings.accepted;
    }
    assert!(kept > 0);
}

/// A buffer-layout package of a random checkpoint of `config` (seed `seed`) in `dir`.
fn package_of(config: &kosmos_models::KosmosConfig, seed: i64, dir: &Path) -> std::path::PathBuf {
    let ckpt = kosmos_e2e::checkpoint(config, seed, &dir.join("ckpt"));
    let pkg = dir.join("pkg");
    kosmos_e2e::export_package(
        &ckpt,
        &pkg,
        kosmos_export::Profile::Portable,
        kosmos_models::package::PackageDtype::Fp32,
        kosmos_models::package::KvCacheLayout::Buffer,
    );
    pkg
}

fn with_draft(target: &Path, draft: &Path, p_min: f32) -> Package {
    let mut pkg = Package::open(target, &SessionOptions::default()).unwrap();
    pkg.set_speculation(Some(speculation(4))).unwrap();
    let draft = Package::open(draft, &SessionOptions::default()).unwrap();
    pkg.set_draft(Some(kosmos_rt::Draft::new(draft, p_min).unwrap()))
        .unwrap();
    pkg
}

/// The draft's rows follow their sequences when rows move: three greedy sequences of different
/// lengths with the target as its own draft, the first preempted by a more urgent one (the
/// last row moves into its place) and resumed, rows retiring out of order. Each generates what
/// it would alone, and every guess is kept: a draft row left behind would guess for another
/// sequence's text.
#[test]
fn draft_rows_follow_their_sequences_through_preemption_and_retirement() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = kosmos_e2e::tiny_buffer_package(&dir.path().join("target"), 7);
    let mut plain = Package::open(&target, &SessionOptions::default()).unwrap();
    let image = vec![ImageInput::Bytes(png(3))];
    let seqs = [
        // (prompt, params, priority)
        (
            Prompt::parse("Question: what colour is the circle? Answer:", image).unwrap(),
            greedy(40),
            9,
        ),
        (
            Prompt::parse("a red circle on the left and", vec![]).unwrap(),
            greedy(32),
            5,
        ),
        (Prompt::parse("colours: red blue", vec![]).unwrap(), greedy(24), 5),
        (Prompt::parse("green", vec![]).unwrap(), greedy(4), 0),
    ];
    let want: Vec<Vec<u32>> = seqs
        .iter()
        .map(|(p, params, _)| alone(&mut plain, p, params).tokens)
        .collect();
    let metrics = Arc::new(Metrics::default());
    // Prompts (the model's and the draft's reading of them) in chunks of 7 tokens: the image's
    // slots span chunks. Both pools allocated up front.
    let config = EngineConfig {
        max_batch: 3,
        prefill_chunk: 7,
        kv_preallocate: true,
        ..Default::default()
    };
    let mut engine = Engine::new(with_draft(&target, &target, 0.0), config, metrics.clone()).unwrap();
    let mut outs = Vec::new();
    for (i, (prompt, params, priority)) in seqs.iter().enumerate() {
        // The least urgent sequence first, alone in row 0; a few tokens later, with every row
        // taken, the urgent one takes its row and the last row moves into it.
        if i == 1 || i == 3 {
            for _ in 0..2 {
                engine.step();
            }
        }
        let (mut req, out, _) = request(engine.package(), prompt, params);
        req.priority = *priority;
        engine.submit(req);
        outs.push(out);
    }
    while !engine.is_idle() {
        engine.step();
    }
    for (i, want) in want.iter().enumerate() {
        let c = outs[i].lock().unwrap();
        let done = c.done.as_ref().unwrap_or_else(|| panic!("#{i} did not finish"));
        assert_eq!(&done.tokens, want, "#{i} tokens vs generate()");
    }
    assert_eq!(metrics.preemptions.load(Ordering::Relaxed), 1);
    let drafted = metrics.spec_draft_tokens.load(Ordering::Relaxed);
    let accepted = metrics.spec_accepted_tokens.load(Ordering::Relaxed);
    assert!(drafted >= 20 && accepted == drafted, "{accepted} of {drafted}");
}

/// Speculation with a draft model gives what plain generation gives, token for token and text
/// for text (streamed too): greedy, sampled, constrained (the grammar's forced text and the
/// draft's guesses mixed), ended by a stop string. A draft that is the target itself has every
/// greedy guess kept; a smaller model of its own (other layers, widths and image slots: its
/// cache and the target's are kept in step by position, not by slot) has some kept and some
/// refused; `p_min` 1 stops all guessing. A draft with another vocabulary, one without the
/// buffer layout, and a probability out of range are refused, naming why.
#[test]
fn draft_model_speculation_equals_plain_generation() {
    let dir = tempfile::tempdir().unwrap();
    let DraftFixture {
        target,
        small,
        cases,
        want,
    } = draft_fixture(dir.path());
    // (drafted, kept) per draft.
    let mut counts = Vec::new();
    for (name, draft, p_min) in [
        ("itself", &target, 0.0),
        ("small", &small, 0.0),
        ("unsure", &small, 1.0),
    ] {
        let mut spec = with_draft(&target, draft, p_min);
        let (mut drafted, mut kept) = (0, 0);
        for (i, ((prompt, params), want)) in cases.iter().zip(&want).enumerate() {
            let mut streamed = String::new();
            let got = spec
                .generate(
                    &mut VisionCache::new(0),
                    std::slice::from_ref(prompt),
                    params,
                    &mut |_, t| {
                        streamed.push_str(t);
                        true
                    },
                )
                .unwrap()
                .remove(0);
            assert_eq!(got.tokens, want.tokens, "{name}, case {i}: tokens");
            assert_eq!(got.text, want.text, "{name}, case {i}: text");
            assert_eq!(streamed, want.text, "{name}, case {i}: streamed");
            assert_eq!(got.finish_reason, want.finish_reason, "{name}, case {i}");
            assert!(got.timings.accepted <= got.timings.drafted, "{name}, case {i}");
            if name == "unsure" && params.constraint.is_none() {
                // Never sure enough, it guesses nothing (only a grammar's forced text is fed).
                assert_eq!(got.timings.drafted, 0, "case {i}");
            }
            if name == "itself" && i == 0 {
                // Greedy, unconstrained: the target picks what it guessed, every time.
                assert!(got.timings.drafted >= 10, "{:?}", got.timings);
                assert_eq!(got.timings.accepted, got.timings.drafted, "{:?}", got.timings);
                assert!(got.timings.draft_ms > 0.0);
            }
            drafted += got.timings.drafted;
            kept += got.timings.accepted;
        }
        counts.push((drafted, kept));
    }
    let [_, (small_fed, small_kept), _] = counts[..] else {
        unreachable!()
    };
    assert!(
        small_kept > 0 && small_kept < small_fed,
        "small draft: {small_kept} of {small_fed} kept"
    );

    // Refusals.
    let mut other_vocab = kosmos_models::KosmosConfig::tiny();
    other_vocab.decoder.vocab_size = 384;
    let other_vocab = package_of(&other_vocab, 3, &dir.path().join("vocab"));
    let mut pkg = Package::open(&target, &SessionOptions::default()).unwrap();
    let draft = kosmos_rt::Draft::new(
        Package::open(&other_vocab, &SessionOptions::default()).unwrap(),
        0.5,
    )
    .unwrap();
    let e = pkg.set_draft(Some(draft)).unwrap_err().to_string();
    assert!(
        e.contains("vocabulary") && e.contains("512 entries against 384"),
        "{e}"
    );
    let (_, concat) = kosmos_e2e::tiny_package(&dir.path().join("concat"), 7);
    let concat = Package::open(&concat, &SessionOptions::default()).unwrap();
    let e = kosmos_rt::Draft::new(concat, 0.5).unwrap_err().to_string();
    assert!(e.contains("--kv-cache buffer"), "{e}");
    let small_pkg = Package::open(&small, &SessionOptions::default()).unwrap();
    let e = kosmos_rt::Draft::new(small_pkg, 1.5).unwrap_err().to_string();
    assert!(e.contains("minimum probability") && e.contains("1.5"), "{e}");
}

/// The draft tests' target package and a smaller draft for it, in `dir`; the speculative
/// cases (with the stop-string one) and what plain generation makes of each.
struct DraftFixture {
    target: std::path::PathBuf,
    small: std::path::PathBuf,
    cases: Vec<(Prompt, GenerateParams)>,
    want: Vec<Generation>,
}

fn draft_fixture(dir: &Path) -> DraftFixture {
    let (_, target) = kosmos_e2e::tiny_buffer_package(&dir.join("target"), 7);
    let small = package_of(&small_draft_config(), 3, &dir.join("small"));
    let mut plain = Package::open(&target, &SessionOptions::default()).unwrap();
    let mut cases = speculative_cases();
    cases.push(stop_case(&mut plain, &cases[0]));
    let want = cases
        .iter()
        .map(|(p, params)| alone(&mut plain, p, params))
        .collect();
    DraftFixture {
        target,
        small,
        cases,
        want,
    }
}

/// A draft smaller than the tiny preset in every part, with half its image slots.
fn small_draft_config() -> kosmos_models::KosmosConfig {
    let mut small = kosmos_models::KosmosConfig::tiny();
    small.vision.num_hidden_layers = 2;
    small.resampler.num_latents = 8;
    small.resampler.depth = 1;
    small.decoder.decoder_layers = 2;
    small.decoder.decoder_embed_dim = 128;
    small.decoder.decoder_ffn_embed_dim = 512;
    small
}

/// The batching engine with a draft model (the target itself, and a smaller model with half
/// the image slots; sequences admitted while others decode, prefilled in 7-token chunks, two
/// waiting for a row, then decoding beside more rows than speculation's limit so the draft
/// falls behind and catches up) gives what `Package::generate` gives each alone, with guesses
/// kept; a draft whose vision tower takes other images than the model's is refused, naming
/// both sizes (requests come preprocessed for the model).
#[test]
fn the_engine_with_a_draft_model_generates_what_each_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let DraftFixture {
        target,
        small,
        cases,
        want,
    } = draft_fixture(dir.path());
    for (name, draft) in [("itself", &target), ("small", &small)] {
        let metrics = Arc::new(Metrics::default());
        let config = EngineConfig {
            max_batch: 3,
            prefill_chunk: 7,
            ..Default::default()
        };
        // Speculation's limit is 2 rows: with three running, nobody guesses.
        let mut pkg = with_draft(&target, draft, 0.0);
        pkg.set_speculation(Some(speculation(2))).unwrap();
        let mut engine = Engine::new(pkg, config, metrics.clone()).unwrap();
        let mut outs = Vec::new();
        for (i, (prompt, params)) in cases.iter().enumerate() {
            let (req, out, _) = request(engine.package(), prompt, params);
            engine.submit(req);
            outs.push(out);
            if i == 0 {
                for _ in 0..6 {
                    engine.step();
                }
            }
        }
        while !engine.is_idle() {
            engine.step();
        }
        for (i, want) in want.iter().enumerate() {
            let c = outs[i].lock().unwrap();
            let done = c
                .done
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: #{i} did not finish: {:?}", c.failed));
            assert_eq!(done.tokens, want.tokens, "{name}: #{i} tokens vs generate()");
            assert_eq!(c.text, want.text, "{name}: #{i} streamed text");
        }
        let drafted = metrics.spec_draft_tokens.load(Ordering::Relaxed);
        let accepted = metrics.spec_accepted_tokens.load(Ordering::Relaxed);
        assert!(
            accepted > 0 && accepted <= drafted,
            "{name}: {accepted} of {drafted}"
        );
    }

    // With itself as the draft, greedy sequences keep every guess: the draft's rows follow
    // what the engine keeps. Two decoding together (the image question, and the text prompt
    // made greedy) share the draft's calls: fewer than the two make alone, with the same
    // guesses.
    let text_greedy = GenerateParams {
        max_tokens: cases[1].1.max_tokens,
        ..Default::default()
    };
    let mut plain = Package::open(&target, &SessionOptions::default()).unwrap();
    let greedy = [
        (cases[0].clone(), want[0].tokens.clone()),
        (
            (cases[1].0.clone(), text_greedy.clone()),
            alone(&mut plain, &cases[1].0, &text_greedy).tokens,
        ),
    ];
    let with_itself = |which: &[usize]| {
        let metrics = Arc::new(Metrics::default());
        let mut engine = Engine::new(
            with_draft(&target, &target, 0.0),
            EngineConfig::default(),
            metrics.clone(),
        )
        .unwrap();
        let outs: Vec<_> = which
            .iter()
            .map(|&i| {
                let ((prompt, params), _) = &greedy[i];
                let (req, out, _) = request(engine.package(), prompt, params);
                engine.submit(req);
                out
            })
            .collect();
        while !engine.is_idle() {
            engine.step();
        }
        for (&i, out) in which.iter().zip(&outs) {
            let tokens = out.lock().unwrap().done.as_ref().unwrap().tokens.clone();
            assert_eq!(tokens, greedy[i].1, "#{i} with {which:?}");
        }
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (drafted, accepted) = (
            load(&metrics.spec_draft_tokens),
            load(&metrics.spec_accepted_tokens),
        );
        assert!(
            drafted >= 10 && accepted == drafted,
            "{which:?}: {accepted} of {drafted}"
        );
        (drafted, load(&metrics.spec_draft_model_calls))
    };
    let each: Vec<(u64, u64)> = [0, 1].iter().map(|&i| with_itself(&[i])).collect();
    let (drafted, calls) = with_itself(&[0, 1]);
    assert_eq!(
        drafted,
        each[0].0 + each[1].0,
        "the same guesses together as alone"
    );
    assert!(
        calls < each[0].1 + each[1].1,
        "{calls} draft calls together against {} + {} alone",
        each[0].1,
        each[1].1
    );

    let mut other_eye = kosmos_models::KosmosConfig::tiny();
    other_eye.vision.image_size = 16;
    let other_eye = package_of(&other_eye, 3, &dir.path().join("eye"));
    // One prompt at a time, the draft preprocesses the images for itself.
    let mut spec = with_draft(&target, &other_eye, 0.0);
    for (i, ((prompt, params), want)) in cases.iter().zip(&want).enumerate().take(2) {
        assert_eq!(alone(&mut spec, prompt, params).tokens, want.tokens, "case {i}");
    }
    let e = Engine::new(spec, EngineConfig::default(), Arc::new(Metrics::default()))
        .err()
        .expect("the engine refuses a draft with other images")
        .to_string();
    assert!(e.contains("16 px") && e.contains("32 px"), "{e}");
}
