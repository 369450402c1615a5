//! Weight-only block quantisation in the layout of ONNX Runtime's `com.microsoft::MatMulNBits`
//! (the format ONNX Runtime GenAI's model builder writes), with the arithmetic of ONNX Runtime's
//! own quantiser (MLAS `BlockwiseQuantizer`, symmetric), so a package's codes and scales equal
//! what `onnxruntime.quantization.matmul_nbits_quantizer` gives for the same weights, bit for bit
//! (`scripts/oracles/quant_check.py` checks that).
//!
//! For one output feature `n`, its K input weights are cut into blocks of `block_size` (the last
//! one padded with zeros). A block's scale is `-m / 2^(bits-1)`, where `m` is its value of largest
//! magnitude (so `m` itself maps to code 0), and each weight `v` becomes
//! `clamp(round(v / scale + 2^(bits-1)), 0, 2^bits - 1)`: 4-bit codes pack two to a byte, the
//! first in the low nibble.

/// The quantised weight of one linear with `n` outputs and `k` inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockQuantized {
    /// `[n, blocks, block_size * bits / 8]` codes.
    pub codes: Vec<u8>,
    /// `[n, blocks]` scales (values of the [`ScaleType`] asked for).
    pub scales: Vec<f32>,
    pub blocks: usize,
    /// Bytes of codes per block.
    pub blob: usize,
}

/// Precision of the weights as the graph holds them, which is also that of the scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleType {
    F32,
    /// fp16 packages: the weights are rounded to fp16 first and each scale is rounded to fp16
    /// before the codes are computed from it, as ONNX Runtime's quantiser does for fp16 weights.
    F16,
}

