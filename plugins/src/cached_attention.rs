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
//! streams each visible key and value once, four keys' dot products at a time and the output
//! row held in registers (`decode`); from there on (prefill) Q·Kᵀ and P·V run through the
//! `PackedLinear` GEMM on keys and values packed into panels, whose cost is paid once for many
//! queries.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::packed_linear::{self, Isa, pack_in_out, pack_out_in};

mod decode;

/// Element type of the key and value buffers.
pub trait CacheElement: Copy + Send + Sync + 'static + decode::Widen {
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
    /// One value as float32 (before the row's [`scale`](Self::scale)), inlined into the
    /// caller's loop (and its instruction set).
    fn load(self) -> f32;
    /// The factor every value of a stored row (`row_len` elements) is multiplied by.
    #[inline(always)]
    fn scale(_row: &[Self]) -> f32 {
        1.0
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
    // A power of two: exact, so it can wait until after a dot product's sum.
    #[inline(always)]
    fn scale(row: &[i8]) -> f32 {
        exp2i(row[row.len() - 1])
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
    /// `out[j] = q ·` slot `j` for the first `out.len()` slots.
    fn scores(&self, q: &[f32], out: &mut [f32]) {
        let (n, hd, rl) = (out.len(), self.hd, self.row);
        let (fresh_from, fresh_to) = (self.past.min(n), (self.past + self.new).min(n));
        decode::scores(
            self.isa,
            q,
            &self.stored[..fresh_from * rl],
            &mut out[..fresh_from],
        );
        for (j, o) in (fresh_from..fresh_to).zip(&mut out[fresh_from..fresh_to]) {
            let new = j - self.past;
            *o = dot(q, &self.fresh[new * hd..(new + 1) * hd]);
        }
        decode::scores(
            self.isa,
            q,
            &self.stored[fresh_to * rl..n * rl],
            &mut out[fresh_to..],
        );
    }

    /// `y += Σ p[j] ·` slot `j` over the first `p.len()` slots where `p[j]` is not 0.
    fn mix(&self, p: &[f32], y: &mut [f32]) {
        let (n, hd, rl) = (p.len(), self.hd, self.row);
        let (fresh_from, fresh_to) = (self.past.min(n), (self.past + self.new).min(n));
        decode::mix(self.isa, &p[..fresh_from], &self.stored[..fresh_from * rl], y);
        for (j, &w) in (fresh_from..fresh_to).zip(&p[fresh_from..fresh_to]) {
            if w != 0.0 {
                let new = j - self.past;
                axpy(w, &self.fresh[new * hd..(new + 1) * hd], y);
            }
        }
        decode::mix(self.isa, &p[fresh_to..], &self.stored[fresh_to * rl..n * rl], y);
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
        values.mix(&vec![1.0 / c as f32; c], yi);
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
    // Invisible slots are scored too (four keys go at a time) and masked by the softmax.
    let mut scores = vec![0f32; visible.len()];
    keys.scores(q, &mut scores);
    softmax_visible(&mut scores, visible);
    y.fill(0.0);
    values.mix(&scores, y);
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
        let isas = isas();
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

    /// The portable path and every instruction set this CPU has.
    fn isas() -> Vec<Isa> {
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
        isas
    }

    /// A decode step reads no slot its query does not see into its answer: slots before the
    /// left padding's end and past the last visible one holding NaN (float) or, in int8 rows,
    /// 127 · 2^127 (infinity once widened) give the answer they give holding zeros, bit for
    /// bit, on every instruction set, whole and partial register blocks, whole and partial
    /// groups of four keys.
    #[test]
    fn slots_out_of_sight_never_reach_a_decode_steps_answer() {
        out_of_sight::<f32>(|v| v, |_| f32::NAN);
        out_of_sight::<f16>(f16::from_f32, |_| f16::NAN);
        out_of_sight::<i8>(|v| (v * 63.0) as i8, |_| 127);
    }

    fn out_of_sight<E: CacheElement + Default + std::fmt::Debug>(
        element: impl Fn(f32) -> E,
        poison: impl Fn(usize) -> E,
    ) {
        let (c, pad, past) = (24, 5, 13);
        for hd in [64, 19] {
            let d = Dims {
                batch: 1,
                heads: 2,
                seq: 1,
                capacity: c,
                head_dim: hd,
            };
            let rl = E::row_len(hd);
            let new: Vec<f32> = (0..2 * hd).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
            let seen = |slot: usize| (pad..=past).contains(&slot);
            let past_rows = |unseen: &dyn Fn(usize) -> E| -> Vec<E> {
                (0..2 * c * rl)
                    .map(|i| match (seen(i / rl % c), i % rl) {
                        (false, _) => unseen(i),
                        // An int8 row's exponent.
                        (true, at) if at == hd => element(-0.1),
                        (true, _) => element(((i * 13 % 17) as f32 - 8.0) * 0.1),
                    })
                    .collect()
            };
            let visible: Vec<bool> = (0..c).map(seen).collect();
            for isa in isas() {
                let run = |past_kv: &[E]| {
                    cached_attention(
                        isa,
                        d,
                        &new,
                        &new,
                        &new,
                        past_kv,
                        past_kv,
                        &[past as i64],
                        &visible,
                    )
                    .unwrap()
                    .y
                };
                let (clean, poisoned) = (run(&past_rows(&|_| E::default())), run(&past_rows(&poison)));
                assert!(clean.iter().all(|y| y.is_finite()), "{isa:?}, head_dim {hd}");
                let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&poisoned), bits(&clean), "{isa:?}, head_dim {hd}");
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
