//! The package contract between `kosmos-export` and `kosmos-rt` (DESIGN §5): file names, graph
//! I/O names (the Hugging Face / ONNX Runtime GenAI convention) and `kosmos_rt.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::KosmosConfig;
use crate::error::{ModelsError, Result};
use crate::image::{CLIP_MEAN, CLIP_STD};

pub const MANIFEST_FILE: &str = "kosmos_rt.json";
pub const VISION_FILE: &str = "vision.onnx";
pub const DECODER_FILE: &str = "decoder.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Version of the package layout this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Graph input and output names.
pub mod io {
    pub const PIXEL_VALUES: &str = "pixel_values";
    pub const IMAGE_EMBEDS: &str = "image_embeds";
    pub const INPUT_IDS: &str = "input_ids";
    pub const IMAGE_MASK: &str = "image_mask";
    pub const ATTENTION_MASK: &str = "attention_mask";
    /// Buffer layout only: i64 [batch], the slot where each row's new keys and values go (rows
    /// may differ, so sequences of different lengths can share a decoder call).
    pub const PAST_SEQUENCE_LENGTH: &str = "past_sequence_length";
    /// i64 scalar, the `transformers` name and meaning: 0 = logits at every new position,
    /// k > 0 = at the last k only (`logits` is then [batch, k, vocab]). A prefill that only
    /// samples the next token asks for 1 and skips the LM head over the prompt. Absent from
    /// `trt`-profile decoders, whose logits always cover every position.
    pub const LOGITS_TO_KEEP: &str = "logits_to_keep";
    pub const LOGITS: &str = "logits";

    pub fn past_key(layer: usize) -> String {
        format!("past_key_values.{layer}.key")
    }
    pub fn past_value(layer: usize) -> String {
        format!("past_key_values.{layer}.value")
    }
    pub fn present_key(layer: usize) -> String {
        format!("present.{layer}.key")
    }
    pub fn present_value(layer: usize) -> String {
        format!("present.{layer}.value")
    }
}

/// Weight/activation precision of a package.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageDtype {
    Fp32,
    Fp16,
}

impl PackageDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageDtype::Fp32 => "fp32",
            PackageDtype::Fp16 => "fp16",
        }
    }
}

/// Element type of the decoder's KV cache (`kosmos-export --kv-cache-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    Fp32,
    Fp16,
    /// int8 rows of `head_dim` values and an exponent (the `ai.kosmos::CachedAttention` spec in
    /// the plugins crate): `head_dim + 1` bytes per token and head.
    Int8,
}

impl KvDtype {
    pub const ALL: [KvDtype; 3] = [KvDtype::Fp32, KvDtype::Fp16, KvDtype::Int8];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::Fp32 => "fp32",
            KvDtype::Fp16 => "fp16",
            KvDtype::Int8 => "int8",
        }
    }

    /// The ONNX element type's name, as the manifest's `kv_dtype` gives it.
    pub fn element_type(self) -> &'static str {
        match self {
            KvDtype::Fp32 => "float32",
            KvDtype::Fp16 => "float16",
            KvDtype::Int8 => "int8",
        }
    }

    /// The dtype whose [`element_type`](Self::element_type) is `name`.
    pub fn from_element_type(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.element_type() == name)
    }

    /// The dtype whose command-line [`as_str`](Self::as_str) is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Elements of one slot (a token's keys of one head) in a cache tensor: its last dimension.
    pub fn row_len(self, head_dim: usize) -> usize {
        match self {
            KvDtype::Int8 => head_dim + 1,
            KvDtype::Fp32 | KvDtype::Fp16 => head_dim,
        }
    }

    /// Bytes per element.
    pub fn element_bytes(self) -> usize {
        match self {
            KvDtype::Fp32 => 4,
            KvDtype::Fp16 => 2,
            KvDtype::Int8 => 1,
        }
    }
}

impl From<PackageDtype> for KvDtype {
    /// A model's own cache type.
    fn from(d: PackageDtype) -> Self {
        match d {
            PackageDtype::Fp32 => KvDtype::Fp32,
            PackageDtype::Fp16 => KvDtype::Fp16,
        }
    }
}

