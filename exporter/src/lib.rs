//! `kosmos-export`: lowers a KOSMOS-1 checkpoint (read through `kosmos-models`) to an ONNX package
//! as DESIGN §5 specifies — `vision.onnx`, `decoder.onnx` with `past_key_values.N.key|value` /
//! `present.N.key|value`, weights as external data, `kosmos_rt.json`, `tokenizer.json`.
//!
//! **ONNX writer.** The protobuf messages are `prost` structs written by hand from the published
//! `onnx.proto` ([`onnx::proto`], IR version 10). No maintained crate fits: `onnx-protobuf` and
//! friends pin old protobuf runtimes or need `protoc` at build time, and we write only a small,
//! stable subset of the schema. Graphs are built node by node ([`onnx::builder`]) with readable
//! names (`/decoder/layers.3/self_attn/q_proj/MatMul`), shared constants and a type and shape on
//! every value; weights stream to `<graph>.onnx.data` as they are converted, one tensor at a time.
//!
//! **Profiles.** `portable`: standard ONNX operators only, opset 17 (ONNX Runtime, TensorRT's
//! parser and OpenVINO all take it). `ort`: ONNX Runtime's `com.microsoft` contrib operators where
//! they help — `MultiHeadAttention` with the KV cache, `RotaryEmbedding` with xPos-scaled cos/sin
//! caches, fused `Gelu`/`QuickGelu`. `trt`: operators TensorRT's ONNX parser imports plus the
//! `ai.kosmos` `XPos` / `SubLnGelu` nodes (`kosmos_plugins`), their function bodies in the model.
//!
//! **Precision.** `fp32`, or `fp16` weights and activations with LayerNorm statistics, softmax and
//! GELU in fp32; graph inputs/outputs stay f32 except the fp16 KV cache.
//!
//! **Quantisation.** `--quantize int8|int4` writes every decoder linear and the LM head as ONNX
//! Runtime's `com.microsoft::MatMulNBits` with block-wise symmetric scales ([`quantize`]), as
//! ONNX Runtime GenAI's model builder does; the rest of the package keeps its dtype (fp16 with
//! int4 is that builder's GPU format).

pub mod awq;
pub mod error;
pub mod examples;
pub mod lower;
pub mod onnx;
pub mod quantize;
pub mod trt;
pub mod verify;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use kosmos_models::atomic::StagedDir;
use kosmos_models::package::{self, KvCacheLayout, KvDtype, PackageDtype, PackageManifest, Quantization};
use kosmos_models::params::{self, expected_params};
use kosmos_models::{Checkpoint, KosmosConfig};
use prost::Message;

pub use error::{ExportError, Result};
use lower::{Lower, Weights};
use onnx::builder::{DType, GraphBuilder};
use onnx::external::WeightSink;
use onnx::proto::{IR_VERSION, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// The standard-domain opset of every exported graph.
pub const OPSET: i64 = 17;
pub const PRODUCER: &str = "kosmos-export";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Portable,
    Ort,
    /// Standard ops TensorRT's ONNX parser imports, plus `ai.kosmos` XPos / SubLnGelu nodes
    /// (with their function bodies in the model) for the TensorRT plugins or ORT kernels.
    Trt,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Portable => "portable",
            Profile::Ort => "ort",
            Profile::Trt => "trt",
        }
    }

    /// Whether the decoder takes `logits_to_keep`. TensorRT would need it as a shape tensor with
    /// its values in every optimisation profile, so the `trt` decoder keeps every position.
    pub fn logits_to_keep(self) -> bool {
        self != Profile::Trt
    }
}

impl FromStr for Profile {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "portable" => Ok(Profile::Portable),
            "ort" => Ok(Profile::Ort),
            "trt" => Ok(Profile::Trt),
            other => Err(ExportError::UnknownProfile(other.to_string())),
        }
    }
}

pub fn parse_kv_cache(s: &str) -> Result<KvCacheLayout> {
    match s {
        "concat" => Ok(KvCacheLayout::Concat),
        "buffer" => Ok(KvCacheLayout::Buffer),
        other => Err(ExportError::Unsupported(format!(
            "unknown --kv-cache '{other}' (available: concat, buffer)"
        ))),
    }
}

pub fn parse_dtype(s: &str) -> Result<PackageDtype> {
    match s {
        "fp32" => Ok(PackageDtype::Fp32),
        "fp16" => Ok(PackageDtype::Fp16),
        other => Err(ExportError::UnknownDtype(other.to_string())),
    }
}

/// `--kv-cache-dtype fp32|fp16|int8`.
pub fn parse_kv_dtype(s: &str) -> Result<KvDtype> {
    KvDtype::from_name(s).ok_or_else(|| {
        ExportError::Unsupported(format!(
            "unknown --kv-cache-dtype '{s}' (available: {})",
            KvDtype::ALL.map(KvDtype::as_str).join(", ")
        ))
    })
}

