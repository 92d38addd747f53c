//! Config sections and set-up steps that every recipe shares.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::{TextTokenizer, TokenBatch, TokenRow};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use trainer::config::{ensure, ensure_count, ensure_positive, key, Validate};
use trainer::export::RUN_TOKENIZER_DIR;
use trainer::model::init::ParamInit;
use trainer::model::layers::Precision;
use trainer::train::{MicroBatch, ModuleObjective, Next, Resume, TrainConfig, Trainable, Trainer};
use trainer::{CausalLm, LlamaConfig};

fn default_device() -> String {
    "cpu".into()
}

/// `[run]`: where the run lives, its seed, and the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// cpu, cuda or cuda:N; several separated by commas (`cpu,cpu`) run data-parallel, one
    /// peer each, as `--devices` does (which overrides this).
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32` or `bf16`: what the linear layers multiply in (weights, optimizer state and
    /// the loss stay f32 either way).
    #[serde(default)]
    pub precision: Precision,
}

impl RunSection {
    /// A Hugging Face folder (an export of an earlier stage) as this run computes it.
    pub fn load_model<B: Backend>(&self, dir: &Path, device: &B::Device) -> Result<CausalLm<B>> {
        Ok(CausalLm::load(dir, device)?.with_precision(self.precision))
    }
}

/// `[model]`: a Hugging Face folder (`path`), or a fresh model (`scratch`) with the
/// tokenizer of the folder `tokenizer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub scratch: Option<ScratchModel>,
}

/// The shape of a model trained from scratch (vocabulary size comes from the tokenizer).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchModel {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_init_std")]
    pub init_std: f32,
}

fn default_init_std() -> f32 {
    0.02
}

impl ModelSection {
    /// The folder of the tokenizer: `tokenizer`, else the model folder's own.
    pub fn tokenizer_folder(&self) -> Result<PathBuf> {
        match (&self.tokenizer, &self.path) {
            (Some(dir), _) | (None, Some(dir)) => Ok(dir.clone()),
            _ => bail!("[model] needs a tokenizer folder (`tokenizer`, or a model `path`)"),
        }
    }

    /// The Hugging Face folder the model is loaded from, as an absolute path (what exported
    /// adapters name as their base); `None` for a model made from scratch.
    pub fn base_folder(&self) -> Option<PathBuf> {
        self.path
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    }
}

impl Validate for ModelSection {
    fn validate(&self, prefix: &str) -> Result<()> {
        let Some(shape) = &self.scratch else {
            return Ok(());
        };
        let k = |field: &str| key(&key(prefix, "scratch"), field);
        for (field, value) in [
            ("hidden_size", shape.hidden_size),
            ("num_hidden_layers", shape.num_hidden_layers),
            ("num_attention_heads", shape.num_attention_heads),
            ("num_key_value_heads", shape.num_key_value_heads),
            ("intermediate_size", shape.intermediate_size),
        ] {
            ensure_count(&k(field), value as u64)?;
        }
        ensure(
            shape.hidden_size.is_multiple_of(shape.num_attention_heads),
            &k("hidden_size"),
            shape.hidden_size,
            "a multiple of num_attention_heads",
        )?;
        ensure(
            shape
                .num_attention_heads
                .is_multiple_of(shape.num_key_value_heads),
            &k("num_key_value_heads"),
            shape.num_key_value_heads,
            "a divisor of num_attention_heads",
        )?;
        ensure_positive(&k("init_std"), shape.init_std as f64)
    }
}

/// A model, its tokenizer, and the folder the tokenizer files came from.
pub struct LoadedModel<B: Backend> {
    pub model: CausalLm<B>,
    pub tokenizer: TextTokenizer,
    pub tokenizer_dir: PathBuf,
}

