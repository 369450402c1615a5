//! `kosmos-export inspect` summaries of the tiny preset's graphs in every profile and dtype (and
//! the buffer KV layout's decoder, with and without `ai.kosmos::CachedAttention`, with a float16
//! KV cache, and int4-quantised, and the trt
//! profile with its function bodies), pinned with insta. A change to a lowering shows up here as
//! a reviewed diff (`cargo insta review`).

use kosmos_e2e::{checkpoint, export_package};
use kosmos_export::Profile;
use kosmos_export::onnx::inspect::{load_model, summary};
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, KvDtype, PackageDtype};

#[test]
fn tiny_preset_graphs() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(&KosmosConfig::tiny(), 0, &dir.path().join("ckpt"));
    let summarise = |pkg: &std::path::Path, graph: &str| {
        summary(&load_model(&pkg.join(format!("{graph}.onnx"))).expect("load"))
    };
    for profile in [Profile::Portable, Profile::Ort] {
        for dtype in [PackageDtype::Fp32, PackageDtype::Fp16] {
            let tag = format!("{}-{}", profile.as_str(), dtype.as_str());
            let pkg = dir.path().join(&tag);
            export_package(&ckpt, &pkg, profile, dtype, KvCacheLayout::Concat);
            for graph in ["vision", "decoder"] {
                insta::assert_snapshot!(format!("tiny-{tag}-{graph}"), summarise(&pkg, graph));
            }
        }
    }
    // The buffer KV layout changes only the decoder.
    let pkg = dir.path().join("buffer");
    export_package(
        &ckpt,
        &pkg,
        Profile::Portable,
        PackageDtype::Fp32,
        KvCacheLayout::Buffer,
    );
    insta::assert_snapshot!("tiny-portable-fp32-buffer-decoder", summarise(&pkg, "decoder"));
    // --cached-attention: one ai.kosmos node per layer in place of the attention's standard ops.
    let pkg = dir.path().join("buffer-cached");
    let opts = kosmos_export::ExportOptions {
        kv_cache: KvCacheLayout::Buffer,
        cached_attention: true,
        ..kosmos_export::ExportOptions::default()
    };
    kosmos_export::export(&ckpt, &pkg, &opts).expect("export");
    insta::assert_snapshot!(
        "tiny-portable-fp32-buffer-cached-decoder",
        summarise(&pkg, "decoder")
    );
    // --kv-cache-dtype fp16: float16 buffers in and out, and CachedAttention's body for them
    // (Cast of the new rows into the presents; the attention over the widened past).
    let pkg = dir.path().join("buffer-cached-kvfp16");
    let opts = kosmos_export::ExportOptions {
        kv_cache: KvCacheLayout::Buffer,
        cached_attention: true,
        kv_dtype: Some(KvDtype::Fp16),
        ..kosmos_export::ExportOptions::default()
    };
    kosmos_export::export(&ckpt, &pkg, &opts).expect("export");
    insta::assert_snapshot!(
        "tiny-portable-fp32-buffer-cached-kvfp16-decoder",
        summarise(&pkg, "decoder")
    );
    // --kv-cache-dtype int8: int8 rows of head_dim + 1 in and out, and CachedAttention's body
    // for them (the rows' quantisation into the presents; the attention over the dequantised past).
    let pkg = dir.path().join("buffer-cached-kvint8");
    let opts = kosmos_export::ExportOptions {
        kv_cache: KvCacheLayout::Buffer,
        cached_attention: true,
        kv_dtype: Some(KvDtype::Int8),
        ..kosmos_export::ExportOptions::default()
    };
    kosmos_export::export(&ckpt, &pkg, &opts).expect("export");
    insta::assert_snapshot!(
        "tiny-portable-fp32-buffer-cached-kvint8-decoder",
        summarise(&pkg, "decoder")
    );
    // --quantize int4: MatMulNBits (+ Add of the bias) in place of every decoder linear.
    let pkg = dir.path().join("buffer-cached-int4");
    let opts = kosmos_export::ExportOptions {
        kv_cache: KvCacheLayout::Buffer,
        cached_attention: true,
        quantization: Some(kosmos_models::package::Quantization {
            bits: 4,
            block_size: 32,
            accuracy_level: 4,
        }),
        ..kosmos_export::ExportOptions::default()
    };
    kosmos_export::export(&ckpt, &pkg, &opts).expect("export");
    insta::assert_snapshot!(
        "tiny-portable-fp32-buffer-cached-int4-decoder",
        summarise(&pkg, "decoder")
    );
    // The trt profile: ai.kosmos nodes and their function bodies.
    let pkg = dir.path().join("trt");
    export_package(
        &ckpt,
        &pkg,
        Profile::Trt,
        PackageDtype::Fp32,
        KvCacheLayout::Concat,
    );
    for graph in ["vision", "decoder"] {
        insta::assert_snapshot!(format!("tiny-trt-fp32-{graph}"), summarise(&pkg, graph));
    }
}
