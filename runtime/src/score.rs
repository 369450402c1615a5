//! Teacher-forced scoring: the log-probability a package gives each token of a prompt given the
//! tokens before it, from one decoder call (OpenAI's `echo` with `logprobs`, llama.cpp's
//! `perplexity`). `kosmos-rt eval` turns it into loss and perplexity.

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

impl Package {
    /// Score `prompts` in one batch; with `eos`, each ends with `</s>` (scoring that the text
    /// ends there).
    pub fn score(&mut self, cache: &mut VisionCache, prompts: &[Prompt], eos: bool) -> Result<Vec<Scored>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
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

/// log softmax(`logits`)[`id`], the sum in f64.
fn logprob(logits: &[f32], id: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - m).exp()).sum();
    (f64::from(logits[id] - m) - sum.ln()) as f32
}