impl ScaleType {
    #[inline]
    fn round(self, v: f32) -> f32 {
        match self {
            ScaleType::F32 => v,
            ScaleType::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

/// Quantise `w`, a row-major `[n, k]` Linear weight (PyTorch's `[out, in]`), to `bits` (4 or 8)
/// in blocks of `block_size` along `k`, with scales (and weights) in `scale_type`.
pub fn quantize_blockwise(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    block_size: usize,
    scale_type: ScaleType,
) -> BlockQuantized {
    quantize_blockwise_clipped(w, n, k, bits, block_size, scale_type, None)
}

/// [`quantize_blockwise`] with each block's kept extreme multiplied by `clip[row * blocks + b]`
/// (≤ 1) before its scale is computed, so values beyond it clamp to the end codes: a smaller
/// step for the rest of the block (`--awq`'s clipping search picks the factors).
pub fn quantize_blockwise_clipped(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    block_size: usize,
    scale_type: ScaleType,
    clip: Option<&[f32]>,
) -> BlockQuantized {
    assert!(bits == 4 || bits == 8, "4 or 8 bits");
    assert_eq!(w.len(), n * k, "weight is [n, k]");
    let blocks = k.div_ceil(block_size);
    let per_byte = (8 / bits) as usize;
    let blob = block_size / per_byte;
    let mut codes = vec![0u8; n * blocks * blob];
    let mut scales = vec![0f32; n * blocks];
    let mut block_codes = vec![0u8; block_size];
    for row in 0..n {
        let weights = &w[row * k..(row + 1) * k];
        for b in 0..blocks {
            let values = &weights[b * block_size..((b + 1) * block_size).min(k)];
            let clip = clip.map(|c| c[row * blocks + b]);
            let scale = quantize_block(values, bits, scale_type, clip, &mut block_codes);
            scales[row * blocks + b] = scale;
            let out = &mut codes[(row * blocks + b) * blob..][..blob];
            if bits == 8 {
                out.copy_from_slice(&block_codes);
            } else {
                for (byte, pair) in out.iter_mut().zip(block_codes.chunks_exact(2)) {
                    *byte = (pair[0] & 0xf) | (pair[1] << 4);
                }
            }
        }
    }
    BlockQuantized {
        codes,
        scales,
        blocks,
        blob,
    }
}

/// The float32 just below 0.5: `trunc(x + HALF_BELOW)` rounds x ≥ 0 half away from zero
/// exactly (0.5 + HALF_BELOW rounds up to 1; 0.49999997 + HALF_BELOW stays below it).
const HALF_BELOW: f32 = 0.499_999_97;

/// `x.round().clamp(0, top) as u8` (`top` ≤ 255), clamped first (the same codes) and then
/// rounded as `trunc(x + HALF_BELOW)`, LLVM's own lowering of `round`: without SSE4.1,
/// `f32::round` is a call to libm per weight, a fifth of `--awq`'s search.
#[inline(always)]
fn code_of(x: f32, top: f32) -> u8 {
    (x.clamp(0.0, top) + HALF_BELOW) as u8
}

/// One block's scale, and its codes into `codes` (one per byte, `codes.len()` = the block size;
/// positions past `values` are the zero padding's codes).
fn quantize_block(
    values: &[f32],
    bits: u32,
    scale_type: ScaleType,
    clip: Option<f32>,
    codes: &mut [u8],
) -> f32 {
    let mid = (1u32 << (bits - 1)) as f32;
    let top = ((1u32 << bits) - 1) as f32;
    let (min, max) = values.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| {
        let v = scale_type.round(v);
        (lo.min(v), hi.max(v))
    });
    // MLAS keeps the larger-magnitude end with its sign (the smaller one on a tie), and maps it
    // to code 0: the wider half of the range, [-8, 0) for 4 bits, takes it.
    let m = if max.abs() > min.abs() { max } else { min };
    let m = clip.map_or(m, |c| m * c);
    let scale = scale_type.round(-m / mid);
    let reciprocal = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (i, code) in codes.iter_mut().enumerate() {
        let v = values.get(i).map_or(0.0, |&v| scale_type.round(v));
        // Separate multiply and add (no fused multiply-add): MLAS's
        // `roundf(v * reciprocal_scale + zp)`, clamped.
        *code = code_of(v * reciprocal + mid, top);
    }
    scale
}

/// What [`quantize_blockwise_clipped`] then [`dequantize`] give for one block of `values`:
/// the dequantised weights into `out` (`out.len()` ≤ the block size, `codes` as long as a block).
pub fn fake_quantize_block(
    values: &[f32],
    bits: u32,
    scale_type: ScaleType,
    clip: Option<f32>,
    codes: &mut [u8],
    out: &mut [f32],
) {
    let mid = 1i32 << (bits - 1);
    let scale = quantize_block(values, bits, scale_type, clip, codes);
    for (o, &c) in out.iter_mut().zip(codes.iter()) {
        *o = (c as i32 - mid) as f32 * scale;
    }
}

/// What [`quantize_blockwise_clipped`] then [`dequantize`] give for `w` [n, k], block by block
/// on all cores without packing the codes.
#[allow(clippy::too_many_arguments)]
pub fn fake_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    block_size: usize,
    scale_type: ScaleType,
    clip: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "weight is [n, k]");
    let blocks = k.div_ceil(block_size);
    let mut out = vec![0f32; n * k];
    for_each_row(&mut out, k, |row, dst| {
        let mut codes = vec![0u8; block_size];
        let src = &w[row * k..(row + 1) * k];
        for (b, (v, o)) in src.chunks(block_size).zip(dst.chunks_mut(block_size)).enumerate() {
            let clip = clip.map(|c| c[row * blocks + b]);
            fake_quantize_block(v, bits, scale_type, clip, &mut codes, o);
        }
    });
    out
}

/// The weights the codes stand for, `[n, k]` (what `MatMulNBits` multiplies by).
pub fn dequantize(q: &BlockQuantized, n: usize, k: usize, bits: u32, block_size: usize) -> Vec<f32> {
    let mid = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for row in 0..n {
        for col in 0..k {
            let (b, i) = (col / block_size, col % block_size);
            let blob = &q.codes[(row * q.blocks + b) * q.blob..][..q.blob];
            let code = if bits == 8 {
                blob[i]
            } else {
                (blob[i / 2] >> (4 * (i % 2))) & 0xf
            };
            w[row * k + col] = (code as i32 - mid) as f32 * q.scales[row * q.blocks + b];
        }
    }
    w
}

