//! Few-layer dominance ("The Few Govern the Many", arXiv 2511.07237; no public code): a few
//! layers of a trained model do most of the work, and the others can be removed.
//!
//! 1. (`[pretrain]`, for a model made from scratch) train the model first, as a stage.
//! 2. Score each layer on calibration rows: `shift` (1 - cosine similarity of the layer's
//!    input and output, averaged over tokens: the paper's representation shift),
//!    `relative-change` (|out - in| / |in|, averaged over tokens), or `loss-increase` (held-out
//!    loss without the layer minus with it: one evaluation per layer).
//! 3. Keep the highest-scoring layers up to `prune.keep_fraction` of them, in their order.
//! 4. Fine-tune the pruned model briefly (next-token SFT on the corpus), as a stage.
//! 5. `summary.md`: held-out perplexity (95% interval) of the full model, of the pruned one
//!    before and after fine-tuning, of two controls with as many layers (the first ones, and a
//!    random choice) before fine-tuning, and of the full model fine-tuned as long (the control
//!    for "it only trained longer"); layers and parameters kept; forward throughput.
//!    The pruned, fine-tuned model is a Hugging Face folder (`RUN/finetune/final`).

use crate::common::{prepare_run_dir, write_summary, ModelSection, RunSection};
use crate::evaluate::perplexity_interval;
use crate::skipgpt::{corpus_rows, CorpusSection};
use crate::stages::{train_stage, SftStage, StageContext};
use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::{TokenBatch, TokenRow};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;
use trainer::config::{ensure, ensure_count, Validate};
use trainer::leader_println;
use trainer::model::llama::KvAccess;
use trainer::train::{row_losses, DeviceBatch, Resume, TrainConfig};
use trainer::CausalLm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerScore {
    Shift,
    RelativeChange,
    LossIncrease,
}

