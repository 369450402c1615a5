//! The package's tokenizer through the C ABI (`kosmos_tokenizer_*`), as llama.h's
//! `llama_tokenize` / `llama_detokenize` and ONNX Runtime GenAI's `OgaTokenizer` offer it: token
//! counts for budgeting, and the text of the token ids the engine reports (DONE events,
//! log-probabilities). Opening one reads the package's manifest and `tokenizer.json` only.

use std::ffi::{CString, c_char};
use std::path::PathBuf;

use kosmos_models::KosmosTokenizer;
use kosmos_models::package::PackageManifest;

use super::{Handles, c_str, clear_out, fail, free_handle, guard, kosmos_status};
use crate::chat::{ChatTemplate, Message, prompt_text};
use crate::package::open_tokenizer;

/// A package's tokenizer (opaque); any number of threads may use one at once.
pub struct kosmos_tokenizer {
    tokenizer: KosmosTokenizer,
    /// The package's chat template; one that does not parse fails `kosmos_chat_prompt`, not
    /// the opening (token counts do not need it).
    chat: Result<ChatTemplate, String>,
}

static TOKENIZERS: Handles = Handles::new();

/// The tokenizer behind a live handle.
///
/// # Safety
/// A live `tokenizer` is not freed during the call using it (the functions' contracts).
unsafe fn live<'a>(tokenizer: *const kosmos_tokenizer) -> Result<&'a KosmosTokenizer, kosmos_status> {
    // SAFETY: per this function's contract.
    unsafe { TOKENIZERS.get(tokenizer, "tokenizer") }.map(|t| &t.tokenizer)
}

/// The chat template behind a live handle (as [`live`]).
///
/// # Safety
/// As [`live`].
unsafe fn live_chat<'a>(tokenizer: *const kosmos_tokenizer) -> Result<&'a ChatTemplate, kosmos_status> {
    // SAFETY: per this function's contract.
    let handle: &kosmos_tokenizer = unsafe { TOKENIZERS.get(tokenizer, "tokenizer") }?;
    handle
        .chat
        .as_ref()
        .map_err(|e| fail(kosmos_status::KOSMOS_ERR_PACKAGE, e.clone()))
}

/// Open the tokenizer of the package in `package_dir`. On success `*out` holds a tokenizer to
/// release with `kosmos_tokenizer_free`.
///
/// # Safety
/// `package_dir` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_tokenizer_open(
    package_dir: *const c_char,
    out: *mut *mut kosmos_tokenizer,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        if let Err(s) = unsafe { clear_out(out, "out") } {
            return s;
        }
        // SAFETY: per this function's contract.
        let dir = match unsafe { c_str(package_dir, "package_dir") } {
            Ok(d) => PathBuf::from(d),
            Err(s) => return s,
        };
        let opened = PackageManifest::load(&dir)
            .map_err(crate::error::RtError::from)
            .and_then(|m| open_tokenizer(&dir, &m).map(|t| (m, t)));
        match opened {
            Ok((manifest, tokenizer)) => {
                let chat = ChatTemplate::new(&manifest, &dir, &tokenizer).map_err(|e| e.to_string());
                // SAFETY: `out` was checked non-NULL above.
                unsafe { TOKENIZERS.publish(kosmos_tokenizer { tokenizer, chat }, out) }
            }
            Err(e) => fail(kosmos_status::KOSMOS_ERR_PACKAGE, e.to_string()),
        }
    })
}

/// Release a tokenizer (NULL is ignored; freeing twice is refused).
///
/// # Safety
/// `tokenizer` is NULL or a handle from `kosmos_tokenizer_open`, not in use by another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_tokenizer_free(tokenizer: *mut kosmos_tokenizer) -> kosmos_status {
    // SAFETY: per this function's contract.
    unsafe { free_handle(tokenizer, &TOKENIZERS, "tokenizer") }
}

/// The token ids of `text` (UTF-8; `<image>` is plain text here), with `<s>` first when
/// `add_bos` (every prompt starts with it). On success `*out_ids` holds `*out_n` ids, to
/// release with `kosmos_tokens_free` (NULL when there are none).
///
/// # Safety
/// `tokenizer` is a handle from `kosmos_tokenizer_open` (or NULL); `text` a NUL-terminated
/// string; `out_ids` and `out_n` are writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_tokenize(
    tokenizer: *const kosmos_tokenizer,
    text: *const c_char,
    add_bos: bool,
    out_ids: *mut *mut u32,
    out_n: *mut usize,
) -> kosmos_status {
    guard(|| {
        if out_ids.is_null() || out_n.is_null() {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "out_ids or out_n is NULL",
            );
        }
        // SAFETY: checked non-NULL; the caller owns the slots.
        unsafe {
            *out_ids = std::ptr::null_mut();
            *out_n = 0;
        }
        // SAFETY: per this function's contract.
        let tok = match unsafe { live(tokenizer) } {
            Ok(t) => t,
            Err(s) => return s,
        };
        // SAFETY: per this function's contract.
        let text = match unsafe { c_str(text, "text") } {
            Ok(t) => t,
            Err(s) => return s,
        };
        let mut ids = Vec::new();
        if add_bos {
            ids.push(tok.special().bos_token_id);
        }
        match tok.encode(text) {
            Ok(t) => ids.extend(t),
            Err(e) => return fail(kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT, e.to_string()),
        }
        if ids.is_empty() {
            return kosmos_status::KOSMOS_OK;
        }
        let n = ids.len();
        let ids = Box::into_raw(ids.into_boxed_slice()) as *mut u32;
        // SAFETY: checked non-NULL above.
        unsafe {
            *out_ids = ids;
            *out_n = n;
        }
        kosmos_status::KOSMOS_OK
    })
}

