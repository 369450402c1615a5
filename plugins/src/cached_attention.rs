//! `ai.kosmos::CachedAttention` on the CPU: the new tokens' attention over a fixed-capacity KV
//! buffer, reading each row's own keys only, with the new keys and values written in place.
//!
//! Why it exists: in standard ops (`ScatterND`, `MatMul` over the whole capacity, `Where`,
//! `Softmax`, `MatMul`) every row of a step reads the whole capacity of keys and values, however
//! short it is. With the full-size model, a batch-8 decode step of 101-token rows took 448 ms at
//! capacity 1600 against 275 ms at capacity 128, so one long request slowed every other one.
//! Here query i of row r stops at its last visible key.
//!
//! The buffers hold float32, float16 or int8 rows with a power-of-two scale ([`CacheElement`]):
//! a float16 cache halves the bytes a long sequence's steps read and the memory each row holds,
//! an int8 one quarters them. Past keys and values are widened to float32 as they are read; a
//! call's own new keys and values are used as given and rounded only where they are stored, so
//! the next call sees them rounded.
//!
//! Two paths, per (row, head): below [`GEMM_MIN_QUERIES`] queries (decode steps) a direct loop
//! streams each visible key and value once; from there on (prefill) Q·Kᵀ and P·V run through
//! the `PackedLinear` GEMM on keys and values packed into panels, whose cost is paid once for
//! many queries.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::packed_linear::{self, Isa, pack_in_out, pack_out_in};

/// Element type of the key and value buffers.
pub trait CacheElement: Copy + Send + Sync + 'static {
    /// Elements one slot's row of `head_dim` values takes in a buffer.
    fn row_len(head_dim: usize) -> usize {
        head_dim
    }
    /// `dst` (rows of `head_dim`) = `src` (rows of [`row_len`](Self::row_len)) as float32.
    fn widen(src: &[Self], head_dim: usize, dst: &mut [f32]);
    /// `dst` (rows of [`row_len`](Self::row_len)) = `src` (rows of `head_dim`) stored in this
    /// type, rounded to nearest even.
    fn narrow(src: &[f32], head_dim: usize, dst: &mut [Self]);
    /// `src` itself when it is float32 already, so a float32 cache is read in place.
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
    /// One value as float32, inlined into the caller's loop (and its instruction set): a
    /// decode step widens each key and value where it multiplies it.
    fn load(self) -> f32;
    /// `q · row` on `isa` (`row`: one stored row, [`row_len`](Self::row_len) elements).
    #[inline(always)]
    fn dot_row(_isa: Isa, q: &[f32], row: &[Self]) -> f32 {
        dot(q, row)
    }
    /// `y += a · row` on `isa`.
    #[inline(always)]
    fn axpy_row(_isa: Isa, a: f32, row: &[Self], y: &mut [f32]) {
        axpy(a, row, y)
    }
}

impl CacheElement for f32 {
    fn widen(src: &[f32], _: usize, dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], _: usize, dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
}

