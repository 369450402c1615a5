//! `kosmos-export verify`: runs the trainer's tch model and the exported package in ONNX Runtime
//! on the same deterministic inputs — a left-padded batch of two prompts, each with an image
//! between text, then greedy decode steps over the KV cache — and reports the largest difference
//! per output.

use std::path::Path;

use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, KvDtype, PackageDtype, PackageManifest, io};
use kosmos_plugins::cached_attention::{dequantize_int8_rows, exp2i};
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor};
use tch::{Device, Kind, Tensor};

use crate::error::{ExportError, Result};
use crate::examples::{self, Row};

/// A CPU session for `path` (ONNX Runtime loaded as the runtime crate does, the fused
/// `ai.kosmos` kernels registered).
pub fn session(path: &Path) -> Result<Session> {
    session_with(path, false)
}

/// As [`session`]; `without_custom_ops` leaves the `ai.kosmos` kernels out so ONNX Runtime
/// inlines the ops' function bodies.
pub fn session_with(path: &Path, without_custom_ops: bool) -> Result<Session> {
    let opts = kosmos_rt::SessionOptions {
        without_custom_ops,
        ..Default::default()
    };
    kosmos_rt::ort_env::session(path, &opts).map_err(|e| ExportError::Ort(e.to_string()))
}

/// Default least top-1 agreement of a quantised package.
pub const QUANTIZED_TOP1: f64 = 0.9;

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub decode_steps: usize,
    /// Largest accepted difference; default by dtype (fp32: 1e-4 absolute, fp16: 1e-2 relative
    /// to the largest reference magnitude of that output). For a quantised package, the least
    /// fraction of positions whose most likely token agrees (default [`QUANTIZED_TOP1`]).
    pub tolerance: Option<f64>,
    pub seed: i64,
    /// Run the `ai.kosmos` ops' function bodies instead of their fused kernels.
    pub without_custom_ops: bool,
    /// Real examples instead of arbitrary token ids and random pixels: a data spec as
    /// `kosmos-train` takes it (`synthetic:*` draws its test split), whose first `examples`
    /// usable examples become the rows, each whole (image slots, prompt and text, teacher-forced).
    pub data: Option<String>,
    pub examples: usize,
    /// With a cache narrower than the model (float16 or int8 under float32), let the reference
    /// keep its own float32 cache instead of reading the package's stored one: the comparison
    /// then includes what the cache's rounding costs over the decode steps, and is judged by
    /// top-1 agreement as a quantised package is.
    pub own_cache: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            decode_steps: 8,
            tolerance: None,
            seed: 0,
            without_custom_ops: false,
            data: None,
            examples: 4,
            own_cache: false,
        }
    }
}

/// Difference of one output (over all steps where it is produced).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutputDiff {
    pub output: String,
    pub max_abs: f64,
    /// Largest |reference| value, for relative tolerances.
    pub ref_max: f64,
}

