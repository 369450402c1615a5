//! Speculative decoding by prompt lookup (vLLM's `ngram` method, TensorRT-LLM's prompt-lookup
//! decoding, llama.cpp's lookup decoding): the tokens that followed the latest earlier occurrence
//! of a sequence's last n tokens (in its prompt's text or in what it generated) are guessed to
//! follow again; under structured output, the text the grammar forces
//! ([`kosmos_grammar::Matcher::forced`]) comes first. A decoder call feeds the next token and those guesses; the logits of every position
//! are then sampled in order, exactly as one call per token would have sampled them (the same
//! penalties, constraint and random draws), and the guesses are kept up to the first one the
//! sampler did not pick. So the output is the one decoding without speculation gives, and each
//! call yields 1 + (guesses kept) tokens for one read of the weights.

/// How to speculate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speculation {
    /// Guessed tokens fed per decoder call, at most (vLLM's `num_speculative_tokens`).
    pub tokens: usize,
    /// The longest n-gram looked up (vLLM's `prompt_lookup_max`); longer ones are tried first.
    pub ngram_max: usize,
    /// The shortest n-gram looked up (vLLM's `prompt_lookup_min`).
    pub ngram_min: usize,
    /// The server speculates only while at most this many sequences decode together: on a
    /// saturated CPU every guessed token costs compute that the rejected ones waste (vLLM's
    /// `disable_by_batch_size`).
    pub max_batch: usize,
    /// How many guesses each call feeds.
    pub schedule: GuessSchedule,
}

/// How many guesses a sequence's calls feed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuessSchedule {
    /// [`GuessSchedule::Adaptive`] for packages with quantised linears, whose decoder calls on
    /// a CPU cost more with every position; [`GuessSchedule::Fixed`] for the others, where a call
    /// of a few positions costs what one of one does (memory-bound).
    #[default]
    Auto,
    /// Up to [`Speculation::tokens`] every call.
    Fixed,
    /// Two more after a call that kept them all, one fewer (at least one) after one that did
    /// not: Hugging Face's "heuristic" schedule, so a sequence whose guesses miss stops paying
    /// for long feeds.
    Adaptive,
}

impl Default for Speculation {
    fn default() -> Self {
        Speculation {
            tokens: 4,
            ngram_max: 3,
            ngram_min: 1,
            max_batch: 4,
            schedule: GuessSchedule::Auto,
        }
    }
}

impl Speculation {
    /// The settings' own consistency: a message naming the setting that is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.tokens == 0 || self.tokens > 32 {
            return Err(format!(
                "speculative tokens must be in 1..=32, not {}",
                self.tokens
            ));
        }
        if self.ngram_min == 0 {
            return Err("the shortest prompt-lookup n-gram must be at least 1".into());
        }
        if self.ngram_max < self.ngram_min {
            return Err(format!(
                "the longest prompt-lookup n-gram ({}) is shorter than the shortest ({})",
                self.ngram_max, self.ngram_min
            ));
        }
        if self.max_batch == 0 {
            return Err("speculative max batch must be at least 1".into());
        }
        Ok(())
    }

    /// Up to `limit` (and [`Self::tokens`]) guessed tokens to follow `history`: what followed the
    /// latest earlier occurrence of its last n tokens, the longest n from `ngram_max` down to
    /// `ngram_min` that occurs. Empty when nothing matches.
    pub fn propose(&self, history: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.tokens);
        let len = history.len();
        if limit == 0 {
            return Vec::new();
        }
        for n in (self.ngram_min..=self.ngram_max.min(len.saturating_sub(1))).rev() {
            let tail = &history[len - n..];
            // Latest first; the match must leave at least one token after it.
            if let Some(start) = (0..len - n).rev().find(|&i| history[i..i + n] == *tail) {
                let from = start + n;
                return history[from..(from + limit).min(len)].to_vec();
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tokens: usize, min: usize, max: usize) -> Speculation {
        Speculation {
            tokens,
            ngram_min: min,
            ngram_max: max,
            max_batch: 4,
            schedule: GuessSchedule::Fixed,
        }
    }

    #[test]
    fn the_latest_occurrence_of_the_longest_ngram_is_continued() {
        // "1 2 3" occurs at 0 (then 4 5) and at 5 (then 9 9); its latest occurrence wins.
        let h = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 7, 1, 2, 3];
        assert_eq!(spec(2, 1, 3).propose(&h, 8), vec![9, 9]);
        // Longest first: "7 2 3" never occurred, "2 3" did (latest at 6).
        let h = [2, 3, 5, 6, 2, 3, 8, 7, 2, 3];
        assert_eq!(spec(3, 2, 3).propose(&h, 8), vec![8, 7, 2]);
        // A shorter n-gram only when no longer one matches: "3" → what followed the last "3".
        let h = [4, 3, 6, 1, 5, 3];
        assert_eq!(spec(4, 1, 3).propose(&h, 8), vec![6, 1, 5, 3]);
        assert_eq!(spec(4, 2, 3).propose(&h, 8), Vec::<u32>::new());
    }

    #[test]
    fn guesses_stop_at_the_limit_and_the_history() {
        let h = [1, 2, 3, 4, 5, 6, 1, 2];
        assert_eq!(spec(8, 1, 2).propose(&h, 3), vec![3, 4, 5]);
        assert_eq!(spec(2, 1, 2).propose(&h, 8), vec![3, 4]);
        assert_eq!(spec(4, 1, 2).propose(&h, 0), Vec::<u32>::new());
        // The continuation runs to the history's end and no further.
        let h = [7, 8, 7];
        assert_eq!(spec(4, 1, 3).propose(&h, 8), vec![8, 7]);
    }

    #[test]
    fn short_histories_propose_nothing() {
        assert_eq!(spec(4, 1, 3).propose(&[], 8), Vec::<u32>::new());
        assert_eq!(spec(4, 1, 3).propose(&[1], 8), Vec::<u32>::new());
        assert_eq!(spec(4, 1, 3).propose(&[1, 1], 8), vec![1]);
    }

    #[test]
    fn bad_settings_are_named() {
        for (s, what) in [
            (spec(0, 1, 3), "speculative tokens"),
            (spec(33, 1, 3), "speculative tokens"),
            (spec(4, 0, 3), "shortest"),
            (spec(4, 3, 2), "longest"),
            (
                Speculation {
                    max_batch: 0,
                    ..Speculation::default()
                },
                "max batch",
            ),
        ] {
            let e = s.check().unwrap_err();
            assert!(e.contains(what), "{e}");
        }
        Speculation::default().check().unwrap();
    }
}
