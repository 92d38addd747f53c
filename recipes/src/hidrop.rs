//! HiDrop (EIT-NLP, ICLR 2026, arXiv 2602.23699): train a vision-language model while most
//! layers see few or no visual tokens.
//!
//! 1. Visual tokens (ViT patches through the projector) are left out of the first layers;
//!    text keeps the positions it has in the full sequence (persistent positions).
//! 2. Late injection: before `late_entry_layer` the visual tokens enter at their places.
//! 3. Concave pyramid pruning: after each layer of `prune_after`, the visual tokens are scored
//!    by the attention the next layer's query of the last prompt token pays them (averaged over
//!    heads, on detached states) and the rank-sigmoid top-k keeps `keep[i]`; survivors keep
//!    their positions and order, scaled by their soft mask.
//! 4. Early exit: before `early_exit_layer` every visual token leaves.
//!
//! The sequence really shortens, so compute falls. Trained beside it from the same
//! initialisation and data: the full-token baseline, and two controls on HiDrop's schedule
//! (the same budget chosen at random; hard top-k without the soft mask). The table compares
//! held-out accuracy (95% intervals), the share of visual tokens kept over layers, and the
//! training-step and prefill times measured in the same run, interleaved. The EmbedLens probe
//! ([`crate::embedlens`]) then runs on the full-token model.

use crate::common::{
    export_with_language_model, load_exported, prepare_run_dir, train_variant, write_summary,
    ModelSection, RunSection, VariantTraining,
};
use crate::embedlens::{self, ProbeSection};
use crate::evaluate::{median, Accuracy};
use crate::vision_lm::{
    correctness, tokenize, Prepared, Selection, VisionLanguageModel, VisualSchedule, VqaBatch,
    VqaExample,
};
use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::shapes::{load_vqa_jsonl, ShapesTask, VqaRecord};
use datasets::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::config::{ensure, ensure_count, Validate};
use trainer::leader_println;
use trainer::model::init::ParamInit;
use trainer::model::vision::VisionConfig;
use trainer::train::{MicroBatchShare, Resume, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HidropConfig {
    pub run: RunSection,
    /// The language model (`scratch` with a tokenizer, or a Hugging Face folder).
    pub model: ModelSection,
    pub vision: VisionConfig,
    pub data: VqaData,
    pub hidrop: HidropSection,
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalSection,
    /// Which models to train and compare (default: all four).
    #[serde(default = "Variant::all")]
    pub variants: Vec<Variant>,
    #[serde(default)]
    pub probe: ProbeSection,
}

/// Questions: the built-in shapes task, or JSONL files of the user's (all three splits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaData {
    #[serde(default)]
    pub task: ShapesTask,
    #[serde(default)]
    pub train_count: usize,
    #[serde(default)]
    pub dev_count: usize,
    #[serde(default)]
    pub test_count: usize,
    pub train: Option<PathBuf>,
    pub dev: Option<PathBuf>,
    pub test: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}
fn default_temperature() -> f64 {
    0.1
}

/// The schedule of visual tokens over layers (see the module comment).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HidropSection {
    pub late_entry_layer: usize,
    pub prune_after: Vec<usize>,
    pub keep: Vec<usize>,
    pub early_exit_layer: usize,
    /// The rank-sigmoid's sharpness (the paper's 1).
    #[serde(default = "one")]
    pub lambda: f64,
    /// Of the smooth rank the gradient comes from, over standardised scores.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
}

fn default_eval_batch() -> usize {
    32
}
fn default_timing_rounds() -> usize {
    7
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Interleaved timing rounds (one training step and one prefill of each model per round);
    /// the table reports medians.
    #[serde(default = "default_timing_rounds")]
    pub timing_rounds: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            batch_size: default_eval_batch(),
            timing_rounds: default_timing_rounds(),
        }
    }
}

