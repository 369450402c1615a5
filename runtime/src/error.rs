use std::path::PathBuf;

use kosmos_models::ModelsError;

/// Everything the runtime can fail on; each variant names what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error(transparent)]
    Models(#[from] ModelsError),
    #[error("{}: {message}", path.display())]
    Package { path: PathBuf, message: String },
    #[error("invalid request: {0}")]
    Input(String),
    #[error(
        "prompt of {prompt} tokens + max_tokens {max_new} exceeds the model's context of {context} tokens"
    )]
    ContextOverflow {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("execution provider '{0}' is not available in the loaded ONNX Runtime ({1})")]
    Provider(String, String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    /// `kosmos-rt batch`: the input file, the output, or the run itself.
    #[error("{0}")]
    Batch(String),
}

impl From<ort::Error> for RtError {
    fn from(e: ort::Error) -> Self {
        RtError::Ort(e.to_string())
    }
}

pub type Result<T, E = RtError> = std::result::Result<T, E>;
