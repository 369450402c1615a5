//! The pushdown matcher: where the text so far may be in the grammar, as a set of stacks (the
//! approach of llama.cpp's grammar engine), fed byte by byte so that tokens which end inside a
//! UTF-8 character (byte-fallback pieces) are judged too.
//!
//! A stack is a chain of frames `(position, parent)`: the position is the next element to match,
//! the parent is where to continue when the alternative ends. Frames are hash-consed, so equal
//! stacks are equal ids and a set of stacks is a sorted list of ids. A stack whose top is a
//! character set is on the *frontier*; one that has run out has matched the whole grammar.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::grammar::{Elem, Grammar};
use crate::trie::TokenTrie;

const NONE: u32 = u32::MAX;

/// Most parses (frontier stacks) the matcher follows at once. Sane grammars stay far below it
/// (a JSON schema: a handful); a grammar that is ambiguous everywhere would otherwise make every
/// step cost more, without bound. Past it the text is refused and [`Matcher::overflowed`] says why.
pub const MAX_STACKS: usize = 10_000;

/// Masks kept for recent states: inside a JSON string or any repetition the same state comes
/// back at every character, and with it the same mask (the full walk of the vocabulary trie).
const MASK_CACHE: usize = 8;

/// Where the text so far may be in the grammar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// Frontier stacks (ids of their top frames), sorted, without duplicates.
    frontier: Vec<u32>,
    /// The text so far is a whole sentence of the grammar.
    accepted: bool,
    /// A UTF-8 character begun but not finished.
    partial: Partial,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Partial {
    /// Continuation bytes still needed (0: none pending).
    need: u8,
    /// The code point's bits so far.
    bits: u32,
    /// Allowed range of the next byte.
    next_lo: u8,
    next_hi: u8,
}

/// A [`Matcher`]'s place in the text, from [`Matcher::snapshot`].
#[derive(Clone, Debug)]
pub struct Snapshot {
    state: State,
    overflowed: bool,
}

pub struct Matcher {
    g: Arc<Grammar>,
    frames: Vec<(u32, u32)>,
    intern: HashMap<u64, u32, BuildHasherDefault<FxHasher>>,
    state: State,
    work: Vec<(u32, u32)>,
    overflowed: bool,
    /// (trie, state, the tokens allowed there), most recent first.
    masks: VecDeque<(u64, State, Vec<u32>)>,
}

impl Matcher {
    pub fn new(g: Arc<Grammar>) -> Matcher {
        let mut m = Matcher {
            g,
            frames: Vec::new(),
            intern: HashMap::default(),
            state: State::default(),
            work: Vec::new(),
            overflowed: false,
            masks: VecDeque::new(),
        };
        let mut frontier = Vec::new();
        let mut accepted = false;
        let root = m.g.root as usize;
        for i in 0..m.g.rules[root].len() {
            let start = m.g.rules[root][i];
            m.expand(start, NONE, &mut frontier, &mut accepted);
        }
        frontier.sort_unstable();
        frontier.dedup();
        m.state = State {
            frontier,
            accepted,
            partial: Partial::default(),
        };
        m
    }

    pub fn grammar(&self) -> &Arc<Grammar> {
        &self.g
    }

    /// A step was refused because the grammar allowed more than [`MAX_STACKS`] parses at once.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The text so far is a complete sentence of the grammar (end of text allowed).
    pub fn is_accepting(&self) -> bool {
        self.state.accepted && self.state.partial.need == 0
    }

    /// Complete, and nothing may follow: generation is over.
    pub fn is_finished(&self) -> bool {
        self.is_accepting() && self.state.frontier.is_empty()
    }

    /// Feed `bytes`; false (and nothing changed) when the grammar does not allow them.
    pub fn accept(&mut self, bytes: &[u8]) -> bool {
        let mut s = self.state.clone();
        for &b in bytes {
            match self.step(&s, b) {
                Some(next) => s = next,
                None => return false,
            }
        }
        // Frames made for the rejected path stay interned: they are valid, and few.
        self.state = s;
        true
    }

