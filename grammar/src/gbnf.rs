//! GBNF, llama.cpp's grammar format: `name ::= alternatives`, `"literals"`, `[character
//! classes]`, `.`, groups, `* + ?`, `{m}`, `{m,}`, `{m,n}` and `#` comments. A rule's body runs
//! until the next `name ::=`, so rules may span lines. Also the writers the JSON Schema and regex
//! converters use to print GBNF.

use crate::charset::{CharSet, MAX_CHAR};
use crate::error::{GrammarError, Result};
use crate::grammar::Expr;

/// Deepest nesting of groups: parsing and compiling recurse per level, and a request's grammar
/// must not be able to exhaust a server thread's stack.
pub const MAX_NESTING: usize = 256;

/// Parse GBNF text into its rules, in order.
pub fn parse(text: &str) -> Result<Vec<(String, Expr)>> {
    let mut p = Parser {
        chars: text.chars().collect(),
        i: 0,
    };
    let mut rules = Vec::new();
    p.skip_space();
    while !p.done() {
        let name = p.name()?;
        p.skip_space();
        if !p.eat_str("::=") {
            return Err(p.error(format!("expected '::=' after rule name '{name}'")));
        }
        let body = p.alternatives(0)?;
        rules.push((name, body));
        p.skip_space();
    }
    if rules.is_empty() {
        return Err(p.error("the grammar has no rules".into()));
    }
    Ok(rules)
}

struct Parser {
    chars: Vec<char>,
    i: usize,
}

impl Parser {
    fn done(&self) -> bool {
        self.i >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars[self.i..].iter().take(n).copied().eq(s.chars()) {
            self.i += n;
            true
        } else {
            false
        }
    }

