//! `synthetic:shapes` (captions and VQA alternating), `synthetic:shapes-captions`,
//! `synthetic:shapes-vqa`: generated on the fly, endless.

use serde_json::{Value, json};

use super::example::{Example, ImageSource, SkipCounter};
use super::source::{Source, cursor_u64};
use super::synthetic::{Split, Task, item};
use crate::error::Result;

pub struct SyntheticSource {
    name: String,
    tasks: Vec<Task>,
    split: Split,
    seed: u64,
    index: u64,
    /// Items per epoch (`None`: endless).
    count: Option<u64>,
}

impl SyntheticSource {
    /// `task` is `shapes` (both), `shapes-captions` or `shapes-vqa`.
    pub fn new(task: &str, split: Split, seed: u64, count: Option<u64>) -> Result<Self> {
        let tasks = match task {
            "shapes" => vec![Task::Shapes, Task::ShapesVqa],
            "shapes-captions" => vec![Task::Shapes],
            "shapes-vqa" => vec![Task::ShapesVqa],
            other => {
                return Err(crate::ModelsError::Data(format!(
                    "unknown synthetic task {other:?} (shapes, shapes-captions, shapes-vqa)"
                )));
            }
        };
        Ok(SyntheticSource {
            name: format!("synthetic:{task}"),
            tasks,
            split,
            seed,
            index: 0,
            count,
        })
    }
}

impl Source for SyntheticSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn next(&mut self, _skips: &SkipCounter) -> Result<Option<Example>> {
        if self.count.is_some_and(|c| self.index >= c) {
            return Ok(None);
        }
        let n = self.tasks.len() as u64;
        let task = self.tasks[(self.index % n) as usize];
        let it = item(task, self.split, self.seed, self.index / n);
        let origin = format!("{}#{}", self.name, self.index);
        self.index += 1;
        Ok(Some(Example::captioned(
            ImageSource::Pixels(it.image),
            it.prompt,
            it.text,
            origin,
        )))
    }

    fn rewind(&mut self) -> Result<()> {
        self.index = 0;
        Ok(())
    }

    fn cursor(&self) -> Value {
        json!({ "index": self.index })
    }

    fn seek(&mut self, cursor: &Value) -> Result<()> {
        self.index = cursor_u64(cursor, "index")?;
        Ok(())
    }
}
