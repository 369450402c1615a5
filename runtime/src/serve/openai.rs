//! The OpenAI-compatible endpoints: request parsing and validation, prompt assembly (chat
//! template or parts in order), submission to the engine, and the JSON / SSE responses.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kosmos_models::sequence::{Assembled, Segment, assemble};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::AppState;
use super::body::{RequestBody, locate_in, parse_bytes, read_body};
use super::error::ApiError;
use super::tools::{self, ToolCalls};
use super::{images, logprobs, structured};
use crate::batch::{SeqEvent, SeqFailure, SeqRequest};
use crate::generate::{FinishReason, GenerateParams, IMAGE_MARKER, bad_word_tokens};
use crate::logprobs::{MAX_TOP_LOGPROBS, TokenLogprob};

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged, expecting = "expected a string or an array of strings")]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by both endpoints (OpenAI's names, plus `top_k` and
/// `repetition_penalty` as vLLM and llama.cpp accept them).
#[derive(Deserialize, Default)]
pub(super) struct Sampling {
    pub(super) max_tokens: Option<i64>,
    pub(super) max_completion_tokens: Option<i64>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    top_k: Option<i64>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stop: Option<Stop>,
    seed: Option<i64>,
    pub(super) n: Option<i64>,
    /// Chat: true / false; completions: how many alternatives per token (0..=20).
    pub(super) logprobs: Option<Value>,
    /// Chat: alternatives per token (0..=20), with `logprobs: true`.
    pub(super) top_logprobs: Option<i64>,
    pub(super) stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// vLLM's extension for benchmarks: keep generating after `</s>`.
    ignore_eos: Option<bool>,
    /// OpenAI's: token id (as a string) → bias in [-100, 100].
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// vLLM's and llama.cpp's.
    min_p: Option<f32>,
    /// vLLM's.
    min_tokens: Option<i64>,
    /// vLLM's.
    stop_token_ids: Option<Vec<i64>>,
    /// vLLM's: only these tokens can be generated.
    allowed_token_ids: Option<Vec<i64>>,
    /// vLLM's: words never generated.
    bad_words: Option<Vec<String>>,
    /// vLLM's: lower is admitted first, and preempts less urgent running requests (which resume
    /// where they were) unless `--no-priority-preemption`.
    priority: Option<i64>,
    /// vLLM's: keep only the prompt's last k tokens (-1: the model's context).
    truncate_prompt_tokens: Option<i64>,
    /// vLLM's: each prompt token's log-probability, rank and the k most likely alternatives.
    pub(super) prompt_logprobs: Option<i64>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    /// Optional, as in vLLM: this server serves one model.
    model: Option<String>,
    messages: Vec<Message>,
    /// vLLM's: whether the chat template opens the assistant's turn (default true).
    add_generation_prompt: Option<bool>,
    /// vLLM's chat `echo` (the last message before the answer); not supported.
    echo: Option<bool>,
    /// vLLM's: the answer continues the final (assistant) message instead of a new turn.
    continue_final_message: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

pub(super) use crate::chat::{ImageUrl, Message, Part};

#[derive(Deserialize)]
struct CompletionRequest {
    /// Optional, as in vLLM: this server serves one model.
    model: Option<String>,
    /// A string, strings, token ids, or token-id lists (see [`completion_prompts`]).
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
}

impl RequestBody for ChatRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn locate_flattened(fields: &serde_json::Map<String, Value>) -> Option<(String, String)> {
        locate_in::<Sampling>(fields)
    }
}

impl RequestBody for CompletionRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn locate_flattened(fields: &serde_json::Map<String, Value>) -> Option<(String, String)> {
        locate_in::<Sampling>(fields)
    }
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        now_secs(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A request's sequences in the engine: their events (tagged with the choice index), the guard
/// that cancels them when dropped, and the prompt tokens counted for `usage`.
pub(super) struct Submitted {
    pub(super) events: UnboundedReceiver<(usize, SeqEvent)>,
    pub(super) guard: CancelOnDrop,
    pub(super) prompt_tokens: usize,
    /// Choices per prompt: choice `i` is of prompt `i / n`.
    n: usize,
    /// vLLM's `prompt_logprobs` (alternatives per prompt token), when asked for.
    prompt_logprobs: Option<usize>,
    /// Responses carry `logprobs` (the request asked for them).
    pub(super) wants_logprobs: bool,
    /// Alternatives per token of those `logprobs` (an echoed prompt's included).
    logprobs_top: usize,
    /// Completions' `echo`: each choice's prompt text, which its text starts with.
    echo: Option<Vec<String>>,
    /// Chat with a forced tool call: the text is the call.
    tools: Option<ToolCalls>,
}

/// A validated prompt ready for the engine.
pub(super) struct Prepared {
    pub(super) assembled: kosmos_models::sequence::Assembled,
    pixels: Vec<Vec<f32>>,
}

impl AppState {
    /// vLLM's `truncate_prompt_tokens`: the prompt's last k tokens (`<s>` included in the
    /// count, as vLLM counts it). The cut may drop whole images, with their pixels, never part
    /// of one (`<image>`, its slots and `</image>`).
    pub(super) fn truncate_prompt(&self, p: Prepared, s: &Sampling) -> Result<Prepared, ApiError> {
        const FIELD: &str = "truncate_prompt_tokens";
        let keep = match s.truncate_prompt_tokens {
            None => return Ok(p),
            Some(-1) => self.manifest.decoder.context_length,
            Some(k) if k >= 1 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("{FIELD} must be ≥ 1 (or -1 for the model's context), got {k}"),
                    FIELD,
                ));
            }
        };
        let len = p.assembled.len();
        let Some(cut) = len.checked_sub(keep).filter(|&c| c > 0) else {
            return Ok(p);
        };
        let mask = &p.assembled.image_mask;
        let (mut dropped, mut image, mut i) = (0, 0, 0);
        while i < len {
            if !mask[i] {
                i += 1;
                continue;
            }
            let start = i.saturating_sub(1); // `<image>`
            let mut end = i;
            while end < len && mask[end] {
                end += 1;
            }
            let end = (end + 1).min(len); // past `</image>`
            image += 1;
            if start < cut && cut < end {
                return Err(ApiError::invalid(
                    format!(
                        "{FIELD} {keep} would cut image {image} (prompt tokens {start}..{end} of {len}); keep fewer or more tokens"
                    ),
                    FIELD,
                ));
            }
            if end <= cut {
                dropped += 1;
            }
            i = end;
        }
        let a = &p.assembled;
        Ok(Prepared {
            assembled: Assembled {
                input_ids: a.input_ids[cut..].to_vec(),
                image_mask: a.image_mask[cut..].to_vec(),
                num_images: a.num_images - dropped,
            },
            pixels: p.pixels.into_iter().skip(dropped).collect(),
        })
    }
}

