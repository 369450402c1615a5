//! The decode path's two passes over one (row, head)'s stored rows: the scores `q · kⱼ` and the
//! weighted sum `Σ pⱼ vⱼ`.
//!
//! One key at a time, each dot product's horizontal sum and the output row's store and reload
//! between keys made latency, not arithmetic, the cost: about 20 ns per key and head where the
//! multiply-adds need a few (`examples/attn_micro.rs`). Here four keys' dot products run side by
//! side and are summed together, and the output row stays in registers across all rows.

use super::CacheElement;
use crate::packed_linear::Isa;

/// Loads of stored values as float32 lanes (x86; nothing elsewhere).
#[cfg(target_arch = "x86_64")]
pub use x86::Widen;

/// Loads of stored values as float32 lanes (x86 only; nothing to provide elsewhere).
#[cfg(not(target_arch = "x86_64"))]
pub trait Widen {}
#[cfg(not(target_arch = "x86_64"))]
impl Widen for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Widen for half::f16 {}
#[cfg(not(target_arch = "x86_64"))]
impl Widen for i8 {}

/// `out[j] = q · row j` of `rows` (rows of [`CacheElement::row_len`]`(q.len())`, as many as
/// `out`).
pub(super) fn scores<E: CacheElement>(isa: Isa, q: &[f32], rows: &[E], out: &mut [f32]) {
    let rl = E::row_len(q.len());
    assert!(rows.len() >= out.len() * rl, "fewer rows than scores");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa` came from `Isa::detect`, so the CPU has these features; row count
        // checked above.
        Isa::Avx512 => return unsafe { x86::scores_avx512(q, rows, out) },
        Isa::Avx2 => return unsafe { x86::scores_avx2(q, rows, out) },
        Isa::Portable => {}
    }
    let _ = isa;
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(rl)) {
        *o = super::dot(q, &row[..q.len()]) * E::scale(row);
    }
}

/// `y += Σ p[j] · row j` over the rows of `rows` (as many as `p`) whose weight is not 0: such a
/// row is never read (an invisible slot may hold anything).
pub(super) fn mix<E: CacheElement>(isa: Isa, p: &[f32], rows: &[E], y: &mut [f32]) {
    let rl = E::row_len(y.len());
    assert!(rows.len() >= p.len() * rl, "fewer rows than weights");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: as in `scores`.
        Isa::Avx512 => return unsafe { x86::mix_avx512(p, rows, y) },
        Isa::Avx2 => return unsafe { x86::mix_avx2(p, rows, y) },
        Isa::Portable => {}
    }
    let _ = isa;
    for (&w, row) in p.iter().zip(rows.chunks_exact(rl)).filter(|(w, _)| **w != 0.0) {
        super::axpy(w * E::scale(row), &row[..y.len()], y);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::CacheElement;

    /// Loads of 16 (AVX-512) or 8 (AVX2) stored values as float32 lanes.
    pub trait Widen: Sized {
        /// # Safety
        /// AVX-512F; 16 values readable from `p`.
        unsafe fn w16(p: *const Self) -> __m512;
        /// # Safety
        /// AVX2 and F16C; 8 values readable from `p`.
        unsafe fn w8(p: *const Self) -> __m256;
    }

    impl Widen for f32 {
        #[inline(always)]
        unsafe fn w16(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn w8(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Widen for f16 {
        #[inline(always)]
        unsafe fn w16(p: *const f16) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        unsafe fn w8(p: *const f16) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    impl Widen for i8 {
        #[inline(always)]
        unsafe fn w16(p: *const i8) -> __m512 {
            unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn w8(p: *const i8) -> __m256 {
            unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
        }
    }

    /// One register of float32 lanes; every method needs the instruction set of its type.
    trait Vector: Copy {
        const LANES: usize;
        unsafe fn zero() -> Self;
        unsafe fn splat(x: f32) -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn widen<E: Widen>(p: *const E) -> Self;
        unsafe fn store(self, p: *mut f32);
        /// `a · b + c`.
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
        unsafe fn add(a: Self, b: Self) -> Self;
        /// The lane sums of four registers.
        unsafe fn sum4(v: [Self; 4]) -> [f32; 4];
    }

    /// Lane sums of four 8-lane registers: three horizontal adds leave each register's two
    /// half-sums in one register, whose halves add up to the four sums.
    #[inline(always)]
    unsafe fn sum4_256([a, b, c, d]: [__m256; 4]) -> [f32; 4] {
        unsafe {
            let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
            let sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), sums);
            out
        }
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn widen<E: Widen>(p: *const E) -> Self {
            unsafe { E::w16(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sum4(v: [Self; 4]) -> [f32; 4] {
            // Each register's halves added first (AVX-512F has no 32-bit 256-bit extract).
            unsafe {
                let half = |x: __m512| {
                    let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x));
                    _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(hi))
                };
                sum4_256([half(v[0]), half(v[1]), half(v[2]), half(v[3])])
            }
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn widen<E: Widen>(p: *const E) -> Self {
            unsafe { E::w8(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sum4(v: [Self; 4]) -> [f32; 4] {
            unsafe { sum4_256(v) }
        }
    }

    /// `$f` with `$hd` a constant where it is 64 (every preset's head dim), so that its loops
    /// over a row unroll.
    macro_rules! with_head_dim {
        ($hd:expr, |$d:ident| $f:expr) => {
            if $hd == 64 {
                let $d = 64;
                $f
            } else {
                let $d = $hd;
                $f
            }
        };
    }

    /// # Safety
    /// AVX-512F; `rows` holds `out.len()` rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_avx512<E: CacheElement>(q: &[f32], rows: &[E], out: &mut [f32]) {
        unsafe { with_head_dim!(q.len(), |hd| scores_on::<__m512, E>(q, rows, out, hd)) }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `rows` holds `out.len()` rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_avx2<E: CacheElement>(q: &[f32], rows: &[E], out: &mut [f32]) {
        unsafe { with_head_dim!(q.len(), |hd| scores_on::<__m256, E>(q, rows, out, hd)) }
    }

    /// # Safety
    /// AVX-512F; `rows` holds `p.len()` rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn mix_avx512<E: CacheElement>(p: &[f32], rows: &[E], y: &mut [f32]) {
        unsafe { with_head_dim!(y.len(), |hd| mix_on::<__m512, E>(p, rows, y, hd)) }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `rows` holds `p.len()` rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mix_avx2<E: CacheElement>(p: &[f32], rows: &[E], y: &mut [f32]) {
        unsafe { with_head_dim!(y.len(), |hd| mix_on::<__m256, E>(p, rows, y, hd)) }
    }

    /// `q · row` over the lanes `body..` past the last whole register.
    #[inline(always)]
    fn tail_dot<E: CacheElement>(q: &[f32], row: &[E], body: usize) -> f32 {
        q[body..]
            .iter()
            .zip(&row[body..q.len()])
            .map(|(a, b)| a * b.load())
            .sum()
    }

    /// [`super::scores`] on registers `V`: keys four at a time, each with its own accumulator.
    #[inline(always)]
    unsafe fn scores_on<V: Vector, E: CacheElement>(q: &[f32], rows: &[E], out: &mut [f32], hd: usize) {
        let l = V::LANES;
        let (rl, body) = (E::row_len(hd), hd / l * l);
        let qp = q.as_ptr();
        let n = out.len();
        let mut j = 0;
        while j < n {
            let keys = (n - j).min(4);
            // Fewer than four keys left: the last one again in the spare places, not stored.
            let row = |k: usize| &rows[(j + k.min(keys - 1)) * rl..][..rl];
            let r = [row(0), row(1), row(2), row(3)];
            let p = [r[0].as_ptr(), r[1].as_ptr(), r[2].as_ptr(), r[3].as_ptr()];
            // SAFETY (all loads below): c + l ≤ body ≤ hd = q's length ≤ each row's.
            let sums = unsafe {
                let mut acc = [V::zero(); 4];
                let mut c = 0;
                while c < body {
                    let qc = V::load(qp.add(c));
                    acc[0] = V::fma(qc, V::widen(p[0].add(c)), acc[0]);
                    acc[1] = V::fma(qc, V::widen(p[1].add(c)), acc[1]);
                    acc[2] = V::fma(qc, V::widen(p[2].add(c)), acc[2]);
                    acc[3] = V::fma(qc, V::widen(p[3].add(c)), acc[3]);
                    c += l;
                }
                V::sum4(acc)
            };
            for k in 0..keys {
                out[j + k] = (sums[k] + tail_dot(q, r[k], body)) * E::scale(r[k]);
            }
            j += keys;
        }
    }

    /// `acc + w ·` the four registers of values from `r`.
    ///
    /// # Safety
    /// As the intrinsics of `V`; `4 · V::LANES` values readable from `r`.
    #[inline(always)]
    unsafe fn add_row<V: Vector, E: CacheElement>(acc: [V; 4], w: f32, r: *const E) -> [V; 4] {
        unsafe {
            let w = V::splat(w);
            [
                V::fma(w, V::widen(r), acc[0]),
                V::fma(w, V::widen(r.add(V::LANES)), acc[1]),
                V::fma(w, V::widen(r.add(2 * V::LANES)), acc[2]),
                V::fma(w, V::widen(r.add(3 * V::LANES)), acc[3]),
            ]
        }
    }

    /// [`super::mix`] on registers `V`: the output in blocks of four registers, each block held
    /// in registers over every row, even and odd rows on separate accumulators so that one
    /// row's multiply-adds do not wait on the last one's.
    #[inline(always)]
    unsafe fn mix_on<V: Vector, E: CacheElement>(p: &[f32], rows: &[E], y: &mut [f32], hd: usize) {
        let l = V::LANES;
        let (rl, body) = (E::row_len(hd), hd / l * l);
        let blocks = hd / (4 * l) * (4 * l);
        let weight = |j: usize| p[j] * E::scale(&rows[j * rl..(j + 1) * rl]);
        let row = |j: usize| rows[j * rl..].as_ptr();
        let yp = y.as_mut_ptr();
        // SAFETY (all loads and stores below): c + 4l ≤ blocks, or c + l ≤ body, ≤ hd ≤ each
        // row's length and y's.
        unsafe {
            let mut c = 0;
            while c < blocks {
                let mut even = [
                    V::load(yp.add(c)),
                    V::load(yp.add(c + l)),
                    V::load(yp.add(c + 2 * l)),
                    V::load(yp.add(c + 3 * l)),
                ];
                let mut odd = [V::zero(); 4];
                let mut j = 0;
                while j < p.len() {
                    if p[j] != 0.0 {
                        even = add_row(even, weight(j), row(j).add(c));
                    }
                    if j + 1 < p.len() && p[j + 1] != 0.0 {
                        odd = add_row(odd, weight(j + 1), row(j + 1).add(c));
                    }
                    j += 2;
                }
                for k in 0..4 {
                    V::add(even[k], odd[k]).store(yp.add(c + k * l));
                }
                c += 4 * l;
            }
            while c < body {
                let mut acc = V::load(yp.add(c));
                for (j, &w) in p.iter().enumerate() {
                    if w != 0.0 {
                        acc = V::fma(V::splat(weight(j)), V::widen(row(j).add(c)), acc);
                    }
                }
                acc.store(yp.add(c));
                c += l;
            }
        }
        for (j, _) in p.iter().enumerate().filter(|&(_, &w)| w != 0.0) {
            let (w, r) = (weight(j), &rows[j * rl..(j + 1) * rl]);
            for (yi, v) in y[body..].iter_mut().zip(&r[body..hd]) {
                *yi += w * v.load();
            }
        }
    }
}
