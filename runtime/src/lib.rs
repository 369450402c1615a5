//! `kosmos-rt`: loads a package written by `kosmos-export` and generates over ONNX Runtime
//! (`ort` with `load-dynamic`; `scripts/setup.sh` exposes `.deps/libonnxruntime.so` and
//! `.cargo/config.toml` sets `ORT_DYLIB_PATH` to it).
//!
//! * [`Package::open`] loads `kosmos_rt.json`, the tokenizer and both graphs, and refuses graphs
//!   whose inputs/outputs do not match the manifest;
//! * [`Package::generate`] runs a batch of prompts (text with `<image>` markers, or images then
//!   text) through the vision graph (with an embedding cache keyed by image content) and the
//!   decoder with its KV cache: greedy, sampling (temperature, top-k, top-p, repetition penalty,
//!   seeded), stop strings, beam search, structured output ([`grammar`]: JSON Schema, regular
//!   expressions, choices, GBNF), and a streaming token callback;
//! * [`bench`](mod@bench) measures it; [`ffi`] is the C ABI of `libkosmos_rt.so`
//!   (`runtime/include/kosmos_rt.h`).

pub mod batch;
pub mod bench;
mod chat;
pub mod constrain;
pub mod draft;
mod draft_batch;
pub mod error;
pub mod eval;
#[allow(non_camel_case_types)]
pub mod ffi;
pub mod generate;
pub mod logprobs;
pub mod metrics;
pub mod ort_env;
pub mod package;
pub mod prefix_cache;
pub mod score;
pub mod serve;
pub mod speculate;

pub use draft::Draft;
pub use error::{Result, RtError};
pub use generate::{
    FinishReason, GenerateParams, Generation, ImageInput, Prompt, VisionCache, bad_word_tokens,
};
/// Structured output: build a [`grammar::Constraint`], `compile()` it, and put the grammar in
/// [`GenerateParams::constraint`].
pub use kosmos_grammar as grammar;
pub use ort_env::{Device, SessionOptions};
pub use package::Package;
pub use speculate::{GuessSchedule, Speculation};
