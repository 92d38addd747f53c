//! Next-token loss on selected tokens only.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Sum over selected positions of `-log p(target)`.
/// `logits: [batch, seq, vocab]`, `targets: [batch, seq]`, `selected: [batch, seq]` (1 or 0).
pub fn token_nll_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    selected: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let logits = match crate::cpu_fused::token_nll_sum(logits, &targets, &selected) {
        Ok(sum) => return sum,
        Err(logits) => logits,
    };
    let log_probs = log_softmax(logits, 2);
    let picked = log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2);
    (picked * selected).sum().neg()
}

/// Per-token `-log p(target)`, `[batch, seq]` (for per-sequence scores).
pub fn token_nll<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let log_probs = log_softmax(logits, 2);
    log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2)
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn only_selected_tokens_count() {
        let device = Default::default();
        // Two positions, vocab 2: uniform logits give log 2 per position.
        let logits = Tensor::<Cpu, 3>::zeros([1, 2, 2], &device);
        let targets = Tensor::<Cpu, 2, Int>::from_ints([[0, 1]], &device);
        let one = Tensor::<Cpu, 2>::from_floats([[1.0, 0.0]], &device);
        let both = Tensor::<Cpu, 2>::from_floats([[1.0, 1.0]], &device);
        let ln2 = std::f32::consts::LN_2;
        let a: f32 = token_nll_sum(logits.clone(), targets.clone(), one).into_scalar();
        let b: f32 = token_nll_sum(logits, targets, both).into_scalar();
        assert!(
            (a - ln2).abs() < 1e-6 && (b - 2.0 * ln2).abs() < 1e-6,
            "{a} {b}"
        );
    }
}