impl OutputDiff {
    pub fn relative(&self) -> f64 {
        self.max_abs / self.ref_max.max(1e-12)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    pub dtype: String,
    pub profile: String,
    pub kv_cache: String,
    /// Element type of the KV cache ("float32", "float16", "int8").
    pub kv_dtype: String,
    /// Whether the `present.*` differences are measured beyond what storing moved each value
    /// by (a float16 or int8 cache under a float32 model).
    pub presents_beyond_rounding: bool,
    /// Whether the reference's decode steps read the package's stored cache (a narrow cache,
    /// without `own_cache`) rather than its own.
    pub reference_reads_stored_cache: bool,
    pub diffs: Vec<OutputDiff>,
    /// Greedy tokens (argmax of the last position per step and row) of the reference and package.
    pub reference_tokens: Vec<Vec<i64>>,
    pub package_tokens: Vec<Vec<i64>>,
    pub tolerance: f64,
    /// `absolute` (fp32), `relative` (fp16) or `top-1` (quantised: the least fraction of
    /// positions whose most likely token must agree).
    pub tolerance_kind: String,
    /// Fraction of compared positions (every real prefill position and each decode step, every
    /// row) whose most likely next token is the reference's.
    pub top1_agreement: f64,
    /// Positions compared for `top1_agreement`.
    pub positions: usize,
    /// KL(reference ‖ package) of the next-token distributions, nats: mean and largest over
    /// those positions.
    pub mean_kl_divergence: f64,
    pub max_kl_divergence: f64,
    /// The same over the decode steps only (every row's one position per step), where a
    /// narrow cache's rounding shows: a prefill reads its own keys unrounded.
    pub decode_top1_agreement: f64,
    pub decode_positions: usize,
    pub decode_mean_kl_divergence: f64,
    /// Prompts in the batch and images among them (`data`: the examples used; else the two
    /// arbitrary prompts with one image each).
    pub rows: usize,
    pub images: usize,
    /// The data spec the rows came from, if any.
    pub data: Option<String>,
    pub passed: bool,
}

struct Diffs(Vec<OutputDiff>);

/// How the package's next-token distributions agree with the reference's: positions whose
/// argmax agrees, and the KL divergence KL(reference ‖ package) per position (what llama.cpp's
/// `perplexity --kl-divergence` reports for a quantised model).
#[derive(Default)]
struct Top1 {
    agree: usize,
    positions: usize,
    kl_sum: f64,
    kl_max: f64,
}

impl Top1 {
    /// Count agreement over [positions, vocab] logits.
    fn add(&mut self, reference: &Tensor, got: &Tensor) {
        let same = reference.argmax(-1, false).eq_tensor(&got.argmax(-1, false));
        self.positions += same.numel();
        self.agree += i64::try_from(same.sum(Kind::Int64)).expect("count") as usize;
        let log_p = reference.to_kind(Kind::Double).log_softmax(-1, Kind::Double);
        let log_q = got.to_kind(Kind::Double).log_softmax(-1, Kind::Double);
        let kl = (log_p.exp() * (&log_p - log_q)).sum_dim_intlist(-1, false, Kind::Double);
        if kl.numel() > 0 {
            self.kl_sum += kl.sum(Kind::Double).double_value(&[]);
            self.kl_max = self.kl_max.max(kl.max().double_value(&[]));
        }
    }

    fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }

    fn fraction(&self) -> f64 {
        self.agree as f64 / self.positions.max(1) as f64
    }
}

impl Diffs {
    fn add(&mut self, name: &str, reference: &[f32], got: &[f32]) -> Result<()> {
        self.add_beyond(name, reference, got, &[])
    }

    /// Like `add`, with each difference first reduced by `allowance` (what storing the value
    /// in a narrower type may move it by; none when empty).
    fn add_beyond(&mut self, name: &str, reference: &[f32], got: &[f32], allowance: &[f32]) -> Result<()> {
        if reference.len() != got.len() {
            return Err(ExportError::Ort(format!(
                "{name}: {} values from the package, {} expected",
                got.len(),
                reference.len()
            )));
        }
        let allowed = |i: usize| allowance.get(i).map_or(0.0, |&a| f64::from(a));
        let max_abs = reference
            .iter()
            .zip(got)
            .enumerate()
            .map(|(i, (&a, &b))| ((a - b).abs() as f64 - allowed(i)).max(0.0))
            .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m });
        let ref_max = reference.iter().map(|a| a.abs() as f64).fold(0.0, f64::max);
        match self.0.iter_mut().find(|d| d.output == name) {
            Some(d) => {
                d.max_abs = if max_abs.is_nan() {
                    max_abs
                } else {
                    d.max_abs.max(max_abs)
                };
                d.ref_max = d.ref_max.max(ref_max);
            }
            None => self.0.push(OutputDiff {
                output: name.to_string(),
                max_abs,
                ref_max,
            }),
        }
        Ok(())
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32 tensor")
}

fn ort_f32(v: &DynValue, name: &str) -> Result<Vec<f32>> {
    if let Ok((_, data)) = v.try_extract_tensor::<f32>() {
        return Ok(data.to_vec());
    }
    if let Ok((_, data)) = v.try_extract_tensor::<half::f16>() {
        return Ok(data.iter().map(|x| x.to_f32()).collect());
    }
    Err(ExportError::Ort(format!("{name}: not a float tensor")))
}

fn ort_err(e: ort::Error) -> ExportError {
    ExportError::Ort(e.to_string())
}

