//! Data sources, one example at a time: the built-in synthetic task (`synthetic:shapes`), JSONL
//! manifests and WebDataset tar shards, named by one `--data` spec syntax ([`spec`]). The
//! trainer mixes and packs them into batches; `kosmos-export` (`verify --data`, `--awq`) and
//! `kosmos-rt eval` read the same specs, so every tool measures on the same examples.

pub mod example;
pub mod manifest;
pub mod source;
pub mod spec;
pub mod synthetic;
pub mod synthetic_source;
pub mod webdataset;

pub use example::{Example, ImageSource, Part, SkipCounter};
pub use source::Source;
pub use spec::{DataSpec, open_source};
