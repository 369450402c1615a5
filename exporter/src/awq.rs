//! Activation-aware weight quantisation (`kosmos-export --quantize int4 --awq DATA`), after
//! Lin et al., "AWQ" (MLSys 2024), as TensorRT-LLM's `int4_awq` and AutoAWQ apply it.
//!
//! Weights that meet large activations matter most. Scaling input feature `j` of a linear by
//! `s_j` (its weight column times `s_j`, its input divided by `s_j`) leaves the float model
//! unchanged, but after block quantisation a scaled-up column loses relatively less. Here every
//! quantised linear reads one LayerNorm's output and nothing else (sub-LN puts a LayerNorm in
//! front of each: [`kosmos_models::params::decoder_normed_linears`]), so the division folds into
//! that LayerNorm's weight and bias and the package keeps its graph and its runtime cost.
//!
//! Per group, on calibration activations from real examples through the tch model:
//! `s = mean|x|^α` (normalised so that `max(s)·min(s) = 1`), for α in `0, 1/grid, …,
//! (grid−1)/grid`; the α whose quantised linears' outputs are closest (mean squared error over
//! an evenly spread sample of the calibration tokens) to the float ones wins. α = 0 is plain
//! round-to-nearest, so no group ends worse than without `--awq` on those tokens. The error is
//! measured at the group's own linears (AWQ measures it after the whole attention block for
//! q/k/v). Then, AWQ's second step, each output row's block keeps the clipping factor of its
//! largest weight (1 down to 0.55) whose squared output error over every calibration token is
//! least, computed exactly from the block's Gram matrix of inputs. The search's fake quantiser
//! is the package's quantiser bit for bit ([`quantize::fake_quantize_block`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kosmos_models::KosmosConfig;
use kosmos_models::package::{AwqCalibration, Quantization};
use kosmos_models::params::{NormedLinears, decoder_normed_linears};
use tch::{Device, Kind, Tensor};

use crate::error::{ExportError, Result};
use crate::examples::{self, Row};
use crate::quantize::{self, ScaleType};

#[derive(Clone, Debug)]
pub struct AwqOptions {
    /// Calibration data: a `kosmos-train` data spec (`synthetic:*` draws its training split).
    pub data: String,
    /// Examples run through the model.
    pub examples: usize,
    /// Tokens per group kept to measure the quantisation error (all tokens count for `mean|x|`).
    pub error_tokens: usize,
    /// Number of α values tried.
    pub grid: usize,
    pub seed: u64,
    pub progress: bool,
}

impl AwqOptions {
    pub const DEFAULT_EXAMPLES: usize = 64;
    pub const DEFAULT_GRID: usize = 20;

    pub fn new(data: &str) -> Self {
        AwqOptions {
            data: data.to_string(),
            examples: Self::DEFAULT_EXAMPLES,
            error_tokens: 512,
            grid: Self::DEFAULT_GRID,
            seed: 0,
            progress: false,
        }
    }
}

/// What the search chose for one LayerNorm and its linears.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GroupScales {
    pub norm: String,
    pub linears: Vec<String>,
    pub alpha: f64,
    /// Mean squared error of the quantised linears' outputs on the sampled calibration tokens,
    /// with the chosen scales and clipping, and with neither (round-to-nearest).
    pub error: f64,
    pub error_round_to_nearest: f64,
    #[serde(skip)]
    pub scales: Vec<f32>,
    /// Clipping factor per output row (of the linears in order) and block.
    #[serde(skip)]
    pub clip: Vec<f32>,
    /// Output rows of each linear.
    #[serde(skip)]
    pub linear_rows: Vec<usize>,
}

/// The search's result: scales per group and what they were calibrated on.
#[derive(Clone, Debug)]
pub struct AwqScales {
    pub groups: Vec<GroupScales>,
    pub calibration: AwqCalibration,
}

