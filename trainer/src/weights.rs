//! Moving parameters between a Burn module and named host tensors.
//!
//! A parameter's name is its module path (`model.layers.0.mlp.up_proj.weight`), read off
//! Burn's module visitor, so any module (LoRA adapters, routers) is covered without a list.

use anyhow::{bail, Context, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use checkpoints::{HostTensor, WeightSource};
use std::collections::BTreeSet;

/// Every float parameter of `module` with its name, copied to the host.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, HostTensor)> {
    struct Collect {
        path: Vec<String>,
        out: Vec<(String, HostTensor)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.push((self.path.join("."), to_host(param.val())));
        }
    }
    let mut visitor = Collect {
        path: vec![],
        out: vec![],
    };
    module.visit::<Collect>(&mut visitor);
    visitor.out
}

/// Names and shapes of every float parameter, without materialising lazy ones.
pub fn parameter_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Shapes {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out
                .push((self.path.join("."), param.lazy_shape().to_vec()));
        }
    }
    let mut visitor = Shapes {
        path: vec![],
        out: vec![],
    };
    module.visit::<Shapes>(&mut visitor);
    visitor.out
}

pub fn to_host<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> HostTensor {
    let shape = tensor.dims().to_vec();
    let data = tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor");
    HostTensor::new(shape, data)
}

/// Replaces every float parameter of `module` by the tensor `lookup` gives for its name.
/// `lookup` returns `Ok(None)` to keep a parameter as it is. Shapes are checked; the first
/// error (naming the tensor) is returned.
pub fn load_tensors<B: Backend, M: Module<B>>(
    module: M,
    lookup: impl FnMut(&str) -> Result<Option<HostTensor>>,
) -> Result<M> {
    struct Load<F> {
        path: Vec<String>,
        lookup: F,
        error: Option<anyhow::Error>,
    }
    impl<B: Backend, F: FnMut(&str) -> Result<Option<HostTensor>>> ModuleMapper<B> for Load<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.error.is_some() {
                return param;
            }
            let name = self.path.join(".");
            let host = match (self.lookup)(&name) {
                Ok(Some(host)) => host,
                Ok(None) => return param,
                Err(error) => {
                    self.error = Some(error);
                    return param;
                }
            };
            let expected = param.lazy_shape().to_vec();
            if host.shape != expected {
                self.error = Some(anyhow::anyhow!(
                    "tensor `{name}` has shape {:?}, the model expects {expected:?}",
                    host.shape
                ));
                return param;
            }
            let device = param.lazy_device();
            let tensor = Tensor::from_data(TensorData::new(host.data, host.shape), &device);
            Param::initialized(param.id, tensor.require_grad())
        }
    }
    let mut mapper = Load {
        path: vec![],
        lookup,
        error: None,
    };
    let module = module.map(&mut mapper);
    match mapper.error {
        Some(error) => Err(error),
        None => Ok(module),
    }
}

/// As [`load_from_source`] for the parameters that `wanted` names; the others keep their
/// values (and must not be in `source`: they are returned as unused if they are).
pub fn load_from_source_where<B: Backend, M: Module<B>>(
    module: M,
    source: &WeightSource,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<(M, Vec<String>)> {
    let mut used = BTreeSet::new();
    let module = load_tensors(module, |name| {
        if !wanted(name) {
            return Ok(None);
        }
        if !source.contains(name) {
            bail!("tensor `{name}` is missing");
        }
        used.insert(name.to_string());
        source.get(name).map(Some)
    })
    .with_context(|| format!("loading weights from {}", source.describe()))?;
    let unused = source
        .names()
        .filter(|n| !used.contains(*n))
        .map(str::to_string)
        .collect();
    Ok((module, unused))
}

/// SHA-256 over the name and f32 bytes of each parameter that `include` names, in visiting
/// order, one tensor at a time (no second copy of the model in memory).
pub fn fingerprint_where<B: Backend, M: Module<B>>(
    module: &M,
    include: &dyn Fn(&str) -> bool,
) -> String {
    use sha2::Digest;
    struct Hash<'a> {
        path: Vec<String>,
        include: &'a dyn Fn(&str) -> bool,
        hasher: sha2::Sha256,
    }
    impl<B: Backend> ModuleVisitor<B> for Hash<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let name = self.path.join(".");
            if (self.include)(&name) {
                let tensor = to_host(param.val());
                self.hasher.update(name.as_bytes());
                let bytes: Vec<u8> = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.hasher.update(&bytes);
            }
        }
    }
    let mut visitor = Hash {
        path: vec![],
        include,
        hasher: sha2::Sha256::new(),
    };
    module.visit::<Hash>(&mut visitor);
    checkpoints::run_checkpoints::hex(&visitor.hasher.finalize())
}

/// Loads every parameter of `module` from `source` by name; a missing tensor is an error.
/// Returns the module and the names in `source` it did not use.
pub fn load_from_source<B: Backend, M: Module<B>>(
    module: M,
    source: &WeightSource,
) -> Result<(M, Vec<String>)> {
    load_from_source_where(module, source, &|_| true)
}