/// `--quantize int8|int4` with its block size and accuracy level.
pub fn parse_quantization(name: &str, block_size: usize, accuracy_level: u32) -> Result<Quantization> {
    let bits = match name {
        "int8" => 8,
        "int4" => 4,
        other => {
            return Err(ExportError::Unsupported(format!(
                "unknown --quantize '{other}' (available: int8, int4)"
            )));
        }
    };
    let q = Quantization {
        bits,
        block_size,
        accuracy_level,
    };
    match q.invalid_setting() {
        Some(problem) => Err(ExportError::Unsupported(format!("--quantize: {problem}"))),
        None => Ok(q),
    }
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub profile: Profile,
    pub dtype: PackageDtype,
    /// How the decoder passes its KV cache (`concat`: the HF/GenAI convention; `buffer`:
    /// fixed-capacity buffers updated in place).
    pub kv_cache: KvCacheLayout,
    /// Write the decoder's linears as `ai.kosmos::PackedLinear` (kosmos-rt's small-batch CPU
    /// GEMM; function bodies keep the package runnable anywhere).
    pub packed_linears: bool,
    /// Write the decoder's attention as `ai.kosmos::CachedAttention` (buffer layout: kosmos-rt's
    /// CPU kernel reads each row's own keys only; the function body runs anywhere else).
    pub cached_attention: bool,
    /// Element type of the KV buffers when it differs from `dtype`: a float16 or int8 cache for
    /// a float32 (or quantised) model, read by `CachedAttention`'s kernel.
    pub kv_dtype: Option<KvDtype>,
    /// Quantise the decoder's linears (weight-only, `com.microsoft::MatMulNBits`).
    pub quantization: Option<Quantization>,
    /// Calibrate activation-aware scales before quantising (needs `quantization`).
    pub awq: Option<awq::AwqOptions>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Show a progress bar per component.
    pub progress: bool,
}

impl ExportOptions {
    /// The KV buffers' element type: `kv_dtype`, else the model's.
    pub fn cache_dtype(&self) -> KvDtype {
        self.kv_dtype.unwrap_or(self.dtype.into())
    }
}

impl Default for ExportOptions {
    /// The CLI's defaults: portable, fp32, concat cache, plain `MatMul` linears, no overwrite,
    /// no progress bars.
    fn default() -> Self {
        ExportOptions {
            profile: Profile::Portable,
            dtype: PackageDtype::Fp32,
            kv_cache: KvCacheLayout::Concat,
            packed_linears: false,
            cached_attention: false,
            kv_dtype: None,
            quantization: None,
            awq: None,
            force: false,
            progress: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    pub package: PathBuf,
    pub vision_bytes: u64,
    pub decoder_bytes: u64,
    pub seconds: f64,
    /// The activation-aware scales searched (`--awq`).
    pub awq: Option<awq::AwqScales>,
}

/// Export the checkpoint in `ckpt_dir` to a package directory `out` (written to a staging
/// directory and renamed into place, so a failure leaves nothing behind).
pub fn export(ckpt_dir: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(ckpt_dir)?;
    let staged = StagedDir::new(out, opts.force)?;
    let dir = staged.path().to_path_buf();
    let cfg = &ckpt.config;
    let dtype = element_type(opts.dtype);

    if opts.kv_cache == KvCacheLayout::Buffer && opts.profile == Profile::Ort {
        return Err(ExportError::Unsupported(
            "--kv-cache buffer with --profile ort (MultiHeadAttention concatenates its cache); \
             use --profile portable"
                .into(),
        ));
    }
    if opts.profile == Profile::Trt && opts.dtype != PackageDtype::Fp32 {
        return Err(ExportError::Unsupported(
            "--profile trt with --dtype fp16: the trt profile is float32 and TensorRT picks \
             precisions when it builds an engine (trtexec --fp16)"
                .into(),
        ));
    }
    if opts.packed_linears && (opts.profile == Profile::Trt || opts.dtype != PackageDtype::Fp32) {
        return Err(ExportError::Unsupported(
            "--packed-linears needs --dtype fp32 and --profile portable or ort: its kernel is \
             a float32 CPU kernel, and TensorRT has no plugin for it"
                .into(),
        ));
    }
    if opts.cached_attention
        && (opts.kv_cache != KvCacheLayout::Buffer
            || opts.profile != Profile::Portable
            || opts.dtype != PackageDtype::Fp32)
    {
        return Err(ExportError::Unsupported(
            "--cached-attention needs --kv-cache buffer, --profile portable and --dtype fp32: it \
             is attention over the fixed-capacity buffer, and its kernel is a float32 CPU kernel"
                .into(),
        ));
    }
    if let Some(q) = &opts.quantization {
        check_quantization(q, opts)?;
    }
    let awq = match (&opts.awq, &opts.quantization) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(ExportError::Unsupported(
                "--awq without --quantize: its scales only change how weights quantise".into(),
            ));
        }
        (Some(a), Some(q)) => {
            let scale_type = match opts.dtype {
                PackageDtype::Fp32 => quantize::ScaleType::F32,
                PackageDtype::Fp16 => quantize::ScaleType::F16,
            };
            let found = awq::search(ckpt_dir, q, scale_type, a)?;
            tracing::info!(
                groups = found.groups.len(),
                examples = found.calibration.examples,
                tokens = found.calibration.tokens,
                median_error_ratio = found.median_error_ratio(),
                "AWQ scales searched"
            );
            Some(found)
        }
    };
    let kv_dtype = opts.cache_dtype();
    match (opts.dtype, kv_dtype) {
        (PackageDtype::Fp16, KvDtype::Fp32) => {
            return Err(ExportError::Unsupported(
                "--kv-cache-dtype fp32 with --dtype fp16: a float16 model's attention runs in \
                 float16, so a float32 cache would only hold float16 values"
                    .into(),
            ));
        }
        (PackageDtype::Fp16, KvDtype::Int8) => {
            return Err(ExportError::Unsupported(
                "--kv-cache-dtype int8 with --dtype fp16: the int8 cache is read by \
                 --cached-attention's kernel, which is float32 (export with --dtype fp32, \
                 quantised weights included)"
                    .into(),
            ));
        }
        (PackageDtype::Fp32, KvDtype::Fp16 | KvDtype::Int8) if !opts.cached_attention => {
            return Err(ExportError::Unsupported(format!(
                "--kv-cache-dtype {} with --dtype fp32: a cache type other than the model's is \
                 read by --cached-attention's kernel (add --cached-attention, which needs \
                 --kv-cache buffer)",
                kv_dtype.as_str()
            )));
        }
        _ => {}
    }
    let vision_bytes = write_component(&ckpt, &dir, package::VISION_FILE, dtype, opts, None, |l| {
        l.vision_graph(cfg)
    })?;
    let decoder_bytes = write_component(
        &ckpt,
        &dir,
        package::DECODER_FILE,
        dtype,
        opts,
        awq.as_ref(),
        |l| l.decoder_graph(cfg),
    )?;

