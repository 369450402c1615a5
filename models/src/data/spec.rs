//! `--data` specs: `synthetic:shapes`, `path/manifest.jsonl`, `shards/{00000..00009}.tar`, each
//! with an optional `:weight` suffix for mixing (`synthetic:shapes:0.5`).

use super::manifest::ManifestSource;
use super::source::Source;
use super::synthetic::Split;
use super::synthetic_source::SyntheticSource;
use super::webdataset::TarSource;
use crate::error::{ModelsError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    pub source: String,
    pub weight: f64,
}

impl std::str::FromStr for DataSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (source, weight) = match s.rsplit_once(':') {
            Some((src, w)) if w.parse::<f64>().is_ok() => (src.to_string(), w.parse::<f64>().unwrap()),
            _ => (s.to_string(), 1.0),
        };
        if !(weight.is_finite() && weight > 0.0) {
            return Err(format!("weight of {source:?} must be positive, got {weight}"));
        }
        if source.is_empty() {
            return Err("empty data spec".into());
        }
        Ok(DataSpec { source, weight })
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.source, self.weight)
    }
}

/// Open the source a spec names. Synthetic sources draw `split` with `seed`, endless unless `count`.
pub fn open_source(spec: &str, split: Split, seed: u64, count: Option<u64>) -> Result<Box<dyn Source>> {
    if let Some(task) = spec.strip_prefix("synthetic:") {
        return Ok(Box::new(SyntheticSource::new(task, split, seed, count)?));
    }
    if spec.ends_with(".jsonl") || spec.ends_with(".json") {
        return Ok(Box::new(ManifestSource::open(std::path::Path::new(spec))?));
    }
    if spec.ends_with(".tar") {
        return Ok(Box::new(TarSource::open(spec)?));
    }
    Err(ModelsError::Data(format!(
        "{spec:?}: unknown data source (synthetic:shapes|shapes-captions|shapes-vqa, a .jsonl manifest, or .tar shards)"
    )))
}
