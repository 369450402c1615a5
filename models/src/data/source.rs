//! Data sources: each yields examples one epoch at a time and can report and restore its position,
//! so a resumed run reads exactly what the interrupted one would have.

use serde_json::Value;

use super::example::{Example, SkipCounter};
use crate::error::Result;

pub trait Source: Send {
    /// The spec it was made from, for messages.
    fn name(&self) -> &str;
    /// The next example of this epoch (bad records are skipped through `skips`); `None` at the
    /// end of the epoch. Infinite sources never end.
    fn next(&mut self, skips: &SkipCounter) -> Result<Option<Example>>;
    /// Start the next epoch.
    fn rewind(&mut self) -> Result<()>;
    /// Position of the next example.
    fn cursor(&self) -> Value;
    /// Return to a position from [`Source::cursor`].
    fn seek(&mut self, cursor: &Value) -> Result<()>;
}

pub(crate) fn cursor_u64(c: &Value, key: &str) -> Result<u64> {
    c.get(key).and_then(Value::as_u64).ok_or_else(|| {
        crate::ModelsError::Data(format!(
            "data cursor {c} lacks {key:?} (checkpoint from another version?)"
        ))
    })
}
