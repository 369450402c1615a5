//! Sets of Unicode scalar values as sorted, disjoint, non-adjacent inclusive ranges.

pub const MAX_CHAR: u32 = 0x10FFFF;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CharSet {
    ranges: Vec<(u32, u32)>,
}

impl CharSet {
    pub fn empty() -> Self {
        CharSet::default()
    }

    pub fn any() -> Self {
        CharSet::range(0, MAX_CHAR)
    }

    pub fn single(c: u32) -> Self {
        CharSet::range(c, c)
    }

    pub fn range(lo: u32, hi: u32) -> Self {
        CharSet::from_ranges([(lo, hi)])
    }

    /// Normalises any ranges (empty ones, `lo > hi`, are dropped).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut r: Vec<(u32, u32)> = ranges
            .into_iter()
            .filter(|(lo, hi)| lo <= hi)
            .map(|(lo, hi)| (lo, hi.min(MAX_CHAR)))
            .collect();
        r.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(r.len());
        for (lo, hi) in r {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        CharSet { ranges: out }
    }

    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn union(&self, other: &CharSet) -> CharSet {
        CharSet::from_ranges(self.ranges.iter().chain(&other.ranges).copied())
    }

    pub fn complement(&self) -> CharSet {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut next = 0u32;
        for &(lo, hi) in &self.ranges {
            if lo > next {
                out.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= MAX_CHAR {
            out.push((next, MAX_CHAR));
        }
        CharSet { ranges: out }
    }

    pub fn intersect(&self, other: &CharSet) -> CharSet {
        self.complement().union(&other.complement()).complement()
    }

    pub fn minus(&self, other: &CharSet) -> CharSet {
        self.intersect(&other.complement())
    }

    pub fn contains(&self, c: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, hi)| hi < c);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= c)
    }

    /// Whether any value in `lo..=hi` is in the set.
    pub fn intersects(&self, lo: u32, hi: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, h)| h < lo);
        self.ranges.get(i).is_some_and(|&(l, _)| l <= hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_algebra() {
        let a = CharSet::from_ranges([
            (b'a' as u32, b'f' as u32),
            (b'c' as u32, b'k' as u32),
            (b'l' as u32, b'm' as u32),
        ]);
        assert_eq!(a.ranges(), &[(97, 109)]);
        let c = a.complement();
        assert!(c.contains(0) && !c.contains(100) && c.contains(MAX_CHAR));
        assert_eq!(c.complement(), a);
        let b = CharSet::range(100, 200);
        assert_eq!(a.intersect(&b).ranges(), &[(100, 109)]);
        assert_eq!(a.minus(&b).ranges(), &[(97, 99)]);
        assert!(a.intersects(50, 97) && !a.intersects(110, 120));
        assert!(CharSet::empty().complement() == CharSet::any());
    }
}