impl AppState {
    pub(super) fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model != self.model_name {
            return Err(ApiError::not_found(format!(
                "The model '{model}' does not exist; this server serves '{}'",
                self.model_name
            ))
            .with_code("model_not_found"));
        }
        Ok(())
    }

    /// Segments and image URLs of a chat ([`crate::chat`]), within `--max-images`.
    pub(super) fn chat_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: Option<bool>,
        continue_final_message: bool,
    ) -> Result<(Vec<Segment>, Vec<String>), ApiError> {
        let (segments, urls) = self
            .chat
            .render(messages, add_generation_prompt, continue_final_message)
            .map_err(|e| ApiError::invalid(e.message, e.param))?;
        if urls.len() > self.cfg.max_images {
            return Err(ApiError::invalid(
                format!(
                    "{} images in the request; the limit is {} (--max-images)",
                    urls.len(),
                    self.cfg.max_images
                ),
                "messages",
            ));
        }
        Ok((segments, urls))
    }

    /// A completions text prompt's segments (text only: the endpoint takes no images).
    pub(super) fn completion_segments(&self, text: &str) -> Result<Vec<Segment>, ApiError> {
        if text.contains(IMAGE_MARKER) {
            return Err(ApiError::invalid(
                format!(
                    "{IMAGE_MARKER} in a completions prompt has no image; send images through /v1/chat/completions"
                ),
                "prompt",
            ));
        }
        Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![Segment::Text(text.to_string())]
        })
    }

    /// Fetch, decode and preprocess the images, and assemble the tokens.
    pub(super) async fn prepare(
        self: &Arc<Self>,
        segments: Vec<Segment>,
        urls: Vec<String>,
    ) -> Result<Prepared, ApiError> {
        let st = self.clone();
        tokio::task::spawn_blocking(move || {
            let size = st.manifest.preprocess.image_size as u32;
            let pixels = urls
                .iter()
                .enumerate()
                .map(|(i, url)| {
                    let bytes = images::fetch(url, &st.images, i)?;
                    images::preprocess(&bytes, i, size, &st.images)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let assembled = assemble(
                &st.tokenizer,
                &segments,
                st.manifest.vision.tokens_per_image,
                false,
            )
            .map_err(|e| ApiError::invalid(e.to_string(), "messages"))?;
            Ok(Prepared { assembled, pixels })
        })
        .await
        .map_err(|e| ApiError::internal(format!("preprocessing task failed: {e}")))?
    }

    /// Generation parameters from the request; `prompt_len` bounds max_tokens by the context.
    /// With completions' `echo`, max_tokens may be 0: the prompt is only scored.
    pub(super) fn params(
        &self,
        s: &Sampling,
        prompt_len: usize,
        kind: Kind,
        echo: bool,
    ) -> Result<Requested, ApiError> {
        let context = self.manifest.decoder.context_length;
        let room = context.saturating_sub(prompt_len);
        let requested = s.max_completion_tokens.or(s.max_tokens);
        // The field that holds the prompt.
        let input = match kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        };
        let max_tokens = match requested {
            Some(n) if n < 1 && !(n == 0 && echo) => {
                let why = match kind {
                    Kind::Completion => " (0 only with echo: true, which scores the prompt)",
                    Kind::Chat => "",
                };
                return Err(ApiError::invalid(
                    format!("max_tokens must be at least 1{why}, got {n}"),
                    "max_tokens",
                ));
            }
            Some(n) => {
                if prompt_len as i64 + n > context as i64 {
                    return Err(ApiError::invalid(
                        format!(
                            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_len} in the {input}, {n} in the completion). Please reduce the length of the {input} or completion.",
                            prompt_len as i64 + n
                        ),
                        input,
                    )
                    .with_code("context_length_exceeded"));
                }
                n as usize
            }
            None => {
                if room == 0 {
                    return Err(ApiError::invalid(
                        format!(
                            "the prompt's {prompt_len} tokens fill the model's context of {context} tokens"
                        ),
                        input,
                    )
                    .with_code("context_length_exceeded"));
                }
                self.cfg.default_max_tokens.min(room)
            }
        };
        // OpenAI's range; the engine takes any temperature ≥ 0.
        let temperature = s.temperature.unwrap_or(1.0);
        if temperature > 2.0 {
            return Err(ApiError::invalid(
                format!("temperature must be in [0, 2], got {temperature}"),
                "temperature",
            ));
        }
        let top_k = s.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(ApiError::invalid(
                format!("top_k must be ≥ 0, got {top_k}"),
                "top_k",
            ));
        }
        let logprobs = requested_logprobs(s, kind)?;
        let prompt_logprobs = match s.prompt_logprobs {
            None => None,
            Some(k) => Some(
                usize::try_from(k)
                    .ok()
                    .filter(|&k| k <= MAX_TOP_LOGPROBS)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("prompt_logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {k}"),
                            "prompt_logprobs",
                        )
                    })?,
            ),
        };
        let stop = match &s.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let seed = match s.seed {
            Some(seed) => seed as u64,
            None => rand::random(),
        };
        let n = s.n.unwrap_or(1);
        if n < 1 || n as usize > self.cfg.max_n {
            return Err(ApiError::invalid(
                format!("n must be in 1..={}, got {n}", self.cfg.max_n),
                "n",
            ));
        }
        let params = GenerateParams {
            max_tokens,
            temperature,
            top_k: top_k as usize,
            top_p: s.top_p.unwrap_or(1.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            seed,
            stop,
            beams: 1,
            ignore_eos: s.ignore_eos.unwrap_or(false),
            logit_bias: logit_bias(s.logit_bias.as_ref())?,
            min_p: s.min_p.unwrap_or(0.0),
            min_tokens: usize::try_from(s.min_tokens.unwrap_or(0))
                .map_err(|_| ApiError::invalid("min_tokens must be ≥ 0", "min_tokens"))?,
            stop_token_ids: token_id_list(s.stop_token_ids.as_deref(), "stop_token_ids")?,
            constraint: None,
            allowed_token_ids: match s.allowed_token_ids.as_deref() {
                Some([]) => {
                    return Err(ApiError::invalid(
                        "allowed_token_ids must not be empty (leave it out to allow every token)",
                        "allowed_token_ids",
                    ));
                }
                ids => token_id_list(ids, "allowed_token_ids")?,
            },
            bad_words: bad_word_tokens(&self.tokenizer, s.bad_words.as_deref().unwrap_or_default())
                .map_err(|m| ApiError::invalid(m, "bad_words"))?,
        };
        if let Some((field, message)) = params
            .invalid_setting()
            .or_else(|| params.invalid_token(self.manifest.decoder.vocab_size))
        {
            return Err(ApiError::invalid(message, field));
        }
        Ok(Requested {
            params,
            n: n as usize,
            logprobs,
            echo,
            prompt_logprobs,
            priority: s.priority.unwrap_or(0),
        })
    }

    /// Queue `n` sequences per prompt; their events arrive tagged with the choice index.
    pub(super) fn submit(&self, prompts: Vec<Prepared>, r: &Requested) -> Result<Submitted, ApiError> {
        let Requested {
            params,
            n,
            logprobs,
            echo,
            prompt_logprobs,
            priority,
        } = r;
        // Echo's scores and vLLM's prompt_logprobs come from one scoring, at the larger width.
        let scored = match (*echo, *logprobs, *prompt_logprobs) {
            (true, Some(a), Some(b)) => Some(a.max(b)),
            (true, Some(a), None) => Some(a),
            (_, _, b) => b,
        };
        let n = *n;
        let total = prompts.len() * n;
        let depth = self.metrics.queue_depth.fetch_add(total as u64, Ordering::SeqCst) as usize;
        if depth + total > self.cfg.max_queue {
            self.metrics.queue_depth.fetch_sub(total as u64, Ordering::SeqCst);
            return Err(ApiError::queue_full(depth));
        }
        let (tx, rx) = unbounded_channel();
        let arrived = Instant::now();
        let deadline = self.cfg.request_timeout.map(|t| arrived + t);
        let mut flags = Vec::with_capacity(total);
        let mut prompt_tokens = 0;
        let mut reqs = Vec::with_capacity(total);
        for (pi, p) in prompts.into_iter().enumerate() {
            // OpenAI counts a prompt once however many choices it has.
            prompt_tokens += p.assembled.len();
            for j in 0..n {
                let index = pi * n + j;
                let cancel = Arc::new(AtomicBool::new(false));
                flags.push(cancel.clone());
                let tx = tx.clone();
                let mut params = params.clone();
                params.seed = params.seed.wrapping_add(j as u64);
                let req = SeqRequest {
                    assembled: p.assembled.clone(),
                    pixels: p.pixels.clone(),
                    params,
                    logprobs: *logprobs,
                    prompt_logprobs: scored,
                    priority: *priority,
                    arrived,
                    deadline,
                    cancel,
                    sink: Box::new(move |ev| tx.send((index, ev)).is_ok()),
                };
                reqs.push(req);
            }
        }
        // In one message, so the engine queues the choices together and can prefill them once.
        let sent = self
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(reqs)
            .is_ok();
        if !sent {
            self.metrics.queue_depth.fetch_sub(total as u64, Ordering::SeqCst);
            return Err(ApiError::unavailable("the engine has stopped"));
        }
        Ok(Submitted {
            events: rx,
            guard: CancelOnDrop(flags),
            prompt_tokens,
            n,
            prompt_logprobs: *prompt_logprobs,
            wants_logprobs: logprobs.is_some(),
            logprobs_top: logprobs.unwrap_or(0),
            echo: None,
            tools: None,
        })
    }
}

