//! One line of a JSONL data manifest, the format `kosmos-train` trains on and `kosmos-rt eval`
//! scores: `{"image": "path", "text": "caption", "prompt"?: "..."}` (image-caption, VQA,
//! instructions; the prompt gets no loss), `{"text": "..."}` (text only), or
//! `{"segments": [{"text": ...}, {"image": ...}, ...]}` (interleaved, at most [`MAX_IMAGES`]
//! images). Image paths are relative to the manifest's directory.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Most images in one interleaved line.
pub const MAX_IMAGES: usize = 5;

/// One part of a line, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ManifestPart {
    /// Text; `loss` says whether it is a target (a caption, an answer) or context (a prompt).
    Text { text: String, loss: bool },
    /// An image file that exists.
    Image(PathBuf),
}

/// The parts of one line (`None` for a blank line); a bad record is `Err` with the reason.
pub fn parse_line(line: &[u8], dir: &Path) -> Result<Option<Vec<ManifestPart>>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "line is not UTF-8".to_string())?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let str_field = |v: &Value, k: &str| -> Result<Option<String>, String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("{k:?} must be a string, got {other}")),
        }
    };
    let image = |rel: &str| -> Result<ManifestPart, String> {
        let p = dir.join(rel);
        if p.is_file() {
            Ok(ManifestPart::Image(p))
        } else {
            Err(format!("image {} not found", p.display()))
        }
    };
    if let Some(segments) = v.get("segments") {
        let segs = segments.as_array().ok_or("\"segments\" must be an array")?;
        let mut parts = Vec::new();
        for seg in segs {
            if let Some(t) = str_field(seg, "text")? {
                parts.push(ManifestPart::Text { text: t, loss: true });
            } else if let Some(i) = str_field(seg, "image")? {
                parts.push(image(&i)?);
            } else {
                return Err(format!("segment {seg} has neither \"text\" nor \"image\""));
            }
        }
        let images = parts
            .iter()
            .filter(|p| matches!(p, ManifestPart::Image(_)))
            .count();
        if images > MAX_IMAGES {
            return Err(format!("{images} images, at most {MAX_IMAGES}"));
        }
        if !parts
            .iter()
            .any(|p| matches!(p, ManifestPart::Text { text, .. } if !text.trim().is_empty()))
        {
            return Err("no text in segments".into());
        }
        return Ok(Some(parts));
    }
    let text = str_field(&v, "text")?.ok_or("no \"text\" field")?;
    if text.trim().is_empty() {
        return Err("empty text".into());
    }
    let mut parts = Vec::new();
    if let Some(i) = str_field(&v, "image")? {
        parts.push(image(&i)?);
        if let Some(prompt) = str_field(&v, "prompt")? {
            parts.push(ManifestPart::Text {
                text: prompt,
                loss: false,
            });
        }
    }
    parts.push(ManifestPart::Text { text, loss: true });
    Ok(Some(parts))
}
