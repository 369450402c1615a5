//! Fresh checkpoints: a config, a tokenizer whose vocabulary size equals the decoder's, and the
//! reference initialisation.

use std::path::{Path, PathBuf};

use kosmos_models::{KosmosConfig, KosmosTokenizer};

use crate::corpus;
use crate::error::Result;
use crate::model::Kosmos;

/// Where the tokenizer of a new checkpoint comes from.
pub enum TokenizerSource<'a> {
    /// Train the built-in Unigram tokenizer to exactly `decoder.vocab_size` entries.
    Builtin,
    /// Use this `tokenizer.json`; `decoder.vocab_size` is set to its size.
    File(&'a Path),
}

/// The tokenizer for `config`, adjusting `config.decoder.vocab_size` to a given file's size.
pub fn tokenizer_for(config: &mut KosmosConfig, source: TokenizerSource<'_>) -> Result<KosmosTokenizer> {
    match source {
        TokenizerSource::Builtin => Ok(KosmosTokenizer::train(
            || corpus::builtin_corpus().into_iter(),
            config.decoder.vocab_size,
            &config.tokenizer,
        )?),
        TokenizerSource::File(path) => {
            let tok = KosmosTokenizer::load(path, &config.tokenizer)?;
            config.decoder.vocab_size = tok.vocab_size();
            config.validate()?;
            Ok(tok)
        }
    }
}

/// Initialise a model for `config` with `seed` on the CPU and write it to `out`.
pub fn init_checkpoint(
    mut config: KosmosConfig,
    seed: i64,
    tokenizer: TokenizerSource<'_>,
    out: &Path,
    overwrite: bool,
) -> Result<PathBuf> {
    config.validate()?;
    let tok = tokenizer_for(&mut config, tokenizer)?;
    let (vs, _model) = Kosmos::build(&config, tch::Device::Cpu, Some(seed));
    crate::checkpoint::save(&vs, out, &config, &tok, overwrite, None)
}
