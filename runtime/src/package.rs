//! Opening a package written by `kosmos-export`: the manifest, tokenizer and the two sessions,
//! checked against each other so an ONNX file from another model is refused up front.

use std::path::{Path, PathBuf};

use kosmos_models::package::{KvDtype, PackageManifest, TOKENIZER_FILE, io};
use kosmos_models::{KosmosTokenizer, ModelsError};
use ort::session::Session;
use ort::value::TensorElementType;

use crate::draft::Draft;
use crate::error::{Result, RtError};
use crate::ort_env::{SessionOptions, session};
use crate::speculate::{GuessSchedule, Speculation};

pub struct Package {
    pub dir: PathBuf,
    pub manifest: PackageManifest,
    /// The KV cache's element type (`manifest.decoder.kv_dtype`, checked when opened).
    pub kv_dtype: KvDtype,
    pub tokenizer: KosmosTokenizer,
    pub(crate) vision: Session,
    pub(crate) decoder: Session,
    /// Wall time ONNX Runtime took to create both sessions (graph optimisation, weight
    /// pre-packing): the cold-start cost `kosmos-rt bench` reports.
    pub load_ms: f64,
    /// The vocabulary as structured output's matcher sees it, built at its first use.
    constraint_vocab: std::sync::OnceLock<std::sync::Arc<crate::constrain::ConstraintVocab>>,
    /// Prompt-lookup speculative decoding, when turned on ([`Package::set_speculation`]).
    speculation: Option<Speculation>,
    /// The draft model that guesses instead, when one is set ([`Package::set_draft`]).
    pub(crate) draft: Option<Box<Draft>>,
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package").field("dir", &self.dir).finish()
    }
}

fn require(path: &Path, what: &'static str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ModelsError::MissingFile {
            path: path.to_path_buf(),
            what,
        }
        .into())
    }
}

/// The (fixed) dims of an outlet: `-1` where symbolic.
fn dims(s: &Session, name: &str, input: bool) -> Option<Vec<i64>> {
    let outlets = if input { s.inputs() } else { s.outputs() };
    outlets
        .iter()
        .find(|o| o.name() == name)
        .and_then(|o| o.dtype().tensor_shape().map(|sh| sh.iter().copied().collect()))
}

impl Package {
    /// The vocabulary for structured output (tries of every token's text), shared by requests.
    pub fn constraint_vocab(&self) -> std::sync::Arc<crate::constrain::ConstraintVocab> {
        self.constraint_vocab
            .get_or_init(|| {
                std::sync::Arc::new(crate::constrain::ConstraintVocab::new(
                    &self.tokenizer,
                    self.manifest.decoder.vocab_size,
                ))
            })
            .clone()
    }

