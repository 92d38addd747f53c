//! Few-layer dominance ("The Few Govern the Many", arXiv 2511.07237; no public code): a few
//! layers of a trained model do most of the work, and the others can be removed.
//!
//! 0. Data: a plain-text corpus cut into windows (`[corpus]`) or prompt/response or chat
//!    records (`[data]`, loss on responses; with `[verifier]` also greedy accuracy). The
//!    held-out part is halved into dev (what the loss-increase score and the fine-tune's
//!    evaluations see) and test (what the table reports).
//! 1. (`[pretrain]`, for a model made from scratch) train the model first, as a stage.
//! 2. Score each layer on calibration rows: `shift` (1 - cosine similarity of the layer's
//!    input and output, averaged over tokens: the paper's representation shift),
//!    `relative-change` (|out - in| / |in|, averaged over tokens), or `loss-increase` (held-out
//!    dev loss without the layer minus with it: one evaluation per layer).
//! 3. Keep the highest-scoring layers up to `prune.keep_fraction` of them, in their order.
//! 4. Fine-tune the pruned model briefly (next-token SFT on the corpus), as a stage.
//! 5. `summary.md`: test perplexity (95% interval; and accuracy with a verifier) of the full model, of the pruned one
//!    before and after fine-tuning, of two controls with as many layers (the first ones, and a
//!    random choice) before fine-tuning, and of the full model fine-tuned as long (the control
//!    for "it only trained longer"); layers and parameters kept; forward throughput.
//!    The pruned, fine-tuned model is a Hugging Face folder (`RUN/finetune/final`).

use crate::common::{prepare_run_dir, write_summary, ModelSection, RunSection};
use crate::evaluate::{
    greedy_accuracy, perplexity_interval, task_items, GenerationReport, TaskItem,
};
use crate::sft::{tokenize_records, DataSection};
use crate::skipgpt::{corpus_rows, CorpusSection};
use crate::stages::{train_stage, SftStage, StageContext};
use crate::verify::VerifierConfig;
use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::records::{load_records, Record};
use datasets::{TextTokenizer, TokenBatch, TokenRow};
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
    /// Dev and test rows scored, each (0: all).
    #[serde(default)]
    pub max_rows: usize,
    /// Longest greedy response when `[verifier]` is set.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
}