    fn error(&self, message: String) -> GrammarError {
        let before = &self.chars[..self.i.min(self.chars.len())];
        let line = before.iter().filter(|&&c| c == '\n').count() + 1;
        let column = before.iter().rev().take_while(|&&c| c != '\n').count() + 1;
        GrammarError::Syntax {
            line,
            column,
            message,
        }
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.i += 1;
                }
            } else if c.is_whitespace() {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn is_name_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '-' || c == '_'
    }

    fn name(&mut self) -> Result<String> {
        let start = self.i;
        while self.peek().is_some_and(Self::is_name_char) {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.error(match self.peek() {
                Some(c) => format!("expected a rule name, found '{c}'"),
                None => "expected a rule name".into(),
            }));
        }
        Ok(self.chars[start..self.i].iter().collect())
    }

    /// Whether a new rule (`name ::=`) starts here.
    fn at_rule_start(&self) -> bool {
        let mut j = self.i;
        while j < self.chars.len() && Self::is_name_char(self.chars[j]) {
            j += 1;
        }
        if j == self.i {
            return false;
        }
        while j < self.chars.len() && self.chars[j].is_whitespace() {
            j += 1;
        }
        self.chars[j..].starts_with(&[':', ':', '='])
    }

    fn alternatives(&mut self, depth: usize) -> Result<Expr> {
        let mut alts = vec![self.sequence(depth)?];
        while self.eat('|') {
            alts.push(self.sequence(depth)?);
        }
        Ok(one_or(alts, Expr::Alt))
    }

    fn sequence(&mut self, depth: usize) -> Result<Expr> {
        let mut items = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None | Some('|') => break,
                Some(')') if depth > 0 => break,
                Some(')') => return Err(self.error("unbalanced ')'".into())),
                _ if depth == 0 && self.at_rule_start() => break,
                _ => {}
            }
            let atom = self.atom(depth)?;
            items.push(self.quantified(atom)?);
        }
        Ok(one_or(items, Expr::Seq))
    }

    fn atom(&mut self, depth: usize) -> Result<Expr> {
        let c = self.peek().expect("not at the end");
        if c == '"' {
            self.i += 1;
            let mut seq = Vec::new();
            loop {
                match self.peek() {
                    None => return Err(self.error("unterminated string literal".into())),
                    Some('"') => {
                        self.i += 1;
                        break;
                    }
                    Some(_) => {
                        let c = self.char_in_literal()?;
                        seq.push(Expr::Chars(CharSet::single(c)));
                    }
                }
            }
            return Ok(Expr::Seq(seq));
        }
        if c == '[' {
            self.i += 1;
            let negated = self.eat('^');
            let mut ranges = Vec::new();
            loop {
                match self.peek() {
                    None => return Err(self.error("unterminated character class".into())),
                    Some(']') => {
                        self.i += 1;
                        break;
                    }
                    Some(_) => {
                        let lo = self.char_in_literal()?;
                        let hi = if self.peek() == Some('-') && self.chars.get(self.i + 1) != Some(&']') {
                            self.i += 1;
                            self.char_in_literal()?
                        } else {
                            lo
                        };
                        if hi < lo {
                            return Err(self.error(format!("range end {hi:#x} is before its start {lo:#x}")));
                        }
                        ranges.push((lo, hi));
                    }
                }
            }
            let set = CharSet::from_ranges(ranges);
            return Ok(Expr::Chars(if negated { set.complement() } else { set }));
        }
        if c == '.' {
            self.i += 1;
            return Ok(Expr::Chars(CharSet::any()));
        }
        if c == '(' {
            if depth >= MAX_NESTING {
                return Err(self.error(format!("groups nested deeper than {MAX_NESTING}")));
            }
            self.i += 1;
            let inner = self.alternatives(depth + 1)?;
            self.skip_space();
            if !self.eat(')') {
                return Err(self.error("expected ')'".into()));
            }
            return Ok(inner);
        }
        if Self::is_name_char(c) {
            return Ok(Expr::Rule(self.name()?));
        }
        Err(self.error(format!("unexpected '{c}'")))
    }

    fn char_in_literal(&mut self) -> Result<u32> {
        let c = self.peek().expect("checked");
        self.i += 1;
        if c != '\\' {
            return Ok(c as u32);
        }
        let Some(e) = self.peek() else {
            return Err(self.error("unterminated escape".into()));
        };
        self.i += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<u32> {
            let digits: String = p.chars[p.i..].iter().take(n).collect();
            if digits.len() != n || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(p.error(format!("expected {n} hex digits after '\\{e}'")));
            }
            p.i += n;
            let v = u32::from_str_radix(&digits, 16).expect("hex");
            // Surrogates are accepted: they can bound a range, and never match alone.
            if v > MAX_CHAR {
                return Err(p.error(format!("{v:#x} is beyond Unicode")));
            }
            Ok(v)
        };
        Ok(match e {
            'n' => '\n' as u32,
            'r' => '\r' as u32,
            't' => '\t' as u32,
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' => e as u32,
            other => return Err(self.error(format!("unknown escape '\\{other}'"))),
        })
    }

    fn quantified(&mut self, atom: Expr) -> Result<Expr> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.i += 1;
                let min = self.number()?;
                let max = if self.eat(',') {
                    if self.peek() == Some('}') {
                        None
                    } else {
                        Some(self.number()?)
                    }
                } else {
                    Some(min)
                };
                if !self.eat('}') {
                    return Err(self.error("expected '}' to close the repetition".into()));
                }
                if max.is_some_and(|m| m < min) {
                    return Err(self.error(format!(
                        "repetition {{{min},{}}}: the maximum is below the minimum",
                        max.unwrap_or(0)
                    )));
                }
                return Ok(Expr::Repeat {
                    expr: Box::new(atom),
                    min,
                    max,
                });
            }
            _ => return Ok(atom),
        };
        self.i += 1;
        Ok(Expr::Repeat {
            expr: Box::new(atom),
            min,
            max,
        })
    }

    fn number(&mut self) -> Result<u64> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let s: String = self.chars[start..self.i].iter().collect();
        s.parse()
            .map_err(|_| self.error("expected a number in the repetition".into()))
    }
}

