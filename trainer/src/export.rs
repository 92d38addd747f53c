//! Turning a training checkpoint into a Hugging Face folder (LoRA merged), plus the PEFT
//! adapter when the run used LoRA.

use crate::lora::{self, FrozenBase, LoraConfig};
use crate::model::init::ParamInit;
use crate::model::llama::{CausalLm, LlamaConfig};
use crate::weights;
use crate::Cpu;
use anyhow::{bail, Context, Result};
use checkpoints::hf_folder::HfFolder;
use checkpoints::run_checkpoints::open_checkpoint;
use checkpoints::StoreDtype;
use std::path::Path;

/// The run folder's copy of the tokenizer files.
pub const RUN_TOKENIZER_DIR: &str = "tokenizer";

/// Loads the model of a checkpoint (adapters still separate) on the CPU. A LoRA checkpoint
/// holds its adapters only: the frozen weights come from the base it names, checked against
/// the fingerprint recorded at training.
pub fn load_checkpoint_model(checkpoint_dir: &Path) -> Result<(CausalLm<Cpu>, Option<LoraConfig>)> {
    let checkpoint = open_checkpoint(checkpoint_dir)?;
    let state = checkpoint.state()?;
    let source = format!("{}/state.json", checkpoint_dir.display());
    let config = LlamaConfig::from_json(&state["model_config"], &source)?;
    let lora: Option<LoraConfig> = serde_json::from_value(state["lora"].clone())
        .with_context(|| format!("{source}: bad `lora`"))?;
    let device = Default::default();
    let mut model = CausalLm::<Cpu>::new(&config, &mut ParamInit::Lazy, &device);
    if let Some(lora_config) = &lora {
        model = lora::attach(model, lora_config, 0)?;
    }
    let tensors = checkpoint.tensors("model")?;
    let trained_with_lora = lora
        .clone()
        .filter(|_| state["model_tensors"] == "adapters");
    let (model, unused) = if let Some(lora) = trained_with_lora {
        let base: FrozenBase = serde_json::from_value(state["base"].clone())
            .with_context(|| format!("{source}: bad `base`"))?;
        let run_dir = checkpoint_dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let base_dir = base.folder(run_dir);
        let base_weights = HfFolder::new(&base_dir)
            .and_then(|folder| folder.weights())
            .with_context(|| {
                format!(
                    "{} names its base model {}",
                    checkpoint_dir.display(),
                    base_dir.display()
                )
            })?;
        let frozen = |name: &str| !lora.trains(name);
        let (model, _) = weights::load_from_source_where(model, &base_weights, &frozen)?;
        if weights::fingerprint_where(&model, &frozen) != base.sha256 {
            bail!(
                "{}: the base model {} has changed since the adapters were trained on it",
                checkpoint_dir.display(),
                base_dir.display()
            );
        }
        weights::load_from_source_where(model, &tensors, &|name| lora.trains(name))?
    } else {
        weights::load_from_source(model, &tensors)?
    };
    if !unused.is_empty() {
        bail!(
            "{} holds tensors the model lacks: {}",
            checkpoint_dir.display(),
            unused.join(", ")
        );
    }
    Ok((model, lora))
}

/// Writes `out` as a Hugging Face folder; with LoRA also `out/adapter` in the PEFT layout.
/// The tokenizer comes from the run folder (two levels above the checkpoint).
pub fn export_checkpoint(checkpoint_dir: &Path, out: &Path, dtype: StoreDtype) -> Result<()> {
    let (model, lora) = load_checkpoint_model(checkpoint_dir)?;
    let tokenizer_dir = checkpoint_dir
        .parent()
        .and_then(Path::parent)
        .map(|run| run.join(RUN_TOKENIZER_DIR))
        .filter(|dir| dir.exists());
    // The adapter's base is the folder the run started from (or the run's own copy of it).
    let state = open_checkpoint(checkpoint_dir)?.state()?;
    let run_dir = checkpoint_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let base_name = match serde_json::from_value::<FrozenBase>(state["base"].clone()) {
        Ok(base) => {
            let folder = base.folder(run_dir);
            folder
                .canonicalize()
                .unwrap_or(folder)
                .display()
                .to_string()
        }
        Err(_) => state["base_model"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| out.display().to_string()),
    };
    write_export(
        model,
        lora.as_ref(),
        out,
        dtype,
        tokenizer_dir.as_deref(),
        &base_name,
    )
}

/// Merges a PEFT adapter folder into the base model `base_dir` and writes the result to
/// `out`, with the adapter as we write it in `out/adapter` (naming `base_dir` as its base).
pub fn export_peft_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    dtype: StoreDtype,
) -> Result<()> {
    let base = CausalLm::<Cpu>::load(base_dir, &Default::default())?;
    let (model, lora) = lora::load_peft_adapter(base, adapter_dir)?;
    let base_name = base_dir.display().to_string();
    write_export(model, Some(&lora), out, dtype, Some(base_dir), &base_name)
}

/// The merged model at `out` and, with LoRA, the adapter in the PEFT layout at `out/adapter`.
fn write_export(
    model: CausalLm<Cpu>,
    lora: Option<&LoraConfig>,
    out: &Path,
    dtype: StoreDtype,
    tokenizer_dir: Option<&Path>,
    base_model_name: &str,
) -> Result<()> {
    if let Some(lora_config) = lora {
        lora::save_peft_adapter(&model, lora_config, &out.join("adapter"), base_model_name)?;
    }
    lora::merge(model).save(out, dtype, tokenizer_dir)
}
