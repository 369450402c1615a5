//! vLLM's tokenizer endpoints: `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`.
//! Clients that score prompts by token (lm-evaluation-harness's `local-completions` detects
//! them and tokenizes through the server) get exactly the ids the model reads.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use kosmos_models::sequence::assemble;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::body::{RequestBody, parse};
use super::error::ApiError;
use super::logprobs::token_text;
use super::openai::{Message, token_ids};

#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    /// Lead with `<s>` as the completions and chat endpoints do (default true).
    add_special_tokens: Option<bool>,
    /// Messages only: open the assistant's turn, as the chat endpoint does (default true).
    add_generation_prompt: Option<bool>,
    /// Messages only: continue the final assistant message, as the chat endpoint does.
    continue_final_message: Option<bool>,
    /// List each token's text too (`token_strs`).
    return_token_strs: Option<bool>,
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<Value>,
}

impl RequestBody for TokenizeRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

impl RequestBody for DetokenizeRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// The ids the completions (`prompt`) or chat (`messages`) endpoint would feed the model. Images
/// are not fetched: each stands for its slots, so `count` equals the response's `prompt_tokens`.
pub async fn tokenize(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse(body, st.cfg.max_body_bytes).await?;
    if let Some(m) = req.model() {
        st.check_model(m)?;
    }
    let segments = match (&req.prompt, &req.messages) {
        (Some(text), None) => st.completion_segments(text)?,
        (None, Some(messages)) => {
            st.chat_prompt(
                messages,
                req.add_generation_prompt,
                req.continue_final_message.unwrap_or(false),
            )?
            .0
        }
        _ => {
            return Err(ApiError::invalid(
                "send either prompt (text) or messages (a chat)",
                "prompt",
            ));
        }
    };
    let assembled = assemble(
        &st.tokenizer,
        &segments,
        st.manifest.vision.tokens_per_image,
        false,
    )
    .map_err(|e| ApiError::invalid(e.to_string(), "prompt"))?;
    let mut tokens = assembled.input_ids;
    if !req.add_special_tokens.unwrap_or(true) {
        // `assemble` always leads with `<s>`.
        tokens.remove(0);
    }
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&id| token_text(&st.tokenizer, id).0)
            .collect::<Vec<_>>()
    });
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": st.manifest.decoder.context_length,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
    .into_response())
}

/// The text of token ids, special tokens skipped (as the endpoints decode generated text).
pub async fn detokenize(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = parse(body, st.cfg.max_body_bytes).await?;
    if let Some(m) = req.model() {
        st.check_model(m)?;
    }
    let ids = token_ids(&req.tokens, st.manifest.decoder.vocab_size, "tokens", "tokens")?;
    let prompt = st
        .tokenizer
        .decode(&ids)
        .map_err(|e| ApiError::invalid(e.to_string(), "tokens"))?;
    Ok(axum::Json(json!({ "prompt": prompt })).into_response())
}

/// The special tokens, the chat template and the context length.
pub async fn tokenizer_info(State(st): State<Arc<AppState>>) -> Response {
    let sp = st.tokenizer.special();
    axum::Json(json!({
        "tokenizer_class": "KosmosTokenizer",
        "bos_token": sp.bos_token,
        "eos_token": sp.eos_token,
        "pad_token": sp.pad_token,
        "unk_token": sp.unk_token,
        "image_start_token": sp.image_start_token,
        "image_end_token": sp.image_end_token,
        "add_bos_token": true,
        "add_eos_token": false,
        "chat_template": st.manifest.chat_template,
        "model_max_length": st.manifest.decoder.context_length,
        "vocab_size": st.manifest.decoder.vocab_size,
    }))
    .into_response()
}