/// The only item itself, or `wrap` of several.
fn one_or(mut items: Vec<Expr>, wrap: fn(Vec<Expr>) -> Expr) -> Expr {
    if items.len() == 1 {
        items.pop().expect("one")
    } else {
        wrap(items)
    }
}

/// `s` as a GBNF string literal.
pub fn literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        push_escaped(&mut out, c, &['"', '\\']);
    }
    out.push('"');
    out
}

/// `set` as a GBNF character class (negated when that is shorter).
pub fn class(set: &CharSet) -> String {
    let comp = set.complement();
    let (ranges, negated) = if comp.ranges().len() < set.ranges().len() {
        (comp.ranges().to_vec(), true)
    } else {
        (set.ranges().to_vec(), false)
    };
    let mut out = String::from(if negated { "[^" } else { "[" });
    let special = ['\\', ']', '[', '-', '^', '"'];
    for (lo, hi) in ranges {
        let lo_c = char::from_u32(lo).unwrap_or('\u{FFFD}');
        push_code(&mut out, lo, lo_c, &special);
        if hi > lo {
            if hi > lo + 1 {
                out.push('-');
            }
            let hi_c = char::from_u32(hi).unwrap_or('\u{FFFD}');
            push_code(&mut out, hi, hi_c, &special);
        }
    }
    out.push(']');
    out
}

fn push_code(out: &mut String, v: u32, c: char, special: &[char]) {
    if char::from_u32(v).is_none() {
        // Surrogates and beyond: only reachable as range ends.
        out.push_str(&format!("\\U{v:08X}"));
    } else {
        push_escaped(out, c, special);
    }
}

fn push_escaped(out: &mut String, c: char, special: &[char]) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if special.contains(&c) => {
            out.push('\\');
            out.push(c);
        }
        c if (c as u32) < 0x20 || c as u32 == 0x7F => out.push_str(&format!("\\x{:02X}", c as u32)),
        c if c.is_control() || c.is_whitespace() && c != ' ' => out.push_str(&format!("\\u{:04X}", c as u32)),
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_cpp_syntax() {
        let g = parse(
            "# comment\nroot ::= \"a\" item*\n  | [^x-z\\]] (b | \"c\"){2,3}\nitem ::= . b?\nb ::= \"\\x41\\u00e9\"",
        )
        .unwrap();
        assert_eq!(
            g.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ["root", "item", "b"]
        );
        let err = parse("root ::= \"a").unwrap_err();
        assert!(err.to_string().contains("unterminated string"), "{err}");
        let err = parse("root ::= a{3,1}").unwrap_err();
        assert!(err.to_string().contains("below the minimum"), "{err}");
        let err = parse("root ::= \"a\" )").unwrap_err();
        assert!(
            matches!(
                err,
                GrammarError::Syntax {
                    line: 1,
                    column: 14,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn writers_round_trip() {
        for s in ["plain", "quote \" back \\ nl \n tab \t é 中 😀", "\u{1}\u{7f}"] {
            let text = format!("root ::= {}", literal(s));
            let rules = parse(&text).unwrap();
            let want: Vec<Expr> = s
                .chars()
                .map(|c| Expr::Chars(CharSet::single(c as u32)))
                .collect();
            assert_eq!(rules[0].1, Expr::Seq(want), "{text}");
        }
        for set in [
            CharSet::from_ranges([
                (0, 0x1F),
                (b'"' as u32, b'"' as u32),
                (b'\\' as u32, b'\\' as u32),
            ]),
            CharSet::from_ranges([
                (b'-' as u32, b'-' as u32),
                (b']' as u32, b'^' as u32),
                (0x4E00, 0x9FFF),
            ]),
            CharSet::any(),
            CharSet::from_ranges([(0xD000, 0xE000)]),
        ] {
            let text = format!("root ::= {}", class(&set));
            let rules = parse(&text).unwrap();
            assert_eq!(rules[0].1, Expr::Chars(set.clone()), "{text}");
        }
    }
}