impl CacheElement for f16 {
    fn widen(src: &[f16], _: usize, dst: &mut [f32]) {
        // F16C where the CPU has it (the `half` crate detects it at run time).
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], _: usize, dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn load(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
    // x86 has the conversion as one instruction (a sixth of the bit trick's), which keeps a
    // decode step's attention memory-bound on a float16 cache.
    #[inline(always)]
    fn dot_row(isa: Isa, q: &[f32], row: &[f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if q.len() == row.len() {
            // SAFETY: `isa` came from `Isa::detect`, so the CPU has AVX-512F, or AVX2, FMA and
            // F16C; equal lengths.
            match isa {
                Isa::Avx512 => return unsafe { f16_x86::dot_avx512(q, row) },
                Isa::Avx2 => return unsafe { f16_x86::dot_avx2(q, row) },
                Isa::Portable => {}
            }
        }
        let _ = isa;
        dot(q, row)
    }
    #[inline(always)]
    fn axpy_row(isa: Isa, a: f32, row: &[f16], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if y.len() == row.len() {
            // SAFETY: as in `dot_row`.
            match isa {
                Isa::Avx512 => return unsafe { f16_x86::axpy_avx512(a, row, y) },
                Isa::Avx2 => return unsafe { f16_x86::axpy_avx2(a, row, y) },
                Isa::Portable => {}
            }
        }
        let _ = isa;
        axpy(a, row, y)
    }
}

/// int8 rows: `head_dim` values `v` and, last, the row's exponent `e`; the row holds `v · 2^e`
/// (crate docs: `CachedAttention`, C = int8).
impl CacheElement for i8 {
    fn row_len(head_dim: usize) -> usize {
        head_dim + 1
    }
    fn widen(src: &[i8], head_dim: usize, dst: &mut [f32]) {
        for (row, out) in src.chunks_exact(head_dim + 1).zip(dst.chunks_exact_mut(head_dim)) {
            let scale = exp2i(row[head_dim]);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = f32::from(v) * scale;
            }
        }
    }
    fn narrow(src: &[f32], head_dim: usize, dst: &mut [i8]) {
        for (x, row) in src.chunks_exact(head_dim).zip(dst.chunks_exact_mut(head_dim + 1)) {
            quantize_int8_row(x, row);
        }
    }
    fn as_f32(_: &[i8]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from(self)
    }
    // Scaling by a power of two is exact, so it can wait until after the sum. x86 widens 16
    // (or 8) int8s to float32 in two instructions, which keeps a decode step's attention
    // memory-bound on an int8 cache.
    #[inline(always)]
    fn dot_row(isa: Isa, q: &[f32], row: &[i8]) -> f32 {
        let hd = row.len() - 1;
        let (values, scale) = (&row[..hd], exp2i(row[hd]));
        #[cfg(target_arch = "x86_64")]
        if q.len() == hd {
            // SAFETY: `isa` came from `Isa::detect`, so the CPU has AVX-512F, or AVX2 and FMA;
            // equal lengths.
            match isa {
                Isa::Avx512 => return unsafe { i8_x86::dot_avx512(q, values) } * scale,
                Isa::Avx2 => return unsafe { i8_x86::dot_avx2(q, values) } * scale,
                Isa::Portable => {}
            }
        }
        let _ = isa;
        dot(q, values) * scale
    }
    #[inline(always)]
    fn axpy_row(isa: Isa, a: f32, row: &[i8], y: &mut [f32]) {
        let hd = row.len() - 1;
        let (values, a) = (&row[..hd], a * exp2i(row[hd]));
        #[cfg(target_arch = "x86_64")]
        if y.len() == hd {
            // SAFETY: as in `dot_row`.
            match isa {
                Isa::Avx512 => return unsafe { i8_x86::axpy_avx512(a, values, y) },
                Isa::Avx2 => return unsafe { i8_x86::axpy_avx2(a, values, y) },
                Isa::Portable => {}
            }
        }
        let _ = isa;
        axpy(a, values, y)
    }
}

/// int8 rows against float32 ones: `vpmovsxbd` and `vcvtdq2ps` (AVX-512, or AVX2).
#[cfg(target_arch = "x86_64")]
mod i8_x86 {
    use std::arch::x86_64::*;

    /// `q · row`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` and `row` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(q: &[f32], row: &[i8]) -> f32 {
        let n = q.len() / 16 * 16;
        let (qp, rp) = (q.as_ptr(), row.as_ptr());
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; unaligned loads.
            unsafe {
                let k = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(rp.add(i).cast())));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(i)), k, acc);
            }
        }
        let tail: f32 = q[n..].iter().zip(&row[n..]).map(|(x, &v)| x * f32::from(v)).sum();
        _mm512_reduce_add_ps(acc) + tail
    }

    /// `y += a · row`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `row` and `y` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(a: f32, row: &[i8], y: &mut [f32]) {
        let n = y.len() / 16 * 16;
        let (yp, rp) = (y.as_mut_ptr(), row.as_ptr());
        let av = _mm512_set1_ps(a);
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(rp.add(i).cast())));
                _mm512_storeu_ps(yp.add(i), _mm512_fmadd_ps(av, x, _mm512_loadu_ps(yp.add(i))));
            }
        }
        for (yi, &v) in y[n..].iter_mut().zip(&row[n..]) {
            *yi += a * f32::from(v);
        }
    }

    /// `q · row`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q` and `row` have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(q: &[f32], row: &[i8]) -> f32 {
        let n = q.len() / 8 * 8;
        let (qp, rp) = (q.as_ptr(), row.as_ptr());
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned 8-byte loads.
            unsafe {
                let k = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(rp.add(i).cast())));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), k, acc);
            }
        }
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let sum = _mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs));
        let tail: f32 = q[n..].iter().zip(&row[n..]).map(|(x, &v)| x * f32::from(v)).sum();
        _mm_cvtss_f32(sum) + tail
    }

    /// `y += a · row`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `row` and `y` have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(a: f32, row: &[i8], y: &mut [f32]) {
        let n = y.len() / 8 * 8;
        let (yp, rp) = (y.as_mut_ptr(), row.as_ptr());
        let av = _mm256_set1_ps(a);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(rp.add(i).cast())));
                _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(av, x, _mm256_loadu_ps(yp.add(i))));
            }
        }
        for (yi, &v) in y[n..].iter_mut().zip(&row[n..]) {
            *yi += a * f32::from(v);
        }
    }
}

