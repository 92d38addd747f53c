//! Gradients by parameter name, global-norm clipping, and AdamW.
//!
//! Written out rather than taken from burn-optim so that clipping is global (as
//! `torch.nn.utils.clip_grad_norm_`, not per tensor), accumulation is explicit, and the
//! optimizer state is a set of named tensors that checkpoints store and restore exactly.

use crate::backend::Cpu;
use crate::cpu_fused::{checked, contiguous_f32, flex_f32, ELEMENTS_PER_TASK};
use crate::weights::to_host;
use anyhow::{bail, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use checkpoints::{HostTensor, WeightSource};
use rayon::prelude::*;
use std::any::TypeId;
use std::collections::BTreeMap;

/// Flattened gradients of the trainable parameters, by name.
pub struct Gradients<B: Backend> {
    pub tensors: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Gradients<B> {
    /// Reads the gradient of every parameter that has one (frozen ones have none).
    pub fn of<AB: AutodiffBackend<InnerBackend = B>, M: Module<AB>>(
        module: &M,
        grads: &AB::Gradients,
    ) -> Self {
        struct Collect<'a, AB: AutodiffBackend> {
            path: Vec<String>,
            grads: &'a AB::Gradients,
            out: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                if let Some(grad) = param.val().grad(self.grads) {
                    let count = grad.shape().num_elements();
                    self.out.insert(self.path.join("."), grad.reshape([count]));
                }
            }
        }
        let mut visitor = Collect::<AB> {
            path: vec![],
            grads,
            out: BTreeMap::new(),
        };
        module.visit(&mut visitor);
        Self {
            tensors: visitor.out,
        }
    }

    /// Zero gradients for every trainable parameter: the share of a data-parallel peer
    /// that had nothing to train on this step (the all-reduce needs every peer's tensors).
    pub fn zeros_for<AB: AutodiffBackend<InnerBackend = B>, M: Module<AB>>(module: &M) -> Self {
        struct Zeros<AB: AutodiffBackend> {
            path: Vec<String>,
            out: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for Zeros<AB> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                let value = param.val();
                if value.is_require_grad() {
                    let zeros = Tensor::zeros([value.shape().num_elements()], &value.device());
                    self.out.insert(self.path.join("."), zeros);
                }
            }
        }
        let mut visitor = Zeros::<AB> {
            path: vec![],
            out: BTreeMap::new(),
        };
        module.visit(&mut visitor);
        Self {
            tensors: visitor.out,
        }
    }

    /// Adds `other` into `self` (gradient accumulation).
    pub fn accumulate(&mut self, other: Self) {
        for (name, grad) in other.tensors {
            let sum = match self.tensors.remove(&name) {
                Some(previous) => previous + grad,
                None => grad,
            };
            self.tensors.insert(name, sum);
        }
    }

    /// `sqrt(sum of squares)` over every gradient together.
    pub fn global_norm(&self) -> f64 {
        let squares: Vec<Tensor<B, 1>> = self
            .tensors
            .values()
            .map(|g| g.clone().square().sum())
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        let total: f32 = Tensor::cat(squares, 0).sum().into_scalar().elem();
        (total as f64).sqrt()
    }

    /// Scales every gradient so the global norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does. Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let coefficient = max_norm / (norm + 1e-6);
        if coefficient < 1.0 {
            for grad in self.tensors.values_mut() {
                *grad = grad.clone().mul_scalar(coefficient);
            }
        }
        norm
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not norms or biases).
    pub weight_decay: f64,
}

/// The scalars of one AdamW update of one parameter (torch's rule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// `1 - lr · weight_decay` for decayed parameters.
    pub decay: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub bias_correction2_sqrt: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
}

impl AdamWStep {
    pub fn new(config: &AdamWConfig, steps: u64, lr: f64, decays: bool) -> Self {
        let t = steps as i32;
        Self {
            decay: (decays && config.weight_decay > 0.0).then_some(1.0 - lr * config.weight_decay),
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            bias_correction2_sqrt: (1.0 - config.beta2.powi(t)).sqrt(),
            step_size: lr / (1.0 - config.beta1.powi(t)),
        }
    }

