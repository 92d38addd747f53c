//! Choosing the next token from logits: greedy, temperature, top-p. Runs on the host, one
//! seeded generator per sequence, so a sequence's samples do not depend on its batch-mates.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`.
    pub top_p: f32,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A generator for sequence `index` of a run seeded with `seed`.
pub fn sequence_rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / params.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if params.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cumulative = 0.0;
        let mut keep = 0;
        for (_, p) in &probs {
            keep += 1;
            cumulative += p;
            if cumulative >= params.top_p {
                break;
            }
        }
        probs.truncate(keep);
    }
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f32>() * mass;
    for (token, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *token;
        }
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        let mut rng = sequence_rng(0, 0);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0], &SamplingParams::greedy(), &mut rng),
            1
        );
    }

    #[test]
    fn top_p_never_picks_outside_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps tokens 0 and 1 only.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
        };
        let mut rng = sequence_rng(7, 0);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&logits, &params, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 400 && seen[0] > 1200, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_the_distribution_and_is_seeded() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        let draw = |seed| {
            let mut rng = sequence_rng(seed, 3);
            (0..4000)
                .map(|_| sample(&logits, &params, &mut rng))
                .collect::<Vec<_>>()
        };
        let ones = draw(1).iter().filter(|&&t| t == 1).count() as f32 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }
}
