//! The built-in text corpus the default tokenizer is trained on: every text of the built-in
//! synthetic task (captions, questions, answers), so the tiny model's tokenizer has whole-word
//! pieces for its task. Any other text still encodes, through byte fallback.

/// Lines of the built-in corpus.
pub fn builtin_corpus() -> Vec<String> {
    crate::synthetic::all_texts()
}
