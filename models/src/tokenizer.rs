//! Special tokens (the `tokenizer` section of `config.json`) and the tokenizer wrapper over the
//! `tokenizers` crate: load any `tokenizer.json`, or train a SentencePiece-style Unigram model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, DecoderWrapper, NormalizedString, Normalizer, Tokenizer, TokenizerImpl};

use crate::atomic::write_atomic;
use crate::error::{ModelsError, Result};

/// The special tokens of the KOSMOS sequence layout
/// `<s> <image> [image embeddings] </image> text </s>`, with their ids (fairseq order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    pub bos_token: String,
    pub bos_token_id: u32,
    pub pad_token: String,
    pub pad_token_id: u32,
    pub eos_token: String,
    pub eos_token_id: u32,
    pub unk_token: String,
    pub unk_token_id: u32,
    pub image_start_token: String,
    pub image_start_token_id: u32,
    pub image_end_token: String,
    pub image_end_token_id: u32,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        SpecialTokens {
            bos_token: "<s>".into(),
            bos_token_id: 0,
            pad_token: "<pad>".into(),
            pad_token_id: 1,
            eos_token: "</s>".into(),
            eos_token_id: 2,
            unk_token: "<unk>".into(),
            unk_token_id: 3,
            image_start_token: "<image>".into(),
            image_start_token_id: 4,
            image_end_token: "</image>".into(),
            image_end_token_id: 5,
        }
    }
}

impl SpecialTokens {
    /// (token, id) pairs in id order of the default layout.
    pub fn pairs(&self) -> [(&str, u32); 6] {
        [
            (&self.bos_token, self.bos_token_id),
            (&self.pad_token, self.pad_token_id),
            (&self.eos_token, self.eos_token_id),
            (&self.unk_token, self.unk_token_id),
            (&self.image_start_token, self.image_start_token_id),
            (&self.image_end_token, self.image_end_token_id),
        ]
    }

    pub fn max_id(&self) -> u32 {
        self.pairs().iter().map(|p| p.1).max().unwrap_or(0)
    }

    /// Id written into the `input_ids` slots that image embeddings replace. Any id is correct
    /// there (the embeddings overwrite it); `<pad>` keeps the ids in range and obviously inert.
    pub fn image_slot_id(&self) -> u32 {
        self.pad_token_id
    }
}

/// Number of byte-fallback pieces (`<0x00>`..`<0xFF>`), so any UTF-8 text encodes without `<unk>`.
const BYTE_PIECES: usize = 256;

/// A loaded tokenizer whose special tokens are checked against the config.
#[derive(Clone)]
pub struct KosmosTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
}