/// OpenAI's `logit_bias`: token ids written as strings.
fn logit_bias(m: Option<&std::collections::HashMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out: Vec<(u32, f32)> = m
        .into_iter()
        .flatten()
        .map(|(k, &v)| {
            k.trim().parse::<u32>().map(|t| (t, v)).map_err(|_| {
                ApiError::invalid(
                    format!("logit_bias keys must be token ids, got {k:?}"),
                    "logit_bias",
                )
            })
        })
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|e| e.0);
    Ok(out)
}

/// A request field holding token ids (absent: none), each checked to be one.
fn token_id_list(ids: Option<&[i64]>, field: &'static str) -> Result<Vec<u32>, ApiError> {
    ids.into_iter()
        .flatten()
        .map(|&t| {
            u32::try_from(t)
                .map_err(|_| ApiError::invalid(format!("{field} must hold token ids, got {t}"), field))
        })
        .collect()
}

/// A field the server refuses: its name, whether a value asks for nothing, and why.
type Unsupported = (&'static str, fn(&Value) -> bool, &'static str);

/// Fields of OpenAI's, vLLM's and llama.cpp's APIs that would change the answer and that this
/// server cannot honour, with the values that ask for nothing (absent or `null` always does):
/// any other value is a 400 naming the field rather than an answer that silently ignores it.
/// (Fields that only describe or route a request, such as `user`, `metadata` or `store`, are
/// ignored.)
const UNSUPPORTED: &[Unsupported] = &[
    ("audio", |_| false, "this model writes text only"),
    (
        "modalities",
        |v| v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
        "this model writes text only",
    ),
    (
        "web_search_options",
        |_| false,
        "the server makes no outbound requests",
    ),
    (
        "use_beam_search",
        |v| v == &Value::Bool(false),
        "the server samples one sequence per choice (kosmos-rt run --beams searches)",
    ),
    (
        "include_stop_str_in_output",
        |v| v == &Value::Bool(false),
        "the text always ends before the stop string",
    ),
    (
        "guided_whitespace_pattern",
        |_| false,
        "JSON output allows at most one space between tokens",
    ),
    // vLLM's.
    (
        "skip_special_tokens",
        |v| v == &Value::Bool(true),
        "special tokens are never part of the text",
    ),
    (
        "spaces_between_special_tokens",
        |v| v == &Value::Bool(true),
        "special tokens are never part of the text",
    ),
    (
        "length_penalty",
        |v| v.as_f64() == Some(1.0),
        "it applies to beam search, which the server does not do",
    ),
    (
        "return_tokens_as_token_ids",
        |v| v == &Value::Bool(false),
        "logprobs show tokens as text with their bytes",
    ),
    (
        "chat_template",
        |_| false,
        "the package's chat_template (kosmos_rt.json) is the only one",
    ),
    (
        "chat_template_kwargs",
        |v| v.as_object().is_some_and(|m| m.is_empty()),
        "the package's chat template takes messages, add_generation_prompt, bos_token and eos_token",
    ),
    (
        "mm_processor_kwargs",
        |v| v.as_object().is_some_and(|m| m.is_empty()),
        "images are always preprocessed as the package says",
    ),
    (
        "documents",
        |_| false,
        "the package's chat template takes no documents",
    ),
    // llama.cpp's samplers.
    (
        "typical_p",
        |v| v.as_f64() == Some(1.0),
        "use top_p, top_k or min_p",
    ),
    ("tfs_z", |v| v.as_f64() == Some(1.0), "use top_p, top_k or min_p"),
    (
        "mirostat",
        |v| v.as_f64() == Some(0.0),
        "use top_p, top_k or min_p",
    ),
    (
        "dynatemp_range",
        |v| v.as_f64() == Some(0.0),
        "the temperature is fixed",
    ),
    (
        "xtc_probability",
        |v| v.as_f64() == Some(0.0),
        "use top_p, top_k or min_p",
    ),
    (
        "dry_multiplier",
        |v| v.as_f64() == Some(0.0),
        "use repetition_penalty or frequency_penalty",
    ),
    (
        "top_n_sigma",
        |v| v.as_f64().is_some_and(|x| x <= 0.0),
        "use top_p, top_k or min_p",
    ),
    (
        "n_probs",
        |v| v.as_f64() == Some(0.0),
        "use logprobs / top_logprobs",
    ),
    (
        "repeat_penalty",
        |v| v.as_f64() == Some(1.0),
        "use repetition_penalty, applied to every token seen so far as vLLM does",
    ),
];

