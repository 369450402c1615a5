//! `ai.kosmos::PackedLinear` on the CPU: the weight layout, and a GEMM for the few rows of a
//! decode step.
//!
//! Why it exists: at 2–16 rows a decode step streams every weight once, and ONNX Runtime's
//! MLAS SGEMM does not keep the memory system busy while it computes at 8 rows (it is about
//! 1.7x slower per step at 8 rows than at 1, where the weights alone would allow ~1.1x). This
//! kernel walks each 32-column panel once, contiguously, with all rows of the step held in
//! AVX-512 registers, so the FMAs overlap the stream.
//!
//! Layout: `W_packed[p, k, c] = W[k, 32p + c]` (zero where 32p + c ≥ N), so one panel is a
//! contiguous `K × 32` block read front to back.

/// Columns per panel (two AVX-512 registers of f32).
pub const PANEL: usize = 32;
/// Rows per register tile (8 rows × 2 registers = 16 accumulators of the 32).
const TILE_ROWS: usize = 8;
/// Depth of one pass over a panel. Each pass sums from zero and adds into the tile, so rounding
/// grows with 128 terms rather than K (8192 for fc2); its 16 KiB slice of the panel stays in L1
/// while every row tile of a long prefill uses it.
const DEPTH: usize = 128;
/// Panels per parallel task: enough work per task to amortise the dispatch, enough tasks to
/// balance two to sixteen threads on the smallest layer (N = 2048: 64 panels).
const PANELS_PER_TASK: usize = 4;

/// Number of panels for `n` output columns.
pub fn panels(n: usize) -> usize {
    n.div_ceil(PANEL)
}

/// Pack a torch `Linear` weight `w` [n (out), k (in)] into `[panels(n), k, PANEL]`.
pub fn pack_out_in(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
    let mut p = vec![0f32; panels(n) * k * PANEL];
    for col in 0..n {
        let (panel, c) = (col / PANEL, col % PANEL);
        let base = panel * k * PANEL + c;
        for (kk, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
            p[base + kk * PANEL] = v;
        }
    }
    p
}

/// Pack a weight `w` stored [k (in), n (out)] (the `x · W` layout) into `[panels(n), k, PANEL]`.
pub fn pack_in_out(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "weight is not [{k}, {n}]");
    let mut p = vec![0f32; panels(n) * k * PANEL];
    for (kk, row) in w.chunks_exact(n.max(1)).enumerate().take(k) {
        for (col, &v) in row.iter().enumerate() {
            p[(col / PANEL) * k * PANEL + kk * PANEL + col % PANEL] = v;
        }
    }
    p
}

/// Sizes of one call: `x` [m, k] · W [k, n] + bias [n] → `y` [m, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Dims {
    /// Check the buffers against these sizes; the error names what does not fit.
    pub fn check(&self, x: usize, w: usize, bias: usize, y: usize) -> Result<(), String> {
        let Dims { m, k, n } = *self;
        let want_w = panels(n) * k * PANEL;
        if x != m * k {
            return Err(format!("PackedLinear: X has {x} elements, expected {m} x {k}"));
        }
        if w != want_w {
            return Err(format!(
                "PackedLinear: W_packed has {w} elements, expected [{}, {k}, {PANEL}] for n = {n}",
                panels(n)
            ));
        }
        if bias != n {
            return Err(format!("PackedLinear: B has {bias} elements, expected n = {n}"));
        }
        if y != m * n {
            return Err(format!("PackedLinear: Y has {y} elements, expected {m} x {n}"));
        }
        Ok(())
    }

    /// Number of independent tasks [`run_task`] splits the call into.
    pub fn tasks(&self) -> usize {
        panels(self.n).div_ceil(PANELS_PER_TASK).max(1)
    }
}

/// The instruction set the tiles use, chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            // F16C too (every AVX2 CPU has it): `CachedAttention` converts float16 caches with it.
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// `y` for task `task` of [`Dims::tasks`] (a range of panels, all rows). Tasks write disjoint
/// columns of `y`, so they may run on different threads at once.
///
/// # Safety
/// `x`, `w`, `bias` and `y` must hold the element counts [`Dims::check`] accepts, and no two
/// concurrent calls may share a task index for the same `y`.
pub unsafe fn run_task(
    isa: Isa,
    d: Dims,
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    y: *mut f32,
    task: usize,
) {
    let np = panels(d.n);
    let first = task * PANELS_PER_TASK;
    let last = (first + PANELS_PER_TASK).min(np);
    for p in first..last {
        let col0 = p * PANEL;
        let cols = PANEL.min(d.n - col0);
        let wp = unsafe { w.add(p * d.k * PANEL) };
        let b = unsafe { std::slice::from_raw_parts(bias.add(col0), cols) };
        let mut r0 = 0;
        while r0 < d.m {
            let rows = TILE_ROWS.min(d.m - r0);
            let mut acc = [[0f32; PANEL]; TILE_ROWS];
            for row in acc.iter_mut().take(rows) {
                row[..cols].copy_from_slice(b);
            }
            let mut k0 = 0;
            while k0 < d.k {
                let depth = DEPTH.min(d.k - k0);
                unsafe {
                    tile(
                        isa,
                        rows,
                        x.add(r0 * d.k + k0),
                        d.k,
                        wp.add(k0 * PANEL),
                        depth,
                        &mut acc,
                    )
                };
                k0 += depth;
            }
            for (r, row) in acc.iter().enumerate().take(rows) {
                let dst = unsafe { y.add((r0 + r) * d.n + col0) };
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols) };
            }
            r0 += rows;
        }
    }
}

