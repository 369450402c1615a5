//! The one error type of `kosmos-grammar`: each variant says where the grammar, schema or
//! pattern is wrong, so a client can fix its request from the message alone.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("grammar line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("grammar: rule '{0}' is used but not defined")]
    UndefinedRule(String),
    #[error("grammar: rule '{0}' is defined twice")]
    DuplicateRule(String),
    #[error("grammar: there is no 'root' rule (generation starts there)")]
    NoRoot,
    #[error(
        "grammar: rule '{0}' is left-recursive (it can reach itself before matching a character); write the repetition with * or + instead"
    )]
    LeftRecursion(String),
    #[error("grammar: rule '{0}' matches no finite string")]
    Unproductive(String),
    #[error("grammar: a repetition of {0} is over the limit of {max}", max = crate::grammar::MAX_REPEAT)]
    TooManyRepeats(u64),
    #[error("grammar: more than {0} rules or elements (each repetition is unrolled into rules)")]
    TooLarge(usize),
    #[error("JSON schema at {path}: {message}")]
    Schema { path: String, message: String },
    #[error("regular expression /{pattern}/ at character {at}: {message}")]
    Regex {
        pattern: String,
        at: usize,
        message: String,
    },
}

pub type Result<T, E = GrammarError> = std::result::Result<T, E>;