fn i64_tensor(t: &Tensor) -> Result<DynValue> {
    let shape = t.size();
    let data = Vec::<i64>::try_from(t.contiguous().view([-1])).expect("i64 tensor");
    Ok(OrtTensor::from_array((shape, data)).map_err(ort_err)?.into_dyn())
}

fn f32_tensor(t: &Tensor) -> Result<DynValue> {
    let shape = t.size();
    Ok(OrtTensor::from_array((shape, to_vec(t)))
        .map_err(ort_err)?
        .into_dyn())
}

fn bool_tensor(t: &Tensor) -> Result<DynValue> {
    let shape = t.size();
    let data: Vec<bool> = Vec::<i64>::try_from(t.to_kind(Kind::Int64).contiguous().view([-1]))
        .expect("i64 tensor")
        .into_iter()
        .map(|v| v != 0)
        .collect();
    Ok(OrtTensor::from_array((shape, data)).map_err(ort_err)?.into_dyn())
}

/// A zero cache tensor: empty (concat layout) or a zeroed buffer (buffer layout); `shape`'s
/// last dimension is head_dim, widened to an int8 row's.
fn zero_kv(shape: [i64; 4], dtype: KvDtype) -> Result<DynValue> {
    let shape = [
        shape[0],
        shape[1],
        shape[2],
        dtype.row_len(shape[3] as usize) as i64,
    ];
    let n = shape.iter().product::<i64>() as usize;
    Ok(match dtype {
        KvDtype::Fp32 => OrtTensor::<f32>::from_array((shape, vec![0f32; n]))
            .map_err(ort_err)?
            .into_dyn(),
        KvDtype::Fp16 => OrtTensor::<half::f16>::from_array((shape, vec![half::f16::ZERO; n]))
            .map_err(ort_err)?
            .into_dyn(),
        KvDtype::Int8 => OrtTensor::<i8>::from_array((shape, vec![0i8; n]))
            .map_err(ort_err)?
            .into_dyn(),
    })
}

/// A `present.*` tensor's values as float32 (int8 rows of `head_dim` + 1 dequantised), and per
/// value what storing may have moved it by when the cache is narrower than the model: half a
/// float16 ulp (2^-11 of the value) or half its int8 row's step; empty for float32.
fn stored_cache(v: &DynValue, name: &str, head_dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    if let Ok((_, rows)) = v.try_extract_tensor::<i8>() {
        let values = dequantize_int8_rows(rows, head_dim);
        let half_steps = rows
            .chunks_exact(head_dim + 1)
            .flat_map(|r| std::iter::repeat_n(exp2i(r[head_dim]) / 2.0, head_dim))
            .collect();
        return Ok((values, half_steps));
    }
    let values = ort_f32(v, name)?;
    let allowance = if v.try_extract_tensor::<half::f16>().is_ok() {
        values.iter().map(|x| x.abs() * 2f32.powi(-11)).collect()
    } else {
        Vec::new()
    };
    Ok((values, allowance))
}

/// How the package takes the cache (its capacity, buffer layout), the mask/offset inputs and
/// `logits_to_keep`.
struct Layout {
    capacity: Option<i64>,
    logits_to_keep: bool,
}

impl Layout {
    /// The package's attention mask for the reference's [b, t] mask.
    fn mask(&self, m: &Tensor) -> Tensor {
        match self.capacity {
            Some(c) => {
                let (b, t) = m.size2().expect("[b, t]");
                Tensor::cat(&[m, &Tensor::zeros([b, c - t], (Kind::Int64, Device::Cpu))], 1)
            }
            None => m.shallow_clone(),
        }
    }
    /// The buffer layout's per-row write offset (every row of this left-padded batch shares it)
    /// and `logits_to_keep` = `keep`, for the decoders that take them.
    fn extra(&self, past: i64, batch: i64, keep: i64) -> Result<Vec<(String, DynValue)>> {
        let mut extra = Vec::new();
        if self.capacity.is_some() {
            let offsets = OrtTensor::from_array(([batch], vec![past; batch as usize]));
            extra.push((
                io::PAST_SEQUENCE_LENGTH.into(),
                offsets.map_err(ort_err)?.into_dyn(),
            ));
        }
        if self.logits_to_keep {
            let keep = OrtTensor::from_array(([0usize; 0], vec![keep]));
            extra.push((io::LOGITS_TO_KEEP.into(), keep.map_err(ort_err)?.into_dyn()));
        }
        Ok(extra)
    }
}

