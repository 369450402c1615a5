//! Structured output during generation: a row's [`kosmos_grammar::Matcher`] restricts the
//! tokens it may pick to those whose text the grammar allows next, and `</s>` to where the text
//! is complete. The text a grammar sees is exactly the generated text the caller receives: each
//! token's decoded bytes, the first token's `▁` dropped as the tokenizer's decoder drops it.

use std::collections::HashMap;
use std::sync::Arc;

use kosmos_grammar::{Grammar, Matcher, TokenTrie};
use kosmos_models::KosmosTokenizer;

use crate::error::{Result, RtError};

/// Most forced text looked at for one call's guesses (a call guesses at most 32 tokens).
const FORCED_BYTES: usize = 256;

/// The vocabulary as the matcher sees it, built once per package.
pub struct ConstraintVocab {
    /// Tokens by their decoded bytes after other tokens, and as the first token of the text.
    later: TokenTrie,
    first: TokenTrie,
    later_bytes: Vec<Vec<u8>>,
    first_bytes: Vec<Vec<u8>>,
    /// Special tokens: never allowed under a constraint (`</s>` is decided apart).
    special: Vec<bool>,
    eos: u32,
    /// Tokens by their text after other tokens, for spelling out forced text.
    by_text: std::sync::OnceLock<HashMap<Vec<u8>, u32>>,
    longest: usize,
}

impl ConstraintVocab {
    pub fn new(tok: &KosmosTokenizer, vocab_size: usize) -> ConstraintVocab {
        let mut special = vec![false; vocab_size];
        for (_, id) in tok.special().pairs() {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let ids = 0..vocab_size as u32;
        let later_bytes: Vec<Vec<u8>> = ids.clone().map(|t| tok.decoded_bytes(t, false)).collect();
        let first_bytes: Vec<Vec<u8>> = ids.map(|t| tok.decoded_bytes(t, true)).collect();
        let trie = |bytes: &[Vec<u8>]| {
            TokenTrie::new(
                bytes
                    .iter()
                    .enumerate()
                    .filter(|(t, _)| !special[*t])
                    .map(|(t, b)| (t as u32, b.as_slice())),
            )
        };
        ConstraintVocab {
            later: trie(&later_bytes),
            first: trie(&first_bytes),
            longest: later_bytes.iter().map(Vec::len).max().unwrap_or(0),
            by_text: std::sync::OnceLock::new(),
            later_bytes,
            first_bytes,
            special,
            eos: tok.special().eos_token_id,
        }
    }

    /// The trie of token texts at the start of a text (`first`) or after other tokens.
    pub fn trie(&self, first: bool) -> &TokenTrie {
        if first { &self.first } else { &self.later }
    }

    /// Which tokens may come after `text` under `grammar` (`allowed[t]`, `</s>` included):
    /// what generation masks with, for tools and measurements. `None` when the grammar does not
    /// allow `text` itself.
    pub fn allowed_after(&self, grammar: &Arc<Grammar>, text: &str) -> Option<Vec<bool>> {
        let mut m = Matcher::new(grammar.clone());
        if !m.accept(text.as_bytes()) {
            return None;
        }
        let mut allowed = vec![false; self.special.len()];
        m.fill_allowed(
            if text.is_empty() { &self.first } else { &self.later },
            &mut allowed,
        );
        if let Some(e) = allowed.get_mut(self.eos as usize) {
            *e = m.is_accepting();
        }
        Some(allowed)
    }

    /// `text` (after other tokens) as tokens, longest first: how a model would most likely
    /// spell text the grammar forces. Stops where no token's text is a prefix of the rest.
    pub fn spell(&self, text: &[u8], limit: usize) -> Vec<u32> {
        let by_text = self.by_text.get_or_init(|| {
            let mut m = HashMap::new();
            // The later of tokens with equal text wins: byte-fallback pieces come first.
            for (t, b) in self.later_bytes.iter().enumerate() {
                if !self.special[t] && !b.is_empty() {
                    m.insert(b.clone(), t as u32);
                }
            }
            m
        });
        let mut out = Vec::new();
        let mut at = 0;
        while at < text.len() && out.len() < limit {
            let longest = self.longest.min(text.len() - at);
            let Some((n, t)) = (1..=longest)
                .rev()
                .find_map(|n| by_text.get(&text[at..at + n]).map(|&t| (n, t)))
            else {
                break;
            };
            out.push(t);
            at += n;
        }
        out
    }

    fn bytes(&self, t: u32, first: bool) -> &[u8] {
        let all = if first {
            &self.first_bytes
        } else {
            &self.later_bytes
        };
        all.get(t as usize).map_or(&[], Vec::as_slice)
    }
}

/// One row's constraint while it generates.
pub(crate) struct ActiveConstraint {
    matcher: Matcher,
    vocab: Arc<ConstraintVocab>,
    allowed: Vec<bool>,
}

impl ActiveConstraint {
    pub(crate) fn new(grammar: Arc<Grammar>, vocab: Arc<ConstraintVocab>) -> Self {
        ActiveConstraint {
            matcher: Matcher::new(grammar),
            allowed: vec![false; vocab.special.len()],
            vocab,
        }
    }

