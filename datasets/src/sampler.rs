//! Deterministic shuffling with a resumable cursor: epoch `e` visits the examples in a
//! permutation drawn from `(seed, e)`, so the cursor `(epoch, position)` is the whole state.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub position: usize,
}

#[derive(Debug, Clone)]
pub struct EpochSampler {
    seed: u64,
    order: Vec<usize>,
    pub state: SamplerState,
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
            order: (0..len).collect(),
            state,
        };
        sampler.shuffle();
        sampler
    }

    fn shuffle(&mut self) {
        self.order.sort_unstable();
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ self.state.epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        self.order.shuffle(&mut rng);
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
}
