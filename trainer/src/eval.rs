//! `kosmos-train eval`: loss and perplexity over a data source, and for caption/VQA items greedy
//! exact match (the generated text, trimmed, equals the reference).

use kosmos_models::sequence::{Segment, assemble};
use kosmos_models::{KosmosConfig, KosmosTokenizer};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::example::{SkipCounter, encode, preprocess};
use crate::data::source::Source;
use crate::data::{Batch, DataState, Example};
use crate::error::Result;
use crate::fit::{batch_loss, to_tensors};
use crate::generate::greedy;
use crate::model::Kosmos;

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    /// Fraction of caption/VQA items whose greedy output equals the reference (None: no such items).
    pub exact_match: Option<f64>,
    pub examples: usize,
    pub captioned: usize,
    pub skipped: u64,
}

/// One item's greedy output next to its reference.
#[derive(Debug, Serialize)]
pub struct Prediction {
    pub origin: String,
    pub reference: String,
    pub generated: String,
}

/// Evaluate on every example `source` yields in one epoch (at most `limit`), `batch` at a time.
pub fn evaluate(
    model: &Kosmos,
    tok: &KosmosTokenizer,
    source: &mut dyn Source,
    limit: Option<usize>,
    batch: usize,
    mut on_prediction: impl FnMut(&Prediction),
) -> Result<EvalReport> {
    let cfg = &model.config;
    let device = model.decoder.embed_tokens.device();
    let skips = SkipCounter::default();
    let (mut loss_sum, mut loss_tokens, mut examples, mut captioned, mut correct) = (0.0, 0usize, 0, 0, 0);
    let mut chunk: Vec<Example> = Vec::new();
    let mut flush = |chunk: &mut Vec<Example>| -> Result<()> {
        let encoded: Vec<_> = chunk
            .iter()
            .filter_map(|ex| match encode(ex, tok, cfg) {
                Ok(e) if e.len() <= cfg.decoder.max_target_positions => Some((ex, e)),
                Ok(e) => {
                    skips.skip(&ex.origin, &format!("{} tokens exceed the context", e.len()));
                    None
                }
                Err(err) => {
                    skips.skip(&ex.origin, &err.to_string());
                    None
                }
            })
            .collect();
        if encoded.is_empty() {
            chunk.clear();
            return Ok(());
        }
        // Loss: one example per row, right-padded.
        let len = encoded.iter().map(|(_, e)| e.len()).max().unwrap_or(1);
        let rows = encoded.len();
        let pad = tok.special().pad_token_id as i64;
        let mut b = Batch::padded(rows, len, pad, DataState::default());
        let mut n_targets = 0;
        for (r, (_, e)) in encoded.iter().enumerate() {
            n_targets += b.place(r, 0, e);
        }
        let t = to_tensors(&b, cfg, device);
        let loss = tch::no_grad(|| batch_loss(model, &t, false))?.double_value(&[]);
        if n_targets > 0 {
            loss_sum += loss * n_targets as f64;
            loss_tokens += n_targets;
        }
        examples += rows;

        // Exact match over the caption-style items.
        let mut prompts = Vec::new();
        let mut pixels = Vec::new();
        let mut refs = Vec::new();
        for (ex, _) in &encoded {
            if let Some((img, prompt, text)) = ex.as_captioned() {
                let mut segs = vec![Segment::Image];
                if let Some(p) = prompt {
                    segs.push(Segment::Text(p.to_string()));
                }
                prompts.push(assemble(tok, &segs, cfg.image_tokens(), false)?);
                pixels.extend(preprocess(img, &ex.origin, cfg.vision.image_size as u32)?);
                refs.push((ex.origin.clone(), text.to_string(), tok.encode(text)?.len()));
            }
        }
        if !prompts.is_empty() {
            let s = cfg.vision.image_size as i64;
            let px = Tensor::from_slice(&pixels)
                .view([prompts.len() as i64, 3, s, s])
                .to_kind(Kind::Float);
            let max_new = refs.iter().map(|r| r.2).max().unwrap_or(0) + 8;
            let out = greedy(model, &prompts, Some(&px), max_new)?;
            for ((origin, reference, _), ids) in refs.into_iter().zip(out) {
                let generated = tok.decode(&ids)?;
                captioned += 1;
                if generated.trim() == reference.trim() {
                    correct += 1;
                }
                on_prediction(&Prediction {
                    origin,
                    reference,
                    generated,
                });
            }
        }
        chunk.clear();
        Ok(())
    };
    let mut read = 0usize;
    while limit.is_none_or(|l| read < l) {
        match source.next(&skips)? {
            Some(ex) => {
                read += 1;
                chunk.push(ex);
                if chunk.len() == batch {
                    flush(&mut chunk)?;
                }
            }
            None => break,
        }
    }
    flush(&mut chunk)?;
    let loss = if loss_tokens > 0 {
        loss_sum / loss_tokens as f64
    } else {
        f64::NAN
    };
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        exact_match: (captioned > 0).then(|| correct as f64 / captioned as f64),
        examples,
        captioned,
        skipped: skips.count(),
    })
}

/// Greedy caption/answer for one image (and optional prompt): the trainer's reference decoding.
pub fn caption(
    model: &Kosmos,
    tok: &KosmosTokenizer,
    cfg: &KosmosConfig,
    pixels: &[f32],
    prompt: Option<&str>,
    max_new: usize,
) -> Result<String> {
    let mut segs = vec![Segment::Image];
    if let Some(p) = prompt {
        segs.push(Segment::Text(p.to_string()));
    }
    let a = assemble(tok, &segs, cfg.image_tokens(), false)?;
    let s = cfg.vision.image_size as i64;
    let px = Tensor::from_slice(pixels)
        .view([1, 3, s, s])
        .to_device(Device::Cpu);
    let ids = greedy(model, &[a], Some(&px), max_new)?.remove(0);
    Ok(tok.decode(&ids)?)
}