/// The models the recipe trains and compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Every visual token in every layer.
    Full,
    /// HiDrop's schedule, chosen by attention through the rank-sigmoid top-k.
    Hidrop,
    /// HiDrop's schedule, the same number of tokens chosen at random.
    RandomKeep,
    /// HiDrop's schedule, hard top-k by attention (no soft mask).
    HardTopK,
}

impl Variant {
    fn all() -> Vec<Self> {
        vec![Self::Full, Self::Hidrop, Self::RandomKeep, Self::HardTopK]
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Hidrop => "hidrop",
            Self::RandomKeep => "random-keep",
            Self::HardTopK => "hard-top-k",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Full => "full tokens (baseline)",
            Self::Hidrop => "HiDrop",
            Self::RandomKeep => "control: random keep, same budget",
            Self::HardTopK => "control: hard top-k, no soft mask",
        }
    }

    pub fn schedule(self, h: &HidropSection) -> VisualSchedule {
        let selection = match self {
            Self::Full => return VisualSchedule::full(),
            Self::Hidrop => Selection::Differentiable {
                lambda: h.lambda,
                temperature: h.temperature,
            },
            Self::RandomKeep => Selection::Random,
            Self::HardTopK => Selection::Hard,
        };
        VisualSchedule {
            entry_layer: h.late_entry_layer,
            prune: h
                .prune_after
                .iter()
                .copied()
                .zip(h.keep.iter().copied())
                .collect(),
            exit_layer: Some(h.early_exit_layer),
            selection,
        }
    }
}

impl Validate for HidropConfig {
    fn validate(&self, _prefix: &str) -> Result<()> {
        self.model.validate("model")?;
        self.vision.validate("vision")?;
        let layers = self
            .model
            .scratch
            .as_ref()
            .map(|s| s.num_hidden_layers)
            .unwrap_or(usize::MAX);
        let h = &self.hidrop;
        ensure(
            h.prune_after.len() == h.keep.len(),
            "hidrop.keep",
            format!("{:?}", h.keep),
            "one count per layer of hidrop.prune_after",
        )?;
        ensure(
            h.prune_after.windows(2).all(|w| w[0] < w[1])
                && h.prune_after
                    .first()
                    .is_none_or(|&l| l >= h.late_entry_layer)
                && h.prune_after.last().is_none_or(|&l| l < h.early_exit_layer),
            "hidrop.prune_after",
            format!("{:?}", h.prune_after),
            "increasing layers from late_entry_layer to before early_exit_layer",
        )?;
        ensure(
            h.keep.windows(2).all(|w| w[0] >= w[1]) && h.keep.iter().all(|&k| k >= 1),
            "hidrop.keep",
            format!("{:?}", h.keep),
            "non-increasing counts of at least 1",
        )?;
        ensure(
            h.late_entry_layer < h.early_exit_layer && h.early_exit_layer <= layers,
            "hidrop.early_exit_layer",
            h.early_exit_layer,
            "after late_entry_layer and at most the number of layers",
        )?;
        ensure(
            self.data.task.image_size == self.vision.image_size,
            "data.task.image_size",
            self.data.task.image_size,
            "equal to vision.image_size",
        )?;
        self.data.task.validate()?;
        let files = [&self.data.train, &self.data.dev, &self.data.test];
        let given = files.iter().filter(|f| f.is_some()).count();
        ensure(
            given == 0 || given == 3,
            "data",
            format!("{given} of train/dev/test"),
            "all three JSONL files or none (the built-in task)",
        )?;
        if given == 0 {
            for (field, count) in [
                ("data.train_count", self.data.train_count),
                ("data.dev_count", self.data.dev_count),
                ("data.test_count", self.data.test_count),
            ] {
                ensure_count(field, count as u64)?;
            }
        }
        ensure(
            !self.variants.is_empty(),
            "variants",
            "[]",
            "at least one model",
        )?;
        ensure_count("eval.batch_size", self.eval.batch_size as u64)?;
        self.probe.validate("probe")
    }
}

