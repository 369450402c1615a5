//! Image decoding and CLIP preprocessing, shared by the trainer and the runtime so both feed the
//! vision tower the same pixels: decode (PNG/JPEG/WebP, with size limits against decompression
//! bombs), drop alpha, resize the shortest side to `size` (bicubic, antialiased), centre-crop to
//! `size`×`size`, scale to [0, 1] and normalise with CLIP's mean and std (as Hugging Face's
//! `CLIPImageProcessor` does).

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{ImageReader, Limits, RgbImage};

use crate::error::{ModelsError, Result};

/// CLIP's per-channel normalisation (OpenAI CLIP, as in `CLIPImageProcessor`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Largest accepted image side and decoder allocation; bigger inputs are refused before decoding.
#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    pub max_side: u32,
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_side: 8192,
            max_bytes: 512 << 20,
        }
    }
}

/// Decode an image from memory; `what` names it in errors (a path, `file.tar:key`, a request).
pub fn decode_image(bytes: &[u8], what: &str, limits: ImageLimits) -> Result<RgbImage> {
    let bad = |message: String| ModelsError::Image {
        what: what.to_string(),
        message,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad("not a PNG, JPEG or WebP image".into()));
    }
    // Read the header first so an oversized image is named with its size, before any allocation.
    let (w, h) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .into_dimensions()
        .map_err(|e| bad(e.to_string()))?;
    if w > limits.max_side || h > limits.max_side {
        return Err(bad(format!(
            "{w}x{h} pixels exceeds the limit of {} pixels per side",
            limits.max_side
        )));
    }
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_bytes);
    reader.limits(l);
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Read and decode an image file.
pub fn load_image(path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
    decode_image(&bytes, &path.display().to_string(), limits)
}

/// CLIP preprocessing to `size`×`size`: channel-major f32 [3, size, size].
pub fn clip_preprocess(img: &RgbImage, size: u32) -> Vec<f32> {
    let (w, h) = img.dimensions();
    // Hugging Face: the short side becomes `size`, the long side int(size * long / short).
    let (nw, nh) = if w <= h {
        (
            size,
            ((size as u64 * h as u64) / w.max(1) as u64).max(size as u64) as u32,
        )
    } else {
        (
            ((size as u64 * w as u64) / h.max(1) as u64).max(size as u64) as u32,
            size,
        )
    };
    let resized;
    let src = if (nw, nh) == (w, h) {
        img
    } else {
        resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
        &resized
    };
    let top = (nh - size) / 2;
    let left = (nw - size) / 2;
    let plane = (size * size) as usize;
    let mut out = vec![0f32; 3 * plane];
    for y in 0..size {
        for x in 0..size {
            let p = src.get_pixel(left + x, top + y);
            let i = (y * size + x) as usize;
            for c in 0..3 {
                out[c * plane + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    out
}