/// Release ids returned by `kosmos_tokenize` or `kosmos_score` (NULL is ignored).
///
/// # Safety
/// `ids` is NULL or an array `kosmos_tokenize` or `kosmos_score` returned with `n` ids, not
/// yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_tokens_free(ids: *mut u32, n: usize) {
    if !ids.is_null() {
        // SAFETY: per the contract, `ids` came from a boxed slice of `n` ids.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ids, n)) });
    }
}

/// The text of `n` token ids (special tokens skipped), as the engine's DONE text is made. On
/// success `*out_text` holds it, to release with `kosmos_string_free`. An id outside the
/// vocabulary is refused, naming it.
///
/// # Safety
/// `tokenizer` is a handle from `kosmos_tokenizer_open` (or NULL); `ids` points to `n` ids (or
/// is NULL with `n` 0); `out_text` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_detokenize(
    tokenizer: *const kosmos_tokenizer,
    ids: *const u32,
    n: usize,
    out_text: *mut *mut c_char,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        if let Err(s) = unsafe { clear_out(out_text, "out_text") } {
            return s;
        }
        // SAFETY: per this function's contract.
        let tok = match unsafe { live(tokenizer) } {
            Ok(t) => t,
            Err(s) => return s,
        };
        if ids.is_null() && n > 0 {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                "ids is NULL but n > 0",
            );
        }
        let ids = if n == 0 {
            &[][..]
        } else {
            // SAFETY: `ids` holds `n` ids per the contract.
            unsafe { std::slice::from_raw_parts(ids, n) }
        };
        let vocab = tok.vocab_size();
        if let Some(i) = ids.iter().position(|&id| id as usize >= vocab) {
            return fail(
                kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT,
                format!(
                    "ids[{i}] = {} is not a token id of this model (0..{vocab})",
                    ids[i]
                ),
            );
        }
        match tok.decode(ids) {
            Ok(text) => {
                let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
                // SAFETY: checked non-NULL above.
                unsafe { *out_text = c.into_raw() };
                kosmos_status::KOSMOS_OK
            }
            Err(e) => fail(kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT, e.to_string()),
        }
    })
}

/// The prompt a chat makes, as the server builds it for `/v1/chat/completions`: `messages_json`
/// is OpenAI's message list (JSON: `role`, `content` as a string or parts of type `text` and
/// `image_url`; earlier `tool_calls`), rendered by the package's chat template if it has one,
/// else its parts in order with a newline between messages. Each image part becomes an
/// `<image>` marker: pass the images themselves, in order, to `kosmos_generate` or
/// `kosmos_engine_submit` with the prompt (their URLs are not read here). `add_generation_prompt`
/// opens the assistant's turn; `continue_final_message` instead goes on from the last message,
/// which must be the assistant's (not both). On success `*out_prompt` holds the prompt, to
/// release with `kosmos_string_free`, and `*out_n_images` (if not NULL) its image count.
///
/// # Safety
/// `tokenizer` is a handle from `kosmos_tokenizer_open` (or NULL); `messages_json` a
/// NUL-terminated string; `out_prompt` is writable; `out_n_images` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kosmos_chat_prompt(
    tokenizer: *const kosmos_tokenizer,
    messages_json: *const c_char,
    add_generation_prompt: bool,
    continue_final_message: bool,
    out_prompt: *mut *mut c_char,
    out_n_images: *mut usize,
) -> kosmos_status {
    guard(|| {
        // SAFETY: per this function's contract.
        if let Err(s) = unsafe { clear_out(out_prompt, "out_prompt") } {
            return s;
        }
        if !out_n_images.is_null() {
            // SAFETY: non-NULL, writable per the contract.
            unsafe { *out_n_images = 0 };
        }
        // SAFETY: per this function's contract.
        let chat = match unsafe { live_chat(tokenizer) } {
            Ok(c) => c,
            Err(s) => return s,
        };
        // SAFETY: per this function's contract.
        let json = match unsafe { c_str(messages_json, "messages_json") } {
            Ok(t) => t,
            Err(s) => return s,
        };
        let invalid = |m: String| fail(kosmos_status::KOSMOS_ERR_INVALID_ARGUMENT, m);
        let mut de = serde_json::Deserializer::from_str(json);
        let messages: Vec<Message> = match serde_path_to_error::deserialize(&mut de) {
            Ok(m) => m,
            Err(e) => {
                let path = e.path().to_string();
                return invalid(format!("messages_json at {path}: {}", e.into_inner()));
            }
        };
        let rendered = chat.render(&messages, Some(add_generation_prompt), continue_final_message);
        let (segments, images) = match rendered {
            Ok(r) => r,
            Err(e) => return invalid(e.to_string()),
        };
        let Ok(prompt) = CString::new(prompt_text(&segments)) else {
            return invalid("the chat's text contains a NUL character".into());
        };
        // SAFETY: checked non-NULL above; the NULL check on `out_n_images` guards the other.
        unsafe {
            *out_prompt = prompt.into_raw();
            if !out_n_images.is_null() {
                *out_n_images = images.len();
            }
        }
        kosmos_status::KOSMOS_OK
    })
}