impl AwqScales {
    /// The checkpoint tensors the scales change, with their new values: each LayerNorm's
    /// weight and bias divided by `s`, each linear's weight columns multiplied by `s`.
    /// `read` gives a checkpoint tensor's values and shape.
    pub fn scaled_tensors(
        &self,
        read: impl Fn(&str) -> Result<(Vec<f32>, Vec<usize>)>,
    ) -> Result<HashMap<String, Vec<f32>>> {
        let mut out = HashMap::new();
        for g in &self.groups {
            for part in ["weight", "bias"] {
                let name = format!("{}.{part}", g.norm);
                let (mut v, _) = read(&name)?;
                v.iter_mut().zip(&g.scales).for_each(|(v, s)| *v /= s);
                out.insert(name, v);
            }
            for lin in &g.linears {
                let name = format!("{lin}.weight");
                let (mut v, shape) = read(&name)?;
                for row in v.chunks_exact_mut(shape[1]) {
                    row.iter_mut().zip(&g.scales).for_each(|(v, s)| *v *= s);
                }
                out.insert(name, v);
            }
        }
        Ok(out)
    }

    /// Each linear's clipping factors ([out, blocks], as [`quantize::quantize_blockwise_clipped`]
    /// takes them), by the linear's prefix.
    pub fn clips(&self) -> HashMap<String, Vec<f32>> {
        let mut out = HashMap::new();
        for g in &self.groups {
            let per_row = g.clip.len() / g.linear_rows.iter().sum::<usize>().max(1);
            let mut at = 0;
            for (lin, rows) in g.linears.iter().zip(&g.linear_rows) {
                out.insert(lin.clone(), g.clip[at..at + rows * per_row].to_vec());
                at += rows * per_row;
            }
        }
        out
    }

    /// Median over groups of the error with the scales relative to round-to-nearest's.
    pub fn median_error_ratio(&self) -> f64 {
        let mut r: Vec<f64> = self
            .groups
            .iter()
            .map(|g| g.error / g.error_round_to_nearest.max(f64::MIN_POSITIVE))
            .collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(1.0)
    }
}

/// Activations one LayerNorm handed its linears during calibration.
#[derive(Default)]
struct Observed {
    abs_sum: Option<Tensor>,
    /// Σ xᵀx per quantisation block of input features, over all tokens: [blocks, bs, bs].
    block_gram: Option<Tensor>,
    tokens: i64,
    kept: Vec<Tensor>,
    kept_rows: i64,
}

/// Run the calibration examples through the checkpoint's tch model and search each group's
/// scales for quantisation `q` with scales of `scale_type`.
pub fn search(
    ckpt_dir: &Path,
    q: &Quantization,
    scale_type: ScaleType,
    opts: &AwqOptions,
) -> Result<AwqScales> {
    let reference = |e: kosmos_train::TrainError| ExportError::Reference(e.to_string());
    let (vs, model, ck) = kosmos_train::checkpoint::load(ckpt_dir, Device::Cpu).map_err(reference)?;
    let cfg = &ck.config;
    let rows = examples::data_rows(
        "--awq",
        cfg,
        &ck.dir,
        &opts.data,
        kosmos_train::synthetic::Split::Train,
        opts.seed,
        opts.examples,
        cfg.decoder.max_target_positions,
    )?;
    let t0 = std::time::Instant::now();
    let observed = calibrate(&model, cfg, &rows, q.block_size as i64, opts)?;
    tracing::info!(
        examples = rows.len(),
        seconds = t0.elapsed().as_secs_f64(),
        "AWQ calibration run"
    );
    let t0 = std::time::Instant::now();
    let tokens = observed.values().next().map_or(0, |o| o.tokens);
    let weights = vs.variables();
    let groups = decoder_normed_linears(cfg);
    let pb = crate::progress_count(opts.progress, groups.len() as u64, "AWQ search");
    let mut found = Vec::with_capacity(groups.len());
    for g in &groups {
        let obs = observed
            .get(&g.norm)
            .ok_or_else(|| ExportError::Reference(format!("the model never computed {}", g.norm)))?;
        let group = search_group(g, obs, &weights, q, scale_type, opts.grid)?;
        tracing::debug!(
            norm = group.norm,
            alpha = group.alpha,
            error = group.error,
            error_round_to_nearest = group.error_round_to_nearest,
            "AWQ group"
        );
        found.push(group);
        pb.inc(1);
    }
    pb.finish_and_clear();
    tracing::info!(
        groups = found.len(),
        seconds = t0.elapsed().as_secs_f64(),
        "AWQ search"
    );
    Ok(AwqScales {
        groups: found,
        calibration: AwqCalibration {
            data: opts.data.clone(),
            examples: rows.len(),
            tokens: tokens as usize,
            grid: opts.grid,
        },
    })
}

