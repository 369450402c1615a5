//! The loss-curve PNG written beside a checkpoint: raw loss (light) and its moving average (dark)
//! against steps, on a grid of 10 × 8 cells. The numbers themselves are in `metrics.jsonl`.

use std::path::Path;

use image::{Rgb, RgbImage};

const W: u32 = 800;
const H: u32 = 480;
const MARGIN: u32 = 30;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < W && (y as u32) < H {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Plot `(step, loss)` points to `path` (PNG).
pub fn loss_curve(points: &[(u64, f64)], path: &Path) -> image::ImageResult<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (x0, x1) = (MARGIN as f64, (W - MARGIN) as f64);
    let (y0, y1) = ((H - MARGIN) as f64, MARGIN as f64);
    for i in 0..=10 {
        let x = x0 + (x1 - x0) * i as f64 / 10.0;
        line(&mut img, (x, y0), (x, y1), Rgb([225, 225, 225]));
    }
    for i in 0..=8 {
        let y = y0 + (y1 - y0) * i as f64 / 8.0;
        line(&mut img, (x0, y), (x1, y), Rgb([225, 225, 225]));
    }
    line(&mut img, (x0, y0), (x1, y0), Rgb([0, 0, 0]));
    line(&mut img, (x0, y0), (x0, y1), Rgb([0, 0, 0]));
    let finite: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if finite.len() >= 2 {
        let smax = finite.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let smin = finite.iter().map(|p| p.0).min().unwrap_or(0) as f64;
        let lmax = finite.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let lmin = finite.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
        let to = |(s, l): (u64, f64)| {
            let fx = (s as f64 - smin) / (smax - smin).max(1.0);
            let fy = (l - lmin) / (lmax - lmin).max(1e-9);
            (x0 + (x1 - x0) * fx, y0 + (y1 - y0) * fy)
        };
        for w in finite.windows(2) {
            line(&mut img, to(w[0]), to(w[1]), Rgb([150, 180, 230]));
        }
        let k = (finite.len() / 50).max(1);
        let smooth: Vec<(u64, f64)> = (0..finite.len())
            .map(|i| {
                let lo = i.saturating_sub(k);
                let win = &finite[lo..=i];
                (
                    finite[i].0,
                    win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64,
                )
            })
            .collect();
        for w in smooth.windows(2) {
            line(&mut img, to(w[0]), to(w[1]), Rgb([20, 60, 160]));
        }
    }
    img.save(path)
}
