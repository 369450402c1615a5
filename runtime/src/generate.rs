//! Generation over a package: prompt assembly with interleaved images, a vision-embedding cache,
//! batched prefill of left-padded prompts, then decode steps over the KV cache with greedy,
//! temperature / top-k / top-p sampling, repetition penalty, stop strings, or beam search.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use half::f16;
use kosmos_models::KosmosTokenizer;
use kosmos_models::image::{ImageLimits, clip_preprocess, decode_image, load_image};
use kosmos_models::package::{KvCacheLayout, KvDtype, io};

use crate::draft::{Draft, DraftRun};
use crate::speculate::{GuessSchedule, Speculation};
use kosmos_models::sequence::{Assembled, Segment, assemble};
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};
use ort::value::{IntoShape, PrimitiveTensorElementType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::constrain::ActiveConstraint;
use crate::error::{Result, RtError};
use crate::package::Package;

/// An image given to a prompt.
#[derive(Clone, Debug)]
pub enum ImageInput {
    Path(PathBuf),
    /// Encoded PNG/JPEG/WebP bytes.
    Bytes(Vec<u8>),
    /// Decoded RGB pixels.
    Rgb(image::RgbImage),
}

/// A prompt: text and images in order.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    pub segments: Vec<Segment>,
    pub images: Vec<ImageInput>,
}

/// The marker that places an image in prompt text.
pub const IMAGE_MARKER: &str = "<image>";

impl Prompt {
    /// `text` with `<image>` markers placing `images` in order; without markers, the images come
    /// first (so an image and no text is a captioning prompt).
    pub fn parse(text: &str, images: Vec<ImageInput>) -> Result<Self> {
        let markers = text.matches(IMAGE_MARKER).count();
        let mut segments = Vec::new();
        if markers == 0 {
            segments.extend(images.iter().map(|_| Segment::Image));
            if !text.is_empty() {
                segments.push(Segment::Text(text.to_string()));
            }
        } else {
            if markers != images.len() {
                return Err(RtError::Input(format!(
                    "the prompt has {markers} {IMAGE_MARKER} markers but {} images were given",
                    images.len()
                )));
            }
            for (i, part) in text.split(IMAGE_MARKER).enumerate() {
                if i > 0 {
                    segments.push(Segment::Image);
                }
                if !part.is_empty() {
                    segments.push(Segment::Text(part.to_string()));
                }
            }
        }
        Ok(Prompt { segments, images })
    }
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 1: off (CTRL-style: positive logits divided, negative multiplied, for tokens seen so far).
    pub repetition_penalty: f32,
    /// 0: off. OpenAI's: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// 0: off. OpenAI's: subtracted from a token's logit once per time it was generated so far.
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Beam search width (1: off). Beams are deterministic: sampling settings are ignored.
    pub beams: usize,
    /// Keep generating after `</s>` (benchmarks).
    pub ignore_eos: bool,
    /// Added to these tokens' logits before anything else (OpenAI's `logit_bias`, each in
    /// [-100, 100]: -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// 0: off. Sampling keeps only tokens at least this fraction as likely as the most likely
    /// one, after temperature (vLLM's and llama.cpp's `min_p`).
    pub min_p: f32,
    /// `</s>` and `stop_token_ids` cannot come before this many tokens (vLLM's `min_tokens`).
    pub min_tokens: usize,
    /// Generation also ends at any of these token ids, which, like `</s>`, are not part of the
    /// text (vLLM's `stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// Structured output: the generated text follows this grammar (compiled from a JSON Schema,
    /// a regular expression, choices or GBNF by `kosmos_grammar::Constraint`); generation ends
    /// when the grammar is complete and allows nothing more.
    pub constraint: Option<Arc<kosmos_grammar::Grammar>>,
    /// When not empty, only these tokens can be generated, `</s>` included only if listed
    /// (vLLM's `allowed_token_ids`).
    pub allowed_token_ids: Vec<u32>,
    /// Token sequences never generated: a token that would complete one is ruled out (vLLM's
    /// `bad_words`, tokenized by the front end).
    pub bad_words: Vec<Vec<u32>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 32,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            stop: Vec::new(),
            beams: 1,
            ignore_eos: false,
            logit_bias: Vec::new(),
            min_p: 0.0,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            constraint: None,
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
        }
    }
}

/// vLLM's `bad_words` as token sequences for [`GenerateParams::bad_words`]: each word as it
/// would start the text and after a space, the two ways it is tokenized mid-text.
pub fn bad_word_tokens(
    tok: &KosmosTokenizer,
    words: &[String],
) -> std::result::Result<Vec<Vec<u32>>, String> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for w in words {
        if w.trim().is_empty() {
            return Err("bad_words entries must not be empty".into());
        }
        for text in [w.clone(), format!(" {}", w.trim_start())] {
            let ids = tok.encode(&text).map_err(|e| format!("bad_words: {e}"))?;
            if !ids.is_empty() && !out.contains(&ids) {
                out.push(ids);
            }
        }
    }
    Ok(out)
}

/// Most stop strings one request may give (vLLM takes any number, OpenAI 4; evaluation harness
/// tasks send 5).
pub const MAX_STOP: usize = 16;