/// The least exponent an int8 row takes (rows of zeros, or tiny values, get it).
pub const INT8_EXPONENT_MIN: i8 = -100;

/// 2^`e` for `e` in [`INT8_EXPONENT_MIN`], 127.
#[inline(always)]
pub fn exp2i(e: i8) -> f32 {
    f32::from_bits(((i32::from(e) + 127) as u32) << 23)
}

/// `x` (head_dim values) as an int8 row (`head_dim + 1`): the exponent `e` is the least in
/// [`INT8_EXPONENT_MIN`], 127 with max|x| ≤ 127 · 2^e, and each value is x / 2^e rounded to
/// nearest even.
pub fn quantize_int8_row(x: &[f32], row: &mut [i8]) {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut e = i32::from(INT8_EXPONENT_MIN);
    // A first guess from the logarithm, then exact comparisons (127 · 2^e is exact in float32).
    if absmax > 127.0 * exp2i(INT8_EXPONENT_MIN) {
        e = ((absmax / 127.0).log2().ceil() as i32).clamp(e, 127);
        while e < 127 && absmax > 127.0 * exp2i(e as i8) {
            e += 1;
        }
        while e > i32::from(INT8_EXPONENT_MIN) && absmax <= 127.0 * exp2i((e - 1) as i8) {
            e -= 1;
        }
    }
    // Division by a power of two is exact (2^-e may not be a normal float32; 2^e is).
    let scale = exp2i(e as i8);
    let (values, exponent) = row.split_at_mut(x.len());
    for (v, &xi) in values.iter_mut().zip(x) {
        *v = (xi / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    exponent[0] = e as i8;
}

/// Rows of `head_dim + 1` int8s (values, then the exponent) as float32 rows of `head_dim`.
pub fn dequantize_int8_rows(rows: &[i8], head_dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len() / (head_dim + 1) * head_dim];
    i8::widen(rows, head_dim, &mut out);
    out
}

/// float16 rows against float32 ones with `vcvtph2ps` (AVX-512, or F16C beside AVX2).
#[cfg(target_arch = "x86_64")]
mod f16_x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// `q · row`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` and `row` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(q: &[f32], row: &[f16]) -> f32 {
        let n = q.len() / 16 * 16;
        let (qp, rp) = (q.as_ptr(), row.as_ptr().cast::<__m256i>());
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; unaligned loads.
            unsafe {
                let k = _mm512_cvtph_ps(_mm256_loadu_si256(rp.add(i / 16)));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(i)), k, acc);
            }
        }
        let tail: f32 = q[n..].iter().zip(&row[n..]).map(|(x, h)| x * h.to_f32()).sum();
        _mm512_reduce_add_ps(acc) + tail
    }

    /// `y += a · row`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `row` and `y` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(a: f32, row: &[f16], y: &mut [f32]) {
        let n = y.len() / 16 * 16;
        let (yp, rp) = (y.as_mut_ptr(), row.as_ptr().cast::<__m256i>());
        let av = _mm512_set1_ps(a);
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(rp.add(i / 16)));
                _mm512_storeu_ps(yp.add(i), _mm512_fmadd_ps(av, x, _mm512_loadu_ps(yp.add(i))));
            }
        }
        for (yi, h) in y[n..].iter_mut().zip(&row[n..]) {
            *yi += a * h.to_f32();
        }
    }

    /// `q · row`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q` and `row` have equal lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(q: &[f32], row: &[f16]) -> f32 {
        let n = q.len() / 8 * 8;
        let (qp, rp) = (q.as_ptr(), row.as_ptr().cast::<__m128i>());
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads.
            unsafe {
                let k = _mm256_cvtph_ps(_mm_loadu_si128(rp.add(i / 8)));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), k, acc);
            }
        }
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let sum = _mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs));
        let tail: f32 = q[n..].iter().zip(&row[n..]).map(|(x, h)| x * h.to_f32()).sum();
        _mm_cvtss_f32(sum) + tail
    }

    /// `y += a · row`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` and `y` have equal lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_avx2(a: f32, row: &[f16], y: &mut [f32]) {
        let n = y.len() / 8 * 8;
        let (yp, rp) = (y.as_mut_ptr(), row.as_ptr().cast::<__m128i>());
        let av = _mm256_set1_ps(a);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(rp.add(i / 8)));
                _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(av, x, _mm256_loadu_ps(yp.add(i))));
            }
        }
        for (yi, h) in y[n..].iter_mut().zip(&row[n..]) {
            *yi += a * h.to_f32();
        }
    }
}