/// How the decoder's KV cache is passed (DESIGN §5 describes `concat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheLayout {
    /// `past_key_values.*` hold the past [batch, heads, past, hd]; `present.*` = past + new
    /// (the Hugging Face / ONNX Runtime GenAI convention).
    #[default]
    Concat,
    /// `past_key_values.*` are fixed-capacity buffers [batch, heads, capacity, hd]; the new keys
    /// and values are written at each row's `past_sequence_length` and `present.*` is the whole
    /// buffer, so a
    /// runtime binds the same memory as input and output and the cache is never reallocated.
    /// `attention_mask` spans the capacity (0 for free slots).
    Buffer,
}

impl KvCacheLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheLayout::Concat => "concat",
            KvCacheLayout::Buffer => "buffer",
        }
    }
}

/// `kosmos_rt.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManifest {
    pub format_version: u32,
    /// e.g. "kosmos-export 0.1.0".
    pub producer: String,
    /// `portable`, `ort` (and later `trt`).
    pub profile: String,
    /// Precision of weights and activations; graph inputs and outputs other than the KV cache
    /// stay f32.
    pub dtype: PackageDtype,
    pub opset: i64,
    pub vision: VisionGraph,
    pub decoder: DecoderGraph,
    pub tokenizer: TokenizerInfo,
    pub preprocess: Preprocess,
    /// Optional chat template (the server's prompt assembly uses it when present).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Weight-only quantisation of the decoder's linears, when the package has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// How activation-aware scales were calibrated before quantising (`kosmos-export --awq`);
    /// absent for plain round-to-nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awq: Option<AwqCalibration>,
    /// The checkpoint's model config.
    pub config: KosmosConfig,
}

/// The calibration behind a package's activation-aware quantisation (`kosmos-export --awq`):
/// per-input-feature scales, searched on these examples, moved from each LayerNorm into the
/// linears after it before their weights were quantised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwqCalibration {
    /// The data spec the examples came from.
    pub data: String,
    pub examples: usize,
    /// Tokens those examples made (image slots included).
    pub tokens: usize,
    /// Number of scale exponents tried per LayerNorm.
    pub grid: usize,
}

/// Weight-only block quantisation (`kosmos-export --quantize`): every linear of the decoder,
/// the LM head included, is ONNX Runtime's `com.microsoft::MatMulNBits`. Each output feature's
/// input weights are cut into blocks of `block_size`; a block keeps one scale (in the package's
/// dtype) and `bits`-bit codes, symmetric around the middle code (ONNX Runtime's own quantiser,
/// bit for bit).
/// Embeddings, LayerNorms, biases and the vision graph stay in the package's dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// 4 or 8.
    pub bits: u32,
    /// Weights per scale, along the input features: a power of two, 16 to 256.
    pub block_size: usize,
    /// `MatMulNBits`' `accuracy_level`: 0 computes in f32 from dequantised weights; 4 quantises
    /// activations to int8 per block and multiplies in integers (AVX-512 VNNI / AVX2 on CPU).
    pub accuracy_level: u32,
}

