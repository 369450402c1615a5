//! Cross-crate end-to-end tests (checkpoint → package → runtime) live in this crate's test files;
//! this library only locates the workspace for them.

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

use std::path::Path;

use kosmos_export::{ExportOptions, Profile};
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, PackageDtype};
use kosmos_train::init::{TokenizerSource, init_checkpoint};

/// A seeded random checkpoint of `config` in `dir`.
pub fn checkpoint(config: &KosmosConfig, seed: i64, dir: &Path) -> PathBuf {
    init_checkpoint(config.clone(), seed, TokenizerSource::Builtin, dir, true).expect("init checkpoint")
}

/// Export `ckpt` to `out` (no progress bars, no overwrite).
pub fn export_package(
    ckpt: &Path,
    out: &Path,
    profile: Profile,
    dtype: PackageDtype,
    kv_cache: KvCacheLayout,
) {
    let opts = ExportOptions {
        profile,
        dtype,
        kv_cache,
        ..ExportOptions::default()
    };
    kosmos_export::export(ckpt, out, &opts).expect("export");
}

/// A random tiny checkpoint (`dir/ckpt`) and its portable fp32 package (`dir/pkg`).
pub fn tiny_package(dir: &Path, seed: i64) -> (PathBuf, PathBuf) {
    tiny_with_layout(dir, seed, KvCacheLayout::Concat)
}

/// As [`tiny_package`] with the buffer KV layout, as `kosmos-rt serve` needs.
pub fn tiny_buffer_package(dir: &Path, seed: i64) -> (PathBuf, PathBuf) {
    tiny_with_layout(dir, seed, KvCacheLayout::Buffer)
}

fn tiny_with_layout(dir: &Path, seed: i64, kv_cache: KvCacheLayout) -> (PathBuf, PathBuf) {
    let ckpt = checkpoint(&KosmosConfig::tiny(), seed, &dir.join("ckpt"));
    let pkg = dir.join("pkg");
    export_package(&ckpt, &pkg, Profile::Portable, PackageDtype::Fp32, kv_cache);
    (ckpt, pkg)
}
