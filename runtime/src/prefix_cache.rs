//! Keys and values of finished sequences, kept so that a later prompt starting with the same
//! tokens (the same image and question prefix, a chat's earlier turns) copies them instead of
//! computing them again, as vLLM's automatic prefix caching and llama.cpp's `cache_prompt` do.
//!
//! Reuse is exact because positions are `cumsum(attention_mask) - 1`: a token's key and value
//! depend on the tokens before it and its position among them, not on the slot it occupies.
//! Entries are matched on their longest common prefix with a prompt, so one entry serves every
//! prompt that shares any part of its start; the least recently used go first when the byte
//! budget is exceeded.

/// What identifies a position's key and value, given the positions before it: a text token's
/// id, or for an image slot the image's content hash (high bit set, so no id equals it).
pub type PositionKey = u64;

const IMAGE_BIT: u64 = 1 << 63;

/// The key of a text token.
pub fn token_key(id: u32) -> PositionKey {
    id as u64
}

/// The key of each slot of an image with content hash `hash`.
pub fn image_key(hash: &[u8; 32]) -> PositionKey {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b) | IMAGE_BIT
}

/// One sequence's keys and values: per cache tensor (`past_key_values.N.key`/`.value`, in the
/// pool's order and element type) the bytes of [heads, len, slot] (a slot: head_dim elements,
/// and an int8 row's exponent).
pub struct Entry {
    pub keys: Vec<PositionKey>,
    pub tensors: Vec<Vec<u8>>,
    last_used: u64,
}

impl Entry {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn bytes(&self) -> usize {
        self.tensors.iter().map(Vec::len).sum()
    }
}

/// Entries within a byte budget, least recently used evicted first.
pub struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0: off, nothing is kept).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            entries: Vec::new(),
            bytes: 0,
            clock: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The entry sharing the longest prefix with `keys`, and that length (marked used).
    pub fn longest_prefix(&mut self, keys: &[PositionKey]) -> Option<(&Entry, usize)> {
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let common = e.keys.iter().zip(keys).take_while(|(a, b)| a == b).count();
                (i, common)
            })
            .max_by_key(|&(i, common)| (common, self.entries[i].last_used))?;
        if len == 0 {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some((&self.entries[best], len))
    }

    /// Keep `keys` with their `tensors`, unless an entry already starts with all of them; an
    /// entry that `keys` extends is replaced. Evicts the least recently used beyond the budget.
    pub fn insert(&mut self, keys: Vec<PositionKey>, tensors: Vec<Vec<u8>>) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.keys.starts_with(&keys)) {
            e.last_used = self.clock;
            return;
        }
        let entry = Entry {
            keys,
            tensors,
            last_used: self.clock,
        };
        if entry.bytes() > self.budget {
            return;
        }
        let bytes = &mut self.bytes;
        self.entries.retain(|e| {
            let covered = entry.keys.starts_with(&e.keys);
            if covered {
                *bytes -= e.bytes();
            }
            !covered
        });
        self.bytes += entry.bytes();
        self.entries.push(entry);
        while self.bytes > self.budget {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].last_used)
                .expect("bytes > 0 means an entry");
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cache: &mut PrefixCache, keys: &[u64], bytes: usize) {
        cache.insert(keys.to_vec(), vec![vec![0u8; bytes]]);
    }

    #[test]
    fn longest_common_prefix_wins_and_lru_goes_first() {
        let mut c = PrefixCache::new(100);
        entry(&mut c, &[1, 2, 3, 4], 40);
        entry(&mut c, &[1, 2, 9], 30);
        assert_eq!(
            c.longest_prefix(&[1, 2, 3, 7]).map(|(e, n)| (e.len(), n)),
            Some((4, 3))
        );
        assert_eq!(
            c.longest_prefix(&[1, 2, 9, 9]).map(|(e, n)| (e.len(), n)),
            Some((3, 3))
        );
        assert!(c.longest_prefix(&[5]).is_none());
        // [1, 2, 3, 4] was used first: a third entry over the budget evicts it.
        assert_eq!(c.longest_prefix(&[1, 2, 9]).map(|(_, n)| n), Some(3));
        entry(&mut c, &[7, 7], 40);
        assert_eq!(c.bytes(), 70);
        assert!(c.longest_prefix(&[1, 2, 3, 4]).is_some_and(|(e, _)| e.len() == 3));
    }

    #[test]
    fn covered_entries_are_not_kept_twice() {
        let mut c = PrefixCache::new(1000);
        entry(&mut c, &[1, 2], 20);
        entry(&mut c, &[1, 2, 3], 30); // replaces [1, 2]
        assert_eq!(c.bytes(), 30);
        entry(&mut c, &[1, 2], 20); // already covered by [1, 2, 3]
        assert_eq!(c.bytes(), 30);
        entry(&mut c, &[1, 5], 20);
        assert_eq!(c.bytes(), 50);
        // Bigger than the whole budget: not kept.
        entry(&mut c, &[9], 2000);
        assert_eq!(c.bytes(), 50);
        assert!(!PrefixCache::new(0).enabled());
    }
}
