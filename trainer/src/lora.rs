//! LoRA: low-rank adapters on linear layers chosen by name, merging for export, and the
//! PEFT adapter layout (adapter_config.json + adapter_model.safetensors).

use crate::model::layers::Lora;
use crate::model::llama::CausalLm;
use crate::weights::{named_tensors, to_host};
use anyhow::{bail, Result};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use checkpoints::names::peft_key;
use checkpoints::{atomic, write_safetensors, StoreDtype};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    #[serde(default)]
    pub dropout: f32,
    /// Module names the adapters go on, matched against the end of each linear's path
    /// (`q_proj` matches `model.layers.3.self_attn.q_proj`), as PEFT's `target_modules`.
    pub targets: Vec<String>,
}

/// Whether a parameter belongs to a LoRA adapter.
pub fn is_adapter_parameter(name: &str) -> bool {
    name.contains(".lora.")
}

/// Adds a fresh adapter to every targeted linear: A uniform in ±1/sqrt(in) (PEFT's
/// Kaiming-uniform bound), B zero, so the model's output is unchanged until training.
pub fn attach<B: Backend>(
    mut model: CausalLm<B>,
    config: &LoraConfig,
    seed: u64,
) -> Result<CausalLm<B>> {
    if config.rank == 0 {
        bail!("lora.rank must be at least 1");
    }
    let device = model.device();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut attached = 0;
    for (name, linear) in model.linears_mut() {
        if !config
            .targets
            .iter()
            .any(|t| name.ends_with(&format!(".{t}")) || name == *t)
        {
            continue;
        }
        let (d_in, d_out) = (linear.d_in(), linear.d_out());
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..config.rank * d_in)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        linear.lora = Some(Lora {
            lora_a: Param::from_data(TensorData::new(a, [config.rank, d_in]), &device),
            lora_b: Param::from_tensor(Tensor::zeros([d_out, config.rank], &device)),
            scale: config.alpha / config.rank as f32,
            dropout: config.dropout,
        });
        attached += 1;
    }
    if attached == 0 {
        bail!(
            "lora.targets {:?} match no linear layer of the model",
            config.targets
        );
    }
    Ok(model)
}

/// Folds every adapter into its base weight: `W + scale * B @ A`.
pub fn merge<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (_, linear) in model.linears_mut() {
        if let Some(lora) = linear.lora.take() {
            let delta = lora
                .lora_b
                .val()
                .matmul(lora.lora_a.val())
                .mul_scalar(lora.scale);
            let weight = linear.weight.val().detach() + delta.detach();
            linear.weight = Param::initialized(linear.weight.id, weight);
        }
    }
    model
}

/// Writes the adapters in the PEFT layout so `peft.PeftModel.from_pretrained` loads them.
pub fn save_peft_adapter<B: Backend>(
    model: &CausalLm<B>,
    config: &LoraConfig,
    dir: &Path,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tensors: Vec<_> = named_tensors(model)
        .into_iter()
        .filter(|(name, _)| is_adapter_parameter(name))
        .map(|(name, tensor)| (peft_key(&name), tensor))
        .collect();
    if tensors.is_empty() {
        bail!("the model carries no LoRA adapter to export");
    }
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        StoreDtype::F32,
        Some([("format".to_string(), "pt".to_string())].into()),
    )?;
    let adapter_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    atomic::write_file(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&adapter_config)?.as_bytes(),
    )
}

/// Host copy of one linear's adapter matrices, for tests.
pub fn adapter_of<B: Backend>(
    model: &mut CausalLm<B>,
    path: &str,
) -> Option<(checkpoints::HostTensor, checkpoints::HostTensor)> {
    model
        .linears_mut()
        .into_iter()
        .find(|(name, _)| name == path)
        .and_then(|(_, linear)| {
            linear
                .lora
                .as_ref()
                .map(|l| (to_host(l.lora_a.val()), to_host(l.lora_b.val())))
        })
}
