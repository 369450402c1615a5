//! Lowerings of the KOSMOS-1 modules to ONNX graphs (DESIGN §3 math, §5 package contract).
//! Each mirrors the trainer's tch forward operation for operation, so fp32 results agree to
//! rounding; `Profile::Ort` swaps groups of nodes for ONNX Runtime's fused contrib operators.

pub mod decoder;
pub mod kosmos_ops;
pub mod vision;

use std::collections::HashMap;

use half::f16;
use safetensors::SafeTensors;

use kosmos_models::package::{KvDtype, Quantization};

use crate::Profile;
use crate::error::{ExportError, Result};
use crate::onnx::builder::{Attr, DType, Data, Dim, GraphBuilder, Value};
use crate::quantize;

/// ONNX Runtime's contrib-op domain.
pub const MS_DOMAIN: &str = "com.microsoft";
/// ONNX Runtime's block-quantised MatMul (`--quantize`).
pub const MATMUL_NBITS: &str = "MatMulNBits";

/// Reads checkpoint tensors and adds them as initializers in the export dtype.
pub struct Weights<'c> {
    st: SafeTensors<'c>,
    /// Values that replace checkpoint tensors of the same name and shape (`--awq`'s scaled
    /// LayerNorms and linears).
    replaced: HashMap<String, Vec<f32>>,
    /// Clipping factors of quantised linears by prefix ([out, blocks]; `--awq`).
    clips: HashMap<String, Vec<f32>>,
    /// Float type of the exported weights and activations.
    pub dtype: DType,
    /// Called with the byte size of every weight written (progress reporting).
    pub on_write: Box<dyn Fn(u64) + 'c>,
}

impl<'c> Weights<'c> {
    pub fn new(st: SafeTensors<'c>, dtype: DType, on_write: Box<dyn Fn(u64) + 'c>) -> Self {
        Weights {
            st,
            replaced: HashMap::new(),
            clips: HashMap::new(),
            dtype,
            on_write,
        }
    }

    /// These weights with `replaced` read instead of the checkpoint's tensors of those names,
    /// and the linears in `clips` quantised with those clipping factors.
    pub fn replacing(
        mut self,
        replaced: HashMap<String, Vec<f32>>,
        clips: HashMap<String, Vec<f32>>,
    ) -> Self {
        self.replaced = replaced;
        self.clips = clips;
        self
    }

    /// The f32 values and shape of checkpoint tensor `name`.
    pub fn read(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .st
            .tensor(name)
            .map_err(|e| ExportError::Graph(format!("checkpoint tensor {name}: {e}")))?;
        if let Some(v) = self.replaced.get(name) {
            return Ok((v.clone(), t.shape().to_vec()));
        }
        let data = t.data();
        let values = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((values, t.shape().to_vec()))
    }

    /// Add `values` (f32) as initializer `name` converted to the export dtype.
    pub fn put(
        &self,
        g: &mut GraphBuilder<'_>,
        name: &str,
        shape: &[usize],
        values: &[f32],
    ) -> Result<Value> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        (self.on_write)((values.len() * self.dtype.size()) as u64);
        match self.dtype {
            DType::F16 => {
                let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                g.initializer(name, &dims, Data::F16(&h))
            }
            _ => g.initializer(name, &dims, Data::F32(values)),
        }
    }

    /// Checkpoint tensor `name` as is.
    pub fn param(&self, g: &mut GraphBuilder<'_>, name: &str) -> Result<Value> {
        let (v, shape) = self.read(name)?;
        self.put(g, name, &shape, &v)
    }

    /// A [out, in] Linear weight stored transposed ([in, out]) so the graph multiplies with
    /// `MatMul(x, W^T)` without a runtime Transpose; named `<name>.T`.
    pub fn param_t(&self, g: &mut GraphBuilder<'_>, name: &str) -> Result<Value> {
        let (v, shape) = self.read(name)?;
        let (rows, cols) = (shape[0], shape[1]);
        let t = transpose(&v, rows, cols);
        self.put(g, &format!("{name}.T"), &[cols, rows], &t)
    }
}

pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Shared lowering state of one graph.
pub struct Lower<'a, 'c, 'w> {
    pub g: GraphBuilder<'w>,
    pub w: &'a Weights<'c>,
    pub profile: Profile,
    pub kv_cache: kosmos_models::package::KvCacheLayout,
    /// Write linears as `ai.kosmos::PackedLinear` (the decoder of `--packed-linears`).
    pub packed_linears: bool,
    /// Write the decoder's attention as `ai.kosmos::CachedAttention` (`--cached-attention`).
    pub cached_attention: bool,
    /// Element type of the decoder's KV buffers (the model's, or float16 / int8 under a float32
    /// model with `cached_attention`).
    pub kv_dtype: KvDtype,
    /// Write linears as `com.microsoft::MatMulNBits` with these settings (the decoder of
    /// `--quantize`).
    pub quantization: Option<Quantization>,
}

impl Lower<'_, '_, '_> {
    pub fn dtype(&self) -> DType {
        self.w.dtype
    }

    /// `x @ W^T + b` for checkpoint Linear `prefix` (`prefix.weight`, optional `prefix.bias`),
    /// nodes under the scope of the module's path.
    pub fn linear(&mut self, x: &Value, prefix: &str, bias: bool) -> Result<Value> {
        if self.packed_linears {
            return self.packed_linear(x, prefix, bias);
        }
        if let Some(q) = self.quantization {
            return self.quantized_linear(x, prefix, bias, q);
        }
        let w = self.w;
        self.in_module(prefix, |l| {
            let wt = w.param_t(&mut l.g, &format!("{prefix}.weight"))?;
            let b = if bias {
                Some(w.param(&mut l.g, &format!("{prefix}.bias"))?)
            } else {
                None
            };
            l.g.linear(x, &wt, b.as_ref())
        })
    }

    /// Linear `prefix` as one `ai.kosmos::PackedLinear` node: the weight in 32-column panels
    /// (`<prefix>.weight.packed`), the bias or zeros (`<prefix>.bias.zeros`).
    fn packed_linear(&mut self, x: &Value, prefix: &str, bias: bool) -> Result<Value> {
        use kosmos_plugins::packed_linear::{PANEL, pack_out_in, panels};
        let w = self.w;
        self.in_module(prefix, |l| {
            let (v, shape) = w.read(&format!("{prefix}.weight"))?;
            let (n, k) = (shape[0], shape[1]);
            let wp = w.put(
                &mut l.g,
                &format!("{prefix}.weight.packed"),
                &[panels(n), k, PANEL],
                &pack_out_in(&v, n, k),
            )?;
            let b = if bias {
                w.param(&mut l.g, &format!("{prefix}.bias"))?
            } else {
                w.put(&mut l.g, &format!("{prefix}.bias.zeros"), &[n], &vec![0f32; n])?
            };
            let mut out_shape = x.shape.clone();
            if let Some(last) = out_shape.last_mut() {
                *last = Dim::Fixed(n as i64);
            }
            l.g.use_domain(kosmos_plugins::DOMAIN, kosmos_plugins::DOMAIN_VERSION);
            Ok(l.g
                .node_in(
                    kosmos_plugins::DOMAIN,
                    kosmos_plugins::packed::OP,
                    &[Some(x), Some(&wp), Some(&b)],
                    kosmos_ops::packed_linear_attributes(n),
                    vec![(x.dtype, out_shape)],
                )
                .remove(0))
        })
    }

    /// Linear `prefix` as ONNX Runtime's `com.microsoft::MatMulNBits` (codes
    /// `<prefix>.weight.q<bits>` [N, blocks, blob], scales `<prefix>.weight.scales` [N, blocks]),
    /// then `Add` of the bias.
    fn quantized_linear(&mut self, x: &Value, prefix: &str, bias: bool, q: Quantization) -> Result<Value> {
        let w = self.w;
        self.in_module(prefix, |l| {
            let (v, shape) = w.read(&format!("{prefix}.weight"))?;
            let (n, k) = (shape[0], shape[1]);
            let scale_type = match w.dtype {
                DType::F16 => quantize::ScaleType::F16,
                _ => quantize::ScaleType::F32,
            };
            let clip = w.clips.get(prefix).map(Vec::as_slice);
            let bq = quantize::quantize_blockwise_clipped(&v, n, k, q.bits, q.block_size, scale_type, clip);
            let dims = [n as i64, bq.blocks as i64, bq.blob as i64];
            // Progress counts checkpoint weights converted, so the bar's total stays the f32 size.
            (w.on_write)((v.len() * w.dtype.size()) as u64);
            let codes = l.g.initializer_bytes(
                &format!("{prefix}.weight.q{}", q.bits),
                DType::U8,
                &dims,
                bq.codes,
            )?;
            let scales_name = format!("{prefix}.weight.scales");
            let scales_dims = [n as i64, bq.blocks as i64];
            // Exact either way: fp16 scales were rounded to fp16 by the quantiser.
            let scales = match scale_type {
                quantize::ScaleType::F16 => {
                    let h: Vec<f16> = bq.scales.iter().map(|&v| f16::from_f32(v)).collect();
                    l.g.initializer(&scales_name, &scales_dims, Data::F16(&h))?
                }
                quantize::ScaleType::F32 => {
                    l.g.initializer(&scales_name, &scales_dims, Data::F32(&bq.scales))?
                }
            };
            let mut out_shape = x.shape.clone();
            if let Some(last) = out_shape.last_mut() {
                *last = Dim::Fixed(n as i64);
            }
            l.g.use_domain(MS_DOMAIN, 1);
            let y =
                l.g.node_in(
                    MS_DOMAIN,
                    MATMUL_NBITS,
                    &[Some(x), Some(&codes), Some(&scales)],
                    vec![
                        ("K", Attr::Int(k as i64)),
                        ("N", Attr::Int(n as i64)),
                        ("bits", Attr::Int(q.bits as i64)),
                        ("block_size", Attr::Int(q.block_size as i64)),
                        ("accuracy_level", Attr::Int(q.accuracy_level as i64)),
                    ],
                    vec![(x.dtype, out_shape)],
                )
                .remove(0);
            if !bias {
                return Ok(y);
            }
            let b = w.param(&mut l.g, &format!("{prefix}.bias"))?;
            l.g.add(&y, &b)
        })
    }

    /// LayerNorm `prefix` (`.weight`, `.bias`) over the last axis.
    pub fn layer_norm(&mut self, x: &Value, prefix: &str, eps: f64) -> Result<Value> {
        let w = self.w;
        self.in_module(prefix, |l| {
            let scale = w.param(&mut l.g, &format!("{prefix}.weight"))?;
            let bias = w.param(&mut l.g, &format!("{prefix}.bias"))?;
            Ok(l.g.layer_norm(x, &scale, &bias, eps))
        })
    }

    /// `ai.kosmos::SubLnGelu`: LayerNorm `prefix` of GELU(x) in one node.
    pub fn subln_gelu(&mut self, x: &Value, prefix: &str, eps: f64) -> Result<Value> {
        let w = self.w;
        self.in_module(prefix, |l| {
            let scale = w.param(&mut l.g, &format!("{prefix}.weight"))?;
            let bias = w.param(&mut l.g, &format!("{prefix}.bias"))?;
            l.g.use_domain(kosmos_plugins::DOMAIN, kosmos_plugins::DOMAIN_VERSION);
            Ok(l.g
                .node_in(
                    kosmos_plugins::DOMAIN,
                    kosmos_plugins::subln::OP,
                    &[Some(x), Some(&scale), Some(&bias)],
                    kosmos_ops::subln_attributes(eps as f32),
                    vec![(x.dtype, x.shape.clone())],
                )
                .remove(0))
        })
    }

    /// Run `f` with node names scoped by a dotted parameter path (`decoder.layers.3.ffn.fc1` →
    /// `/decoder/layers.3/ffn/fc1/...`).
    pub fn in_module<T>(&mut self, path: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let parts = module_scope(path);
        for p in &parts {
            self.g.scope_push(p);
        }
        let r = f(self);
        for _ in &parts {
            self.g.scope_pop();
        }
        r
    }

    /// Exact (erf) GELU, computed in fp32 as the trainer does.
    pub fn gelu(&mut self, x: &Value) -> Result<Value> {
        let dt = x.dtype;
        let x = self.g.cast(x, DType::F32);
        let y = if self.profile == Profile::Ort {
            self.g.use_domain(MS_DOMAIN, 1);
            self.g
                .node_in(
                    MS_DOMAIN,
                    "Gelu",
                    &[Some(&x)],
                    vec![],
                    vec![(DType::F32, x.shape.clone())],
                )
                .remove(0)
        } else {
            // (x·0.5)·(1 + erf(x / √2)) in exactly the form ONNX Runtime's GeluFusion matches,
            // so the five nodes run as one kernel there.
            let sqrt2 = self.g.scalar(std::f32::consts::SQRT_2, DType::F32)?;
            let s = self.g.div(&x, &sqrt2)?;
            let e = self.g.unary("Erf", &s);
            let e1 = self.g.add_scalar(&e, 1.0)?;
            let half = self.g.mul_scalar(&x, 0.5)?;
            self.g.mul(&half, &e1)?
        };
        Ok(self.g.cast(&y, dt))
    }

    /// CLIP's quick_gelu: x · sigmoid(1.702 x).
    pub fn quick_gelu(&mut self, x: &Value) -> Result<Value> {
        if self.profile == Profile::Ort {
            self.g.use_domain(MS_DOMAIN, 1);
            return Ok(self
                .g
                .node_in(
                    MS_DOMAIN,
                    "QuickGelu",
                    &[Some(x)],
                    vec![("alpha", Attr::Float(1.702))],
                    vec![(x.dtype, x.shape.clone())],
                )
                .remove(0));
        }
        let s = self.g.mul_scalar(x, 1.702)?;
        let s = self.g.unary("Sigmoid", &s);
        self.g.mul(x, &s)
    }

    /// Softmax over the last axis in fp32, returned in `x`'s type.
    pub fn softmax_f32(&mut self, x: &Value) -> Value {
        let dt = x.dtype;
        let x = self.g.cast(x, DType::F32);
        let y = self.g.softmax(&x);
        self.g.cast(&y, dt)
    }
}