impl GenerateParams {
    /// The first token id in `logit_bias` or `stop_token_ids` that is not in a vocabulary of
    /// `vocab` tokens, as (field, message).
    pub fn invalid_token(&self, vocab: usize) -> Option<(&'static str, String)> {
        let bad = |t: u32| t as usize >= vocab;
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| bad(*t)) {
            return Some((
                "logit_bias",
                format!("logit_bias token {t} is not below the vocabulary size {vocab}"),
            ));
        }
        if let Some(t) = self.stop_token_ids.iter().find(|t| bad(**t)) {
            return Some((
                "stop_token_ids",
                format!("stop token {t} is not below the vocabulary size {vocab}"),
            ));
        }
        if let Some(t) = self.allowed_token_ids.iter().find(|t| bad(**t)) {
            return Some((
                "allowed_token_ids",
                format!("allowed token {t} is not below the vocabulary size {vocab}"),
            ));
        }
        if let Some(t) = self.bad_words.iter().flatten().find(|t| bad(**t)) {
            return Some((
                "bad_words",
                format!("bad_words token {t} is not below the vocabulary size {vocab}"),
            ));
        }
        None
    }

    /// Whether `tok` ends generation here (`</s>` unless ignored, or a stop token id).
    pub(crate) fn ends(&self, tok: u32, eos: u32) -> bool {
        (tok == eos && !self.ignore_eos) || self.stop_token_ids.contains(&tok)
    }

    /// The first sampling setting out of its range, as (field, message), for every front end
    /// (server, C ABI, CLI) to report in its own way. `max_tokens` and `beams` are the front
    /// ends' to check: what they allow differs (scoring with 0 tokens, beams in the engine).
    pub fn invalid_setting(&self) -> Option<(&'static str, String)> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Some(("temperature", format!("temperature must be ≥ 0, got {t}")));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Some(("top_p", format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Some((
                "repetition_penalty",
                format!("repetition_penalty must be positive (1: off), got {r}"),
            ));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Some((field, format!("{field} must be in [-2, 2], got {v}")));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(b)))
        {
            return Some((
                "logit_bias",
                format!("logit_bias values must be in [-100, 100], got {b} for token {t}"),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Some(("min_p", format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if self.min_tokens > self.max_tokens {
            return Some((
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed max_tokens ({})",
                    self.min_tokens, self.max_tokens
                ),
            ));
        }
        if self.stop.len() > MAX_STOP || self.stop.iter().any(|s| s.is_empty()) {
            return Some((
                "stop",
                format!(
                    "stop takes up to {MAX_STOP} non-empty strings, got {}",
                    self.stop.len()
                ),
            ));
        }
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `</s>` or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The token callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub timings: Timings,
}

/// Wall times of one `generate` call (shared by the prompts of a batch).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Image preprocessing and vision graph (0 when every image was cached).
    pub vision_ms: f64,
    /// The prefill decoder call.
    pub prefill_ms: f64,
    /// Each later decoder call (one token per prompt each, or, speculating, one and the
    /// guesses kept).
    pub decode_ms: Vec<f64>,
    /// Speculating: guessed tokens fed to the decoder, and those the sampler picked too.
    pub drafted: usize,
    pub accepted: usize,
    /// Speculating with a draft model: its vision, prefill and guessing calls.
    pub draft_ms: f64,
}

/// Streaming callback: (prompt index, new text) → keep going.
pub type OnToken<'a> = dyn FnMut(usize, &str) -> bool + 'a;

/// Bounded cache of image embeddings keyed by the SHA-256 of the preprocessed pixels.
#[derive(Default)]
pub struct VisionCache {
    map: HashMap<[u8; 32], Arc<Vec<f32>>>,
    order: VecDeque<[u8; 32]>,
    pub capacity: usize,
    pub hits: u64,
}

impl VisionCache {
    pub fn new(capacity: usize) -> Self {
        VisionCache {
            capacity,
            ..Default::default()
        }
    }
    fn get(&mut self, k: &[u8; 32]) -> Option<Arc<Vec<f32>>> {
        let v = self.map.get(k).cloned();
        if v.is_some() {
            self.hits += 1;
        }
        v
    }
    fn put(&mut self, k: [u8; 32], v: Arc<Vec<f32>>) {
        if self.capacity == 0 {
            return;
        }
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// The KV cache of a batch: the package's `present.*` values, fed back as `past_key_values.*`.
pub(crate) struct Cache {
    values: Vec<DynValue>,
    /// Tokens in the cache.
    pub(crate) len: usize,
    /// Buffer layout: the preallocated slots per row (the values are bound as both past and
    /// present, so the decoder writes new entries in place).
    capacity: Option<usize>,
}

/// A cache tensor's elements, whatever its dtype.
enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>),
}

impl KvData {
    /// The elements of cache tensor `v`.
    fn of(v: &DynValue) -> Result<Self> {
        Ok(if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
            KvData::F32(d.to_vec())
        } else if let Ok((_, d)) = v.try_extract_tensor::<f16>() {
            KvData::F16(d.to_vec())
        } else {
            KvData::I8(v.try_extract_tensor::<i8>()?.1.to_vec())
        })
    }

    /// Rows `parents` of `row` elements each, in that order.
    fn gather(self, parents: &[usize], row: usize) -> Self {
        fn rows<T: Copy>(d: &[T], parents: &[usize], row: usize) -> Vec<T> {
            parents
                .iter()
                .flat_map(|&p| d[p * row..(p + 1) * row].iter().copied())
                .collect()
        }
        match self {
            KvData::F32(d) => KvData::F32(rows(&d, parents, row)),
            KvData::F16(d) => KvData::F16(rows(&d, parents, row)),
            KvData::I8(d) => KvData::I8(rows(&d, parents, row)),
        }
    }

    /// A tensor of `shape` holding these elements.
    fn into_value(self, shape: [i64; 4]) -> Result<DynValue> {
        Ok(match self {
            KvData::F32(d) => Tensor::from_array((shape, d))?.into_dyn(),
            KvData::F16(d) => Tensor::from_array((shape, d))?.into_dyn(),
            KvData::I8(d) => Tensor::from_array((shape, d))?.into_dyn(),
        })
    }

    /// No elements, of the package's cache type.
    fn empty(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::Fp32 => KvData::F32(Vec::new()),
            KvDtype::Fp16 => KvData::F16(Vec::new()),
            KvDtype::Int8 => KvData::I8(Vec::new()),
        }
    }
}

/// A tensor of `shape` from `alloc` (so it can be bound as an output) holding `data`, or zeros
/// (an int8 cache row of zeros has exponent 0: zeros).
pub(crate) fn filled<T: PrimitiveTensorElementType + Copy + Default + std::fmt::Debug>(
    alloc: &Allocator,
    shape: impl IntoShape,
    data: Option<&[T]>,
) -> Result<DynValue> {
    let mut t = Tensor::<T>::new(alloc, shape)?;
    let (_, dst) = t.try_extract_tensor_mut::<T>()?;
    match data {
        Some(v) => dst.copy_from_slice(v),
        None => dst.fill(T::default()),
    }
    Ok(t.into_dyn())
}

/// Decode `img` and CLIP-preprocess it for a vision tower of `image_size` pixels (size limits
/// enforced).
pub fn preprocess_image(img: &ImageInput, image_size: u32) -> Result<Vec<f32>> {
    let limits = ImageLimits::default();
    let rgb = match img {
        ImageInput::Path(p) => load_image(p, limits)?,
        ImageInput::Bytes(b) => decode_image(b, "image", limits)?,
        ImageInput::Rgb(img) => {
            let (w, h) = img.dimensions();
            if w.max(h) > limits.max_side {
                return Err(RtError::Input(format!(
                    "image of {w}x{h} pixels exceeds the limit of {} pixels per side",
                    limits.max_side
                )));
            }
            img.clone()
        }
    };
    Ok(clip_preprocess(&rgb, image_size))
}

/// The content hash of preprocessed pixels: what the vision cache and the prefix cache know an
/// image by.
pub fn image_hash(pixels: &[f32]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in pixels {
        h.update(v.to_le_bytes());
    }
    h.finalize().into()
}

/// Assemble a prompt's tokens, `tokens_per_image` slots per image.
pub fn assemble_prompt(tok: &KosmosTokenizer, p: &Prompt, tokens_per_image: usize) -> Result<Assembled> {
    let n = p.segments.iter().filter(|s| matches!(s, Segment::Image)).count();
    if n != p.images.len() {
        return Err(RtError::Input(format!(
            "{n} image places in the prompt but {} images",
            p.images.len()
        )));
    }
    Ok(assemble(tok, &p.segments, tokens_per_image, false)?)
}

impl Package {
    /// Decode and preprocess `img` for this package's vision tower (size limits enforced).
    pub fn preprocess(&self, img: &ImageInput) -> Result<Vec<f32>> {
        preprocess_image(img, self.manifest.preprocess.image_size as u32)
    }

    /// Embeddings [tokens_per_image · D] of each image, from the cache or one vision batch.
    pub fn encode_images(
        &mut self,
        cache: &mut VisionCache,
        pixels: &[Vec<f32>],
    ) -> Result<Vec<Arc<Vec<f32>>>> {
        let keys: Vec<[u8; 32]> = pixels.iter().map(|p| image_hash(p)).collect();
        self.encode_hashed_images(cache, pixels, &keys)
    }