    let tok_src = ckpt.dir.join(package::TOKENIZER_FILE);
    let tok_dst = dir.join(package::TOKENIZER_FILE);
    std::fs::copy(&tok_src, &tok_dst).map_err(|e| ExportError::io(&tok_src, e))?;
    let mut manifest = PackageManifest::new(
        cfg,
        opts.profile.as_str(),
        opts.dtype,
        opts.kv_cache,
        opts.profile.logits_to_keep(),
        OPSET,
        &format!("{PRODUCER} {}", env!("CARGO_PKG_VERSION")),
    );
    manifest.quantization = opts.quantization;
    manifest.awq = awq.as_ref().map(|a| a.calibration.clone());
    manifest.decoder.kv_dtype = kv_dtype.element_type().into();
    kosmos_models::atomic::write_atomic(&dir.join(package::MANIFEST_FILE), manifest.to_json().as_bytes())?;
    let package = staged.commit()?;
    Ok(ExportSummary {
        package,
        vision_bytes,
        decoder_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        awq,
    })
}

/// The graph element type of a package dtype.
fn element_type(dtype: PackageDtype) -> DType {
    match dtype {
        PackageDtype::Fp32 => DType::F32,
        PackageDtype::Fp16 => DType::F16,
    }
}

/// Whether `--quantize` goes with the other options.
fn check_quantization(q: &Quantization, opts: &ExportOptions) -> Result<()> {
    if let Some(problem) = q.invalid_setting() {
        return Err(ExportError::Unsupported(format!("--quantize: {problem}")));
    }
    let conflict = if opts.profile == Profile::Trt {
        Some("--profile trt: TensorRT's ONNX parser has no MatMulNBits")
    } else if opts.packed_linears {
        Some("--packed-linears: both replace the decoder's linears; choose one")
    } else {
        None
    };
    match conflict {
        Some(why) => Err(ExportError::Unsupported(format!(
            "--quantize {} with {why}",
            q.name()
        ))),
        None => Ok(()),
    }
}

/// Checkpoint prefixes whose weights each graph holds (for progress totals).
fn component_prefixes(file: &str) -> &'static [&'static str] {
    if file == package::VISION_FILE {
        &[params::VISION, params::RESAMPLER, params::IMAGE_PROJ]
    } else {
        &[params::DECODER]
    }
}

