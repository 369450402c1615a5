//! Speculative decoding with a draft model (llama.cpp's `--model-draft`, vLLM's and
//! TensorRT-LLM's draft-target speculation): a smaller package with the same vocabulary reads the
//! prompt (its own vision tower sees the images) and every token generated, and guesses the next
//! few greedily, one cheap decoder call each. The target checks them as it checks prompt
//! lookup's guesses ([`crate::speculate`]): its logits at every fed position are sampled in
//! order and the guesses are kept up to the first the sampler did not pick, so the output is the
//! target's own, token for token, whatever the draft guesses.
//!
//! This module is the draft over one generation at a time ([`Package::generate`]); the batching
//! engine gives it a pool row per sequence and guesses for all of them in the same calls
//! ([`crate::draft_batch`]).
//!
//! The draft's KV cache is kept in step with what the target keeps: after a call, the draft's
//! cache holds the prompt and the generated tokens up to the guesses kept; the slots of guesses
//! the target refused are overwritten by the next call, as the target's are.

use std::path::Path;

use kosmos_models::sequence::Assembled;

use crate::constrain::ActiveConstraint;
use crate::error::{Result, RtError};
use crate::generate::{Cache, Prompt, VisionCache};
use crate::package::Package;

/// A draft model and how sure it must be to guess.
pub struct Draft {
    pub(crate) pkg: Package,
    /// Its own image embeddings: the target's differ, even for the same pixels.
    pub(crate) vision: VisionCache,
    /// Guessing stops at a token the draft gives less than this probability (llama.cpp's
    /// `--draft-p-min`): a guess it is unsure of is seldom kept and costs a draft call and a
    /// position in the target's call.
    pub p_min: f32,
}

impl std::fmt::Debug for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("dir", &self.pkg.dir)
            .field("p_min", &self.p_min)
            .finish()
    }
}

/// The default of [`Draft::p_min`], llama.cpp's.
pub fn default_p_min() -> f32 {
    0.75
}

/// A draft's minimum probability must be one: a message saying so otherwise.
pub fn check_p_min(p_min: f32) -> std::result::Result<(), String> {
    if (0.0..=1.0).contains(&p_min) {
        Ok(())
    } else {
        Err(format!(
            "the draft's minimum probability must be in [0, 1], not {p_min}"
        ))
    }
}

impl Draft {
    /// `pkg` as a draft: its KV cache must be the buffer layout (a refused guess's slot is
    /// overwritten, not cut out), `p_min` a probability.
    pub fn new(pkg: Package, p_min: f32) -> Result<Self> {
        check_p_min(p_min).map_err(RtError::Input)?;
        if pkg.manifest.decoder.kv_cache != kosmos_models::package::KvCacheLayout::Buffer {
            return Err(RtError::Package {
                path: pkg.dir.clone(),
                message: "a draft model needs a decoder that updates its KV cache in place; \
                          re-export it with `kosmos-export <ckpt> --to onnx --kv-cache buffer`"
                    .into(),
            });
        }
        Ok(Draft {
            pkg,
            vision: VisionCache::new(16),
            p_min,
        })
    }

    /// The draft's package directory.
    pub fn dir(&self) -> &Path {
        &self.pkg.dir
    }

    /// Refuses a target whose token ids mean something else to the draft.
    pub(crate) fn check_pairs_with(&self, target: &Package) -> Result<()> {
        match target.tokenizer.vocabulary_difference(&self.pkg.tokenizer) {
            None => Ok(()),
            Some(d) => Err(RtError::Package {
                path: self.pkg.dir.clone(),
                message: format!(
                    "this draft model's vocabulary is not {}'s ({d}); a draft must share the \
                     target's tokenizer",
                    target.dir.display()
                ),
            }),
        }
    }

    /// Read `prompt` (images preprocessed for and encoded by the draft's vision tower) into a
    /// fresh cache with room for `max_tokens` generated tokens.
    pub(crate) fn start(&mut self, prompt: &Prompt, max_tokens: usize) -> Result<DraftRun> {
        let a = self.pkg.assemble(prompt)?;
        let pixels: Vec<Vec<f32>> = prompt
            .images
            .iter()
            .map(|img| self.pkg.preprocess(img))
            .collect::<Result<_>>()?;
        self.prefill(a, &pixels, max_tokens)
    }

