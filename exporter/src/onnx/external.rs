//! The external data file beside a graph (`decoder.onnx.data`): tensors are appended as they are
//! produced, each at a 64-byte aligned offset, so the exporter never holds a second copy of the
//! weights in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{ExportError, Result};

const ALIGN: u64 = 64;

pub struct WeightSink {
    path: PathBuf,
    /// The file name graphs refer to (relative to the graph's directory).
    location: String,
    out: BufWriter<File>,
    offset: u64,
}

impl WeightSink {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| ExportError::io(path, e))?;
        let location = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ExportError::Graph(format!("bad data file name {}", path.display())))?
            .to_string();
        Ok(WeightSink {
            path: path.to_path_buf(),
            location,
            out: BufWriter::with_capacity(8 << 20, file),
            offset: 0,
        })
    }

    /// Append `bytes`; returns (location, offset, length) for the tensor's `external_data`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(String, u64, u64)> {
        let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
        let zeros = [0u8; ALIGN as usize];
        self.out
            .write_all(&zeros[..pad as usize])
            .and_then(|_| self.out.write_all(bytes))
            .map_err(|e| ExportError::io(&self.path, e))?;
        let start = self.offset + pad;
        self.offset = start + bytes.len() as u64;
        Ok((self.location.clone(), start, bytes.len() as u64))
    }

    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flush and fsync.
    pub fn finish(mut self) -> Result<u64> {
        self.out.flush().map_err(|e| ExportError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| ExportError::io(&self.path, e))?;
        Ok(self.offset)
    }
}