/// Compare the package in `pkg` with the checkpoint in `ckpt`.
pub fn verify(ckpt: &Path, pkg: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let manifest = PackageManifest::load(pkg)?;
    let (_vs, model, ck) = kosmos_train::checkpoint::load(ckpt, Device::Cpu)
        .map_err(|e| ExportError::Reference(e.to_string()))?;
    if ck.config != manifest.config {
        return Err(ExportError::BadPackage {
            path: pkg.to_path_buf(),
            message: format!("was exported from another model than {}", ckpt.display()),
        });
    }
    let cfg = &ck.config;
    let lat = cfg.resampler.num_latents;
    let size = cfg.vision.image_size as i64;
    let d = &cfg.decoder;
    let (layers, heads, hd) = (
        d.decoder_layers,
        d.decoder_attention_heads as i64,
        d.head_dim() as i64,
    );
    let vocab = d.vocab_size as i64;
    let kv_dtype = manifest
        .decoder
        .cache_dtype()
        .ok_or_else(|| ExportError::BadPackage {
            path: pkg.to_path_buf(),
            message: format!("unknown kv_dtype '{}'", manifest.decoder.kv_dtype),
        })?;
    // A float16 or int8 cache under a float32 model stores each key and value rounded, and the
    // next call reads them so. Rounding the reference's own cache would not give the same
    // values: inputs a float32 rounding error apart round to neighbouring float16s (or int8
    // steps) now and then. So the reference's next step reads the package's stored cache, each
    // step checks the stored new slots against the reference's keys and values within that
    // rounding (half a float16 ulp, half an int8 row's step) besides the tolerance, and the
    // older slots must be unchanged.
    let rounded_cache = kv_dtype != KvDtype::from(manifest.dtype);
    let reads_stored = rounded_cache && !opts.own_cache;
    let mut vision = session_with(&pkg.join(&manifest.vision.file), opts.without_custom_ops)?;
    let mut decoder = session_with(&pkg.join(&manifest.decoder.file), opts.without_custom_ops)?;

    let rows = match &opts.data {
        None => synthetic_rows(cfg),
        Some(spec) => {
            let room = cfg.decoder.max_target_positions.saturating_sub(opts.decode_steps);
            let split = kosmos_train::synthetic::Split::Test;
            examples::data_rows(
                "--data",
                cfg,
                &ck.dir,
                spec,
                split,
                opts.seed as u64,
                opts.examples,
                room,
            )?
        }
    };
    let (ids, mut attention_mask, image_mask, len) = examples::left_padded(cfg, &rows);
    let b = rows.len() as i64;
    let images_per_row: Vec<usize> = rows.iter().map(|r| r.images).collect();
    let pixels = match &opts.data {
        // Arbitrary pixels for the synthetic rows: one image each. Seeded under the trainer's
        // lock: libtorch's generator is process-global, and a bare `manual_seed` here let a
        // concurrent seeded draw (a library caller's, or another test's) take other numbers.
        None => kosmos_train::rng::seeded(opts.seed, || {
            Tensor::randn([b, 3, size, size], (Kind::Float, Device::Cpu))
        }),
        Some(_) => examples::pixels(cfg, &rows),
    };

    let mut diffs = Diffs(Vec::new());
    let layout = Layout {
        capacity: (manifest.decoder.kv_cache == KvCacheLayout::Buffer)
            .then_some(len as i64 + opts.decode_steps as i64),
        logits_to_keep: manifest.decoder.takes_logits_to_keep(),
    };
    let err = |e: kosmos_train::TrainError| ExportError::Reference(e.to_string());

    // Vision (text-only rows have no image to compare).
    let ref_embeds = if pixels.size()[0] > 0 {
        let ref_embeds = tch::no_grad(|| model.encode_images(&pixels, false)).map_err(err)?;
        let out = vision
            .run(ort::inputs![io::PIXEL_VALUES => f32_tensor(&pixels)?])
            .map_err(ort_err)?;
        let embeds = ort_f32(&out[io::IMAGE_EMBEDS], io::IMAGE_EMBEDS)?;
        diffs.add(io::IMAGE_EMBEDS, &to_vec(&ref_embeds), &embeds)?;
        ref_embeds
    } else {
        Tensor::zeros(
            [0, lat as i64, d.decoder_embed_dim as i64],
            (Kind::Float, Device::Cpu),
        )
    };

    // Prefill: the package gets the reference image embeddings, so decoder differences are its own.
    let real = attention_mask.to_kind(Kind::Bool);
    let step =
        tch::no_grad(|| model.step(&ids, Some(&ref_embeds), &image_mask, &attention_mask, None, false))
            .map_err(err)?;
    let mut inputs: Vec<(String, DynValue)> = vec![
        (io::INPUT_IDS.into(), i64_tensor(&ids)?),
        (
            io::IMAGE_EMBEDS.into(),
            f32_tensor(&per_row(&ref_embeds, &images_per_row))?,
        ),
        (io::IMAGE_MASK.into(), bool_tensor(&image_mask)?),
        (
            io::ATTENTION_MASK.into(),
            i64_tensor(&layout.mask(&attention_mask))?,
        ),
    ];
    // Every position's logits (0), all compared; the decode steps keep their one position.
    inputs.extend(layout.extra(0, b, 0)?);
    let past0 = layout.capacity.unwrap_or(0);
    for i in 0..layers {
        inputs.push((io::past_key(i), zero_kv([b, heads, past0, hd], kv_dtype)?));
        inputs.push((io::past_value(i), zero_kv([b, heads, past0, hd], kv_dtype)?));
    }
    let mut out = decoder.run(inputs).map_err(ort_err)?;
    let logits = ort_f32(&out[io::LOGITS], io::LOGITS)?;
    // Left-padding positions are not compared: no token reads their logits.
    let keep = real.unsqueeze(-1).expand([b, len as i64, vocab], false);
    let got = Tensor::from_slice(&logits).view([b, len as i64, vocab]);
    let (ref_real, got_real) = (
        step.logits.masked_select(&keep).view([-1, vocab]),
        got.masked_select(&keep).view([-1, vocab]),
    );
    diffs.add(io::LOGITS, &to_vec(&ref_real), &to_vec(&got_real))?;
    let mut top1 = Top1::default();
    top1.add(&ref_real, &got_real);
    let mut present: Vec<DynValue> = Vec::with_capacity(2 * layers);
    let mut ref_past = collect_present(
        &mut diffs,
        step.present,
        &mut out,
        &attention_mask,
        (rounded_cache, reads_stored),
        &mut present,
    )?;
    let mut decode_top1 = Top1::default();
    let last = |l: &Tensor| l.select(1, -1).argmax(-1, false);
    let mut next = last(&step.logits);
    let mut pkg_next = last(&got);
    drop(out);
    let mut reference_tokens = vec![to_i64(&next)];
    let mut package_tokens = vec![to_i64(&pkg_next)];

    // Decode steps: both sides are fed the reference's greedy token, so inputs stay identical.
    let no_image = Tensor::zeros([b, 1], (Kind::Bool, Device::Cpu));
    let no_embeds = Tensor::zeros([b, 0, d.decoder_embed_dim as i64], (Kind::Float, Device::Cpu));
    for _ in 0..opts.decode_steps {
        let ids = next.view([b, 1]);
        attention_mask = Tensor::cat(
            &[&attention_mask, &Tensor::ones([b, 1], (Kind::Int64, Device::Cpu))],
            1,
        );
        let step =
            tch::no_grad(|| model.step(&ids, None, &no_image, &attention_mask, Some(&ref_past), false))
                .map_err(err)?;
        let mut inputs: Vec<(String, DynValue)> = vec![
            (io::INPUT_IDS.into(), i64_tensor(&ids)?),
            (io::IMAGE_EMBEDS.into(), f32_tensor(&no_embeds)?),
            (io::IMAGE_MASK.into(), bool_tensor(&no_image)?),
            (
                io::ATTENTION_MASK.into(),
                i64_tensor(&layout.mask(&attention_mask))?,
            ),
        ];
        inputs.extend(layout.extra(attention_mask.size()[1] - 1, b, 1)?);
        for (i, kv) in present.drain(..).enumerate() {
            let name = if i % 2 == 0 {
                io::past_key(i / 2)
            } else {
                io::past_value(i / 2)
            };
            inputs.push((name, kv));
        }
        let mut out = decoder.run(inputs).map_err(ort_err)?;
        let logits = ort_f32(&out[io::LOGITS], io::LOGITS)?;
        diffs.add(io::LOGITS, &to_vec(&step.logits), &logits)?;
        for t in [&mut top1, &mut decode_top1] {
            t.add(
                &step.logits.view([-1, vocab]),
                &Tensor::from_slice(&logits).view([-1, vocab]),
            );
        }
        ref_past = collect_present(
            &mut diffs,
            step.present,
            &mut out,
            &attention_mask,
            (rounded_cache, reads_stored),
            &mut present,
        )?;
        next = last(&step.logits);
        pkg_next = last(&Tensor::from_slice(&logits).view([b, 1, vocab]));
        reference_tokens.push(to_i64(&next));
        package_tokens.push(to_i64(&pkg_next));
    }

    let same_tokens = reference_tokens == package_tokens;
    let compare_choices = manifest.quantization.is_some() || rounded_cache && opts.own_cache;
    let (passed, tolerance, kind) = match (compare_choices, manifest.dtype) {
        // Quantised weights (or a rounded cache the reference does not read) move every value
        // a little, and near-ties flip (verify's prompts are arbitrary token ids); what must
        // survive is the choice of token at nearly every position, the greedy ones included
        // (DESIGN §7, step 3).
        (true, _) => {
            let least = opts.tolerance.unwrap_or(QUANTIZED_TOP1);
            (top1.fraction() >= least, least, "top-1")
        }
        (false, PackageDtype::Fp32) => {
            let t = opts.tolerance.unwrap_or(1e-4);
            (
                same_tokens && diffs.0.iter().all(|d| d.max_abs <= t),
                t,
                "absolute",
            )
        }
        (false, PackageDtype::Fp16) => {
            let t = opts.tolerance.unwrap_or(1e-2);
            (
                same_tokens && diffs.0.iter().all(|d| d.relative() <= t),
                t,
                "relative",
            )
        }
    };
    Ok(VerifyReport {
        dtype: manifest.dtype.as_str().into(),
        profile: manifest.profile.clone(),
        kv_cache: manifest.decoder.kv_cache.as_str().into(),
        kv_dtype: manifest.decoder.kv_dtype.clone(),
        presents_beyond_rounding: rounded_cache,
        reference_reads_stored_cache: reads_stored,
        diffs: diffs.0,
        reference_tokens,
        package_tokens,
        tolerance,
        tolerance_kind: kind.into(),
        top1_agreement: top1.fraction(),
        positions: top1.positions,
        mean_kl_divergence: top1.mean_kl(),
        max_kl_divergence: top1.kl_max,
        decode_top1_agreement: decode_top1.fraction(),
        decode_positions: decode_top1.positions,
        decode_mean_kl_divergence: decode_top1.mean_kl(),
        rows: images_per_row.len(),
        images: images_per_row.iter().sum(),
        data: opts.data.clone(),
        passed,
    })
}

