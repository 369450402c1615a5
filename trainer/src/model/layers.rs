//! The building blocks: Linear and LayerNorm over tch variables, created with the reference
//! implementations' own initialisation so that building a model is initialising it.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Mixed precision: when on, matrix products run in bfloat16 and everything else (LayerNorm,
/// softmax, GELU, the residual stream, the loss) stays float32 — what `torch.autocast` does for
/// bf16. Process-wide, set once by the training loop.
static BF16_MATMULS: AtomicBool = AtomicBool::new(false);

pub fn set_bf16_matmuls(on: bool) {
    BF16_MATMULS.store(on, Ordering::Relaxed);
}

/// `a @ b`, in bf16 when mixed precision is on (result in `a`'s kind).
pub fn matmul(a: &Tensor, b: &Tensor) -> Tensor {
    if BF16_MATMULS.load(Ordering::Relaxed) {
        a.to_kind(Kind::BFloat16)
            .matmul(&b.to_kind(Kind::BFloat16))
            .to_kind(a.kind())
    } else {
        a.matmul(b)
    }
}

/// How a variable starts. `zeros` skips random draws when the weights are about to be loaded.
#[derive(Clone, Copy, Debug)]
pub struct InitMode {
    pub random: bool,
}

impl InitMode {
    pub fn init(self, init: Init) -> Init {
        if self.random { init } else { Init::Const(0.0) }
    }
}

/// PyTorch's default `nn.Linear` init: weight and bias ~ U(±1/sqrt(fan_in)).
pub fn torch_default(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

pub fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `Linear(i → o)` under `p / name` with weight init `w` and bias init `b` (`None`: no bias).
    pub fn new(p: &Path, name: &str, i: usize, o: usize, w: Init, b: Option<Init>, m: InitMode) -> Self {
        let p = p / name;
        let weight = p.var("weight", &[o as i64, i as i64], m.init(w));
        let bias = b.map(|b| p.var("bias", &[o as i64], m.init(b)));
        Linear { weight, bias }
    }

    /// PyTorch-default Linear (with bias).
    pub fn torch(p: &Path, name: &str, i: usize, o: usize, m: InitMode) -> Self {
        Self::new(p, name, i, o, torch_default(i), Some(torch_default(i)), m)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if BF16_MATMULS.load(Ordering::Relaxed) {
            let h = Kind::BFloat16;
            let b = self.bias.as_ref().map(|b| b.to_kind(h));
            x.to_kind(h)
                .linear(&self.weight.to_kind(h), b.as_ref())
                .to_kind(x.kind())
        } else {
            x.linear(&self.weight, self.bias.as_ref())
        }
    }

    /// Multiply weight and bias in place (Magneto's γ).
    pub fn scale_(&self, gain: f64) {
        tch::no_grad(|| {
            let _ = self.weight.shallow_clone().g_mul_scalar_(gain);
            if let Some(b) = &self.bias {
                let _ = b.shallow_clone().g_mul_scalar_(gain);
            }
        });
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    /// Parameter prefix (`decoder.layers.0.final_layer_norm`), as `kosmos_models::params` names it.
    pub name: String,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, name: &str, dim: usize, eps: f64) -> Self {
        let full_name = p.path(name);
        let p = p / name;
        LayerNorm {
            name: full_name,
            weight: p.var("weight", &[dim as i64], Init::Const(1.0)),
            bias: p.var("bias", &[dim as i64], Init::Const(0.0)),
            dim: dim as i64,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Softmax over the last axis in fp32 (as torchscale and HF do), back in the input's kind.
pub fn softmax_f32(x: &Tensor) -> Tensor {
    x.softmax(-1, Kind::Float).to_kind(x.kind())
}

/// Split the last axis into heads: [b, s, h*d] → [b, h, s, d].
pub fn split_heads(x: &Tensor, heads: usize) -> Tensor {
    let (b, s, hd) = x.size3().expect("rank-3 activations");
    x.view([b, s, heads as i64, hd / heads as i64]).transpose(1, 2)
}

/// Inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, s, d) = x.size4().expect("rank-4 activations");
    x.transpose(1, 2).contiguous().view([b, s, h * d])
}