fn refuse_unsupported(body: &[u8]) -> Result<(), ApiError> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Ok(()); // the request's own parse reports what is wrong with it
    };
    for &(field, asks_nothing, why) in UNSUPPORTED {
        if let Some(v) = fields.get(field)
            && !v.is_null()
            && !asks_nothing(v)
        {
            return Err(ApiError::invalid(
                format!("{field} is not supported: {why}"),
                field,
            ));
        }
    }
    Ok(())
}

/// What a request asks the engine for: its sampling, choices per prompt, and log-probabilities.
pub(super) struct Requested {
    pub(super) params: GenerateParams,
    n: usize,
    /// Alternatives per token when the request wants log-probabilities.
    logprobs: Option<usize>,
    /// Completions' `echo`: the prompt's tokens get log-probabilities too.
    echo: bool,
    /// vLLM's `prompt_logprobs`: alternatives per prompt token.
    prompt_logprobs: Option<usize>,
    /// vLLM's: lower is admitted first.
    priority: i64,
}

/// `logprobs` / `top_logprobs` as the endpoint takes them: chat `logprobs: true` with
/// `top_logprobs: k`, completions `logprobs: k`.
fn requested_logprobs(s: &Sampling, kind: Kind) -> Result<Option<usize>, ApiError> {
    let range = |k: i64, field: &'static str| {
        usize::try_from(k)
            .ok()
            .filter(|&k| k <= MAX_TOP_LOGPROBS)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("{field} must be in 0..={MAX_TOP_LOGPROBS}, got {k}"),
                    field,
                )
            })
    };
    let value = s.logprobs.as_ref().filter(|v| !v.is_null());
    match kind {
        Kind::Chat => {
            let on = match value {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::invalid(
                        format!("logprobs must be true or false in chat completions, got {v}"),
                        "logprobs",
                    ));
                }
            };
            match (on, s.top_logprobs) {
                (true, top) => Ok(Some(top.map_or(Ok(0), |k| range(k, "top_logprobs"))?)),
                (false, Some(_)) => Err(ApiError::invalid(
                    "top_logprobs needs logprobs: true",
                    "top_logprobs",
                )),
                (false, None) => Ok(None),
            }
        }
        Kind::Completion => {
            if s.top_logprobs.is_some() {
                return Err(ApiError::invalid(
                    "top_logprobs is a chat completions field; completions take logprobs: <alternatives>",
                    "top_logprobs",
                ));
            }
            match value {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(k) => range(k, "logprobs").map(Some),
                    None => Err(ApiError::invalid(
                        format!("logprobs must be an integer in completions, got {v}"),
                        "logprobs",
                    )),
                },
            }
        }
    }
}

