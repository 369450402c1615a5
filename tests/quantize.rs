//! Quantised packages (`kosmos-export --quantize int8|int4`): the decoder's linears are ONNX
//! Runtime's `MatMulNBits` whose codes and scales equal ONNX Runtime's own quantiser bit for bit
//! (`scripts/oracles/quant_check.py`), in every layout and dtype they combine with (fp16 scales
//! included), for odd sizes (K not a whole number of blocks) and for weights full of ties and
//! exact halves; the packages pass the ONNX checker. That a trained model keeps its answers is in `runtime.rs`.

#[path = "../trainer/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_export::{ExportOptions, Profile};
use kosmos_models::checkpoint::{Checkpoint, TensorBytes, write_checkpoint};
use kosmos_models::package::{KvCacheLayout, PackageDtype, PackageManifest, Quantization};
use kosmos_models::{KosmosConfig, KosmosTokenizer};

/// A copy of `ckpt` whose decoder weights are multiples of 1/256 within ±16/256: most blocks
/// hold both +16/256 and -16/256 (a tie for the scale's sign) and odd multiples land exactly
/// halfway between two 4-bit codes (the rounding rule); the first output feature of each is
/// 65536 times smaller still.
fn coarse_copy(ckpt: &Path, out: &Path) -> PathBuf {
    let c = Checkpoint::open(ckpt).expect("open checkpoint");
    let st = c.weights().expect("weights");
    let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if name.starts_with("decoder.") && view.shape().len() == 2 {
            let sd = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
            for v in &mut values {
                *v = (*v / sd * 6.0).round().clamp(-16.0, 16.0) / 256.0;
            }
            // Output feature 0 scaled by 2^-16, to multiples of fp16's smallest subnormal
            // (2^-24): its scales (a block's largest magnitude / 8 or / 128) fall between fp16
            // values, so rounding them to fp16 changes the codes.
            for v in &mut values[..view.shape()[1]] {
                *v /= 65536.0;
            }
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.insert(name, (view.shape().to_vec(), bytes));
    }
    let tensors: BTreeMap<String, TensorBytes<'_>> = data
        .iter()
        .map(|(n, (shape, bytes))| {
            (
                n.clone(),
                TensorBytes {
                    shape: shape.clone(),
                    data: bytes,
                },
            )
        })
        .collect();
    let tok = KosmosTokenizer::load(&c.dir.join("tokenizer.json"), &c.config.tokenizer).expect("tokenizer");
    write_checkpoint(out, &c.config, &tok, &tensors, false, None).expect("write coarse checkpoint")
}

fn python(script: &str, args: &[&Path]) -> (bool, String) {
    let out = Command::new(common::venv_python())
        .arg(common::scripts_dir().join("oracles").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn op_count(pkg: &Path, file: &str, op: &str) -> usize {
    let model = kosmos_export::onnx::inspect::load_model(&pkg.join(file)).expect("load graph");
    model
        .graph
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type == op)
        .count()
}

#[test]
fn quantized_weights_equal_onnx_runtimes_quantizer() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::make_checkpoint(&KosmosConfig::tiny(), 3, &dir.path().join("tiny"));
    let odd = common::make_checkpoint(&common::odd_config(), 4, &dir.path().join("odd"));
    let coarse = coarse_copy(&tiny, &dir.path().join("coarse"));
    use KvCacheLayout::{Buffer, Concat};
    use PackageDtype::{Fp16, Fp32};
    // (checkpoint, bits, block, accuracy level, profile, dtype, cache, cached attention)
    let cases = [
        (&tiny, 8, 32, 4, Profile::Portable, Fp32, Buffer, true),
        (&tiny, 4, 32, 4, Profile::Portable, Fp32, Concat, false),
        (&tiny, 4, 128, 0, Profile::Ort, Fp32, Concat, false),
        (&tiny, 4, 32, 4, Profile::Ort, Fp16, Concat, false),
        (&odd, 8, 16, 4, Profile::Portable, Fp32, Buffer, true),
        (&odd, 4, 64, 4, Profile::Portable, Fp32, Concat, false),
        (&odd, 8, 32, 4, Profile::Portable, Fp16, Buffer, false),
        (&coarse, 4, 32, 4, Profile::Portable, Fp32, Buffer, false),
        (&coarse, 8, 32, 4, Profile::Portable, Fp32, Concat, false),
        (&coarse, 4, 16, 4, Profile::Portable, Fp16, Concat, false),
    ];
    for (i, (ckpt, bits, block_size, accuracy_level, profile, dtype, kv_cache, cached_attention)) in
        cases.into_iter().enumerate()
    {
        let q = Quantization {
            bits,
            block_size,
            accuracy_level,
        };
        let pkg = dir.path().join(format!("pkg{i}"));
        let opts = ExportOptions {
            profile,
            dtype,
            kv_cache,
            cached_attention,
            quantization: Some(q),
            ..ExportOptions::default()
        };
        kosmos_export::export(ckpt, &pkg, &opts).expect("export");
        let what = format!("case {i}: int{bits} block {block_size} {profile:?} {dtype:?} {kv_cache:?}");

        let m = PackageManifest::load(&pkg).expect("manifest");
        assert_eq!(m.quantization, Some(q), "{what}");
        // q, k, v, out_proj, fc1, fc2 per layer and the LM head: all quantised, no MatMul left
        // on a checkpoint weight (xPos's rotation matrix is a constant, not a weight).
        let layers = m.config.decoder.decoder_layers;
        assert_eq!(
            op_count(&pkg, "decoder.onnx", "MatMulNBits"),
            6 * layers + 1,
            "{what}"
        );
        let decoder = kosmos_export::onnx::inspect::load_model(&pkg.join("decoder.onnx")).unwrap();
        let g = decoder.graph.unwrap();
        let weights: std::collections::HashSet<&str> = g
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| n.starts_with("decoder.") && n.contains(".weight"))
            .collect();
        let matmul_on_weight = g
            .node
            .iter()
            .filter(|n| n.op_type == "MatMul" && n.input.iter().any(|x| weights.contains(x.as_str())))
            .count();
        assert_eq!(matmul_on_weight, 0, "{what}");
        assert_eq!(op_count(&pkg, "vision.onnx", "MatMulNBits"), 0, "{what}");

        let (ok, report) = python("quant_check.py", &[&pkg, ckpt]);
        assert!(ok, "{what}: quant_check.py: {report}");
        // onnx.checker (full_check) and shape inference over the graphs as written.
        let (ok, report) = python("onnx_check.py", &[&pkg]);
        assert!(ok, "{what}: onnx_check.py: {report}");
    }
}
