//! The ops' math on the CPU, as the fused ONNX Runtime kernels run it (see the crate docs for
//! the specs). Shapes are checked here so the kernels report bad input by name.

/// Attributes of `ai.kosmos::XPos`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XposAttrs {
    pub theta: f32,
    pub scale_base: f32,
    pub centre: f32,
    /// Keys (1/ζ^e) rather than queries (ζ^e).
    pub downscale: bool,
}

/// xPos of `x` [batch, heads, seq, head_dim] at `positions` [batch, seq], into `out`.
pub fn xpos(
    x: &[f32],
    shape: [usize; 4],
    positions: &[i64],
    a: &XposAttrs,
    out: &mut [f32],
) -> Result<(), String> {
    let [b, h, s, d] = shape;
    if !d.is_multiple_of(2) {
        return Err(format!("XPos: head_dim {d} is odd"));
    }
    if positions.len() != b * s {
        return Err(format!(
            "XPos: positions has {} elements, expected batch {b} x seq {s}",
            positions.len()
        ));
    }
    if x.len() != b * h * s * d || out.len() != x.len() {
        return Err(format!("XPos: X has {} elements, shape {shape:?}", x.len()));
    }
    let half = d / 2;
    // The trainer's float32 tables: θ_i = 1/theta^(i/half), ζ_i = (2i + 0.4d)/(1.4d).
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / a.theta.powf(i as f32 / half as f32))
        .collect();
    let (lo, hi) = ((0.4 * d as f64) as f32, (1.4 * d as f64) as f32);
    let zeta: Vec<f32> = (0..half).map(|i| ((2 * i) as f32 + lo) / hi).collect();
    let mut cs = vec![0f32; half];
    let mut sn = vec![0f32; half];
    for bi in 0..b {
        for si in 0..s {
            let t = positions[bi * s + si] as f32;
            let expo = (t - a.centre) / a.scale_base;
            for i in 0..half {
                let angle = t * inv_freq[i];
                let mut scale = zeta[i].powf(expo);
                if a.downscale {
                    scale = 1.0 / scale;
                }
                cs[i] = angle.cos() * scale;
                sn[i] = angle.sin() * scale;
            }
            for hi in 0..h {
                let off = ((bi * h + hi) * s + si) * d;
                let (xr, yr) = (&x[off..off + d], &mut out[off..off + d]);
                for i in 0..half {
                    let (x0, x1) = (xr[2 * i], xr[2 * i + 1]);
                    yr[2 * i] = x0 * cs[i] - x1 * sn[i];
                    yr[2 * i + 1] = x1 * cs[i] + x0 * sn[i];
                }
            }
        }
    }
    Ok(())
}

/// LayerNorm(GELU(x)) over rows of `gamma.len()` features, into `out`.
pub fn subln_gelu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    out: &mut [f32],
) -> Result<(), String> {
    let f = gamma.len();
    if f == 0 || beta.len() != f {
        return Err(format!(
            "SubLnGelu: gamma has {f} and beta {} elements; they must be equal and non-empty",
            beta.len()
        ));
    }
    if !x.len().is_multiple_of(f) || out.len() != x.len() {
        return Err(format!(
            "SubLnGelu: X has {} elements, not rows of {f} features",
            x.len()
        ));
    }
    let mut g = vec![0f64; f];
    for (xr, yr) in x.chunks_exact(f).zip(out.chunks_exact_mut(f)) {
        for (gi, &v) in g.iter_mut().zip(xr) {
            let v = v as f64;
            *gi = 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
        }
        let mean = g.iter().sum::<f64>() / f as f64;
        let var = g.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / f as f64;
        let inv = 1.0 / (var + epsilon as f64).sqrt();
        for i in 0..f {
            yr[i] = ((g[i] - mean) * inv * gamma[i] as f64 + beta[i] as f64) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xpos_at_the_centre_is_a_plain_rotation() {
        let a = XposAttrs {
            theta: 10000.0,
            scale_base: 512.0,
            centre: 3.0,
            downscale: false,
        };
        let x = [1.0, 0.0, 0.0, 1.0];
        let mut y = [0.0; 4];
        xpos(&x, [1, 1, 1, 4], &[3], &a, &mut y).unwrap();
        // pair 0: angle 3 rad; pair 1: angle 3/100 rad; scale 1 at t == centre.
        assert!((y[0] - 3f32.cos()).abs() < 1e-6 && (y[1] - 3f32.sin()).abs() < 1e-6);
        assert!((y[2] + 0.03f32.sin()).abs() < 1e-6 && (y[3] - 0.03f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn bad_shapes_are_named() {
        let a = XposAttrs {
            theta: 1e4,
            scale_base: 512.0,
            centre: 0.0,
            downscale: true,
        };
        let mut y = [0.0; 3];
        assert!(
            xpos(&[0.0; 3], [1, 1, 1, 3], &[0], &a, &mut y)
                .unwrap_err()
                .contains("odd")
        );
        let mut y = [0.0; 4];
        assert!(
            xpos(&[0.0; 4], [1, 1, 2, 2], &[0], &a, &mut y)
                .unwrap_err()
                .contains("positions")
        );
        assert!(
            subln_gelu(&[0.0; 5], &[1.0; 2], &[0.0; 2], 1e-5, &mut [0.0; 5])
                .unwrap_err()
                .contains("rows")
        );
    }

    #[test]
    fn subln_gelu_normalises() {
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let mut y = vec![0.0; 8];
        subln_gelu(&x, &[1.0; 8], &[0.0; 8], 1e-5, &mut y).unwrap();
        let mean: f32 = y.iter().sum::<f32>() / 8.0;
        let var: f32 = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 8.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-3, "{mean} {var}");
    }
}