    /// Where the text so far is, to go back to with [`Matcher::restore`] after trying a few
    /// tokens ahead (a draft model's guesses). Cheap: the frontier, not the frames.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state.clone(),
            overflowed: self.overflowed,
        }
    }

    /// Back to a [`Matcher::snapshot`] of this matcher. Frames interned since stay (valid, and
    /// few), as after a refused [`Matcher::accept`].
    pub fn restore(&mut self, snapshot: Snapshot) {
        self.state = snapshot.state;
        self.overflowed = snapshot.overflowed;
    }

    /// Whether `bytes` may come next, without feeding them.
    pub fn allows(&mut self, bytes: &[u8]) -> bool {
        let base = self.frames.len();
        let mut s = self.state.clone();
        let mut ok = true;
        for &b in bytes {
            match self.step(&s, b) {
                Some(next) => s = next,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        self.forget_from(base);
        ok
    }

    /// The text the grammar forces next, at most `max` bytes: while the text so far is not
    /// complete and every parse allows the same single character, that character (a key of a
    /// JSON schema, the rest of an enum value once it is told apart). What SGLang's
    /// jump-forward decoding skips; the runtime feeds it to speculative decoding as guesses.
    pub fn forced(&mut self, max: usize) -> String {
        let (base, overflowed) = (self.frames.len(), self.overflowed);
        let mut s = self.state.clone();
        let mut out = String::new();
        while out.len() < max && s.partial.need == 0 && !s.accepted {
            let Some(c) = self.only_char(&s) else { break };
            let (Some(ch), Some(next)) = (char::from_u32(c), self.step_char(&s, c)) else {
                break;
            };
            out.push(ch);
            s = next;
        }
        self.forget_from(base);
        self.overflowed = overflowed;
        out
    }

    /// The one character every frontier stack of `s` allows, if they allow one and the same.
    fn only_char(&self, s: &State) -> Option<u32> {
        let mut only = None;
        for &f in &s.frontier {
            let (pos, _) = self.frames[f as usize];
            let Elem::Chars(set) = self.g.elems[pos as usize] else {
                return None;
            };
            match self.g.sets[set as usize].ranges() {
                [(lo, hi)] if lo == hi && only.is_none_or(|c| c == *lo) => only = Some(*lo),
                _ => return None,
            }
        }
        only
    }

    /// Set `allowed[t]` for every token `t` of `trie` that may come next (others untouched).
    pub fn fill_allowed(&mut self, trie: &TokenTrie, allowed: &mut [bool]) {
        let cached = self
            .masks
            .iter()
            .position(|(id, s, _)| *id == trie.id && *s == self.state);
        let entry = match cached {
            Some(i) => self.masks.remove(i).expect("found"),
            None => {
                let base = self.frames.len();
                let s = self.state.clone();
                let mut tokens = Vec::new();
                self.visit(trie, 0, &s, &mut tokens);
                self.forget_from(base);
                (trie.id, s, tokens)
            }
        };
        for &t in &entry.2 {
            allowed[t as usize] = true;
        }
        self.masks.push_front(entry);
        self.masks.truncate(MASK_CACHE);
    }

    fn visit(&mut self, trie: &TokenTrie, node: u32, s: &State, allowed: &mut Vec<u32>) {
        allowed.extend_from_slice(trie.tokens(node));
        for &(b, child) in trie.children(node) {
            if let Some(next) = self.step(s, b) {
                self.visit(trie, child, &next, allowed);
            }
        }
    }

    /// Drop frames interned since `base` (scratch exploration).
    fn forget_from(&mut self, base: usize) {
        for &(pos, parent) in &self.frames[base..] {
            self.intern.remove(&key(pos, parent));
        }
        self.frames.truncate(base);
    }

    fn step(&mut self, s: &State, b: u8) -> Option<State> {
        let p = s.partial;
        if p.need == 0 {
            if b < 0x80 {
                return self.step_char(s, b as u32);
            }
            let (need, bits, lo, hi) = match b {
                0xC2..=0xDF => (1, (b & 0x1F) as u32, 0x80, 0xBF),
                0xE0 => (2, 0, 0xA0, 0xBF),
                0xE1..=0xEC | 0xEE..=0xEF => (2, (b & 0x0F) as u32, 0x80, 0xBF),
                0xED => (2, 0x0D, 0x80, 0x9F),
                0xF0 => (3, 0, 0x90, 0xBF),
                0xF1..=0xF3 => (3, (b & 0x07) as u32, 0x80, 0xBF),
                0xF4 => (3, 4, 0x80, 0x8F),
                _ => return None,
            };
            let partial = Partial {
                need,
                bits,
                next_lo: lo,
                next_hi: hi,
            };
            return self.pending(s, partial);
        }
        if b < p.next_lo || b > p.next_hi {
            return None;
        }
        let bits = (p.bits << 6) | (b & 0x3F) as u32;
        if p.need == 1 {
            let plain = State {
                partial: Partial::default(),
                ..s.clone()
            };
            return self.step_char(&plain, bits);
        }
        let partial = Partial {
            need: p.need - 1,
            bits,
            next_lo: 0x80,
            next_hi: 0xBF,
        };
        self.pending(s, partial)
    }

    /// `s` with a character begun: alive while some frontier set can still take it.
    fn pending(&self, s: &State, partial: Partial) -> Option<State> {
        let rest = 6 * (partial.need as u32 - 1);
        let lo = (partial.bits << (6 * partial.need as u32)) | (((partial.next_lo & 0x3F) as u32) << rest);
        let hi = (partial.bits << (6 * partial.need as u32))
            | (((partial.next_hi & 0x3F) as u32) << rest)
            | ((1u32 << rest) - 1);
        let possible = s.frontier.iter().any(|&f| {
            let (pos, _) = self.frames[f as usize];
            match self.g.elems[pos as usize] {
                Elem::Chars(set) => self.g.sets[set as usize].intersects(lo, hi),
                _ => false,
            }
        });
        possible.then(|| State {
            frontier: s.frontier.clone(),
            accepted: false,
            partial,
        })
    }

    fn step_char(&mut self, s: &State, c: u32) -> Option<State> {
        let mut frontier = Vec::new();
        let mut accepted = false;
        for &f in &s.frontier {
            let (pos, parent) = self.frames[f as usize];
            let Elem::Chars(set) = self.g.elems[pos as usize] else {
                continue;
            };
            if self.g.sets[set as usize].contains(c) {
                self.expand(pos + 1, parent, &mut frontier, &mut accepted);
            }
        }
        if frontier.is_empty() && !accepted {
            return None;
        }
        frontier.sort_unstable();
        frontier.dedup();
        if frontier.len() > MAX_STACKS {
            self.overflowed = true;
            return None;
        }
        Some(State {
            frontier,
            accepted,
            partial: Partial::default(),
        })
    }

    /// Every frontier stack reachable from `(pos, parent)` without matching a character.
    fn expand(&mut self, pos: u32, parent: u32, frontier: &mut Vec<u32>, accepted: &mut bool) {
        let mut work = std::mem::take(&mut self.work);
        work.push((pos, parent));
        while let Some((pos, parent)) = work.pop() {
            match self.g.elems[pos as usize] {
                Elem::End => {
                    if parent == NONE {
                        *accepted = true;
                    } else {
                        work.push(self.frames[parent as usize]);
                    }
                }
                Elem::Chars(_) => frontier.push(self.frame(pos, parent)),
                Elem::Rule(r) => {
                    // A rule last in its alternative returns straight to the parent, so right
                    // recursion (repetition) does not grow the stack.
                    let cont = if self.g.elems[pos as usize + 1] == Elem::End {
                        parent
                    } else {
                        self.frame(pos + 1, parent)
                    };
                    for &start in self.g.rules[r as usize].iter().rev() {
                        work.push((start, cont));
                    }
                }
            }
        }
        self.work = work;
    }

    fn frame(&mut self, pos: u32, parent: u32) -> u32 {
        let k = key(pos, parent);
        if let Some(&id) = self.intern.get(&k) {
            return id;
        }
        let id = self.frames.len() as u32;
        self.frames.push((pos, parent));
        self.intern.insert(k, id);
        id
    }
}

fn key(pos: u32, parent: u32) -> u64 {
    ((pos as u64) << 32) | parent as u64
}

/// rustc's Fx hash: the intern table is hit for every character of every token explored.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}
