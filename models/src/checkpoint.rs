//! Checkpoint directories (DESIGN §5): `config.json`, `model.safetensors`, `tokenizer.json`, and
//! optionally `trainer_state/`. Reading validates everything against the config and names the file
//! at fault; writing goes through a staged directory so a checkpoint is complete or absent.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::atomic::{StagedDir, write_atomic, write_atomic_with};
use crate::config::KosmosConfig;
use crate::error::{ModelsError, Result};
use crate::params::expected_params;
use crate::tokenizer::KosmosTokenizer;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TRAINER_STATE_DIR: &str = "trainer_state";

/// Buffers the reference modules derive themselves; tolerated in a checkpoint, never required.
fn is_derived_buffer(name: &str) -> bool {
    name.ends_with(".self_attn.xpos.scale")
}

/// One f32 tensor to write, borrowed from wherever it lives (a tch tensor, an mmap).
pub struct TensorBytes<'a> {
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl View for &TensorBytes<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Adds files to a checkpoint being staged (given the staging directory).
pub type ExtraFiles<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// Write a complete checkpoint to `dir`. The tensors must be exactly the config's parameters.
/// `extra` may add files (e.g. `trainer_state/`) to the staged directory before it is committed.
pub fn write_checkpoint(
    dir: &Path,
    config: &KosmosConfig,
    tokenizer: &KosmosTokenizer,
    tensors: &BTreeMap<String, TensorBytes<'_>>,
    overwrite: bool,
    extra: Option<ExtraFiles<'_>>,
) -> Result<PathBuf> {
    config.validate()?;
    check_tokenizer_size(config, tokenizer, Path::new(TOKENIZER_FILE))?;
    let found: BTreeMap<&str, (Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), (Dtype::F32, t.shape.clone())))
        .collect();
    check_params(config, &found, Path::new(WEIGHTS_FILE))?;
    for (name, t) in tensors {
        let want = t.shape.iter().product::<usize>() * 4;
        if t.data.len() != want {
            return Err(ModelsError::WeightsMismatch {
                path: WEIGHTS_FILE.into(),
                message: format!("{name}: {} bytes for shape {:?}", t.data.len(), t.shape),
            });
        }
    }

    let staged = StagedDir::new(dir, overwrite)?;
    let root = staged.path().to_path_buf();
    let weights = root.join(WEIGHTS_FILE);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic_with(&weights, |tmp| {
        safetensors::serialize_to_file(tensors.iter(), Some(metadata), tmp).map_err(|e| ModelsError::Io {
            path: tmp.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    })?;
    tokenizer.save(&root.join(TOKENIZER_FILE))?;
    if let Some(extra) = extra {
        extra(&root)?;
    }
    // Config last: a directory with a config.json is a finished checkpoint.
    write_atomic(&root.join(CONFIG_FILE), config.to_json().as_bytes())?;
    staged.commit()
}

/// A checkpoint opened for reading; the weights are memory-mapped, not copied.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: KosmosConfig,
    pub tokenizer: KosmosTokenizer,
    weights_path: PathBuf,
    mmap: Mmap,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).finish()
    }
}

impl Checkpoint {
    /// Open and validate `dir`: config, tokenizer (special ids, vocab size) and weights (readable,
    /// f32, exactly the config's parameter names and shapes).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelsError::MissingFile {
                path: dir.to_path_buf(),
                what: "checkpoint directory",
            });
        }
        let config = KosmosConfig::load(&dir.join(CONFIG_FILE))?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = KosmosTokenizer::load(&tok_path, &config.tokenizer)?;
        check_tokenizer_size(&config, &tokenizer, &tok_path)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let file = File::open(&weights_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelsError::MissingFile {
                    path: weights_path.clone(),
                    what: "model weights",
                }
            } else {
                ModelsError::io(&weights_path, e)
            }
        })?;
        // SAFETY: the map is read-only and checkpoints are written by rename, never in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelsError::io(&weights_path, e))?;
        let ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            weights_path,
            mmap,
        };
        let st = ckpt.weights()?;
        let found: BTreeMap<&str, (Dtype, Vec<usize>)> = st
            .iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec())))
            .collect();
        check_params(&ckpt.config, &found, &ckpt.weights_path)?;
        drop(found);
        drop(st);
        Ok(ckpt)
    }

    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// The parsed safetensors (header parse only; tensor data stays in the map).
    pub fn weights(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| ModelsError::CorruptWeights {
            path: self.weights_path.clone(),
            message: e.to_string(),
        })
    }

    /// One tensor by name.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.weights()?
            .tensor(name)
            .map_err(|e| ModelsError::WeightsMismatch {
                path: self.weights_path.clone(),
                message: format!("{name}: {e}"),
            })
    }
}

fn check_tokenizer_size(config: &KosmosConfig, tok: &KosmosTokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() != config.decoder.vocab_size {
        return Err(ModelsError::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "vocabulary has {} entries but config decoder.vocab_size is {}",
                tok.vocab_size(),
                config.decoder.vocab_size
            ),
        });
    }
    Ok(())
}

fn check_params(
    config: &KosmosConfig,
    found: &BTreeMap<&str, (Dtype, Vec<usize>)>,
    path: &Path,
) -> Result<()> {
    let mut problems = Vec::new();
    let expected = expected_params(config);
    for spec in &expected {
        match found.get(spec.name.as_str()) {
            None => problems.push(format!("missing {}", spec.name)),
            Some((dtype, shape)) => {
                if *dtype != Dtype::F32 {
                    problems.push(format!("{} is {dtype:?}, expected F32", spec.name));
                }
                if *shape != spec.shape {
                    problems.push(format!(
                        "{} has shape {shape:?}, config implies {:?}",
                        spec.name, spec.shape
                    ));
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
    for name in found.keys() {
        if !known.contains(name) && !is_derived_buffer(name) {
            problems.push(format!("unexpected tensor {name}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    problems.truncate(5);
    let more = if total > 5 {
        format!(" (and {} more)", total - 5)
    } else {
        String::new()
    };
    Err(ModelsError::WeightsMismatch {
        path: path.to_path_buf(),
        message: format!("{}{more}", problems.join("; ")),
    })
}
