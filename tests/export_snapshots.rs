//! `kosmos-export inspect` summaries of the tiny preset's graphs in every profile and dtype, pinned
//! with insta. A change to a lowering shows up here as a reviewed diff (`cargo insta review`).

use kosmos_export::onnx::inspect::{load_model, summary};
use kosmos_export::{ExportOptions, Profile, export};
use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, PackageDtype};
use kosmos_train::init::{TokenizerSource, init_checkpoint};

#[test]
fn tiny_preset_graphs() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = init_checkpoint(
        KosmosConfig::tiny(),
        0,
        TokenizerSource::Builtin,
        &dir.path().join("ckpt"),
        true,
    )
    .expect("init");
    for profile in [Profile::Portable, Profile::Ort] {
        for dtype in [PackageDtype::Fp32, PackageDtype::Fp16] {
            let tag = format!("{}-{}", profile.as_str(), dtype.as_str());
            let pkg = dir.path().join(&tag);
            let opts = ExportOptions {
                profile,
                dtype,
                kv_cache: Default::default(),
                force: false,
                progress: false,
            };
            export(&ckpt, &pkg, &opts).expect("export");
            for graph in ["vision", "decoder"] {
                let model = load_model(&pkg.join(format!("{graph}.onnx"))).expect("load");
                insta::assert_snapshot!(format!("tiny-{tag}-{graph}"), summary(&model));
            }
        }
    }
    // The buffer KV layout changes only the decoder.
    let pkg = dir.path().join("buffer");
    let opts = ExportOptions {
        profile: Profile::Portable,
        dtype: PackageDtype::Fp32,
        kv_cache: KvCacheLayout::Buffer,
        force: false,
        progress: false,
    };
    export(&ckpt, &pkg, &opts).expect("export");
    let model = load_model(&pkg.join("decoder.onnx")).expect("load");
    insta::assert_snapshot!("tiny-portable-fp32-buffer-decoder", summary(&model));
}
