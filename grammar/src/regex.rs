//! Regular expressions (the ECMA-262 subset JSON Schema's `pattern` and vLLM's `guided_regex`
//! use) as GBNF. Supported: literals, `.`, classes with ranges and negation, `\d \w \s` and their
//! negations (ASCII `\d \w`, JavaScript's whitespace for `\s`), groups (capturing, `(?:`, named),
//! `|`, `* + ? {m} {m,} {m,n}` (lazy forms match the same strings), and `^` / `$` at the ends.
//! Everything else (backreferences, lookaround, `\b`, Unicode properties) is an error naming it:
//! a grammar cannot express it, and matching something else silently would be worse.

use crate::charset::CharSet;
use crate::error::{GrammarError, Result};
use crate::gbnf;

/// What the pattern describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The generated text itself.
    Text,
    /// The contents of a JSON string: `"`, `\` and control characters are written escaped.
    JsonString,
}

#[derive(Clone, Debug)]
enum Node {
    Set(CharSet),
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, u64, Option<u64>),
}

/// The pattern as a GBNF expression, matching whole strings (the pattern is anchored at both
/// ends whether or not it says `^...$`).
pub fn to_gbnf(pattern: &str, target: Target) -> Result<String> {
    let mut p = Parser {
        pattern,
        chars: pattern.chars().collect(),
        i: 0,
        depth: 0,
    };
    if p.peek() == Some('^') {
        p.i += 1;
    }
    let node = p.alternatives()?;
    if p.peek() == Some('$') && p.i + 1 == p.chars.len() {
        p.i += 1;
    }
    if let Some(c) = p.peek() {
        return Err(p.error(match c {
            ')' => "unbalanced ')'".to_string(),
            '$' | '^' => format!("'{c}' is only supported at the start ('^') or end ('$') of the pattern"),
            _ => format!("unexpected '{c}'"),
        }));
    }
    Ok(emit(&node, target))
}

