//! JSONL manifests, streamed line by line:
//! `{"image": "path", "text": "caption", "prompt"?: "..."}` (image-caption, VQA, instructions),
//! `{"text": "..."}` (text only), `{"segments": [{"text": ...}, {"image": ...}, ...]}` (interleaved,
//! at most 5 images). Image paths are relative to the manifest's directory.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::example::{Example, ImageSource, Part, SkipCounter};
use super::source::{Source, cursor_u64};
use crate::error::{Result, TrainError};

pub const MAX_IMAGES: usize = 5;

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
            .map_err(|e| TrainError::Data(format!("{}: cannot open manifest: {e}", path.display())))?;
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
        let text = std::str::from_utf8(bytes).map_err(|_| "line is not UTF-8".to_string())?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let str_field = |v: &Value, k: &str| -> std::result::Result<Option<String>, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("{k:?} must be a string, got {other}")),
            }
        };
        let image = |rel: &str| -> std::result::Result<ImageSource, String> {
            let p = self.dir.join(rel);
            if p.is_file() {
                Ok(ImageSource::File(p))
            } else {
                Err(format!("image {} not found", p.display()))
            }
        };
        let nonempty = |s: String, what: &str| {
            if s.trim().is_empty() {
                Err(format!("empty {what}"))
            } else {
                Ok(s)
            }
        };
        let origin = origin.to_string();
        if let Some(segments) = v.get("segments") {
            let segs = segments.as_array().ok_or("\"segments\" must be an array")?;
            let mut parts = Vec::new();
            for seg in segs {
                if let Some(t) = str_field(seg, "text")? {
                    parts.push(Part::Text { text: t, loss: true });
                } else if let Some(i) = str_field(seg, "image")? {
                    parts.push(Part::Image(image(&i)?));
                } else {
                    return Err(format!("segment {seg} has neither \"text\" nor \"image\""));
                }
            }
            let images = parts.iter().filter(|p| matches!(p, Part::Image(_))).count();
            if images > MAX_IMAGES {
                return Err(format!("{images} images, at most {MAX_IMAGES}"));
            }
            if !parts
                .iter()
                .any(|p| matches!(p, Part::Text { text, .. } if !text.trim().is_empty()))
            {
                return Err("no text in segments".into());
            }
            return Ok(Some(Example { parts, origin }));
        }
        let text = nonempty(str_field(&v, "text")?.ok_or("no \"text\" field")?, "text")?;
        match str_field(&v, "image")? {
            Some(i) => Ok(Some(Example::captioned(
                image(&i)?,
                str_field(&v, "prompt")?,
                text,
                origin,
            ))),
            None => Ok(Some(Example {
                parts: vec![Part::Text { text, loss: true }],
                origin,
            })),
        }
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
                .map_err(|e| TrainError::Data(format!("{}: read error: {e}", self.name)))?;
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
            .map_err(|e| TrainError::Data(format!("{}: seek: {e}", self.name)))?;
        self.line = cursor_u64(cursor, "line")?;
        self.offset = offset;
        Ok(())
    }
}