    /// The update with tensor ops: `(param, m, v)` after it. The CPU backend runs the same
    /// arithmetic in one pass (`one_pass_cpu_update`).
    pub fn apply<B: Backend>(
        &self,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        m: Tensor<B, 1>,
        v: Tensor<B, 1>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
        let param = match self.decay {
            Some(decay) => param.mul_scalar(decay),
            None => param,
        };
        let m = m.mul_scalar(self.beta1) + grad.clone().mul_scalar(1.0 - self.beta1);
        let v = v.mul_scalar(self.beta2) + grad.square().mul_scalar(1.0 - self.beta2);
        let denom = v
            .clone()
            .sqrt()
            .div_scalar(self.bias_correction2_sqrt)
            .add_scalar(self.eps);
        let param = param - m.clone().div(denom).mul_scalar(self.step_size);
        (param, m, v)
    }
}

/// AdamW with torch's update rule and named moment tensors.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates taken so far (for bias correction).
    pub steps: u64,
    moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step<AB: AutodiffBackend<InnerBackend = B>, M: Module<AB>>(
        &mut self,
        module: M,
        grads: &Gradients<B>,
        lr: f64,
    ) -> M {
        self.steps += 1;
        struct Update<'a, B: Backend> {
            path: Vec<String>,
            optimizer: &'a mut AdamW<B>,
            grads: &'a Gradients<B>,
            lr: f64,
        }
        impl<B: Backend, AB: AutodiffBackend<InnerBackend = B>> ModuleMapper<AB> for Update<'_, B> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<AB, D>>,
            ) -> Param<Tensor<AB, D>> {
                let name = self.path.join(".");
                let Some(grad) = self.grads.tensors.get(&name) else {
                    return param;
                };
                let value = param.val().inner();
                let shape = value.shape();
                let flat = value.reshape([shape.num_elements()]);
                let updated = self
                    .optimizer
                    .update(&name, flat, grad.clone(), self.lr, D >= 2);
                let tensor = Tensor::<AB, D>::from_inner(updated.reshape(shape)).require_grad();
                Param::initialized(param.id, tensor)
            }
        }
        let mut mapper = Update {
            path: vec![],
            optimizer: self,
            grads,
            lr,
        };
        module.map(&mut mapper)
    }

    fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        lr: f64,
        decays: bool,
    ) -> Tensor<B, 1> {
        let step = AdamWStep::new(&self.config, self.steps, lr, decays);
        let (m, v) = match self.moments.remove(name) {
            Some(state) => state,
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let (param, m, v) = match one_pass_cpu_update(param, grad, m, v, &step) {
            Ok(updated) => updated,
            Err((param, grad, m, v)) => step.apply(param, grad, m, v),
        };
        self.moments.insert(name.to_string(), (m, v));
        param
    }

    /// Moment tensors by name (`exp_avg.<param>`, `exp_avg_sq.<param>`), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        for (name, (m, v)) in &self.moments {
            out.push((format!("exp_avg.{name}"), to_host(m.clone())));
            out.push((format!("exp_avg_sq.{name}"), to_host(v.clone())));
        }
        out
    }

    /// Restores the moments saved by [`state_tensors`](Self::state_tensors).
    pub fn load_state(
        &mut self,
        source: &WeightSource,
        steps: u64,
        device: &B::Device,
    ) -> Result<()> {
        self.moments.clear();
        self.steps = steps;
        let load = |name: &str| -> Result<Tensor<B, 1>> {
            let host = source.get(name)?;
            let count = host.data.len();
            Ok(Tensor::from_data(
                TensorData::new(host.data, [count]),
                device,
            ))
        };
        for key in source.names() {
            if let Some(param) = key.strip_prefix("exp_avg.") {
                let second = format!("exp_avg_sq.{param}");
                if !source.contains(&second) {
                    bail!("optimizer state has `{key}` but not `{second}`");
                }
                self.moments
                    .insert(param.to_string(), (load(key)?, load(&second)?));
            }
        }
        Ok(())
    }
}

