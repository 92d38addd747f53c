//! On-Policy SFT (EIT-NLP): shorter chains of thought at the same accuracy, by fine-tuning a
//! model on its own correct and concise samples.
//!
//! Each step:
//! 1. take a batch of prompts;
//! 2. sample n completions per prompt from the current model, cut at `max_response_tokens`;
//! 3. score each with the verifier: 1 if the final answer is present and correct; a cut
//!    response has no final answer and scores 0 (that cap is the whole length penalty);
//! 4. drop prompts with no correct completion (optionally keep only the shortest k);
//! 5. one update with token-mean NLL on the kept responses. No KL, no reference model.
//!
//! With `[warmup]`, the run first makes its own verbose base model by plain SFT on the
//! synthetic task's verbose solutions; otherwise `[model]` names the base.

use crate::common::{prepare_run_dir, ModelSection, RunSection};
use crate::evaluate::{
    bootstrap_mean_interval, mean, percentile, sample_and_score, wilson_interval, TaskItem,
};
use crate::sft::DataReport;
use crate::stages::{train_stage, SftStage, StageContext};
use crate::verify::{Verifier, VerifierConfig};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use datasets::examples::{prompt_and_response, prompt_tokens};
use datasets::synthetic::{plain_prompt, task_pairs, task_problem, Style, Task};
use datasets::{EpochSampler, Template, TextTokenizer, TokenBatch, TokenRow};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use trainer::config::{ensure_count, ensure_non_negative, ensure_probability, Validate};
use trainer::generate::GenerationConfig;
use trainer::leader_println;
use trainer::lora::LoraConfig;
use trainer::sampling::SamplingParams;
use trainer::train::{Next, Resume, TrainConfig, Trainer};
use trainer::CausalLm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnPolicyConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub warmup: Option<WarmupSection>,
    pub task: TaskSection,
    pub sampling: SamplingSection,
    pub verifier: VerifierConfig,
    pub eval: EvalSection,
    pub train: TrainConfig,
    pub lora: Option<LoraConfig>,
}

impl Validate for OnPolicyConfig {
    fn validate(&self, _: &str) -> Result<()> {
        self.model.validate("model")?;
        if let Some(warmup) = &self.warmup {
            ensure_count("warmup.count", warmup.count)?;
            ensure_at_least("warmup.max_length", warmup.max_length, 2)?;
            warmup.train.validate("warmup.train")?;
        }
        ensure_count("task.train_count", self.task.train_count as u64)?;
        let sampling = &self.sampling;
        ensure_count(
            "sampling.prompts_per_step",
            sampling.prompts_per_step as u64,
        )?;
        ensure_count(
            "sampling.samples_per_prompt",
            sampling.samples_per_prompt as u64,
        )?;
        ensure_count(
            "sampling.max_response_tokens",
            sampling.max_response_tokens as u64,
        )?;
        ensure_count(
            "sampling.updates_per_rollout",
            sampling.updates_per_rollout as u64,
        )?;
        ensure_count(
            "eval.samples_per_prompt",
            self.eval.samples_per_prompt as u64,
        )?;
        ensure_non_negative("sampling.temperature", sampling.temperature as f64)?;
        ensure_probability("sampling.top_p", sampling.top_p as f64)?;
        ensure_count("eval.max_new_tokens", self.eval.max_new_tokens as u64)?;
        ensure_count("eval.batch_size", self.eval.batch_size as u64)?;
        self.train.validate("train")?;
        match &self.lora {
            Some(lora) => lora.validate("lora"),
            None => Ok(()),
        }
    }
}

/// At least `min`.
fn ensure_at_least(key: &str, value: usize, min: usize) -> Result<()> {
    trainer::config::ensure(value >= min, key, value, &format!("at least {min}"))
}

/// Plain SFT on `count` verbose solutions of the synthetic task before on-policy training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupSection {
    pub count: u64,
    pub max_length: usize,
    /// The warm-up solutions' style: `verbose` (default), `concise`, or `direct` (answers
    /// alone: the control for whether the steps do work).
    #[serde(default = "verbose")]
    pub style: Style,
    pub train: TrainConfig,
}

fn verbose() -> Style {
    Style::Verbose
}

fn plain() -> Template {
    Template::Plain
}

