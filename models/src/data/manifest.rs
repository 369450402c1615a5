//! JSONL manifests, streamed line by line; the line format is `kosmos_models::manifest`'s.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::manifest::{self, ManifestPart};
use serde_json::{Value, json};

use super::example::{Example, ImageSource, Part, SkipCounter};
use super::source::{Source, cursor_u64};
use crate::error::{ModelsError, Result};

pub struct ManifestSource {
    name: String,
    path: PathBuf,
    dir: PathBuf,
    reader: BufReader<File>,
    line: u64,
    offset: u64,
    buf: Vec<u8>,
}

impl ManifestSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| ModelsError::Data(format!("{}: cannot open manifest: {e}", path.display())))?;
        Ok(ManifestSource {
            name: path.display().to_string(),
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            reader: BufReader::new(file),
            line: 0,
            offset: 0,
            buf: Vec::new(),
        })
    }

    fn parse(&self, bytes: &[u8], origin: &str) -> std::result::Result<Option<Example>, String> {
        let Some(parts) = manifest::parse_line(bytes, &self.dir)? else {
            return Ok(None);
        };
        let parts = parts
            .into_iter()
            .map(|p| match p {
                ManifestPart::Text { text, loss } => Part::Text { text, loss },
                ManifestPart::Image(path) => Part::Image(ImageSource::File(path)),
            })
            .collect();
        Ok(Some(Example {
            parts,
            origin: origin.to_string(),
        }))
    }
}

impl Source for ManifestSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn next(&mut self, skips: &SkipCounter) -> Result<Option<Example>> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| ModelsError::Data(format!("{}: read error: {e}", self.name)))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.offset += n as u64;
            let origin = format!("{}:{}", self.path.display(), self.line);
            let line = std::mem::take(&mut self.buf);
            let parsed = self.parse(&line, &origin);
            self.buf = line;
            match parsed {
                Ok(Some(ex)) => return Ok(Some(ex)),
                Ok(None) => continue,
                Err(why) => skips.skip(&origin, &why),
            }
        }
    }

    fn rewind(&mut self) -> Result<()> {
        self.seek(&json!({ "line": 0, "offset": 0 }))
    }

    fn cursor(&self) -> Value {
        json!({ "line": self.line, "offset": self.offset })
    }

    fn seek(&mut self, cursor: &Value) -> Result<()> {
        let offset = cursor_u64(cursor, "offset")?;
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(|e| ModelsError::Data(format!("{}: seek: {e}", self.name)))?;
        self.line = cursor_u64(cursor, "line")?;
        self.offset = offset;
        Ok(())
    }
}