    /// The draft's assembly of a prompt the target assembled with `tokens_per_image` slots per
    /// image: the same tokens, each image with the draft's number of slots. (The batching
    /// engine gives the draft the target's preprocessed pixels, so it refuses a draft whose
    /// image size differs.)
    pub(crate) fn assembly_of(&self, target: &Assembled, tokens_per_image: usize) -> Assembled {
        let slot = self.pkg.manifest.config.tokenizer.image_slot_id();
        let per = self.pkg.manifest.vision.tokens_per_image;
        let mut a = Assembled {
            input_ids: Vec::with_capacity(target.len()),
            image_mask: Vec::with_capacity(target.len()),
            num_images: target.num_images,
        };
        let mut slots = 0;
        for (&id, &image) in target.input_ids.iter().zip(&target.image_mask) {
            if !image {
                a.input_ids.push(id);
                a.image_mask.push(false);
                continue;
            }
            // An image's first slot stands for all of the draft's.
            if slots % tokens_per_image.max(1) == 0 {
                a.input_ids.extend(std::iter::repeat_n(slot, per));
                a.image_mask.extend(std::iter::repeat_n(true, per));
            }
            slots += 1;
        }
        a
    }

    /// The draft's prefill of its own assembly `a` of the prompt, whose images are `pixels`.
    fn prefill(&mut self, a: Assembled, pixels: &[Vec<f32>], max_tokens: usize) -> Result<DraftRun> {
        let len = a.len();
        let capacity = (len + max_tokens).min(self.pkg.context_length());
        if len >= capacity {
            // Longer than the draft's context: it cannot guess for this prompt.
            return Ok(DraftRun::none());
        }
        let embeds = self.pkg.encode_images(&mut self.vision, pixels)?;
        let n_tok = embeds.iter().map(|e| e.len()).sum::<usize>() / self.pkg.manifest.decoder.hidden_size;
        let embeds: Vec<f32> = embeds.iter().flat_map(|e| e.iter().copied()).collect();
        let (ids, img, attn) = self.pkg.left_padded(std::slice::from_ref(&a), len);
        let mut kv = self.pkg.empty_cache(1, capacity)?;
        self.pkg
            .decode(&ids, &img, (&embeds, n_tok), &attn, (1, 1), &mut kv)?;
        Ok(DraftRun {
            kv: Some(kv),
            prompt_len: len,
            capacity,
            synced: 0,
            fed_guesses: 0,
        })
    }

    /// Up to `limit` guesses to follow `generated` (every token the target has generated so
    /// far; the draft first reads those it has not read), each the draft's most likely next
    /// token, stopping at one it gives less than [`Draft::p_min`]. Under structured output
    /// (`constraint`: the row's, left where it was) only tokens the grammar allows are guessed:
    /// a guess it forbids would never be kept.
    pub(crate) fn propose(
        &mut self,
        run: &mut DraftRun,
        generated: &[u32],
        limit: usize,
        constraint: Option<&mut ActiveConstraint>,
    ) -> Result<Vec<u32>> {
        let todo = generated.len().saturating_sub(run.synced);
        // Past the draft's cache (its context, or the room made for this generation): no more
        // guesses for this sequence.
        if limit == 0 || todo == 0 || run.kv.is_none() || run.prompt_len + generated.len() >= run.capacity {
            return Ok(Vec::new());
        }
        match constraint {
            None => self.guess(run, generated, limit, None),
            Some(c) => {
                let at = c.snapshot();
                let guesses = self.guess(run, generated, limit, Some(&mut *c));
                c.restore(at);
                guesses
            }
        }
    }

