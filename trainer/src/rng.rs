//! libtorch's default generator is process-global: two threads seeding and drawing at once
//! interleave their draws. Every seeded draw of this crate goes through [`seeded`], which holds a
//! process-wide lock, so a seed gives the same tensors whatever else runs in the process.

use std::sync::Mutex;

static SEEDED: Mutex<()> = Mutex::new(());

/// Run `f` with the global generator seeded to `seed` and no other seeded section running.
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = SEEDED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    f()
}
