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
use crate::evaluate::{mean, percentile, sample_and_score, TaskItem};
use crate::sft::DataReport;
use crate::stages::{train_stage, SftStage, StageContext};
use crate::verify::{Verifier, VerifierConfig};
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::examples::{prompt_and_response, prompt_tokens};
use datasets::synthetic::{plain_prompt, task_pairs, task_problem, Style, Task};
use datasets::{EpochSampler, Template, TextTokenizer, TokenBatch, TokenRow};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use trainer::config::{ensure_count, ensure_non_negative, ensure_probability, Validate};
use trainer::generate::GenerationConfig;
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
    /// Held-out prompts for evaluation.
    pub eval_count: usize,
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
}

/// What evaluation measures on the held-out prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub greedy_accuracy: f64,
    pub sampled_accuracy: f64,
    pub mean_length: f64,
    pub p90_length: f64,
    pub truncated_share: f64,
}

/// Index ranges of the synthetic task: train, held-out and warm-up problems never overlap.
const EVAL_OFFSET: u64 = 1_000_000;
const WARMUP_OFFSET: u64 = 2_000_000;

fn load_task(
    task: &TaskSection,
    tokenizer: &TextTokenizer,
) -> Result<(Vec<TaskItem>, Vec<TaskItem>)> {
    let item = |prompt: String, answer: String| -> Result<TaskItem> {
        Ok(TaskItem {
            tokens: prompt_tokens(tokenizer, task.template, &prompt)?,
            prompt,
            answer,
        })
    };
    if let Some(built_in) = Task::parse(&task.source) {
        let make = |first: u64, count: usize| -> Result<Vec<TaskItem>> {
            (first..first + count as u64)
                .map(|i| {
                    let problem = task_problem(built_in, task.seed, i, Style::Concise);
                    item(plain_prompt(&problem.question), problem.answer.to_string())
                })
                .collect()
        };
        return Ok((
            make(0, task.train_count)?,
            make(EVAL_OFFSET, task.eval_count)?,
        ));
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
    if items.len() < task.train_count + task.eval_count {
        bail!(
            "{} has {} prompts; task.train_count + task.eval_count = {}",
            path.display(),
            items.len(),
            task.train_count + task.eval_count
        );
    }
    let eval = items.split_off(task.train_count);
    Ok((items, eval.into_iter().take(task.eval_count).collect()))
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

/// Greedy and sampled accuracy, response lengths (greedy) and the share cut by the budget.
fn evaluate<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    verifier: &dyn Verifier,
    items: &[TaskItem],
    config: &OnPolicyConfig,
    stop_tokens: &[u32],
) -> Result<EvalResult> {
    let prompts: Vec<&TaskItem> = items.iter().collect();
    let run = |sampling: SamplingParams, label: &str| {
        let generation = GenerationConfig {
            max_new_tokens: config.eval.max_new_tokens,
            sampling,
            seed: config.run.seed ^ 0xE7A1,
            stop_tokens: stop_tokens.to_vec(),
            pad_id: tokenizer.pad_id(),
        };
        sample_and_score(
            model,
            tokenizer,
            verifier,
            &prompts,
            &generation,
            config.eval.batch_size,
            Some(label),
        )
    };
    let greedy = run(SamplingParams::greedy(), "eval greedy")?;
    let sampled = run(
        SamplingParams {
            temperature: config.sampling.temperature,
            top_p: config.sampling.top_p,
        },
        "eval sampled",
    )?;
    let lengths: Vec<usize> = greedy.tokens.iter().map(Vec::len).collect();
    Ok(EvalResult {
        greedy_accuracy: mean(greedy.scores.iter().map(|&s| s as f64)),
        sampled_accuracy: mean(sampled.scores.iter().map(|&s| s as f64)),
        mean_length: mean(lengths.iter().map(|&l| l as f64)),
        p90_length: percentile(&lengths, 0.9),
        truncated_share: mean(greedy.finished.iter().map(|&f| (!f) as u8 as f64)),
    })
}

fn eval_scalars(prefix: &str, result: &EvalResult) -> Vec<(String, f64)> {
    vec![
        (format!("{prefix}greedy_accuracy"), result.greedy_accuracy),
        (format!("{prefix}sampled_accuracy"), result.sampled_accuracy),
        (format!("{prefix}mean_length"), result.mean_length),
        (format!("{prefix}p90_length"), result.p90_length),
        (format!("{prefix}truncated_share"), result.truncated_share),
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
    resolved: &toml::Table,
) -> Result<Option<PathBuf>> {
    // The built-in task's problems (the simple one when the prompts come from a file).
    let task = Task::parse(&config.task.source).unwrap_or(Task::Arithmetic);
    let pairs = task_pairs(
        task,
        config.task.seed,
        WARMUP_OFFSET,
        warmup.count,
        warmup.style,
    );
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
    let (model, base_folder) = match &config.warmup {
        Some(warmup) => match warm_up(
            loaded.model,
            &tokenizer,
            &tokenizer_dir,
            warmup,
            &config,
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
    let (train_items, eval_items) = load_task(&config.task, &tokenizer)?;
    let evaluate_now = |trainer: &Trainer<B>| {
        evaluate(
            &trainer.eval_model(),
            &tokenizer,
            verifier.as_ref(),
            &eval_items,
            &config,
            &stop_tokens,
        )
    };

    prepare_run_dir(&config.run.dir, resolved, &tokenizer_dir)?;
    let (mut trainer, saved) = Trainer::start(
        model,
        config.train.clone(),
        config.lora.clone(),
        seed,
        &config.run.dir,
        resume,
    )?;
    trainer.base_model = base_folder;
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
        // Data-parallel peers leave evaluation to the leader (the others wait for it at the
        // next step's all-reduce).
        None if !trainer.peer.is_leader() => (
            EpochSampler::new(train_items.len(), seed),
            EvalResult::default(),
        ),
        None => {
            println!(
                "evaluating the base model on {} held-out prompts",
                eval_items.len()
            );
            let base = evaluate_now(&trainer)?;
            let scalars = eval_scalars("eval_", &base);
            let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            trainer.metrics.log(0, &refs)?;
            println!("base: {base:?}");
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
                &train_items,
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
                    .map(|chunk| TokenBatch::from_rows(&chunk.iter().collect::<Vec<_>>(), pad_id))
                    .collect();
                let stats = trainer.train_step(&micro_batches)?;
                scalars.extend(stats.scalars());
            }
        }
        let eval_numbers;
        if trainer.should_evaluate() && peer.is_leader() {
            let result = evaluate_now(&trainer)?;
            eval_numbers = eval_scalars("eval_", &result);
            scalars.extend(eval_numbers.iter().map(|(k, v)| (k.as_str(), *v)));
        }
        trainer.log(&scalars)?;
        let state = || json!({ "prompts": prompts.state, "base": base, "pending": pending });
        if trainer.end_of_step(state)? == Next::Stop {
            return Ok(());
        }
    }

    trainer.finish();
    if peer.is_leader() {
        write_summary(&base, &evaluate_now(&trainer)?, eval_items.len(), &config)?;
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
    train_items: &[TaskItem],
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
    let table = summary_table(base, trained, eval_prompts);
    println!("{table}");
    let summary = json!({ "base": base, "trained": trained, "eval_prompts": eval_prompts });
    crate::common::write_summary(&config.run.dir, &table, &summary)
}

/// The base-versus-trained comparison printed at the end and saved as summary.md.
pub fn summary_table(base: &EvalResult, trained: &EvalResult, prompts: usize) -> String {
    let row = |name: &str, r: &EvalResult| {
        format!(
            "| {name} | {:.1}% | {:.1}% | {:.1} | {:.0} | {:.1}% |\n",
            100.0 * r.greedy_accuracy,
            100.0 * r.sampled_accuracy,
            r.mean_length,
            r.p90_length,
            100.0 * r.truncated_share
        )
    };
    let change = 100.0 * (trained.mean_length / base.mean_length.max(1e-9) - 1.0);
    format!(
        "On {prompts} held-out prompts (lengths in tokens, greedy):\n\n\
         | model | greedy accuracy | sampled accuracy | mean length | p90 length | truncated |\n\
         | --- | --- | --- | --- | --- | --- |\n{}{}\nmean length {change:+.1}%, greedy accuracy {:+.1} points\n",
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
    fn percentiles_and_summary() {
        assert_eq!(percentile(&[5, 1, 4, 2, 3, 6, 7, 8, 9, 10], 0.9), 9.0);
        let base = EvalResult {
            greedy_accuracy: 0.5,
            sampled_accuracy: 0.4,
            mean_length: 100.0,
            p90_length: 150.0,
            truncated_share: 0.0,
        };
        let trained = EvalResult {
            mean_length: 40.0,
            greedy_accuracy: 0.49,
            ..base
        };
        let table = summary_table(&base, &trained, 200);
        assert!(
            table.contains("mean length -60.0%") && table.contains("-1.0 points"),
            "{table}"
        );
    }
}