impl ModelSection {
    /// The model of this section (seeded by `run.seed`, computing in `run.precision`).
    pub fn load<B: Backend>(&self, run: &RunSection, device: &B::Device) -> Result<LoadedModel<B>> {
        match (&self.path, &self.scratch) {
            (Some(path), None) => {
                let tokenizer_dir = self.tokenizer.clone().unwrap_or_else(|| path.clone());
                Ok(LoadedModel {
                    model: run.load_model(path, device)?,
                    tokenizer: TextTokenizer::from_folder(&tokenizer_dir)?,
                    tokenizer_dir,
                })
            }
            (None, Some(shape)) => {
                let Some(tokenizer_dir) = self.tokenizer.clone() else {
                    bail!("model.scratch needs model.tokenizer (a folder with tokenizer.json)");
                };
                let tokenizer = TextTokenizer::from_folder(&tokenizer_dir)?;
                let mut config = LlamaConfig::tiny(
                    tokenizer.vocab_size(),
                    shape.hidden_size,
                    shape.num_hidden_layers,
                    shape.num_attention_heads,
                    shape.num_key_value_heads,
                );
                config.intermediate_size = shape.intermediate_size;
                config.eos_token_ids = tokenizer.stop_ids();
                let model = CausalLm::new(
                    &config,
                    &mut ParamInit::normal(run.seed, shape.init_std),
                    device,
                )
                .with_precision(run.precision);
                Ok(LoadedModel {
                    model,
                    tokenizer,
                    tokenizer_dir,
                })
            }
            _ => bail!("[model] needs exactly one of `path` (a Hugging Face folder) or `scratch`"),
        }
    }
}

