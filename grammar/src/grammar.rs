//! A context-free grammar compiled for the matcher: rules of alternatives of elements (a set of
//! characters, or a rule), every repetition and group lowered to rules of their own, as
//! llama.cpp's grammar engine does. Compiling checks what the matcher relies on: every rule
//! defined, none left-recursive, `root` able to match something.

use std::collections::HashMap;

use crate::charset::CharSet;
use crate::error::{GrammarError, Result};

/// Most copies one `{m,n}` may ask for (each is a rule).
pub const MAX_REPEAT: u64 = 100_000;

/// Most rules (or elements of one sequence) a compiled grammar may have: every repetition is
/// unrolled into rules, and a request's grammar must not be able to take the server's memory.
pub const MAX_SIZE: usize = 2_000_000;

/// A grammar as written: what the GBNF parser produces and the schema / regex converters write.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Chars(CharSet),
    Rule(String),
    Seq(Vec<Expr>),
    Alt(Vec<Expr>),
    Repeat {
        expr: Box<Expr>,
        min: u64,
        max: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    Chars(u32),
    Rule(u32),
    /// Ends an alternative.
    End,
}

/// A compiled grammar. Alternatives are stored one after another in `elems`, each closed by
/// `End`; a position in `elems` is what the matcher's stacks hold.
pub struct Grammar {
    pub(crate) elems: Vec<Elem>,
    /// Per rule, the positions where its alternatives start.
    pub(crate) rules: Vec<Vec<u32>>,
    pub(crate) sets: Vec<CharSet>,
    names: Vec<String>,
    pub(crate) root: u32,
}

/// Short: generation settings holding a grammar are logged.
impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Grammar({} rules, {} elements)",
            self.rules.len(),
            self.elems.len()
        )
    }
}