/// The three splits of questions. The built-in task's dev and test sets leave out every
/// question of the training set (and test every one of dev).
pub struct Splits {
    pub train: Vec<VqaRecord>,
    pub dev: Vec<VqaRecord>,
    pub test: Vec<VqaRecord>,
    pub source: String,
}

pub fn load_splits(data: &VqaData, image_size: usize, seed: u64) -> Result<Splits> {
    if let (Some(train), Some(dev), Some(test)) = (&data.train, &data.dev, &data.test) {
        return Ok(Splits {
            train: load_vqa_jsonl(train, image_size)?,
            dev: load_vqa_jsonl(dev, image_size)?,
            test: load_vqa_jsonl(test, image_size)?,
            source: format!("{}", train.display()),
        });
    }
    let task = &data.task;
    let train = task.records(seed, data.train_count, &HashSet::new())?;
    let mut seen: HashSet<String> = train.iter().map(|r| r.key.clone()).collect();
    let dev = task.records(seed ^ 0xDE5, data.dev_count, &seen)?;
    seen.extend(dev.iter().map(|r| r.key.clone()));
    let test = task.records(seed ^ 0x7E57, data.test_count, &seen)?;
    Ok(Splits {
        train,
        dev,
        test,
        source: format!(
            "built-in shapes task ({}x{} images, {}x{} grid, up to {} shapes)",
            task.image_size, task.image_size, task.grid, task.grid, task.max_objects
        ),
    })
}

pub fn prepare(config: &HidropConfig, tokenizer_dir: PathBuf) -> Result<Prepared> {
    let tokenizer = TextTokenizer::from_folder(&tokenizer_dir)?;
    let eos = *tokenizer
        .stop_ids()
        .first()
        .context("the tokenizer names no end-of-text token")?;
    let splits = load_splits(&config.data, config.vision.image_size, config.run.seed)?;
    Ok(Prepared {
        train: tokenize(&splits.train, &tokenizer, eos, "training")?,
        dev: tokenize(&splits.dev, &tokenizer, eos, "dev")?,
        test: tokenize(&splits.test, &tokenizer, eos, "test")?,
        pad_id: tokenizer.pad_id(),
        tokenizer,
        tokenizer_dir,
        source: splits.source,
    })
}

/// A fresh model of the config's shape (the same weights for every variant: same seed).
fn fresh_model<B: Backend>(
    config: &HidropConfig,
    device: &B::Device,
) -> Result<VisionLanguageModel<B>> {
    let loaded = config.model.load::<B>(&config.run, device)?;
    Ok(VisionLanguageModel::new(
        &config.vision,
        loaded.model,
        &mut ParamInit::normal(config.run.seed ^ 0x0071_510A, 0.02),
        device,
    ))
}

/// Loads a trained model's `final/model.safetensors`.
pub fn load_final<B: Backend>(
    config: &HidropConfig,
    folder: &Path,
    device: &B::Device,
) -> Result<VisionLanguageModel<B>> {
    load_exported(fresh_model::<B>(config, device)?, folder)
}

/// `final/`: the whole model and the language model as a Hugging Face folder.
fn export<B: Backend>(
    model: &VisionLanguageModel<B>,
    out: &Path,
    tokenizer_dir: &Path,
) -> Result<()> {
    let config = json!({
        "model_type": "llava",
        "vision_config": model.vision_tower.config,
        "text_config": model.language_model.config.to_json(),
    });
    export_with_language_model(model, &config, &model.language_model, out, tokenizer_dir)
}

