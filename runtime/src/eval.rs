//! `kosmos-rt eval`: what `kosmos-train eval` measures, through a package — the loss and
//! perplexity of a manifest's target text (captions, answers, text-only and interleaved lines;
//! `kosmos_models::manifest`'s format), and greedy exact match on its caption/VQA lines — so a
//! trained checkpoint, its export and a quantised export compare without the checkpoint at hand.

use std::path::Path;

use kosmos_models::image::{ImageLimits, load_image};
use kosmos_models::manifest::{ManifestPart, parse_line};
use kosmos_models::sequence::Segment;

use crate::error::{Result, RtError};
use crate::generate::{GenerateParams, ImageInput, Prompt, VisionCache};
use crate::package::Package;

#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    /// Lines evaluated.
    pub items: usize,
    /// Caption/VQA lines (an image, an optional prompt, the reference), the ones generated.
    pub captioned: usize,
    pub correct: usize,
    /// `correct / captioned`; `None` without caption/VQA lines.
    pub exact_match: Option<f64>,
    /// Mean negative log-likelihood (nats) of the target text's tokens — every text but
    /// prompts, and the `</s>` after text that ends a line — teacher-forced: the trainer's loss.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens `loss` is the mean over.
    pub scored_tokens: usize,
    /// Bad lines left out (invalid JSON or UTF-8, no text, a missing or undecodable image), each
    /// named in a warning, as `kosmos-train` skips them.
    pub skipped: usize,
}

/// The usable lines of the manifest at `path` and how many bad ones were skipped (a warning
/// names each by line); a manifest with no usable line is an error.
fn read_manifest(path: &Path) -> Result<(Vec<Vec<ManifestPart>>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| RtError::Input(format!("{}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let (mut items, mut skipped) = (Vec::new(), 0);
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let parts = parse_line(line, base).and_then(|parts| match parts {
            // An image that does not decode fails the whole batch it lands in: check it here.
            Some(parts) => match parts.iter().find_map(|p| match p {
                ManifestPart::Image(image) => load_image(image, ImageLimits::default()).err(),
                ManifestPart::Text { .. } => None,
            }) {
                Some(e) => Err(e.to_string()),
                None => Ok(Some(parts)),
            },
            None => Ok(None),
        });
        match parts {
            Ok(Some(parts)) => items.push(parts),
            Ok(None) => {}
            Err(why) => {
                skipped += 1;
                tracing::warn!(manifest = %path.display(), line = n + 1, "skipping a bad line: {why}");
            }
        }
    }
    if items.is_empty() {
        return Err(RtError::Input(format!(
            "{}: no usable line ({skipped} bad, each named above)",
            path.display()
        )));
    }
    Ok((items, skipped))
}

/// The prompt of `parts` (images as segments, in order).
fn prompt_of(parts: &[ManifestPart]) -> Prompt {
    let mut p = Prompt::default();
    for part in parts {
        match part {
            ManifestPart::Text { text, .. } => p.segments.push(Segment::Text(text.clone())),
            ManifestPart::Image(path) => {
                p.segments.push(Segment::Image);
                p.images.push(ImageInput::Path(path.clone()));
            }
        }
    }
    p
}

/// (context, reference) of a caption/VQA line: one image, an optional prompt, the target.
fn captioned(parts: &[ManifestPart]) -> Option<(&[ManifestPart], &str)> {
    match parts {
        [ManifestPart::Image(_), ManifestPart::Text { text, loss: true }]
        | [
            ManifestPart::Image(_),
            ManifestPart::Text { loss: false, .. },
            ManifestPart::Text { text, loss: true },
        ] => Some((&parts[..parts.len() - 1], text)),
        _ => None,
    }
}

/// Exact match over the caption/VQA lines and loss over every line of `manifest`, `batch` lines
/// per decoder call; `on_item` sees (reference, generated) for each caption/VQA line.
pub fn evaluate(
    pkg: &mut Package,
    manifest: &Path,
    batch: usize,
    limit: Option<usize>,
    mut on_item: impl FnMut(&str, &str),
) -> Result<EvalReport> {
    let (mut items, skipped) = read_manifest(manifest)?;
    if let Some(l) = limit {
        items.truncate(l);
    }
    let mut cache = VisionCache::new(0);
    let (mut captioned_items, mut correct) = (0, 0);
    let (mut nll, mut scored_tokens) = (0f64, 0usize);
    for chunk in items.chunks(batch.max(1)) {
        let prompts: Vec<Prompt> = chunk.iter().map(|parts| prompt_of(parts)).collect();
        for (parts, scored) in chunk.iter().zip(pkg.score(&mut cache, &prompts, true)?) {
            // Target positions: each loss text's tokens, found from the lengths of the prefixes.
            let mut start = 1;
            for (i, part) in parts.iter().enumerate() {
                let end = pkg.assemble(&prompt_of(&parts[..=i]))?.len();
                if let ManifestPart::Text { loss: true, .. } = part {
                    // `</s>` follows the line's last part when that part is target text.
                    let end = if i + 1 == parts.len() { end + 1 } else { end };
                    for lp in scored.logprobs[start..end].iter().flatten() {
                        nll -= f64::from(*lp);
                        scored_tokens += 1;
                    }
                }
                start = end;
            }
        }

        let caption_lines: Vec<(&[ManifestPart], &str)> = chunk.iter().filter_map(|p| captioned(p)).collect();
        if caption_lines.is_empty() {
            continue;
        }
        let contexts: Vec<Prompt> = caption_lines.iter().map(|(c, _)| prompt_of(c)).collect();
        let longest = caption_lines
            .iter()
            .map(|(_, text)| pkg.tokenizer.encode(text).map(|t| t.len()))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let params = GenerateParams {
            max_tokens: longest + 8,
            ..Default::default()
        };
        let out = pkg.generate(&mut cache, &contexts, &params, &mut |_, _| true)?;
        for ((_, reference), g) in caption_lines.iter().zip(out) {
            captioned_items += 1;
            if g.text.trim() == reference.trim() {
                correct += 1;
            }
            on_item(reference, &g.text);
        }
    }
    let loss = nll / scored_tokens.max(1) as f64;
    Ok(EvalReport {
        items: items.len(),
        captioned: captioned_items,
        correct,
        exact_match: (captioned_items > 0).then(|| correct as f64 / captioned_items as f64),
        loss,
        perplexity: loss.exp(),
        scored_tokens,
        skipped,
    })
}
