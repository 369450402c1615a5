//! The continuous-batching engine through the C ABI (`kosmos_engine_*`), after TensorRT-LLM's
//! executor: requests from any thread are queued and decoded together by one engine thread,
//! which reports each request's text, then exactly one final event, to the request's callback.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;

use kosmos_models::KosmosTokenizer;
use kosmos_models::sequence::Assembled;

use super::{
    CallSettings, Handles, KOSMOS_SPECULATE_AUTO, clear_out, fail, guard, guess_schedule, init_sized,
    kosmos_image, kosmos_params, kosmos_status, open_package, read_request, read_sized, status_of,
};
use crate::batch::{Engine, EngineConfig, SeqEvent, SeqFailure, SeqRequest};
use crate::draft::Draft;
use crate::error::RtError;
use crate::generate::{FinishReason, Prompt, assemble_prompt, preprocess_image};
use crate::logprobs::TokenLogprob;
use crate::metrics::Metrics;
use crate::speculate::Speculation;

/// Settings of a continuous-batching engine; start from `kosmos_engine_default_config()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kosmos_engine_config {
    /// `sizeof(struct kosmos_engine_config)` as the caller compiled it, set by
    /// `KOSMOS_ENGINE_CONFIG_INIT` (or `kosmos_engine_default_config()`).
    pub struct_size: u32,
    /// Sequences decoded together (rows of the KV pool, ≥ 1).
    pub max_batch: u32,
    /// Most prompt tokens one prefill call writes, so that running sequences keep taking tokens
    /// while a long prompt is read; 0 = each admitted group in one call.
    pub prefill_chunk: u32,
    /// Images whose embeddings are kept (an image seen again skips the vision tower).
    pub vision_cache: u32,
    /// Allocate the KV pool for max_batch x the whole context at open, so that no request ever
    /// waits for it to grow.
    pub kv_preallocate: bool,
    /// MiB of finished requests' keys and values kept so that a prompt starting the same way
    /// skips that part of its prefill; 0 = off.
    pub prefix_cache_mb: u32,
    /// A request with a lower `priority` takes the row of the least urgent running one when
    /// every row is taken; that one resumes later where it was, its output unchanged. false:
    /// it waits for a free row instead. (Appended after ABI 1's first release: a caller
    /// compiled before it gets the default, true.)
    pub priority_preemption: bool,
    /// Speculative decoding by prompt lookup: up to this many guessed tokens fed per decoder
    /// call (what followed the latest earlier occurrence of a sequence's last n tokens), kept
    /// where the sampler picks them too, so the output does not change; 0 = off. (This and the
    /// three below were appended after `priority_preemption`.)
    pub speculative_tokens: u32,
    /// The longest and shortest n-gram looked up (defaults 3 and 1).
    pub prompt_lookup_max: u32,
    pub prompt_lookup_min: u32,
    /// Speculate only while at most this many sequences decode together (default 4).
    pub speculative_max_batch: u32,
    /// How many guesses each call feeds: `KOSMOS_SPECULATE_AUTO` (default: adaptive for int4 /
    /// int8 packages, fixed otherwise), `KOSMOS_SPECULATE_FIXED` or `KOSMOS_SPECULATE_ADAPTIVE`.
    pub speculative_schedule: u32,
    /// A draft model that makes the guesses instead of prompt lookup: the directory of a
    /// smaller `--kv-cache buffer` package with the same tokenizer and image size, opened on the
    /// engine's device; NULL = none. With a draft, `speculative_tokens` 0 means 4. (This and
    /// `draft_p_min` were appended after `speculative_schedule`.)
    pub draft_package: *const c_char,
    /// The draft stops guessing at a token it gives less than this probability (default 0.75,
    /// llama.cpp's `--draft-p-min`).
    pub draft_p_min: f32,
}

/// Bytes of the first `kosmos_engine_config` with `struct_size` (ABI 1): it ended before
/// `priority_preemption`.
const CONFIG_MIN_SIZE: usize = std::mem::offset_of!(kosmos_engine_config, priority_preemption);

/// Fill `*config` with the defaults for a caller whose `struct kosmos_engine_config` is
/// `struct_size` bytes; `KOSMOS_ENGINE_CONFIG_INIT(&config)` passes its `sizeof`.
///
/// # Safety
/// `config` is NULL or points to `struct_size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_engine_config_init(
    config: *mut kosmos_engine_config,
    struct_size: usize,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        unsafe {
            init_sized(
                config,
                struct_size,
                kosmos_engine_default_config(),
                CONFIG_MIN_SIZE,
                "config",
            )
        }
    })
}