/// Where prompts and reference answers come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// `arithmetic` or `arithmetic-chain` (built in) or a .jsonl file of `{"prompt", "answer"}`.
    pub source: String,
    /// Prompts to train on (arithmetic) or the first lines of the file used for training.
    pub train_count: usize,
    /// Held-out test prompts: the base and final evaluations (the table).
    pub eval_count: usize,
    /// Held-out dev prompts: the evaluations during training (`train.eval_every`), what
    /// settings are chosen on. Built-in tasks draw them from their own index range; a file's
    /// come after its test prompts. 0: the periodic evaluations use the test prompts.
    #[serde(default)]
    pub dev_count: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "plain")]
    pub template: Template,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingSection {
    pub prompts_per_step: usize,
    pub samples_per_prompt: usize,
    /// The length cap: a response not finished within it scores 0.
    pub max_response_tokens: usize,
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    /// Keep only the shortest k correct responses per prompt (0 keeps all, as the paper).
    #[serde(default)]
    pub keep_shortest: usize,
    /// Optimizer updates per rollout: the kept responses are shuffled and split into this many
    /// mini-batches, one update each (as the official code's inner epochs). `train.steps`
    /// counts updates. Fewer when a peer kept fewer responses than this.
    #[serde(default = "one_update")]
    pub updates_per_rollout: usize,
    /// What the loop trains on: `model` (its own correct samples: on-policy SFT) or
    /// `concise-references` (the built-in task's concise reference solutions of the same
    /// prompts: the offline-SFT control, same loop, steps and evaluation).
    #[serde(default)]
    pub source: SampleSource,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SampleSource {
    #[default]
    Model,
    ConciseReferences,
}

fn one_update() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Generation budget at evaluation: large, so the base model's long answers are measured.
    pub max_new_tokens: usize,
    /// Prompts per generation batch.
    pub batch_size: usize,
    /// Samples per prompt for the sampled accuracy (avg@k) and sampled lengths.
    #[serde(default = "one_sample")]
    pub samples_per_prompt: usize,
}

fn one_sample() -> usize {
    1
}

/// What evaluation measures on the held-out prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub greedy_accuracy: f64,
    /// avg@k: the mean score over `eval.samples_per_prompt` samples of every prompt.
    pub sampled_accuracy: f64,
    /// Greedy response lengths.
    pub mean_length: f64,
    pub p90_length: f64,
    pub truncated_share: f64,
    /// 95% intervals: Wilson for greedy, a bootstrap over prompts for avg@k.
    #[serde(default)]
    pub greedy_accuracy_95: (f64, f64),
    #[serde(default)]
    pub sampled_accuracy_95: (f64, f64),
    /// Sampled response lengths.
    #[serde(default)]
    pub sampled_mean_length: f64,
    #[serde(default)]
    pub sampled_p90_length: f64,
}

/// Index ranges of the synthetic task: train, held-out and warm-up problems never overlap.
const EVAL_OFFSET: u64 = 1_000_000;
const DEV_OFFSET: u64 = 1_500_000;
const WARMUP_OFFSET: u64 = 2_000_000;

/// A task's prompts: train, dev (evaluations during training) and test (the table); for a
/// built-in task also the concise reference solution of each training prompt.
struct TaskSplits {
    train: Vec<TaskItem>,
    dev: Vec<TaskItem>,
    test: Vec<TaskItem>,
    train_references: Vec<String>,
}

fn load_task(task: &TaskSection, tokenizer: &TextTokenizer) -> Result<TaskSplits> {
    let item = |prompt: String, answer: String| -> Result<TaskItem> {
        Ok(TaskItem {
            tokens: prompt_tokens(tokenizer, task.template, &prompt)?,
            prompt,
            answer,
        })
    };
    if let Some(built_in) = Task::parse(&task.source) {
        // Index ranges never overlap, but a small task repeats questions: held-out prompts
        // skip any question already taken (training ones first, then test, then dev).
        let mut taken = HashSet::new();
        let mut make = |first: u64, count: usize, skip_taken: bool| -> Result<Vec<TaskItem>> {
            let mut items = Vec::with_capacity(count);
            for index in first.. {
                if items.len() == count {
                    break;
                }
                if index - first > 100 * count as u64 + 1000 {
                    bail!(
                        "task {}: fewer than {count} distinct held-out questions",
                        task.source
                    );
                }
                let problem = task_problem(built_in, task.seed, index, Style::Concise);
                let prompt = plain_prompt(&problem.question);
                if taken.insert(prompt.clone()) || !skip_taken {
                    items.push(item(prompt, problem.answer.to_string())?);
                }
            }
            Ok(items)
        };
        let train = make(0, task.train_count, false)?;
        let test = make(EVAL_OFFSET, task.eval_count, true)?;
        let dev = make(DEV_OFFSET, task.dev_count, true)?;
        let train_references = (0..task.train_count as u64)
            .map(|i| {
                format!(
                    " {}",
                    task_problem(built_in, task.seed, i, Style::Concise).solution
                )
            })
            .collect();
        return Ok(TaskSplits {
            train,
            dev,
            test,
            train_references,
        });
    }
    let path = Path::new(&task.source);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read task file {}", path.display()))?;
    let mut items = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        #[derive(Deserialize)]
        struct Line {
            prompt: String,
            answer: Value,
        }
        let parsed: Line = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: expected {{\"prompt\", \"answer\"}} ({e})",
                path.display(),
                index + 1
            )
        })?;
        let answer = match parsed.answer {
            Value::String(s) => s,
            other => other.to_string(),
        };
        items.push(item(parsed.prompt, answer)?);
    }
    let needed = task.train_count + task.eval_count + task.dev_count;
    if items.len() < needed {
        bail!(
            "{} has {} prompts; task.train_count + task.eval_count + task.dev_count = {needed}",
            path.display(),
            items.len(),
        );
    }
    let mut held_out = items.split_off(task.train_count);
    let mut dev = held_out.split_off(task.eval_count);
    dev.truncate(task.dev_count);
    // A held-out prompt that is also a training prompt is no test of generalisation.
    let train_prompts: HashSet<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
    let leaked = held_out
        .iter()
        .chain(&dev)
        .filter(|i| train_prompts.contains(i.prompt.as_str()))
        .count();
    if leaked > 0 {
        bail!(
            "{}: {leaked} held-out prompt(s) also appear among the first task.train_count = {} \
             (training) prompts; remove the duplicates from the file",
            path.display(),
            task.train_count
        );
    }
    Ok(TaskSplits {
        train: items,
        dev,
        test: held_out,
        train_references: Vec::new(),
    })
}

