use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kosmos_export::onnx::inspect;
use kosmos_export::verify::{VerifyOptions, verify};
use kosmos_export::{ExportOptions, Profile, export, parse_dtype};

#[derive(Parser)]
#[command(
    name = "kosmos-export",
    version,
    about = "Lower a KOSMOS-1 checkpoint to an ONNX package (vision.onnx + decoder.onnx with KV cache)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
        kosmos-export runs/tiny --to onnx -o pkg/tiny\n  \
        kosmos-export runs/k1 -o pkg/k1-fp16 --dtype fp16 --profile ort\n  \
        kosmos-export runs/k1 -o pkg/k1-trt --profile trt\n  \
        kosmos-export runs/k1 -o pkg/k1-serve --kv-cache buffer --packed-linears --cached-attention\n  \
        kosmos-export runs/k1 -o pkg/k1-int8 --kv-cache buffer --cached-attention --quantize int8\n  \
        kosmos-export runs/k1 -o pkg/k1-int4 --kv-cache buffer --cached-attention --quantize int4 --kv-cache-dtype fp16\n  \
        kosmos-export runs/k1 -o pkg/k1-kv8 --kv-cache buffer --cached-attention --kv-cache-dtype int8\n  \
        kosmos-export runs/tiny -o pkg/tiny-awq --quantize int4 --awq synthetic:shapes\n  \
        kosmos-export inspect pkg/tiny/decoder.onnx\n  \
        kosmos-export verify runs/tiny pkg/tiny\n  \
        kosmos-export verify runs/tiny pkg/tiny-int4 --data synthetic:shapes --examples 8\n  \
        kosmos-export verify runs/k1 pkg/k1-kv8 --data synthetic:shapes --steps 16 --own-cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    export: ExportArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(required = true)]
    checkpoint: Option<PathBuf>,
    /// Target format: onnx (a package), or trt (a trt-profile package plus TensorRT engines
    /// built by trtexec with the ai.kosmos plugin library; --dtype fp16 lets TensorRT use fp16).
    #[arg(long, value_enum, default_value = "onnx")]
    to: Target,
    /// Output package directory (refused if it exists, unless --force).
    #[arg(short, long, required = true)]
    output: Option<PathBuf>,
    /// portable: standard ONNX ops, opset 17; ort: ONNX Runtime contrib ops (MultiHeadAttention
    /// with KV cache, RotaryEmbedding, fused GELU); trt: ops TensorRT's parser imports plus
    /// ai.kosmos XPos / SubLnGelu nodes (function bodies included; fused kernels in kosmos-rt,
    /// TensorRT plugins in plugins/tensorrt), float32.
    #[arg(long, default_value = "portable")]
    profile: String,
    /// fp32 or fp16 (LayerNorm statistics, softmax and GELU stay fp32).
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// KV cache passing: concat (past → present = past + new, the Hugging Face / ONNX Runtime
    /// GenAI convention) or buffer (fixed-capacity buffers written in place at
    /// past_sequence_length; kosmos-rt binds them once per sequence).
    #[arg(long, default_value = "concat")]
    kv_cache: String,
    /// Store the decoder's linear weights in 32-column panels for ai.kosmos::PackedLinear,
    /// kosmos-rt's CPU GEMM for the few rows of a decode step (faster batched decoding on the
    /// CPU; fp32, portable or ort profile). The function bodies keep the package runnable by
    /// any ONNX runtime.
    #[arg(long)]
    packed_linears: bool,
    /// Write the decoder's attention as ai.kosmos::CachedAttention: kosmos-rt's CPU kernel
    /// reads each row's own keys instead of the whole buffer capacity, so one long request no
    /// longer slows every row of a batch (needs --kv-cache buffer; fp32, portable profile). The
    /// function body keeps the package runnable by any ONNX runtime.
    #[arg(long)]
    cached_attention: bool,
    /// Element type of the KV cache: fp16 halves the memory each sequence holds and the bytes
    /// a step reads from it, int8 quarters them (each token's keys of a head as int8 with a
    /// power-of-two scale), for a fp32 or quantised model (needs --cached-attention, whose
    /// kernel reads these buffers; keys and values are rounded as they are stored, as vLLM's
    /// --kv-cache-dtype or llama.cpp's --cache-type-k f16 / q8_0 do). Default: --dtype.
    #[arg(long, value_name = "fp32|fp16|int8")]
    kv_cache_dtype: Option<String>,
    /// Weight-only quantisation of the decoder's linears and LM head: int8 or int4, written as
    /// ONNX Runtime's com.microsoft::MatMulNBits (block-wise symmetric scales, as ONNX Runtime's
    /// own quantiser and ONNX Runtime GenAI's model builder make them). A decode step reads 4x
    /// (int8) or 8x (int4) fewer weight bytes than fp32; embeddings, norms and the vision graph
    /// keep --dtype. Needs ONNX Runtime; portable or ort profile, not with --packed-linears.
    #[arg(long, value_name = "int8|int4")]
    quantize: Option<String>,
    /// --quantize: weights per scale along the input features (16, 32, 64, 128 or 256).
    #[arg(long, default_value_t = 32, requires = "quantize")]
    quant_block_size: usize,
    /// --quantize: MatMulNBits' accuracy_level; 4 quantises activations to int8 per block and
    /// multiplies in integers (fastest on CPU), 0 dequantises to f32 first.
    #[arg(long, default_value_t = 4, requires = "quantize")]
    quant_accuracy_level: u32,
    /// --quantize, activation-aware (AWQ, as TensorRT-LLM's int4_awq): run these examples
    /// through the checkpoint (a data spec as kosmos-train takes it: a .jsonl manifest, .tar
    /// shards, or synthetic:shapes, whose training split is drawn), and per LayerNorm search
    /// input-feature scales that shrink the quantisation error of the linears after it; the
    /// scales fold into the LayerNorm, so the graph and its speed do not change. Check the
    /// result with `verify --data` on held-out examples.
    #[arg(long, value_name = "SPEC", requires = "quantize")]
    awq: Option<String>,
    /// --awq: calibration examples.
    #[arg(long, default_value_t = kosmos_export::awq::AwqOptions::DEFAULT_EXAMPLES, requires = "awq")]
    awq_examples: usize,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// --to trt: the ai.kosmos TensorRT plugin library (default: $KOSMOS_TRT_PLUGINS).
    #[arg(long)]
    trt_plugins: Option<PathBuf>,
    /// --to trt: largest batch the engines accept.
    #[arg(long, default_value_t = 8)]
    trt_max_batch: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    Onnx,
    Trt,
}

