//! One training example before tokenisation, and its conversion to token ids, image slots,
//! loss targets and preprocessed pixels.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::image::{ImageLimits, clip_preprocess, decode_image, load_image};
use crate::sequence::{Segment, assemble};
use crate::{KosmosConfig, KosmosTokenizer};
use image::RgbImage;

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    Pixels(RgbImage),
    File(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
pub enum Part {
    /// Text; `loss` says whether the model is trained to produce it (prompts are not).
    Text {
        text: String,
        loss: bool,
    },
    Image(ImageSource),
}

#[derive(Clone, Debug)]
pub struct Example {
    pub parts: Vec<Part>,
    /// Where it came from, for warnings (`manifest.jsonl:12`, `shard-00003.tar:000123`).
    pub origin: String,
}

impl Example {
    /// An image with an optional no-loss prompt and a caption/answer: the image-caption and VQA form.
    pub fn captioned(image: ImageSource, prompt: Option<String>, text: String, origin: String) -> Self {
        let mut parts = vec![Part::Image(image)];
        if let Some(p) = prompt {
            parts.push(Part::Text { text: p, loss: false });
        }
        parts.push(Part::Text { text, loss: true });
        Example { parts, origin }
    }

    /// The caption-style view: (image, prompt, target text) when this is one image followed by
    /// text (the form greedy exact-match evaluates).
    pub fn as_captioned(&self) -> Option<(&ImageSource, Option<&str>, &str)> {
        match self.parts.as_slice() {
            [Part::Image(img), Part::Text { text, loss: true }] => Some((img, None, text)),
            [
                Part::Image(img),
                Part::Text { text: p, loss: false },
                Part::Text { text, loss: true },
            ] => Some((img, Some(p), text)),
            _ => None,
        }
    }
}

/// An example turned into model inputs.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub input_ids: Vec<i64>,
    pub image_mask: Vec<bool>,
    /// Whether token t is a training target (text with loss, and the closing `</s>`).
    pub loss_mask: Vec<bool>,
    /// Preprocessed images, [3, S, S] each, in slot order.
    pub pixels: Vec<Vec<f32>>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

impl ImageSource {
    /// The image's pixels, decoded if needed (size limits enforced; `what` names it in errors).
    pub fn decoded(&self, what: &str, limits: ImageLimits) -> crate::Result<Cow<'_, RgbImage>> {
        Ok(match self {
            ImageSource::Pixels(img) => Cow::Borrowed(img),
            ImageSource::File(p) => Cow::Owned(load_image(p, limits)?),
            ImageSource::Bytes(b) => Cow::Owned(decode_image(b, what, limits)?),
        })
    }
}

/// Decode (if needed) and preprocess one image.
pub fn preprocess(src: &ImageSource, what: &str, size: u32) -> crate::Result<Vec<f32>> {
    let img = src.decoded(what, ImageLimits::default())?;
    Ok(clip_preprocess(&img, size))
}

/// `<s> parts… </s>` with loss on the text parts that have it and on `</s>` after them.
pub fn encode(ex: &Example, tok: &KosmosTokenizer, cfg: &KosmosConfig) -> crate::Result<Encoded> {
    let sp = tok.special();
    let mut out = Encoded::default();
    let push_seq = |segs: &[Segment], loss: bool, out: &mut Encoded| -> crate::Result<()> {
        let a = assemble(tok, segs, cfg.image_tokens(), false)?;
        // `assemble` starts with <s>; only the first call keeps it.
        let skip = usize::from(!out.input_ids.is_empty());
        for (&id, &img) in a.input_ids.iter().zip(&a.image_mask).skip(skip) {
            out.input_ids.push(id as i64);
            out.image_mask.push(img);
            out.loss_mask.push(loss && !img);
        }
        Ok(())
    };
    let mut last_loss = false;
    push_seq(&[], false, &mut out)?;
    for part in &ex.parts {
        match part {
            Part::Text { text, loss } => {
                push_seq(&[Segment::Text(text.clone())], *loss, &mut out)?;
                last_loss = *loss;
            }
            Part::Image(src) => {
                out.pixels
                    .push(preprocess(src, &ex.origin, cfg.vision.image_size as u32)?);
                push_seq(&[Segment::Image], false, &mut out)?;
                last_loss = false;
            }
        }
    }
    out.input_ids.push(sp.eos_token_id as i64);
    out.image_mask.push(false);
    out.loss_mask.push(last_loss);
    Ok(out)
}

/// Counts of records skipped for bad data, shared by every source of a run.
#[derive(Debug, Default)]
pub struct SkipCounter(AtomicU64);

impl SkipCounter {
    pub fn skip(&self, origin: &str, why: &str) {
        self.0.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("skipping {origin}: {why}");
    }
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
