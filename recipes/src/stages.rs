//! Stages of multi-stage recipes (on-policy SFT's warm-up, SkipGPT's pre-training, router and
//! LoRA stages): each stage trains in its own folder under the run folder, resumes like any
//! run, exports `STAGE/final`, and is reused once that export exists.

use crate::common::{prepare_run_dir, row_sampler};
use crate::sft::train_on_rows;
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use datasets::{TokenBatch, TokenRow};
use std::path::{Path, PathBuf};
use trainer::leader_println;
use trainer::lora::LoraConfig;
use trainer::train::{Next, Resume, TrainConfig, Trainer};
use trainer::CausalLm;

/// What every stage of a multi-stage recipe shares.
pub struct StageContext<'a> {
    /// The resolved config, copied into each stage's folder.
    pub resolved: &'a toml::Table,
    pub tokenizer_dir: &'a Path,
    pub seed: u64,
    pub pad_id: u32,
}

/// One plain-SFT stage of a recipe (on-policy SFT's warm-up, SkipGPT's pre-training and LoRA
/// stage).
pub struct SftStage<'a> {
    pub name: &'a str,
    /// The stage's run folder; the result is exported to `dir/final`.
    pub dir: PathBuf,
    pub train: &'a TrainConfig,
    pub lora: Option<LoraConfig>,
    pub rows: &'a [TokenRow],
    pub eval_batches: &'a [TokenBatch],
}

/// The export `dir/final` of a stage that already finished, said aloud, or `None`.
pub fn finished_stage(name: &str, dir: &Path) -> Option<PathBuf> {
    let exported = dir.join("final");
    exported.join("config.json").exists().then(|| {
        leader_println!(
            "{name}: reusing {} (delete it to train this stage again)",
            exported.display()
        );
        exported
    })
}

/// Runs an SFT stage in its own folder, resumable like any run, and exports it to
/// `dir/final`; skipped when that export exists. `None` when a signal stopped it.
pub fn train_stage<B: AutodiffBackend>(
    model: CausalLm<B>,
    stage: &SftStage<'_>,
    context: &StageContext<'_>,
) -> Result<Option<PathBuf>> {
    if let Some(exported) = finished_stage(stage.name, &stage.dir) {
        return Ok(Some(exported));
    }
    let exported = stage.dir.join("final");
    prepare_run_dir(&stage.dir, context.resolved, context.tokenizer_dir)?;
    leader_println!(
        "{}: {} rows, {} steps",
        stage.name,
        stage.rows.len(),
        stage.train.steps
    );
    let (mut trainer, saved) = Trainer::start(
        model,
        stage.train.clone(),
        stage.lora.clone(),
        context.seed,
        &stage.dir,
        &Resume::Auto,
    )?;
    let mut sampler = row_sampler(&saved, stage.rows, &trainer, context.seed)?;
    let next = train_on_rows(
        &mut trainer,
        stage.rows,
        stage.eval_batches,
        &mut sampler,
        context.pad_id,
    )?;
    if next == Next::Stop {
        return Ok(None);
    }
    trainer.finish();
    trainer.export_latest(&exported)?;
    Ok(Some(exported))
}
