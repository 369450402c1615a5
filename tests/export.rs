//! Exported packages in ONNX Runtime agree with the trainer's tch model (DESIGN §7 step 3) and pass
//! the official ONNX validators, for the tiny preset and an odd-sized config, in every profile,
//! dtype and KV-cache layout: a left-padded batch with an image between text, prefill then 8 greedy decode steps.

#[path = "../trainer/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use kosmos_e2e::export_package as export_kv;
use kosmos_export::Profile;
use kosmos_export::verify::{VerifyOptions, verify};
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, KvDtype, PackageDtype, PackageManifest};

fn export_pkg(ckpt: &Path, out: &Path, profile: Profile, dtype: PackageDtype) {
    export_kv(ckpt, out, profile, dtype, KvCacheLayout::Concat);
}

/// Export in every variant; each must verify against tch and pass the Python checks.
fn check_all(config: &KosmosConfig, seed: i64) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = common::make_checkpoint(config, seed, &dir.path().join("ckpt"));
    // The last fields: decoder linears as ai.kosmos::PackedLinear, attention as
    // ai.kosmos::CachedAttention (verify runs their kernels, onnx_check.py's ONNX Runtime their
    // function bodies), and a KV cache type other than the model's (a float16 cache under the
    // float32 model: verify's reference reads the stored cache, so 1e-4 still holds; a prefill
    // reads only its own keys, unrounded, so onnx_check.py's logits do too).
    use KvCacheLayout::{Buffer, Concat};
    use PackageDtype::{Fp16, Fp32};
    use Profile::{Ort, Portable, Trt};
    let variants = [
        (Portable, Fp32, Concat, false, false, None),
        (Portable, Fp16, Concat, false, false, None),
        (Ort, Fp32, Concat, false, false, None),
        (Ort, Fp16, Concat, false, false, None),
        (Portable, Fp32, Buffer, false, false, None),
        (Portable, Fp16, Buffer, false, false, None),
        (Trt, Fp32, Concat, false, false, None),
        (Portable, Fp32, Buffer, true, true, None),
        (Ort, Fp32, Concat, true, false, None),
        (Portable, Fp32, Buffer, false, true, Some(KvDtype::Fp16)),
        (Portable, Fp32, Buffer, false, true, Some(KvDtype::Int8)),
    ];
    for (profile, dtype, kv, packed_linears, cached_attention, kv_dtype) in variants {
        {
            let packed = match (packed_linears, cached_attention) {
                (true, true) => "-packed-cached",
                (true, false) => "-packed",
                (false, true) => "-cached",
                (false, false) => "",
            };
            let packed = match kv_dtype {
                Some(t) => format!("{packed}-kv{}", t.as_str()),
                None => packed.to_string(),
            };
            let tag = format!("{}-{}-{}{packed}", profile.as_str(), dtype.as_str(), kv.as_str());
            let pkg = dir.path().join(tag);
            let opts = kosmos_export::ExportOptions {
                profile,
                dtype,
                kv_cache: kv,
                packed_linears,
                cached_attention,
                kv_dtype,
                ..kosmos_export::ExportOptions::default()
            };
            kosmos_export::export(&ckpt, &pkg, &opts).expect("export");
            let m = PackageManifest::load(&pkg).expect("manifest");
            assert_eq!(m.config, *config);
            assert_eq!(m.dtype, dtype);
            assert_eq!(m.decoder.kv_cache, kv);
            assert_eq!(
                m.decoder.kv_dtype,
                kv_dtype.unwrap_or(dtype.into()).element_type()
            );
            // Every decoder linear (q, k, v, out, fc1, fc2 per layer, and the LM head) is packed,
            // or none is; the vision graph never is.
            // The `kosmos.cpu_ops` metadata lists exactly the CPU-kernel ops a graph has.
            let count = |file: &str, op: &str| {
                let model = kosmos_export::onnx::inspect::load_model(&pkg.join(file)).unwrap();
                let listed = model.metadata_props.iter().any(|p| {
                    p.key == kosmos_plugins::CPU_OPS_METADATA_KEY && p.value.split(',').any(|o| o == op)
                });
                let g = model.graph.unwrap();
                let n = g.node.iter().filter(|n| n.op_type == op).count();
                assert_eq!(listed, n > 0, "{file}: metadata and {op} nodes disagree");
                n
            };
            let (linears, layers) = (
                6 * config.decoder.decoder_layers + 1,
                config.decoder.decoder_layers,
            );
            let (packed_op, cached_op) = (kosmos_plugins::packed::OP, kosmos_plugins::cached::OP);
            assert_eq!(
                count("decoder.onnx", packed_op),
                if packed_linears { linears } else { 0 }
            );
            assert_eq!(
                count("decoder.onnx", cached_op),
                if cached_attention { layers } else { 0 }
            );
            assert_eq!(
                count("vision.onnx", packed_op) + count("vision.onnx", cached_op),
                0
            );

            let r = verify(&ckpt, &pkg, &VerifyOptions::default()).expect("verify");
            if kv_dtype.is_some() {
                // The function bodies (ONNX Runtime's own ops) over 20 steps, to the same bound.
                let body = VerifyOptions {
                    without_custom_ops: true,
                    decode_steps: 20,
                    ..Default::default()
                };
                let b = verify(&ckpt, &pkg, &body).expect("verify the bodies");
                assert!(b.passed && b.presents_beyond_rounding, "{b:?}");
            }
            for d in &r.diffs {
                eprintln!(
                    "{} {} {}{packed} {}: max |diff| {:.2e} (relative {:.2e})",
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

/// Buffer layout: rows with different past lengths share one decoder call (each row writes at
/// its own `past_sequence_length`) and get the logits they get alone — what continuous batching
/// needs.
#[test]
fn buffer_layout_rows_with_different_past_lengths_share_a_call() {
    use kosmos_models::package::io;
    use ort::value::{DynValue, Tensor};

    let dir = tempfile::tempdir().unwrap();
    let config = KosmosConfig::tiny();
    let ckpt = common::make_checkpoint(&config, 8, &dir.path().join("ckpt"));
    let pkg = dir.path().join("pkg");
    export_kv(
        &ckpt,
        &pkg,
        Profile::Portable,
        PackageDtype::Fp32,
        KvCacheLayout::Buffer,
    );
    let m = PackageManifest::load(&pkg).unwrap();
    let d = &m.decoder;
    let (layers, heads, hd, dm, vocab) = (d.num_layers, d.num_heads, d.head_dim, d.hidden_size, d.vocab_size);
    let mut session = kosmos_export::verify::session(&pkg.join("decoder.onnx")).unwrap();
    let cap = 12usize;

    // One call: rows of `ids` (new tokens, one length for all rows) at offsets `past` over the
    // given caches (each [heads, cap, hd] per layer and k/v), with masks covering past + new.
    let mut run =
        |ids: &[Vec<i64>], past: &[usize], kv: &[Vec<Vec<f32>>]| -> (Vec<f32>, Vec<Vec<Vec<f32>>>) {
            let b = ids.len();
            let s = ids[0].len();
            let mut mask = vec![0i64; b * cap];
            for r in 0..b {
                for j in 0..past[r] + s {
                    mask[r * cap + j] = 1;
                }
            }
            let mut inputs: Vec<(String, DynValue)> = vec![
                (
                    io::INPUT_IDS.into(),
                    Tensor::from_array(([b, s], ids.concat())).unwrap().into_dyn(),
                ),
                (
                    io::IMAGE_EMBEDS.into(),
                    Tensor::from_array(([b, 1, dm], vec![0f32; b * dm]))
                        .unwrap()
                        .into_dyn(),
                ),
                (
                    io::IMAGE_MASK.into(),
                    Tensor::from_array(([b, s], vec![false; b * s]))
                        .unwrap()
                        .into_dyn(),
                ),
                (
                    io::ATTENTION_MASK.into(),
                    Tensor::from_array(([b, cap], mask)).unwrap().into_dyn(),
                ),
                (
                    io::PAST_SEQUENCE_LENGTH.into(),
                    Tensor::from_array(([b], past.iter().map(|&p| p as i64).collect::<Vec<_>>()))
                        .unwrap()
                        .into_dyn(),
                ),
                (
                    io::LOGITS_TO_KEEP.into(),
                    Tensor::from_array(([0usize; 0], vec![1i64])).unwrap().into_dyn(),
                ),
            ];
            for i in 0..2 * layers {
                let name = if i % 2 == 0 {
                    io::past_key(i / 2)
                } else {
                    io::past_value(i / 2)
                };
                let data: Vec<f32> = kv.iter().flat_map(|row| row[i].iter().copied()).collect();
                inputs.push((
                    name,
                    Tensor::from_array(([b, heads, cap, hd], data))
                        .unwrap()
                        .into_dyn(),
                ));
            }
            let out = session.run(inputs).unwrap();
            // logits_to_keep = 1: [b, 1, vocab], each row's last position.
            let (shape, logits) = out[io::LOGITS].try_extract_tensor::<f32>().unwrap();
            assert_eq!(&shape[..], &[b as i64, 1, vocab as i64]);
            let last = logits.to_vec();
            let per_row = heads * cap * hd;
            let caches = (0..b)
                .map(|r| {
                    (0..2 * layers)
                        .map(|i| {
                            let name = if i % 2 == 0 {
                                io::present_key(i / 2)
                            } else {
                                io::present_value(i / 2)
                            };
                            let (_, v) = out[name.as_str()].try_extract_tensor::<f32>().unwrap();
                            v[r * per_row..(r + 1) * per_row].to_vec()
                        })
                        .collect()
                })
                .collect();
            (last, caches)
        };
    let empty = vec![vec![0f32; heads * cap * hd]; 2 * layers];
    let a: Vec<i64> = vec![0, 17, 33, 48, 9];
    let bb: Vec<i64> = vec![0, 21, 5, 77, 90, 13, 64, 101, 7];
    let (_, kv_a) = run(std::slice::from_ref(&a), &[0], std::slice::from_ref(&empty));
    let (_, kv_b) = run(std::slice::from_ref(&bb), &[0], &[empty]);
    let (alone_a, _) = run(&[vec![40]], &[a.len()], &[kv_a[0].clone()]);
    let (alone_b, _) = run(&[vec![41]], &[bb.len()], &[kv_b[0].clone()]);
    let (together, _) = run(
        &[vec![40], vec![41]],
        &[a.len(), bb.len()],
        &[kv_a[0].clone(), kv_b[0].clone()],
    );
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(
        diff(&together[..vocab], &alone_a) <= 1e-5,
        "{}",
        diff(&together[..vocab], &alone_a)
    );
    assert!(
        diff(&together[vocab..], &alone_b) <= 1e-5,
        "{}",
        diff(&together[vocab..], &alone_b)
    );
}

/// The portable decoder is written in the patterns ONNX Runtime's optimiser fuses: one Gelu
/// kernel per FFN (BiasGelu with fc1's bias) instead of five elementwise nodes, and the buffer
/// layout's cache writes as row copies (ScatterND), not per-element ScatterElements. Both were a
/// measurable share of a batch-8 decode step at full size (README, "Performance (CPU)").
#[test]
fn onnx_runtime_fuses_the_portable_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pkg) = kosmos_e2e::tiny_buffer_package(dir.path(), 3);
    let layers = KosmosConfig::tiny().decoder.decoder_layers;
    let out = Command::new(common::venv_python())
        .arg(common::scripts_dir().join("oracles/ort_fusions.py"))
        .arg(pkg.join("decoder.onnx"))
        .output()
        .expect("run ort_fusions.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let counts: std::collections::BTreeMap<String, usize> =
        serde_json::from_slice(&out.stdout).expect("op counts");
    let n = |op: &str| counts.get(op).copied().unwrap_or(0);
    assert_eq!(n("Gelu") + n("BiasGelu"), layers, "{counts:?}");
    assert_eq!(n("Erf"), 0, "{counts:?}");
    assert_eq!(n("ScatterND"), 2 * layers, "{counts:?}");
    assert_eq!(n("ScatterElements"), 0, "{counts:?}");
}
