//! The built-in synthetic task `shapes`: images with one or two coloured shapes and their
//! captions (`a red circle on the left and a blue square on the right`), plus VQA items
//! (`Question: what colour is the circle? Answer:` → `red`). Item `i` of a split is a pure
//! function of (seed, split, i), so any tool regenerates the same data.

use image::{Rgb, RgbImage};

use crate::prng::Prng;

pub const COLOURS: &[(&str, [u8; 3])] = &[
    ("red", [220, 30, 30]),
    ("green", [30, 160, 50]),
    ("blue", [30, 70, 220]),
    ("yellow", [235, 205, 20]),
    ("purple", [140, 40, 170]),
    ("orange", [250, 135, 15]),
];
pub const SHAPES: &[&str] = &["circle", "square", "triangle"];
pub const SIDES: &[&str] = &["left", "right"];

/// Side of the generated images in pixels.
pub const IMAGE_SIZE: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn stream(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Test => 2,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split {s:?} (train, test)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Captions.
    Shapes,
    /// Question answering.
    ShapesVqa,
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    colour: usize,
    kind: usize,
}

/// One generated item: the image, an optional prompt (no loss) and the target text.
#[derive(Clone, Debug)]
pub struct Item {
    pub image: RgbImage,
    pub prompt: Option<String>,
    pub text: String,
}

/// Item `index` of `task` in `split`.
pub fn item(task: Task, split: Split, seed: u64, index: u64) -> Item {
    let stream = split.stream() * 16 + task as u64;
    let mut rng = Prng::for_item(seed, stream, index);
    let two = rng.below(4) != 0; // three quarters have two shapes
    let shapes: Vec<Shape> = (0..if two { 2 } else { 1 })
        .map(|_| Shape {
            colour: rng.below(COLOURS.len()),
            kind: rng.below(SHAPES.len()),
        })
        .collect();
    let image = render(&shapes, &mut rng);
    let (prompt, text) = match task {
        Task::Shapes => (None, caption(&shapes)),
        Task::ShapesVqa => {
            let (q, a) = question(&shapes, &mut rng);
            (Some(format!("Question: {q} Answer:")), a)
        }
    };
    Item { image, prompt, text }
}

fn caption(shapes: &[Shape]) -> String {
    let name = |s: &Shape| {
        let colour = COLOURS[s.colour].0;
        let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {colour} {}", SHAPES[s.kind])
    };
    match shapes {
        [one] => name(one),
        [l, r] => format!("{} on the left and {} on the right", name(l), name(r)),
        _ => unreachable!("one or two shapes"),
    }
}

fn question(shapes: &[Shape], rng: &mut Prng) -> (String, String) {
    let colour = |s: &Shape| COLOURS[s.colour].0.to_string();
    let kind = |s: &Shape| SHAPES[s.kind].to_string();
    match shapes {
        [one] => match rng.below(3) {
            0 => (format!("what colour is the {}?", kind(one)), colour(one)),
            1 => ("what shape is this?".into(), kind(one)),
            _ => ("how many shapes are there?".into(), "one".into()),
        },
        [l, r] => {
            let distinct = l.kind != r.kind;
            match rng.below(if distinct { 4 } else { 3 }) {
                0 => {
                    let side = rng.below(2);
                    let s = if side == 0 { l } else { r };
                    (
                        format!("what colour is the shape on the {}?", SIDES[side]),
                        colour(s),
                    )
                }
                1 => {
                    let side = rng.below(2);
                    let s = if side == 0 { l } else { r };
                    (format!("what shape is on the {}?", SIDES[side]), kind(s))
                }
                2 => ("how many shapes are there?".into(), "two".into()),
                _ => {
                    let s = if rng.below(2) == 0 { l } else { r };
                    (format!("what colour is the {}?", kind(s)), colour(s))
                }
            }
        }
        _ => unreachable!("one or two shapes"),
    }
}

fn render(shapes: &[Shape], rng: &mut Prng) -> RgbImage {
    let n = IMAGE_SIZE as i64;
    let bg = 235 + rng.range(-10, 10) as i32;
    let mut img = RgbImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |_, _| {
        let v = (bg + rng.range(-6, 6) as i32).clamp(0, 255) as u8;
        Rgb([v, v, v])
    });
    let slots = shapes.len() as i64;
    for (i, s) in shapes.iter().enumerate() {
        // Each shape lives in its own vertical band (left / right when there are two).
        let band = n / slots;
        // One size per layout and a fixed height: with sizes and heights drawn at random (even
        // ±1 px / ±3 px) the tiny ViT, trained from scratch for minutes, learned colour and side
        // but never shape (measured; see the trainer issue). Single shapes still move sideways.
        let r = (band / 2 - 2).min(15);
        let cx =
            band * i as i64 + band / 2 + rng.range(-(band / 2 - r - 1).max(0), (band / 2 - r - 1).max(0));
        let cy = n / 2;
        let jitter = |c: u8, d: i64| (c as i64 + d).clamp(0, 255) as u8;
        let [cr, cg, cb] = COLOURS[s.colour].1;
        let d = rng.range(-15, 15);
        let colour = Rgb([jitter(cr, d), jitter(cg, d), jitter(cb, d)]);
        for y in (cy - r).max(0)..(cy + r + 1).min(n) {
            for x in (cx - r).max(0)..(cx + r + 1).min(n) {
                let (dx, dy) = ((x - cx) as f64, (y - cy) as f64);
                let rf = r as f64;
                let inside = match SHAPES[s.kind] {
                    "circle" => dx * dx + dy * dy <= rf * rf,
                    "square" => dx.abs() <= rf * 0.85 && dy.abs() <= rf * 0.85,
                    // Upward triangle: apex at the top, base at the bottom.
                    _ => dy <= rf && dy >= -rf && dx.abs() <= (dy + rf) * 0.5,
                };
                if inside {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    }
    img
}

/// Every text the task produces (captions, prompts, answers): the built-in tokenizer's corpus.
pub fn all_texts() -> Vec<String> {
    let mut out = Vec::new();
    let shapes: Vec<Shape> = (0..COLOURS.len())
        .flat_map(|colour| (0..SHAPES.len()).map(move |kind| Shape { colour, kind }))
        .collect();
    for a in &shapes {
        out.push(caption(&[*a]));
        for b in &shapes {
            out.push(caption(&[*a, *b]));
        }
    }
    for (c, _) in COLOURS {
        for s in SHAPES {
            out.push(format!("Question: what colour is the {s}? Answer: {c}"));
        }
        for side in SIDES {
            out.push(format!(
                "Question: what colour is the shape on the {side}? Answer: {c}"
            ));
        }
    }
    for s in SHAPES {
        out.push(format!("Question: what shape is this? Answer: {s}"));
        for side in SIDES {
            out.push(format!("Question: what shape is on the {side}? Answer: {s}"));
        }
    }
    for n in ["one", "two"] {
        out.push(format!("Question: how many shapes are there? Answer: {n}"));
    }
    out
}