/// Trains one variant in `RUN/<variant>` (resumable) and exports it; reuses an existing
/// export. `None` when a signal stopped training.
fn train_model<B: AutodiffBackend>(
    config: &HidropConfig,
    variant: Variant,
    data: &Prepared,
    resolved: &toml::Table,
    device: &B::Device,
) -> Result<Option<VisionLanguageModel<B::InnerBackend>>> {
    let schedule = variant.schedule(&config.hidrop);
    let (patches, size) = (config.vision.num_patches(), config.vision.image_size);
    let layers = config.model.scratch.as_ref().map(|s| s.num_hidden_layers);
    let seed = config.run.seed;
    let training = VariantTraining {
        dir: config.run.dir.join(variant.name()),
        name: variant.name().into(),
        describe: format!(
            "{} training questions, {} steps{}",
            data.train.len(),
            config.train.steps,
            layers.map_or(String::new(), |layers| format!(
                ", visual tokens kept over layers {:.1}%",
                100.0 * schedule.kept_share(layers, patches)
            ))
        ),
        train: &config.train,
        seed,
        num_examples: data.train.len(),
        batch: &|indices, step, i| {
            let rows: Vec<&VqaExample> = indices.iter().map(|&i| &data.train[i]).collect();
            VqaBatch::new(
                &rows,
                patches,
                size,
                data.pad_id,
                true,
                seed ^ (step * 64 + i as u64),
            )
        },
        loss: &|model: &VisionLanguageModel<B>, batch, share| {
            model.answer_loss(batch, &schedule, share)
        },
        dev_accuracy: &|model| {
            let correct = correctness(
                model,
                &data.dev,
                &schedule,
                config.eval.batch_size,
                data.pad_id,
                &mut |_, _| {},
            );
            Accuracy::of(&correct).accuracy
        },
        export: &|model, out| export(model, out, &data.tokenizer_dir),
    };
    train_variant(
        &training,
        || fresh_model::<B>(config, device),
        |folder| load_final::<B::InnerBackend>(config, folder, device),
        resolved,
        &data.tokenizer_dir,
    )
}

/// One variant's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    pub schedule: VisualSchedule,
    pub kept_share: f64,
    pub test: Accuracy,
    pub dev: Accuracy,
    pub train_step_ms: f64,
    pub prefill_ms: f64,
}

/// Median training-step and prefill times of each model, measured in interleaved rounds (so
/// drifts of the machine's speed hit every model alike). A training step is the loss and its
/// gradients on one training batch; a prefill is one prompt (batch of 1) to its first answer
/// token's logits.
fn measure_times<B: AutodiffBackend>(
    models: &[(
        Variant,
        VisualSchedule,
        VisionLanguageModel<B::InnerBackend>,
    )],
    data: &Prepared,
    config: &HidropConfig,
) -> Vec<(f64, f64)> {
    let size = config.vision.image_size;
    let patches = models[0].2.num_patches();
    let rows: Vec<&VqaExample> = data.train.iter().take(config.train.batch_size).collect();
    let train_batch = VqaBatch::new(&rows, patches, size, data.pad_id, true, 0);
    let share = MicroBatchShare {
        index: 0,
        count: 1,
        peers: 1,
        total_targets: train_batch_targets(&train_batch),
    };
    let trainable: Vec<VisionLanguageModel<B>> = models
        .iter()
        .map(|(_, _, m)| VisionLanguageModel::<B>::from_inner(m.clone()))
        .collect();
    let mut times = vec![(vec![], vec![]); models.len()];
    // One untimed round first: allocations and caches warm up.
    for round in 0..=config.eval.timing_rounds {
        for (i, (_, schedule, model)) in models.iter().enumerate() {
            let start = Instant::now();
            let loss = trainable[i].answer_loss(&train_batch, schedule, share);
            let grads = loss.backward();
            drop(grads);
            let step = start.elapsed().as_secs_f64();
            let prompt = &data.test[round % data.test.len()];
            let batch = VqaBatch::new(&[prompt], patches, size, data.pad_id, false, 0);
            let start = Instant::now();
            let logits = model.forward(&batch, schedule).logits;
            let _: Vec<f32> = logits
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("floats");
            let prefill = start.elapsed().as_secs_f64();
            if round > 0 {
                times[i].0.push(step * 1000.0);
                times[i].1.push(prefill * 1000.0);
            }
        }
    }
    times
        .into_iter()
        .map(|(s, p)| (median(&s), median(&p)))
        .collect()
}