/// What a `kosmos_event` reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kosmos_event_kind {
    /// New generated text (stop strings held back until they cannot match).
    KOSMOS_EVENT_TEXT = 0,
    /// The request ended; `finish_reason` says why and `text` is the whole generated text.
    KOSMOS_EVENT_DONE = 1,
    /// The request failed; `text` says why. Nothing follows.
    KOSMOS_EVENT_FAILED = 2,
}

/// Why a request ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kosmos_finish_reason {
    /// `</s>` or a stop string.
    KOSMOS_FINISH_STOP = 0,
    /// `max_tokens` were generated.
    KOSMOS_FINISH_LENGTH = 1,
    /// Cancelled: by `kosmos_engine_cancel`, by the callback returning false, or by
    /// `kosmos_engine_free`.
    KOSMOS_FINISH_CANCELLED = 2,
}

/// One event of a request, valid only during the callback that receives it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kosmos_event {
    /// The id `kosmos_engine_submit` gave the request.
    pub request: u64,
    pub kind: kosmos_event_kind,
    /// TEXT: the new text; DONE: the whole generated text; FAILED: the error message.
    pub text: *const c_char,
    /// DONE only.
    pub finish_reason: kosmos_finish_reason,
    /// DONE only: tokens of the prompt (image slots included) and generated.
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// DONE: the generated token ids (`generated_tokens` of them; NULL when none).
    pub tokens: *const u32,
    /// TEXT, when the request set `params.logprobs`: the tokens generated since the last TEXT
    /// event, in order (NULL when none). A token cut by a stop string still has its entry, in a
    /// last TEXT event whose text may be empty.
    pub logprobs: *const kosmos_token_logprob,
    pub n_logprobs: usize,
}

/// A generated token's log-probability and its most likely alternatives.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kosmos_token_logprob {
    pub token: u32,
    /// Natural log of its probability under the model: the log-softmax before temperature,
    /// top-k / top-p and penalties shape sampling (what OpenAI and vLLM report).
    pub logprob: f32,
    /// `params.logprobs` entries, most likely first (ties by id).
    pub top: *const kosmos_top_logprob,
    pub n_top: usize,
}

/// One alternative of a `kosmos_token_logprob`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kosmos_top_logprob {
    pub token: u32,
    pub logprob: f32,
}

/// Receives a request's events on the engine's thread; return false to cancel the request (its
/// DONE event still comes). It must return quickly (every running request waits for it), must
/// not throw, and must not call `kosmos_engine_free`.
pub type kosmos_event_callback =
    Option<extern "C" fn(event: *const kosmos_event, user_data: *mut c_void) -> bool>;

/// A continuous-batching engine over one package (opaque).
pub struct kosmos_engine {
    tx: Mutex<Option<Sender<Vec<SeqRequest>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
    tokenizer: KosmosTokenizer,
    image_size: u32,
    tokens_per_image: usize,
    context: usize,
    next_id: AtomicU64,
    /// Cancel flags of the requests whose final event has not been delivered yet.
    inflight: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>>,
}

static ENGINES: Handles = Handles::new();

impl kosmos_engine {
    /// `p`'s tokens and preprocessed images, if it fits the context with `max_tokens` more.
    fn prepare(&self, p: &Prompt, max_tokens: usize) -> Result<(Assembled, Vec<Vec<f32>>), RtError> {
        let pixels = p
            .images
            .iter()
            .map(|img| preprocess_image(img, self.image_size))
            .collect::<Result<Vec<_>, _>>()?;
        let assembled = assemble_prompt(&self.tokenizer, p, self.tokens_per_image)?;
        if assembled.len() + max_tokens > self.context {
            return Err(RtError::ContextOverflow {
                prompt: assembled.len(),
                max_new: max_tokens,
                context: self.context,
            });
        }
        Ok((assembled, pixels))
    }
}

/// The callback and its user data, moved to the engine's thread.
struct Callback {
    f: extern "C" fn(*const kosmos_event, *mut c_void) -> bool,
    user_data: *mut c_void,
}

// SAFETY: the caller promises (kosmos_engine_submit's contract) that `user_data` may be used
// from the engine's thread.
unsafe impl Send for Callback {}

impl Callback {
    fn call(&self, ev: &kosmos_event) -> bool {
        (self.f)(ev, self.user_data)
    }
}

