//! `kosmos-plugins`: the custom ops of domain `ai.kosmos`, version 1 (DESIGN §6), for the
//! pieces of KOSMOS-1 that standard ONNX spells out in many small nodes (xPos and the FFN's
//! sub-LN) or that ONNX Runtime's CPU kernels run slower than they could (the decode GEMMs,
//! attention over a KV buffer).
//!
//! Each op has up to four forms that must agree (tests/plugins.rs checks the first three to
//! ≤1e-5):
//! * the spec below;
//! * an ONNX `FunctionProto` body of standard opset-17 ops, written by `kosmos-export`
//!   (`kosmos_export::lower::kosmos_ops`) into every model that calls the op, so ONNX Runtime and
//!   TensorRT's parser inline it wherever no kernel is registered;
//! * a fused ONNX Runtime CPU kernel ([`ort_ops`], math in [`reference`]), which `kosmos-rt`
//!   registers on its sessions (a registered kernel takes precedence over the model-local
//!   function);
//! * for the ops of the `trt` profile (`XPos`, `SubLnGelu`), a TensorRT `IPluginV3` with CUDA
//!   kernels (`plugins/tensorrt/`, built with CMake where the TensorRT SDK is installed; nodes
//!   carry `plugin_namespace = "ai.kosmos"`). `PackedLinear` and `CachedAttention` are CPU
//!   kernels: a GPU runs their bodies.
//!
//! # `ai.kosmos::XPos` (v1)
//!
//! Rotary embedding with xPos's per-position scale (Sun et al. 2022, as torchscale 0.3.0),
//! GPT-J-style interleaved pairs, for any per-token absolute positions and a fixed centre.
//!
//! * input `X`: T[batch, heads, seq, head_dim] (head_dim even) — queries or keys, one head each;
//! * input `positions`: int64[batch, seq] — absolute position t of each token;
//! * output `Y`: T, same shape as `X`;
//! * attributes: `theta` (float, 10000), `scale_base` (float, 512), `centre` (float, c),
//!   `downscale` (int: 0 for queries, 1 for keys); `plugin_namespace`, `plugin_version`
//!   (strings, read by TensorRT's parser only);
//! * T: float32 (the `trt` profile is float32; TensorRT chooses precisions when it builds).
//!
//! With d = head_dim, i = 0..d/2, θ_i = 1 / theta^(i/(d/2)), ζ_i = (2i + 0.4d) / (1.4d),
//! s_i = ζ_i^((t − c)/scale_base) for queries and 1/ζ_i^((t − c)/scale_base) for keys:
//!
//! ```text
//! Y[.., 2i]   = (X[.., 2i]·cos(tθ_i) − X[.., 2i+1]·sin(tθ_i)) · s_i
//! Y[.., 2i+1] = (X[.., 2i+1]·cos(tθ_i) + X[.., 2i]·sin(tθ_i)) · s_i
//! ```
//!
//! The tables are formed in float32 exactly as the trainer forms them (`kosmos_train`'s xPos).
//!
//! # `ai.kosmos::SubLnGelu` (v1)
//!
//! The middle of the sub-LN feed-forward block, `ffn_layernorm(gelu(fc1(x)))`:
//!
//! * inputs `X`: T[..., F], `gamma`: T[F], `beta`: T[F]; output `Y`: T[..., F];
//! * attribute `epsilon` (float, 1e-5); `plugin_namespace`, `plugin_version` as above;
//! * `Y = (G − mean(G)) / sqrt(var(G) + epsilon) · gamma + beta` over the last axis, with
//!   `G = 0.5·X·(1 + erf(X/√2))` (exact GELU) and the biased variance.
//!
//! The LayerNorm before `out_proj` (`inner_attn_ln`) stays a standard `LayerNormalization`: it
//! has nothing to fuse with (TensorRT ≥ 8.6 and ONNX Runtime have it natively).
//!
//! # `ai.kosmos::PackedLinear` (v1)
//!
//! A linear layer whose weight is stored in 32-column panels, for a CPU GEMM that serves the
//! 1–16 rows of a decode step at memory speed ([`packed_linear`] says why). `kosmos-export
//! --packed-linears` writes the decoder's linears this way; the vision graph keeps `MatMul`.
//!
//! * inputs `X`: T[..., K]; `W_packed`: T[P, K, 32] with P = ⌈n/32⌉ and
//!   `W_packed[p, k, c] = W[k, 32p + c]` (zero for 32p + c ≥ n); `B`: T[n] (zeros for a linear
//!   without bias: a function input cannot be left out);
//! * attribute `n` (int): output features;
//! * output `Y`: T[..., n] = `X · W + B`;
//! * T: float32 (the kernel is float32; the exporter refuses `--dtype fp16` with it).
//!
//! The function body unpacks with `Transpose(perm = [1, 0, 2])`, `Reshape([K, P·32])` and
//! `Slice` to n columns, then `MatMul` and `Add`; ONNX Runtime folds the unpacking of a constant
//! weight once at load, so a runtime without the kernel runs the plain `MatMul`.
//!
//! # `ai.kosmos::CachedAttention` (v1)
//!
//! Attention of a step's new tokens over a fixed-capacity KV buffer (the `--kv-cache buffer`
//! layout), whose CPU kernel reads each row's own keys only ([`cached_attention`] says why).
//! `kosmos-export --cached-attention` writes the decoder's attention this way.
//!
//! * inputs `Q`, `K`, `V`: T[b, h, s, d] (queries already scaled by 1/√d and, like the keys,
//!   through xPos); `past_key`, `past_value`: C[b, h, c, d′]; `past_sequence_length`:
//!   int64[b] with 0 ≤ p_r ≤ c − s; `visible`: bool[b, 1, s, c];
//! * outputs `Y`: T[b, h, s, d]; `present_key`, `present_value`: C[b, h, c, d′];
//! * T: float32 (the kernel is float32; the exporter refuses `--dtype fp16` with it);
//! * C: float32 or float16 (`kosmos-export --kv-cache-dtype fp16`: half the cache's memory and
//!   of the bytes a step reads from it), with d′ = d; or int8 (`--kv-cache-dtype int8`: a
//!   quarter of float32's, plus one byte per row) with d′ = d + 1. ONNX Runtime picks the kernel
//!   by C.
//!
//! An int8 slot row is d values v and, last, an exponent e, and stands for v · 2^e. Storing x
//! (d float32s) takes the least e in −100 … 127 with max|x| ≤ 127 · 2^e, and v = x / 2^e
//! rounded to nearest even (|v| ≤ 127; the division is exact). A power of two, unlike a float
//! scale, is stored in the row's own type and applied exactly: the standard-op body computes the
//! same bytes as the kernel, and dequantising commutes with the dot products. Its step is
//! between 1/127 and 1/63.5 of the row's largest value, a 7- or 8-bit quantiser per token and
//! head (llama.cpp's `q8_0` KV cache has one float16 scale per 32 values; TensorRT-LLM's int8
//! cache one calibrated scale per tensor).
//!
//! `present_*` are `past_*` with slots p_r .. p_r + s of row r replaced by `K`, `V` stored as C
//! (rounded to nearest even). Let key_j be the j-th row of `past_key[r, :]` widened to float32
//! for j < p_r and beyond p_r + s, and `K[r, :, j − p_r]` itself (not rounded) for the call's own
//! slots; value_j likewise. `Y[r, :, i] = Σ_j softmax_j(S_ij) · value_j` with
//! `S_ij = Q[r, :, i] · key_j` where `visible[r, 0, i, j]` and the lowest float32 elsewhere (so a
//! query with no visible key gets the mean of all c values, as `Softmax` gives). For C = float32
//! key_j is simply `present_key[r, :, j]`. When the runtime binds one buffer as both `past_*` and
//! `present_*`, the kernel writes only the new slots.
//!
//! Why a call's own rows are read unrounded: a prefill then gives exactly the float32 model's
//! logits. The price: a float16 cache's output depends, in its last bits, on where a sequence's
//! calls split it (a prompt prefilled in chunks, or partly from the prefix cache, reads its
//! earlier part rounded), as a quantised model's does.
//!
//! The function body is the standard-op attention of the other profiles: `ScatterND` of K and V
//! at (row, head, p_r + i), `MatMul` with the transposed keys, `Where`, `Softmax`, `MatMul`; for
//! C = float16 the presents take `Cast(K)` and the attention reads `ScatterND(Cast(past_key), K)`;
//! for C = int8 `Cast` becomes the quantisation above (`ReduceMax`, `Log`, `Ceil`, two exact
//! `Where` corrections of the exponent, `Pow`, `Div`, `Round`, `Concat`) and its inverse.

