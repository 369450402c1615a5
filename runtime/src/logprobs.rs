//! Log-probabilities of generated tokens (OpenAI's `logprobs` / `top_logprobs`): the model's
//! log-softmax over the vocabulary, before temperature, top-k / top-p and the repetition penalty
//! shape the sampling distribution (what OpenAI and vLLM report by default).

/// The most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// 1 + the number of tokens more likely than `token` (vLLM's `rank`; ties share a rank).
    pub rank: u32,
    /// Up to the requested number of (token, log-probability), most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// `token`'s log-probability under `logits` (`[vocab]`), with the `top` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let top = top.min(logits.len());
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, order);
    }
    best.truncate(top);
    best.sort_unstable_by(order);
    let own = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(token as usize)),
        rank: 1 + logits.iter().filter(|&&x| x > own).count() as u32,
        top: best.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_most_likely_in_order() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let t = token_logprob(&logits, 2, 3);
        assert!((t.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        // Ties in logit go by token id.
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 3, 2]);
        let total: f64 = (0..5)
            .map(|i| (token_logprob(&logits, i, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 9).top.len(), 5);
        // Ranks: two tokens share the top logit.
        let ranks: Vec<u32> = (0..5).map(|i| token_logprob(&logits, i, 0).rank).collect();
        assert_eq!(ranks, [4, 1, 3, 1, 5]);
    }
}