fn train_batch_targets(batch: &VqaBatch) -> usize {
    use trainer::train::MicroBatch;
    batch.num_targets()
}

pub fn run<B: AutodiffBackend>(
    config: HidropConfig,
    resolved: &toml::Table,
    _resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let data = prepare(&config, config.model.tokenizer_folder()?)?;
    leader_println!(
        "hidrop: {}; {} train, {} dev, {} test questions",
        data.source,
        data.train.len(),
        data.dev.len(),
        data.test.len()
    );
    prepare_run_dir(&config.run.dir, resolved, &data.tokenizer_dir)?;
    let mut models = Vec::new();
    for &variant in &config.variants {
        let Some(model) = train_model::<B>(&config, variant, &data, resolved, &device)? else {
            return Ok(());
        };
        models.push((variant, variant.schedule(&config.hidrop), model));
    }
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }

    leader_println!(
        "hidrop: evaluating on {} test questions and timing",
        data.test.len()
    );
    let times = measure_times::<B>(&models, &data, &config);
    let layers = models[0].2.language_model.num_layers();
    let patches = models[0].2.num_patches();
    let results: Vec<VariantResult> = models
        .iter()
        .zip(&times)
        .map(
            |((variant, schedule, model), &(train_step_ms, prefill_ms))| {
                let accuracy = |examples: &[VqaExample]| {
                    Accuracy::of(&correctness(
                        model,
                        examples,
                        schedule,
                        config.eval.batch_size,
                        data.pad_id,
                        &mut |_, _| {},
                    ))
                };
                VariantResult {
                    variant: *variant,
                    schedule: schedule.clone(),
                    kept_share: schedule.kept_share(layers, patches),
                    test: accuracy(&data.test),
                    dev: accuracy(&data.dev),
                    train_step_ms,
                    prefill_ms,
                }
            },
        )
        .collect();
    // The boring explanation of any accuracy: answers guessed from the question alone.
    let text_only = models
        .iter()
        .find(|(v, _, _)| *v == Variant::Full)
        .map(|(_, _, full)| {
            Accuracy::of(&correctness(
                full,
                &data.test,
                &VisualSchedule::injected_at(layers),
                config.eval.batch_size,
                data.pad_id,
                &mut |_, _| {},
            ))
        });
    let mut table = summary_table(&config, &data, &results, layers, patches);
    if let Some(text_only) = &text_only {
        table += &format!(
            "\nControl, the question alone: the full-token model given no visual tokens answers {} \
             of the test questions.\n",
            text_only.cell()
        );
    }
    let mut numbers = json!({
        "source": data.source,
        "layers": layers,
        "visual_tokens_per_image": patches,
        "models": results,
        "text_only": text_only,
    });
    if config.probe.enabled {
        if let Some((_, _, full)) = models.iter().find(|(v, _, _)| *v == Variant::Full) {
            let probe = embedlens::probe(full, &data, &config.probe, config.eval.batch_size)?;
            table += "\n";
            table += &probe.table();
            numbers["embedlens"] = serde_json::to_value(&probe)?;
        }
    }
    println!("{table}");
    write_summary(&config.run.dir, &table, &numbers)
}

/// `accuracy` as a share of `reference`'s (`-` when the reference got nothing right).
fn ratio_cell(accuracy: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.1}%", 100.0 * accuracy / reference)
    } else {
        "-".into()
    }
}

