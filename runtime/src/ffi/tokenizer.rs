//! The package's tokenizer through the C ABI (`kosmos_tokenizer_*`), as llama.h's
//! `llama_tokenize` / `llama_detokenize` and ONNX Runtime GenAI's `OgaTokenizer` offer it: token
//! counts for budgeting, and the text of the token ids the engine reports (DONE events,
//! log-probabilities). Opening one reads the package's manifest and `tokenizer.json` only.

use std::ffi::{CString, c_char};
use std::path::PathBuf;

use kosmos_models::KosmosTokenizer;
use kosmos_models::package::PackageManifest;

use super::{Handles, c_str, clear_out, fail, free_handle, guard, kosmos_status};
use crate::package::open_tokenizer;

/// A package's tokenizer (opaque); any number of threads may use one at once.
pub struct kosmos_tokenizer {
    tokenizer: KosmosTokenizer,
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
            .and_then(|m| open_tokenizer(&dir, &m));
        match opened {
            // SAFETY: `out` was checked non-NULL above.
            Ok(tokenizer) => unsafe { TOKENIZERS.publish(kosmos_tokenizer { tokenizer }, out) },
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

/// Release ids returned by `kosmos_tokenize` (NULL is ignored).
///
/// # Safety
/// `ids` is NULL or an array `kosmos_tokenize` returned with `n` ids, not yet freed.
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