/// float16 bits to float32, exactly, without branches (so a loop of it vectorises): the
/// exponent and mantissa moved into float32's places and scaled by 2^112 (which also
/// normalises subnormals), infinities and NaNs given float32's all-ones exponent.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let magnitude = (h & 0x7fff) << 13;
    let scaled = (f32::from_bits(magnitude) * f32::from_bits(0x7780_0000)).to_bits();
    let special = if magnitude >= 0x0f80_0000 { 0x7f80_0000 } else { 0 };
    f32::from_bits(scaled | special | (h & 0x8000) << 16)
}

/// One (row, head)'s keys or values: slot j is `stored` row j widened, except the call's own
/// slots `past ..`, which are `fresh` (its K or V) as given.
#[derive(Clone, Copy)]
struct Slots<'a, E> {
    isa: Isa,
    stored: &'a [E],
    fresh: &'a [f32],
    past: usize,
    /// Rows of `fresh` (kept, not divided out per slot: a division costs more than the dot).
    new: usize,
    hd: usize,
    /// Elements per row of `stored` ([`CacheElement::row_len`]).
    row: usize,
}

impl<'a, E: CacheElement> Slots<'a, E> {
    /// `q` · slot `j`.
    #[inline(always)]
    fn dot(&self, q: &[f32], j: usize) -> f32 {
        let hd = self.hd;
        let new = j.wrapping_sub(self.past);
        if new < self.new {
            dot(q, &self.fresh[new * hd..(new + 1) * hd])
        } else {
            E::dot_row(self.isa, q, &self.stored[j * self.row..(j + 1) * self.row])
        }
    }

    /// `y += a ·` slot `j`.
    #[inline(always)]
    fn axpy(&self, a: f32, j: usize, y: &mut [f32]) {
        let hd = self.hd;
        let new = j.wrapping_sub(self.past);
        if new < self.new {
            axpy(a, &self.fresh[new * hd..(new + 1) * hd], y)
        } else {
            E::axpy_row(self.isa, a, &self.stored[j * self.row..(j + 1) * self.row], y)
        }
    }

    /// Slots `0..n` as one float32 array, in `out` when they must be widened.
    fn contiguous<'b>(&self, n: usize, out: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        let hd = self.hd;
        if let Some(all) = E::as_f32(&self.stored[..n * hd]) {
            // A float32 buffer already holds the call's own rows, exactly.
            return all;
        }
        out.resize(n * hd, 0.0);
        E::widen(&self.stored[..n * self.row], hd, out);
        let end = (self.past + self.new).min(n);
        if end > self.past {
            out[self.past * hd..end * hd].copy_from_slice(&self.fresh[..(end - self.past) * hd]);
        }
        out
    }
}

thread_local! {
    /// Float32 keys and values of a float16 cache's (row, head) for the GEMM path, reused by
    /// every task a thread runs (a fresh allocation per task would fault in new pages each time).
    static WIDENED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Queries per (row, head) from which the GEMM path is used.
pub const GEMM_MIN_QUERIES: usize = 8;

/// Sizes of one call: Q, K, V [batch, heads, seq, head_dim]; caches [batch, heads, capacity,
/// head_dim]; `past_sequence_length` [batch]; `visible` [batch, 1, seq, capacity].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Independent tasks of a call: one per (row, head).
    pub fn tasks(&self) -> usize {
        self.batch * self.heads
    }

    fn new_elements(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    fn cache_elements<E: CacheElement>(&self) -> usize {
        self.batch * self.heads * self.capacity * E::row_len(self.head_dim)
    }

    /// Check element counts of buffers of `E` and past lengths (each row's new tokens must fit
    /// in the capacity); the error names what does not fit.
    pub fn check<E: CacheElement>(&self, counts: &Counts, past_len: &[i64]) -> Result<(), String> {
        if self.head_dim == 0 {
            return Err("CachedAttention: head_dim is 0".into());
        }
        let (new, cache) = (self.new_elements(), self.cache_elements::<E>());
        for (name, got, want) in [
            ("Q", counts.q, new),
            ("K", counts.k, new),
            ("V", counts.v, new),
            ("past_key", counts.past_key, cache),
            ("past_value", counts.past_value, cache),
            ("visible", counts.visible, self.batch * self.seq * self.capacity),
            ("Y", counts.y, new),
            ("present_key", counts.present_key, cache),
            ("present_value", counts.present_value, cache),
        ] {
            if got != want {
                return Err(format!(
                    "CachedAttention: {name} has {got} elements, expected {want} for {self:?}"
                ));
            }
        }
        if past_len.len() != self.batch {
            return Err(format!(
                "CachedAttention: past_sequence_length has {} elements, expected batch {}",
                past_len.len(),
                self.batch
            ));
        }
        if let Some((r, &p)) = past_len
            .iter()
            .enumerate()
            .find(|&(_, &p)| p < 0 || p as usize + self.seq > self.capacity)
        {
            return Err(format!(
                "CachedAttention: row {r} has past_sequence_length {p}; with {} new tokens it must \
                 lie in 0..={} (capacity {})",
                self.seq,
                self.capacity.saturating_sub(self.seq),
                self.capacity
            ));
        }
        Ok(())
    }
}

/// Element counts of a call's buffers, for [`Dims::check`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub past_key: usize,
    pub past_value: usize,
    pub visible: usize,
    pub y: usize,
    pub present_key: usize,
    pub present_value: usize,
}