/// `logprobs` as C structs: the alternatives of every token (one buffer), then the entries that
/// point into it. The first must outlive every use of the second.
fn c_logprobs(logprobs: &[TokenLogprob]) -> (Vec<kosmos_top_logprob>, Vec<kosmos_token_logprob>) {
    let tops: Vec<kosmos_top_logprob> = logprobs
        .iter()
        .flat_map(|l| &l.top)
        .map(|&(token, logprob)| kosmos_top_logprob { token, logprob })
        .collect();
    let mut at = 0;
    let entries = logprobs
        .iter()
        .map(|l| {
            let top = non_empty_ptr(&tops[at..at + l.top.len()]);
            at += l.top.len();
            kosmos_token_logprob {
                token: l.token,
                logprob: l.logprob,
                top,
                n_top: l.top.len(),
            }
        })
        .collect();
    (tops, entries)
}

/// The C convention for an array of `v.len()` elements: NULL when there are none.
fn non_empty_ptr<T>(v: &[T]) -> *const T {
    if v.is_empty() {
        std::ptr::null()
    } else {
        v.as_ptr()
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Default engine settings: the server's (8 rows, 512-token prefill chunks, 256 cached images,
/// a 512 MiB prefix cache).
#[unsafe(no_mangle)]
pub extern "C" fn kosmos_engine_default_config() -> kosmos_engine_config {
    let d = EngineConfig::default();
    let spec = Speculation::default();
    kosmos_engine_config {
        struct_size: size_of::<kosmos_engine_config>() as u32,
        max_batch: d.max_batch as u32,
        prefill_chunk: d.prefill_chunk as u32,
        vision_cache: d.vision_cache as u32,
        kv_preallocate: d.kv_preallocate,
        prefix_cache_mb: (d.prefix_cache_bytes >> 20) as u32,
        priority_preemption: d.priority_preemption,
        speculative_tokens: 0,
        prompt_lookup_max: spec.ngram_max as u32,
        prompt_lookup_min: spec.ngram_min as u32,
        speculative_max_batch: spec.max_batch as u32,
        speculative_schedule: KOSMOS_SPECULATE_AUTO,
        draft_package: std::ptr::null(),
        draft_p_min: crate::draft::default_p_min(),
    }
}

/// Open the package in `package_dir` on `device` ("cpu", "cuda", "tensorrt"; NULL = "cpu") and
/// start its engine thread. The package must have the buffer KV layout (`kosmos-export
/// --kv-cache buffer`). On success `*out` holds an engine to release with `kosmos_engine_free`.
///
/// # Safety
/// `package_dir` and `device` are NULL or NUL-terminated strings; `config` is NULL (defaults)
/// or valid, its `draft_package` NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_engine_open(
    package_dir: *const c_char,
    device: *const c_char,
    config: *const kosmos_engine_config,
    out: *mut *mut kosmos_engine,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        if let Err(s) = unsafe { clear_out(out, "out") } {
            return s;
        }
        let c = if config.is_null() {
            kosmos_engine_default_config()
        } else {
            // SAFETY: non-NULL and valid per the contract.
            match unsafe { read_sized(config, kosmos_engine_default_config(), CONFIG_MIN_SIZE, "config") } {
                Ok(c) => c,
                Err(s) => return s,
            }
        };
        if c.max_batch == 0 {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "config: max_batch must be ≥ 1",
            );
        }
        let schedule = match guess_schedule(c.speculative_schedule) {
            Ok(s) => s,
            Err(s) => return s,
        };
        let drafting = !c.draft_package.is_null();
        let speculation = (c.speculative_tokens > 0 || drafting).then_some(Speculation {
            tokens: match c.speculative_tokens {
                0 => Speculation::default().tokens,
                k => k as usize,
            },
            ngram_max: c.prompt_lookup_max as usize,
            ngram_min: c.prompt_lookup_min as usize,
            max_batch: c.speculative_max_batch as usize,
            schedule,
        });
        if let Some(Err(m)) = speculation.as_ref().map(Speculation::check) {
            return fail(kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT, format!("config: {m}"));
        }
        if let (true, Err(m)) = (drafting, crate::draft::check_p_min(c.draft_p_min)) {
            return fail(kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT, format!("config: {m}"));
        }
        // SAFETY: per this function's contract.
        let mut pkg = match unsafe { open_package(package_dir, device, drafting) } {
            Ok(p) => p,
            Err(s) => return s,
        };
        if let Err(e) = pkg.set_speculation(speculation) {
            return fail(status_of(&e), e.to_string());
        }
        if drafting {
            // SAFETY: per this function's contract (the config's strings are valid).
            let draft = match unsafe { open_package(c.draft_package, device, true) } {
                Ok(p) => p,
                Err(s) => return s,
            };
            let set = Draft::new(draft, c.draft_p_min).and_then(|d| pkg.set_draft(Some(d)));
            if let Err(e) = set {
                return fail(status_of(&e), e.to_string());
            }
        }
        let (tokenizer, manifest) = (pkg.tokenizer.clone(), pkg.manifest.clone());
        let config = EngineConfig {
            max_batch: c.max_batch as usize,
            vision_cache: c.vision_cache as usize,
            prefill_chunk: c.prefill_chunk as usize,
            kv_preallocate: c.kv_preallocate,
            prefix_cache_bytes: (c.prefix_cache_mb as usize) << 20,
            priority_preemption: c.priority_preemption,
        };
        let engine = match Engine::new(pkg, config, Arc::new(Metrics::default())) {
            Ok(e) => e,
            Err(e) => return fail(status_of(&e), e.to_string()),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = match std::thread::Builder::new()
            .name("kosmos-engine".into())
            .spawn(move || engine.run(rx))
        {
            Ok(t) => t,
            Err(e) => {
                return fail(
                    kosmos_status::KOSMOS_ERR_RUNTIME,
                    format!("cannot start the engine thread: {e}"),
                );
            }
        };
        let engine = kosmos_engine {
            tx: Mutex::new(Some(tx)),
            thread_id: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
            tokenizer,
            image_size: manifest.preprocess.image_size as u32,
            tokens_per_image: manifest.vision.tokens_per_image,
            context: manifest.decoder.context_length,
            next_id: AtomicU64::new(1),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        };
        // SAFETY: `out` was checked non-NULL above.
        unsafe { ENGINES.publish(engine, out) }
    })
}