impl std::fmt::Debug for KosmosTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KosmosTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl KosmosTokenizer {
    /// Load any Hugging Face `tokenizer.json` and check that the special tokens have the ids the
    /// config says.
    pub fn load(path: &Path, special: &SpecialTokens) -> Result<Self> {
        if !path.exists() {
            return Err(ModelsError::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer",
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| ModelsError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let tok = KosmosTokenizer {
            inner,
            special: special.clone(),
        };
        tok.check_special(path)?;
        Ok(tok)
    }

    fn check_special(&self, path: &Path) -> Result<()> {
        for (token, id) in self.special.pairs() {
            match self.inner.token_to_id(token) {
                Some(found) if found == id => {}
                found => {
                    return Err(ModelsError::Tokenizer {
                        path: path.to_path_buf(),
                        message: format!("special token {token:?} has id {found:?}, config.json says {id}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Train a Unigram (SentencePiece-style) tokenizer of exactly `vocab_size` entries.
    ///
    /// Layout: the special tokens at their configured ids, the trained pieces, then (when the
    /// vocabulary has room) 256 byte-fallback pieces so no text maps to `<unk>`, then
    /// `<reserved_N>` entries up to `vocab_size` (as T5's `<extra_id_N>` and Llama 3's reserved
    /// tokens do) when the corpus is too small to fill the vocabulary.
    ///
    /// `corpus` yields the lines; it is called twice (the Unigram trainer, then a word count).
    /// Hugging Face's Unigram trainer seeds pieces from the corpus' *distinct* words, so on a small
    /// corpus it misses frequent whole words (`▁the`); words seen at least twice are therefore
    /// added as pieces scored by their log frequency, and the best pieces fill the budget.
    pub fn train<F, I, S>(corpus: F, vocab_size: usize, special: &SpecialTokens) -> Result<Self>
    where
        F: Fn() -> I,
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials = special.pairs();
        let mut by_id = specials.to_vec();
        by_id.sort_by_key(|p| p.1);
        if by_id.iter().enumerate().any(|(i, p)| p.1 as usize != i) {
            return Err(ModelsError::TokenizerTraining(
                "special token ids must be 0..6 to train a tokenizer".into(),
            ));
        }
        let n_special = by_id.len();
        let byte_fallback = vocab_size >= n_special + BYTE_PIECES + 64;
        let budget = vocab_size
            .checked_sub(n_special + if byte_fallback { BYTE_PIECES } else { 0 })
            .filter(|b| *b > 0)
            .ok_or_else(|| {
                ModelsError::TokenizerTraining(format!(
                    "vocab size {vocab_size} leaves no room beside {n_special} special tokens"
                ))
            })?;

        let special_added: Vec<AddedToken> = by_id
            .iter()
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        let mut trainer = UnigramTrainer::builder()
            .show_progress(false)
            .vocab_size((budget + n_special) as u32)
            .special_tokens(special_added.clone())
            .unk_token(Some(special.unk_token.clone()))
            .build()
            .map_err(|e| ModelsError::TokenizerTraining(e.to_string()))?;
        let mut trainable: TokenizerImpl<
            Unigram,
            tokenizers::NormalizerWrapper,
            tokenizers::PreTokenizerWrapper,
            tokenizers::PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(Unigram::default());
        trainable.with_normalizer(Some(NFKC));
        trainable.with_pre_tokenizer(Some(metaspace()));
        trainable
            .train(&mut trainer, corpus())
            .map_err(|e| ModelsError::TokenizerTraining(e.to_string()))?;

        // Trained pieces without the specials (which the trainer put first), best score first.
        let special_names: Vec<&str> = by_id.iter().map(|p| p.0).collect();
        let mut scores: HashMap<String, f64> = trainable
            .get_model()
            .iter()
            .filter(|(p, _)| !special_names.contains(&p.as_str()))
            .map(|(p, score)| (p.clone(), settled(*score)))
            .collect();
        if scores.is_empty() {
            return Err(ModelsError::TokenizerTraining("the corpus is empty".into()));
        }
        // The trainer gives the corpus characters it has no score for its lowest score plus 1e-4
        // per character, counted in hash order (another order in every process): one score for
        // all of them, and the sort below orders them by name.
        let lowest = scores.values().copied().fold(f64::INFINITY, f64::min);
        let singles = scores.keys().filter(|p| p.chars().count() == 1).count();
        let band = lowest + 1e-4 * singles as f64;
        for (piece, score) in scores.iter_mut() {
            if piece.chars().count() == 1 && *score < band {
                *score = lowest;
            }
        }
        let words = count_words(corpus());
        let total: u64 = words.values().sum();
        for (word, count) in words {
            if count >= 2 && word.chars().count() > 1 {
                let score = settled((count as f64 / total as f64).ln());
                let entry = scores.entry(word).or_insert(score);
                *entry = entry.max(score);
            }
        }
        // Single characters first (so text stays encodable), then by score; ties by piece.
        let mut pieces: Vec<(String, f64)> = scores.into_iter().collect();
        pieces.sort_by(|a, b| {
            let single = |p: &str| p.chars().count() == 1;
            single(&b.0)
                .cmp(&single(&a.0))
                .then(b.1.total_cmp(&a.1))
                .then(a.0.cmp(&b.0))
        });
        pieces.truncate(budget);
        let floor = pieces.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) - 10.0;

        let mut vocab: Vec<(String, f64)> = special_names.iter().map(|s| (s.to_string(), 0.0)).collect();
        vocab.extend(pieces);
        if byte_fallback {
            vocab.extend((0..BYTE_PIECES).map(|b| (format!("<0x{b:02X}>"), floor)));
        }
        let mut reserved = 0;
        while vocab.len() < vocab_size {
            vocab.push((format!("<reserved_{reserved}>"), floor - 10.0));
            reserved += 1;
        }
        let model = Unigram::from(vocab, Some(special.unk_token_id as usize), byte_fallback)
            .map_err(|e| ModelsError::TokenizerTraining(e.to_string()))?;

        let mut inner = Tokenizer::new(model);
        inner.with_normalizer(Some(NFKC));
        inner.with_pre_tokenizer(Some(metaspace()));
        // Metaspace first, per token: after Fuse it would see one token and drop every `▁`.
        inner.with_decoder(Some(DecoderSequence::new(vec![
            DecoderWrapper::Metaspace(metaspace()),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ])));
        inner.add_special_tokens(&special_added);
        let tok = KosmosTokenizer {
            inner,
            special: special.clone(),
        };
        tok.check_special(Path::new("<trained tokenizer>"))?;
        debug_assert_eq!(tok.vocab_size(), vocab_size);
        Ok(tok)
    }

    /// Entries in the vocabulary, added tokens included (what the decoder's `vocab_size` must equal).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Where `other` gives a token id another meaning, or `None` when every id means the same
    /// to both: the same size, special tokens and piece per id. A draft model's guesses are ids
    /// that the model it guesses for reads, so only such tokenizers can pair.
    pub fn vocabulary_difference(&self, other: &KosmosTokenizer) -> Option<String> {
        if self.vocab_size() != other.vocab_size() {
            return Some(format!(
                "{} entries against {}",
                self.vocab_size(),
                other.vocab_size()
            ));
        }
        if self.special != other.special {
            return Some(format!(
                "special tokens {:?} against {:?}",
                self.special.pairs(),
                other.special.pairs()
            ));
        }
        (0..self.vocab_size() as u32).find_map(|id| {
            let (a, b) = (self.inner.id_to_token(id), other.inner.id_to_token(id));
            (a != b).then(|| format!("token {id} is {a:?} against {b:?}"))
        })
    }

    /// Token ids of `text`, without `<s>`/`</s>` (the sequence assembly adds those).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelsError::TokenizerTraining(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelsError::TokenizerTraining(format!("decoding failed: {e}")))
    }

    /// The bytes token `id` stands for, as a per-token listing (OpenAI `logprobs`) shows it:
    /// SentencePiece conventions, `▁` a space and `<0xHH>` one byte (so a character split over
    /// byte pieces is split here too); a special token is its own name; an unknown id is empty.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        match byte_of_piece(&piece) {
            Some(b) => vec![b],
            None => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// The bytes token `id` adds to a decoded text: as [`Self::token_bytes`], except that the
    /// first token of a text (`first`: no other token but specials before it) loses its `▁` (the
    /// Metaspace decoder drops it there, so a generated `▁red` reads `red`), and special tokens
    /// add nothing (decoding skips them).
    pub fn decoded_bytes(&self, id: u32, first: bool) -> Vec<u8> {
        if self.special.pairs().iter().any(|&(_, s)| s == id) {
            return Vec::new();
        }
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        match byte_of_piece(&piece) {
            Some(b) => vec![b],
            None if first => piece.replace('\u{2581}', "").into_bytes(),
            None => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// The byte a byte-fallback piece (`<0xHH>`) stands for; `None` for any other token. The
    /// decoder turns a run of them into text together, so their text is final only once the run
    /// has ended.
    pub fn byte_piece(&self, id: u32) -> Option<u8> {
        self.inner.id_to_token(id).and_then(|p| byte_of_piece(&p))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Write `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(|e| ModelsError::Tokenizer {
            path: PathBuf::from(path),
            message: e.to_string(),
        })?;
        write_atomic(path, json.as_bytes())
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// `score` rounded to 1e-9. The trainer sums in hash-map order, which changes from process to
/// process, so equal scores come out a few ulps apart; unrounded, they sorted differently and
/// the same corpus gave pieces other ids in another run (and a seeded training run other losses).
fn settled(score: f64) -> f64 {
    (score * 1e9).round() / 1e9
}

fn byte_of_piece(piece: &str) -> Option<u8> {
    piece
        .strip_prefix("<0x")
        .and_then(|h| h.strip_suffix('>'))
        .filter(|h| h.len() == 2)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
}

/// Words as the pre-tokenizer sees them: NFKC, split on spaces, each prefixed with `▁`.
fn count_words<I, S>(corpus: I) -> HashMap<String, u64>
where
    I: Iterator<Item = S>,
    S: AsRef<str>,
{
    let mut counts = HashMap::new();
    for line in corpus {
        let mut normalized = NormalizedString::from(line.as_ref());
        if NFKC.normalize(&mut normalized).is_err() {
            continue;
        }
        for word in normalized.get().split(' ').filter(|w| !w.is_empty()) {
            *counts.entry(format!("▁{word}")).or_insert(0) += 1;
        }
    }
    counts
}

fn metaspace() -> Metaspace {
    Metaspace::new('▁', PrependScheme::Always, true)
}