    /// [`Package::encode_images`] with each image's [`image_hash`] already known.
    pub(crate) fn encode_hashed_images(
        &mut self,
        cache: &mut VisionCache,
        pixels: &[Vec<f32>],
        keys: &[[u8; 32]],
    ) -> Result<Vec<Arc<Vec<f32>>>> {
        let mut out: Vec<Option<Arc<Vec<f32>>>> = keys.iter().map(|k| cache.get(k)).collect();
        // An image twice in one batch (n > 1, a repeated image) is encoded once.
        let mut missing: Vec<usize> = Vec::new();
        for i in (0..pixels.len()).filter(|&i| out[i].is_none()) {
            if !missing.iter().any(|&j| keys[j] == keys[i]) {
                missing.push(i);
            }
        }
        if !missing.is_empty() {
            let size = self.manifest.preprocess.image_size;
            let mut batch = Vec::with_capacity(missing.len() * 3 * size * size);
            for &i in &missing {
                batch.extend_from_slice(&pixels[i]);
            }
            let shape = [missing.len() as i64, 3, size as i64, size as i64];
            let input = Tensor::from_array((shape, batch))?;
            let res = self.vision.run(ort::inputs![io::PIXEL_VALUES => input])?;
            let (_, data) = res[io::IMAGE_EMBEDS].try_extract_tensor::<f32>()?;
            let per = data.len() / missing.len();
            for (j, &i) in missing.iter().enumerate() {
                let e = Arc::new(data[j * per..(j + 1) * per].to_vec());
                cache.put(keys[i], e.clone());
                for (k, o) in keys.iter().zip(out.iter_mut()) {
                    if *k == keys[i] {
                        *o = Some(e.clone());
                    }
                }
            }
        }
        Ok(out.into_iter().map(|e| e.expect("every image encoded")).collect())
    }

    /// Assemble a prompt's tokens (image slots included).
    pub fn assemble(&self, p: &Prompt) -> Result<Assembled> {
        assemble_prompt(&self.tokenizer, p, self.manifest.vision.tokens_per_image)
    }

    /// The decoder's `input_ids`, `image_mask` and `attention_mask` [b, width] for `assembled`,
    /// each row left-padded to `width` with the package's pad token.
    pub(crate) fn left_padded(
        &self,
        assembled: &[Assembled],
        width: usize,
    ) -> (Vec<i64>, Vec<bool>, Vec<i64>) {
        kosmos_models::sequence::left_padded(assembled, width, self.manifest.config.tokenizer.pad_token_id)
    }

    /// A cache for `batch` rows that will hold up to `capacity` tokens: empty tensors for the
    /// concat layout, zeroed preallocated buffers for the buffer layout.
    pub(crate) fn empty_cache(&self, batch: usize, capacity: usize) -> Result<Cache> {
        let d = &self.manifest.decoder;
        let buffer = d.kv_cache == KvCacheLayout::Buffer;
        let slots = if buffer { capacity } else { 0 };
        let row = self.kv_dtype.row_len(d.head_dim);
        let shape = [batch as i64, d.num_heads as i64, slots as i64, row as i64];
        let mut values = Vec::with_capacity(2 * d.num_layers);
        for _ in 0..2 * d.num_layers {
            values.push(if buffer {
                self.kv_buffer(shape, None)?
            } else {
                KvData::empty(self.kv_dtype).into_value(shape)?
            });
        }
        Ok(Cache {
            values,
            len: 0,
            capacity: buffer.then_some(capacity),
        })
    }

    /// A cache buffer from ONNX Runtime's allocator (so it can be bound as an output), zeroed
    /// or filled with `data` (of the package's cache type).
    fn kv_buffer(&self, shape: [i64; 4], data: Option<KvData>) -> Result<DynValue> {
        let alloc = self.decoder.allocator();
        match (self.kv_dtype, &data) {
            (KvDtype::Fp32, None) => filled::<f32>(alloc, shape, None),
            (KvDtype::Fp16, None) => filled::<f16>(alloc, shape, None),
            (KvDtype::Int8, None) => filled::<i8>(alloc, shape, None),
            (_, Some(KvData::F32(v))) => filled(alloc, shape, Some(v)),
            (_, Some(KvData::F16(v))) => filled(alloc, shape, Some(v)),
            (_, Some(KvData::I8(v))) => filled(alloc, shape, Some(v)),
        }
    }

    /// One decoder call over `b` rows. Returns the logits of each row's last `keep` positions
    /// ([b, keep, vocab]; generation samples from the last one, speculation from a few).
    pub(crate) fn decode(
        &mut self,
        ids: &[i64],
        image_mask: &[bool],
        image_embeds: (&[f32], usize),
        attention_mask: &[i64],
        (b, keep): (usize, usize),
        cache: &mut Cache,
    ) -> Result<Vec<f32>> {
        let d = &self.manifest.decoder;
        let (layers, dm, vocab) = (d.num_layers, d.hidden_size, d.vocab_size);
        let s = ids.len() / b;
        let t = attention_mask.len() / b;
        // No images: one zero row instead of an empty tensor. The graph never reads it (no slot
        // is marked), and ONNX Runtime's handling of zero-sized inputs is avoided (under valgrind
        // it left a worker reading freed memory at exit).
        let zeros;
        let image_embeds = if image_embeds.1 == 0 {
            zeros = vec![0f32; b * dm];
            (zeros.as_slice(), 1)
        } else {
            image_embeds
        };
        if let Some(capacity) = cache.capacity {
            return self.decode_in_place(
                ids,
                image_mask,
                image_embeds,
                attention_mask,
                (b, keep),
                capacity,
                cache,
            );
        }
        let mut inputs: Vec<(String, DynValue)> = vec![
            (
                io::INPUT_IDS.into(),
                Tensor::from_array(([b, s], ids.to_vec()))?.into_dyn(),
            ),
            (
                io::IMAGE_EMBEDS.into(),
                Tensor::from_array(([b, image_embeds.1, dm], image_embeds.0.to_vec()))?.into_dyn(),
            ),
            (
                io::IMAGE_MASK.into(),
                Tensor::from_array(([b, s], image_mask.to_vec()))?.into_dyn(),
            ),
            (
                io::ATTENTION_MASK.into(),
                Tensor::from_array(([b, t], attention_mask.to_vec()))?.into_dyn(),
            ),
        ];
        if d.takes_logits_to_keep() {
            inputs.push((io::LOGITS_TO_KEEP.into(), logits_to_keep(keep)?.into_dyn()));
        }
        for (i, v) in cache.values.drain(..).enumerate() {
            let name = if i % 2 == 0 {
                io::past_key(i / 2)
            } else {
                io::past_value(i / 2)
            };
            inputs.push((name, v));
        }
        let mut out = self.decoder.run(inputs)?;
        let (_, logits) = out[io::LOGITS].try_extract_tensor::<f32>()?;
        let last = last_positions(logits, b, vocab, keep);
        for i in 0..layers {
            for name in [io::present_key(i), io::present_value(i)] {
                let v = out
                    .remove(name.as_str())
                    .ok_or_else(|| RtError::Ort(format!("{name} missing from the decoder's outputs")))?;
                cache.values.push(v);
            }
        }
        cache.len = t;
        Ok(last)
    }