/// Queue a request: `prompt` and `images` as for `kosmos_generate` (images are decoded and
/// preprocessed here, on the calling thread), `params` as there but with one beam and optional
/// log-probabilities (`params.logprobs`, reported in the TEXT events). Its events
/// go to `callback` with `user_data`, on the engine's thread, possibly before this returns; the
/// last is always one DONE or FAILED. On success `*out_request` (if not NULL) holds its id.
///
/// # Safety
/// `engine` is a handle from `kosmos_engine_open` (or NULL); `prompt` a NUL-terminated string;
/// `images` points to `n_images` valid `kosmos_image`s (or is NULL with `n_images` 0); `params`
/// is NULL (defaults) or valid, with `n_stop` strings at `stop`; `user_data` may be used from
/// another thread until the final
/// event; `out_request` is NULL or writable.
#[allow(clippy::too_many_arguments)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_engine_submit(
    engine: *mut kosmos_engine,
    prompt: *const c_char,
    images: *const kosmos_image,
    n_images: usize,
    params: *const kosmos_params,
    callback: kosmos_event_callback,
    user_data: *mut c_void,
    out_request: *mut u64,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let engine = match unsafe { ENGINES.get(engine, "engine") } {
            Ok(e) => e,
            Err(s) => return s,
        };
        let Some(f) = callback else {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "callback is NULL: it is how a request's text and end are reported",
            );
        };
        // SAFETY: per this function's contract.
        let (
            prompt,
            CallSettings {
                params,
                logprobs,
                priority,
            },
        ) = match unsafe { read_request(prompt, images, n_images, params, &engine.tokenizer) } {
            Ok(r) => r,
            Err(s) => return s,
        };
        if params.beams > 1 {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "params: the engine decodes one sequence per request (beams = 1); beam search runs through kosmos_generate",
            );
        }
        let prepared = engine.prepare(&prompt, params.max_tokens);
        let (assembled, pixels) = match prepared {
            Ok(p) => p,
            Err(e) => return fail(status_of(&e), e.to_string()),
        };

        let id = engine.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let cb = Callback { f, user_data };
        let inflight = engine.inflight.clone();
        let sink = move |ev: SeqEvent| -> bool {
            let (kind, text, finish, prompt_tokens, generated) = match &ev {
                SeqEvent::Text { text, .. } => (
                    kosmos_event_kind::KOSMOS_EVENT_TEXT,
                    text.as_str(),
                    None,
                    0,
                    &[][..],
                ),
                SeqEvent::Done(s) => (
                    kosmos_event_kind::KOSMOS_EVENT_DONE,
                    s.text.as_str(),
                    Some(s.finish_reason),
                    s.prompt_tokens,
                    &s.tokens[..],
                ),
                SeqEvent::Failed(f) => (
                    kosmos_event_kind::KOSMOS_EVENT_FAILED,
                    match f {
                        SeqFailure::Timeout => "the request timed out",
                        SeqFailure::Engine(m) => m.as_str(),
                    },
                    None,
                    0,
                    &[][..],
                ),
                SeqEvent::PromptLogprobs(_) => return true,
            };
            let text = c_string(text);
            // Kept alive until the callback returns: the event points into them.
            let (tops, logprobs) = match &ev {
                SeqEvent::Text { logprobs, .. } => c_logprobs(logprobs),
                _ => (Vec::new(), Vec::new()),
            };
            let event = kosmos_event {
                request: id,
                kind,
                text: text.as_ptr(),
                finish_reason: match finish {
                    Some(FinishReason::Stop) | None => kosmos_finish_reason::KOSMOS_FINISH_STOP,
                    Some(FinishReason::Length) => kosmos_finish_reason::KOSMOS_FINISH_LENGTH,
                    Some(FinishReason::Cancelled) => kosmos_finish_reason::KOSMOS_FINISH_CANCELLED,
                },
                prompt_tokens: prompt_tokens as u32,
                generated_tokens: generated.len() as u32,
                tokens: non_empty_ptr(generated),
                logprobs: non_empty_ptr(&logprobs),
                n_logprobs: logprobs.len(),
            };
            if kind != kosmos_event_kind::KOSMOS_EVENT_TEXT {
                // Final: a later kosmos_engine_cancel of this id is a no-op.
                inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            let keep_going = cb.call(&event);
            drop(tops);
            keep_going
        };
        let req = SeqRequest {
            assembled,
            pixels,
            params,
            logprobs,
            prompt_logprobs: None,
            priority,
            arrived: Instant::now(),
            deadline: None,
            cancel: cancel.clone(),
            sink: Box::new(sink),
        };
        engine
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, cancel);
        if !out_request.is_null() {
            // SAFETY: non-NULL and writable per the contract.
            unsafe { *out_request = id };
        }
        let sent = match &*engine.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(vec![req]).is_ok(),
            None => false,
        };
        if !sent {
            engine
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return fail(kosmos_status::KOSMOS_ERR_RUNTIME, "the engine has stopped");
        }
        kosmos_status::KOSMOS_OK
    })
}

