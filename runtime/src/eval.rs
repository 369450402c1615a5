//! `kosmos-rt eval`: greedy exact match, and loss and perplexity of the references, of a package
//! on a caption/VQA manifest (JSONL lines `{"image": path, "prompt"?: text, "text": reference}`,
//! paths relative to the manifest) — `kosmos-train eval`'s measures, so a trained checkpoint, its
//! export and a quantised export can be compared without the checkpoint at hand.

use std::path::Path;

use kosmos_models::sequence::Segment;

use crate::error::{Result, RtError};
use crate::generate::{GenerateParams, ImageInput, Prompt, VisionCache};
use crate::package::Package;

#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    pub exact_match: f64,
    pub items: usize,
    pub correct: usize,
    /// Mean negative log-likelihood (nats) of each reference's tokens and the `</s>` after it,
    /// teacher-forced after the image and prompt: the trainer's loss on the same items.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens `loss` is the mean over.
    pub scored_tokens: usize,
}

struct Item {
    image: std::path::PathBuf,
    prompt: Option<String>,
    text: String,
}

fn read_manifest(path: &Path) -> Result<Vec<Item>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| RtError::Input(format!("{}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |m: &str| RtError::Input(format!("{}:{}: {m}", path.display(), n + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(image), Some(text)) = (field("image"), field("text")) else {
            return Err(bad("needs \"image\" and \"text\""));
        };
        items.push(Item {
            image: base.join(image),
            prompt: field("prompt"),
            text,
        });
    }
    Ok(items)
}

/// Greedy exact match over `manifest`, `batch` prompts per generate call; `on_item` sees
/// (reference, generated) for each.
pub fn evaluate(
    pkg: &mut Package,
    manifest: &Path,
    batch: usize,
    limit: Option<usize>,
    mut on_item: impl FnMut(&str, &str),
) -> Result<EvalReport> {
    let mut items = read_manifest(manifest)?;
    if let Some(l) = limit {
        items.truncate(l);
    }
    let mut cache = VisionCache::new(0);
    let mut correct = 0;
    let (mut nll, mut scored_tokens) = (0f64, 0usize);
    for chunk in items.chunks(batch.max(1)) {
        let prompts: Vec<Prompt> = chunk
            .iter()
            .map(|it| {
                let mut segments = vec![Segment::Image];
                if let Some(p) = &it.prompt {
                    segments.push(Segment::Text(p.clone()));
                }
                Prompt {
                    segments,
                    images: vec![ImageInput::Path(it.image.clone())],
                }
            })
            .collect();
        // The reference after the prompt, as the trainer lays out a captioned example.
        let references: Vec<Prompt> = prompts
            .iter()
            .zip(chunk)
            .map(|(p, it)| {
                let mut p = p.clone();
                p.segments.push(Segment::Text(it.text.clone()));
                p
            })
            .collect();
        for (p, scored) in prompts.iter().zip(pkg.score(&mut cache, &references, true)?) {
            let context = pkg.assemble(p)?.len();
            for lp in scored.logprobs[context..].iter().flatten() {
                nll -= f64::from(*lp);
                scored_tokens += 1;
            }
        }
        let longest = chunk
            .iter()
            .map(|it| pkg.tokenizer.encode(&it.text).map(|t| t.len()))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let params = GenerateParams {
            max_tokens: longest + 8,
            ..Default::default()
        };
        let out = pkg.generate(&mut cache, &prompts, &params, &mut |_, _| true)?;
        for (it, g) in chunk.iter().zip(out) {
            if g.text.trim() == it.text.trim() {
                correct += 1;
            }
            on_item(&it.text, &g.text);
        }
    }
    Ok(EvalReport {
        exact_match: if items.is_empty() {
            0.0
        } else {
            correct as f64 / items.len() as f64
        },
        items: items.len(),
        correct,
        loss: nll / scored_tokens.max(1) as f64,
        perplexity: (nll / scored_tokens.max(1) as f64).exp(),
        scored_tokens,
    })
}