/// Cancels the request's sequences when the response (or the handler) is dropped: a client that
/// disconnects frees its KV rows. Harmless once they have finished.
pub struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only a disconnected client cancels; nobody reads this.
        FinishReason::Cancelled => "stop",
    }
}

/// A finished chat choice as OpenAI's tool-call message and finish reason, when the request
/// forced a call and the text is a whole one (else the text is the answer, e.g. cut by length).
fn tool_message(
    mode: Option<&ToolCalls>,
    finish: FinishReason,
    text: &str,
    streamed: bool,
) -> Option<(Value, &'static str)> {
    let mode = mode?;
    if finish != FinishReason::Stop {
        return None;
    }
    let calls = tools::calls(mode, text)?;
    let calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(j, (name, args))| tools::call_json(streamed.then_some(j), &tools::call_id(), name, args))
        .collect();
    // OpenAI ends a call it was told to make by name with "stop", a chosen one with "tool_calls".
    let reason = match mode {
        ToolCalls::Named(_) => "stop",
        ToolCalls::Required => "tool_calls",
    };
    Some((
        json!({"role": "assistant", "content": null, "tool_calls": calls}),
        reason,
    ))
}

/// OpenAI's `usage`; `cached`: prompt tokens the prefix cache gave.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A request's cached prompt tokens from its choices' summaries: each prompt counted once (as
/// `prompt_tokens` counts it), by its first choice.
fn cached_tokens(per_choice: &[usize], n: usize) -> usize {
    per_choice.iter().step_by(n.max(1)).sum()
}

/// Which endpoint a response is for.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Chat,
    Completion,
}

struct Choice {
    text: String,
    finish: Option<FinishReason>,
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
    /// An echoed prompt's tokens with their log-probabilities.
    prompt_logprobs: Vec<(u32, Option<TokenLogprob>)>,
}