pub mod cached_attention;
pub mod ort_ops;
pub mod packed_linear;
pub mod reference;

/// The op domain of every custom op here.
pub const DOMAIN: &str = "ai.kosmos";
/// Its version.
pub const DOMAIN_VERSION: i64 = 1;
/// The `plugin_namespace` the TensorRT plugins register under, carried by every node.
pub const PLUGIN_NAMESPACE: &str = "ai.kosmos";
/// The `plugin_version` of the TensorRT plugins.
pub const PLUGIN_VERSION: &str = "1";

/// `ai.kosmos::XPos`.
pub mod xpos {
    pub const OP: &str = "XPos";
    pub const THETA: &str = "theta";
    pub const SCALE_BASE: &str = "scale_base";
    pub const CENTRE: &str = "centre";
    pub const DOWNSCALE: &str = "downscale";
}

/// `ai.kosmos::SubLnGelu`.
pub mod subln {
    pub const OP: &str = "SubLnGelu";
    pub const EPSILON: &str = "epsilon";
}

/// The ops whose only kernels are CPU kernels: a GPU session runs them on the CPU beside it.
pub const CPU_OPS: [&str; 2] = [packed::OP, cached::OP];
/// Model metadata key the exporter sets to the comma-separated [`CPU_OPS`] a graph calls (absent
/// when it calls none), so a runtime can warn before placing such a graph on a GPU.
pub const CPU_OPS_METADATA_KEY: &str = "kosmos.cpu_ops";

/// `ai.kosmos::CachedAttention`.
pub mod cached {
    pub const OP: &str = "CachedAttention";
    pub const INPUTS: [&str; 7] = [
        "Q",
        "K",
        "V",
        "past_key",
        "past_value",
        "past_sequence_length",
        "visible",
    ];
    pub const OUTPUTS: [&str; 3] = ["Y", "present_key", "present_value"];
}

/// `ai.kosmos::PackedLinear`.
pub mod packed {
    pub const OP: &str = "PackedLinear";
    /// Output features (the packed weight's last panel may be padded).
    pub const N: &str = "n";
}

/// The TensorRT plugin library `plugins/tensorrt/CMakeLists.txt` builds.
pub const TRT_PLUGIN_LIBRARY: &str = "libkosmos_trt_plugins.so";
/// The environment variable naming it for `kosmos-export --to trt` and `kosmos-rt --device
/// tensorrt`.
pub const TRT_PLUGIN_LIBRARY_ENV: &str = "KOSMOS_TRT_PLUGINS";

/// Attributes every node carries for TensorRT's parser.
pub const PLUGIN_NAMESPACE_ATTR: &str = "plugin_namespace";
pub const PLUGIN_VERSION_ATTR: &str = "plugin_version";
