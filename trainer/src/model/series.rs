//! Time-series blocks shared by forecasting recipes (the PatchTST layout that LLM4TSF and the
//! Time-Series-Library models use): per-instance normalisation, patching, a patch encoder and
//! a flatten head. Channel independence: a multichannel window enters as one row per
//! channel, `[rows, length]`.

use crate::model::init::ParamInit;
use crate::model::layers::Linear;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;

/// The mean and standard deviation each row was normalised by, to undo it at the output.
pub struct InstanceStats<B: Backend> {
    pub mean: Tensor<B, 2>,
    pub std: Tensor<B, 2>,
}

/// Subtracts each row's mean and divides by its standard deviation (population, + 1e-5 under
/// the root); the statistics are detached, as in the papers' code.
pub fn normalise<B: Backend>(x: Tensor<B, 2>) -> (Tensor<B, 2>, InstanceStats<B>) {
    let mean = x.clone().mean_dim(1).detach();
    let centred = x - mean.clone();
    let std = (centred.clone().square().mean_dim(1) + 1e-5)
        .sqrt()
        .detach();
    (centred / std.clone(), InstanceStats { mean, std })
}

/// Undoes [`normalise`] on a forecast `[rows, horizon]`.
pub fn denormalise<B: Backend>(y: Tensor<B, 2>, stats: &InstanceStats<B>) -> Tensor<B, 2> {
    y * stats.std.clone() + stats.mean.clone()
}

/// How many patches [`patch`] makes of `length` values: `(length - patch) / stride + 2` (the
/// end is padded by `stride` repeats of the last value, so the last values get a patch).
pub fn patch_count(length: usize, patch_length: usize, stride: usize) -> usize {
    (length - patch_length) / stride + 2
}

/// `[rows, length] -> [rows, patches, patch_length]`, patches `stride` apart.
pub fn patch<B: Backend>(x: Tensor<B, 2>, patch_length: usize, stride: usize) -> Tensor<B, 3> {
    let [rows, length] = x.dims();
    let last = x.clone().slice(s![.., length - 1..length]);
    let padded = Tensor::cat(vec![x, last.repeat_dim(1, stride)], 1);
    let count = patch_count(length, patch_length, stride);
    let patches: Vec<Tensor<B, 3>> = (0..count)
        .map(|i| {
            padded
                .clone()
                .slice(s![.., i * stride..i * stride + patch_length])
                .reshape([rows, 1, patch_length])
        })
        .collect();
    Tensor::cat(patches, 1)
}

/// A patch to a `d_model` vector: linear, layer norm, dropout.
#[derive(Module, Debug)]
pub struct PatchEncoder<B: Backend> {
    pub linear: Linear<B>,
    pub norm: LayerNorm<B>,
    pub dropout: Dropout,
}

impl<B: Backend> PatchEncoder<B> {
    pub fn new(
        patch_length: usize,
        d_model: usize,
        dropout: f64,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Self {
        Self {
            linear: Linear::new(patch_length, d_model, true, init, device),
            norm: LayerNormConfig::new(d_model).init(device),
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// `[rows, patches, patch_length] -> [rows, patches, d_model]`.
    pub fn forward(&self, patches: Tensor<B, 3>) -> Tensor<B, 3> {
        self.dropout
            .forward(self.norm.forward(self.linear.forward(patches)))
    }
}

/// Flattens `[rows, patches, d_model]` and maps it linearly to the horizon.
#[derive(Module, Debug)]
pub struct FlattenHead<B: Backend> {
    pub linear: Linear<B>,
}

impl<B: Backend> FlattenHead<B> {
    pub fn new(
        patches: usize,
        d_model: usize,
        horizon: usize,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Self {
        Self {
            linear: Linear::new(patches * d_model, horizon, true, init, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [rows, patches, d_model] = x.dims();
        self.linear.forward(x.reshape([rows, patches * d_model]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn normalisation_round_trips() {
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::from_floats(
            [[1.0, 2.0, 3.0, 10.0], [-5.0, -5.5, -4.0, -6.0]],
            &device,
        );
        let (normed, stats) = normalise(x.clone());
        let means: Vec<f32> = normed.clone().mean_dim(1).into_data().to_vec().unwrap();
        assert!(means.iter().all(|m| m.abs() < 1e-6), "{means:?}");
        let variances: Vec<f32> = normed
            .clone()
            .square()
            .mean_dim(1)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(
            variances.iter().all(|v| (v - 1.0).abs() < 1e-4),
            "{variances:?}"
        );
        let back: Vec<f32> = denormalise(normed, &stats).into_data().to_vec().unwrap();
        let original: Vec<f32> = x.into_data().to_vec().unwrap();
        for (a, b) in back.iter().zip(&original) {
            assert!((a - b).abs() < 1e-5, "{back:?} vs {original:?}");
        }
    }

    #[test]
    fn patches_count_and_contents() {
        // The LLM4TSF setting: 336 values, patches of 16 every 8 -> 42 patches.
        assert_eq!(patch_count(336, 16, 8), 42);
        let device = Default::default();
        let values: Vec<f32> = (0..20).map(|v| v as f32).collect();
        let x = Tensor::<Cpu, 1>::from_floats(values.as_slice(), &device).reshape([1, 20]);
        let patches = patch(x, 8, 4);
        assert_eq!(patches.dims(), [1, patch_count(20, 8, 4), 8]);
        assert_eq!(patch_count(20, 8, 4), 5);
        let data: Vec<f32> = patches.into_data().to_vec().unwrap();
        assert_eq!(&data[..8], &[0., 1., 2., 3., 4., 5., 6., 7.]);
        assert_eq!(&data[8..16], &[4., 5., 6., 7., 8., 9., 10., 11.]);
        // The last patch reaches into the padding: the last value repeated.
        assert_eq!(&data[32..40], &[16., 17., 18., 19., 19., 19., 19., 19.]);
    }
}
