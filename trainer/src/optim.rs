//! Gradients by parameter name, global-norm clipping, and AdamW.
//!
//! Written out rather than taken from burn-optim so that clipping is global (as
//! `torch.nn.utils.clip_grad_norm_`, not per tensor), accumulation is explicit, and the
//! optimizer state is a set of named tensors that checkpoints store and restore exactly.

use crate::weights::to_host;
use anyhow::{bail, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use checkpoints::{HostTensor, WeightSource};
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
    /// arithmetic in one pass (`cpu_fused::adamw_update`).
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
        let (param, m, v) = match crate::cpu_fused::adamw_update(param, grad, m, v, &step) {
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
