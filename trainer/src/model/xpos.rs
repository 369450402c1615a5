//! xPos (Sun et al. 2022) exactly as torchscale 0.3.0 computes it, but for arbitrary per-token
//! positions and a fixed scale centre (DESIGN §3):
//! q_t ← R(tθ)·q_t ⊙ ζ^((t−c)/base), k_t ← R(tθ)·k_t ⊙ ζ^(−(t−c)/base), interleaved pairs.

use tch::{Kind, Tensor};

/// Rotation and scale tables for one batch of positions, shaped [b, 1, s, head_dim] to broadcast
/// over heads.
pub struct XposTables {
    cos: Tensor,
    sin: Tensor,
    q_scale: Tensor,
    k_scale: Tensor,
}

/// Inputs of the tables that depend only on the head size.
#[derive(Debug)]
pub struct Xpos {
    /// θ_i = 10000^(−i/(d/2)), as torchscale's `fixed_pos_embedding`.
    inv_freq: Tensor,
    /// ζ_i = (2i + 0.4d) / (1.4d).
    zeta: Tensor,
    scale_base: f64,
    centre: f64,
}

impl Xpos {
    pub fn new(head_dim: usize, scale_base: f64, centre: f64) -> Self {
        let half = (head_dim / 2) as i64;
        let opts = (Kind::Float, tch::Device::Cpu);
        // Same float32 operations as torchscale, so the tables agree bit for bit.
        let inv_freq = Tensor::pow_scalar(10000.0, &(Tensor::arange(half, opts) / half as f64)).reciprocal();
        let zeta = (Tensor::arange_start_step(0, head_dim as i64, 2, opts) + 0.4 * head_dim as f64)
            / (1.4 * head_dim as f64);
        Xpos {
            inv_freq,
            zeta,
            scale_base,
            centre,
        }
    }

    /// Tables for absolute `positions` [b, s] (i64).
    pub fn tables(&self, positions: &Tensor) -> XposTables {
        let device = positions.device();
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1); // [b, s, 1]
        let angles = &pos * self.inv_freq.to_device(device); // [b, s, d/2]
        let expo = (&pos - self.centre) / self.scale_base;
        let scale = self.zeta.to_device(device).pow(&expo); // [b, s, d/2]
        let interleave = |t: Tensor| t.repeat_interleave_self_int(2, -1, None).unsqueeze(1);
        XposTables {
            cos: interleave(angles.cos()),
            sin: interleave(angles.sin()),
            k_scale: interleave(scale.reciprocal()),
            q_scale: interleave(scale),
        }
    }
}

impl XposTables {
    pub fn apply_q(&self, x: &Tensor) -> Tensor {
        rotate(x, &self.cos, &self.sin, &self.q_scale)
    }
    pub fn apply_k(&self, x: &Tensor) -> Tensor {
        rotate(x, &self.cos, &self.sin, &self.k_scale)
    }
}

/// (x·cos + rotate_every_two(x)·sin)·scale, with x [b, h, s, d].
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: &Tensor) -> Tensor {
    let kind = x.kind();
    let cos = (cos * scale).to_kind(kind);
    let sin = (sin * scale).to_kind(kind);
    x * cos + rotate_every_two(x) * sin
}

/// (x0, x1, x2, x3, ...) → (−x1, x0, −x3, x2, ...).
fn rotate_every_two(x: &Tensor) -> Tensor {
    let mut shape = x.size();
    let d = *shape.last().expect("head dim");
    shape.pop();
    let mut pairs = shape.clone();
    pairs.extend([d / 2, 2]);
    let x = x.reshape(&pairs);
    let x1 = x.select(-1, 0);
    let x2 = x.select(-1, 1);
    Tensor::stack(&[-x2, x1], -1).flatten(-2, -1)
}
