//! Exported packages in ONNX Runtime agree with the trainer's tch model (DESIGN §7 step 3) and pass
//! the official ONNX validators, for the tiny preset and an odd-sized config, in every profile,
//! dtype and KV-cache layout: a left-padded batch with an image between text, prefill then 8 greedy decode steps.

#[path = "../trainer/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use kosmos_export::verify::{VerifyOptions, verify};
use kosmos_export::{ExportOptions, Profile, export};
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, PackageDtype, PackageManifest};

fn export_pkg(ckpt: &Path, out: &Path, profile: Profile, dtype: PackageDtype) {
    export_kv(ckpt, out, profile, dtype, KvCacheLayout::Concat);
}

fn export_kv(ckpt: &Path, out: &Path, profile: Profile, dtype: PackageDtype, kv_cache: KvCacheLayout) {
    let opts = ExportOptions {
        profile,
        dtype,
        kv_cache,
        force: false,
        progress: false,
    };
    export(ckpt, out, &opts).expect("export");
}

/// Export in every variant; each must verify against tch and pass the Python checks.
fn check_all(config: &KosmosConfig, seed: i64) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = common::make_checkpoint(config, seed, &dir.path().join("ckpt"));
    let variants = [
        (Profile::Portable, PackageDtype::Fp32, KvCacheLayout::Concat),
        (Profile::Portable, PackageDtype::Fp16, KvCacheLayout::Concat),
        (Profile::Ort, PackageDtype::Fp32, KvCacheLayout::Concat),
        (Profile::Ort, PackageDtype::Fp16, KvCacheLayout::Concat),
        (Profile::Portable, PackageDtype::Fp32, KvCacheLayout::Buffer),
        (Profile::Portable, PackageDtype::Fp16, KvCacheLayout::Buffer),
    ];
    for (profile, dtype, kv) in variants {
        {
            let tag = format!("{}-{}-{}", profile.as_str(), dtype.as_str(), kv.as_str());
            let pkg = dir.path().join(tag);
            export_kv(&ckpt, &pkg, profile, dtype, kv);
            let m = PackageManifest::load(&pkg).expect("manifest");
            assert_eq!(m.config, *config);
            assert_eq!(m.dtype, dtype);
            assert_eq!(m.decoder.kv_cache, kv);

            let r = verify(&ckpt, &pkg, &VerifyOptions::default()).expect("verify");
            for d in &r.diffs {
                eprintln!(
                    "{} {} {} {}: max |diff| {:.2e} (relative {:.2e})",
                    profile.as_str(),
                    dtype.as_str(),
                    kv.as_str(),
                    d.output,
                    d.max_abs,
                    d.relative()
                );
                match dtype {
                    PackageDtype::Fp32 => assert!(d.max_abs <= 1e-4, "{d:?}"),
                    PackageDtype::Fp16 => assert!(d.relative() <= 1e-2, "{d:?}"),
                }
            }
            assert_eq!(r.reference_tokens, r.package_tokens, "greedy tokens");
            assert_eq!(r.reference_tokens.len(), 9, "prefill + 8 decode steps");
            assert!(r.passed);

            // onnx.checker (full_check), shape inference agreement, and the PyTorch reference
            // modules' logits via ONNX Runtime's Python API.
            let tol = match dtype {
                PackageDtype::Fp32 => ["--atol", "1e-4"],
                PackageDtype::Fp16 => ["--rtol", "1e-2"],
            };
            let out = Command::new(common::venv_python())
                .arg(common::scripts_dir().join("oracles/onnx_check.py"))
                .arg(&pkg)
                .arg("--reference")
                .arg(&ckpt)
                .args(tol)
                .output()
                .expect("run onnx_check.py");
            assert!(
                out.status.success(),
                "onnx_check failed for {}:\n{}\n{}",
                pkg.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn tiny_preset_matches_trainer_in_every_profile_and_dtype() {
    check_all(&KosmosConfig::tiny(), 3);
}

#[test]
fn odd_sizes_match_trainer_in_every_profile_and_dtype() {
    check_all(&common::odd_config(), 5);
}

#[test]
fn verify_fails_on_a_package_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::make_checkpoint(&KosmosConfig::tiny(), 1, &dir.path().join("a"));
    let b = common::make_checkpoint(&common::odd_config(), 1, &dir.path().join("b"));
    let pkg = dir.path().join("pkg");
    export_pkg(&b, &pkg, Profile::Portable, PackageDtype::Fp32);
    let e = verify(&a, &pkg, &VerifyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model"), "{e}");

    // Same config, other weights: verify runs and reports failure.
    let c = common::make_checkpoint(&KosmosConfig::tiny(), 2, &dir.path().join("c"));
    let pkg_c = dir.path().join("pkg_c");
    export_pkg(&c, &pkg_c, Profile::Portable, PackageDtype::Fp32);
    let r = verify(&a, &pkg_c, &VerifyOptions::default()).expect("verify runs");
    assert!(!r.passed, "different weights must not verify");
}