/// `decoder.layers.3.ffn.fc1` → ["decoder", "layers.3", "ffn", "fc1"]: numeric path parts stay
/// with the name before them, as in the reference exporters' node names.
pub fn module_scope(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in path.split('.') {
        match out.last_mut() {
            Some(last) if part.chars().all(|c| c.is_ascii_digit()) => {
                last.push('.');
                last.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// Float constants in the export dtype.
pub fn float_data(values: &[f32], dtype: DType) -> FloatData {
    match dtype {
        DType::F16 => FloatData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
        _ => FloatData::F32(values.to_vec()),
    }
}

pub enum FloatData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl FloatData {
    pub fn data(&self) -> Data<'_> {
        match self {
            FloatData::F32(v) => Data::F32(v),
            FloatData::F16(v) => Data::F16(v),
        }
    }
}

impl Lower<'_, '_, '_> {
    /// [b, s, heads·hd] → [b, heads, s, hd].
    pub fn split_heads(&mut self, x: &Value, heads: usize) -> Result<Value> {
        let hd = match x.dim(-1) {
            crate::onnx::builder::Dim::Fixed(d) => *d / heads as i64,
            d => return Err(ExportError::Graph(format!("split_heads: symbolic width {d}"))),
        };
        let (b, s) = (x.shape[0].clone(), x.shape[1].clone());
        let r = self
            .g
            .reshape(x, &[0, 0, heads as i64, hd], crate::shape![b, s, heads, hd])?;
        Ok(self.g.transpose(&r, &[0, 2, 1, 3]))
    }

    /// [b, heads, s, hd] → [b, s, heads·hd].
    pub fn merge_heads(&mut self, x: &Value) -> Result<Value> {
        let t = self.g.transpose(x, &[0, 2, 1, 3]);
        let (b, s, h, d) = (&t.shape[0], &t.shape[1], &t.shape[2], &t.shape[3]);
        let width = match (h, d) {
            (crate::onnx::builder::Dim::Fixed(h), crate::onnx::builder::Dim::Fixed(d)) => h * d,
            _ => return Err(ExportError::Graph("merge_heads: symbolic head sizes".into())),
        };
        let shape = crate::shape![b, s, width];
        self.g.reshape(&t, &[0, 0, width], shape)
    }
}