/// Two arbitrary prompts, text before and after one image each (one row without text before).
fn synthetic_rows(cfg: &KosmosConfig) -> Vec<Row> {
    let tok = &cfg.tokenizer;
    let vocab = cfg.decoder.vocab_size as i64;
    let lat = cfg.resampler.num_latents;
    let text = |n: usize, start: i64| -> Vec<i64> {
        (0..n as i64).map(|i| 6 + (start + 7 * i) % (vocab - 6)).collect()
    };
    let image = |pre: Vec<i64>, post: Vec<i64>| {
        let mut ids = vec![tok.bos_token_id as i64];
        ids.extend(pre);
        ids.push(tok.image_start_token_id as i64);
        let slot_start = ids.len();
        ids.extend(std::iter::repeat_n(tok.pad_token_id as i64, lat));
        ids.push(tok.image_end_token_id as i64);
        ids.extend(post);
        let image_mask = (0..ids.len())
            .map(|i| (slot_start..slot_start + lat).contains(&i))
            .collect();
        Row {
            ids,
            image_mask,
            images: 1,
            pixels: Vec::new(),
        }
    };
    vec![image(text(2, 11), text(5, 3)), image(Vec::new(), text(2, 40))]
}

/// The decoder's `image_embeds` [b, slots, D]: each row's images' latents in slot order,
/// zero-padded to the row with most (the reference model takes all images' latents in slot
/// order across the rows, `embeds` [n, latents, D]).
fn per_row(embeds: &Tensor, images_per_row: &[usize]) -> Tensor {
    let (_, lat, d) = embeds.size3().expect("[n, latents, D]");
    let most = images_per_row.iter().copied().max().unwrap_or(0) as i64;
    let out = Tensor::zeros(
        [images_per_row.len() as i64, most * lat, d],
        (Kind::Float, Device::Cpu),
    );
    let mut at = 0i64;
    for (r, &k) in images_per_row.iter().enumerate() {
        let k = k as i64;
        if k > 0 {
            out.get(r as i64)
                .narrow(0, 0, k * lat)
                .copy_(&embeds.narrow(0, at, k).reshape([k * lat, d]));
        }
        at += k;
    }
    out
}