fn default_score() -> LayerScore {
    LayerScore::Shift
}
fn default_calibration_rows() -> usize {
    32
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSection {
    #[serde(default = "default_score")]
    pub score: LayerScore,
    /// Fraction of the layers kept (at least one layer).
    pub keep_fraction: f64,
    /// Training rows the layer scores are measured on.
    #[serde(default = "default_calibration_rows")]
    pub calibration_rows: usize,
    /// Also fine-tune the full model as long: the control for "it only trained longer".
    #[serde(default = "yes")]
    pub dense_control: bool,
}

fn yes() -> bool {
    true
}

fn default_eval_batch() -> usize {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DominanceEval {
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Held-out rows scored (0: all).
    #[serde(default)]
    pub max_rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDominanceConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub corpus: CorpusSection,
    /// Train the model first (for a model made from scratch).
    pub pretrain: Option<TrainConfig>,
    pub prune: PruneSection,
    /// The brief fine-tune of the pruned model.
    pub train: TrainConfig,
    pub eval: DominanceEval,
}

impl Validate for LayerDominanceConfig {
    fn validate(&self, _: &str) -> Result<()> {
        self.model.validate("model")?;
        if let Some(pretrain) = &self.pretrain {
            pretrain.validate("pretrain")?;
        }
        self.train.validate("train")?;
        ensure(
            self.prune.keep_fraction > 0.0 && self.prune.keep_fraction <= 1.0,
            "prune.keep_fraction",
            self.prune.keep_fraction,
            "in (0, 1]",
        )?;
        ensure_count("prune.calibration_rows", self.prune.calibration_rows as u64)?;
        ensure_count("eval.batch_size", self.eval.batch_size as u64)?;
        ensure_count("corpus.seq_len", self.corpus.seq_len as u64)
    }
}

/// Each layer's representation shift and relative change on `batches`, averaged over tokens.
fn hidden_state_scores<B: Backend>(
    model: &CausalLm<B>,
    batches: &[TokenBatch],
) -> (Vec<f64>, Vec<f64>) {
    let layers = model.num_layers();
    let (mut shift, mut change, mut tokens) = (vec![0.0; layers], vec![0.0; layers], 0usize);
    let device = model.device();
    for batch in batches {
        let on_device = DeviceBatch::<B>::new(batch, &device);
        let context = model.masked_context(on_device.positions, on_device.allowed);
        let valid = on_device.valid.clone();
        let count: f32 = valid.clone().sum().into_scalar().elem();
        tokens += count as usize;
        // A recipe-side loop over the shared layer calls: each layer's input and output.
        let mut hidden = model.embed(on_device.tokens);
        let mut plan = model.inference_plan();
        for (index, (shift, change)) in shift.iter_mut().zip(&mut change).enumerate() {
            let exec = plan(index, &hidden);
            let no_cache = KvAccess {
                prefix: None,
                cache: None,
            };
            let out = model
                .run_layer(index, hidden.clone(), &context, no_cache, &exec)
                .hidden;
            let dot = (hidden.clone() * out.clone())
                .sum_dim(2)
                .squeeze_dim::<2>(2);
            let norm_in = hidden
                .clone()
                .square()
                .sum_dim(2)
                .sqrt()
                .squeeze_dim::<2>(2);
            let norm_out = out.clone().square().sum_dim(2).sqrt().squeeze_dim::<2>(2);
            let cosine = dot / (norm_in.clone() * norm_out).clamp_min(1e-12);
            let relative = (out.clone() - hidden)
                .square()
                .sum_dim(2)
                .sqrt()
                .squeeze_dim::<2>(2)
                / norm_in.clamp_min(1e-12);
            let summed = |t: Tensor<B, 2>| -> f64 {
                f64::from((t * valid.clone()).sum().into_scalar().elem::<f32>())
            };
            *shift += count as f64 - summed(cosine);
            *change += summed(relative);
            hidden = out;
        }
    }
    let per_token = |v: Vec<f64>| v.into_iter().map(|x| x / tokens.max(1) as f64).collect();
    (per_token(shift), per_token(change))
}

/// Held-out perplexity and its 95% interval.
fn perplexity<B: Backend>(model: &CausalLm<B>, batches: &[TokenBatch]) -> (f64, (f64, f64)) {
    let rows = row_losses(model, batches);
    let nll: f64 = rows.iter().map(|r| r.0).sum();
    let tokens: usize = rows.iter().map(|r| r.1).sum();
    (
        (nll / tokens.max(1) as f64).exp(),
        perplexity_interval(&rows, 1000, 0),
    )
}

/// Forward tokens per second over `batches` (the best of three passes).
fn throughput<B: Backend>(model: &CausalLm<B>, batches: &[TokenBatch]) -> f64 {
    let device = model.device();
    let tokens: usize = batches
        .iter()
        .map(|b| b.inputs.iter().map(Vec::len).sum::<usize>())
        .sum();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for batch in batches {
            let on_device = DeviceBatch::<B>::new(batch, &device);
            let logits = model.forward(on_device.tokens, on_device.positions, on_device.allowed);
            let _ = logits.sum().into_scalar();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    tokens as f64 / best
}

/// The layers to keep: the `count` best by `scores` (higher = more important), in order.
pub fn top_layers(scores: &[f64], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(count.max(1)).collect();
    kept.sort_unstable();
    kept
}

fn parameters<B: Backend>(model: &CausalLm<B>) -> usize {
    trainer::weights::parameter_shapes(model)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

pub fn run<B: AutodiffBackend>(
    config: LayerDominanceConfig,
    resolved: &toml::Table,
    _resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let loaded = config.model.load::<B>(&config.run, &device)?;
    let (train_rows, mut eval_rows) = corpus_rows(&config.corpus, &loaded.tokenizer)?;
    if config.eval.max_rows > 0 {
        eval_rows.truncate(config.eval.max_rows);
    }
    let pad_id = loaded.tokenizer.pad_id();
    let batches =
        |rows: &[TokenRow]| crate::common::batches_in_order(rows, config.eval.batch_size, pad_id);
    let eval_batches = batches(&eval_rows);
    let run_dir = &config.run.dir;
    prepare_run_dir(run_dir, resolved, &loaded.tokenizer_dir)?;
    let context = StageContext {
        resolved,
        tokenizer_dir: &loaded.tokenizer_dir,
        seed: config.run.seed,
        pad_id,
    };
    let model = match &config.pretrain {
        None => loaded.model,
        Some(pretrain) => {
            let stage = SftStage {
                name: "pretrain",
                dir: run_dir.join("pretrain"),
                train: pretrain,
                lora: None,
                rows: &train_rows,
                eval_batches: &eval_batches,
            };
            let Some(exported) = train_stage(loaded.model, &stage, &context)? else {
                return Ok(());
            };
            config.run.load_model::<B>(&exported, &device)?
        }
    };
    let full = model.valid();

    // Score the layers on calibration rows from the training part.
    let calibration = batches(&train_rows[..config.prune.calibration_rows.min(train_rows.len())]);
    let (shift, change) = hidden_state_scores(&full, &calibration);
    let (full_ppl, full_ci) = perplexity(&full, &eval_batches);
    let scores = match config.prune.score {
        LayerScore::Shift => shift.clone(),
        LayerScore::RelativeChange => change.clone(),
        LayerScore::LossIncrease => (0..full.num_layers())
            .map(|layer| {
                let others: Vec<usize> = (0..full.num_layers()).filter(|&l| l != layer).collect();
                let without = full.clone().retain_layers(&others)?;
                Ok(perplexity(&without, &eval_batches).0.ln() - full_ppl.ln())
            })
            .collect::<Result<Vec<f64>>>()?,
    };
    let layers = full.num_layers();
    let count = ((layers as f64 * config.prune.keep_fraction).round() as usize).clamp(1, layers);
    let kept = top_layers(&scores, count);
    leader_println!("layer-dominance: scores {scores:.4?}; keeping {kept:?} of {layers}");
    if kept.len() == layers {
        bail!(
            "prune.keep_fraction = {} keeps every layer: nothing to prune",
            config.prune.keep_fraction
        );
    }

    let pruned = full.clone().retain_layers(&kept)?;
    let (pruned_ppl, pruned_ci) = perplexity(&pruned, &eval_batches);
    let first: Vec<usize> = (0..count).collect();
    let (first_ppl, first_ci) = perplexity(&full.clone().retain_layers(&first)?, &eval_batches);
    let mut random: Vec<usize> = (0..layers).collect();
    random.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        config.run.seed ^ 0x1A7E,
    ));
    random.truncate(count);
    random.sort_unstable();
    let (random_ppl, random_ci) = perplexity(&full.clone().retain_layers(&random)?, &eval_batches);

    let stage = SftStage {
        name: "finetune",
        dir: run_dir.join("finetune"),
        train: &config.train,
        lora: None,
        rows: &train_rows,
        eval_batches: &eval_batches,
    };
    let trainable_pruned = model.clone().retain_layers(&kept)?;
    let Some(exported) = train_stage(trainable_pruned, &stage, &context)? else {
        return Ok(());
    };
    let tuned = config
        .run
        .load_model::<B::InnerBackend>(&exported, &device)?;
    let (tuned_ppl, tuned_ci) = perplexity(&tuned, &eval_batches);
    let dense_tuned = match config.prune.dense_control {
        false => None,
        true => {
            let stage = SftStage {
                name: "finetune-full",
                dir: run_dir.join("finetune-full"),
                ..stage
            };
            let Some(exported) = train_stage(model, &stage, &context)? else {
                return Ok(());
            };
            let dense = config
                .run
                .load_model::<B::InnerBackend>(&exported, &device)?;
            Some(perplexity(&dense, &eval_batches))
        }
    };
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }
    let full_speed = throughput(&full, &eval_batches);
    let pruned_speed = throughput(&tuned, &eval_batches);

    let (full_params, pruned_params) = (parameters(&full), parameters(&tuned));
    let mut rows = vec![
        (format!("full ({layers} layers)"), full_ppl, full_ci),
        (
            format!("kept by {:?}, {kept:?}", config.prune.score),
            pruned_ppl,
            pruned_ci,
        ),
        (
            format!(
                "kept by {:?}, fine-tuned {} steps",
                config.prune.score, config.train.steps
            ),
            tuned_ppl,
            tuned_ci,
        ),
        (
            format!("control: first {count} layers"),
            first_ppl,
            first_ci,
        ),
        (format!("control: random {random:?}"), random_ppl, random_ci),
    ];
    if let Some((ppl, ci)) = dense_tuned {
        let name = format!("control: full, fine-tuned {} steps", config.train.steps);
        rows.push((name, ppl, ci));
    }
    let mut table = format!(
        "# Layer dominance: {} of {layers} layers kept ({:.0}% of parameters), score {:?}\n\n\
         Held-out perplexity on {} rows of {} tokens ({}); layer controls before fine-tuning.\n\n\
         | model | perplexity (95% CI) |\n| --- | --- |\n",
        kept.len(),
        100.0 * pruned_params as f64 / full_params as f64,
        config.prune.score,
        eval_rows.len(),
        config.corpus.seq_len,
        config.corpus.train.display(),
    );
    for (name, ppl, (low, high)) in &rows {
        table += &format!("| {name} | {ppl:.2} [{low:.2}, {high:.2}] |\n");
    }
    table += &format!(
        "\nForward throughput: full {full_speed:.0} tokens/s, pruned {pruned_speed:.0} tokens/s ({:.2}x).\n\n\
         Scores per layer (shift = 1 - cosine, change = |out - in| / |in|):\n\n| layer | shift | change | chosen score | kept |\n| --- | --- | --- | --- | --- |\n",
        pruned_speed / full_speed
    );
    for layer in 0..layers {
        table += &format!(
            "| {layer} | {:.4} | {:.4} | {:.4} | {} |\n",
            shift[layer],
            change[layer],
            scores[layer],
            if kept.contains(&layer) { "yes" } else { "" }
        );
    }
    println!("{table}");
    let numbers = json!({
        "layers": layers,
        "kept": kept,
        "score": config.prune.score,
        "scores": scores,
        "parameters": { "full": full_params, "pruned": pruned_params },
        "perplexity": {
            "full": [full_ppl, full_ci], "pruned": [pruned_ppl, pruned_ci], "fine_tuned": [tuned_ppl, tuned_ci],
            "first_layers": [first_ppl, first_ci], "random_layers": [random_ppl, random_ci],
            "full_fine_tuned": dense_tuned,
        },
        "tokens_per_s": { "full": full_speed, "pruned": pruned_speed },
        "export": exported,
    });
    write_summary(run_dir, &table, &numbers)
}