    /// A decoder call on a buffer-layout package: the cache buffers are bound as inputs and as
    /// outputs through IoBinding, so ONNX Runtime writes the new keys and values into them.
    #[allow(clippy::too_many_arguments)]
    fn decode_in_place(
        &mut self,
        ids: &[i64],
        image_mask: &[bool],
        image_embeds: (&[f32], usize),
        attention_mask: &[i64],
        (b, keep): (usize, usize),
        capacity: usize,
        cache: &mut Cache,
    ) -> Result<Vec<f32>> {
        let d = &self.manifest.decoder;
        let (layers, dm, vocab) = (d.num_layers, d.hidden_size, d.vocab_size);
        let s = ids.len() / b;
        let t = attention_mask.len() / b;
        if t > capacity {
            return Err(RtError::Input(format!(
                "{t} tokens exceed the cache's {capacity} slots"
            )));
        }
        // The mask spans the capacity: free slots are 0.
        let mut mask = vec![0i64; b * capacity];
        for r in 0..b {
            mask[r * capacity..r * capacity + t].copy_from_slice(&attention_mask[r * t..(r + 1) * t]);
        }
        let mut binding = self.decoder.create_binding()?;
        binding.bind_input(io::INPUT_IDS, &Tensor::from_array(([b, s], ids.to_vec()))?)?;
        binding.bind_input(
            io::IMAGE_EMBEDS,
            &Tensor::from_array(([b, image_embeds.1, dm], image_embeds.0.to_vec()))?,
        )?;
        binding.bind_input(
            io::IMAGE_MASK,
            &Tensor::from_array(([b, s], image_mask.to_vec()))?,
        )?;
        binding.bind_input(io::ATTENTION_MASK, &Tensor::from_array(([b, capacity], mask))?)?;
        binding.bind_input(
            io::PAST_SEQUENCE_LENGTH,
            &Tensor::from_array(([b], vec![cache.len as i64; b]))?,
        )?;
        if d.takes_logits_to_keep() {
            binding.bind_input(io::LOGITS_TO_KEEP, &logits_to_keep(keep)?)?;
        }
        for (i, v) in cache.values.iter_mut().enumerate() {
            let (past, present) = if i % 2 == 0 {
                (io::past_key(i / 2), io::present_key(i / 2))
            } else {
                (io::past_value(i / 2), io::present_value(i / 2))
            };
            binding.bind_input(past, &*v)?;
            binding.bind_output(present, &mut *v)?;
        }
        {
            // ONNX Runtime keeps the device, not the MemoryInfo, so this borrow may end here.
            let mem = self.decoder.allocator().memory_info();
            binding.bind_output_to_device(io::LOGITS, mem)?;
        }
        let out = self.decoder.run_binding(&binding)?;
        let (_, logits) = out[io::LOGITS].try_extract_tensor::<f32>()?;
        let last = last_positions(logits, b, vocab, keep);
        debug_assert_eq!(cache.values.len(), 2 * layers);
        cache.len = t;
        Ok(last)
    }

    /// Generate a continuation of every prompt (batched; left-padded). `on_token` receives each
    /// prompt's new text as it is produced and may stop that prompt by returning false.
    pub fn generate(
        &mut self,
        cache: &mut VisionCache,
        prompts: &[Prompt],
        params: &GenerateParams,
        on_token: &mut OnToken<'_>,
    ) -> Result<Vec<Generation>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if params.max_tokens == 0 {
            return Err(RtError::Input("max_tokens must be at least 1".into()));
        }
        if let Some((_, m)) = params.invalid_token(self.manifest.decoder.vocab_size) {
            return Err(RtError::Input(m));
        }
        if params.beams > 1 && params.constraint.is_some() {
            return Err(RtError::Input(
                "beam search with structured output is not supported; use beams 1".into(),
            ));
        }
        if params.beams > 1 && self.speculation().is_some() {
            return Err(RtError::Input(
                "beam search with speculative decoding is not supported; use beams 1, or turn speculation off".into(),
            ));
        }
        if params.beams > 1 {
            return prompts
                .iter()
                .enumerate()
                .map(|(i, p)| self.beam_search(cache, i, p, params, on_token))
                .collect();
        }
        if self.speculation().is_some() && prompts.len() > 1 {
            return Err(RtError::Input(format!(
                "speculative decoding generates one prompt at a time here ({} given); \
                 the batching engine (`kosmos-rt serve`, `batch`) speculates for several",
                prompts.len()
            )));
        }
        let assembled: Vec<Assembled> = prompts.iter().map(|p| self.assemble(p)).collect::<Result<_>>()?;
        let b = prompts.len();
        let width = assembled.iter().map(|a| a.len()).max().unwrap_or(0);
        self.check_context(width, params.max_tokens)?;

        let mut timings = Timings::default();
        let t0 = Instant::now();
        let (image_embeds, n_tok) = self.prompt_image_embeds(cache, prompts)?;
        timings.vision_ms = ms(t0);

        let pad = self.manifest.config.tokenizer.pad_token_id as i64;
        let (ids, img, attn) = self.left_padded(&assembled, width);
        let mut kv = self.empty_cache(b, width + params.max_tokens)?;
        let t0 = Instant::now();
        let mut logits = self.decode(&ids, &img, (&image_embeds, n_tok), &attn, (b, 1), &mut kv)?;
        timings.prefill_ms = ms(t0);