#[derive(Subcommand)]
enum Command {
    /// Print a stable text summary of an ONNX model: I/O, op histogram, weights, nodes per layer.
    Inspect { model: PathBuf },
    /// Run the checkpoint (tch) and the package (ONNX Runtime) on the same inputs — a left-padded
    /// batch with images, then greedy decode steps — and print the largest difference per output.
    /// Exits non-zero above tolerance or when greedy tokens differ.
    Verify {
        checkpoint: PathBuf,
        package: PathBuf,
        /// Decode steps after the prefill.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Tolerance (default: 1e-4 absolute for fp32, 1e-2 relative for fp16; for a quantised
        /// package the least fraction of positions whose most likely token agrees, 0.9).
        #[arg(long)]
        tolerance: Option<f64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Run the ai.kosmos ops' ONNX function bodies instead of their fused kernels (trt
        /// profile).
        #[arg(long)]
        without_custom_ops: bool,
        /// Real examples instead of arbitrary token ids and random pixels: a data spec as
        /// kosmos-train takes it (a .jsonl manifest, .tar shards, or synthetic:shapes, whose
        /// test split is drawn), each example whole and teacher-forced, then the decode steps.
        #[arg(long, value_name = "SPEC")]
        data: Option<String>,
        /// Examples (rows) taken from --data.
        #[arg(long, default_value_t = 4, requires = "data")]
        examples: usize,
        /// With a float16 or int8 KV cache under a float32 model: let the reference keep its own
        /// float32 cache instead of reading the package's stored one, so top-1 agreement and KL
        /// divergence include what the cache's rounding costs (judged by top-1, as --quantize).
        #[arg(long)]
        own_cache: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Some(Command::Inspect { model }) => {
            let m = inspect::load_model(&model)?;
            print!("{}", inspect::summary(&m));
            Ok(0)
        }
        Some(Command::Verify {
            checkpoint,
            package,
            steps,
            tolerance,
            json,
            without_custom_ops,
            data,
            examples,
            own_cache,
        }) => {
            let opts = VerifyOptions {
                decode_steps: steps,
                tolerance,
                without_custom_ops,
                data,
                examples,
                own_cache,
                ..Default::default()
            };
            let r = verify(&checkpoint, &package, &opts).with_context(|| {
                format!("verifying {} against {}", package.display(), checkpoint.display())
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} {} package ({} {} KV cache), {} rows with {} images from {}, {} decode steps{}",
                    r.profile,
                    r.dtype,
                    r.kv_cache,
                    r.kv_dtype,
                    r.rows,
                    r.images,
                    r.data.as_deref().unwrap_or("arbitrary token ids and pixels"),
                    steps,
                    match (r.presents_beyond_rounding, r.reference_reads_stored_cache) {
                        (true, true) => {
                            "; the reference reads the stored cache, present.* differences beyond \
                             its rounding (float16: 2^-11 of each value; int8: half a row's step)"
                        }
                        (true, false) => {
                            "; the reference keeps its own float32 cache, present.* differences \
                             beyond the package's rounding"
                        }
                        _ => "",
                    }
                );
                for d in &r.diffs {
                    println!(
                        "  {:18} max |diff| {:.3e}  (max |ref| {:.3e}, relative {:.3e})",
                        d.output,
                        d.max_abs,
                        d.ref_max,
                        d.relative()
                    );
                }
                println!(
                    "  greedy tokens {}; most likely token agrees at {:.1} % of {} positions; \
                     KL divergence from the reference {:.3e} nats mean, {:.3e} max",
                    if r.reference_tokens == r.package_tokens {
                        "equal"
                    } else {
                        "DIFFER"
                    },
                    100.0 * r.top1_agreement,
                    r.positions,
                    r.mean_kl_divergence,
                    r.max_kl_divergence
                );
                if r.decode_positions > 0 {
                    println!(
                        "  decode steps alone: most likely token agrees at {:.1} % of {} positions; \
                         KL divergence {:.3e} nats mean",
                        100.0 * r.decode_top1_agreement,
                        r.decode_positions,
                        r.decode_mean_kl_divergence
                    );
                }
                let verdict = if r.passed { "PASS" } else { "FAIL" };
                if r.tolerance_kind == "top-1" {
                    println!("{verdict}: top-1 agreement at least {:.1} %", 100.0 * r.tolerance);
                } else {
                    println!("{verdict}: tolerance {:.0e} {}", r.tolerance, r.tolerance_kind);
                }
            }
            Ok(if r.passed { 0 } else { 2 })
        }
        None => {
            let a = cli.export;
            let (Some(checkpoint), Some(output)) = (a.checkpoint, a.output) else {
                bail!("a checkpoint and -o <package dir> are required");
            };
            let profile: Profile = a.profile.parse()?;
            let dtype = parse_dtype(&a.dtype)?;
            let kv_cache = kosmos_export::parse_kv_cache(&a.kv_cache)?;
            let quantization = a
                .quantize
                .as_deref()
                .map(|q| kosmos_export::parse_quantization(q, a.quant_block_size, a.quant_accuracy_level))
                .transpose()?;
            if let Target::Trt = a.to {
                if let Some(q) = quantization {
                    bail!(
                        "--to trt with --quantize {}: TensorRT engines are built from fp32 or fp16 weights",
                        q.name()
                    );
                }
                // Checked before anything is written: the error names what is missing.
                let tools = kosmos_export::trt::find_tools(a.trt_plugins.as_deref())?;
                let opts = kosmos_export::trt::TrtOptions {
                    fp16: dtype == kosmos_models::package::PackageDtype::Fp16,
                    max_batch: a.trt_max_batch,
                    force: a.force,
                    progress: !a.quiet,
                };
                let engines = kosmos_export::trt::build(&checkpoint, &output, &tools, &opts)
                    .with_context(|| format!("building TensorRT engines for {}", checkpoint.display()))?;
                for e in engines {
                    println!("{}", e.display());
                }
                return Ok(0);
            }
            let opts = ExportOptions {
                profile,
                dtype,
                kv_cache,
                packed_linears: a.packed_linears,
                cached_attention: a.cached_attention,
                kv_dtype: a
                    .kv_cache_dtype
                    .as_deref()
                    .map(kosmos_export::parse_kv_dtype)
                    .transpose()?,
                quantization,
                awq: a.awq.as_deref().map(|data| kosmos_export::awq::AwqOptions {
                    examples: a.awq_examples,
                    progress: !a.quiet,
                    ..kosmos_export::awq::AwqOptions::new(data)
                }),
                force: a.force,
                progress: !a.quiet,
            };
            let s = export(&checkpoint, &output, &opts)
                .with_context(|| format!("exporting {}", checkpoint.display()))?;
            println!(
                "{}: vision {:.1} MB, decoder {:.1} MB ({} {}{}), {:.1} s",
                s.package.display(),
                s.vision_bytes as f64 / 1e6,
                s.decoder_bytes as f64 / 1e6,
                profile.as_str(),
                dtype.as_str(),
                quantization
                    .map(|q| format!(", {} linears", q.name()))
                    .unwrap_or_default(),
                s.seconds
            );
            if let Some(awq) = &s.awq {
                println!(
                    "AWQ: {} examples ({} tokens) from {}; the quantised linears' output error is \
                     {:.2} of round-to-nearest's (median of {} LayerNorm groups)",
                    awq.calibration.examples,
                    awq.calibration.tokens,
                    awq.calibration.data,
                    awq.median_error_ratio(),
                    awq.groups.len()
                );
            }
            Ok(0)
        }
    }
}