/// The buffers of one call, the caches of element type `E`. `present_*` either are `past_*` (the
/// runtime binds one buffer as both, and only the new slots are written) or do not overlap them
/// (the past is copied first).
#[derive(Debug)]
pub struct Buffers<E> {
    pub q: *const f32,
    pub k: *const f32,
    pub v: *const f32,
    pub past_key: *const E,
    pub past_value: *const E,
    pub past_len: *const i64,
    pub visible: *const bool,
    pub y: *mut f32,
    pub present_key: *mut E,
    pub present_value: *mut E,
}

impl<E> Clone for Buffers<E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Buffers<E> {}

// SAFETY: the tasks of one call touch disjoint (row, head) blocks of every output.
unsafe impl<E> Send for Buffers<E> {}
unsafe impl<E> Sync for Buffers<E> {}

/// Task `task` of [`Dims::tasks`]: row `task / heads`, head `task % heads`.
///
/// # Safety
/// The buffers hold what [`Dims::check`] accepted (past lengths included), with the aliasing
/// [`Buffers`] describes, and no two concurrent calls share a task index for the same outputs.
pub unsafe fn run_task<E: CacheElement>(isa: Isa, d: Dims, buf: Buffers<E>, task: usize) {
    let Dims {
        heads,
        seq: s,
        capacity: c,
        head_dim: hd,
        ..
    } = d;
    let (row, rl) = (task / heads, E::row_len(hd));
    let (cache_at, new_at) = (task * c * rl, task * s * hd);
    unsafe {
        let past = *buf.past_len.add(row) as usize;
        for (old, present, fresh) in [
            (buf.past_key, buf.present_key, buf.k),
            (buf.past_value, buf.present_value, buf.v),
        ] {
            if old != present.cast_const() {
                std::ptr::copy_nonoverlapping(old.add(cache_at), present.add(cache_at), c * rl);
            }
            E::narrow(
                std::slice::from_raw_parts(fresh.add(new_at), s * hd),
                hd,
                std::slice::from_raw_parts_mut(present.add(cache_at + past * rl), s * rl),
            );
        }
        if s == 0 {
            return;
        }
        let keys = std::slice::from_raw_parts(buf.present_key.add(cache_at), c * rl);
        let values = std::slice::from_raw_parts(buf.present_value.add(cache_at), c * rl);
        let q = std::slice::from_raw_parts(buf.q.add(new_at), s * hd);
        let y = std::slice::from_raw_parts_mut(buf.y.add(new_at), s * hd);
        let visible = std::slice::from_raw_parts(buf.visible.add(row * s * c), s * c);
        let slots = |stored, fresh| Slots {
            isa,
            stored,
            fresh,
            past,
            new: s,
            hd,
            row: rl,
        };
        let keys = slots(keys, std::slice::from_raw_parts(buf.k.add(new_at), s * hd));
        let values = slots(values, std::slice::from_raw_parts(buf.v.add(new_at), s * hd));
        attend(isa, (s, c, hd), q, keys, values, visible, y);
    }
}

/// For each query of `visible` [s, c], one past its last visible key (0 when it sees none):
/// keys from there on are never read.
fn visible_lengths(visible: &[bool], c: usize) -> Vec<usize> {
    visible
        .chunks_exact(c)
        .map(|v| v.iter().rposition(|&x| x).map_or(0, |j| j + 1))
        .collect()
}