/// The whole product on the calling thread (tests, and callers without a thread pool).
pub fn packed_linear(
    isa: Isa,
    d: Dims,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    y: &mut [f32],
) -> Result<(), String> {
    d.check(x.len(), w.len(), bias.len(), y.len())?;
    for t in 0..d.tasks() {
        // SAFETY: sizes checked above; one thread.
        unsafe { run_task(isa, d, x.as_ptr(), w.as_ptr(), bias.as_ptr(), y.as_mut_ptr(), t) };
    }
    Ok(())
}

/// `acc[r] += x[r, 0..depth] · panel[0..depth]` for the first `rows` rows (summed from zero,
/// then added).
///
/// # Safety
/// `x` rows (stride `ldx`) hold `depth` values, `w` holds `depth × PANEL`.
unsafe fn tile(
    isa: Isa,
    rows: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    depth: usize,
    acc: &mut [[f32; PANEL]; TILE_ROWS],
) {
    macro_rules! by_rows {
        ($f:ident) => {
            match rows {
                1 => $f::<1>(x, ldx, w, depth, acc),
                2 => $f::<2>(x, ldx, w, depth, acc),
                3 => $f::<3>(x, ldx, w, depth, acc),
                4 => $f::<4>(x, ldx, w, depth, acc),
                5 => $f::<5>(x, ldx, w, depth, acc),
                6 => $f::<6>(x, ldx, w, depth, acc),
                7 => $f::<7>(x, ldx, w, depth, acc),
                _ => $f::<8>(x, ldx, w, depth, acc),
            }
        };
    }
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => by_rows!(tile_avx512),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => by_rows!(tile_avx2),
            _ => by_rows!(tile_generic),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    depth: usize,
    acc: &mut [[f32; PANEL]; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    unsafe {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for kk in 0..depth {
            let wk = w.add(kk * PANEL);
            // The panel is read once, front to back; ask for it 4 KiB ahead.
            _mm_prefetch::<_MM_HINT_T0>(wk.add(1024) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wk.add(1024 + 16) as *const i8);
            let w0 = _mm512_loadu_ps(wk);
            let w1 = _mm512_loadu_ps(wk.add(16));
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(r * ldx + kk));
                lo[r] = _mm512_fmadd_ps(xb, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(xb, w1, hi[r]);
            }
        }
        for r in 0..R {
            let (a0, a1) = (acc[r].as_mut_ptr(), acc[r].as_mut_ptr().add(16));
            _mm512_storeu_ps(a0, _mm512_add_ps(_mm512_loadu_ps(a0), lo[r]));
            _mm512_storeu_ps(a1, _mm512_add_ps(_mm512_loadu_ps(a1), hi[r]));
        }
    }
}

/// The portable tile compiled for AVX2 + FMA (the compiler vectorises its fixed-width loops).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    depth: usize,
    acc: &mut [[f32; PANEL]; TILE_ROWS],
) {
    unsafe { tile_generic::<R>(x, ldx, w, depth, acc) }
}

#[inline(always)]
unsafe fn tile_generic<const R: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    depth: usize,
    acc: &mut [[f32; PANEL]; TILE_ROWS],
) {
    let mut a = [[0f32; PANEL]; R];
    for kk in 0..depth {
        let wk = unsafe { &*(w.add(kk * PANEL) as *const [f32; PANEL]) };
        for (r, ar) in a.iter_mut().enumerate() {
            let xv = unsafe { *x.add(r * ldx + kk) };
            for c in 0..PANEL {
                ar[c] = xv.mul_add(wk[c], ar[c]);
            }
        }
    }
    for (dst, src) in acc.iter_mut().zip(&a) {
        for c in 0..PANEL {
            dst[c] += src[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w_out_in: &[f32], bias: &[f32], d: Dims) -> Vec<f32> {
        let mut y = vec![0f32; d.m * d.n];
        for r in 0..d.m {
            for c in 0..d.n {
                let s: f64 = (0..d.k)
                    .map(|kk| x[r * d.k + kk] as f64 * w_out_in[c * d.k + kk] as f64)
                    .sum();
                y[r * d.n + c] = (s + bias[c] as f64) as f32;
            }
        }
        y
    }

    #[test]
    fn every_isa_matches_a_float64_product_on_ragged_shapes() {
        let mut isas = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            isas.push(Isa::detect());
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx2);
        }
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 33), (8, 513, 64), (9, 1030, 70), (17, 64, 200)] {
            let d = Dims { m, k, n };
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 19) as f32 - 9.0) * 0.01).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.001).collect();
            let want = naive(&x, &w, &b, d);
            let packed = pack_out_in(&w, n, k);
            for &isa in &isas {
                let mut y = vec![f32::NAN; m * n];
                packed_linear(isa, d, &x, &packed, &b, &mut y).unwrap();
                let err = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{isa:?} {d:?}: max error {err}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_named() {
        let d = Dims { m: 2, k: 3, n: 4 };
        let e = d.check(6, 3 * 32, 4, 7).unwrap_err();
        assert!(e.contains("Y has 7"), "{e}");
        let e = d.check(6, 12, 4, 8).unwrap_err();
        assert!(e.contains("W_packed has 12"), "{e}");
    }
}