    pub fn open(dir: &Path, opts: &SessionOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelsError::MissingFile {
                path: dir.to_path_buf(),
                what: "package directory",
            }
            .into());
        }
        let manifest = PackageManifest::load(dir)?;
        let kv_dtype = manifest
            .decoder
            .cache_dtype()
            .ok_or_else(|| crate::RtError::Package {
                path: dir.to_path_buf(),
                message: format!(
                    "kosmos_rt.json: unknown decoder.kv_dtype '{}' ({})",
                    manifest.decoder.kv_dtype,
                    KvDtype::ALL.map(KvDtype::element_type).join(", ")
                ),
            })?;
        let vision_path = dir.join(&manifest.vision.file);
        let decoder_path = dir.join(&manifest.decoder.file);
        require(&vision_path, "vision graph")?;
        require(&decoder_path, "decoder graph")?;
        for g in [&vision_path, &decoder_path] {
            let data = PathBuf::from(format!("{}.data", g.display()));
            require(&data, "external weight data")?;
        }
        let tokenizer = open_tokenizer(dir, &manifest)?;
        if manifest.dtype == kosmos_models::package::PackageDtype::Fp16
            && opts.device == crate::ort_env::Device::Cpu
        {
            // ONNX Runtime's CPU kernels are mostly fp32: it inserts casts and keeps fp32 copies
            // of the weights (measured: 8.2 GB resident for the 3.3 GB fp16 kosmos-1 package).
            tracing::warn!(
                package = %dir.display(),
                "fp16 package on the CPU: ONNX Runtime computes in fp32 and holds both copies of the weights; \
                 export --dtype fp32 for CPU serving"
            );
        }
        let t0 = std::time::Instant::now();
        let vision = session(&vision_path, opts)?;
        let decoder = session(&decoder_path, opts)?;
        let pkg = Package {
            dir: dir.to_path_buf(),
            manifest,
            kv_dtype,
            tokenizer,
            vision,
            decoder,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            constraint_vocab: std::sync::OnceLock::new(),
            speculation: None,
            draft: None,
        };
        pkg.check_graphs()?;
        Ok(pkg)
    }

    /// The graphs' inputs and outputs must be the ones `kosmos_rt.json` describes.
    fn check_graphs(&self) -> Result<()> {
        let m = &self.manifest;
        let d = &m.decoder;
        let bad = |file: &str, message: String| RtError::Package {
            path: self.dir.join(file),
            message: format!(
                "does not match {}: {message}",
                kosmos_models::package::MANIFEST_FILE
            ),
        };
        let size = m.vision.image_size as i64;
        match dims(&self.vision, io::PIXEL_VALUES, true) {
            Some(v) if v.len() == 4 && v[1..] == [3, size, size] => {}
            other => {
                return Err(bad(
                    &m.vision.file,
                    format!("pixel_values is {other:?}, expected [batch, 3, {size}, {size}]"),
                ));
            }
        }
        match dims(&self.vision, io::IMAGE_EMBEDS, false) {
            Some(v)
                if v.len() == 3
                    && v[1] == m.vision.tokens_per_image as i64
                    && v[2] == d.hidden_size as i64 => {}
            other => {
                return Err(bad(
                    &m.vision.file,
                    format!(
                        "image_embeds is {other:?}, expected [batch, {}, {}]",
                        m.vision.tokens_per_image, d.hidden_size
                    ),
                ));
            }
        }
        let names: Vec<&str> = self.decoder.inputs().iter().map(|o| o.name()).collect();
        for want in &d.inputs {
            if !names.contains(&want.as_str()) {
                return Err(bad(&d.file, format!("input {want} is missing")));
            }
        }
        if names.len() != d.inputs.len() {
            return Err(bad(
                &d.file,
                format!("{} inputs, the manifest lists {}", names.len(), d.inputs.len()),
            ));
        }
        let kv = dims(&self.decoder, &io::past_key(0), true).unwrap_or_default();
        let row = self.kv_dtype.row_len(d.head_dim);
        if kv.len() != 4 || kv[1] != d.num_heads as i64 || kv[3] != row as i64 {
            return Err(bad(
                &d.file,
                format!(
                    "past_key_values.0.key is {kv:?}, expected [batch, {}, past, {row}] ({} cache)",
                    d.num_heads, d.kv_dtype
                ),
            ));
        }
        let kv_type = self
            .decoder
            .inputs()
            .iter()
            .find(|o| o.name() == io::past_key(0))
            .and_then(|o| o.dtype().tensor_type());
        let want = match self.kv_dtype {
            KvDtype::Fp32 => TensorElementType::Float32,
            KvDtype::Fp16 => TensorElementType::Float16,
            KvDtype::Int8 => TensorElementType::Int8,
        };
        if kv_type != Some(want) {
            return Err(bad(
                &d.file,
                format!(
                    "past_key_values.0.key holds {kv_type:?}, the manifest's kv_dtype is {}",
                    d.kv_dtype
                ),
            ));
        }
        match dims(&self.decoder, io::LOGITS, false) {
            Some(v) if v.len() == 3 && v[2] == d.vocab_size as i64 => Ok(()),
            other => Err(bad(
                &d.file,
                format!("logits is {other:?}, expected [batch, seq, {}]", d.vocab_size),
            )),
        }
    }

    pub fn context_length(&self) -> usize {
        self.manifest.decoder.context_length
    }

    /// Decode speculatively by prompt lookup ([`crate::speculate`]) in [`Package::generate`]
    /// (one prompt at a time) and in the batching engine, or not (`None`). A rejected guess's
    /// keys are left in the cache to be overwritten, which only the buffer KV layout allows.
    /// [`GuessSchedule::Auto`] becomes adaptive for a quantised package, fixed otherwise.
    pub fn set_speculation(&mut self, mut s: Option<Speculation>) -> Result<()> {
        if let Some(s) = s.as_mut()
            && s.schedule == GuessSchedule::Auto
        {
            s.schedule = match self.manifest.quantization {
                Some(_) => GuessSchedule::Adaptive,
                None => GuessSchedule::Fixed,
            };
        }
        if let Some(s) = &s {
            s.check().map_err(RtError::Input)?;
            if self.manifest.decoder.kv_cache != kosmos_models::package::KvCacheLayout::Buffer {
                return Err(RtError::Package {
                    path: self.dir.clone(),
                    message: "speculative decoding needs a decoder that updates its KV cache in place; \
                              re-export with `kosmos-export <ckpt> --to onnx --kv-cache buffer`"
                        .into(),
                });
            }
        }
        self.speculation = s;
        Ok(())
    }

    pub fn speculation(&self) -> Option<&Speculation> {
        self.speculation.as_ref()
    }

    /// Let `draft` make speculative decoding's guesses in [`Package::generate`] instead of prompt
    /// lookup (the text a grammar forces still comes first), or not (`None`). It guesses only
    /// while speculation is on ([`Package::set_speculation`]: its `tokens` bound the guesses per
    /// call, its schedule adapts them), here and in the batching engine, which takes it over.
    /// A draft whose token ids mean something else is refused, naming the first difference.
    pub fn set_draft(&mut self, draft: Option<Draft>) -> Result<()> {
        if let Some(d) = &draft {
            d.check_pairs_with(self)?;
        }
        self.draft = draft.map(Box::new);
        Ok(())
    }

    /// The draft model, when one is set.
    pub fn draft(&self) -> Option<&Draft> {
        self.draft.as_deref()
    }
}

/// The tokenizer of the package in `dir` (whose manifest is `manifest`), checked against the
/// decoder's vocabulary.
pub fn open_tokenizer(dir: &Path, manifest: &PackageManifest) -> Result<KosmosTokenizer> {
    let tok_path = dir.join(TOKENIZER_FILE);
    let tokenizer = KosmosTokenizer::load(&tok_path, &manifest.config.tokenizer)?;
    if tokenizer.vocab_size() != manifest.decoder.vocab_size {
        return Err(RtError::Package {
            path: tok_path,
            message: format!(
                "tokenizer has {} entries, the decoder's vocabulary {}",
                tokenizer.vocab_size(),
                manifest.decoder.vocab_size
            ),
        });
    }
    Ok(tokenizer)
}