/// Forward the rows in batches, keeping per LayerNorm the sum of |x| over all real tokens and an
/// evenly spread sample of `opts.error_tokens` token rows.
fn calibrate(
    model: &kosmos_train::model::Kosmos,
    cfg: &KosmosConfig,
    rows: &[Row],
    block_size: i64,
    opts: &AwqOptions,
) -> Result<BTreeMap<String, Observed>> {
    const BATCH: usize = 8;
    let per_batch = opts.error_tokens.div_ceil(rows.len().div_ceil(BATCH)).max(1) as i64;
    let pb = crate::progress_count(opts.progress, rows.len() as u64, "AWQ calibration");
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    for batch in rows.chunks(BATCH) {
        let (ids, attention_mask, image_mask, _) = examples::left_padded(cfg, batch);
        let pixels = examples::pixels(cfg, batch);
        let real = attention_mask.ne(0).view([-1]).nonzero().view([-1]);
        let reference = |e: kosmos_train::TrainError| ExportError::Reference(e.to_string());
        tch::no_grad(|| -> Result<()> {
            let image_embeds = if pixels.size()[0] > 0 {
                Some(model.encode_images(&pixels, false).map_err(reference)?)
            } else {
                None
            };
            let embeds = model
                .embed(&ids, image_embeds.as_ref(), &image_mask)
                .map_err(reference)?;
            let mut observe = |norm: &str, x: &Tensor| {
                let dim = x.size()[2];
                let x = x.reshape([-1, dim]).index_select(0, &real);
                let o = observed.entry(norm.to_string()).or_default();
                let abs = x.abs().sum_dim_intlist(0, false, Kind::Float);
                o.abs_sum = Some(match o.abs_sum.take() {
                    Some(sum) => sum + abs,
                    None => abs,
                });
                let blocks = (dim + block_size - 1) / block_size;
                let xb = x
                    .constant_pad_nd([0, blocks * block_size - dim])
                    .view([-1, blocks, block_size])
                    .permute([1, 0, 2]);
                let gram = xb.transpose(1, 2).bmm(&xb);
                o.block_gram = Some(match o.block_gram.take() {
                    Some(sum) => sum + gram,
                    None => gram,
                });
                let n = x.size()[0];
                o.tokens += n;
                let take = per_batch.min(n).min(opts.error_tokens as i64 - o.kept_rows);
                if take > 0 {
                    // Evenly spaced over the batch's tokens.
                    let at = Tensor::linspace(0.0, (n - 1) as f64, take, (Kind::Float, Device::Cpu))
                        .round()
                        .to_kind(Kind::Int64);
                    o.kept.push(x.index_select(0, &at));
                    o.kept_rows += take;
                }
            };
            let _logits = model
                .decoder
                .forward_observed(&embeds, &attention_mask, &mut observe);
            Ok(())
        })?;
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    Ok(observed)
}

/// Try each α for one group; the smallest error wins (the smaller α on a tie). Then, with
/// those scales, each block's clipping factor (AWQ's second step).
fn search_group(
    g: &NormedLinears,
    obs: &Observed,
    weights: &HashMap<String, Tensor>,
    q: &Quantization,
    scale_type: ScaleType,
    grid: usize,
) -> Result<GroupScales> {
    let missing = |n: &str| ExportError::Reference(format!("checkpoint has no {n}"));
    let parts: Vec<Tensor> = g
        .linears
        .iter()
        .map(|l| {
            let n = format!("{l}.weight");
            weights
                .get(&n)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| missing(&n))
        })
        .collect::<Result<_>>()?;
    // AWQ leaves q and k unclipped: their error reaches the model through q·k, not one output.
    let clippable: Vec<bool> = g
        .linears
        .iter()
        .zip(&parts)
        .flat_map(|(l, w)| {
            let keep = !(l.ends_with(".q_proj") || l.ends_with(".k_proj"));
            std::iter::repeat_n(keep, w.size()[0] as usize)
        })
        .collect();
    let w_t = Tensor::cat(&parts, 0).to_kind(Kind::Float);
    let (n, k) = w_t.size2().expect("[n, k]");
    let w = floats(&w_t);
    let x = Tensor::cat(&obs.kept, 0);
    let mean_abs = floats(&(obs.abs_sum.as_ref().expect("observed once") / obs.tokens.max(1) as f64));
    let gram = obs.block_gram.as_ref().expect("observed once");
    let shape = Shape {
        n: n as usize,
        k: k as usize,
        bits: q.bits,
        block: q.block_size,
        scale_type,
    };
    tch::no_grad(|| {
        let y = x.matmul(&w_t.tr());
        // One buffer for every candidate's weights: a fresh [n, k] tensor per try costs more in
        // page faults than the arithmetic.
        let mut wq = Tensor::zeros([n, k], (Kind::Float, Device::Cpu));
        let mut error = |s: &[f32], clip: Option<&[f32]>| {
            quantize_scaled(&w, s, clip, &shape, values_mut(&mut wq));
            (x.matmul(&wq.tr()) - &y)
                .square()
                .mean(Kind::Double)
                .double_value(&[])
        };
        let mut best: Option<(f64, Vec<f32>, f64)> = None;
        let mut rtn = 0.0;
        for i in 0..grid.max(1) {
            let alpha = i as f64 / grid.max(1) as f64;
            let s = scales(&mean_abs, alpha);
            let err = error(&s, None);
            if i == 0 {
                rtn = err;
            }
            if best.as_ref().is_none_or(|(e, _, _)| err < *e) {
                best = Some((err, s, alpha));
            }
        }
        let (_, s, alpha) = best.expect("one α at least");
        let clip = search_clip(&w, &s, gram, &clippable, &shape);
        Ok(GroupScales {
            norm: g.norm.clone(),
            linears: g.linears.clone(),
            alpha,
            error: error(&s, Some(&clip)),
            error_round_to_nearest: rtn,
            scales: s,
            clip,
            linear_rows: parts.iter().map(|p| p.size()[0] as usize).collect(),
        })
    })
}

