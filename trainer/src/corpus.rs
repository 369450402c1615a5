//! The built-in text corpus the default tokenizer is trained on: every sentence form of the
//! built-in synthetic task (shape captions and VQA), so the tiny model's tokenizer covers its
//! task with whole-word pieces. Other text still encodes, through byte fallback.

/// Colours of the synthetic shapes.
pub const COLOURS: &[&str] = &["red", "green", "blue", "yellow", "purple", "orange"];
/// Shapes of the synthetic task.
pub const SHAPES: &[&str] = &["circle", "square", "triangle"];
/// Where a shape sits when there are two.
pub const SIDES: &[&str] = &["left", "right"];
/// Counts as words.
pub const COUNTS: &[&str] = &["one", "two"];

/// Sentences covering the synthetic task's vocabulary and phrasing.
pub fn builtin_corpus() -> Vec<String> {
    let mut lines = Vec::new();
    for c1 in COLOURS {
        for s1 in SHAPES {
            lines.push(format!("a {c1} {s1}"));
            lines.push(format!("Question: what colour is the {s1}? Answer: {c1}"));
            lines.push(format!("Question: what shape is {c1}? Answer: {s1}"));
            for c2 in COLOURS {
                for s2 in SHAPES {
                    lines.push(format!("a {c1} {s1} on the left and a {c2} {s2} on the right"));
                }
            }
            for side in SIDES {
                lines.push(format!(
                    "Question: what colour is the shape on the {side}? Answer: {c1}"
                ));
                lines.push(format!("Question: what shape is on the {side}? Answer: {s1}"));
            }
        }
    }
    for n in COUNTS {
        lines.push(format!("Question: how many shapes are there? Answer: {n}"));
    }
    lines
}