/// Wait for every choice and build the non-streaming response.
async fn collect(st: &AppState, kind: Kind, sub: Submitted, total: usize) -> Result<Response, ApiError> {
    let Submitted {
        events: mut rx,
        guard: _guard,
        prompt_tokens,
        n,
        prompt_logprobs,
        wants_logprobs,
        logprobs_top,
        echo,
        tools,
    } = sub;
    let mut choices: Vec<Choice> = (0..total)
        .map(|_| Choice {
            text: String::new(),
            finish: None,
            tokens: 0,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        })
        .collect();
    let mut cached = vec![0; total];
    let mut done = 0;
    while done < total {
        let Some((i, ev)) = rx.recv().await else {
            return Err(ApiError::internal(
                "the engine stopped before the request finished",
            ));
        };
        match ev {
            SeqEvent::Text { logprobs, .. } => choices[i].logprobs.extend(logprobs),
            SeqEvent::PromptLogprobs(p) => choices[i].prompt_logprobs = p,
            SeqEvent::Done(s) => {
                let c = &mut choices[i];
                c.text = match &echo {
                    Some(prompts) => format!("{}{}", prompts[i], s.text),
                    None => s.text,
                };
                c.finish = Some(s.finish_reason);
                c.tokens = s.tokens.len();
                cached[i] = s.cached_tokens;
                done += 1;
            }
            SeqEvent::Failed(SeqFailure::Timeout) => {
                return Err(ApiError::timeout(
                    st.cfg.request_timeout.unwrap_or_default().as_secs_f64(),
                ));
            }
            SeqEvent::Failed(SeqFailure::Engine(m)) => return Err(ApiError::internal(m)),
        }
    }
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    let created = now_secs();
    let tok = &st.tokenizer;
    let lp = |(i, c): (usize, &Choice)| match (wants_logprobs, kind, &echo) {
        (false, _, _) => Value::Null,
        (true, Kind::Chat, _) => logprobs::chat(tok, &c.logprobs),
        (true, Kind::Completion, None) => {
            logprobs::completion(tok, logprobs::generated(&c.logprobs), &mut Vec::new(), 0)
        }
        (true, Kind::Completion, Some(prompts)) => {
            let scored = logprobs::trimmed(&c.prompt_logprobs, logprobs_top);
            let prompt = logprobs::completion(tok, logprobs::prompt(&scored), &mut Vec::new(), 0);
            let base = prompts[i].chars().count();
            let generated =
                logprobs::completion(tok, logprobs::generated(&c.logprobs), &mut Vec::new(), base);
            logprobs::concat(prompt, &generated)
        }
    };
    let mut body = match kind {
        Kind::Chat => json!({
            "id": request_id("chatcmpl"),
            "object": "chat.completion",
            "created": created,
            "model": st.model_name,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let finish = c.finish.unwrap_or(FinishReason::Length);
                let (message, reason) = match tool_message(tools.as_ref(), finish, &c.text, false) {
                    Some(m) => m,
                    None => (json!({"role": "assistant", "content": c.text}), finish_str(finish)),
                };
                json!({"index": i, "message": message, "logprobs": lp((i, c)), "finish_reason": reason})
            }).collect::<Vec<_>>(),
            "usage": usage(prompt_tokens, completion, cached_tokens(&cached, n)),
        }),
        Kind::Completion => json!({
            "id": request_id("cmpl"),
            "object": "text_completion",
            "created": created,
            "model": st.model_name,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "text": c.text,
                "logprobs": lp((i, c)),
                "finish_reason": finish_str(c.finish.unwrap_or(FinishReason::Length)),
            })).collect::<Vec<_>>(),
            "usage": usage(prompt_tokens, completion, cached_tokens(&cached, n)),
        }),
    };
    if let Some(k) = prompt_logprobs {
        let scored = |c: &Choice| logprobs::vllm_prompt(tok, &c.prompt_logprobs, k);
        match kind {
            // vLLM's places: the response (a chat has one prompt), or each choice.
            Kind::Chat => body["prompt_logprobs"] = scored(&choices[0]),
            Kind::Completion => {
                for (i, c) in choices.iter().enumerate() {
                    body["choices"][i]["prompt_logprobs"] = scored(c);
                }
            }
        }
    }
    Ok(axum::Json(body).into_response())
}

