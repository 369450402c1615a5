//! OpenAI's two `logprobs` shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
//! and the legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

use kosmos_models::KosmosTokenizer;
use serde_json::{Map, Value, json};

use crate::logprobs::TokenLogprob;

/// A token as OpenAI lists it: its text, or `bytes:\xHH…` when its bytes are not whole UTF-8
/// (a character split over byte pieces), and the bytes.
fn token_text(tok: &KosmosTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    let text = match std::str::from_utf8(&bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{hex}")
        }
    };
    (text, bytes)
}

/// Chat completions' `logprobs` for `entries`.
pub fn chat(tok: &KosmosTokenizer, entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let (token, bytes) = token_text(tok, e.token);
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|&(id, lp)| {
                    let (token, bytes) = token_text(tok, id);
                    json!({"token": token, "logprob": lp, "bytes": bytes})
                })
                .collect();
            json!({"token": token, "logprob": e.logprob, "bytes": bytes, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

/// Legacy completions' `logprobs` for `entries`. `before` holds the choice's tokens before them
/// (empty at its start) and takes theirs, so a stream's chunks continue the offsets.
pub fn completion(tok: &KosmosTokenizer, entries: &[TokenLogprob], before: &mut Vec<u32>) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        // Where the token starts in the choice's text, which is the decoding of all its tokens
        // (special tokens skipped, the first word's leading space dropped).
        offsets.push(tok.decode(before).map_or(0, |t| t.chars().count()));
        before.push(e.token);
        tokens.push(token_text(tok, e.token).0);
        lps.push(e.logprob);
        let top: Map<String, Value> = e
            .top
            .iter()
            .map(|&(id, lp)| (token_text(tok, id).0, json!(lp)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