struct Parser<'a> {
    pattern: &'a str,
    chars: Vec<char>,
    i: usize,
    /// Groups open here (bounded, like GBNF's, by [`crate::gbnf::MAX_NESTING`]).
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn error(&self, message: String) -> GrammarError {
        GrammarError::Regex {
            pattern: self.pattern.to_string(),
            at: self.i,
            message,
        }
    }

    fn alternatives(&mut self) -> Result<Node> {
        let mut alts = vec![self.sequence()?];
        while self.peek() == Some('|') {
            self.i += 1;
            alts.push(self.sequence()?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().expect("one")
        } else {
            Node::Alt(alts)
        })
    }

    fn sequence(&mut self) -> Result<Node> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            if c == '$' && self.i + 1 == self.chars.len() {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(Node::Seq(items))
    }

    fn atom(&mut self) -> Result<Node> {
        let c = self.peek().expect("checked");
        self.i += 1;
        Ok(match c {
            '.' => Node::Set(line_terminators().complement()),
            '[' => Node::Set(self.class()?),
            '(' => {
                if self.depth >= crate::gbnf::MAX_NESTING {
                    return Err(self.error(format!("groups nested deeper than {}", crate::gbnf::MAX_NESTING)));
                }
                if self.peek() == Some('?') {
                    let rest: String = self.chars[self.i..].iter().take(3).collect();
                    if rest.starts_with("?:") {
                        self.i += 2;
                    } else if rest.starts_with("?P<")
                        || (rest.starts_with("?<") && !rest.starts_with("?<=") && !rest.starts_with("?<!"))
                    {
                        while self.peek().is_some_and(|c| c != '>') {
                            self.i += 1;
                        }
                        self.i += 1;
                    } else {
                        self.i -= 1;
                        return Err(self.error(format!(
                            "'({rest}' (lookaround or an inline flag) is not supported"
                        )));
                    }
                }
                self.depth += 1;
                let inner = self.alternatives()?;
                self.depth -= 1;
                if self.peek() != Some(')') {
                    return Err(self.error("expected ')'".into()));
                }
                self.i += 1;
                inner
            }
            '*' | '+' | '?' => {
                self.i -= 1;
                return Err(self.error(format!("'{c}' has nothing to repeat")));
            }
            '^' | '$' => {
                self.i -= 1;
                return Err(self.error(format!(
                    "'{c}' is only supported at the start ('^') or end ('$') of the pattern"
                )));
            }
            '\\' => self.escape(false)?,
            c => Node::Set(CharSet::single(c as u32)),
        })
    }

    /// After a backslash: a class escape or one character.
    fn escape(&mut self, in_class: bool) -> Result<Node> {
        let Some(e) = self.peek() else {
            return Err(self.error("the pattern ends with a lone '\\'".into()));
        };
        self.i += 1;
        let digit = CharSet::range('0' as u32, '9' as u32);
        let word = CharSet::from_ranges([
            ('0' as u32, '9' as u32),
            ('A' as u32, 'Z' as u32),
            ('a' as u32, 'z' as u32),
            ('_' as u32, '_' as u32),
        ]);
        let set = match e {
            'd' => digit,
            'D' => digit.complement(),
            'w' => word,
            'W' => word.complement(),
            's' => js_whitespace(),
            'S' => js_whitespace().complement(),
            'n' => CharSet::single('\n' as u32),
            'r' => CharSet::single('\r' as u32),
            't' => CharSet::single('\t' as u32),
            'f' => CharSet::single(0x0C),
            'v' => CharSet::single(0x0B),
            '0' => CharSet::single(0),
            'b' if in_class => CharSet::single(0x08),
            'x' => CharSet::single(self.hex(2)?),
            'u' => CharSet::single(self.hex(4)?),
            'b' | 'B' => {
                return Err(self.error(format!("'\\{e}' (a word boundary) is not supported")));
            }
            '1'..='9' => return Err(self.error(format!("backreference '\\{e}' is not supported"))),
            'p' | 'P' => return Err(self.error(format!("Unicode property '\\{e}' is not supported"))),
            c if c.is_ascii_alphanumeric() => {
                return Err(self.error(format!("unknown escape '\\{c}'")));
            }
            c => CharSet::single(c as u32),
        };
        Ok(Node::Set(set))
    }

    fn hex(&mut self, n: usize) -> Result<u32> {
        let digits: String = self.chars[self.i..].iter().take(n).collect();
        if digits.chars().count() != n || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.error(format!("expected {n} hex digits")));
        }
        self.i += n;
        Ok(u32::from_str_radix(&digits, 16).expect("hex"))
    }

    fn class(&mut self) -> Result<CharSet> {
        let negated = self.peek() == Some('^');
        if negated {
            self.i += 1;
        }
        let mut set = CharSet::empty();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated character class".into()));
            };
            if c == ']' {
                self.i += 1;
                break;
            }
            let lo = self.class_atom()?;
            let is_range = self.peek() == Some('-') && self.chars.get(self.i + 1).is_some_and(|&c| c != ']');
            match lo {
                ClassAtom::Char(a) if is_range => {
                    self.i += 1;
                    match self.class_atom()? {
                        ClassAtom::Char(b) if b >= a => set = set.union(&CharSet::range(a, b)),
                        ClassAtom::Char(b) => {
                            return Err(self.error(format!(
                                "range {:?}-{:?} is out of order",
                                char::from_u32(a),
                                char::from_u32(b)
                            )));
                        }
                        ClassAtom::Set(_) => {
                            return Err(self.error("a class escape cannot end a range".into()));
                        }
                    }
                }
                ClassAtom::Char(a) => set = set.union(&CharSet::single(a)),
                ClassAtom::Set(s) => set = set.union(&s),
            }
        }
        Ok(if negated { set.complement() } else { set })
    }

    fn class_atom(&mut self) -> Result<ClassAtom> {
        let c = self.peek().expect("checked");
        self.i += 1;
        if c != '\\' {
            return Ok(ClassAtom::Char(c as u32));
        }
        let Node::Set(s) = self.escape(true)? else {
            unreachable!()
        };
        Ok(match s.ranges() {
            [(lo, hi)] if lo == hi => ClassAtom::Char(*lo),
            _ => ClassAtom::Set(s),
        })
    }

    fn quantified(&mut self, atom: Node) -> Result<Node> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => match self.braces() {
                Some((min, max, len)) => {
                    self.i += len - 1;
                    (min, max)
                }
                // Not a quantifier: a literal '{' (JavaScript's rule without the u flag).
                None => return Ok(atom),
            },
            _ => return Ok(atom),
        };
        self.i += 1;
        if let Some(max) = max
            && max < min
        {
            return Err(self.error(format!(
                "repetition {{{min},{max}}}: the maximum is below the minimum"
            )));
        }
        // A lazy quantifier matches the same strings; a possessive one is not ECMA-262.
        if self.peek() == Some('?') {
            self.i += 1;
        }
        if matches!(self.peek(), Some('*' | '+' | '?' | '{'))
            && !(self.peek() == Some('{') && self.braces().is_none())
        {
            return Err(self.error("a quantifier cannot follow another".into()));
        }
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    /// `{m}`, `{m,}` or `{m,n}` here: (min, max, characters).
    fn braces(&self) -> Option<(u64, Option<u64>, usize)> {
        let rest: String = self.chars[self.i..].iter().take_while(|&&c| c != '}').collect();
        if self.chars.get(self.i + rest.chars().count()) != Some(&'}') {
            return None;
        }
        let body = rest.strip_prefix('{')?;
        let len = rest.chars().count() + 1;
        let (min, max) = match body.split_once(',') {
            None => {
                let n = body.parse().ok()?;
                (n, Some(n))
            }
            Some((a, "")) => (a.parse().ok()?, None),
            Some((a, b)) => (a.parse().ok()?, Some(b.parse().ok()?)),
        };
        Some((min, max, len))
    }
}

