//! `kosmos-train`: KOSMOS-1 in libtorch (tch) — the model, its initialisation, checkpoints, and
//! the `kosmos-train` command line.
//!
//! The model mirrors the reference implementations parameter for parameter (Hugging Face
//! `CLIPVisionModel`, flamingo-pytorch `PerceiverResampler`, torchscale `Decoder`), so a
//! checkpoint written here loads into them with `strict=True`; the parity tests hold it to that.

pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod fit;
pub mod generate;
pub mod init;
pub mod model;
pub mod optim;
pub mod plot;
pub mod rng;

pub use error::{Result, TrainError};
// The data sources live in `kosmos-models` (the runtime and exporter read them too).
pub use kosmos_models::data::synthetic;
pub use kosmos_models::prng;
pub use model::{Kosmos, LayerKv, StepOutput};
