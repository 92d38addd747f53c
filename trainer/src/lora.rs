//! LoRA: low-rank adapters on linear layers chosen by name, merging for export, and the
//! PEFT adapter layout (adapter_config.json + adapter_model.safetensors).

use crate::config::{
    ensure, ensure_count, ensure_fraction, ensure_positive, glob_match, key, Validate,
};
use crate::model::layers::Lora;
use crate::model::llama::CausalLm;
use crate::weights::{load_tensors, named_tensors, to_host};
use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use checkpoints::names::peft_key;
use checkpoints::{atomic, write_safetensors, HostTensor, StoreDtype, WeightSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    /// Other parameters that train beside the adapters and are saved with them, as PEFT's
    /// `modules_to_save`: a module path (`lm_head`) or a pattern with `*` (`*.router.*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
}

impl LoraConfig {
    /// Whether parameter `name` trains under this adapter: an adapter's own parameter, or one
    /// of `modules_to_save`.
    pub fn trains(&self, name: &str) -> bool {
        is_adapter_parameter(name)
            || self
                .modules_to_save
                .iter()
                .any(|module| glob_match(module, name) || glob_match(&format!("{module}.*"), name))
    }
}

impl Validate for LoraConfig {
    fn validate(&self, prefix: &str) -> Result<()> {
        ensure_count(&key(prefix, "rank"), self.rank as u64)?;
        ensure_positive(&key(prefix, "alpha"), self.alpha as f64)?;
        ensure_fraction(&key(prefix, "dropout"), self.dropout as f64)?;
        ensure(
            !self.targets.is_empty(),
            &key(prefix, "targets"),
            "[]",
            "a list of at least one module name",
        )
    }
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
    let tensors = peft_adapter_tensors(named_tensors(model))?;
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        StoreDtype::F32,
        Some([("format".to_string(), "pt".to_string())].into()),
    )?;
    atomic::write_file(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&peft_adapter_config(config, base_model))?.as_bytes(),
    )
}

/// The adapter tensors among a model's `named` tensors, under PEFT's names.
pub fn peft_adapter_tensors(named: Vec<(String, HostTensor)>) -> Result<Vec<(String, HostTensor)>> {
    let tensors: Vec<_> = named
        .into_iter()
        .filter(|(name, _)| is_adapter_parameter(name))
        .map(|(name, tensor)| (peft_key(&name), tensor))
        .collect();
    if tensors.is_empty() {
        bail!("the model carries no LoRA adapter to export");
    }
    Ok(tensors)
}

/// PEFT's `adapter_config.json` for adapters of `config` on the model at `base_model`.
pub fn peft_adapter_config(config: &LoraConfig, base_model: &str) -> Value {
    json!({
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
    })
}

/// The `[lora]` settings of a PEFT adapter folder's `adapter_config.json`. PEFT options that
/// our adapters do not compute (rsLoRA scaling, DoRA, biases, fan-in-fan-out weights, extra
/// saved modules, a regex `target_modules`) are refused by name rather than loaded wrongly.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let config = checkpoints::read_json(&path)?;
    let field = |key: &str| config.get(key).filter(|v| !v.is_null());
    let refuse = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    if field("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(refuse(format!(
            "`peft_type` is {:?}, only LORA adapters can be read",
            config.get("peft_type")
        )));
    }
    for (key, allowed) in [
        ("use_rslora", json!(false)),
        ("use_dora", json!(false)),
        ("fan_in_fan_out", json!(false)),
        ("bias", json!("none")),
    ] {
        if let Some(value) = field(key).filter(|v| **v != allowed) {
            return Err(refuse(format!(
                "`{key}` = {value} is not supported (only {allowed})"
            )));
        }
    }
    for key in [
        "modules_to_save",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
    ] {
        let empty = |v: &Value| v.as_object().is_some_and(|o| o.is_empty());
        if let Some(value) = field(key).filter(|v| !empty(v)) {
            return Err(refuse(format!("`{key}` = {value} is not supported")));
        }
    }
    let rank = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| refuse("`r` missing or not a positive integer".into()))?;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| refuse("`lora_alpha` missing or not a number".into()))?;
    let targets = match field("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| refuse("`target_modules` holds a non-string".into()))?,
        other => {
            return Err(refuse(format!(
                "`target_modules` must be a list of module names (got {other:?})"
            )))
        }
    };
    Ok(LoraConfig {
        rank: rank as usize,
        alpha: alpha as f32,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        targets,
        // PEFT's saved modules arrive as whole tensors in adapter_model.safetensors (below).
        modules_to_save: Vec::new(),
    })
}

/// Attaches the adapter of a PEFT folder to `model`: every adapter tensor our targets expect
/// must be in `adapter_model.safetensors` with its shape, and every tensor there must be used
/// (saved base layers, as PEFT writes for `lm_head`, replace the model's weight).
pub fn load_peft_adapter<B: Backend>(
    model: CausalLm<B>,
    dir: &Path,
) -> Result<(CausalLm<B>, LoraConfig)> {
    let config = read_peft_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let source = WeightSource::open(std::slice::from_ref(&file))?;
    let mut used = BTreeSet::new();
    let model = attach(model, &config, 0)?;
    let model = load_tensors(model, |name| {
        let key = if is_adapter_parameter(name) {
            peft_key(name)
        } else {
            // PEFT saves the base weight of a targeted embedding-like layer (`lm_head`) too,
            // as `...lm_head.base_layer.weight`; it replaces ours, as PEFT loads it.
            let Some(layer) = name.strip_suffix(".weight") else {
                return Ok(None);
            };
            let key = format!("base_model.model.{layer}.base_layer.weight");
            if !source.contains(&key) {
                return Ok(None);
            }
            key
        };
        if !source.contains(&key) {
            bail!("tensor `{key}` is missing");
        }
        used.insert(key.clone());
        source.get(&key).map(Some)
    })
    .with_context(|| format!("loading the adapter {}", file.display()))?;
    let unused: Vec<&str> = source.names().filter(|n| !used.contains(*n)).collect();
    if !unused.is_empty() {
        bail!(
            "{} holds tensors that no targeted layer of the model takes: {}",
            file.display(),
            unused.join(", ")
        );
    }
    Ok((model, config))
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

/// Where a LoRA checkpoint's frozen weights are: a model folder, or `RUN/base`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrozenBase {
    /// The folder the run loaded its model from; `None`: `RUN/base` of the run folder.
    pub folder: Option<PathBuf>,
    /// [`crate::weights::fingerprint_where`] of every non-adapter weight.
    pub sha256: String,
}

impl FrozenBase {
    pub const RUN_FOLDER: &'static str = "base";

    /// The base folder, given the run folder.
    pub fn folder(&self, run_dir: &Path) -> PathBuf {
        match &self.folder {
            Some(folder) => folder.clone(),
            None => run_dir.join(Self::RUN_FOLDER),
        }
    }

    pub fn describe(&self) -> String {
        match &self.folder {
            Some(folder) => format!("trained on {}", folder.display()),
            None => format!("trained on the run's own {}/", Self::RUN_FOLDER),
        }
    }
}
