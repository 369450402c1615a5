//! The one error type of `kosmos-models`. Every variant that concerns a file names it, so a user
//! reading one line knows which file to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file is missing ({what})")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    InvalidConfig { path: Option<PathBuf>, message: String },

    #[error("{path}: not a readable safetensors file (truncated or corrupt?): {message}")]
    CorruptWeights { path: PathBuf, message: String },

    #[error("{path}: weights do not match config.json: {message}")]
    WeightsMismatch { path: PathBuf, message: String },

    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{what}: bad image: {message}")]
    Image { what: String, message: String },

    #[error("tokenizer training failed: {0}")]
    TokenizerTraining(String),

    #[error("{path}: refusing to overwrite an existing directory (pass --force to replace it)")]
    OutputExists { path: PathBuf },

    /// A data source that cannot be read at all (bad spec, no file, no valid record); a bad
    /// record within one is skipped with a warning instead.
    #[error("data: {0}")]
    Data(String),

    #[error("unknown preset {name:?}; available: {available}")]
    UnknownPreset { name: String, available: String },
}

pub type Result<T, E = ModelsError> = std::result::Result<T, E>;

impl ModelsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelsError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        ModelsError::InvalidConfig {
            path: None,
            message: message.into(),
        }
    }
}