        let eos = self.manifest.config.tokenizer.eos_token_id;
        let vocab = self.manifest.decoder.vocab_size;
        let mut rows: Vec<RowState> = assembled
            .iter()
            .enumerate()
            .map(|(r, a)| {
                RowState::new(a, params.seed.wrapping_add(r as u64)).constrained(self.constraint(params))
            })
            .collect();
        if let Some(spec) = self.speculation().cloned() {
            let row = &mut rows[0];
            let ctx = (params, &mut timings);
            // The draft is lent to the call (it is the package's, and so is `self`).
            let mut draft = self.draft.take();
            let guesser = draft.as_deref_mut().map(|d| (d, &prompts[0]));
            let done = self.decode_speculatively(&spec, row, logits, &mut kv, guesser, ctx, on_token);
            self.draft = draft;
            done?;
            row.flush(0, on_token);
            let row = rows.pop().expect("one row");
            return Ok(vec![row.finish(assembled[0].len(), timings)]);
        }
        for step in 0..params.max_tokens {
            let mut next = Vec::with_capacity(b);
            for (r, row) in rows.iter_mut().enumerate() {
                if row.finish.is_some() {
                    next.push(pad);
                    continue;
                }
                let l = &mut logits[r * vocab..(r + 1) * vocab];
                let tok = row.pick(l, params, eos)?;
                if params.ends(tok, eos) {
                    row.finish = Some(FinishReason::Stop);
                    next.push(pad);
                    continue;
                }
                row.push(tok, &self.tokenizer, params, r, on_token)?;
                next.push(tok as i64);
            }
            if rows.iter().all(|r| r.finish.is_some()) || step + 1 == params.max_tokens {
                break;
            }
            let t = kv.len + 1;
            let mut mask = Vec::with_capacity(b * t);
            for r in 0..b {
                let prev = &self.row_mask(&assembled[r], width, &rows[r]);
                mask.extend_from_slice(prev);
                mask.push(1);
            }
            let no_img = vec![false; b];
            let t0 = Instant::now();
            logits = self.decode(&next, &no_img, (&[], 0), &mask, (b, 1), &mut kv)?;
            timings.decode_ms.push(ms(t0));
            for row in rows.iter_mut() {
                row.steps += 1;
            }
        }
        for (i, row) in rows.iter_mut().enumerate() {
            row.flush(i, on_token);
        }
        Ok(rows
            .into_iter()
            .zip(&assembled)
            .map(|(r, a)| r.finish(a.len(), timings.clone()))
            .collect())
    }

    /// Decode one prompt's row after its prefill (`logits`: its last position's), guessing
    /// ahead: the text its grammar forces, else the draft model's guesses (`draft`: it and the
    /// prompt it reads, from the first call on, so the first token is not delayed), else prompt
    /// lookup. Each call feeds the token just picked and
    /// the guesses; the logits of every position are picked from in order, as sequential steps
    /// would, and the guesses are kept up to the first the sampler did not pick, whose pick is
    /// fed next. The cache forgets the rest: the next call writes over their slots.
    #[allow(clippy::too_many_arguments)]
    fn decode_speculatively(
        &mut self,
        spec: &Speculation,
        row: &mut RowState,
        mut logits: Vec<f32>,
        kv: &mut Cache,
        mut draft: Option<(&mut Draft, &Prompt)>,
        (params, timings): (&GenerateParams, &mut Timings),
        on_token: &mut OnToken<'_>,
    ) -> Result<()> {
        let eos = self.manifest.config.tokenizer.eos_token_id;
        let vocab = self.manifest.decoder.vocab_size;
        let mut draft_run: Option<DraftRun> = None;
        // A token picked and pushed but not fed yet (a rejected guess's replacement).
        let mut picked: Option<u32> = None;
        loop {
            let tok = match picked.take() {
                Some(t) => t,
                None => {
                    let t = row.pick(&mut logits, params, eos)?;
                    if params.ends(t, eos) {
                        row.finish = Some(FinishReason::Stop);
                        return Ok(());
                    }
                    row.push(t, &self.tokenizer, params, 0, on_token)?;
                    t
                }
            };
            if row.finish.is_some() || row.tokens.len() >= params.max_tokens {
                return Ok(());
            }
            // Feeding the token and k guesses fills k + 1 slots: within the prompt + max_tokens
            // the cache was made for.
            let room = params.max_tokens - row.tokens.len();
            let t0 = Instant::now();
            let (guesses, drafted) = match draft.as_mut() {
                Some((d, prompt)) => {
                    let run = match &mut draft_run {
                        Some(run) => run,
                        None => draft_run.insert(d.start(prompt, params.max_tokens)?),
                    };
                    let g = row.guesses(spec, room, Some((&mut **d, run)))?;
                    timings.draft_ms += ms(t0);
                    g
                }
                None => row.guesses(spec, room, None)?,
            };
            let mut ids = vec![tok as i64];
            ids.extend(guesses.iter().map(|&g| g as i64));
            let past = kv.len;
            let mask = vec![1i64; past + ids.len()];
            let t0 = Instant::now();
            let no_img = vec![false; ids.len()];
            let mut out = self.decode(&ids, &no_img, (&[], 0), &mask, (1, ids.len()), kv)?;
            timings.decode_ms.push(ms(t0));
            timings.drafted += guesses.len();
            let mut kept = 0;
            for (i, &guess) in guesses.iter().enumerate() {
                let t = row.pick(&mut out[i * vocab..(i + 1) * vocab], params, eos)?;
                if params.ends(t, eos) {
                    row.finish = Some(FinishReason::Stop);
                    break;
                }
                row.push(t, &self.tokenizer, params, 0, on_token)?;
                if t != guess {
                    picked = Some(t);
                    break;
                }
                kept += 1;
                if row.finish.is_some() || row.tokens.len() >= params.max_tokens {
                    break;
                }
            }
            timings.accepted += kept;
            row.guessed(spec, guesses.len(), kept);
            if let (Some((d, _)), Some(run)) = (draft.as_ref(), draft_run.as_mut()) {
                d.kept(run, kept, drafted);
            }
            // The fed token and the guesses kept are in the cache; the rest is forgotten.
            kv.len = past + 1 + kept;
            if row.finish.is_some() || row.tokens.len() >= params.max_tokens {
                return Ok(());
            }
            if picked.is_none() {
                logits = out.split_off(guesses.len() * vocab);
            }
        }
    }

    /// A row's structured-output state for `params` (none without a constraint).
    pub(crate) fn constraint(&self, params: &GenerateParams) -> Option<ActiveConstraint> {
        let g = params.constraint.clone()?;
        Some(ActiveConstraint::new(g, self.constraint_vocab()))
    }

    /// The attention mask of a row before its next token: left padding, prompt, generated steps.
    fn row_mask(&self, a: &Assembled, width: usize, row: &RowState) -> Vec<i64> {
        let mut m = vec![0i64; width - a.len()];
        m.extend(std::iter::repeat_n(1, a.len() + row.steps));
        m
    }

    pub(crate) fn check_context(&self, prompt: usize, max_new: usize) -> Result<()> {
        let context = self.context_length();
        if prompt + max_new > context {
            return Err(RtError::ContextOverflow {
                prompt,
                max_new,
                context,
            });
        }
        Ok(())
    }

    /// The prompts' images preprocessed and encoded (through `cache`), laid out per row as
    /// [`Package::row_embeds`] lays them: ([b, n_tok, D], n_tok).
    pub(crate) fn prompt_image_embeds(
        &mut self,
        cache: &mut VisionCache,
        prompts: &[Prompt],
    ) -> Result<(Vec<f32>, usize)> {
        let pixels: Vec<Vec<f32>> = prompts
            .iter()
            .flat_map(|p| p.images.iter())
            .map(|img| self.preprocess(img))
            .collect::<Result<_>>()?;
        let embeds = if pixels.is_empty() {
            Vec::new()
        } else {
            self.encode_images(cache, &pixels)?
        };
        Ok(self.row_embeds(prompts, &embeds))
    }

    /// Per-row image embeddings [b, n_tok, D], each row's images in order, zero-padded.
    fn row_embeds(&self, prompts: &[Prompt], embeds: &[Arc<Vec<f32>>]) -> (Vec<f32>, usize) {
        let per = self.manifest.vision.tokens_per_image;
        let dm = self.manifest.decoder.hidden_size;
        let most = prompts.iter().map(|p| p.images.len()).max().unwrap_or(0);
        let n_tok = most * per;
        let mut out = vec![0f32; prompts.len() * n_tok * dm];
        let mut k = 0;
        for (r, p) in prompts.iter().enumerate() {
            for j in 0..p.images.len() {
                let dst = (r * n_tok + j * per) * dm;
                out[dst..dst + per * dm].copy_from_slice(&embeds[k]);
                k += 1;
            }
        }
        (out, n_tok)
    }

    /// Beam search for one prompt (length-normalised log-probability; `</s>` ends a beam).
    fn beam_search(
        &mut self,
        cache: &mut VisionCache,
        index: usize,
        prompt: &Prompt,
        params: &GenerateParams,
        on_token: &mut OnToken<'_>,
    ) -> Result<Generation> {
        let k = params.beams;
        let a = self.assemble(prompt)?;
        self.check_context(a.len(), params.max_tokens)?;
        let (image_embeds, n_tok) = self.prompt_image_embeds(cache, std::slice::from_ref(prompt))?;
        let ids: Vec<i64> = a.input_ids.iter().map(|&i| i as i64).collect();
        let mut attn = vec![1i64; a.len()];
        let mut kv = self.empty_cache(1, a.len() + params.max_tokens)?;
        let logits = self.decode(
            &ids,
            &a.image_mask,
            (&image_embeds, n_tok),
            &attn,
            (1, 1),
            &mut kv,
        )?;
        let eos = self.manifest.config.tokenizer.eos_token_id;
        let vocab = self.manifest.decoder.vocab_size;

        // (tokens, sum of log-probs) of live beams; finished hypotheses separately.
        let mut beams: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
        let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
        let mut logp = log_softmax(&logits);
        for step in 0..params.max_tokens {
            let mut cand: Vec<(f64, usize, u32)> = Vec::with_capacity(beams.len() * vocab);
            for (bi, (_, score)) in beams.iter().enumerate() {
                for (t, &lp) in logp[bi * vocab..(bi + 1) * vocab].iter().enumerate() {
                    cand.push((score + lp as f64, bi, t as u32));
                }
            }
            cand.sort_by(|x, y| y.0.total_cmp(&x.0));
            let mut next: Vec<(Vec<u32>, f64)> = Vec::with_capacity(k);
            let mut parents = Vec::with_capacity(k);
            for (score, bi, t) in cand.into_iter().take(2 * k) {
                let mut toks = beams[bi].0.clone();
                if t == eos {
                    if finished.len() < k {
                        finished.push((toks, score));
                    }
                    continue;
                }
                toks.push(t);
                next.push((toks, score));
                parents.push(bi);
                if next.len() == k {
                    break;
                }
            }
            let best_live = next.first().map(|(t, s)| s / t.len().max(1) as f64);
            let worst_done = finished
                .iter()
                .map(|(t, s)| s / t.len().max(1) as f64)
                .fold(f64::INFINITY, f64::min);
            if next.is_empty()
                || step + 1 == params.max_tokens
                || (finished.len() >= k && best_live.is_none_or(|b| b <= worst_done))
            {
                finished.extend(next);
                break;
            }
            self.reorder(&mut kv, &parents, beams.len())?;
            beams = next;
            let n = beams.len();
            let last: Vec<i64> = beams
                .iter()
                .map(|(t, _)| *t.last().expect("a token") as i64)
                .collect();
            attn = vec![1i64; n * (kv.len + 1)];
            let no_img = vec![false; n];
            let l = self.decode(&last, &no_img, (&[], 0), &attn, (n, 1), &mut kv)?;
            logp = l.chunks(vocab).flat_map(log_softmax).collect();
        }
        let (tokens, _) = finished
            .into_iter()
            .max_by(|x, y| (x.1 / x.0.len().max(1) as f64).total_cmp(&(y.1 / y.0.len().max(1) as f64)))
            .unwrap_or_default();
        let mut row = RowState::new(&a, 0);
        for &t in &tokens {
            row.push(t, &self.tokenizer, params, index, on_token)?;
            if row.finish.is_some() {
                break;
            }
        }
        row.flush(index, on_token);
        if row.finish.is_none() {
            row.finish = Some(if tokens.len() >= params.max_tokens {
                FinishReason::Length
            } else {
                FinishReason::Stop
            });
        }
        Ok(row.finish(a.len(), Timings::default()))
    }

    /// Keep cache rows `parents` (a gather along the batch axis) of a batch of `from` rows.
    fn reorder(&self, kv: &mut Cache, parents: &[usize], from: usize) -> Result<()> {
        let values = std::mem::take(&mut kv.values);
        for v in values {
            let shape = v.dtype().tensor_shape().expect("a tensor").to_vec();
            let row = shape[1..].iter().product::<i64>() as usize;
            debug_assert_eq!(shape[0] as usize, from);
            let gathered = KvData::of(&v)?.gather(parents, row);
            let shape = [parents.len() as i64, shape[1], shape[2], shape[3]];
            kv.values.push(if kv.capacity.is_some() {
                self.kv_buffer(shape, Some(gathered))?
            } else {
                gathered.into_value(shape)?
            });
        }
        Ok(())
    }
}

