//! `kosmos_score`: teacher-forced log-probabilities of a prompt's tokens (ranking candidate
//! answers, perplexity), from one decoder call.

use std::ffi::c_char;

use super::{MODELS, c_str, fail, guard, kosmos_image, kosmos_model, kosmos_status, read_images, status_of};
use crate::generate::Prompt;

/// Score `prompt` (text with `<image>` markers, as `kosmos_generate` takes it) teacher-forced:
/// on success `*out_tokens` and `*out_logprobs` hold `*out_n` entries, the prompt's tokens
/// (`<s>` first, image slots included, `</s>` last when `add_eos`) and each one's natural-log
/// probability given the tokens before it (NaN for the first token and for image slots, which
/// the model does not predict). Release them with `kosmos_tokens_free` and
/// `kosmos_logprobs_free`. The sum over a continuation's tokens ranks candidate answers, as
/// the KOSMOS-1 paper's zero-shot classification does.
///
/// # Safety
/// `model` is a handle from `kosmos_model_open` (or NULL); `prompt` a NUL-terminated string;
/// `images` points to `n_images` valid `kosmos_image`s (or is NULL with `n_images` 0);
/// `out_tokens`, `out_logprobs` and `out_n` are writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kosmos_score(
    model: *mut kosmos_model,
    prompt: *const c_char,
    images: *const kosmos_image,
    n_images: usize,
    add_eos: bool,
    out_tokens: *mut *mut u32,
    out_logprobs: *mut *mut f32,
    out_n: *mut usize,
) -> kosmos_status {
    guard(|| {
        if out_tokens.is_null() || out_logprobs.is_null() || out_n.is_null() {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "out_tokens, out_logprobs or out_n is NULL",
            );
        }
        // SAFETY: checked non-NULL; the caller owns the slots.
        unsafe {
            *out_tokens = std::ptr::null_mut();
            *out_logprobs = std::ptr::null_mut();
            *out_n = 0;
        }
        // SAFETY: per this function's contract; the lock below serialises calls on the model.
        let model = match unsafe { MODELS.get(model, "model") } {
            Ok(m) => m,
            Err(s) => return s,
        };
        // SAFETY: per this function's contract.
        let text = match unsafe { c_str(prompt, "prompt") } {
            Ok(t) => t,
            Err(s) => return s,
        };
        // SAFETY: per this function's contract.
        let inputs = match unsafe { read_images(images, n_images) } {
            Ok(i) => i,
            Err(s) => return s,
        };
        let prompt = match Prompt::parse(text, inputs) {
            Ok(p) => p,
            Err(e) => return fail(status_of(&e), e.to_string()),
        };
        let mut guard = model.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (pkg, cache) = &mut *guard;
        match pkg.score(cache, &[prompt], add_eos) {
            Ok(mut scored) => {
                let s = scored.remove(0);
                let n = s.tokens.len();
                let logprobs: Vec<f32> = s.logprobs.iter().map(|l| l.unwrap_or(f32::NAN)).collect();
                // SAFETY: checked non-NULL above.
                unsafe {
                    *out_tokens = Box::into_raw(s.tokens.into_boxed_slice()) as *mut u32;
                    *out_logprobs = Box::into_raw(logprobs.into_boxed_slice()) as *mut f32;
                    *out_n = n;
                }
                kosmos_status::KOSMOS_OK
            }
            Err(e) => fail(status_of(&e), e.to_string()),
        }
    })
}

/// Release log-probabilities returned by `kosmos_score` (NULL is ignored).
///
/// # Safety
/// `logprobs` is NULL or an array `kosmos_score` returned with `n` values, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_logprobs_free(logprobs: *mut f32, n: usize) {
    if !logprobs.is_null() {
        // SAFETY: per the contract, `logprobs` came from a boxed slice of `n` values.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(logprobs, n)) });
    }
}
