//! Image decoding and CLIP preprocessing against Hugging Face's CLIPImageProcessor
//! (scripts/oracles/clip_preprocess.py in .venv): ≤1e-2 mean abs difference.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage, Rgba, RgbaImage};
use kosmos_models::image::{ImageLimits, clip_preprocess, decode_image, load_image};

fn venv_python() -> PathBuf {
    let venv =
        std::env::var("KOSMOS_VENV").unwrap_or_else(|_| format!("{}/../.venv", env!("CARGO_MANIFEST_DIR")));
    let py = Path::new(&venv).join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh", py.display());
    py
}

/// A picture with edges, gradients and texture, so resampling differences would show.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let r = (x * 255 / w.max(1)) as u8;
        let g = (y * 255 / h.max(1)) as u8;
        let b = if (x / 7 + y / 5) % 2 == 0 { 230 } else { 20 };
        Rgb([r, g, b])
    })
}

#[test]
fn matches_hf_clip_image_processor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut save = |name: &str, f: &dyn Fn(&Path)| {
        let p = tmp.path().join(name);
        f(&p);
        files.push(p);
    };
    save("wide.png", &|p| picture(300, 200).save(p).unwrap());
    save("tall.jpg", &|p| picture(120, 257).save(p).unwrap());
    save("small.png", &|p| picture(40, 30).save(p).unwrap()); // upscaled
    save("exact.png", &|p| picture(64, 64).save(p).unwrap());
    save("alpha.png", &|p| {
        RgbaImage::from_fn(90, 70, |x, y| {
            Rgba([(x * 2) as u8, (y * 3) as u8, 128, (x + y) as u8])
        })
        .save(p)
        .unwrap()
    });
    save("photo.webp", &|p| picture(77, 133).save(p).unwrap());

    for size in [64u32, 224] {
        let out = tmp.path().join(format!("ref{size}.safetensors"));
        let mut cmd = Command::new(venv_python());
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oracles/clip_preprocess.py"))
            .args(["--size", &size.to_string(), "--output", out.to_str().unwrap()])
            .args(&files);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("pixel_values").unwrap();
        let reference: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let per = (3 * size * size) as usize;
        for (i, f) in files.iter().enumerate() {
            let ours = clip_preprocess(&load_image(f, ImageLimits::default()).unwrap(), size);
            let theirs = &reference[i * per..(i + 1) * per];
            let mean_abs: f64 = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
                / per as f64;
            eprintln!("{} @ {size}: mean abs {mean_abs:.4}", f.display());
            assert!(mean_abs <= 1e-2, "{}: mean abs {mean_abs} > 1e-2", f.display());
        }
    }
}

#[test]
fn bad_images_are_named_errors() {
    let e = decode_image(b"hello, not an image", "notes.txt", ImageLimits::default()).unwrap_err();
    assert!(e.to_string().contains("notes.txt"), "{e}");
    let mut png = Vec::new();
    picture(50, 50)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let e = decode_image(&png[..png.len() / 2], "cut.png", ImageLimits::default()).unwrap_err();
    assert!(e.to_string().contains("cut.png"), "{e}");
    let small = ImageLimits {
        max_side: 32,
        max_bytes: 1 << 20,
    };
    let e = decode_image(&png, "big.png", small).unwrap_err();
    assert!(e.to_string().contains("big.png"), "{e}");
}