/// `logits_to_keep` = `n`: generation samples from the last position only (or, speculating,
/// from the last few), so the final LayerNorm and the LM head skip the rest of a prompt (and
/// its [b, s, vocab] logits).
pub(crate) fn logits_to_keep(n: usize) -> Result<Tensor<i64>> {
    Ok(Tensor::from_array(([0usize; 0], vec![n as i64]))?)
}

/// Each row's last `keep` positions' logits ([b, keep, vocab]) from the decoder's `logits`
/// [b, s, vocab], where s is every new position or, with `logits_to_keep`, fewer.
pub(crate) fn last_positions(logits: &[f32], b: usize, vocab: usize, keep: usize) -> Vec<f32> {
    let s = logits.len() / (b * vocab);
    (0..b)
        .flat_map(|r| {
            let off = (r * s + s - keep) * vocab;
            logits[off..off + keep * vocab].iter().copied()
        })
        .collect()
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

fn log_softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lse = m as f64 + sum.ln();
    l.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// One row's decoding state.
pub(crate) struct RowState {
    pub(crate) tokens: Vec<u32>,
    /// Token ids counted for the repetition penalty (prompt text and generated).
    seen: Vec<u32>,
    pub(crate) text: String,
    emitted: usize,
    pub(crate) finish: Option<FinishReason>,
    steps: usize,
    rng: StdRng,
    constraint: Option<ActiveConstraint>,
    /// Speculating: the most guesses the next call feeds (0: not set yet, the settings' most).
    guess_budget: usize,
}

impl RowState {
    pub(crate) fn new(a: &Assembled, seed: u64) -> Self {
        let seen = a
            .input_ids
            .iter()
            .zip(&a.image_mask)
            .filter(|(_, m)| !**m)
            .map(|(&t, _)| t)
            .collect();
        RowState {
            tokens: Vec::new(),
            seen,
            text: String::new(),
            emitted: 0,
            finish: None,
            steps: 0,
            rng: StdRng::seed_from_u64(seed),
            constraint: None,
            guess_budget: 0,
        }
    }

    /// Generate under `c` (structured output).
    pub(crate) fn constrained(mut self, c: Option<ActiveConstraint>) -> Self {
        self.constraint = c;
        self
    }

    /// The next token from `logits` (modified in place) under `p`; an error only when a
    /// constraint leaves no token.
    pub(crate) fn pick(&mut self, logits: &mut [f32], p: &GenerateParams, eos: u32) -> Result<u32> {
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if !p.allowed_token_ids.is_empty() {
            // Keep the allowed logits, rule out the rest.
            let kept: Vec<(usize, f32)> = p
                .allowed_token_ids
                .iter()
                .filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l)))
                .collect();
            logits.fill(f32::NEG_INFINITY);
            for (t, l) in kept {
                logits[t] = l;
            }
        }
        for word in &p.bad_words {
            if let Some((&last, before)) = word.split_last()
                && self.tokens.ends_with(before)
                && let Some(l) = logits.get_mut(last as usize)
            {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.tokens.len() < p.min_tokens {
            for t in p.stop_token_ids.iter().chain([&eos]) {
                if let Some(l) = logits.get_mut(*t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = HashMap::<u32, f32>::new();
            for &t in &self.tokens {
                *counts.entry(t).or_default() += 1.0;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n;
                }
            }
        }
        let masked =
            !p.allowed_token_ids.is_empty() || !p.bad_words.is_empty() || self.tokens.len() < p.min_tokens;
        if masked && logits.iter().all(|l| *l == f32::NEG_INFINITY) {
            return Err(RtError::Input(format!(
                "no token can follow the {} generated: allowed_token_ids, bad_words and min_tokens rule out every one",
                self.tokens.len()
            )));
        }
        if let Some(c) = self.constraint.as_mut() {
            let first = self.tokens.is_empty();
            let eos = !p.ignore_eos;
            // Greedy: when the best token is allowed it is the answer, without the full mask.
            if p.temperature <= 0.0 {
                let best = argmax(logits);
                if c.allows(best, first, eos) {
                    return Ok(best);
                }
            }
            c.restrict(logits, first, eos)?;
        }
        if p.temperature <= 0.0 {
            return Ok(argmax(logits));
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let m = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - m) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.min_p > 0.0 {
            // Sorted: the first is the most likely.
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
            let t: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= t);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let t: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= t);
        }
        // Tokens masked out (-inf) have probability 0 and sort last: never fall back to them.
        while probs.len() > 1 && probs.last() == Some(&0.0) {
            probs.pop();
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if u < acc {
                return Ok(idx[i] as u32);
            }
        }
        Ok(idx[probs.len() - 1] as u32)
    }

    /// Append `tok`, stream the new text, apply stop strings.
    pub(crate) fn push(
        &mut self,
        tok: u32,
        tokenizer: &kosmos_models::KosmosTokenizer,
        p: &GenerateParams,
        index: usize,
        on_token: &mut OnToken<'_>,
    ) -> Result<()> {
        let grammar_done = match self.constraint.as_mut() {
            Some(c) => {
                c.advance(tok, self.tokens.is_empty());
                c.finished()
            }
            None => false,
        };
        self.tokens.push(tok);
        self.seen.push(tok);
        self.text = tokenizer.decode(&self.tokens)?;
        // Hold back text that may still become a stop string.
        let mut cut = None;
        for s in &p.stop {
            if let Some(i) = self.text.find(s.as_str()) {
                cut = Some(cut.map_or(i, |c: usize| c.min(i)));
            }
        }
        if let Some(i) = cut {
            self.text.truncate(i);
            self.finish = Some(FinishReason::Stop);
        }
        if grammar_done && self.finish.is_none() {
            self.finish = Some(FinishReason::Stop);
        }
        let held = if self.finish.is_some() {
            0
        } else {
            p.stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0)
        };
        // Byte-fallback tokens decode as a run: until the run is valid UTF-8 every byte of it,
        // even an ASCII one already shown, reads U+FFFD. So stream only the text before a
        // trailing run (final from then on); `flush` sends the rest at the end.
        let run = self
            .tokens
            .iter()
            .rev()
            .take_while(|&&t| tokenizer.byte_piece(t).is_some())
            .count();
        let stable = match run {
            0 => self.text.len(),
            _ => tokenizer.decode(&self.tokens[..self.tokens.len() - run])?.len(),
        };
        let mut upto = stable.min(self.text.len().saturating_sub(held));
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        self.emit(upto, index, on_token);
        Ok(())
    }

    /// Speculative decoding's guesses for this row, at most `room` (and the schedule's budget):
    /// the tokens spelling what its constraint forces next, else the draft model's (`draft`:
    /// it and this row's run of it), else what followed the latest earlier occurrence of its
    /// last n tokens in its prompt's text and its output (what the repetition penalty sees).
    /// Also whether the draft made them (then [`Draft::kept`] follows the call).
    pub(crate) fn guesses(
        &mut self,
        spec: &Speculation,
        room: usize,
        draft: Option<(&mut Draft, &mut DraftRun)>,
    ) -> Result<(Vec<u32>, bool)> {
        let (forced, limit) = self.forced_or_limit(spec, room);
        if !forced.is_empty() {
            return Ok((forced, false));
        }
        match draft {
            Some((d, run)) => Ok((
                d.propose(run, &self.tokens, limit, self.constraint.as_mut())?,
                true,
            )),
            None => Ok((spec.propose(&self.seen, limit), false)),
        }
    }

    /// The tokens this row's constraint forces next, if any (they come before any other
    /// guess), and how many guesses the next call may feed: `room` and the schedule's budget.
    pub(crate) fn forced_or_limit(&mut self, spec: &Speculation, room: usize) -> (Vec<u32>, usize) {
        let limit = self.guess_limit(spec, room);
        (self.forced_guesses(limit), limit)
    }

    /// What a draft model reads and obeys for this row: the tokens generated so far and the
    /// row's constraint, if any.
    pub(crate) fn draft_view(&mut self) -> (&[u32], Option<&mut ActiveConstraint>) {
        (&self.tokens, self.constraint.as_mut())
    }

    /// How many guesses the next call may feed: `room` and the schedule's budget.
    fn guess_limit(&mut self, spec: &Speculation, room: usize) -> usize {
        if self.guess_budget == 0 {
            self.guess_budget = spec.tokens;
        }
        room.min(self.guess_budget)
    }

    /// Up to `limit` tokens spelling the text this row's constraint forces next (none without
    /// one, or before the first token).
    fn forced_guesses(&mut self, limit: usize) -> Vec<u32> {
        match self.constraint.as_mut() {
            Some(c) if !self.tokens.is_empty() => c.forced_tokens(limit),
            _ => Vec::new(),
        }
    }

    /// After a call that fed `fed` guesses and kept `kept`, under
    /// [`GuessSchedule::Adaptive`]: the next call may feed two more when all were kept, one
    /// fewer (at least one) when not.
    pub(crate) fn guessed(&mut self, spec: &Speculation, fed: usize, kept: usize) {
        if fed == 0 || spec.schedule != GuessSchedule::Adaptive {
            return;
        }
        self.guess_budget = if kept == fed {
            (self.guess_budget + 2).min(spec.tokens)
        } else {
            self.guess_budget.saturating_sub(1).max(1)
        };
    }

    /// Send text up to byte `upto` that was not sent yet.
    fn emit(&mut self, upto: usize, index: usize, on_token: &mut OnToken<'_>) {
        if let Some(piece) = self.text.get(self.emitted..upto).filter(|p| !p.is_empty()) {
            let piece = piece.to_string();
            self.emitted = upto;
            if !on_token(index, &piece) && self.finish.is_none() {
                self.finish = Some(FinishReason::Cancelled);
            }
        }
    }

    /// Send whatever text is still held back (the row has finished).
    pub(crate) fn flush(&mut self, index: usize, on_token: &mut OnToken<'_>) {
        let end = self.text.len();
        self.emit(end, index, on_token);
    }

    fn finish(self, prompt_tokens: usize, timings: Timings) -> Generation {
        let reason = self.finish.unwrap_or(FinishReason::Length);
        Generation {
            tokens: self.tokens,
            text: self.text,
            finish_reason: reason,
            prompt_tokens,
            timings,
        }
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(generated: &[u32]) -> RowState {
        let prompt = Assembled {
            input_ids: vec![2, 2],
            image_mask: vec![false, false],
            num_images: 0,
        };
        let mut r = RowState::new(&prompt, 0);
        r.tokens = generated.to_vec();
        r
    }

    /// The streamed pieces add up to the final text, also when byte-fallback runs decode
    /// differently once they end (an ASCII byte shown alone becomes U+FFFD in an invalid run).
    #[test]
    fn streamed_text_adds_up_to_the_final_text() {
        let sp = kosmos_models::SpecialTokens::default();
        let tok = KosmosTokenizer::train(|| ["a red circle on the left"].into_iter(), 400, &sp).unwrap();
        let byte = |b: u8| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap();
        let word = tok.encode("circle").unwrap();
        let cases: Vec<Vec<u32>> = vec![
            // '>' then an emoji: valid throughout once complete.
            [0x3E, 0xF0, 0x9F, 0x98, 0x80].map(byte).to_vec(),
            // '>' then a lone lead byte: the whole run becomes U+FFFD, the '>' too.
            [&[byte(0x3E), byte(0xF0)][..], &word, &[byte(0x3E)]].concat(),
            [
                &word[..],
                &[byte(0xE4), byte(0xB8)],
                &word,
                &[byte(0xE4), byte(0xB8), byte(0xAD)],
            ]
            .concat(),
        ];
        for (i, ids) in cases.iter().enumerate() {
            for stop in [vec![], vec!["zz".to_string()]] {
                let p = GenerateParams {
                    stop,
                    ..GenerateParams::default()
                };
                let mut r = row(&[]);
                let mut streamed = String::new();
                let mut on = |_: usize, t: &str| {
                    streamed.push_str(t);
                    true
                };
                for &t in ids {
                    r.push(t, &tok, &p, 0, &mut on).unwrap();
                }
                r.flush(0, &mut on);
                assert_eq!(r.text, tok.decode(ids).unwrap(), "case {i}");
                assert_eq!(streamed, r.text, "case {i}");
            }
        }
    }

    /// logit_bias shifts logits first; min_tokens keeps `</s>` and stop ids out early; min_p
    /// drops tokens far below the best; stop ids end generation as `</s>` does.
    #[test]
    fn logit_bias_min_tokens_min_p_and_stop_ids() {
        let eos = 3;
        let logits = [2.0f32, 1.0, 0.5, 3.0];
        let p = |f: &dyn Fn(&mut GenerateParams)| {
            let mut g = GenerateParams::default();
            f(&mut g);
            g
        };
        assert_eq!(row(&[]).pick(&mut logits.clone(), &p(&|_| {}), eos).unwrap(), 3);
        let ban = p(&|g| g.logit_bias = vec![(3, -100.0), (2, 1.0)]);
        assert_eq!(row(&[]).pick(&mut logits.clone(), &ban, eos).unwrap(), 0);
        let boost = p(&|g| g.logit_bias = vec![(1, 2.5), (99, 5.0)]);
        assert_eq!(
            row(&[]).pick(&mut logits.clone(), &boost, eos).unwrap(),
            1,
            "out-of-range ids are skipped"
        );
        // min_tokens: </s> (id 3) and stop id 0 are out until 2 tokens exist.
        let early = p(&|g| {
            g.min_tokens = 2;
            g.stop_token_ids = vec![0];
        });
        assert_eq!(row(&[7]).pick(&mut logits.clone(), &early, eos).unwrap(), 1);
        assert_eq!(row(&[7, 7]).pick(&mut logits.clone(), &early, eos).unwrap(), 3);
        assert!(early.ends(0, eos) && early.ends(3, eos) && !early.ends(1, eos));
        // min_p 0.3 at temperature 1: token 0 is e^-1 ≈ 0.37 as likely as the best (3) and
        // stays; token 1 (e^-2 ≈ 0.14) and 2 never come.
        let sampled = p(&|g| {
            g.temperature = 1.0;
            g.min_p = 0.3;
        });
        for seed in 0..200 {
            let mut r = RowState::new(
                &Assembled {
                    input_ids: vec![],
                    image_mask: vec![],
                    num_images: 0,
                },
                seed,
            );
            let t = r.pick(&mut logits.clone(), &sampled, 99).unwrap();
            assert!(t == 3 || t == 0, "seed {seed}: {t}");
        }
        assert!(
            p(&|g| g.min_p = 1.5)
                .invalid_setting()
                .is_some_and(|e| e.0 == "min_p")
        );
        assert!(
            p(&|g| g.logit_bias = vec![(1, 101.0)])
                .invalid_setting()
                .is_some_and(|e| e.0 == "logit_bias")
        );
        assert!(
            p(&|g| g.min_tokens = 33)
                .invalid_setting()
                .is_some_and(|e| e.0 == "min_tokens")
        );
        assert!(
            p(&|g| g.stop_token_ids = vec![4])
                .invalid_token(4)
                .is_some_and(|e| e.0 == "stop_token_ids")
        );
    }

    /// allowed_token_ids keeps only its tokens (`</s>` too only if listed); bad_words rules out
    /// the token that would complete a word, single tokens always; when nothing is left the
    /// step is an error, not an arbitrary token.
    #[test]
    fn allowed_token_ids_and_bad_words() {
        let eos = 3;
        let logits = [2.0f32, 1.0, 0.5, 3.0];
        let p = |f: &dyn Fn(&mut GenerateParams)| {
            let mut g = GenerateParams::default();
            f(&mut g);
            g
        };
        let only = p(&|g| g.allowed_token_ids = vec![2, 1]);
        assert_eq!(row(&[]).pick(&mut logits.clone(), &only, eos).unwrap(), 1);
        let sampled = p(&|g| {
            g.allowed_token_ids = vec![2];
            g.temperature = 1.0;
        });
        for seed in 0..50 {
            let mut r = row(&[]);
            r.rng = StdRng::seed_from_u64(seed);
            assert_eq!(r.pick(&mut logits.clone(), &sampled, eos).unwrap(), 2);
        }
        // [0, 3] bans 3 only after a 0; [2] bans 2 everywhere.
        let words = p(&|g| g.bad_words = vec![vec![0, 3], vec![2]]);
        assert_eq!(row(&[1]).pick(&mut logits.clone(), &words, eos).unwrap(), 3);
        assert_eq!(row(&[1, 0]).pick(&mut logits.clone(), &words, eos).unwrap(), 0);
        let no_eos = p(&|g| g.allowed_token_ids = vec![2]);
        let mut all_but_2 = logits;
        all_but_2[0] = 9.0;
        assert_eq!(row(&[1, 0]).pick(&mut all_but_2, &no_eos, eos).unwrap(), 2);
        let nothing = p(&|g| {
            g.allowed_token_ids = vec![3];
            g.min_tokens = 2;
        });
        let err = row(&[]).pick(&mut logits.clone(), &nothing, eos).unwrap_err();
        assert!(err.to_string().contains("rule out every one"), "{err}");
        assert!(
            p(&|g| g.allowed_token_ids = vec![4])
                .invalid_token(4)
                .is_some_and(|e| e.0 == "allowed_token_ids")
        );
        assert!(
            p(&|g| g.bad_words = vec![vec![1, 9]])
                .invalid_token(4)
                .is_some_and(|e| e.0 == "bad_words")
        );
    }

    /// OpenAI's penalties count generated tokens only: presence once, frequency per occurrence.
    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let logits = [2.0f32, 1.9, 0.0];
        let greedy = GenerateParams::default();
        assert_eq!(row(&[0, 0, 1]).pick(&mut logits.clone(), &greedy, 99).unwrap(), 0);
        let p = GenerateParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..GenerateParams::default()
        };
        let mut l = logits;
        // Token 0: 2.0 − 0.5 − 2·0.3 = 0.9; token 1: 1.9 − 0.5 − 0.3 = 1.1; token 2 untouched.
        assert_eq!(row(&[0, 0, 1]).pick(&mut l, &p, 99).unwrap(), 1);
        for (got, want) in l.iter().zip([0.9f32, 1.1, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{l:?}");
        }
        // Prompt tokens do not count (token 2 is the prompt's).
        let mut l = [0.0f32, 0.0, 0.1];
        assert_eq!(row(&[]).pick(&mut l, &p, 99).unwrap(), 2);
        // A negative penalty favours what was generated.
        let favour = GenerateParams {
            presence_penalty: -1.0,
            ..GenerateParams::default()
        };
        assert_eq!(row(&[1]).pick(&mut logits.clone(), &favour, 99).unwrap(), 1);
    }
}
