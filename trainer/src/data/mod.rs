//! Training data: sources (synthetic, JSONL manifests, WebDataset shards), mixing by weight,
//! packing into batches, and a background loader thread.

pub mod stream;

pub use kosmos_models::data::{example, manifest, source, spec, synthetic_source, webdataset};

use std::sync::mpsc::{Receiver, sync_channel};

pub use example::{Example, ImageSource, Part};
pub use spec::{DataSpec, open_source};
pub use stream::{Batch, DataState, DataStream};

use crate::error::Result;

/// Batches built on a background thread, `prefetch` ahead of the training loop.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
}

impl Loader {
    pub fn spawn(mut stream: DataStream, prefetch: usize) -> Self {
        let (tx, rx) = sync_channel(prefetch.max(1));
        std::thread::Builder::new()
            .name("kosmos-data".into())
            .spawn(move || {
                loop {
                    let batch = stream.next_batch();
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .expect("spawn data thread");
        Loader { rx }
    }

    pub fn next(&self) -> Result<Batch> {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(crate::TrainError::Data("the data thread stopped".into())))
    }
}