/// Cancel a request: it stops at the engine's next step and its DONE event says CANCELLED. An
/// id that has already had its final event (or was never issued) is ignored.
///
/// # Safety
/// `engine` is a handle from `kosmos_engine_open` (or NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_engine_cancel(engine: *mut kosmos_engine, request: u64) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let engine = match unsafe { ENGINES.get(engine, "engine") } {
            Ok(e) => e,
            Err(s) => return s,
        };
        if let Some(flag) = engine
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request)
        {
            flag.store(true, Ordering::Relaxed);
        }
        kosmos_status::KOSMOS_OK
    })
}

/// Cancel every request still queued or running, wait until each has had its final event, stop
/// the engine thread and release the engine (NULL is ignored; freeing twice is refused).
///
/// # Safety
/// `engine` is NULL or a handle from `kosmos_engine_open`, not in use by another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_engine_free(engine: *mut kosmos_engine) -> kosmos_status {
    guard(|| {
        if engine.is_null() {
            return kosmos_status::KOSMOS_OK;
        }
        if !ENGINES.contains(engine as usize) {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_HANDLE,
                "engine was already freed",
            );
        }
        // SAFETY: live handle (checked above).
        let e = unsafe { &*engine };
        if std::thread::current().id() == e.thread_id {
            // Joining the engine thread from itself would never return.
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "kosmos_engine_free was called from an engine callback",
            );
        }
        ENGINES.remove(engine as usize);
        for flag in e.inflight.lock().unwrap_or_else(|p| p.into_inner()).values() {
            flag.store(true, Ordering::Relaxed);
        }
        // Without a sender the engine thread returns once the cancelled requests have ended.
        e.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let thread = e.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let joined = thread.map(JoinHandle::join);
        // SAFETY: the handle was live, so it came from Box::into_raw and is freed only here.
        drop(unsafe { Box::from_raw(engine) });
        match joined {
            Some(Err(_)) => fail(kosmos_status::KOSMOS_ERR_INTERNAL, "the engine thread panicked"),
            _ => kosmos_status::KOSMOS_OK,
        }
    })
}
