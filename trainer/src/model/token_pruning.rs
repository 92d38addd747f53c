//! Token-pruning operators for any stack of attention layers (HiDrop's visual tokens inside a
//! language model; a tracker's template and search tokens inside a ViT): how much attention a
//! token receives, and a top-k that keeps exactly `k` tokens in their original order with a
//! soft mask whose gradient reaches the scores.

use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::ops::Range;

/// The attention each key in `columns` receives: probabilities `[batch, heads, queries, keys]`
/// averaged over heads and queries, `[batch, columns.len()]`.
pub fn attention_received<B: Backend>(probs: Tensor<B, 4>, columns: Range<usize>) -> Tensor<B, 2> {
    let [batch, _, _, _] = probs.dims();
    let n = columns.len();
    probs
        .slice(s![.., .., .., columns])
        .mean_dim(1)
        .mean_dim(2)
        .reshape([batch, n])
}

/// What a top-k keeps.
pub struct TopK<B: Backend> {
    /// `[batch, k]`, indices into the scored tokens, ascending (their original order).
    pub indices: Tensor<B, 2, Int>,
    /// `[batch, k]`: the soft mask `m_i` of each kept token (above 0.5), to scale its features.
    pub mask: Tensor<B, 2>,
}

/// HiDrop's differentiable top-k (the rank-sigmoid operator) over `scores: [batch, n]`:
/// `c_i` = the fraction of scores at or below `s_i`, `m_i = sigmoid((c_i - (1 - k/n)) n
/// lambda)`, kept where `m_i > 0.5` — exactly the `k` highest scores. The rank is a step
/// function, so its gradient is taken from a smooth rank (`mean_j sigmoid((z_i - z_j) /
/// temperature)` over standardised scores): the forward values are the hard ones.
pub fn rank_sigmoid_top_k<B: Backend>(
    scores: Tensor<B, 2>,
    k: usize,
    lambda: f64,
    temperature: f64,
) -> TopK<B> {
    let [batch, n] = scores.dims();
    assert!(k >= 1 && k <= n, "top-k: k = {k} of {n} tokens");
    let column = |t: Tensor<B, 2>| t.reshape([batch, n, 1]).expand([batch, n, n]);
    let row = |t: Tensor<B, 2>| t.reshape([batch, 1, n]).expand([batch, n, n]);
    let hard_rank = row(scores.clone())
        .lower_equal(column(scores.clone()))
        .float()
        .mean_dim(2)
        .reshape([batch, n]);
    let centred = scores.clone() - scores.clone().mean_dim(1);
    let z = centred.clone() / (centred.square().mean_dim(1).sqrt() + 1e-12);
    let soft_rank = sigmoid((column(z.clone()) - row(z)) / temperature)
        .mean_dim(2)
        .reshape([batch, n]);
    let rank = hard_rank.detach() + soft_rank.clone() - soft_rank.detach();
    let threshold = 1.0 - k as f64 / n as f64;
    let mask = sigmoid((rank - threshold) * (n as f64 * lambda));
    let indices = scores
        .detach()
        .argsort_descending(1)
        .slice(s![.., 0..k])
        .sort(1);
    TopK {
        mask: mask.gather(1, indices.clone()),
        indices,
    }
}

/// The `k` highest of `scores: [batch, n]` in their original order, with no soft mask (the
/// hard top-k control).
pub fn hard_top_k<B: Backend>(scores: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    scores
        .detach()
        .argsort_descending(1)
        .slice(s![.., 0..k])
        .sort(1)
}

/// `k` of `n` tokens per row drawn at random (seeded), in their original order: the control
/// for choosing by attention.
pub fn random_k<B: Backend>(
    batch: usize,
    n: usize,
    k: usize,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut flat = Vec::with_capacity(batch * k);
    for _ in 0..batch {
        let mut picked: Vec<i64> = sample(&mut rng, n, k)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        picked.sort_unstable();
        flat.extend(picked);
    }
    Tensor::from_data(TensorData::new(flat, [batch, k]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;

    type B = crate::Cpu;

    #[test]
    fn top_k_keeps_exactly_k_in_order_and_the_mask_says_so() {
        let device = Default::default();
        let scores = Tensor::<B, 2>::from_floats(
            [
                [0.1, 0.9, 0.3, 0.7, 0.2, 0.8],
                [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
            ],
            &device,
        );
        for k in 1..=6 {
            let top = rank_sigmoid_top_k(scores.clone(), k, 1.0, 0.1);
            assert_eq!(top.indices.dims(), [2, k]);
            let kept: Vec<i64> = top.indices.into_data().convert::<i64>().to_vec().unwrap();
            let mask: Vec<f32> = top.mask.into_data().to_vec().unwrap();
            assert!(mask.iter().all(|&m| m > 0.5), "k {k}: {mask:?}");
            let expected_0: Vec<i64> = match k {
                1 => vec![1],
                2 => vec![1, 5],
                3 => vec![1, 3, 5],
                4 => vec![1, 2, 3, 5],
                5 => vec![1, 2, 3, 4, 5],
                _ => vec![0, 1, 2, 3, 4, 5],
            };
            assert_eq!(&kept[..k], expected_0.as_slice(), "k {k}");
            assert_eq!(kept[k..], (0..k as i64).collect::<Vec<_>>(), "k {k}");
        }
        assert_eq!(
            hard_top_k(scores, 2)
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .unwrap(),
            vec![1, 5, 0, 1]
        );
    }

    #[test]
    fn dropped_tokens_have_a_mask_at_most_one_half_and_gradients_reach_the_scores() {
        let device = Default::default();
        let scores =
            Tensor::<Autodiff<B>, 2>::from_floats([[0.1, 0.9, 0.3, 0.7]], &device).require_grad();
        let top = rank_sigmoid_top_k(scores.clone(), 2, 1.0, 0.5);
        assert_eq!(
            top.indices
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .unwrap(),
            vec![1, 3]
        );
        let grads = top.mask.sum().backward();
        let grad: Vec<f32> = scores.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(grad.iter().any(|g| g.abs() > 1e-4), "{grad:?}");
        // The full mask: above 0.5 exactly on the kept.
        let n = 4.0;
        for (c, kept) in [
            (1.0 / n, false),
            (2.0 / n, false),
            (3.0 / n, true),
            (1.0, true),
        ] {
            let m = 1.0 / (1.0 + (-((c - 0.5) * n * 1.0f64)).exp());
            assert_eq!(m > 0.5, kept, "c {c}: m {m}");
        }
    }

    #[test]
    fn random_k_draws_distinct_sorted_indices() {
        let picked: Vec<i64> = random_k::<B>(3, 10, 4, 9, &Default::default())
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        for row in picked.chunks(4) {
            assert!(row.windows(2).all(|w| w[0] < w[1]), "{row:?}");
            assert!(row.iter().all(|&i| (0..10).contains(&i)));
        }
    }

    #[test]
    fn attention_received_averages_heads_and_queries() {
        let device = Default::default();
        // batch 1, 2 heads, 1 query, 3 keys.
        let probs = Tensor::<B, 4>::from_floats([[[[0.2, 0.3, 0.5]], [[0.4, 0.1, 0.5]]]], &device);
        let got: Vec<f32> = attention_received(probs, 1..3)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(
            (got[0] - 0.2).abs() < 1e-6 && (got[1] - 0.5).abs() < 1e-6,
            "{got:?}"
        );
    }
}
