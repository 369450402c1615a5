//! `kosmos-rt eval`: what `kosmos-train eval` measures, through a package — the loss and
//! perplexity of the target text (captions, answers, text-only and interleaved examples), and
//! greedy exact match on the caption/VQA examples — on the same data specs
//! (`kosmos_models::data`: a JSONL manifest, WebDataset tar shards, or `synthetic:*`'s test
//! split), so a trained checkpoint, its export and a quantised export compare without the
//! checkpoint at hand.

use image::RgbImage;
use kosmos_models::data::synthetic::Split;
use kosmos_models::data::{Part, SkipCounter, Source, open_source};
use kosmos_models::image::ImageLimits;
use kosmos_models::sequence::{Segment, assemble};

use crate::error::{Result, RtError};
use crate::generate::{GenerateParams, ImageInput, Prompt, VisionCache};
use crate::package::Package;

#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    /// Examples evaluated.
    pub items: usize,
    /// Caption/VQA examples (an image, an optional prompt, the reference), the ones generated.
    pub captioned: usize,
    pub correct: usize,
    /// `correct / captioned`; `None` without caption/VQA examples.
    pub exact_match: Option<f64>,
    /// Mean negative log-likelihood (nats) of the target text's tokens — every text but
    /// prompts, and the `</s>` after text that ends an example — teacher-forced: the trainer's
    /// loss.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens `loss` is the mean over.
    pub scored_tokens: usize,
    /// Bad records left out (invalid JSON or UTF-8, no text, a missing or undecodable image, a
    /// damaged shard entry), each named in a warning, as `kosmos-train` skips them.
    pub skipped: usize,
}

/// Examples `synthetic:*` gives without a limit (its sources are endless), as `kosmos-train
/// eval` and `data synth --split test` default to.
const SYNTHETIC_DEFAULT: usize = 200;

/// The examples [`evaluate`] reads from `data` with `limit`, where that is known beforehand (a
/// limit, or `synthetic:*`'s default); a manifest or shards are streamed, not counted first.
pub fn known_count(data: &str, limit: Option<usize>) -> Option<usize> {
    limit.or(data.starts_with("synthetic:").then_some(SYNTHETIC_DEFAULT))
}

/// One usable example: its parts in order, images decoded (once: checked here, since one that
/// does not decode would fail its whole batch).
enum EvalPart {
    Text { text: String, loss: bool },
    Image(RgbImage),
}

/// The next usable example of `source`, or `None` at its end; bad ones are counted in `skips`.
fn next_item(source: &mut dyn Source, skips: &SkipCounter) -> Result<Option<Vec<EvalPart>>> {
    while let Some(ex) = source.next(skips)? {
        let parts: std::result::Result<Vec<EvalPart>, kosmos_models::ModelsError> = ex
            .parts
            .iter()
            .map(|part| match part {
                Part::Text { text, loss } => Ok(EvalPart::Text {
                    text: text.clone(),
                    loss: *loss,
                }),
                Part::Image(src) => Ok(EvalPart::Image(
                    src.decoded(&ex.origin, ImageLimits::default())?.into_owned(),
                )),
            })
            .collect();
        match parts {
            Ok(parts) => return Ok(Some(parts)),
            Err(e) => skips.skip(&ex.origin, &e.to_string()),
        }
    }
    Ok(None)
}

/// The decoder's segments of `parts` (images as places).
fn segments_of(parts: &[EvalPart]) -> Vec<Segment> {
    parts
        .iter()
        .map(|part| match part {
            EvalPart::Text { text, .. } => Segment::Text(text.clone()),
            EvalPart::Image(_) => Segment::Image,
        })
        .collect()
}

/// The prompt of `parts`, images included.
fn prompt_of(parts: &[EvalPart]) -> Prompt {
    let images = parts.iter().filter_map(|part| match part {
        EvalPart::Image(img) => Some(ImageInput::Rgb(img.clone())),
        EvalPart::Text { .. } => None,
    });
    Prompt {
        segments: segments_of(parts),
        images: images.collect(),
    }
}

/// (context, reference) of a caption/VQA example: one image, an optional prompt, the target.
fn captioned(parts: &[EvalPart]) -> Option<(&[EvalPart], &str)> {
    match parts {
        [EvalPart::Image(_), EvalPart::Text { text, loss: true }]
        | [
            EvalPart::Image(_),
            EvalPart::Text { loss: false, .. },
            EvalPart::Text { text, loss: true },
        ] => Some((&parts[..parts.len() - 1], text)),
        _ => None,
    }
}

/// Exact match over the caption/VQA examples and loss over every example of `data` (a
/// `kosmos_models::data` spec; `synthetic:*` gives its test split, 200 examples unless
/// `limit`), `batch` examples per decoder call, streamed; `on_item` sees (reference,
/// generated) for each caption/VQA example, `on_progress` the examples done after each batch.
pub fn evaluate(
    pkg: &mut Package,
    data: &str,
    batch: usize,
    limit: Option<usize>,
    mut on_item: impl FnMut(&str, &str),
    mut on_progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let synthetic = data.starts_with("synthetic:");
    let limit = known_count(data, limit);
    let count = limit.filter(|_| synthetic).map(|l| l as u64);
    let mut source = open_source(data, Split::Test, 0, count)?;
    let skips = SkipCounter::default();
    let mut cache = VisionCache::new(0);
    let images_tokens = pkg.manifest.vision.tokens_per_image;
    let (mut items, mut captioned_items, mut correct) = (0, 0, 0);
    let (mut nll, mut scored_tokens) = (0f64, 0usize);
    loop {
        let mut chunk = Vec::new();
        while chunk.len() < batch.max(1) && limit.is_none_or(|l| items + chunk.len() < l) {
            match next_item(source.as_mut(), &skips)? {
                Some(parts) => chunk.push(parts),
                None => break,
            }
        }
        if chunk.is_empty() {
            break;
        }
        items += chunk.len();
        let prompts: Vec<Prompt> = chunk.iter().map(|parts| prompt_of(parts)).collect();
        for (parts, scored) in chunk.iter().zip(pkg.score(&mut cache, &prompts, true)?) {
            // Target positions: each loss text's tokens. Segments are encoded one by one, so a
            // part's tokens are its own assembly's after `<s>`.
            let mut start = 1;
            for (i, part) in parts.iter().enumerate() {
                let own = assemble(
                    &pkg.tokenizer,
                    &segments_of(std::slice::from_ref(part)),
                    images_tokens,
                    false,
                )?;
                let end = start + own.len() - 1;
                if let EvalPart::Text { loss: true, .. } = part {
                    // `</s>` follows the example's last part when that part is target text.
                    let end = if i + 1 == parts.len() { end + 1 } else { end };
                    for lp in scored.logprobs[start..end].iter().flatten() {
                        nll -= f64::from(*lp);
                        scored_tokens += 1;
                    }
                }
                start = end;
            }
        }

        let caption_lines: Vec<(&[EvalPart], &str)> = chunk.iter().filter_map(|p| captioned(p)).collect();
        if caption_lines.is_empty() {
            on_progress(items);
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
        on_progress(items);
    }
    if items == 0 {
        return Err(RtError::Input(format!(
            "{data}: no usable example ({} bad, each named above)",
            skips.count()
        )));
    }
    let loss = nll / scored_tokens.max(1) as f64;
    Ok(EvalReport {
        items,
        captioned: captioned_items,
        correct,
        exact_match: (captioned_items > 0).then(|| correct as f64 / captioned_items as f64),
        loss,
        perplexity: loss.exp(),
        scored_tokens,
        skipped: skips.count() as usize,
    })
}
