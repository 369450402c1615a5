//! The vocabulary as a trie of token byte strings: the matcher walks it once per step, so tokens
//! that share a prefix share the work of matching it.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Default)]
pub struct TokenTrie {
    /// Which trie this is, for the matcher's cache of masks.
    pub(crate) id: u64,
    /// Per node, (byte, child) sorted by byte.
    children: Vec<Vec<(u8, u32)>>,
    /// Per node, the tokens whose bytes end there.
    tokens: Vec<Vec<u32>>,
}

impl TokenTrie {
    /// A trie of `(token id, bytes)`; a token with no bytes sits at the root.
    pub fn new<B: AsRef<[u8]>>(entries: impl IntoIterator<Item = (u32, B)>) -> TokenTrie {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut t = TokenTrie {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            children: vec![Vec::new()],
            tokens: vec![Vec::new()],
        };
        for (id, bytes) in entries {
            let mut node = 0usize;
            for &b in bytes.as_ref() {
                node = match t.children[node].binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => t.children[node][i].1 as usize,
                    Err(i) => {
                        let child = t.children.len() as u32;
                        t.children.push(Vec::new());
                        t.tokens.push(Vec::new());
                        t.children[node].insert(i, (b, child));
                        child as usize
                    }
                };
            }
            t.tokens[node].push(id);
        }
        t
    }

    pub fn nodes(&self) -> usize {
        self.children.len()
    }

    pub(crate) fn children(&self, node: u32) -> &[(u8, u32)] {
        &self.children[node as usize]
    }

    pub(crate) fn tokens(&self, node: u32) -> &[u32] {
        &self.tokens[node as usize]
    }
}