/// Run `$f(args)` compiled for the instruction set `isa` (the compiler vectorises the
/// fixed-width loops inside).
macro_rules! dispatch {
    ($isa:expr, $f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn on_avx512(f: impl FnOnce()) { f() }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn on_avx2(f: impl FnOnce()) { f() }
            // SAFETY: `isa` came from `Isa::detect`, so the CPU has these features.
            match $isa {
                Isa::Avx512 => unsafe { on_avx512(|| $f($($arg),*)) },
                Isa::Avx2 => unsafe { on_avx2(|| $f($($arg),*)) },
                Isa::Portable => $f($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            $f($($arg),*)
        }
    }};
}

/// One (row, head): `y` [s, hd] from `q` [s, hd] over the `keys` and `values` of the c slots
/// where `visible` [s, c] allows (s, c, hd > 0).
fn attend<E: CacheElement>(
    isa: Isa,
    (s, c, hd): (usize, usize, usize),
    q: &[f32],
    keys: Slots<'_, E>,
    values: Slots<'_, E>,
    visible: &[bool],
    y: &mut [f32],
) {
    let lens = visible_lengths(visible, c);
    let span = lens.iter().copied().max().unwrap_or(0);
    if s < GEMM_MIN_QUERIES {
        for i in 0..s {
            let vis = &visible[i * c..i * c + lens[i]];
            let yi = &mut y[i * hd..(i + 1) * hd];
            dispatch!(isa, direct(&q[i * hd..(i + 1) * hd], keys, values, vis, yi));
        }
    } else if span > 0 {
        WIDENED.with_borrow_mut(|(kw, vw)| {
            let (keys, values) = (keys.contiguous(span, kw), values.contiguous(span, vw));
            prefill(isa, (s, c, hd, span), q, keys, values, visible, y);
        });
    }
    // A query that sees no key (a left-padding position) gets softmax's answer over a row of
    // equal scores: the mean of every value in the capacity.
    for (i, _) in lens.iter().enumerate().filter(|&(_, &n)| n == 0) {
        let yi = &mut y[i * hd..(i + 1) * hd];
        yi.fill(0.0);
        let w = 1.0 / c as f32;
        for j in 0..c {
            values.axpy(w, j, yi);
        }
    }
}

/// The GEMM path of [`attend`]: every query over the first `span` slots, float32 [span, hd].
fn prefill(
    isa: Isa,
    (s, c, hd, span): (usize, usize, usize, usize),
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    visible: &[bool],
    y: &mut [f32],
) {
    let mut scores = vec![0f32; s * span];
    gemm(
        isa,
        s,
        hd,
        span,
        q,
        &pack_out_in(&keys[..span * hd], span, hd),
        &mut scores,
    );
    for (row, vis) in scores.chunks_exact_mut(span).zip(visible.chunks_exact(c)) {
        dispatch!(isa, softmax_visible(row, &vis[..span]));
    }
    gemm(
        isa,
        s,
        span,
        hd,
        &scores,
        &pack_in_out(&values[..span * hd], span, hd),
        y,
    );
}

/// `y` [m, n] = `x` [m, k] · W with W packed [panels(n), k, 32], on this thread.
fn gemm(isa: Isa, m: usize, k: usize, n: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    let d = packed_linear::Dims { m, k, n };
    let bias = vec![0f32; n];
    for t in 0..d.tasks() {
        // SAFETY: x is [m, k], w is packed for (k, n) and y is [m, n], as formed by the caller.
        unsafe { packed_linear::run_task(isa, d, x.as_ptr(), w.as_ptr(), bias.as_ptr(), y.as_mut_ptr(), t) };
    }
}

/// One query over the visible keys among the first `visible.len()`.
#[inline(always)]
fn direct<E: CacheElement>(
    q: &[f32],
    keys: Slots<'_, E>,
    values: Slots<'_, E>,
    visible: &[bool],
    y: &mut [f32],
) {
    let mut scores = vec![0f32; visible.len()];
    for (j, (sc, _)) in scores
        .iter_mut()
        .zip(visible)
        .enumerate()
        .filter(|(_, (_, v))| **v)
    {
        *sc = keys.dot(q, j);
    }
    softmax_visible(&mut scores, visible);
    y.fill(0.0);
    for (j, &p) in scores.iter().enumerate().filter(|&(_, &p)| p != 0.0) {
        values.axpy(p, j, y);
    }
}

