//! Structured output: what a request constrains its output to (a GBNF grammar, a JSON Schema,
//! any JSON object, a regular expression or a list of choices), compiled to a grammar whose
//! [`Matcher`] says, token by token, which tokens of a vocabulary ([`TokenTrie`]) may come next.
//!
//! ```
//! use kosmos_grammar::{Constraint, Matcher, TokenTrie};
//! let g = Constraint::Choice(vec!["red".into(), "blue".into()]).compile().unwrap();
//! let mut m = Matcher::new(g);
//! let vocab = TokenTrie::new([(0, "re"), (1, "d"), (2, "blue"), (3, "green")]);
//! let mut allowed = vec![false; 4];
//! m.fill_allowed(&vocab, &mut allowed);
//! assert_eq!(allowed, [true, false, true, false]);
//! assert!(m.accept(b"re") && m.accept(b"d") && m.is_finished());
//! ```

pub mod charset;
mod decimal;
pub mod error;
pub mod gbnf;
pub mod grammar;
pub mod json;
pub mod json_schema;
pub mod matcher;
pub mod regex;
pub mod trie;

use std::sync::Arc;

pub use error::{GrammarError, Result};
pub use grammar::Grammar;
pub use json::Json;
pub use matcher::Matcher;
pub use trie::TokenTrie;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum Constraint {
    /// A GBNF grammar (llama.cpp's format), starting at `root`.
    Grammar(String),
    /// A JSON text the schema accepts.
    JsonSchema(Json),
    /// Any JSON object (OpenAI's `json_object` response format).
    JsonObject,
    /// Text the regular expression matches in full.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Constraint {
    /// The constraint as GBNF text (what `kosmos-rt grammar` prints).
    pub fn to_gbnf(&self) -> Result<String> {
        Ok(match self {
            Constraint::Grammar(g) => g.clone(),
            Constraint::JsonSchema(s) => json_schema::to_gbnf(s)?,
            Constraint::JsonObject => json_schema::any_object_gbnf(),
            Constraint::Regex(r) => format!("root ::= {}\n", regex::to_gbnf(r, regex::Target::Text)?),
            Constraint::Choice(xs) => {
                if xs.is_empty() {
                    return Err(GrammarError::Schema {
                        path: "choice".into(),
                        message: "give at least one choice".into(),
                    });
                }
                let alts: Vec<String> = xs.iter().map(|x| gbnf::literal(x)).collect();
                format!("root ::= {}\n", alts.join(" | "))
            }
        })
    }

    pub fn compile(&self) -> Result<Arc<Grammar>> {
        let rules = gbnf::parse(&self.to_gbnf()?)?;
        Ok(Arc::new(Grammar::compile(&rules)?))
    }

    /// Whether `text` is a whole sentence of the constraint (for checking grammars by hand).
    pub fn matches(grammar: &Arc<Grammar>, text: &str) -> bool {
        let mut m = Matcher::new(grammar.clone());
        m.accept(text.as_bytes()) && m.is_accepting()
    }
}
