//! OpenAI's two `logprobs` shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
//! and the legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

use kosmos_models::KosmosTokenizer;
use serde_json::{Map, Value, json};

use crate::logprobs::TokenLogprob;

/// A token as OpenAI lists it: its text, or `bytes:\xHH…` when its bytes are not whole UTF-8
/// (a character split over byte pieces), and the bytes.
pub(super) fn token_text(tok: &KosmosTokenizer, id: u32) -> (String, Vec<u8>) {
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

/// Legacy completions' `logprobs` for `entries` (token, log-probability: `None` shows as null,
/// as for the first token of an echoed prompt). `before` holds the tokens of the same text
/// before them (empty at its start) and takes theirs; offsets count from `base` characters into
/// the choice's text, so a stream's chunks and an echoed prompt's completion continue them.
pub fn completion<'a>(
    tok: &KosmosTokenizer,
    entries: impl IntoIterator<Item = (u32, Option<&'a TokenLogprob>)>,
    before: &mut Vec<u32>,
    base: usize,
) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, e) in entries {
        // Where the token starts in the text, which is the decoding of all its tokens (special
        // tokens skipped, the first word's leading space dropped).
        offsets.push(base + tok.decode(before).map_or(0, |t| t.chars().count()));
        before.push(id);
        tokens.push(token_text(tok, id).0);
        lps.push(e.map(|e| e.logprob));
        tops.push(match e {
            Some(e) => Value::Object(
                e.top
                    .iter()
                    .map(|&(id, lp)| (token_text(tok, id).0, json!(lp)))
                    .collect::<Map<String, Value>>(),
            ),
            None => Value::Null,
        });
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Generated tokens' entries, for [`completion`].
pub fn generated(entries: &[TokenLogprob]) -> impl Iterator<Item = (u32, Option<&TokenLogprob>)> {
    entries.iter().map(|e| (e.token, Some(e)))
}

/// An echoed prompt's entries, for [`completion`].
pub fn prompt(entries: &[(u32, Option<TokenLogprob>)]) -> impl Iterator<Item = (u32, Option<&TokenLogprob>)> {
    entries.iter().map(|(id, e)| (*id, e.as_ref()))
}

/// vLLM's `prompt_logprobs`: per prompt token null (the first, and image slots, which are
/// embeddings, not tokens) or `{"<id>": {"logprob", "rank", "decoded_token"}}` for the token
/// itself and the `k` most likely at its place (ranked 1..=k).
pub fn vllm_prompt(tok: &KosmosTokenizer, entries: &[(u32, Option<TokenLogprob>)], k: usize) -> Value {
    let entry = |id: u32, logprob: f32, rank: u32| {
        (
            id.to_string(),
            json!({"logprob": logprob, "rank": rank, "decoded_token": token_text(tok, id).0}),
        )
    };
    entries
        .iter()
        .map(|(_, e)| match e {
            None => Value::Null,
            Some(e) => {
                let mut m: Map<String, Value> = e
                    .top
                    .iter()
                    .take(k)
                    .enumerate()
                    .map(|(r, &(id, lp))| entry(id, lp, r as u32 + 1))
                    .collect();
                let (key, own) = entry(e.token, e.logprob, e.rank);
                m.insert(key, own);
                Value::Object(m)
            }
        })
        .collect()
}

/// `entries` with at most `k` alternatives each: echo's `logprobs: k` and `prompt_logprobs`
/// share one scoring, made for the larger of the two.
pub fn trimmed(entries: &[(u32, Option<TokenLogprob>)], k: usize) -> Vec<(u32, Option<TokenLogprob>)> {
    entries
        .iter()
        .map(|(id, e)| {
            let e = e.as_ref().map(|e| TokenLogprob {
                top: e.top.iter().take(k).copied().collect(),
                ..e.clone()
            });
            (*id, e)
        })
        .collect()
}

/// `a` followed by `b`, two legacy `logprobs` objects.
pub fn concat(mut a: Value, b: &Value) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a[key].as_array_mut(), b[key].as_array()) {
            x.extend(y.iter().cloned());
        }
    }
    a
}