    fn guess(
        &mut self,
        run: &mut DraftRun,
        generated: &[u32],
        limit: usize,
        mut constraint: Option<&mut ActiveConstraint>,
    ) -> Result<Vec<u32>> {
        let mut guesses = Vec::new();
        let eos = self.pkg.manifest.config.tokenizer.eos_token_id;
        let vocab = self.pkg.manifest.decoder.vocab_size;
        let Some(kv) = run.kv.as_mut() else {
            return Ok(guesses);
        };
        let mut feed: Vec<i64> = generated[run.synced..].iter().map(|&t| t as i64).collect();
        run.synced = generated.len();
        run.fed_guesses = 0;
        loop {
            let past = kv.len;
            if past + feed.len() > run.capacity {
                break;
            }
            let mask = vec![1i64; past + feed.len()];
            let no_img = vec![false; feed.len()];
            let mut logits = self.pkg.decode(&feed, &no_img, (&[], 0), &mask, (1, 1), kv)?;
            debug_assert_eq!(logits.len(), vocab);
            if !guesses.is_empty() {
                run.fed_guesses += 1;
            }
            if let Some(c) = constraint.as_deref_mut() {
                // Nothing allowed (or left possible): no guess; the target says why, if it must.
                if c.restrict(&mut logits, false, true).is_err() {
                    break;
                }
            }
            let (best, p) = most_likely(&logits);
            if p < self.p_min {
                break;
            }
            guesses.push(best);
            if guesses.len() == limit || best == eos {
                break;
            }
            if let Some(c) = constraint.as_deref_mut() {
                c.advance(best, false);
            }
            feed = vec![best as i64];
        }
        Ok(guesses)
    }

    /// The target kept `kept` of the guesses last proposed (or of others, such as the text a
    /// grammar forced: then `proposed` is false and the draft has read none of them): the
    /// draft's cache keeps those it read and forgets the rest.
    pub(crate) fn kept(&self, run: &mut DraftRun, kept: usize, proposed: bool) {
        let read = if proposed { run.fed_guesses.min(kept) } else { 0 };
        run.synced += read;
        run.fed_guesses = 0;
        if let Some(kv) = run.kv.as_mut() {
            kv.len = run.prompt_len + run.synced;
        }
    }
}

/// A draft's state through one generation.
pub(crate) struct DraftRun {
    /// `None` when the prompt does not fit the draft's context.
    kv: Option<Cache>,
    /// Slots of the prompt (the draft's assembly: its own image slots).
    prompt_len: usize,
    /// Slots of the cache: the prompt and the generation's `max_tokens`, within the context.
    capacity: usize,
    /// Generated tokens whose keys and values the draft's cache holds, in order after the prompt.
    synced: usize,
    /// Of the guesses last proposed, those fed to the draft (all but the last, or all when it
    /// stopped at an unsure one): their keys and values follow the synced tokens.
    fed_guesses: usize,
}

impl DraftRun {
    /// A run that never guesses (the draft cannot follow this sequence).
    pub(crate) fn none() -> Self {
        DraftRun {
            kv: None,
            prompt_len: 0,
            capacity: 0,
            synced: 0,
            fed_guesses: 0,
        }
    }
}

/// The arg max of `logits` and its softmax probability.
pub(crate) fn most_likely(logits: &[f32]) -> (u32, f32) {
    let (best, &max) =
        logits.iter().enumerate().fold(
            (0, &f32::NEG_INFINITY),
            |acc, (i, v)| if *v > *acc.1 { (i, v) } else { acc },
        );
    let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    (best as u32, 1.0 / sum)
}

#[cfg(test)]
mod tests {
    use super::most_likely;

    #[test]
    fn the_most_likely_token_and_its_probability() {
        let (t, p) = most_likely(&[0.0, 2.0, 1.0, 2.0f32.ln() + 0.0]);
        assert_eq!(t, 1);
        let want = 2f32.exp() / (1.0 + 2f32.exp() + 1f32.exp() + 2.0);
        assert!((p - want).abs() < 1e-6, "{p} vs {want}");
        let (t, p) = most_likely(&[-1e30, 5.0, -1e30]);
        assert_eq!((t, p), (1, 1.0));
    }
}
