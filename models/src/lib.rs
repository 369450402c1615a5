//! `kosmos-models`: the facts every KOSMOS crate shares, kept in one place.
//!
//! * [`config`]: the `config.json` schema (sections named after the reference implementations'
//!   own config fields) and the built-in presets `tiny` and `kosmos-1`;
//! * [`params`]: parameter names and shapes of a checkpoint;
//! * [`checkpoint`]: reading and atomically writing checkpoint directories;
//! * [`tokenizer`]: special tokens and the tokenizer wrapper (train a Unigram model, or load any
//!   `tokenizer.json`);
//! * [`data`]: the data sources `kosmos-train` trains on and it, `kosmos-export` and `kosmos-rt`
//!   evaluate on (the built-in synthetic task, JSONL manifests, WebDataset tar shards).
//!
//! The library never panics on bad input: every failure is a [`ModelsError`] naming the file.

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod image;
pub mod manifest;
pub mod package;
pub mod params;
pub mod prng;
pub mod sequence;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, TensorBytes, write_checkpoint};
pub use config::{DecoderConfig, KosmosConfig, ResamplerConfig, Variant, VisionConfig};
pub use error::{ModelsError, Result};
pub use params::{ParamSpec, expected_params, param_count};
pub use tokenizer::{KosmosTokenizer, SpecialTokens};
