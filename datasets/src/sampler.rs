//! Deterministic shuffling with a resumable cursor: epoch `e` visits the examples in a
//! permutation drawn from `(seed, e)`, so the cursor `(epoch, position)` is the whole state.
//! Optionally grouped by length (as `transformers`' `group_by_length`): each batch holds
//! examples of similar length, so little of it is padding.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

/// Batches of one group are cut from this many batches' worth of shuffled examples sorted by
/// length (`transformers` uses 50): larger groups pad less, smaller ones mix lengths more.
const BATCHES_PER_GROUP: usize = 64;

#[derive(Debug, Clone)]
pub struct EpochSampler {
    seed: u64,
    len: usize,
    grouping: Option<LengthGrouping>,
    order: Vec<usize>,
    pub state: SamplerState,
}

#[derive(Debug, Clone)]
struct LengthGrouping {
    lengths: Vec<usize>,
    batch: usize,
}

impl EpochSampler {
    pub fn new(len: usize, seed: u64) -> Self {
        Self::resume(
            len,
            seed,
            SamplerState {
                epoch: 0,
                position: 0,
            },
        )
    }

    pub fn resume(len: usize, seed: u64, state: SamplerState) -> Self {
        assert!(len > 0, "cannot sample from an empty data set");
        let mut sampler = Self {
            seed,
            len,
            grouping: None,
            order: Vec::new(),
            state,
        };
        sampler.shuffle();
        sampler
    }

    /// The same sampler drawing batches of `batch` examples of similar length (`lengths[i]`
    /// is example i's): each epoch's permutation is cut into groups of 64 batches, each group
    /// sorted by length, cut into batches, and its batches shuffled. An epoch then drops its
    /// last `len % batch` examples (different ones each epoch), so that every batch drawn
    /// with [`next_indices`](Self::next_indices)`(batch)` lies within one group. The cursor
    /// stays the whole state.
    pub fn grouped_by_length(mut self, lengths: Vec<usize>, batch: usize) -> Self {
        assert_eq!(lengths.len(), self.len, "one length per example");
        assert!(batch > 0, "batches of at least one example");
        self.grouping = Some(LengthGrouping { lengths, batch });
        self.shuffle();
        self
    }

    fn shuffle(&mut self) {
        self.order = (0..self.len).collect();
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ self.state.epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        self.order.shuffle(&mut rng);
        let Some(LengthGrouping { lengths, batch }) = &self.grouping else {
            return;
        };
        let whole_batches = self.len / batch * batch;
        if whole_batches > 0 {
            self.order.truncate(whole_batches);
        }
        for group in self.order.chunks_mut(batch * BATCHES_PER_GROUP) {
            // A stable sort: examples of equal length stay in their shuffled order.
            group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            let mut batches: Vec<Vec<usize>> =
                group.chunks(*batch).map(<[usize]>::to_vec).collect();
            batches.shuffle(&mut rng);
            group.copy_from_slice(&batches.concat());
        }
    }

    /// The next `n` example indices, moving into the next epoch when one ends.
    pub fn next_indices(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.state.position == self.order.len() {
                self.state = SamplerState {
                    epoch: self.state.epoch + 1,
                    position: 0,
                };
                self.shuffle();
            }
            out.push(self.order[self.state.position]);
            self.state.position += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_from_a_cursor_continues_the_same_stream() {
        let mut straight = EpochSampler::new(7, 42);
        let all: Vec<usize> = (0..5).flat_map(|_| straight.next_indices(3)).collect();
        let mut first = EpochSampler::new(7, 42);
        let mut resumed: Vec<usize> = (0..2).flat_map(|_| first.next_indices(3)).collect();
        let mut second = EpochSampler::resume(7, 42, first.state);
        resumed.extend((0..3).flat_map(|_| second.next_indices(3)));
        assert_eq!(all, resumed);
        // Each epoch is a permutation, and epochs differ.
        let mut epoch0 = all[..7].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..7).collect::<Vec<_>>());
        assert_ne!(all[..7], all[7..14]);
    }

    /// The padded width of a batch (its longest example) summed over `batches`.
    fn padded_tokens(sampler: &mut EpochSampler, lengths: &[usize], batches: usize) -> usize {
        (0..batches)
            .map(|_| {
                let batch = sampler.next_indices(8);
                8 * batch.iter().map(|&i| lengths[i]).max().unwrap()
            })
            .sum()
    }

    #[test]
    fn grouped_batches_pad_less_visit_everyone_and_resume() {
        let lengths: Vec<usize> = (0..1003).map(|i| 20 + (i * 7919) % 180).collect();
        let grouped = || EpochSampler::new(lengths.len(), 3).grouped_by_length(lengths.clone(), 8);
        // An epoch is 125 whole batches: every example at most once, 3 left out.
        let mut sampler = grouped();
        let epoch: Vec<usize> = (0..125).flat_map(|_| sampler.next_indices(8)).collect();
        let mut seen = epoch.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
        assert_eq!(sampler.state.epoch, 0);
        sampler.next_indices(8);
        assert_eq!(sampler.state.epoch, 1, "the next batch starts a new epoch");
        // Far less padding than plain shuffling, and the batches are not in length order.
        let plain = padded_tokens(&mut EpochSampler::new(lengths.len(), 3), &lengths, 250);
        let less = padded_tokens(&mut grouped(), &lengths, 250);
        assert!(
            less * 10 < plain * 8,
            "grouped {less} vs plain {plain} padded tokens"
        );
        let longest: Vec<usize> = epoch
            .chunks(8)
            .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap())
            .collect();
        assert!(longest.windows(2).any(|w| w[0] < w[1]) && longest.windows(2).any(|w| w[0] > w[1]));
        // Resuming from the cursor continues the same stream, across an epoch's end.
        let mut straight = grouped();
        let all: Vec<usize> = (0..300).flat_map(|_| straight.next_indices(8)).collect();
        let mut first = grouped();
        let mut resumed: Vec<usize> = (0..140).flat_map(|_| first.next_indices(8)).collect();
        let mut second = EpochSampler::resume(lengths.len(), 3, first.state)
            .grouped_by_length(lengths.clone(), 8);
        resumed.extend((0..160).flat_map(|_| second.next_indices(8)));
        assert_eq!(all, resumed);
    }
}