/// Softmax over the visible entries of `row`; the others become 0 (all 0 when none is visible).
#[inline(always)]
fn softmax_visible(row: &mut [f32], visible: &[bool]) {
    // Each pass is a plain or lane-wise loop, so it vectorises: a running scalar max or sum
    // would keep the whole pass, exp included, scalar (most of a decode step's attention).
    for (x, &v) in row.iter_mut().zip(visible) {
        if !v {
            *x = f32::NEG_INFINITY;
        }
    }
    let max = lanes(row, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for (x, &v) in row.iter_mut().zip(visible) {
        *x = if v { exp(*x - max) } else { 0.0 };
    }
    let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `row` folded by `f` (associative) in [`LANES`] interleaved lanes, then across them.
#[inline(always)]
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = f(acc[l], c[l]);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &x| f(a, x))
}

const LANES: usize = 16;

#[inline(always)]
fn dot<E: CacheElement>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (ca, cb) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l].load();
        }
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y.load()).sum();
    // Halves added pairwise: vector adds, not a chain of 16 scalar ones (whose latency was most
    // of a decode step's attention).
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `y += a · x`.
#[inline(always)]
fn axpy<E: CacheElement>(a: f32, x: &[E], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi.load();
    }
}

/// e^x for x ≤ 0 without branches, so a loop of it vectorises (Cephes `expf`: range reduction
/// by ln 2, degree-5 polynomial; within 2 ulp of `f32::exp` down to −87, then
/// 1.2e-38 below that, where `exp` gives subnormals or 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * z + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The outputs of [`cached_attention`].
#[derive(Clone, Debug, PartialEq)]
pub struct Attended<E> {
    pub y: Vec<f32>,
    pub present_key: Vec<E>,
    pub present_value: Vec<E>,
}

