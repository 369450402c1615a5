//! Teacher-forced scoring: the log-probability a package gives each token of a prompt given the
//! tokens before it, from one decoder call per batch whose logits fit 256 MiB (OpenAI's
//! `echo` with `logprobs`, llama.cpp's `perplexity`). `kosmos-rt eval` turns it into loss and perplexity.

use kosmos_models::sequence::Assembled;

use crate::error::Result;
use crate::generate::{Prompt, VisionCache};
use crate::package::Package;

/// One scored prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// The prompt's tokens (image slots included, `</s>` last when asked for).
    pub tokens: Vec<u32>,
    /// Each token's natural-log probability given the tokens before it: `None` for the first
    /// token and for image slots, which the model does not predict.
    pub logprobs: Vec<Option<f32>>,
}

/// The most bytes of logits one scoring call may return. A call returns every position's
/// logits (rows × width × vocabulary floats: 0.6 GB for 16 rows of 300 tokens with a 32002-token
/// vocabulary), so longer batches are scored in several calls.
const LOGITS_BUDGET_BYTES: usize = 256 << 20;

impl Package {
    /// Score `prompts`; with `eos`, each ends with `</s>` (scoring that the text ends there).
    /// One decoder call scores as many prompts as fit 256 MiB of logits (at least one).
    pub fn score(&mut self, cache: &mut VisionCache, prompts: &[Prompt], eos: bool) -> Result<Vec<Scored>> {
        let end = self.manifest.config.tokenizer.eos_token_id;
        let mut assembled = prompts
            .iter()
            .map(|p| self.assemble(p))
            .collect::<Result<Vec<_>>>()?;
        if eos {
            for a in &mut assembled {
                a.input_ids.push(end);
                a.image_mask.push(false);
            }
        }
        let row_bytes = self.manifest.decoder.vocab_size * std::mem::size_of::<f32>();
        let mut scored = Vec::with_capacity(prompts.len());
        let mut rest = assembled;
        let mut first = 0;
        while !rest.is_empty() {
            let n = calls_rows(&rest, row_bytes, LOGITS_BUDGET_BYTES);
            let tail = rest.split_off(n);
            scored.extend(self.score_call(cache, &prompts[first..first + n], rest)?);
            first += n;
            rest = tail;
        }
        Ok(scored)
    }

    /// One decoder call scoring `assembled` (the assembly of `prompts`).
    fn score_call(
        &mut self,
        cache: &mut VisionCache,
        prompts: &[Prompt],
        assembled: Vec<Assembled>,
    ) -> Result<Vec<Scored>> {
        let b = prompts.len();
        let width = assembled.iter().map(|a| a.len()).max().unwrap_or(0);
        self.check_context(width, 0)?;
        let (image_embeds, n_tok) = self.prompt_image_embeds(cache, prompts)?;
        let (ids, img, attn) = self.left_padded(&assembled, width);
        let mut kv = self.empty_cache(b, width)?;
        let logits = self.decode(&ids, &img, (&image_embeds, n_tok), &attn, (b, width), &mut kv)?;
        let vocab = self.manifest.decoder.vocab_size;
        Ok(assembled
            .into_iter()
            .enumerate()
            .map(|(r, a)| {
                let first = r * width + width - a.len();
                let logprobs = (0..a.len())
                    .map(|j| {
                        (j > 0 && !a.image_mask[j]).then(|| {
                            let at = (first + j - 1) * vocab;
                            logprob(&logits[at..at + vocab], a.input_ids[j] as usize)
                        })
                    })
                    .collect();
                Scored {
                    tokens: a.input_ids,
                    logprobs,
                }
            })
            .collect())
    }
}

/// How many of `rows` (from the first) one call scores: the most whose logits, at the width of
/// the longest of them, fit in `budget` bytes, and at least one.
fn calls_rows(rows: &[Assembled], row_bytes: usize, budget: usize) -> usize {
    let mut width = 0;
    for (n, a) in rows.iter().enumerate() {
        width = width.max(a.len());
        if n > 0 && (n + 1) * width * row_bytes > budget {
            return n;
        }
    }
    rows.len()
}

/// log softmax(`logits`)[`id`], the sum in f64.
fn logprob(logits: &[f32], id: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - m).exp()).sum();
    (f64::from(logits[id] - m) - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(lens: &[usize]) -> Vec<Assembled> {
        lens.iter()
            .map(|&n| Assembled {
                input_ids: vec![1; n],
                image_mask: vec![false; n],
                num_images: 0,
            })
            .collect()
    }

    #[test]
    fn a_call_takes_the_rows_whose_logits_fit_the_budget() {
        // 10 bytes per position: 3 rows of width 4 are 120 bytes.
        assert_eq!(calls_rows(&rows(&[4, 4, 4, 4]), 10, 120), 3);
        // The widest row so far sets the width: 2 rows × 7 positions = 140 > 120.
        assert_eq!(calls_rows(&rows(&[4, 7, 1]), 10, 120), 1);
        assert_eq!(calls_rows(&rows(&[2, 2]), 10, 1000), 2);
        // One row always goes, whatever its size.
        assert_eq!(calls_rows(&rows(&[100, 1]), 10, 120), 1);
    }
}
