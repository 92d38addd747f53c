//! Attention masks and position ids for padded batches.
//!
//! Masks are boolean `[batch, 1, queries, keys]`, `true` where a query may attend to a key.
//! Streaming recipes build their own; this file builds the usual causal one with padding.

use burn::prelude::*;
use burn::tensor::TensorData;

/// Token rows padded on the left to one width, as generation wants them (every row's last
/// token is at the same index).
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub tokens: Vec<Vec<u32>>,
    /// `false` on padding.
    pub valid: Vec<Vec<bool>>,
}

impl PaddedBatch {
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32) -> Self {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let pad = |row: &Vec<u32>| width - row.len();
        Self {
            tokens: rows
                .iter()
                .map(|row| {
                    std::iter::repeat_n(pad_id, pad(row))
                        .chain(row.iter().copied())
                        .collect()
                })
                .collect(),
            valid: rows
                .iter()
                .map(|row| {
                    std::iter::repeat_n(false, pad(row))
                        .chain(std::iter::repeat_n(true, row.len()))
                        .collect()
                })
                .collect(),
        }
    }

    pub fn width(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }

    /// Position ids that count real tokens only, so padding does not shift positions.
    pub fn positions(&self) -> Vec<Vec<i64>> {
        positions_from_valid(&self.valid)
    }
}

/// `cumsum(valid) - 1`, clamped at 0 (padding gets position 0), as `transformers` does.
pub fn positions_from_valid(valid: &[Vec<bool>]) -> Vec<Vec<i64>> {
    valid
        .iter()
        .map(|row| {
            let mut count = 0i64;
            row.iter()
                .map(|&v| {
                    count += v as i64;
                    (count - 1).max(0)
                })
                .collect()
        })
        .collect()
}

/// Causal mask over keys `key_valid: [batch][keys]` for the last `queries` of those keys:
/// query `i` sits at key index `keys - queries + i` and sees valid keys up to itself.
pub fn causal_mask<B: Backend>(
    key_valid: &[Vec<bool>],
    queries: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let batch = key_valid.len();
    let keys = key_valid.first().map_or(0, Vec::len);
    let offset = keys - queries;
    let mut allowed = Vec::with_capacity(batch * queries * keys);
    for row in key_valid {
        for i in 0..queries {
            allowed.extend((0..keys).map(|j| row[j] && j <= offset + i));
        }
    }
    Tensor::from_data(TensorData::new(allowed, [batch, 1, queries, keys]), device)
}

pub fn int_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

pub fn token_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let rows: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&t| t as i64).collect())
        .collect();
    int_tensor(&rows, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_keeps_positions_of_real_tokens() {
        let batch = PaddedBatch::left_padded(&[vec![5, 6, 7], vec![9]], 0);
        assert_eq!(batch.tokens, vec![vec![5, 6, 7], vec![0, 0, 9]]);
        assert_eq!(batch.positions(), vec![vec![0, 1, 2], vec![0, 0, 0]]);
    }

    #[test]
    fn causal_mask_hides_future_and_padding() {
        let valid = vec![vec![false, true, true, true]];
        let mask = causal_mask::<crate::Cpu>(&valid, 2, &Default::default());
        let values: Vec<bool> = mask.into_data().to_vec().unwrap();
        // queries at key index 2 and 3
        assert_eq!(
            values,
            vec![false, true, true, false, false, true, true, true]
        );
    }
}