type AdamWTensors<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// `(param, m, v)` after one AdamW update in one pass over the four tensors, on f32 tensors of
/// the CPU backend (the optimizer works on the inner, non-autodiff tensors); the inputs back
/// elsewhere. Ours because the tensor ops make twelve single-threaded passes; the same f32
/// operations in the same order as [`AdamWStep::apply`], so the same bits (tested).
#[allow(clippy::type_complexity)]
fn one_pass_cpu_update<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    step: &AdamWStep,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>), AdamWTensors<B>> {
    let all_f32 = [&param, &grad, &m, &v]
        .iter()
        .all(|t| t.dtype() == DType::F32);
    if TypeId::of::<B>() != TypeId::of::<Cpu>() || !all_f32 {
        return Err((param, grad, m, v));
    }
    let on_cpu = |t: Tensor<B, 1>| -> FlexTensor {
        let t: Tensor<Cpu, 1> = checked(t);
        contiguous_f32(&t.into_primitive().tensor())
    };
    let (param, grad, m, v) = (on_cpu(param), on_cpu(grad), on_cpu(m), on_cpu(v));
    let [param, grad, m, v] = [&param, &grad, &m, &v].map(|t| t.as_slice::<f32>().expect("f32"));
    let len = param.len();
    let (mut new_param, mut new_m, mut new_v) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
    // The scalars as the tensor ops see them: rounded to f32.
    let decay = step.decay.map(|d| d as f32);
    let (beta1, one_minus_beta1) = (step.beta1 as f32, (1.0 - step.beta1) as f32);
    let (beta2, one_minus_beta2) = (step.beta2 as f32, (1.0 - step.beta2) as f32);
    let (bias2, eps, step_size) = (
        step.bias_correction2_sqrt as f32,
        step.eps as f32,
        step.step_size as f32,
    );
    const CHUNK: usize = ELEMENTS_PER_TASK;
    new_param
        .par_chunks_mut(CHUNK)
        .zip(new_m.par_chunks_mut(CHUNK))
        .zip(new_v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((out_p, out_m), out_v))| {
            let start = chunk * CHUNK;
            for i in 0..out_p.len() {
                let (p, g) = (param[start + i], grad[start + i]);
                let p = decay.map_or(p, |d| p * d);
                let m = m[start + i] * beta1 + g * one_minus_beta1;
                let v = v[start + i] * beta2 + g * g * one_minus_beta2;
                let denom = v.sqrt() / bias2 + eps;
                out_p[i] = p - m / denom * step_size;
                out_m[i] = m;
                out_v[i] = v;
            }
        });
    let back = |values: Vec<f32>| -> Tensor<B, 1> {
        let t = Tensor::<Cpu, 1>::from_primitive(TensorPrimitive::Float(flex_f32(
            values,
            Shape::new([len]),
        )));
        checked(t)
    };
    Ok((back(new_param), back(new_m), back(new_v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use burn::tensor::Distribution;

    fn random(len: usize, seed: u64) -> Tensor<Cpu, 1> {
        <Cpu as Backend>::seed(&Default::default(), seed);
        Tensor::random([len], Distribution::Normal(0.0, 3.0), &Default::default())
    }

    #[test]
    fn one_pass_adamw_gives_the_bits_of_the_tensor_ops() {
        let config = crate::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let inner = |seed| random(40_000, seed);
        let (param, grad, m) = (inner(4), inner(5), inner(6));
        let v = inner(7).abs();
        for (steps, decays) in [(1, true), (7, false)] {
            let step = AdamWStep::new(&config, steps, 3e-3, decays);
            let tensor_ops = step.apply(param.clone(), grad.clone(), m.clone(), v.clone());
            let one_pass =
                one_pass_cpu_update(param.clone(), grad.clone(), m.clone(), v.clone(), &step)
                    .expect("the CPU path");
            let pairs = [
                (tensor_ops.0, one_pass.0),
                (tensor_ops.1, one_pass.1),
                (tensor_ops.2, one_pass.2),
            ];
            for (name, (a, b)) in ["param", "m", "v"].iter().zip(pairs) {
                assert_eq!(a.into_data(), b.into_data(), "{name} after step {steps}");
            }
        }
    }
}