enum ClassAtom {
    Char(u32),
    Set(CharSet),
}

fn line_terminators() -> CharSet {
    CharSet::from_ranges([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])
}

/// ECMA-262's `\s`: WhiteSpace and LineTerminator.
fn js_whitespace() -> CharSet {
    CharSet::from_ranges([
        (0x09, 0x0D),
        (0x20, 0x20),
        (0xA0, 0xA0),
        (0x1680, 0x1680),
        (0x2000, 0x200A),
        (0x2028, 0x2029),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
        (0xFEFF, 0xFEFF),
    ])
}

fn emit(n: &Node, target: Target) -> String {
    match n {
        Node::Set(s) => match target {
            Target::Text => gbnf::class(s),
            Target::JsonString => json_string_chars(s),
        },
        Node::Seq(xs) if xs.is_empty() => "\"\"".into(),
        Node::Seq(xs) => format!(
            "({})",
            xs.iter().map(|x| emit(x, target)).collect::<Vec<_>>().join(" ")
        ),
        Node::Alt(xs) => format!(
            "({})",
            xs.iter().map(|x| emit(x, target)).collect::<Vec<_>>().join(" | ")
        ),
        Node::Repeat(x, min, max) => {
            let inner = emit(x, target);
            match (min, max) {
                (0, None) => format!("{inner}*"),
                (1, None) => format!("{inner}+"),
                (0, Some(1)) => format!("{inner}?"),
                (m, None) => format!("{inner}{{{m},}}"),
                (m, Some(n)) if m == n => format!("{inner}{{{m}}}"),
                (m, Some(n)) => format!("{inner}{{{m},{n}}}"),
            }
        }
    }
}

/// The characters of `set` as they are written inside a JSON string: as themselves, except `"`
/// and `\` (escaped) and control characters (their short escape, else `\u00XX`).
pub(crate) fn json_string_chars(set: &CharSet) -> String {
    let special = CharSet::from_ranges([(0, 0x1F), ('"' as u32, '"' as u32), ('\\' as u32, '\\' as u32)]);
    let plain = set.minus(&special);
    let mut alts = Vec::new();
    if !plain.is_empty() {
        alts.push(gbnf::class(&plain));
    }
    for (lo, hi) in set.intersect(&special).ranges().to_vec() {
        for c in lo..=hi {
            let escaped = match c {
                0x22 => "\\\"".to_string(),
                0x5C => "\\\\".to_string(),
                0x08 => "\\b".to_string(),
                0x0C => "\\f".to_string(),
                0x0A => "\\n".to_string(),
                0x0D => "\\r".to_string(),
                0x09 => "\\t".to_string(),
                c => format!("\\u{c:04x}"),
            };
            alts.push(gbnf::literal(&escaped));
        }
    }
    match alts.len() {
        0 => "[]".into(),
        1 => alts.pop().expect("one"),
        _ => format!("({})", alts.join(" | ")),
    }
}