/// The SSE response: chunks as OpenAI sends them, `[DONE]` last.
fn stream(st: Arc<AppState>, kind: Kind, sub: Submitted, total: usize, include_usage: bool) -> Response {
    let Submitted {
        events: mut rx,
        guard,
        prompt_tokens,
        n,
        prompt_logprobs,
        wants_logprobs,
        logprobs_top,
        echo,
        tools,
    } = sub;
    let id = request_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let created = now_secs();
    let model = st.model_name.clone();
    let chunk_json = move |choices: Value, usage: Option<Value>| -> Value {
        let mut c = json!({
            "id": id,
            "object": match kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c
    };
    let body = async_stream::stream! {
        // Held by the stream: dropping the response (client gone) cancels the sequences.
        let _guard = guard;
        let chunk = |choices: Value, usage: Option<Value>| Event::default().data(chunk_json(choices, usage).to_string());
        if let Kind::Chat = kind {
            for i in 0..total {
                yield Ok::<Event, Infallible>(chunk(
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    None,
                ));
            }
        }
        let mut done = 0;
        let mut completion = 0;
        let mut cached = vec![0; total];
        // Each choice's generated tokens so far and where they start (after an echoed prompt),
        // for completions' text_offset.
        let mut offsets = vec![Vec::new(); total];
        let mut base = vec![0usize; total];
        // Forced tool calls: a named call streams its arguments as they come (after a first
        // delta with the call's id and name); "required" calls are sent whole at the end.
        let mut call_ids: Vec<Option<String>> = vec![None; total];
        let mut held = vec![String::new(); total];
        // An echoed prompt goes first: with its log-probabilities when they come, else now.
        if let Some(prompts) = &echo {
            for (i, p) in prompts.iter().enumerate() {
                base[i] = p.chars().count();
                if !wants_logprobs {
                    let choice = json!({"index": i, "text": p, "logprobs": null, "finish_reason": null});
                    yield Ok(chunk(json!([choice]), None));
                }
            }
        }
        while done < total {
            let Some((i, ev)) = rx.recv().await else { break };
            match ev {
                SeqEvent::PromptLogprobs(p) => {
                    // vLLM's prompt_logprobs first: in a chunk of their own, as vLLM sends them
                    // (a chat's at the top, once; a completion's in its choice).
                    if let Some(k) = prompt_logprobs {
                        let scored = logprobs::vllm_prompt(&st.tokenizer, &p, k);
                        match kind {
                            Kind::Chat if i == 0 => {
                                let mut c = chunk_json(json!([]), None);
                                c["prompt_logprobs"] = scored;
                                yield Ok(Event::default().data(c.to_string()));
                            }
                            Kind::Chat => {}
                            Kind::Completion => {
                                let choice = json!({"index": i, "text": "", "logprobs": null, "finish_reason": null, "prompt_logprobs": scored});
                                yield Ok(chunk(json!([choice]), None));
                            }
                        }
                    }
                    let Some(prompts) = &echo else { continue };
                    if !wants_logprobs {
                        continue;
                    }
                    let scored = logprobs::trimmed(&p, logprobs_top);
                    let lp = logprobs::completion(&st.tokenizer, logprobs::prompt(&scored), &mut Vec::new(), 0);
                    let choice = json!({"index": i, "text": prompts[i], "logprobs": lp, "finish_reason": null});
                    yield Ok(chunk(json!([choice]), None));
                }
                SeqEvent::Text { text: t, logprobs: entries } => {
                    let lp = match (wants_logprobs, kind) {
                        (false, _) => Value::Null,
                        (true, Kind::Chat) => logprobs::chat(&st.tokenizer, &entries),
                        (true, Kind::Completion) => logprobs::completion(
                            &st.tokenizer,
                            logprobs::generated(&entries),
                            &mut offsets[i],
                            base[i],
                        ),
                    };
                    let choice = match (kind, &tools) {
                        (Kind::Chat, Some(ToolCalls::Named(name))) => {
                            if call_ids[i].is_none() {
                                let id = tools::call_id();
                                let first = tools::call_json(Some(0), &id, name, "");
                                call_ids[i] = Some(id);
                                yield Ok(chunk(json!([{"index": i, "delta": {"tool_calls": [first]}, "logprobs": null, "finish_reason": null}]), None));
                            }
                            json!({"index": i, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": t}}]}, "logprobs": lp, "finish_reason": null})
                        }
                        (Kind::Chat, Some(ToolCalls::Required)) => {
                            held[i].push_str(&t);
                            continue;
                        }
                        (Kind::Chat, None) => json!({"index": i, "delta": {"content": t}, "logprobs": lp, "finish_reason": null}),
                        (Kind::Completion, _) => json!({"index": i, "text": t, "logprobs": lp, "finish_reason": null}),
                    };
                    yield Ok(chunk(json!([choice]), None));
                }
                SeqEvent::Done(s) => {
                    done += 1;
                    completion += s.tokens.len();
                    cached[i] = s.cached_tokens;
                    let mut reason = finish_str(s.finish_reason);
                    if let Some(mode) = &tools {
                        if let Some((message, r)) = tool_message(Some(mode), s.finish_reason, &s.text, true) {
                            reason = r;
                            if matches!(mode, ToolCalls::Required) {
                                let delta = json!({"tool_calls": message["tool_calls"]});
                                yield Ok(chunk(json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]), None));
                            }
                        } else if !held[i].is_empty() {
                            // Not a whole call (cut by length): the text as it is.
                            let text = std::mem::take(&mut held[i]);
                            yield Ok(chunk(json!([{"index": i, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]), None));
                        }
                    }
                    let choice = match kind {
                        Kind::Chat => json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}),
                        Kind::Completion => json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason}),
                    };
                    // The last finish chunk carries the usage too (clients that did not ask for
                    // the usage chunk still see it).
                    let u = (done == total).then(|| usage(prompt_tokens, completion, cached_tokens(&cached, n)));
                    yield Ok(chunk(json!([choice]), u));
                }
                SeqEvent::Failed(f) => {
                    let e = match f {
                        SeqFailure::Timeout => ApiError::timeout(st.cfg.request_timeout.unwrap_or_default().as_secs_f64()),
                        SeqFailure::Engine(m) => ApiError::internal(m),
                    };
                    // OpenAI reports a mid-stream failure as an error object in a data line.
                    yield Ok(Event::default().data(e.body().to_string()));
                    break;
                }
            }
        }
        if include_usage && done == total {
            yield Ok(chunk(json!([]), Some(usage(prompt_tokens, completion, cached_tokens(&cached, n)))));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

/// The response to submitted sequences: SSE or one JSON body.
async fn respond(
    st: Arc<AppState>,
    kind: Kind,
    sub: Submitted,
    total: usize,
    sampling: &Sampling,
) -> Result<Response, ApiError> {
    if sampling.stream.unwrap_or(false) {
        let include_usage = sampling
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(stream(st, kind, sub, total, include_usage));
    }
    // `sub` holds the guard while waiting: a client that hangs up drops this future and cancels
    // its sequences.
    collect(&st, kind, sub, total).await
}

/// A generation request's body and its parse, the model it names checked and the fields no
/// endpoint honours refused.
pub(super) async fn read_request<T: RequestBody>(st: &AppState, body: Body) -> Result<(Bytes, T), ApiError> {
    let body = read_body(body, st.cfg.max_body_bytes).await?;
    let req: T = parse_bytes(&body)?;
    if let Some(m) = req.model() {
        st.check_model(m)?;
    }
    refuse_unsupported(&body)?;
    Ok((body, req))
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let (body, req) = read_request::<ChatRequest>(&st, body).await?;
    let (constraint, tool_calls) = match (structured::requested(&body)?, tools::requested(&body)?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "a forced tool call is already a structured output; give tool_choice or a structured-output constraint, not both",
                "tool_choice",
            ));
        }
        (c, None) => (c, None),
        (None, Some(t)) => (Some(t.grammar), Some(t.mode)),
    };
    if req.echo == Some(true) {
        return Err(ApiError::invalid(
            "echo is not supported in chat completions (completions take echo: true)",
            "echo",
        ));
    }
    let (segments, urls) = st.chat_prompt(
        &req.messages,
        req.add_generation_prompt,
        req.continue_final_message.unwrap_or(false),
    )?;
    let prepared = st.truncate_prompt(st.prepare(segments, urls).await?, &req.sampling)?;
    let mut r = st.params(&req.sampling, prepared.assembled.len(), Kind::Chat, false)?;
    r.params.constraint = constraint;
    let mut sub = st.submit(vec![prepared], &r)?;
    sub.tools = tool_calls;
    respond(st, Kind::Chat, sub, r.n, &req.sampling).await
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let (body, req) = read_request::<CompletionRequest>(&st, body).await?;
    tools::refuse(&body)?;
    let constraint = structured::requested(&body)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", "suffix"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("best_of is not supported", "best_of"));
    }
    let prompts = completion_prompts(&req.prompt, st.manifest.decoder.vocab_size, st.cfg.max_n)?;
    let mut prepared = Vec::with_capacity(prompts.len());
    let mut echoed = Vec::with_capacity(prompts.len());
    for p in prompts {
        match p {
            CompletionInput::Text(t) => {
                let segs = st.completion_segments(&t)?;
                prepared.push(st.prepare(segs, Vec::new()).await?);
                echoed.push(t);
            }
            CompletionInput::Tokens(ids) => {
                echoed.push(
                    st.tokenizer
                        .decode(&ids)
                        .map_err(|e| ApiError::invalid(e.to_string(), "prompt"))?,
                );
                prepared.push(Prepared {
                    assembled: Assembled {
                        image_mask: vec![false; ids.len()],
                        input_ids: ids,
                        num_images: 0,
                    },
                    pixels: Vec::new(),
                });
            }
        }
    }
    let echo = req.echo == Some(true);
    if echo && req.sampling.truncate_prompt_tokens.is_some() {
        return Err(ApiError::invalid(
            "truncate_prompt_tokens cannot be combined with echo: the echoed prompt would not be the one scored",
            "truncate_prompt_tokens",
        ));
    }
    let prepared = prepared
        .into_iter()
        .map(|p| st.truncate_prompt(p, &req.sampling))
        .collect::<Result<Vec<_>, _>>()?;
    let longest = prepared.iter().map(|p| p.assembled.len()).max().unwrap_or(0);
    let mut r = st.params(&req.sampling, longest, Kind::Completion, echo)?;
    r.params.constraint = constraint;
    let total = prepared.len() * r.n;
    if total > st.cfg.max_n {
        return Err(ApiError::invalid(
            format!("prompts x n must be at most {}", st.cfg.max_n),
            "n",
        ));
    }
    let mut sub = st.submit(prepared, &r)?;
    if echo {
        // Choice k answers prompt k / n.
        sub.echo = Some((0..total).map(|k| echoed[k / r.n].clone()).collect());
    }
    respond(st, Kind::Completion, sub, total, &req.sampling).await
}

