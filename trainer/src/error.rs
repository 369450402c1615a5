//! The error type of `kosmos-train` as a library.

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Models(#[from] kosmos_models::ModelsError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("data: {0}")]
    Data(String),

    #[error("bad model input: {0}")]
    Input(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