    /// Whether `t` may come next (`first`: no token generated yet).
    pub(crate) fn allows(&mut self, t: u32, first: bool, eos_allowed: bool) -> bool {
        if t == self.vocab.eos {
            return eos_allowed && self.matcher.is_accepting();
        }
        if self.vocab.special.get(t as usize).is_none_or(|&s| s) {
            return false;
        }
        let bytes = self.vocab.bytes(t, first).to_vec();
        self.matcher.allows(&bytes)
    }

    /// Set every logit the grammar does not allow next to -inf; an error when none is left.
    pub(crate) fn restrict(&mut self, logits: &mut [f32], first: bool, eos_allowed: bool) -> Result<()> {
        self.allowed.iter_mut().for_each(|a| *a = false);
        let trie = if first {
            &self.vocab.first
        } else {
            &self.vocab.later
        };
        self.matcher.fill_allowed(trie, &mut self.allowed);
        if let Some(e) = self.allowed.get_mut(self.vocab.eos as usize) {
            *e = eos_allowed && self.matcher.is_accepting();
        }
        // A token counts only if it is allowed and still possible (min_tokens or a logit bias
        // may have ruled out `</s>`, the one token a finished grammar allows).
        let mut any = false;
        for (l, &ok) in logits.iter_mut().zip(&self.allowed) {
            if ok {
                any |= *l > f32::NEG_INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            let why = if self.matcher.overflowed() {
                format!(
                    "the grammar is ambiguous past {} parses at once here; make its repetitions unambiguous",
                    kosmos_grammar::matcher::MAX_STACKS
                )
            } else {
                "no token of the vocabulary can continue the text under the grammar".into()
            };
            return Err(RtError::Input(format!("structured output: {why}")));
        }
        Ok(())
    }

    /// Record generated token `t` (one the constraint allowed).
    pub(crate) fn advance(&mut self, t: u32, first: bool) {
        if t == self.vocab.eos {
            return;
        }
        let bytes = self.vocab.bytes(t, first).to_vec();
        let ok = self.matcher.accept(&bytes);
        debug_assert!(ok, "token {t} was not allowed");
    }

    /// Where the text is, to [`ActiveConstraint::restore`] after trying tokens ahead.
    pub(crate) fn snapshot(&self) -> kosmos_grammar::matcher::Snapshot {
        self.matcher.snapshot()
    }

    pub(crate) fn restore(&mut self, s: kosmos_grammar::matcher::Snapshot) {
        self.matcher.restore(s);
    }

    /// The text is complete and nothing may follow.
    pub(crate) fn finished(&self) -> bool {
        self.matcher.is_finished()
    }

    /// Up to `limit` tokens spelling the text the grammar forces next (after at least one
    /// generated token): speculative decoding's guesses under a constraint.
    pub(crate) fn forced_tokens(&mut self, limit: usize) -> Vec<u32> {
        let text = self.matcher.forced(FORCED_BYTES);
        self.vocab.spell(text.as_bytes(), limit)
    }
}
