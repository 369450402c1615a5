//! Real examples as token rows for the tch reference and a package (`verify --data`, `--awq`):
//! any `kosmos-train` data spec, encoded as the trainer encodes them.

use std::path::Path;

use kosmos_models::KosmosConfig;
use kosmos_models::data::synthetic::Split;
use tch::Tensor;

use crate::error::{ExportError, Result};

/// One prompt of a batch.
pub struct Row {
    pub ids: Vec<i64>,
    /// Image slots (true), filled in order.
    pub image_mask: Vec<bool>,
    pub images: usize,
    /// The images' pixels ([3, S, S] each, in slot order); empty for made-up rows.
    pub pixels: Vec<Vec<f32>>,
}

/// The first `count` examples of `spec` (`synthetic:*` from `split`) of at most `room` tokens,
/// encoded with the checkpoint's tokenizer. Nothing usable is an error naming the spec and
/// `option`, the flag that gave it.
#[allow(clippy::too_many_arguments)]
pub fn data_rows(
    option: &'static str,
    cfg: &KosmosConfig,
    ckpt_dir: &Path,
    spec: &str,
    split: Split,
    seed: u64,
    count: usize,
    room: usize,
) -> Result<Vec<Row>> {
    use kosmos_models::data::example::{SkipCounter, encode};
    // Data errors name the source already.
    let bad = |e: kosmos_models::ModelsError| match e {
        kosmos_models::ModelsError::Data(message) => ExportError::Data { option, message },
        other => ExportError::Data {
            option,
            message: format!("{spec}: {other}"),
        },
    };
    let tok = kosmos_models::KosmosTokenizer::load(&ckpt_dir.join("tokenizer.json"), &cfg.tokenizer)?;
    let mut source = kosmos_models::data::open_source(spec, split, seed, None).map_err(bad)?;
    let skips = SkipCounter::default();
    let mut rows = Vec::new();
    while rows.len() < count.max(1) {
        let Some(ex) = source.next(&skips).map_err(bad)? else {
            break;
        };
        match encode(&ex, &tok, cfg) {
            Ok(e) if e.len() <= room => rows.push(Row {
                images: e.pixels.len(),
                ids: e.input_ids,
                image_mask: e.image_mask,
                pixels: e.pixels,
            }),
            Ok(e) => skips.skip(&ex.origin, &format!("{} tokens do not fit in {room}", e.len())),
            Err(e) => skips.skip(&ex.origin, &e.to_string()),
        }
    }
    if rows.is_empty() {
        return Err(ExportError::Data {
            option,
            message: format!("{spec}: no usable example ({} skipped)", skips.count()),
        });
    }
    Ok(rows)
}

/// `rows` left-padded to one length: (input_ids, attention_mask, image_mask, length).
pub fn left_padded(cfg: &KosmosConfig, rows: &[Row]) -> (Tensor, Tensor, Tensor, usize) {
    let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut ids = vec![cfg.tokenizer.pad_token_id as i64; rows.len() * len];
    let mut attn = vec![0i64; rows.len() * len];
    let mut img_mask = vec![false; rows.len() * len];
    for (r, row) in rows.iter().enumerate() {
        let at = r * len + len - row.ids.len();
        ids[at..at + row.ids.len()].copy_from_slice(&row.ids);
        attn[at..at + row.ids.len()].fill(1);
        img_mask[at..at + row.ids.len()].copy_from_slice(&row.image_mask);
    }
    let shape = [rows.len() as i64, len as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&attn).view(shape),
        Tensor::from_slice(&img_mask).view(shape),
        len,
    )
}

/// The rows' images, in slot order: [n, 3, S, S].
pub fn pixels(cfg: &KosmosConfig, rows: &[Row]) -> Tensor {
    let size = cfg.vision.image_size as i64;
    let all: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.pixels.iter().flatten().copied())
        .collect();
    let n = rows.iter().map(|r| r.images).sum::<usize>() as i64;
    Tensor::from_slice(&all).view([n, 3, size, size])
}