fn write_component(
    ckpt: &Checkpoint,
    dir: &Path,
    file: &str,
    dtype: DType,
    opts: &ExportOptions,
    awq: Option<&awq::AwqScales>,
    build: impl FnOnce(&mut Lower<'_, '_, '_>) -> Result<()>,
) -> Result<u64> {
    let cfg = &ckpt.config;
    let prefixes = component_prefixes(file);
    let total: u64 = expected_params(cfg)
        .iter()
        .filter(|p| {
            prefixes
                .iter()
                .any(|x| p.name.starts_with(&format!("{x}.")) || p.name == *x)
        })
        .map(|p| p.shape.iter().product::<usize>() as u64 * dtype.size() as u64)
        .sum();
    let pb = progress_bar(opts.progress, total, file);
    let data_name = format!("{file}.data");
    let data_path = dir.join(&data_name);
    let mut sink = WeightSink::create(&data_path)?;
    let mut weights = Weights::new(ckpt.weights()?, dtype, Box::new(|n| pb.inc(n)));
    if let Some(a) = awq {
        let scaled = a.scaled_tensors(|name| weights.read(name))?;
        weights = weights.replacing(scaled, a.clips());
    }
    let graph_name = file.trim_end_matches(".onnx");
    let mut lower = Lower {
        g: GraphBuilder::new(graph_name, OPSET, &mut sink),
        w: &weights,
        profile: opts.profile,
        kv_cache: opts.kv_cache,
        // The vision tower runs once per image at 257+ rows, where MLAS's GEMM is the better one.
        packed_linears: opts.packed_linears && file == package::DECODER_FILE,
        cached_attention: opts.cached_attention,
        kv_dtype: opts.cache_dtype(),
        // The vision tower is compute-bound and runs once per image; the decoder re-reads every
        // weight per generated token, which is what quantisation saves.
        quantization: opts.quantization.filter(|_| file == package::DECODER_FILE),
    };
    build(&mut lower)?;
    let (graph, opsets) = lower.g.finish();
    let model = model_proto(graph, opsets, cfg, opts);
    let bytes = model.encode_to_vec();
    let path = dir.join(file);
    kosmos_models::atomic::write_atomic(&path, &bytes)?;
    let data_bytes = sink.finish()?;
    pb.finish_and_clear();
    tracing::info!(file, graph_bytes = bytes.len(), data_bytes, "written");
    Ok(bytes.len() as u64 + data_bytes)
}

fn model_proto(
    graph: onnx::proto::GraphProto,
    opsets: std::collections::BTreeMap<String, i64>,
    cfg: &KosmosConfig,
    opts: &ExportOptions,
) -> ModelProto {
    let mut meta = vec![
        ("kosmos.variant", cfg.variant.to_string()),
        ("kosmos.profile", opts.profile.as_str().to_string()),
        ("kosmos.dtype", opts.dtype.as_str().to_string()),
        ("kosmos.kv_cache", opts.kv_cache.as_str().to_string()),
    ];
    // Only graphs that call them (the vision graph keeps MatMul and has no KV cache).
    let cpu_ops: Vec<&str> = kosmos_plugins::CPU_OPS
        .into_iter()
        .filter(|op| {
            graph
                .node
                .iter()
                .any(|n| n.domain == kosmos_plugins::DOMAIN && n.op_type == *op)
        })
        .collect();
    if !cpu_ops.is_empty() {
        meta.push((kosmos_plugins::CPU_OPS_METADATA_KEY, cpu_ops.join(",")));
    }
    if let Some(q) = opts.quantization
        && graph.node.iter().any(|n| n.op_type == lower::MATMUL_NBITS)
    {
        meta.push((
            "kosmos.quantization",
            format!(
                "{} block {} accuracy_level {}",
                q.name(),
                q.block_size,
                q.accuracy_level
            ),
        ));
    }
    // Model-local bodies of the ai.kosmos ops it calls, so runtimes without their kernels inline them.
    let functions = lower::kosmos_ops::functions_called(&graph.node, opts.cache_dtype().into());
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: opsets
            .into_iter()
            .map(|(domain, version)| OperatorSetIdProto { domain, version })
            .collect(),
        producer_name: PRODUCER.into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: "ai.kosmos".into(),
        model_version: 1,
        doc_string: String::new(),
        graph: Some(graph),
        metadata_props: meta
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
        functions,
    }
}

/// A progress bar over `total` items (hidden unless `show`).
pub(crate) fn progress_count(show: bool, total: u64, what: &str) -> indicatif::ProgressBar {
    styled_bar(show, total, what, "{msg:>16} [{bar:30}] {pos}/{len} ETA {eta}")
}

/// A progress bar over `total` bytes (hidden unless `show`).
fn progress_bar(show: bool, total: u64, what: &str) -> indicatif::ProgressBar {
    styled_bar(
        show,
        total,
        what,
        "{msg:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
}

fn styled_bar(show: bool, total: u64, what: &str, template: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