impl Grammar {
    /// Compile `rules` (name, body); generation starts at `root`.
    pub fn compile(rules: &[(String, Expr)]) -> Result<Grammar> {
        let mut lower = Lower::default();
        for (name, _) in rules {
            if lower.by_name.contains_key(name) {
                return Err(GrammarError::DuplicateRule(name.clone()));
            }
            let id = lower.new_rule(name.clone());
            lower.by_name.insert(name.clone(), id);
        }
        for (name, body) in rules {
            let id = lower.by_name[name];
            let alts = lower.alternatives(body, name)?;
            lower.rules[id as usize] = alts;
        }
        let root = *lower.by_name.get("root").ok_or(GrammarError::NoRoot)?;
        let g = lower.finish(root);
        g.check()?;
        Ok(g)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    fn alts(&self, r: usize) -> impl Iterator<Item = &[Elem]> {
        self.rules[r].iter().map(move |&start| {
            let s = start as usize;
            let len = self.elems[s..].iter().position(|e| *e == Elem::End).expect("End");
            &self.elems[s..s + len]
        })
    }

    /// Left recursion (the matcher would expand forever) and a `root` that matches nothing.
    fn check(&self) -> Result<()> {
        let n = self.rules.len();
        let nullable = self.fixpoint(false);
        let productive = self.fixpoint(true);
        if !productive[self.root as usize] {
            return Err(GrammarError::Unproductive(self.names[self.root as usize].clone()));
        }
        // Edges r -> s where s can come first in r (everything before it nullable).
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (r, out) in edges.iter_mut().enumerate() {
            for alt in self.alts(r) {
                for e in alt {
                    match e {
                        Elem::Rule(s) => {
                            out.push(*s as usize);
                            if !nullable[*s as usize] {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            }
        }
        // Iterative DFS colouring: 0 new, 1 on the stack, 2 done.
        let mut colour = vec![0u8; n];
        for start in 0..n {
            if colour[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            colour[start] = 1;
            while let Some(&mut (r, ref mut i)) = stack.last_mut() {
                if let Some(&s) = edges[r].get(*i) {
                    *i += 1;
                    match colour[s] {
                        0 => {
                            colour[s] = 1;
                            stack.push((s, 0));
                        }
                        1 => return Err(GrammarError::LeftRecursion(self.user_name(s))),
                        _ => {}
                    }
                } else {
                    colour[r] = 2;
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    /// Which rules have an alternative whose every element holds, where a character set holds
    /// when `chars_hold` (productive: yes; nullable: no) and a rule when it is itself known.
    /// A worklist, linear in the grammar: a client's grammar of chained rules in the worst order
    /// must not cost a pass per rule.
    fn fixpoint(&self, chars_hold: bool) -> Vec<bool> {
        let n = self.rules.len();
        let mut known = vec![false; n];
        // Per alternative: its rule and how many of its rule elements are not known yet.
        let mut pending: Vec<(usize, usize)> = Vec::new();
        // Per rule: the alternatives that wait on it, once per occurrence.
        let mut waiting: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut queue = Vec::new();
        for (r, done) in known.iter_mut().enumerate() {
            for alt in self.alts(r) {
                if !chars_hold && alt.iter().any(|e| matches!(e, Elem::Chars(_))) {
                    continue;
                }
                let a = pending.len();
                let mut count = 0;
                for e in alt {
                    if let Elem::Rule(s) = e {
                        waiting[*s as usize].push(a);
                        count += 1;
                    }
                }
                pending.push((r, count));
                if count == 0 && !*done {
                    *done = true;
                    queue.push(r);
                }
            }
        }
        while let Some(s) = queue.pop() {
            for &a in &waiting[s] {
                let (r, count) = &mut pending[a];
                *count -= 1;
                if *count == 0 && !known[*r] {
                    known[*r] = true;
                    queue.push(*r);
                }
            }
        }
        known
    }

    /// The rule's name as the user wrote it (generated rules carry their parent's name first).
    fn user_name(&self, r: usize) -> String {
        self.names[r].clone()
    }
}

#[derive(Default)]
struct Lower {
    rules: Vec<Vec<Vec<Elem>>>,
    names: Vec<String>,
    by_name: HashMap<String, u32>,
    sets: Vec<CharSet>,
    set_ids: HashMap<CharSet, u32>,
}

impl Lower {
    fn new_rule(&mut self, name: String) -> u32 {
        self.rules.push(Vec::new());
        self.names.push(name);
        (self.rules.len() - 1) as u32
    }

    fn anonymous(&mut self, parent: &str, alts: Vec<Vec<Elem>>) -> u32 {
        let id = self.new_rule(format!("{parent}_{}", self.rules.len()));
        self.rules[id as usize] = alts;
        id
    }

    fn set(&mut self, s: &CharSet) -> u32 {
        if let Some(&id) = self.set_ids.get(s) {
            return id;
        }
        self.sets.push(s.clone());
        let id = (self.sets.len() - 1) as u32;
        self.set_ids.insert(s.clone(), id);
        id
    }

    fn alternatives(&mut self, e: &Expr, parent: &str) -> Result<Vec<Vec<Elem>>> {
        match e {
            Expr::Alt(xs) => {
                let mut out = Vec::new();
                for x in xs {
                    out.extend(self.alternatives(x, parent)?);
                }
                Ok(out)
            }
            _ => {
                let mut seq = Vec::new();
                self.sequence(e, parent, &mut seq)?;
                Ok(vec![seq])
            }
        }
    }

    fn sequence(&mut self, e: &Expr, parent: &str, out: &mut Vec<Elem>) -> Result<()> {
        match e {
            Expr::Chars(s) => out.push(Elem::Chars(self.set(s))),
            Expr::Rule(name) => {
                let id = *self
                    .by_name
                    .get(name)
                    .ok_or_else(|| GrammarError::UndefinedRule(name.clone()))?;
                out.push(Elem::Rule(id));
            }
            Expr::Seq(xs) => {
                for x in xs {
                    self.sequence(x, parent, out)?;
                }
            }
            Expr::Alt(_) => {
                let alts = self.alternatives(e, parent)?;
                out.push(Elem::Rule(self.anonymous(parent, alts)));
            }
            Expr::Repeat { expr, min, max } => {
                let (min, max) = (*min, *max);
                if min.max(max.unwrap_or(0)) > MAX_REPEAT {
                    return Err(GrammarError::TooManyRepeats(min.max(max.unwrap_or(0))));
                }
                if max == Some(0) {
                    return Ok(());
                }
                let item = self.element(expr, parent)?;
                if out.len() + min as usize > MAX_SIZE {
                    return Err(GrammarError::TooLarge(MAX_SIZE));
                }
                for _ in 0..min {
                    out.push(item);
                }
                match max {
                    // item*: S ::= item S | ε
                    None => {
                        let s = self.anonymous(parent, Vec::new());
                        self.rules[s as usize] = vec![vec![item, Elem::Rule(s)], vec![]];
                        out.push(Elem::Rule(s));
                    }
                    // up to k more: O_1 ::= item | ε, O_k ::= item O_{k-1} | ε
                    Some(max) if max > min => {
                        if self.rules.len() + (max - min) as usize > MAX_SIZE {
                            return Err(GrammarError::TooLarge(MAX_SIZE));
                        }
                        let mut opt = self.anonymous(parent, vec![vec![item], vec![]]);
                        for _ in 1..max - min {
                            opt = self.anonymous(parent, vec![vec![item, Elem::Rule(opt)], vec![]]);
                        }
                        out.push(Elem::Rule(opt));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// `e` as one element: itself when it is one, else a rule of its own.
    fn element(&mut self, e: &Expr, parent: &str) -> Result<Elem> {
        let mut seq = Vec::new();
        if !matches!(e, Expr::Alt(_)) {
            self.sequence(e, parent, &mut seq)?;
            if seq.len() == 1 {
                return Ok(seq[0]);
            }
        }
        let alts = self.alternatives(e, parent)?;
        Ok(Elem::Rule(self.anonymous(parent, alts)))
    }

    fn finish(self, root: u32) -> Grammar {
        let mut elems = Vec::new();
        let mut rules = Vec::with_capacity(self.rules.len());
        for alts in &self.rules {
            let mut starts = Vec::with_capacity(alts.len());
            for alt in alts {
                starts.push(elems.len() as u32);
                elems.extend_from_slice(alt);
                elems.push(Elem::End);
            }
            rules.push(starts);
        }
        Grammar {
            elems,
            rules,
            sets: self.sets,
            names: self.names,
            root,
        }
    }
}