fn default_max_new_tokens() -> usize {
    160
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDominanceConfig {
    pub run: RunSection,
    pub model: ModelSection,
    /// A plain-text corpus cut into windows (one of `corpus` and `data`).
    pub corpus: Option<CorpusSection>,
    /// Prompt/response or chat records, scored on their responses (one of `corpus` and `data`).
    pub data: Option<DataSection>,
    /// With `[data]`: also greedy accuracy on the test prompts, judged by this verifier.
    pub verifier: Option<VerifierConfig>,
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
        match (&self.corpus, &self.data) {
            (Some(corpus), None) => {
                if self.verifier.is_some() {
                    bail!("[verifier] needs [data] records with reference answers, not [corpus]");
                }
                ensure_count("corpus.seq_len", corpus.seq_len as u64)
            }
            (None, Some(data)) => data.validate("data"),
            _ => bail!(
                "layer-dominance needs exactly one of [corpus] (plain text) and [data] (records)"
            ),
        }
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

/// The held-out part halved, alternating (dev, test, dev, ...), so both cover it evenly.
pub fn dev_test_split<T>(held_out: Vec<T>) -> (Vec<T>, Vec<T>) {
    let (mut dev, mut test) = (Vec::new(), Vec::new());
    for (index, item) in held_out.into_iter().enumerate() {
        match index % 2 {
            0 => dev.push(item),
            _ => test.push(item),
        }
    }
    (dev, test)
}

/// The rows the recipe trains on, chooses on (dev) and reports on (test); with records, the
/// test prompts and their answers too.
struct Splits {
    train: Vec<TokenRow>,
    dev: Vec<TokenRow>,
    test: Vec<TokenRow>,
    test_items: Vec<TaskItem>,
}

fn load_splits(config: &LayerDominanceConfig, tokenizer: &TextTokenizer) -> Result<Splits> {
    fn cap<T>(rows: &mut Vec<T>, max_rows: usize) {
        if max_rows > 0 {
            rows.truncate(max_rows);
        }
    }
    let splits = match (&config.corpus, &config.data) {
        (Some(corpus), None) => {
            let (train, held_out) = corpus_rows(corpus, tokenizer)?;
            let (mut dev, mut test) = dev_test_split(held_out);
            cap(&mut dev, config.eval.max_rows);
            cap(&mut test, config.eval.max_rows);
            Splits {
                train,
                dev,
                test,
                test_items: Vec::new(),
            }
        }
        (None, Some(data)) => {
            let mut records = load_records(&data.train, &data.fields)?;
            let held_out = match &data.eval {
                Some(path) => load_records(path, &data.fields)?,
                None => records.split_off(records.len().saturating_sub(data.eval_count)),
            };
            let (mut dev, mut test) = dev_test_split(held_out);
            cap(&mut dev, config.eval.max_rows);
            cap(&mut test, config.eval.max_rows);
            let rows = |part: &str, records: &[Record]| -> Result<Vec<TokenRow>> {
                let source = format!("{} ({part})", data.train.display());
                Ok(tokenize_records(&source, records, tokenizer, data)?.0)
            };
            Splits {
                train: rows("train", &records)?,
                dev: rows("dev", &dev)?,
                test: rows("test", &test)?,
                test_items: task_items(&test, tokenizer, data.template)?,
            }
        }
        _ => bail!("layer-dominance needs exactly one of [corpus] and [data]"),
    };
    if splits.train.is_empty() || splits.dev.is_empty() || splits.test.is_empty() {
        bail!(
            "layer-dominance: {} training, {} dev and {} test rows; each needs at least one \
             (raise corpus.eval_fraction or data.eval_count)",
            splits.train.len(),
            splits.dev.len(),
            splits.test.len()
        );
    }
    if config.verifier.is_some() && splits.test_items.is_empty() {
        bail!("[verifier]: no test record has a reference answer (prompt/response or chat)");
    }
    Ok(splits)
}

/// What the table reports of one model: test perplexity, and greedy accuracy with a verifier.
struct Quality {
    perplexity: f64,
    interval: (f64, f64),
    accuracy: Option<GenerationReport>,
}

pub fn run<B: AutodiffBackend>(
    config: LayerDominanceConfig,
    resolved: &toml::Table,
    _resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let loaded = config.model.load::<B>(&config.run, &device)?;
    let splits = load_splits(&config, &loaded.tokenizer)?;
    let train_rows = &splits.train;
    let pad_id = loaded.tokenizer.pad_id();
    let batches =
        |rows: &[TokenRow]| crate::common::batches_in_order(rows, config.eval.batch_size, pad_id);
    let dev_batches = batches(&splits.dev);
    let test_batches = batches(&splits.test);
    let verifier = config.verifier.as_ref().map(VerifierConfig::build);
    let quality = |model: &CausalLm<B::InnerBackend>| -> Result<Quality> {
        let (perplexity, interval) = perplexity(model, &test_batches);
        let accuracy = match &verifier {
            None => None,
            Some(verifier) => Some(greedy_accuracy(
                model,
                &loaded.tokenizer,
                &splits.test_items,
                ("final answer", verifier.as_ref()),
                config.eval.max_new_tokens,
                config.eval.batch_size,
            )?),
        };
        Ok(Quality {
            perplexity,
            interval,
            accuracy,
        })
    };
    let run_dir = &config.run.dir;
    prepare_run_dir(run_dir, resolved, &loaded.tokenizer_dir)?;
    let context = StageContext {
        resolved,
        tokenizer_dir: &loaded.tokenizer_dir,
        seed: config.run.seed,
        pad_id,
    };
    let model = match &config.pretrain {
        None => loaded.model.clone(),
        Some(pretrain) => {
            let stage = SftStage {
                name: "pretrain",
                dir: run_dir.join("pretrain"),
                train: pretrain,
                lora: None,
                rows: train_rows,
                eval_batches: &dev_batches,
            };
            let Some(exported) = train_stage(loaded.model.clone(), &stage, &context)? else {
                return Ok(());
            };
            config.run.load_model::<B>(&exported, &device)?
        }
    };
    let full = model.valid();

    // Score the layers on calibration rows from the training part (loss-increase: on dev).
    let calibration = batches(&train_rows[..config.prune.calibration_rows.min(train_rows.len())]);
    let (shift, change) = hidden_state_scores(&full, &calibration);
    let scores = match config.prune.score {
        LayerScore::Shift => shift.clone(),
        LayerScore::RelativeChange => change.clone(),
        LayerScore::LossIncrease => {
            let full_dev = perplexity(&full, &dev_batches).0.ln();
            (0..full.num_layers())
                .map(|layer| {
                    let others: Vec<usize> =
                        (0..full.num_layers()).filter(|&l| l != layer).collect();
                    let without = full.clone().retain_layers(&others)?;
                    Ok(perplexity(&without, &dev_batches).0.ln() - full_dev)
                })
                .collect::<Result<Vec<f64>>>()?
        }
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
    let first: Vec<usize> = (0..count).collect();
    let mut random: Vec<usize> = (0..layers).collect();
    random.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        config.run.seed ^ 0x1A7E,
    ));
    random.truncate(count);
    random.sort_unstable();

    let stage = SftStage {
        name: "finetune",
        dir: run_dir.join("finetune"),
        train: &config.train,
        lora: None,
        rows: train_rows,
        eval_batches: &dev_batches,
    };
    let trainable_pruned = model.clone().retain_layers(&kept)?;
    let Some(exported) = train_stage(trainable_pruned, &stage, &context)? else {
        return Ok(());
    };
    let tuned = config
        .run
        .load_model::<B::InnerBackend>(&exported, &device)?;
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
            Some(
                config
                    .run
                    .load_model::<B::InnerBackend>(&exported, &device)?,
            )
        }
    };
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }
    let full_speed = throughput(&full, &test_batches);
    let pruned_speed = throughput(&tuned, &test_batches);

    let score = config.prune.score;
    let steps = config.train.steps;
    let mut rows = vec![
        (format!("full ({layers} layers)"), quality(&full)?),
        (
            format!("kept by {score:?}, {kept:?}"),
            quality(&full.clone().retain_layers(&kept)?)?,
        ),
        (
            format!("kept by {score:?}, fine-tuned {steps} steps"),
            quality(&tuned)?,
        ),
        (
            format!("control: first {count} layers"),
            quality(&full.clone().retain_layers(&first)?)?,
        ),
        (
            format!("control: random {random:?}"),
            quality(&full.clone().retain_layers(&random)?)?,
        ),
    ];
    if let Some(dense) = &dense_tuned {
        let name = format!("control: full, fine-tuned {steps} steps");
        rows.push((name, quality(dense)?));
    }
    let (full_params, pruned_params) = (parameters(&full), parameters(&tuned));
    let source = match (&config.corpus, &config.data) {
        (Some(corpus), _) => format!(
            "{} rows of {} tokens ({})",
            splits.test.len(),
            corpus.seq_len,
            corpus.train.display()
        ),
        (_, Some(data)) => format!(
            "{} records ({})",
            splits.test.len(),
            data.eval.as_ref().unwrap_or(&data.train).display()
        ),
        _ => unreachable!("validated: one of corpus and data"),
    };
    let with_accuracy = verifier.is_some();
    let mut table = format!(
        "# Layer dominance: {} of {layers} layers kept ({:.0}% of parameters), score {score:?}\n\n\
         Test split: {source}; the dev split ({} rows) saw the fine-tune's evaluations{}. \
         Layer controls before fine-tuning.\n\n| model | perplexity (95% CI) |{}\n| --- | --- |{}\n",
        kept.len(),
        100.0 * pruned_params as f64 / full_params as f64,
        splits.dev.len(),
        match score {
            LayerScore::LossIncrease => " and chose the layers",
            _ => "",
        },
        if with_accuracy {
            " greedy accuracy (95% CI) | mean length |"
        } else {
            ""
        },
        if with_accuracy { " --- | --- |" } else { "" },
    );
    for (name, quality) in &rows {
        let (low, high) = quality.interval;
        table += &format!(
            "| {name} | {:.2} [{low:.2}, {high:.2}] |",
            quality.perplexity
        );
        if let Some(g) = &quality.accuracy {
            let (low, high) = g.accuracy_95;
            table += &format!(
                " {:.1}% [{:.1}, {:.1}] | {:.1} |",
                100.0 * g.accuracy,
                100.0 * low,
                100.0 * high,
                g.mean_length
            );
        }
        table += "\n";
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
    let key = [
        "full",
        "pruned",
        "fine_tuned",
        "first_layers",
        "random_layers",
        "full_fine_tuned",
    ];
    let perplexity: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .zip(&rows)
        .map(|(key, (_, q))| (key.to_string(), json!([q.perplexity, q.interval])))
        .collect();
    let accuracy: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .zip(&rows)
        .filter_map(|(key, (_, q))| {
            Some((
                key.to_string(),
                serde_json::to_value(q.accuracy.as_ref()?).ok()?,
            ))
        })
        .collect();
    let numbers = json!({
        "layers": layers,
        "kept": kept,
        "score": score,
        "scores": scores,
        "parameters": { "full": full_params, "pruned": pruned_params },
        "perplexity": perplexity,
        "accuracy": accuracy,
        "splits": { "train": train_rows.len(), "dev": splits.dev.len(), "test": splits.test.len() },
        "tokens_per_s": { "full": full_speed, "pruned": pruned_speed },
        "export": exported,
    });
    write_summary(run_dir, &table, &numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_and_test_halves_are_disjoint_and_cover_the_held_out_part() {
        let (dev, test) = dev_test_split((0..11).collect::<Vec<u32>>());
        assert_eq!(dev, [0, 2, 4, 6, 8, 10]);
        assert_eq!(test, [1, 3, 5, 7, 9]);
        let (dev, test) = dev_test_split(vec![7u32]);
        assert_eq!((dev, test), (vec![7], vec![]));
    }

    #[test]
    fn top_layers_keeps_the_highest_scores_in_order() {
        assert_eq!(top_layers(&[0.1, 0.9, 0.5, 0.7], 2), [1, 3]);
        assert_eq!(top_layers(&[0.3, 0.3, 0.3], 2), [0, 1]);
        assert_eq!(top_layers(&[0.3, 0.1], 0), [0]);
    }
}