/// `f(row, out_row)` for each `row_len`-long row of `out`, rows split evenly over the cores.
pub fn for_each_row<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len() / row_len.max(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let rows_per = n.div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        for (chunk, rows) in out.chunks_mut(rows_per * row_len).enumerate() {
            scope.spawn(move || {
                for (r, row) in rows.chunks_exact_mut(row_len).enumerate() {
                    f(chunk * rows_per + r, row);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantize_equals_quantize_then_dequantize_bit_for_bit() {
        // Odd k (a short last block), ties for the kept extreme, exact halves, tiny values
        // whose fp16 scales round, all-zero and one-signed blocks; more rows than threads.
        let (n, k) = (7usize, 45usize);
        let mut w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 64.0)
            .collect();
        w[..k].iter_mut().for_each(|v| *v /= 65536.0);
        w[k..2 * k].fill(0.0);
        w[2 * k..3 * k].iter_mut().for_each(|v| *v = v.abs());
        w[3 * k..4 * k].iter_mut().for_each(|v| *v = -v.abs());
        w[4 * k] = 0.75;
        w[4 * k + 1] = -0.75;
        for (bits, block) in [(4, 16), (4, 32), (8, 16), (8, 64)] {
            let blocks = k.div_ceil(block);
            let clip: Vec<f32> = (0..n * blocks).map(|i| 1.0 - (i % 11) as f32 / 20.0).collect();
            for st in [ScaleType::F32, ScaleType::F16] {
                for c in [None, Some(clip.as_slice())] {
                    let q = quantize_blockwise_clipped(&w, n, k, bits, block, st, c);
                    let want = dequantize(&q, n, k, bits, block);
                    let got = fake_quantize(&w, n, k, bits, block, st, c);
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "int{bits} block {block} {st:?} clipped {}", c.is_some());
                }
            }
        }
        // A clip factor of 1/2 halves the block's step: values beyond half the extreme clamp.
        let q = quantize_blockwise_clipped(&[-2.0, 0.0, 0.5, 1.9], 1, 4, 4, 4, ScaleType::F32, Some(&[0.5]));
        assert_eq!(q.scales, vec![0.125]);
        assert_eq!(dequantize(&q, 1, 4, 4, 4), vec![-1.0, 0.0, 0.5, 0.875]);
    }

    #[test]
    fn codes_scales_and_nibble_order_of_a_small_block() {
        // One output, one 4-wide block: largest magnitude -2 → scale 0.25, codes v/0.25 + 8.
        let q = quantize_blockwise(&[-2.0, 0.0, 0.5, 1.9], 1, 4, 4, 4, ScaleType::F32);
        assert_eq!(q.scales, vec![0.25]);
        // codes 0, 8, 10, 16 → clamped to 15; low nibble first.
        assert_eq!(q.codes, vec![0x80, 0xfa]);
        // The clamped code is the one lossy value here.
        assert_eq!(dequantize(&q, 1, 4, 4, 4), vec![-2.0, 0.0, 0.5, 1.75]);
    }

    /// `code_of` is `f32::round` (half away from zero) then clamped, on every float32 in
    /// [1, 16), around every half from -0.5 to 255.5 (64 neighbours each side), and on
    /// negatives, large values, infinities and NaN.
    #[test]
    fn codes_round_half_away_from_zero_like_roundf() {
        let want = |x: f32, top: f32| x.round().clamp(0.0, top) as u8;
        let mut xs: Vec<f32> = (1.0f32.to_bits()..16.0f32.to_bits())
            .map(f32::from_bits)
            .collect();
        for k in -1..=256 {
            let half = k as f32 + 0.5;
            for d in -64i32..=64 {
                xs.push(f32::from_bits((half.abs().to_bits() as i32 + d) as u32).copysign(half));
            }
        }
        xs.extend([
            0.0,
            -0.0,
            0.49999997,
            -3.0,
            -1e30,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        for top in [15.0, 255.0] {
            for &x in &xs {
                assert_eq!(
                    code_of(x, top),
                    want(x, top),
                    "{x:e} (bits {:#x}), top {top}",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn fp16_scales_are_rounded_before_the_codes_are_computed() {
        // -m / 128 with m = 1.001 is not an fp16 value; the codes come from the rounded scale.
        let w = [1.001f32, 0.3];
        let q = quantize_blockwise(&w, 1, 2, 8, 2, ScaleType::F16);
        let scale = half::f16::from_f32(-1.001f32 / 128.0).to_f32();
        assert_eq!(q.scales, vec![scale]);
        let code = |v: f32| (half::f16::from_f32(v).to_f32() * (1.0 / scale) + 128.0).round() as u8;
        assert_eq!(q.codes, vec![code(1.001), code(0.3)]);
    }

    #[test]
    fn a_short_last_block_is_padded_and_an_all_zero_block_has_scale_zero() {
        let w = [0.0, 0.0, 0.0, 0.0, 1.0, -0.5];
        let q = quantize_blockwise(&w, 1, 6, 8, 4, ScaleType::F32);
        assert_eq!(q.blocks, 2);
        assert_eq!(q.scales, vec![0.0, -1.0 / 128.0]);
        // Padding codes are the zero code (128), as ONNX Runtime's zero-padded weights give.
        assert_eq!(&q.codes[..4], &[128; 4]);
        assert_eq!(&q.codes[4..], &[0, 192, 128, 128]);
        assert_eq!(dequantize(&q, 1, 6, 8, 4), w.to_vec());
    }
}