fn summary_table(
    config: &HidropConfig,
    data: &Prepared,
    results: &[VariantResult],
    layers: usize,
    patches: usize,
) -> String {
    let h = &config.hidrop;
    let mut table = format!(
        "# HiDrop on the {source}\n\n\
         {layers}-layer language model, {patches} visual tokens per image. HiDrop's schedule: \
         visual tokens enter before layer {entry}, are pruned after layers {prune:?} to {keep:?}, \
         and leave before layer {exit}. Accuracy: greedy answer exactly right on {test} held-out \
         test questions (dev: {dev}), with 95% Wilson intervals. Times: medians of {rounds} \
         interleaved rounds in this run; a training step is the loss and gradients of one batch \
         of {batch}; a prefill is one prompt.\n\n\
         | model | visual tokens kept (mean over layers) | test accuracy (95% CI) | dev accuracy | accuracy vs full | training step | prefill |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        source = data.source,
        entry = h.late_entry_layer,
        prune = h.prune_after,
        keep = h.keep,
        exit = h.early_exit_layer,
        test = data.test.len(),
        dev = data.dev.len(),
        rounds = config.eval.timing_rounds,
        batch = config.train.batch_size,
    );
    let full = results.iter().find(|r| r.variant == Variant::Full);
    for r in results {
        let (ratio, step_speed, prefill_speed) = match full {
            Some(f) => (
                ratio_cell(r.test.accuracy, f.test.accuracy),
                format!(" ({:.2}x)", f.train_step_ms / r.train_step_ms),
                format!(" ({:.2}x)", f.prefill_ms / r.prefill_ms),
            ),
            None => ("-".into(), String::new(), String::new()),
        };
        table += &format!(
            "| {} | {:.1}% | {} | {:.1}% | {ratio} | {:.1} ms{step_speed} | {:.2} ms{prefill_speed} |\n",
            r.variant.describe(),
            100.0 * r.kept_share,
            r.test.cell(),
            100.0 * r.dev.accuracy,
            r.train_step_ms,
            r.prefill_ms,
        );
    }
    if let (Some(f), Some(hd)) = (full, results.iter().find(|r| r.variant == Variant::Hidrop)) {
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        let share_ok = hd.kept_share < 0.12;
        let accuracy_ok = f.test.accuracy > 0.0 && hd.test.accuracy >= 0.97 * f.test.accuracy;
        let speed = f.train_step_ms / hd.train_step_ms;
        table += &format!(
            "\nTargets: under 12% of visual tokens kept ({:.1}%: {}); at least 97% of the full model's \
             accuracy ({}: {}); training step at least 1.5x faster ({speed:.2}x: {}).\n",
            100.0 * hd.kept_share,
            met(share_ok),
            ratio_cell(hd.test.accuracy, f.test.accuracy),
            met(accuracy_ok),
            met(speed >= 1.5),
        );
    }
    table
}

/// `trainer probe embedlens --run RUN`: the probe on a finished hidrop run's full-token model,
/// with the run's own config (`RUN/config.toml`) and `overrides` (`probe.nearest=5`).
pub fn probe_run(run_dir: &Path, overrides: &[String]) -> Result<String> {
    let config_path = run_dir.join(trainer::run_dir::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "cannot read {} (is {} a hidrop run?)",
            config_path.display(),
            run_dir.display()
        )
    })?;
    let table =
        trainer::config::parse_config(&text, &config_path.display().to_string(), overrides)?;
    let mut config: HidropConfig =
        trainer::config::checked(&table, &config_path.display().to_string())?;
    let tokenizer_dir = run_dir.join(trainer::export::RUN_TOKENIZER_DIR);
    config.model.tokenizer = Some(tokenizer_dir.clone());
    let final_dir = run_dir.join(Variant::Full.name()).join("final");
    if !final_dir.join("model.safetensors").exists() {
        bail!(
            "{} has no trained full-token model ({}): run `trainer recipe hidrop` with variant `full` first",
            run_dir.display(),
            final_dir.display()
        );
    }
    let device = Default::default();
    let model = load_final::<trainer::Cpu>(&config, &final_dir, &device)?;
    let data = prepare(&config, tokenizer_dir)?;
    let report = embedlens::probe(&model, &data, &config.probe, config.eval.batch_size)?;
    let table = report.table();
    checkpoints::atomic::write_file(&run_dir.join("embedlens.md"), table.as_bytes())?;
    checkpoints::atomic::write_file(
        &run_dir.join("embedlens.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(table)
}