/// A group's weight [n, k] and how it quantises.
struct Shape {
    n: usize,
    k: usize,
    bits: u32,
    block: usize,
    scale_type: ScaleType,
}

/// `mean|x|^α`, at least 1e-4, divided by `sqrt(max · min)`.
fn scales(mean_abs: &[f32], alpha: f64) -> Vec<f32> {
    let s: Vec<f32> = mean_abs
        .iter()
        .map(|&m| (m.powf(alpha as f32)).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (hi * lo).sqrt();
    s.iter().map(|v| v / norm).collect()
}

/// `Q(w · s) / s` into `out` [n, k]: the weights the scaled package's linears multiply by, in the
/// unscaled model's terms (`w · s` rounded as [`AwqScales::scaled_tensors`] rounds it).
fn quantize_scaled(w: &[f32], s: &[f32], clip: Option<&[f32]>, shape: &Shape, out: &mut [f32]) {
    let (k, bits, block, scale_type) = (shape.k, shape.bits, shape.block, shape.scale_type);
    let blocks = k.div_ceil(block);
    quantize::for_each_row(out, k, |row, dst| {
        let mut scaled = vec![0f32; block];
        let mut codes = vec![0u8; block];
        let src = &w[row * k..(row + 1) * k];
        for b in 0..blocks {
            let at = b * block..((b + 1) * block).min(k);
            let len = at.len();
            for ((v, &x), &f) in scaled.iter_mut().zip(&src[at.clone()]).zip(&s[at.clone()]) {
                *v = x * f;
            }
            let clip = clip.map(|c| c[row * blocks + b]);
            let dst = &mut dst[at.clone()];
            quantize::fake_quantize_block(&scaled[..len], bits, scale_type, clip, &mut codes, dst);
            dst.iter_mut().zip(&s[at]).for_each(|(v, f)| *v /= f);
        }
    });
}

/// Per output row and block of `w · s`, the clipping factor among 1, 0.95, …, 0.55 whose
/// quantisation error `dᵀ G d` is least, with `G` the block's Gram matrix of the calibration
/// inputs divided by `s` (as the scaled model sees them): the exact squared output error over
/// every calibration token, at the cost of one small product per candidate.
fn search_clip(w: &[f32], s: &[f32], block_gram: &Tensor, clippable: &[bool], shape: &Shape) -> Vec<f32> {
    const STEPS: usize = 10;
    let (n, k, bits, block) = (shape.n, shape.k, shape.bits, shape.block);
    let scale_type = shape.scale_type;
    let blocks = k.div_ceil(block);
    let pad = blocks * block - k;
    let sb = Tensor::cat(
        &[
            Tensor::from_slice(s),
            Tensor::ones([pad as i64], (Kind::Float, Device::Cpu)),
        ],
        0,
    )
    .view([blocks as i64, block as i64]);
    let gram = floats(&(block_gram / (sb.unsqueeze(-1) * sb.unsqueeze(-2))));
    let mut clip = vec![1f32; n * blocks];
    quantize::for_each_row(&mut clip, blocks, |row, factors| {
        let (mut scaled, mut deq, mut d) = (vec![0f32; block], vec![0f32; block], vec![0f32; block]);
        let mut codes = vec![0u8; block];
        let src = &w[row * k..(row + 1) * k];
        for (b, factor) in factors.iter_mut().enumerate() {
            let at = b * block..((b + 1) * block).min(k);
            let len = at.len();
            for ((v, &x), &f) in scaled.iter_mut().zip(&src[at.clone()]).zip(&s[at]) {
                *v = x * f;
            }
            let g = &gram[b * block * block..][..block * block];
            let mut best = (f32::INFINITY, 1.0);
            let steps = if clippable[row] { STEPS } else { 1 };
            for i in 0..steps {
                let ratio = 1.0 - i as f32 / 20.0;
                quantize::fake_quantize_block(
                    &scaled[..len],
                    bits,
                    scale_type,
                    Some(ratio),
                    &mut codes,
                    &mut deq[..len],
                );
                for ((d, &v), &q) in d.iter_mut().zip(&scaled[..len]).zip(&deq[..len]) {
                    *d = v - q;
                }
                let err = quadratic_form(g, &d[..len], block);
                if err < best.0 {
                    best = (err, ratio);
                }
            }
            *factor = best.1;
        }
    });
    clip
}

/// `dᵀ G d` for `G` the leading `d.len()` square of a [stride, stride] matrix, stride at most
/// 256 (the largest block).
///
/// `G d` is built as the sum of G's rows times `d[r]`: whole-row adds, which vectorise, where a
/// dot product per row is a chain of dependent scalar adds (that chain was most of the clipping
/// search's time: about 200 of the full-size model's 332 s).
fn quadratic_form(g: &[f32], d: &[f32], stride: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        fn on_avx2(g: &[f32], d: &[f32], stride: usize) -> f32 {
            quadratic_form_portable(g, d, stride)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { on_avx2(g, d, stride) };
    }
    quadratic_form_portable(g, d, stride)
}

#[inline(always)]
fn quadratic_form_portable(g: &[f32], d: &[f32], stride: usize) -> f32 {
    let len = d.len();
    let mut gd = [0f32; 256];
    let gd = &mut gd[..len];
    for (r, &dr) in d.iter().enumerate() {
        for (t, &gv) in gd.iter_mut().zip(&g[r * stride..r * stride + len]) {
            *t += dr * gv;
        }
    }
    gd.iter().zip(d).map(|(t, d)| t * d).sum()
}

/// The values of a float tensor.
fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32 values")
}