/// Compare the package's `present.*` with the reference cache at real (non-padding) positions —
/// padding slots hold whatever each implementation computes for queries that see no key, and no
/// real token ever reads them — and keep the package's values for its next step. Returns the
/// cache the reference's next step reads: its own, or with `reads_stored` the package's stored
/// one. With `rounded_cache` (a float16 or int8 cache under a float32 model) the stored values
/// may differ from the reference's by their rounding besides the tolerance (half a float16 ulp,
/// ≤ 2^-11 of each; half an int8 row's step).
fn collect_present(
    diffs: &mut Diffs,
    reference: Vec<kosmos_train::LayerKv>,
    out: &mut ort::session::SessionOutputs<'_>,
    attention_mask: &Tensor,
    (rounded_cache, reads_stored): (bool, bool),
    keep: &mut Vec<DynValue>,
) -> Result<Vec<kosmos_train::LayerKv>> {
    let mut stored = Vec::with_capacity(reference.len());
    for (i, kv) in reference.iter().enumerate() {
        let mut pair = Vec::with_capacity(2);
        let shape = kv.key.size();
        let real = attention_mask
            .to_kind(Kind::Bool)
            .view([shape[0], 1, shape[2], 1])
            .expand(shape.as_slice(), false);
        for (name, label, r) in [
            (io::present_key(i), "present.*.key", &kv.key),
            (io::present_value(i), "present.*.value", &kv.value),
        ] {
            let (got, allowance) = stored_cache(&out[name.as_str()], &name, shape[3] as usize)?;
            // A buffer-layout cache holds `capacity` slots: the first t are the sequence.
            let cap = got.len() as i64 / (shape[0] * shape[1] * shape[3]);
            let sequence = |x: &[f32]| {
                Tensor::from_slice(x)
                    .view([shape[0], shape[1], cap, shape[3]])
                    .narrow(2, 0, shape[2])
            };
            let got = sequence(&got);
            // A float16 model's own float16 cache is compared as it is (its tolerance is relative).
            let allowance = if !rounded_cache || allowance.is_empty() {
                Vec::new()
            } else {
                to_vec(&sequence(&allowance).masked_select(&real))
            };
            diffs.add_beyond(
                label,
                &to_vec(&r.masked_select(&real)),
                &to_vec(&got.masked_select(&real)),
                &allowance,
            )?;
            pair.push(got);
            keep.push(
                out.remove(name.as_str())
                    .ok_or_else(|| ExportError::Ort(format!("{name} missing from the outputs")))?,
            );
        }
        let value = pair.pop().expect("value");
        let key = pair.pop().expect("key");
        stored.push(kosmos_train::LayerKv { key, value });
    }
    Ok(if reads_stored { stored } else { reference })
}

fn to_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.contiguous().view([-1])).expect("i64 tensor")
}
