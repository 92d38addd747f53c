//! Parameter initialisation that is reproducible whatever else runs in the process.
//!
//! Burn's random tensors draw from one global seeded generator per backend, which parallel
//! tests and threads would share; drawing on the host from our own generator avoids that.
//! When weights are about to be loaded, parameters are created lazily and never filled.

use burn::module::{Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub enum ParamInit {
    /// Normal(0, std) from a seeded generator on the host.
    Normal { rng: Box<StdRng>, std: f32 },
    /// Shapes only: values arrive from a checkpoint before first use.
    Lazy,
}

impl ParamInit {
    pub fn normal(seed: u64, std: f32) -> Self {
        Self::Normal {
            rng: Box::new(StdRng::seed_from_u64(seed)),
            std,
        }
    }

    /// A parameter of `shape`, drawn from this initialiser.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        self.drawn(shape, device, |rng, std| standard_normal(rng) * std)
    }

    /// A parameter drawn uniformly from `[-bound, bound]` (Kaiming-uniform router weights).
    pub fn uniform<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        bound: f32,
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        self.drawn(shape, device, |rng, _| {
            (rng.random::<f32>() * 2.0 - 1.0) * bound
        })
    }

    /// Every value from `draw(generator, std)` on the host, or a lazy parameter.
    fn drawn<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &B::Device,
        mut draw: impl FnMut(&mut StdRng, f32) -> f32,
    ) -> Param<Tensor<B, D>> {
        match self {
            Self::Normal { rng, std } => {
                let count = shape.iter().product();
                let values: Vec<f32> = (0..count).map(|_| draw(rng, *std)).collect();
                Param::from_data(TensorData::new(values, shape), device)
            }
            Self::Lazy => zeros_lazy(shape, device),
        }
    }

    /// A parameter filled with `value` (norm weights start at one, LoRA's B at zero).
    pub fn constant<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        value: f32,
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        match self {
            Self::Normal { .. } => Param::from_tensor(Tensor::full(shape, value, device)),
            Self::Lazy => zeros_lazy(shape, device),
        }
    }
}

fn zeros_lazy<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| Tensor::zeros(shape, device).set_require_grad(require_grad),
        device.clone(),
        true,
        shape.into(),
    )
}

/// A standard normal draw (Box-Muller), so results do not depend on rand_distr's version.
pub fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