impl Quantization {
    pub const BITS: [u32; 2] = [4, 8];
    pub const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];
    pub const ACCURACY_LEVELS: [u32; 5] = [0, 1, 2, 3, 4];

    /// `int4` / `int8`, as `--quantize` names it.
    pub fn name(&self) -> String {
        format!("int{}", self.bits)
    }

    /// Why these settings cannot be exported, if they cannot.
    pub fn invalid_setting(&self) -> Option<String> {
        if !Self::BITS.contains(&self.bits) {
            return Some(format!("{} bits (available: 4, 8)", self.bits));
        }
        if !Self::BLOCK_SIZES.contains(&self.block_size) {
            return Some(format!(
                "block size {} (available: 16, 32, 64, 128, 256)",
                self.block_size
            ));
        }
        if !Self::ACCURACY_LEVELS.contains(&self.accuracy_level) {
            return Some(format!(
                "accuracy level {} (available: 0 to 4)",
                self.accuracy_level
            ));
        }
        None
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionGraph {
    pub file: String,
    pub input: String,
    pub output: String,
    pub image_size: usize,
    /// Embeddings per image (the resampler's latents).
    pub tokens_per_image: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderGraph {
    pub file: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Longest past + new sequence the decoder supports.
    pub context_length: usize,
    /// Element type of `past_key_values.*` / `present.*` ("float32", "float16" or "int8": see
    /// [`KvDtype`]).
    pub kv_dtype: String,
    #[serde(default)]
    pub kv_cache: KvCacheLayout,
    /// Template of the cache input/output names; `{i}` is the layer.
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
}

impl DecoderGraph {
    /// The KV buffers' element type, `None` for a name this version does not know.
    pub fn cache_dtype(&self) -> Option<KvDtype> {
        KvDtype::from_element_type(&self.kv_dtype)
    }

    /// Whether the decoder takes `logits_to_keep` (packages before it, and `trt` ones, do not).
    pub fn takes_logits_to_keep(&self) -> bool {
        self.inputs.iter().any(|i| i == io::LOGITS_TO_KEEP)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    pub file: String,
    pub special_tokens: crate::tokenizer::SpecialTokens,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Shortest side resized to this with bicubic filtering, then centre-cropped square.
    pub image_size: usize,
    pub resample: String,
    pub crop: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PackageManifest {
    /// The manifest of a package of `config` in `dtype`/`profile`.
    pub fn new(
        config: &KosmosConfig,
        profile: &str,
        dtype: PackageDtype,
        kv_cache: KvCacheLayout,
        logits_to_keep: bool,
        opset: i64,
        producer: &str,
    ) -> Self {
        let d = &config.decoder;
        let layers = d.decoder_layers;
        let mut inputs: Vec<String> = [
            io::INPUT_IDS,
            io::IMAGE_EMBEDS,
            io::IMAGE_MASK,
            io::ATTENTION_MASK,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if kv_cache == KvCacheLayout::Buffer {
            inputs.push(io::PAST_SEQUENCE_LENGTH.to_string());
        }
        if logits_to_keep {
            inputs.push(io::LOGITS_TO_KEEP.to_string());
        }
        let mut outputs = vec![io::LOGITS.to_string()];
        for i in 0..layers {
            inputs.push(io::past_key(i));
            inputs.push(io::past_value(i));
            outputs.push(io::present_key(i));
            outputs.push(io::present_value(i));
        }
        PackageManifest {
            format_version: FORMAT_VERSION,
            producer: producer.to_string(),
            profile: profile.to_string(),
            dtype,
            opset,
            vision: VisionGraph {
                file: VISION_FILE.into(),
                input: io::PIXEL_VALUES.into(),
                output: io::IMAGE_EMBEDS.into(),
                image_size: config.vision.image_size,
                tokens_per_image: config.resampler.num_latents,
            },
            decoder: DecoderGraph {
                file: DECODER_FILE.into(),
                inputs,
                outputs,
                num_layers: layers,
                num_heads: d.decoder_attention_heads,
                head_dim: d.head_dim(),
                hidden_size: d.decoder_embed_dim,
                vocab_size: d.vocab_size,
                context_length: d.max_target_positions,
                kv_dtype: KvDtype::from(dtype).element_type().into(),
                kv_cache,
                past_key: "past_key_values.{i}.key".into(),
                past_value: "past_key_values.{i}.value".into(),
                present_key: "present.{i}.key".into(),
                present_value: "present.{i}.value".into(),
            },
            tokenizer: TokenizerInfo {
                file: TOKENIZER_FILE.into(),
                special_tokens: config.tokenizer.clone(),
            },
            preprocess: Preprocess {
                image_size: config.vision.image_size,
                resample: "bicubic".into(),
                crop: "center".into(),
                mean: CLIP_MEAN,
                std: CLIP_STD,
            },
            chat_template: None,
            quantization: None,
            awq: None,
            config: config.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serialises") + "\n"
    }

    /// Read and check `dir/kosmos_rt.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelsError::MissingFile {
                    path: path.clone(),
                    what: "package manifest",
                }
            } else {
                ModelsError::io(&path, e)
            }
        })?;
        let m: PackageManifest = serde_json::from_str(&text).map_err(|e| ModelsError::Json {
            path: path.clone(),
            source: e,
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(ModelsError::InvalidConfig {
                path: Some(path),
                message: format!(
                    "package format_version {} (this build reads {FORMAT_VERSION})",
                    m.format_version
                ),
            });
        }
        if let Some(problem) = m.quantization.as_ref().and_then(Quantization::invalid_setting) {
            return Err(ModelsError::InvalidConfig {
                path: Some(path),
                message: format!("quantization: {problem}"),
            });
        }
        m.config.validate()?;
        Ok(m)
    }
}