/// Creates the run folder, writes the resolved config and a copy of the model folder's side
/// files (tokenizer, chat template, generation defaults), which every export carries along
/// (the leading peer only).
pub fn prepare_run_dir(run_dir: &Path, resolved: &toml::Table, tokenizer_dir: &Path) -> Result<()> {
    // In a data-parallel run the leading peer writes the run folder; the others only read.
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    trainer::run_dir::write_config(run_dir, &trainer::config::to_toml(resolved))?;
    let copy = run_dir.join(RUN_TOKENIZER_DIR);
    std::fs::create_dir_all(&copy)?;
    for file in checkpoints::hf_folder::SIDE_FILES {
        let from = tokenizer_dir.join(file);
        if from.exists() {
            std::fs::copy(&from, copy.join(file))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

/// Groups rows into padded batches of `batch_size`, in order (for evaluation).
pub fn batches_in_order(rows: &[TokenRow], batch_size: usize, pad_id: u32) -> Vec<TokenBatch> {
    rows.chunks(batch_size.max(1))
        .map(|chunk| TokenBatch::from_rows(&chunk.iter().collect::<Vec<_>>(), pad_id))
        .collect()
}

/// The data cursor saved under `key` in a checkpoint's recipe state, or a fresh one.
pub fn resume_sampler(
    saved: &Option<serde_json::Value>,
    key: &str,
    len: usize,
    seed: u64,
) -> Result<datasets::EpochSampler> {
    Ok(match saved {
        Some(state) => datasets::EpochSampler::resume(
            len,
            seed,
            serde_json::from_value(state[key].clone())
                .with_context(|| format!("checkpoint state: bad `{key}`"))?,
        ),
        None => datasets::EpochSampler::new(len, seed),
    })
}

/// The sampler over the `rows` of an SFT-style loop, resumed from `saved`'s `sampler`; with
/// `train.group_by_length`, each micro-batch (of all peers) draws rows of similar length.
pub fn row_sampler<B: AutodiffBackend>(
    saved: &Option<serde_json::Value>,
    rows: &[TokenRow],
    trainer: &Trainer<B>,
    seed: u64,
) -> Result<datasets::EpochSampler> {
    let sampler = resume_sampler(saved, "sampler", rows.len(), seed)?;
    Ok(if trainer.config.group_by_length {
        let lengths = rows.iter().map(TokenRow::len).collect();
        sampler.grouped_by_length(lengths, trainer.config.batch_size * trainer.peer.world())
    } else {
        sampler
    })
}

/// Saves a run's result table as `RUN/summary.md` and its numbers as `RUN/summary.json`.
pub fn write_summary(run_dir: &Path, table: &str, numbers: &serde_json::Value) -> Result<()> {
    checkpoints::atomic::write_file(&run_dir.join("summary.md"), table.as_bytes())?;
    checkpoints::atomic::write_file(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(numbers)?.as_bytes(),
    )
}

/// Loads `folder/model.safetensors` (a whole model a recipe exported) into `fresh`, a model of
/// the same shape; a tensor the model does not use is an error.
pub fn load_exported<B: Backend, M: burn::module::Module<B>>(fresh: M, folder: &Path) -> Result<M> {
    let path = folder.join("model.safetensors");
    let source = checkpoints::WeightSource::open(std::slice::from_ref(&path))
        .with_context(|| format!("cannot open {}", path.display()))?;
    let (model, unused) = trainer::weights::load_from_source(fresh, &source)?;
    if !unused.is_empty() {
        bail!(
            "{} holds tensors this model does not use: {}",
            path.display(),
            unused.join(", ")
        );
    }
    Ok(model)
}

/// Exports a model built around a language model to `out/`: the whole model
/// (`model.safetensors` and `config.json` = `config`) and the language model alone as a
/// Hugging Face folder (`language_model/`, with the tokenizer).
pub fn export_with_language_model<B: Backend, M: burn::module::Module<B>>(
    model: &M,
    config: &serde_json::Value,
    language_model: &CausalLm<B>,
    out: &Path,
    tokenizer_dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    checkpoints::write_safetensors(
        &out.join("model.safetensors"),
        &trainer::weights::named_tensors(model),
        checkpoints::StoreDtype::F32,
        None,
    )?;
    checkpoints::atomic::write_file(
        &out.join("config.json"),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )?;
    language_model.save(
        &out.join("language_model"),
        checkpoints::StoreDtype::F32,
        Some(tokenizer_dir),
    )
}

/// One of the models a recipe trains from the same initialisation and data (hidrop's variants,
/// tays's modes), each in its own resumable folder: how its batches are made, its loss, its
/// dev accuracy and its export.
pub struct VariantTraining<'a, B: AutodiffBackend, M: Trainable<B>, Batch> {
    /// `RUN/<name>`.
    pub dir: PathBuf,
    pub name: String,
    /// Printed when training starts.
    pub describe: String,
    pub train: &'a TrainConfig,
    pub seed: u64,
    pub num_examples: usize,
    /// The micro-batch of training examples `indices`, the `index`-th of step `step`.
    pub batch: &'a dyn Fn(&[usize], u64, usize) -> Batch,
    pub loss: &'a ModuleObjective<'a, B, M, Batch>,
    pub dev_accuracy: &'a dyn Fn(&M::InnerModule) -> f64,
    pub export: &'a dyn Fn(&M::InnerModule, &Path) -> Result<()>,
}

/// Trains one model in `dir` (resumable) and exports it to `dir/final`, or loads that export
/// when it exists (`load`). `None` when a signal stopped training.
pub fn train_variant<B: AutodiffBackend, M: Trainable<B>, Batch: MicroBatch>(
    variant: &VariantTraining<'_, B, M, Batch>,
    fresh: impl FnOnce() -> Result<M>,
    load: impl FnOnce(&Path) -> Result<M::InnerModule>,
    resolved: &toml::Table,
    tokenizer_dir: &Path,
) -> Result<Option<M::InnerModule>> {
    let exported = variant.dir.join("final");
    if exported.join("model.safetensors").exists() {
        trainer::leader_println!(
            "{}: reusing {} (delete it to train again)",
            variant.name,
            exported.display()
        );
        return load(&exported).map(Some);
    }
    prepare_run_dir(&variant.dir, resolved, tokenizer_dir)?;
    trainer::leader_println!("{}: {}", variant.name, variant.describe);
    let (mut trainer, saved) = Trainer::start(
        fresh()?,
        variant.train.clone(),
        None,
        variant.seed,
        &variant.dir,
        &Resume::Auto,
    )?;
    let mut sampler = resume_sampler(&saved, "sampler", variant.num_examples, variant.seed)?;
    while !trainer.is_done() {
        let step = trainer.step;
        let batches: Vec<Batch> = trainer
            .next_micro_batch_indices(&mut sampler)?
            .iter()
            .enumerate()
            .map(|(i, indices)| (variant.batch)(indices, step, i))
            .collect();
        let stats = trainer.train_step_on(&batches, variant.loss)?;
        let mut scalars = stats.scalars();
        if trainer.should_evaluate() {
            scalars.push((
                "dev_accuracy",
                (variant.dev_accuracy)(&trainer.eval_model()),
            ));
        }
        trainer.log(&scalars)?;
        if trainer.end_of_step(|| serde_json::json!({ "sampler": sampler.state }))? == Next::Stop {
            return Ok(None);
        }
    }
    trainer.finish();
    let model = trainer.eval_model();
    if trainer::distributed::current_peer().is_leader() {
        (variant.export)(&model, &exported)?;
    }
    Ok(Some(model))
}
