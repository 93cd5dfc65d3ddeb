//! Sets of hosted experts, written as ranges per layer so that a node hosting every expert
//! of a large model still describes itself in a few bytes.

use std::fmt;

use crate::pb;

/// Experts `start` to `end - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertRange {
    pub start: u32,
    pub end: u32,
}

impl ExpertRange {
    pub fn contains(&self, expert: u32) -> bool {
        self.start <= expert && expert < self.end
    }

    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl fmt::Display for ExpertRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len() == 1 {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end.saturating_sub(1))
        }
    }
}

/// The experts hosted in one layer, as sorted, disjoint, non-adjacent ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerExperts {
    pub layer: u32,
    ranges: Vec<ExpertRange>,
}

impl LayerExperts {
    /// Builds the set from expert indices in any order; duplicates are merged.
    pub fn from_experts(layer: u32, experts: impl IntoIterator<Item = u32>) -> Self {
        let mut sorted: Vec<u32> = experts.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();

        let mut ranges: Vec<ExpertRange> = Vec::new();
        for expert in sorted {
            match ranges.last_mut() {
                Some(last) if last.end == expert => last.end = expert + 1,
                _ => ranges.push(ExpertRange {
                    start: expert,
                    end: expert.saturating_add(1),
                }),
            }
        }
        Self { layer, ranges }
    }

    /// Builds the set from ranges in any order, dropping empty ones and merging overlaps.
    pub fn from_ranges(layer: u32, ranges: impl IntoIterator<Item = ExpertRange>) -> Self {
        let mut sorted: Vec<ExpertRange> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
        sorted.sort_unstable();

        let mut merged: Vec<ExpertRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            match merged.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        Self {
            layer,
            ranges: merged,
        }
    }

    pub fn ranges(&self) -> &[ExpertRange] {
        &self.ranges
    }

    pub fn contains(&self, expert: u32) -> bool {
        self.ranges.iter().any(|range| range.contains(expert))
    }

    /// The expert indices in increasing order.
    pub fn experts(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|range| range.start..range.end)
    }

    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|range| u64::from(range.len())).sum()
    }

    pub fn to_wire(&self) -> pb::LayerExperts {
        pb::LayerExperts {
            layer: self.layer,
            ranges: self
                .ranges
                .iter()
                .map(|range| pb::ExpertRange {
                    start: range.start,
                    end: range.end,
                })
                .collect(),
        }
    }

    /// Builds the set from its message, normalizing the ranges.
    pub fn from_wire(message: &pb::LayerExperts) -> Self {
        Self::from_ranges(
            message.layer,
            message.ranges.iter().map(|range| ExpertRange {
                start: range.start,
                end: range.end,
            }),
        )
    }
}

impl fmt::Display for LayerExperts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.layer)?;
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn experts_compress_to_ranges() {
        let set = LayerExperts::from_experts(2, [5, 0, 1, 2, 7, 6, 1]);
        assert_eq!(
            set.ranges(),
            &[
                ExpertRange { start: 0, end: 3 },
                ExpertRange { start: 5, end: 8 }
            ]
        );
        assert_eq!(set.to_string(), "2:0-2+5-7");
        assert_eq!(set.count(), 6);
    }

    #[test]
    fn overlapping_ranges_merge() {
        let set = LayerExperts::from_ranges(
            0,
            [
                ExpertRange { start: 4, end: 6 },
                ExpertRange { start: 0, end: 5 },
                ExpertRange { start: 9, end: 9 },
            ],
        );
        assert_eq!(set.ranges(), &[ExpertRange { start: 0, end: 6 }]);
    }

    proptest! {
        #[test]
        fn ranges_hold_exactly_the_experts(experts in proptest::collection::vec(0u32..200, 0..60)) {
            let set = LayerExperts::from_experts(0, experts.clone());
            let mut expected = experts;
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(set.experts().collect::<Vec<_>>(), expected.clone());
            for expert in 0..200 {
                prop_assert_eq!(set.contains(expert), expected.contains(&expert));
            }
            prop_assert_eq!(LayerExperts::from_wire(&set.to_wire()), set);
        }
    }
}
