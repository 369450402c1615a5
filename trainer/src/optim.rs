//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction), written over
//! tch tensors so its state (step, first and second moments) is saved in checkpoints and a resumed
//! run continues exactly; plus the learning-rate schedule and gradient-norm clipping.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Trainable parameters by checkpoint name.
    params: BTreeMap<String, Tensor>,
    exp_avg: BTreeMap<String, Tensor>,
    exp_avg_sq: BTreeMap<String, Tensor>,
    pub step: u64,
}

impl AdamW {
    pub fn new(params: BTreeMap<String, Tensor>, cfg: AdamWConfig) -> Self {
        let zeros = |p: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            p.iter()
                .map(|(n, t)| (n.clone(), t.zeros_like().set_requires_grad(false)))
                .collect()
        };
        AdamW {
            exp_avg: zeros(&params),
            exp_avg_sq: zeros(&params),
            params,
            cfg,
            step: 0,
        }
    }

    /// Global L2 norm of the gradients; scales them down to `max_norm` when above it
    /// (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .values()
                .map(|p| p.grad())
                .filter(|g| g.defined())
                .collect();
            if grads.is_empty() {
                return 0.0;
            }
            let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
            let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
            let coef = max_norm / (total + 1e-6);
            if max_norm > 0.0 && coef < 1.0 {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            }
            total
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2 = 1.0 - beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (name, p) in &self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let mut m = self.exp_avg[name].shallow_clone();
                let mut v = self.exp_avg_sq[name].shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                let _ = m.lerp_(&g, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2).addcmul_(&g, &g.g_mul_scalar(1.0 - beta2));
                let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar(eps);
                let _ = p.addcdiv_(&(&m * (-lr / bc1)), &denom);
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in self.params.values() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Save the moments to `path` (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (n, t) in &self.exp_avg {
            named.push((format!("exp_avg.{n}"), t));
        }
        for (n, t) in &self.exp_avg_sq {
            named.push((format!("exp_avg_sq.{n}"), t));
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        Tensor::write_safetensors(&refs, path)?;
        Ok(())
    }

    /// Load moments saved by [`AdamW::save`]; every trainable parameter must have them.
    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (prefix, store) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                for (n, t) in store {
                    let key = format!("{prefix}.{n}");
                    let src = saved.get(&key).ok_or_else(|| {
                        TrainError::Data(format!(
                            "{}: no {key} (was the checkpoint trained with other frozen parts?)",
                            path.display()
                        ))
                    })?;
                    t.shallow_clone().f_copy_(src)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then linear decay to 0 at `total` steps.
pub fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else if total > warmup {
        peak * (total.saturating_sub(step)) as f64 / (total - warmup) as f64
    } else {
        peak
    }
}
