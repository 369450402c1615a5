//! Microbenchmark of `CachedAttention`'s decode path on one thread: one query per head over
//! 1267 keys of a 1280-slot buffer (the full-size model's heads and head dim), bound in place as
//! the runtime binds it, for float32, float16 and int8 buffers. Prints nanoseconds per (key,
//! head). For kernel work; the whole-model figures come from `scripts/bench/kv_cache_dtype.sh`.
//! `HEADS=2` (instead of 32) keeps the buffers in L2 cache: the kernel's own cost, without the
//! memory traffic.
//!
//!     cargo run --release -p kosmos-plugins --example attn_micro
//!     HEADS=2 cargo run --release -p kosmos-plugins --example attn_micro

use half::f16;
use kosmos_plugins::cached_attention::{Buffers, CacheElement, Dims, run_task};
use kosmos_plugins::packed_linear::Isa;
use std::time::Instant;

fn time<E: CacheElement>(name: &str, isa: Isa, d: Dims, cache: &mut [E], q: &[f32], visible: &[bool]) {
    let mut y = vec![0f32; q.len()];
    let past_len = [1266i64];
    let (kp, vp) = (cache.as_mut_ptr(), cache.as_mut_ptr());
    let buf = Buffers {
        q: q.as_ptr(),
        k: q.as_ptr(),
        v: q.as_ptr(),
        past_key: kp.cast_const(),
        past_value: vp.cast_const(),
        past_len: past_len.as_ptr(),
        visible: visible.as_ptr(),
        y: y.as_mut_ptr(),
        present_key: kp,
        present_value: vp,
    };
    // The same work for any head count.
    let n = 1600 / d.heads;
    let t = Instant::now();
    for _ in 0..n {
        for task in 0..d.tasks() {
            // SAFETY: the buffers have the sizes `d` describes, past and present are one
            // buffer (as the runtime binds them), and one thread runs the tasks.
            unsafe { run_task(isa, d, buf, task) };
        }
    }
    println!(
        "{name} {:.1} ns/key",
        t.elapsed().as_nanos() as f64 / n as f64 / (d.heads * 1267) as f64
    );
    std::hint::black_box(&y);
}

fn main() {
    let h: usize = match std::env::var("HEADS") {
        Ok(v) => v.parse().expect("HEADS is a positive number of heads"),
        Err(_) => 32,
    };
    assert!(h > 0, "HEADS is a positive number of heads");
    let (c, hd) = (1280usize, 64usize);
    let d = Dims {
        batch: 1,
        heads: h,
        seq: 1,
        capacity: c,
        head_dim: hd,
    };
    let q: Vec<f32> = (0..h * hd).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
    let visible: Vec<bool> = (0..c).map(|j| j <= 1266).collect();
    let isa = Isa::detect();
    let mut f32c: Vec<f32> = (0..h * c * hd)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.02)
        .collect();
    let mut f16c: Vec<f16> = f32c.iter().map(|&x| f16::from_f32(x)).collect();
    let mut i8c: Vec<i8> = (0..h * c * (hd + 1))
        .map(|i| {
            if i % (hd + 1) == hd {
                -5
            } else {
                (i * 31 % 97) as i8 - 48
            }
        })
        .collect();
    for _ in 0..2 {
        time("f32", isa, d, &mut f32c, &q, &visible);
        time("f16", isa, d, &mut f16c, &q, &visible);
        time("i8", isa, d, &mut i8c, &q, &visible);
    }
}
