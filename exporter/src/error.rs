use std::path::{Path, PathBuf};

use kosmos_models::ModelsError;

/// Everything the exporter can fail on, each naming what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] ModelsError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("unknown profile '{0}' (available: portable, ort, trt)")]
    UnknownProfile(String),
    #[error("unknown dtype '{0}' (available: fp32, fp16)")]
    UnknownDtype(String),
    #[error("this model cannot be exported: {0}")]
    Unsupported(String),
    /// TensorRT or the plugin library is missing, or trtexec failed.
    #[error("TensorRT: {0}")]
    TensorRt(String),
    #[error("graph construction: {0}")]
    Graph(String),
    #[error("{}: not a readable ONNX model: {message}", path.display())]
    BadModel { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    BadPackage { path: PathBuf, message: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("reference model: {0}")]
    Reference(String),
    /// Example data (`verify --data`, `--awq`) that cannot be read or gives no usable example;
    /// `option` names the flag that gave it.
    #[error("{option}: {message}")]
    Data { option: &'static str, message: String },
}

impl ExportError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;
