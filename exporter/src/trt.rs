//! `kosmos-export <ckpt> --to trt`: a `trt`-profile package plus TensorRT engines built by
//! `trtexec` with the `ai.kosmos` plugin library (`plugins/tensorrt`). Where TensorRT or the
//! plugins are missing, one error says which and where they were looked for.

use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_models::package::{KvCacheLayout, PackageDtype, PackageManifest};

use crate::error::{ExportError, Result};
use crate::{ExportOptions, Profile, export};

/// What engine building needs.
#[derive(Clone, Debug)]
pub struct TrtTools {
    pub trtexec: PathBuf,
    pub plugins: PathBuf,
}

/// Engine build settings.
#[derive(Clone, Debug)]
pub struct TrtOptions {
    /// Let TensorRT use fp16 kernels (`trtexec --fp16`).
    pub fp16: bool,
    /// Largest batch the engines accept.
    pub max_batch: usize,
    pub force: bool,
    pub progress: bool,
}

use kosmos_plugins::{TRT_PLUGIN_LIBRARY as PLUGIN_LIBRARY, TRT_PLUGIN_LIBRARY_ENV};

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Find `trtexec` ($TRTEXEC, PATH, $TENSORRT_ROOT/bin) and the plugin library (`plugins`
/// argument, $KOSMOS_TRT_PLUGINS); the error lists everything missing.
pub fn find_tools(plugins: Option<&Path>) -> Result<TrtTools> {
    let trtexec = std::env::var_os("TRTEXEC")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| on_path("trtexec"))
        .or_else(|| {
            std::env::var_os("TENSORRT_ROOT")
                .map(|r| PathBuf::from(r).join("bin/trtexec"))
                .filter(|p| p.is_file())
        });
    let plugins = plugins
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(TRT_PLUGIN_LIBRARY_ENV).map(PathBuf::from))
        .filter(|p| p.is_file());
    let mut missing = Vec::new();
    if trtexec.is_none() {
        missing.push(
            "TensorRT's trtexec (looked at $TRTEXEC, PATH and $TENSORRT_ROOT/bin; install the \
             TensorRT SDK >= 10)"
                .to_string(),
        );
    }
    if plugins.is_none() {
        missing.push(format!(
            "the ai.kosmos plugin library {PLUGIN_LIBRARY} (build plugins/tensorrt with CMake \
             against TensorRT, then pass --trt-plugins PATH or set {TRT_PLUGIN_LIBRARY_ENV})"
        ));
    }
    match (trtexec, plugins) {
        (Some(trtexec), Some(plugins)) => Ok(TrtTools { trtexec, plugins }),
        _ => Err(ExportError::TensorRt(format!(
            "--to trt builds TensorRT engines and needs {}. Without TensorRT, --to onnx \
             --profile trt writes the same graphs (kosmos-rt runs them with its fused kernels)",
            missing.join(" and ")
        ))),
    }
}

/// `name:dims` list for a trtexec shape flag.
fn shapes(list: &[(String, Vec<usize>)]) -> String {
    list.iter()
        .map(|(n, d)| {
            let dims: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            format!("{n}:{}", dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Export a `trt` package to `out` and build `vision.plan` and `decoder.plan` beside the graphs.
pub fn build(ckpt: &Path, out: &Path, tools: &TrtTools, opts: &TrtOptions) -> Result<Vec<PathBuf>> {
    let export_opts = ExportOptions {
        profile: Profile::Trt,
        dtype: PackageDtype::Fp32,
        kv_cache: KvCacheLayout::Concat,
        force: opts.force,
        progress: opts.progress,
        ..ExportOptions::default()
    };
    let summary = export(ckpt, out, &export_opts)?;
    let m = PackageManifest::load(&summary.package)?;
    let (b, ctx) = (opts.max_batch.max(1), m.decoder.context_length);
    let size = m.preprocess.image_size;
    let (heads, hd, dm) = (m.decoder.num_heads, m.decoder.head_dim, m.decoder.hidden_size);
    let per = m.vision.tokens_per_image;
    let vision = |n: usize| vec![("pixel_values".to_string(), vec![n, 3, size, size])];
    // Decoder profiles: min = one new token with no past, opt = a decode step at half context,
    // max = a full-context prefill.
    let decoder = |batch: usize, seq: usize, past: usize, images: usize| {
        let mut v = vec![
            ("input_ids".to_string(), vec![batch, seq]),
            ("image_embeds".to_string(), vec![batch, images.max(1) * per, dm]),
            ("image_mask".to_string(), vec![batch, seq]),
            ("attention_mask".to_string(), vec![batch, past + seq]),
        ];
        for i in 0..m.decoder.num_layers {
            for kind in ["key", "value"] {
                v.push((
                    format!("past_key_values.{i}.{kind}"),
                    vec![batch, heads, past, hd],
                ));
            }
        }
        v
    };
    let jobs = [
        (&m.vision.file, vision(1), vision(b.min(4)), vision(b)),
        (
            &m.decoder.file,
            decoder(1, 1, 0, 0),
            decoder(b, 1, ctx / 2, 1),
            decoder(b, ctx, ctx - 1, 4),
        ),
    ];
    let mut engines = Vec::new();
    for (file, min, opt, max) in jobs {
        let onnx = summary.package.join(file);
        let engine = onnx.with_extension("plan");
        let mut cmd = Command::new(&tools.trtexec);
        cmd.arg(format!("--onnx={}", onnx.display()))
            .arg(format!("--saveEngine={}", engine.display()))
            .arg(format!("--dynamicPlugins={}", tools.plugins.display()))
            .arg(format!("--minShapes={}", shapes(&min)))
            .arg(format!("--optShapes={}", shapes(&opt)))
            .arg(format!("--maxShapes={}", shapes(&max)))
            .arg("--skipInference");
        if opts.fp16 {
            cmd.arg("--fp16");
        }
        tracing::info!("building {}: {cmd:?}", engine.display());
        let st = cmd.status().map_err(|e| ExportError::io(&tools.trtexec, e))?;
        if !st.success() {
            let _ = std::fs::remove_file(&engine);
            return Err(ExportError::TensorRt(format!(
                "trtexec failed ({st}) building {} from {}; its output above says why",
                engine.display(),
                onnx.display()
            )));
        }
        engines.push(engine);
    }
    Ok(engines)
}