/// The whole call on the calling thread, with separate past and present buffers (tests, and
/// callers without a thread pool).
#[allow(clippy::too_many_arguments)]
pub fn cached_attention<E: CacheElement + Default>(
    isa: Isa,
    d: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    past_key: &[E],
    past_value: &[E],
    past_len: &[i64],
    visible: &[bool],
) -> Result<Attended<E>, String> {
    let (mut y, mut pk, mut pv) = (
        vec![0f32; q.len()],
        vec![E::default(); past_key.len()],
        vec![E::default(); past_value.len()],
    );
    let counts = Counts {
        q: q.len(),
        k: k.len(),
        v: v.len(),
        past_key: past_key.len(),
        past_value: past_value.len(),
        visible: visible.len(),
        y: y.len(),
        present_key: pk.len(),
        present_value: pv.len(),
    };
    d.check::<E>(&counts, past_len)?;
    let buf = Buffers {
        q: q.as_ptr(),
        k: k.as_ptr(),
        v: v.as_ptr(),
        past_key: past_key.as_ptr(),
        past_value: past_value.as_ptr(),
        past_len: past_len.as_ptr(),
        visible: visible.as_ptr(),
        y: y.as_mut_ptr(),
        present_key: pk.as_mut_ptr(),
        present_value: pv.as_mut_ptr(),
    };
    for t in 0..d.tasks() {
        // SAFETY: sizes and past lengths checked above; separate buffers; one thread.
        unsafe { run_task(isa, d, buf, t) };
    }
    Ok(Attended {
        y,
        present_key: pk,
        present_value: pv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, std {want}"
            );
            x += 0.0137;
        }
        assert!(exp(-1e4) < 1.3e-38 && exp(f32::NEG_INFINITY) < 1.3e-38);
    }

    /// Every instruction set this CPU has gives the portable path's answer on float16 and int8
    /// buffers (AVX-512 and AVX2 convert float16 with `vcvtph2ps`, the portable path with
    /// `f16_to_f32`), head dims with and without a tail past the 8- and 16-lane blocks.
    #[test]
    fn narrow_buffers_give_the_same_answer_on_every_instruction_set() {
        every_isa_agrees::<f16>(f16::from_f32);
        every_isa_agrees::<i8>(|v| (v * 63.0) as i8);
    }

    /// Past buffers of `E` from values in [-2, 2) through `element` (int8 rows get a random
    /// exponent in their last place).
    fn every_isa_agrees<E: CacheElement + Default + PartialEq + std::fmt::Debug>(element: impl Fn(f32) -> E) {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                isas.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut value = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        for (hd, s) in [(64, 1), (67, 3), (16, 2), (5, 1)] {
            let d = Dims {
                batch: 2,
                heads: 3,
                seq: s,
                capacity: 40,
                head_dim: hd,
            };
            let new: Vec<Vec<f32>> = (0..3)
                .map(|_| (0..2 * 3 * s * hd).map(|_| value()).collect())
                .collect();
            let rl = E::row_len(hd);
            let past: Vec<Vec<E>> = (0..2)
                .map(|_| {
                    (0..2 * 3 * 40 * rl)
                        .map(|i| {
                            if rl > hd && i % rl == hd {
                                element(value() * 0.1)
                            } else {
                                element(value())
                            }
                        })
                        .collect()
                })
                .collect();
            let past_len = [7, 40 - s as i64];
            let visible: Vec<bool> = (0..2 * s * 40).map(|i| i % 40 <= 36 || i % 3 == 0).collect();
            let run = |isa| {
                cached_attention(
                    isa, d, &new[0], &new[1], &new[2], &past[0], &past[1], &past_len, &visible,
                )
                .unwrap()
            };
            let want = run(Isa::Portable);
            for &isa in &isas[1..] {
                let got = run(isa);
                let diff = got
                    .y
                    .iter()
                    .zip(&want.y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff <= 1e-5, "{isa:?}, head_dim {hd}: {diff:e}");
                assert_eq!(got.present_key, want.present_key, "{isa:?}");
                assert_eq!(got.present_value, want.present_value, "{isa:?}");
            }
        }
    }

    /// The int8 row format's rules, on values chosen to hit each: the least exponent that
    /// holds the largest value (exactly at 127 · 2^e, and just above it), ties to even, zeros.
    #[test]
    fn int8_rows_take_the_least_exponent_and_round_ties_to_even() {
        let row = |x: &[f32]| {
            let mut r = vec![0i8; x.len() + 1];
            quantize_int8_row(x, &mut r);
            r
        };
        // max 127 = 127 · 2^0; 2.5 and 3.5 are ties (to 2 and 4), -0.5 to 0.
        assert_eq!(row(&[127.0, 2.5, 3.5, -0.5]), [127, 2, 4, 0, 0]);
        // Just above 127 needs e = 1: 127.5 / 2 = 63.75 → 64; 1.0 / 2 = 0.5 → 0.
        assert_eq!(row(&[127.5, 1.0, -3.0, 0.0]), [64, 0, -2, 0, 1]);
        // 127 · 2^-3 exactly: e = -3.
        assert_eq!(row(&[-15.875, 0.125]), [-127, 1, -3]);
        assert_eq!(row(&[0.0, 0.0]), [0, 0, INT8_EXPONENT_MIN]);
        assert_eq!(row(&[1e-35, 0.0]), [0, 0, INT8_EXPONENT_MIN]);
        let big = row(&[3.0e38, -1.0e38]);
        assert_eq!(big[2], 121, "{big:?}");
        // Dequantised values are within half a step of the input.
        let x: Vec<f32> = (0..67).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0123).collect();
        let r = row(&x);
        let step = exp2i(r[67]);
        for (a, b) in x.iter().zip(dequantize_int8_rows(&r, 67)) {
            assert!((a - b).abs() <= step / 2.0, "{a} vs {b}, step {step}");
        }
    }

    #[test]
    fn f16_to_f32_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let (got, want) = (f16_to_f32(bits), f16::from_bits(bits).to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got:e} ({:#010x}), half {want:e} ({:#010x})",
                got.to_bits(),
                want.to_bits()
            );
        }
    }

    #[test]
    fn past_lengths_that_overflow_the_capacity_are_named() {
        let d = Dims {
            batch: 2,
            heads: 1,
            seq: 3,
            capacity: 4,
            head_dim: 2,
        };
        let (n, c) = (12, 16);
        let err = cached_attention::<f32>(
            Isa::Portable,
            d,
            &vec![0.0; n],
            &vec![0.0; n],
            &vec![0.0; n],
            &vec![0.0; c],
            &vec![0.0; c],
            &[1, 2],
            &[true; 24],
        )
        .unwrap_err();
        assert!(
            err.contains("row 1 has past_sequence_length 2") && err.contains("0..=1"),
            "{err}"
        );
        let err = cached_attention::<f32>(
            Isa::Portable,
            d,
            &vec![0.0; n],
            &vec![0.0; n - 1],
            &vec![0.0; n],
            &vec![0.0; c],
            &vec![0.0; c],
            &[0, 0],
            &[true; 24],
        )
        .unwrap_err();
        assert!(err.contains("K has 11 elements"), "{err}");
    }
}