/// The base model's evaluation (test, and dev scalars), kept beside the warm-up's export:
/// runs that share a warm-up (a cap sweep copies it) and evaluate it with the same settings
/// skip the minutes it takes. Anything that changes the evaluation changes the key.
struct BaseEvalCache {
    path: PathBuf,
    key: Value,
}

impl BaseEvalCache {
    /// The file lives in the warm-up's stage folder, so it goes wherever that folder is copied.
    /// `peers`: the data-parallel peers that split the evaluation (each samples its own stream).
    fn beside_warmup(export: &Path, config: &OnPolicyConfig, peers: usize) -> Self {
        let stage_dir = export.parent().unwrap_or(export);
        Self {
            path: stage_dir.join("base_eval.json"),
            key: json!({
                "seed": config.run.seed,
                "precision": config.run.precision,
                "task": config.task,
                "verifier": config.verifier,
                "eval": config.eval,
                "temperature": config.sampling.temperature,
                "top_p": config.sampling.top_p,
                "peers": peers,
            }),
        }
    }

    /// The cached result when the file is there and its key matches; a missing, unreadable or
    /// stale file means evaluating again.
    fn read(&self) -> Option<(EvalResult, Vec<(String, f64)>)> {
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(&self.path).ok()?).ok()?;
        if saved["key"] != self.key {
            return None;
        }
        Some((
            serde_json::from_value(saved["test"].clone()).ok()?,
            serde_json::from_value(saved["scalars"].clone()).ok()?,
        ))
    }

    fn write(&self, base: &EvalResult, scalars: &[(String, f64)]) -> Result<()> {
        let text = serde_json::to_string_pretty(
            &json!({ "key": self.key, "test": base, "scalars": scalars }),
        )?;
        // Written whole, then renamed: a killed run never leaves half a file.
        let partial = self.path.with_extension("json.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &self.path))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Indices of the samples to train on, given `samples_per_prompt` consecutive samples per
/// prompt: the correct ones (score above 0.5), at most `keep_shortest` per prompt when it
/// is not 0. A prompt with no correct sample contributes nothing.
pub fn kept_indices(
    scores: &[f32],
    lengths: &[usize],
    samples_per_prompt: usize,
    keep_shortest: usize,
) -> Vec<usize> {
    let mut kept = Vec::new();
    for start in (0..scores.len()).step_by(samples_per_prompt.max(1)) {
        let end = (start + samples_per_prompt).min(scores.len());
        let mut correct: Vec<usize> = (start..end).filter(|&i| scores[i] > 0.5).collect();
        if keep_shortest > 0 {
            correct.sort_by_key(|&i| (lengths[i], i));
            correct.truncate(keep_shortest);
        }
        kept.extend(correct);
    }
    kept
}

/// A training row: prompt tokens (not trained on) then the response (trained on).
pub fn response_row(prompt: &[u32], response: &[u32]) -> TokenRow {
    let tokens: Vec<u32> = prompt.iter().chain(response).copied().collect();
    TokenRow {
        loss_mask: (0..tokens.len()).map(|i| i >= prompt.len()).collect(),
        segment: vec![1; tokens.len()],
        tokens,
    }
}

/// Greedy and sampled accuracy, response lengths and the share cut by the budget on `items`
/// (`eval.samples_per_prompt` sampled responses per prompt). With data-parallel peers each generates for its contiguous share of the prompts
/// (on a CPU: one core each) and the per-prompt results are summed over peers, so that every
/// peer ends with the whole result.
fn evaluate<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    tokenizer: &TextTokenizer,
    verifier: &dyn Verifier,
    items: &[TaskItem],
    config: &OnPolicyConfig,
    stop_tokens: &[u32],
) -> Result<EvalResult> {
    let model = trainer.eval_model();
    let (rank, world) = (trainer.peer.rank(), trainer.peer.world());
    let mine = items.len() * rank / world..items.len() * (rank + 1) / world;
    let run = |sampling: SamplingParams, prompts: &[&TaskItem], label: &str| {
        let generation = GenerationConfig {
            max_new_tokens: config.eval.max_new_tokens,
            sampling,
            // Peers draw from their own streams (the same as before for the first peer).
            seed: (config.run.seed ^ 0xE7A1)
                .wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            stop_tokens: stop_tokens.to_vec(),
            pad_id: tokenizer.pad_id(),
        };
        sample_and_score(
            &model,
            tokenizer,
            verifier,
            prompts,
            &generation,
            config.eval.batch_size,
            Some(label),
        )
    };
    let prompts: Vec<&TaskItem> = items[mine.clone()].iter().collect();
    let greedy = run(SamplingParams::greedy(), &prompts, "eval greedy")?;
    // k samples of each prompt, the prompt's k copies side by side.
    let k = config.eval.samples_per_prompt.max(1);
    let repeated: Vec<&TaskItem> = prompts
        .iter()
        .flat_map(|&item| std::iter::repeat_n(item, k))
        .collect();
    let sampling = SamplingParams {
        temperature: config.sampling.temperature,
        top_p: config.sampling.top_p,
    };
    let sampled = run(sampling, &repeated, "eval sampled")?;

    // All peers' results in prompt order: each fills its own share of five columns, zeros
    // elsewhere, and the sum over peers puts them together (exact: one peer's entry is f32
    // already, the others add zeros).
    let n = items.len();
    let mut columns = vec![0.0; 3 * n + 2 * n * k];
    for (i, prompt) in mine.clone().enumerate() {
        columns[prompt] = greedy.scores[i] as f64;
        columns[n + prompt] = greedy.tokens[i].len() as f64;
        columns[2 * n + prompt] = greedy.finished[i] as u8 as f64;
        for j in 0..k {
            let sample = prompt * k + j;
            columns[3 * n + sample] = sampled.scores[i * k + j] as f64;
            columns[3 * n + n * k + sample] = sampled.tokens[i * k + j].len() as f64;
        }
    }
    let columns = trainer.sum_over_peers(&columns)?;
    let greedy_scores = &columns[..n];
    let lengths: Vec<usize> = columns[n..2 * n].iter().map(|&l| l as usize).collect();
    let finished = &columns[2 * n..3 * n];
    let sampled_scores = &columns[3 * n..3 * n + n * k];
    let sampled_lengths: Vec<usize> = columns[3 * n + n * k..]
        .iter()
        .map(|&l| l as usize)
        .collect();
    let correct: f64 = greedy_scores.iter().sum();
    // Each prompt's (sum of its k scores, k): the bootstrap resamples prompts.
    let per_prompt: Vec<(f64, usize)> = sampled_scores
        .chunks(k)
        .map(|scores| (scores.iter().sum(), scores.len()))
        .collect();
    Ok(EvalResult {
        greedy_accuracy: correct / n.max(1) as f64,
        sampled_accuracy: mean(sampled_scores.iter().copied()),
        mean_length: mean(lengths.iter().map(|&l| l as f64)),
        p90_length: percentile(&lengths, 0.9),
        truncated_share: mean(finished.iter().map(|&f| 1.0 - f)),
        greedy_accuracy_95: wilson_interval(correct, n),
        sampled_accuracy_95: bootstrap_mean_interval(&per_prompt, 1000, config.run.seed),
        sampled_mean_length: mean(sampled_lengths.iter().map(|&l| l as f64)),
        sampled_p90_length: percentile(&sampled_lengths, 0.9),
    })
}

fn eval_scalars(prefix: &str, result: &EvalResult) -> Vec<(String, f64)> {
    vec![
        (format!("{prefix}greedy_accuracy"), result.greedy_accuracy),
        (format!("{prefix}sampled_accuracy"), result.sampled_accuracy),
        (format!("{prefix}mean_length"), result.mean_length),
        (format!("{prefix}p90_length"), result.p90_length),
        (format!("{prefix}truncated_share"), result.truncated_share),
        (
            format!("{prefix}sampled_mean_length"),
            result.sampled_mean_length,
        ),
    ]
}

/// The warm-up stage: plain SFT on verbose solutions in `RUN/warmup`, exported to
/// `RUN/warmup/final`. Resumable like any run; skipped when its export exists.
fn warm_up<B: AutodiffBackend>(
    model: CausalLm<B>,
    tokenizer: &TextTokenizer,
    tokenizer_dir: &Path,
    warmup: &WarmupSection,
    config: &OnPolicyConfig,
    held_out: &HashSet<&str>,
    resolved: &toml::Table,
) -> Result<Option<PathBuf>> {
    // The built-in task's problems (the simple one when the prompts come from a file),
    // without the questions held out for dev and test.
    let task = Task::parse(&config.task.source).unwrap_or(Task::Arithmetic);
    let mut pairs = task_pairs(
        task,
        config.task.seed,
        WARMUP_OFFSET,
        warmup.count,
        warmup.style,
    );
    pairs.retain(|(prompt, _)| !held_out.contains(prompt.as_str()));
    let mut full_rows = Vec::with_capacity(pairs.len());
    for (prompt, response) in &pairs {
        let (prompt, answer) =
            prompt_and_response(tokenizer, config.task.template, prompt, response)?;
        full_rows.push(response_row(&prompt, &answer));
    }
    let (rows, report) = DataReport::cut_and_count(
        "warm-up (built-in arithmetic)",
        full_rows,
        warmup.max_length,
    );
    DataReport::write_all(&config.run.dir.join("warmup"), &[report])?;
    let stage = SftStage {
        name: "warm-up (plain SFT on verbose solutions)",
        dir: config.run.dir.join("warmup"),
        train: &warmup.train,
        lora: None,
        rows: &rows,
        eval_batches: &[],
    };
    let context = StageContext {
        resolved,
        tokenizer_dir,
        seed: config.run.seed,
        pad_id: tokenizer.pad_id(),
    };
    train_stage(model, &stage, &context)
}

pub fn run<B: AutodiffBackend>(
    config: OnPolicyConfig,
    resolved: &toml::Table,
    resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let seed = config.run.seed;
    let loaded = config.model.load::<B>(&config.run, &device)?;
    let (tokenizer, tokenizer_dir) = (loaded.tokenizer, loaded.tokenizer_dir);
    let TaskSplits {
        train: train_items,
        dev: dev_items,
        test: eval_items,
        train_references,
    } = load_task(&config.task, &tokenizer)?;
    // The offline-SFT control trains on reference solutions, tokenized as the warm-up's are.
    let references: Vec<Vec<u32>> = match config.sampling.source {
        SampleSource::Model => Vec::new(),
        SampleSource::ConciseReferences => {
            if train_references.is_empty() {
                bail!(
                    "sampling.source = \"concise-references\" needs a built-in task \
                     (task.source = \"arithmetic\" or \"arithmetic-chain\"), which has them"
                );
            }
            train_items
                .iter()
                .zip(&train_references)
                .map(|(item, reference)| {
                    Ok(prompt_and_response(
                        &tokenizer,
                        config.task.template,
                        &item.prompt,
                        reference,
                    )?
                    .1)
                })
                .collect::<Result<_>>()?
        }
    };
    let held_out: HashSet<&str> = eval_items
        .iter()
        .chain(&dev_items)
        .map(|item| item.prompt.as_str())
        .collect();
    let (model, base_folder) = match &config.warmup {
        Some(warmup) => match warm_up(
            loaded.model,
            &tokenizer,
            &tokenizer_dir,
            warmup,
            &config,
            &held_out,
            resolved,
        )? {
            Some(dir) => (
                config.run.load_model::<B>(&dir, &device)?,
                std::path::absolute(&dir).ok(),
            ),
            None => return Ok(()), // stopped by a signal
        },
        None => (loaded.model, config.model.base_folder()),
    };
    let mut stop_tokens = model.config.eos_token_ids.clone();
    stop_tokens.extend(tokenizer.stop_ids());
    if stop_tokens.is_empty() {
        bail!(
            "the model has no end-of-sequence token: responses could never finish inside the cap"
        );
    }
    let verifier = config.verifier.build();
    // The table is on test prompts; the evaluations during training on dev ones (on test
    // ones only when there are no dev prompts).
    let periodic_items = if dev_items.is_empty() {
        &eval_items
    } else {
        &dev_items
    };
    let evaluate_on = |trainer: &Trainer<B>, items: &[TaskItem]| {
        evaluate(
            trainer,
            &tokenizer,
            verifier.as_ref(),
            items,
            &config,
            &stop_tokens,
        )
    };
    let evaluate_now = |trainer: &Trainer<B>| evaluate_on(trainer, &eval_items);

    prepare_run_dir(&config.run.dir, resolved, &tokenizer_dir)?;
    let (mut trainer, saved) = Trainer::start(
        model,
        config.train.clone(),
        config.lora.clone(),
        seed,
        &config.run.dir,
        resume,
    )?;
    trainer.base_model = base_folder.clone();
    // Mini-batches of the last rollout not trained on yet: (prompt, response) token pairs.
    let mut pending: VecDeque<Vec<Response>> = match &saved {
        Some(state) if state.get("pending").is_some() => {
            serde_json::from_value(state["pending"].clone())?
        }
        _ => VecDeque::new(),
    };
    let (mut prompts, base) = match saved {
        Some(state) => (
            EpochSampler::resume(
                train_items.len(),
                seed,
                serde_json::from_value(state["prompts"].clone())?,
            ),
            serde_json::from_value::<EvalResult>(state["base"].clone())?,
        ),
        // Every data-parallel peer takes part in the evaluations (each its share of the
        // prompts); the leader says and writes what they found.
        None => {
            let leader = trainer.peer.is_leader();
            let cache = base_folder
                .as_deref()
                .filter(|_| config.warmup.is_some())
                .map(|export| BaseEvalCache::beside_warmup(export, &config, trainer.peer.world()));
            let (base, scalars) = match cache.as_ref().and_then(BaseEvalCache::read) {
                Some(cached) => {
                    leader_println!(
                        "the base model's evaluation: from {} (same warm-up, same settings)",
                        cache
                            .as_ref()
                            .map_or(String::new(), |c| c.path.display().to_string())
                    );
                    cached
                }
                None => {
                    leader_println!(
                        "evaluating the base model on {} held-out prompts",
                        eval_items.len()
                    );
                    let base = evaluate_now(&trainer)?;
                    let mut scalars = eval_scalars("eval_", &base);
                    // The base on dev too, so that settings are compared with it there.
                    if !dev_items.is_empty() {
                        scalars.extend(eval_scalars("dev_", &evaluate_on(&trainer, &dev_items)?));
                    }
                    if let Some(cache) = cache.as_ref().filter(|_| leader) {
                        cache.write(&base, &scalars)?;
                    }
                    (base, scalars)
                }
            };
            if leader {
                let refs: Vec<(&str, f64)> =
                    scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                trainer.metrics.log(0, &refs)?;
                println!("base: {base:?}");
            }
            (EpochSampler::new(train_items.len(), seed), base)
        }
    };
    let pad_id = tokenizer.pad_id();
    let sampling = &config.sampling;
    let peer = trainer.peer.clone();

    while !trainer.is_done() {
        let mut scalars = Vec::new();
        if pending.is_empty() {
            let rollout = rollout(
                &trainer,
                &mut prompts,
                (&train_items, &references),
                &tokenizer,
                verifier.as_ref(),
                &stop_tokens,
                &config,
            )?;
            scalars = rollout.scalars;
            pending = mini_batches_for_updates(
                &trainer,
                rollout.responses,
                rollout.anyone_kept,
                sampling.updates_per_rollout,
                seed ^ trainer.step,
            )?;
        }
        // 5. One update: token-mean NLL over the responses of this mini-batch (of all peers).
        match pending.pop_front() {
            None => trainer.skip_step(), // no peer kept a response
            Some(responses) => {
                let rows: Vec<TokenRow> = responses
                    .iter()
                    .map(|(prompt, response)| response_row(prompt, response))
                    .collect();
                let micro_batches: Vec<TokenBatch> = rows
                    .chunks(config.train.batch_size.max(1))
                    .flat_map(|chunk| {
                        trainer.token_batches(&chunk.iter().collect::<Vec<_>>(), pad_id)
                    })
                    .collect();
                let stats = trainer.train_step(&micro_batches)?;
                scalars.extend(stats.scalars());
            }
        }
        let eval_numbers;
        if trainer.should_evaluate() {
            let result = evaluate_on(&trainer, periodic_items)?;
            let prefix = if dev_items.is_empty() {
                "eval_"
            } else {
                "dev_"
            };
            eval_numbers = eval_scalars(prefix, &result);
            scalars.extend(eval_numbers.iter().map(|(k, v)| (k.as_str(), *v)));
        }
        trainer.log(&scalars)?;
        let state = || json!({ "prompts": prompts.state, "base": base, "pending": pending });
        if trainer.end_of_step(state)? == Next::Stop {
            return Ok(());
        }
    }

    trainer.finish();
    let trained = evaluate_now(&trainer)?;
    if peer.is_leader() {
        write_summary(&base, &trained, eval_items.len(), &config)?;
    }
    trainer.export_latest(&config.run.dir.join("final"))
}

/// A kept response: its prompt's tokens and its own.
type Response = (Vec<u32>, Vec<u32>);

/// What one rollout gives: this peer's kept responses, the rollout's metrics over all peers,
/// and whether any peer kept a response.
struct Rollout {
    responses: Vec<Response>,
    scalars: Vec<(&'static str, f64)>,
    anyone_kept: bool,
}

/// Steps 1-4 of the algorithm for one rollout: a batch of prompts, n samples each from the
/// current model (with peers: the same global batch everywhere, each peer sampling its own
/// share of the prompts), scored, the correct ones kept.
fn rollout<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    prompts: &mut EpochSampler,
    (train_items, references): (&[TaskItem], &[Vec<u32>]),
    tokenizer: &TextTokenizer,
    verifier: &dyn Verifier,
    stop_tokens: &[u32],
    config: &OnPolicyConfig,
) -> Result<Rollout> {
    let sampling = &config.sampling;
    let peer = trainer.peer.clone();
    let picked = prompts.next_indices(sampling.prompts_per_step);
    let picked = trainer::distributed::shard(&peer, &picked)
        .context("sampling.prompts_per_step must be a multiple of the peer count")?;
    if sampling.source == SampleSource::ConciseReferences {
        // The offline control: each prompt's reference solution, no sampling.
        let responses: Vec<Response> = picked
            .iter()
            .map(|&i| (train_items[i].tokens.clone(), references[i].clone()))
            .collect();
        let length: usize = responses.iter().map(|(_, r)| r.len()).sum();
        let totals = trainer.sum_over_peers(&[responses.len() as f64, length as f64])?;
        return Ok(Rollout {
            responses,
            scalars: vec![("reference_mean_length", totals[1] / totals[0].max(1.0))],
            anyone_kept: totals[0] > 0.0,
        });
    }
    let batch: Vec<&TaskItem> = picked
        .iter()
        .flat_map(|&i| std::iter::repeat_n(&train_items[i], sampling.samples_per_prompt))
        .collect();
    let generation = GenerationConfig {
        max_new_tokens: sampling.max_response_tokens,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
        },
        seed: config
            .run
            .seed
            .wrapping_add(trainer.step.wrapping_mul(1_000_003))
            .wrapping_add((peer.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        stop_tokens: stop_tokens.to_vec(),
        pad_id: tokenizer.pad_id(),
    };
    // 3. Score: correct and finished inside the cap.
    let samples = sample_and_score(
        &trainer.eval_model(),
        tokenizer,
        verifier,
        &batch,
        &generation,
        batch.len(),
        None,
    )?;

    // 4. Keep the correct ones; prompts with none drop out.
    let lengths: Vec<usize> = samples.tokens.iter().map(Vec::len).collect();
    let kept = kept_indices(
        &samples.scores,
        &lengths,
        sampling.samples_per_prompt,
        sampling.keep_shortest,
    );
    let prompts_kept: std::collections::BTreeSet<usize> = kept
        .iter()
        .map(|i| i / sampling.samples_per_prompt)
        .collect();
    let responses: Vec<Response> = kept
        .iter()
        .map(|&i| (batch[i].tokens.clone(), samples.tokens[i].clone()))
        .collect();

    let generated_tokens: usize = samples.tokens.iter().map(Vec::len).sum();
    let totals = trainer.sum_over_peers(&[
        samples.scores.iter().map(|&s| s as f64).sum(),
        batch.len() as f64,
        responses.len() as f64,
        prompts_kept.len() as f64,
        picked.len() as f64,
        generated_tokens as f64,
        samples.finished.iter().filter(|&&f| !f).count() as f64,
        samples.seconds,
    ])?;
    let &[correct, sampled, kept, prompts_kept, prompts_sampled, generated, truncated, seconds] =
        totals.as_slice()
    else {
        unreachable!("eight sums in, eight out")
    };
    let scalars = vec![
        ("sample_accuracy", correct / sampled),
        ("kept_share", kept / sampled),
        ("prompts_kept_share", prompts_kept / prompts_sampled),
        ("sample_mean_length", generated / sampled),
        ("sample_truncated_share", truncated / sampled),
        // Peers sample side by side: tokens of all of them over one peer's time.
        (
            "sampling_tokens_per_s",
            generated / (seconds / peer.world() as f64),
        ),
    ];
    Ok(Rollout {
        responses,
        scalars,
        anyone_kept: kept > 0.0,
    })
}

/// A rollout's kept responses, shuffled and split into `updates` mini-batches of near-equal
/// size: fewer when a peer kept fewer responses than that (all peers take the same number
/// of updates), none when no peer kept any.
fn mini_batches_for_updates<B: AutodiffBackend>(
    trainer: &Trainer<B>,
    mut responses: Vec<Response>,
    anyone_kept: bool,
    updates: usize,
    seed: u64,
) -> Result<VecDeque<Vec<Response>>> {
    if !anyone_kept {
        return Ok(VecDeque::new());
    }
    if updates <= 1 {
        return Ok(VecDeque::from([responses]));
    }
    // Peers with fewer than n responses, for n = 1..=updates: the most updates every peer
    // can fill is the largest n no peer falls short of (at least one).
    let short: Vec<f64> = (1..=updates)
        .map(|n| (responses.len() < n) as u8 as f64)
        .collect();
    let short = trainer.sum_over_peers(&short)?;
    let updates = (1..=updates)
        .take_while(|&n| short[n - 1] == 0.0)
        .last()
        .unwrap_or(1);
    responses.shuffle(&mut StdRng::seed_from_u64(seed));
    let total = responses.len();
    let mut rest = responses.into_iter();
    Ok((0..updates)
        .map(|i| {
            let size = (i + 1) * total / updates - i * total / updates;
            rest.by_ref().take(size).collect()
        })
        .collect())
}

/// Prints the base-versus-trained table and saves it as RUN/summary.md and summary.json.
fn write_summary(
    base: &EvalResult,
    trained: &EvalResult,
    eval_prompts: usize,
    config: &OnPolicyConfig,
) -> Result<()> {
    let table = summary_table(
        base,
        trained,
        eval_prompts,
        config.eval.samples_per_prompt.max(1),
    );
    println!("{table}");
    let summary = json!({ "base": base, "trained": trained, "eval_prompts": eval_prompts });
    crate::common::write_summary(&config.run.dir, &table, &summary)
}

/// The base-versus-trained comparison printed at the end and saved as summary.md.
pub fn summary_table(
    base: &EvalResult,
    trained: &EvalResult,
    prompts: usize,
    samples_per_prompt: usize,
) -> String {
    let interval = |(low, high): (f64, f64)| format!("[{:.1}, {:.1}]", 100.0 * low, 100.0 * high);
    let row = |name: &str, r: &EvalResult| {
        format!(
            "| {name} | {:.1}% {} | {:.1}% {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1}% |\n",
            100.0 * r.greedy_accuracy,
            interval(r.greedy_accuracy_95),
            100.0 * r.sampled_accuracy,
            interval(r.sampled_accuracy_95),
            r.mean_length,
            r.p90_length,
            r.sampled_mean_length,
            r.sampled_p90_length,
            100.0 * r.truncated_share
        )
    };
    let change = 100.0 * (trained.mean_length / base.mean_length.max(1e-9) - 1.0);
    format!(
        "On {prompts} held-out test prompts (lengths in tokens; 95% intervals; avg@{samples_per_prompt}: \
         {samples_per_prompt} samples per prompt):\n\n\
         | model | greedy accuracy | sampled accuracy, avg@{samples_per_prompt} | greedy mean length | greedy p90 length | sampled mean length | sampled p90 length | greedy truncated |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n{}{}\nmean length {change:+.1}%, greedy accuracy {:+.1} points\n",
        row("base", base),
        row("on-policy SFT", trained),
        100.0 * (trained.greedy_accuracy - base.greedy_accuracy)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::final_score;

    #[test]
    fn the_base_evaluation_is_reused_only_with_the_same_settings() {
        let text = crate::builtin::config_text("onpolicy-sft/tiny").unwrap();
        let mut config: OnPolicyConfig = toml::from_str(text).unwrap();
        let dir = std::env::temp_dir().join(format!("base-eval-cache-{}", std::process::id()));
        let export = dir.join("warmup/final");
        std::fs::create_dir_all(&export).unwrap();
        let cache = BaseEvalCache::beside_warmup(&export, &config, 2);
        assert_eq!(cache.path, dir.join("warmup/base_eval.json"));
        assert!(cache.read().is_none(), "nothing written yet");

        let base = EvalResult {
            greedy_accuracy: 0.25,
            mean_length: 40.5,
            ..EvalResult::default()
        };
        let scalars = vec![("dev_greedy_accuracy".to_string(), 0.5)];
        cache.write(&base, &scalars).unwrap();
        assert_eq!(cache.read(), Some((base, scalars)));
        // Another evaluation budget, sampling temperature, peer count or seed: evaluated again.
        let stale = |config: &OnPolicyConfig, peers: usize| {
            BaseEvalCache::beside_warmup(&export, config, peers)
                .read()
                .is_none()
        };
        assert!(!stale(&config, 2));
        assert!(stale(&config, 1));
        config.eval.max_new_tokens += 1;
        assert!(stale(&config, 2));
        config.eval.max_new_tokens -= 1;
        config.sampling.temperature = 0.7;
        assert!(stale(&config, 2));
        config.sampling.temperature = 1.0;
        config.run.seed += 1;
        assert!(stale(&config, 2));
        // A corrupt file is not an error: evaluated again.
        std::fs::write(&cache.path, "{ not json").unwrap();
        assert!(cache.read().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_responses_score_zero_even_when_the_verifier_likes_them() {
        assert_eq!(final_score(1.0, true), 1.0);
        assert_eq!(final_score(1.0, false), 0.0);
        assert_eq!(final_score(0.0, true), 0.0);
    }

    #[test]
    fn keeps_correct_samples_and_drops_prompts_with_none() {
        // Three prompts x 3 samples: prompt 1 has no correct sample.
        let scores = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let lengths = [30, 5, 10, 4, 4, 4, 20, 12, 12];
        assert_eq!(kept_indices(&scores, &lengths, 3, 0), vec![0, 2, 7, 8]);
        // Shortest one per prompt (ties broken by order).
        assert_eq!(kept_indices(&scores, &lengths, 3, 1), vec![2, 7]);
        assert!(kept_indices(&[0.0; 6], &[1; 6], 3, 0).is_empty());
    }

    #[test]
    fn loss_falls_on_response_tokens_only() {
        let row = response_row(&[7, 8, 9], &[4, 5, 2]);
        let batch = TokenBatch::from_rows(&[&row], 0);
        // inputs 7 8 9 4 5 -> targets 8 9 4 5 2: only 4 5 2 (the response) are trained on.
        assert_eq!(batch.targets[0], vec![8, 9, 4, 5, 2]);
        assert_eq!(batch.target_mask[0], vec![false, false, true, true, true]);
    }

    #[test]
    fn held_out_prompts_never_repeat_training_ones() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/arithmetic-tokenizer");
        let tokenizer = TextTokenizer::from_folder(&assets).unwrap();
        let task = TaskSection {
            source: "arithmetic".into(),
            train_count: 3000,
            eval_count: 400,
            dev_count: 200,
            seed: 0,
            template: Template::Plain,
        };
        let splits = load_task(&task, &tokenizer).unwrap();
        let prompts = |items: &[TaskItem]| -> HashSet<String> {
            items.iter().map(|i| i.prompt.clone()).collect()
        };
        let (train, dev, test) = (
            prompts(&splits.train),
            prompts(&splits.dev),
            prompts(&splits.test),
        );
        assert_eq!((splits.dev.len(), splits.test.len()), (200, 400));
        assert_eq!(
            (dev.len(), test.len()),
            (200, 400),
            "no repeats within a split"
        );
        assert!(train.is_disjoint(&test) && train.is_disjoint(&dev) && dev.is_disjoint(&test));
        // The index ranges alone would have repeated training questions in the test split.
        let raw_repeats = (EVAL_OFFSET..EVAL_OFFSET + 400)
            .map(|i| plain_prompt(&task_problem(Task::Arithmetic, 0, i, Style::Concise).question))
            .filter(|p| train.contains(p))
            .count();
        assert!(raw_repeats > 0);
    }

    #[test]
    fn percentiles_and_summary() {
        assert_eq!(percentile(&[5, 1, 4, 2, 3, 6, 7, 8, 9, 10], 0.9), 9.0);
        let base = EvalResult {
            greedy_accuracy: 0.5,
            sampled_accuracy: 0.4,
            mean_length: 100.0,
            p90_length: 150.0,
            truncated_share: 0.0,
            ..EvalResult::default()
        };
        let trained = EvalResult {
            mean_length: 40.0,
            greedy_accuracy: 0.49,
            ..base
        };
        let table = summary_table(&base, &trained, 200, 4);
        assert!(
            table.contains("mean length -60.0%") && table.contains("-1.0 points"),
            "{table}"
        );
    }
}