/// One completions prompt: text, assembled behind `<s>` as `kosmos-rt run` does, or token ids,
/// fed exactly as given (no `<s>` added: OpenAI's and vLLM's reading, which lets
/// lm-evaluation-harness line its context length up with the echoed log-probabilities).
#[derive(Debug, PartialEq)]
enum CompletionInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// OpenAI's four prompt shapes: a string, an array of strings, an array of token ids, or an
/// array of token-id arrays; at most `max_prompts` prompts, ids below `vocab`.
fn completion_prompts(v: &Value, vocab: usize, max_prompts: usize) -> Result<Vec<CompletionInput>, ApiError> {
    const SHAPES: &str =
        "prompt must be a string, an array of strings, an array of token ids or an array of token-id arrays";
    let prompts = match v {
        Value::String(t) => vec![CompletionInput::Text(t.clone())],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => items
            .iter()
            .map(|t| CompletionInput::Text(t.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![CompletionInput::Tokens(token_ids(
                items, vocab, "prompt", "prompt",
            )?)]
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, list)| {
                let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
                match list {
                    [] => Err(ApiError::invalid(format!("prompt[{i}] has no tokens"), "prompt")),
                    ids => {
                        token_ids(ids, vocab, &format!("prompt[{i}]"), "prompt").map(CompletionInput::Tokens)
                    }
                }
            })
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt must not be an empty array", "prompt"));
        }
        _ => return Err(ApiError::invalid(SHAPES, "prompt")),
    };
    if prompts.len() > max_prompts {
        return Err(ApiError::invalid(
            format!("prompt takes 1 to {max_prompts} prompts, got {}", prompts.len()),
            "prompt",
        ));
    }
    Ok(prompts)
}

/// Token ids from JSON numbers, each an integer in `0..vocab`; `what` names the list in errors,
/// `param` the request field.
pub(super) fn token_ids(
    items: &[Value],
    vocab: usize,
    what: &str,
    param: &'static str,
) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .filter(|&id| id < vocab as u64)
                .map(|id| id as u32)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("{what}[{j}] = {v} is not a token id of this model (0..{vocab})"),
                        param,
                    )
                })
        })
        .collect()
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [st.model_card()],
    }))
    .into_response()
}

pub async fn model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    st.check_model(&id)?;
    Ok(axum::Json(st.model_card()).into_response())
}

impl AppState {
    fn model_card(&self) -> Value {
        json!({
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "kosmos-rt",
            "max_model_len": self.manifest.decoder.context_length,
        })
    }
}