/// The values of a contiguous CPU f32 tensor, to write in place.
fn values_mut(t: &mut Tensor) -> &mut [f32] {
    assert!(t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous());
    let len = t.numel();
    // SAFETY: `t` is a contiguous CPU float tensor of `len` f32 values, borrowed mutably for as
    // long as the slice lives, and its storage is its own (made by `Tensor::zeros` above).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clipping search's `dᵀ G d` equals the sum of `d_r G_rc d_c` in float64, for every
    /// block size and a short last block, on whatever instruction set this CPU has.
    #[test]
    fn quadratic_form_equals_the_double_sum() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut value = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for &stride in &kosmos_models::package::Quantization::BLOCK_SIZES {
            for len in [stride, stride - 3] {
                let g: Vec<f32> = (0..stride * stride).map(|_| value()).collect();
                let d: Vec<f32> = (0..len).map(|_| value()).collect();
                let want: f64 = (0..len)
                    .flat_map(|r| (0..len).map(move |c| (r, c)))
                    .map(|(r, c)| f64::from(d[r]) * f64::from(g[r * stride + c]) * f64::from(d[c]))
                    .sum();
                let got = f64::from(quadratic_form(&g, &d, stride));
                assert!(
                    (got - want).abs() <= 1e-6 * (len * len) as f64,
                    "block {stride}, {len} values: {got} vs {want}"
                );
            }
        }
    }
}
