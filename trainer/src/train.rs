//! The training loop every recipe shares: token-level loss on selected tokens, gradient
//! accumulation, global-norm clipping, AdamW on a step-determined schedule, evaluation,
//! checkpoints with exact resume, and a clean stop on SIGINT/SIGTERM.
//!
//! A recipe owns its data and calls [`Trainer::train_step`] with the micro-batches of one
//! update, then [`Trainer::end_of_step`] with its own resumable state (a data cursor).

use crate::config::{ensure, ensure_count, ensure_non_negative, ensure_positive, key, Validate};
use crate::distributed::{self, current_peer, Peer};
use crate::lora::{self, FrozenBase, LoraConfig};
use crate::loss::token_nll_sum;
use crate::metrics::MetricsLog;
use crate::model::llama::CausalLm;
use crate::optim::{AdamW, AdamWConfig, Gradients};
use crate::progress::Progress;
use crate::schedule::{Decay, Schedule};
use crate::trackers::{TrackerStart, Trackers};
use crate::wandb::WandbConfig;
use crate::weights::{self, named_tensors};
use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use checkpoints::run_checkpoints::{
    open_checkpoint, Checkpoint, CheckpointContents, CheckpointDir,
};
use checkpoints::{hf_folder, StoreDtype};
use datasets::TokenBatch;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

fn one() -> usize {
    1
}
fn cosine() -> Decay {
    Decay::Cosine
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn adam_eps() -> f64 {
    1e-8
}
fn three() -> usize {
    3
}
fn ten() -> u64 {
    10
}
fn default_divergence_factor() -> f64 {
    100.0
}

/// What one more micro-batch costs beyond its tokens, in tokens, when `split_by_length`
/// splits a batch (the on-policy warm-up on CPU ran fastest at 128 of 32-256, 2026-11-27).
const SPLIT_BATCH_COST: usize = 128;

/// The `[train]` table of every recipe config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates in the run.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update; the loss is the token mean over all of them.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Draw each micro-batch's rows of similar length (as `transformers`' `group_by_length`),
    /// so that little of it is padding; honoured by the recipes that sample rows of a data set.
    #[serde(default)]
    pub group_by_length: bool,
    /// Split each peer's micro-batch into batches of rows of similar length, each padded only
    /// to its own longest row: the same rows and the same token-mean loss, less padding to
    /// compute (the gradients differ from one batch's in rounding only). Honoured by the
    /// recipes whose loss is a sum over tokens (SFT and its stages, on-policy SFT).
    #[serde(default)]
    pub split_by_length: bool,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "cosine")]
    pub decay: Decay,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "betas")]
    pub betas: [f64; 2],
    #[serde(default = "adam_eps")]
    pub eps: f64,
    /// Global gradient norm clip; 0 turns it off.
    #[serde(default)]
    pub max_grad_norm: f64,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    #[serde(default = "three")]
    pub keep_last: usize,
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Parameter name patterns (`*` matches anything) that stay frozen.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// When not empty, only parameters matching one of these patterns train.
    #[serde(default)]
    pub train_only: Vec<String>,
    /// A step whose loss or gradient norm exceeds this many times its running median (over
    /// the last 50 steps) stops the run as diverged, before the update; 0 turns it off.
    #[serde(default = "default_divergence_factor")]
    pub divergence_factor: f64,
    /// Stream metrics to Weights & Biases (`[train.wandb]`).
    #[serde(default)]
    pub wandb: Option<WandbConfig>,
    /// Write TensorBoard event files to RUN/tensorboard (offline; on by default).
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

fn default_true() -> bool {
    true
}

impl Validate for TrainConfig {
    fn validate(&self, prefix: &str) -> Result<()> {
        let k = |field: &str| key(prefix, field);
        ensure_count(&k("steps"), self.steps)?;
        ensure_count(&k("batch_size"), self.batch_size as u64)?;
        ensure_count(&k("grad_accum"), self.grad_accum as u64)?;
        ensure_positive(&k("lr"), self.lr)?;
        ensure_non_negative(&k("min_lr"), self.min_lr)?;
        ensure(
            self.min_lr <= self.lr,
            &k("min_lr"),
            self.min_lr,
            "at most train.lr",
        )?;
        ensure_non_negative(&k("weight_decay"), self.weight_decay)?;
        for (i, beta) in self.betas.iter().enumerate() {
            ensure(
                (0.0..1.0).contains(beta),
                &format!("{}[{i}]", k("betas")),
                beta,
                "in [0, 1)",
            )?;
        }
        ensure_positive(&k("eps"), self.eps)?;
        ensure_non_negative(&k("max_grad_norm"), self.max_grad_norm)?;
        ensure_count(&k("keep_last"), self.keep_last as u64)?;
        ensure_count(&k("log_every"), self.log_every)?;
        ensure_non_negative(&k("divergence_factor"), self.divergence_factor)?;
        ensure(
            self.divergence_factor == 0.0 || self.divergence_factor > 1.0,
            &k("divergence_factor"),
            self.divergence_factor,
            "0 (off) or greater than 1",
        )?;
        if let Some(wandb) = &self.wandb {
            ensure_non_negative(&k("wandb.flush_timeout_s"), wandb.flush_timeout_s)?;
        }
        Ok(())
    }
}

impl TrainConfig {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            decay: self.decay,
        }
    }
}

pub use crate::config::glob_match;
pub use crate::run_dir::Resume;

/// The run's resolved config (config.toml) as JSON, for the W&B run's config.
fn resolved_config(run_dir: &Path) -> Value {
    std::fs::read_to_string(run_dir.join("config.toml"))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| serde_json::to_value(table).ok())
        .unwrap_or(Value::Null)
}

/// Whether parameter `name` trains: with LoRA only what the adapter trains (its own
/// parameters and `modules_to_save`); `freeze` patterns never do.
fn is_trainable(config: &TrainConfig, lora: Option<&LoraConfig>, name: &str) -> bool {
    let candidate = lora.is_none_or(|lora| lora.trains(name));
    let selected = config.train_only.is_empty()
        || config
            .train_only
            .iter()
            .any(|pattern| glob_match(pattern, name));
    candidate
        && selected
        && !config
            .freeze
            .iter()
            .any(|pattern| glob_match(pattern, name))
}

/// Sets which parameters train: `trainable(name)` decides, the rest get no gradient.
pub fn set_trainable<B: AutodiffBackend, M: Module<B>>(
    module: M,
    trainable: &dyn Fn(&str) -> bool,
) -> M {
    struct Freeze<'a> {
        path: Vec<String>,
        trainable: &'a dyn Fn(&str) -> bool,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Freeze<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.set_require_grad((self.trainable)(&self.path.join(".")))
        }
    }
    module.map(&mut Freeze {
        path: vec![],
        trainable,
    })
}

/// What the trainer trains: any Burn module that can say what it is (its config, stored
/// with every checkpoint) and where it lives. `CausalLm` is one; a recipe's own module (an
/// encoder and a head around a language model, say) is another. LoRA adapters attach to the
/// language model inside, where there is one.
pub trait Trainable<B: AutodiffBackend>: AutodiffModule<B> + Clone {
    /// The module's own config, stored with each checkpoint.
    fn config_json(&self) -> Value;
    fn device(&self) -> B::Device;
    /// The module with LoRA adapters on its language model's linears (`lora::attach`).
    fn attach_lora(self, _config: &LoraConfig, _seed: u64) -> Result<Self> {
        bail!("this module has no language model to put LoRA adapters on")
    }
}

impl<B: AutodiffBackend> Trainable<B> for CausalLm<B> {
    fn config_json(&self) -> Value {
        self.config.to_json()
    }

    fn device(&self) -> B::Device {
        CausalLm::device(self)
    }

    fn attach_lora(self, config: &LoraConfig, seed: u64) -> Result<Self> {
        lora::attach(self, config, seed)
    }
}

/// What the trainer needs to know of a micro-batch of any kind.
pub trait MicroBatch {
    /// What the step's loss is a mean over (target tokens, predicted values): summed over a
    /// step's micro-batches (and peers), it is the divisor every objective uses.
    fn num_targets(&self) -> usize;
    /// Input elements, for the throughput figures.
    fn num_inputs(&self) -> usize;
}

impl MicroBatch for TokenBatch {
    fn num_targets(&self) -> usize {
        TokenBatch::num_targets(self)
    }

    fn num_inputs(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }
}

/// One batch on the device.
pub struct DeviceBatch<B: Backend> {
    pub tokens: Tensor<B, 2, Int>,
    pub positions: Tensor<B, 2, Int>,
    pub allowed: Tensor<B, 4, Bool>,
    pub targets: Tensor<B, 2, Int>,
    pub selected: Tensor<B, 2>,
    /// 1 for real tokens, 0 for padding, `[batch, seq]`.
    pub valid: Tensor<B, 2>,
    pub num_targets: usize,
}

impl<B: Backend> DeviceBatch<B> {
    /// Attention stays inside a segment (padding is segment 0 and sees nothing).
    pub fn new(batch: &TokenBatch, device: &B::Device) -> Self {
        let (rows, width) = (batch.inputs.len(), batch.width());
        let mut allowed = Vec::with_capacity(rows * width * width);
        for segment in &batch.segment {
            for i in 0..width {
                allowed.extend(
                    (0..width).map(|j| j <= i && segment[j] != 0 && segment[j] == segment[i]),
                );
            }
        }
        let selected: Vec<f32> = batch
            .target_mask
            .iter()
            .flatten()
            .map(|&m| m as i32 as f32)
            .collect();
        let valid: Vec<f32> = batch
            .segment
            .iter()
            .flatten()
            .map(|&s| (s != 0) as i32 as f32)
            .collect();
        Self {
            valid: Tensor::from_data(TensorData::new(valid, [rows, width]), device),
            tokens: crate::model::mask::token_tensor(&batch.inputs, device),
            positions: crate::model::mask::int_tensor(&batch.positions, device),
            allowed: Tensor::from_data(TensorData::new(allowed, [rows, 1, width, width]), device),
            targets: crate::model::mask::token_tensor(&batch.targets, device),
            selected: Tensor::from_data(TensorData::new(selected, [rows, width]), device),
            num_targets: batch.num_targets(),
        }
    }
}

/// Mean loss per target token of batches under the current model (no gradients).
pub fn evaluate_loss<B: Backend>(model: &CausalLm<B>, batches: &[TokenBatch]) -> f64 {
    let rows = row_losses(model, batches);
    let total: f64 = rows.iter().map(|(nll, _)| nll).sum();
    let count: usize = rows.iter().map(|(_, count)| count).sum();
    total / count.max(1) as f64
}

/// Each row's summed `-log p(target)` over its target tokens, and how many there are (for
/// per-record statistics such as a perplexity interval).
pub fn row_losses<B: Backend>(model: &CausalLm<B>, batches: &[TokenBatch]) -> Vec<(f64, usize)> {
    let device = model.device();
    let mut rows = Vec::new();
    for batch in batches {
        let counts = batch
            .target_mask
            .iter()
            .map(|m| m.iter().filter(|&&t| t).count());
        let batch = DeviceBatch::<B>::new(batch, &device);
        let logits = model.forward(batch.tokens, batch.positions, batch.allowed);
        let sums = (crate::loss::token_nll(logits, batch.targets) * batch.selected).sum_dim(1);
        let sums: Vec<f32> = sums.into_data().to_vec().expect("f32 sums");
        rows.extend(sums.into_iter().map(f64::from).zip(counts));
    }
    rows
}

fn input_elements<Batch: MicroBatch>(micro_batches: &[Batch]) -> usize {
    micro_batches.iter().map(MicroBatch::num_inputs).sum()
}

/// SHA-256 over every parameter's name and f32 bytes, in name order.
pub fn weights_fingerprint<B: Backend, M: Module<B>>(model: &M) -> String {
    weights::fingerprint_where(model, &|_| true)
}

/// Where a micro-batch sits in its step, so an objective can scale its loss: the losses of
/// a step's micro-batches must add up to the step's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroBatchShare {
    pub index: usize,
    /// Micro-batches per step on each peer.
    pub count: usize,
    /// Data-parallel peers, each with `count` micro-batches.
    pub peers: usize,
    /// Target tokens over all micro-batches of the step.
    pub total_targets: usize,
}

/// The loss a training step minimises, for one micro-batch of tokens on the device.
pub type Objective<'a, B> =
    dyn Fn(&CausalLm<B>, DeviceBatch<B>, MicroBatchShare) -> Tensor<B, 1> + 'a;

/// The loss of any module on one micro-batch of any kind.
pub type ModuleObjective<'a, B, M, Batch> =
    dyn Fn(&M, &Batch, MicroBatchShare) -> Tensor<B, 1> + 'a;

/// Next-token cross-entropy, the token mean over the whole step.
pub fn next_token_objective<B: Backend>(
    model: &CausalLm<B>,
    batch: DeviceBatch<B>,
    share: MicroBatchShare,
) -> Tensor<B, 1> {
    let logits = model.forward(batch.tokens, batch.positions, batch.allowed);
    token_nll_sum(logits, batch.targets, batch.selected).div_scalar(share.total_targets as f64)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    pub seconds: f64,
}

impl StepStats {
    /// The numbers every recipe logs for a step: loss, learning rate, gradient norm and
    /// training throughput.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("train_tokens_per_s", self.tokens as f64 / self.seconds),
        ]
    }
}

/// What a recipe does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// SIGINT or SIGTERM arrived: a checkpoint was saved; return without more work.
    Stop,
}

/// Raised flag on SIGINT/SIGTERM; the loop saves and stops at the next step boundary.
pub fn stop_requested() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        // Fails only if another handler is installed (tests in one process): harmless.
        let _ = ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

/// The model, its optimizer and the run directory, advanced one update at a time. The model
/// is a `CausalLm` unless a recipe trains a module of its own (see [`Trainable`]).
pub struct Trainer<B: AutodiffBackend, M: Trainable<B> = CausalLm<B>> {
    pub model: M,
    pub optimizer: AdamW<B::InnerBackend>,
    pub config: TrainConfig,
    pub lora: Option<LoraConfig>,
    /// Updates completed.
    pub step: u64,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub checkpoints: CheckpointDir,
    pub metrics: MetricsLog,
    pub progress: Progress,
    trackers: Trackers,
    stop: Arc<AtomicBool>,
    /// This trainer's place in a data-parallel run (one peer by default).
    pub peer: Peer,
    /// Whether any peer asked to stop, as agreed in the last step's all-reduce (peers must
    /// stop at the same step, or the others would wait forever).
    stop_vote: std::cell::Cell<bool>,
    /// Input tokens of the last step over all peers.
    step_tokens: std::cell::Cell<usize>,
    /// Id of the fresh start this run descends from (kept by resumes); pruning and export
    /// only consider checkpoints of this lineage.
    pub lineage: String,
    /// The checkpoint this process saved last.
    last_saved: Option<Checkpoint>,
    /// The Hugging Face folder the trained model was loaded from, if any: exported PEFT
    /// adapters name it as their base (set by the recipe after `start`).
    pub base_model: Option<PathBuf>,
    /// Fingerprint of a LoRA run's frozen weights (computed once).
    frozen_sha256: Option<String>,
    divergence: DivergenceWatch,
}

/// A lineage id: unique per fresh start.
fn new_lineage() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{}", std::process::id())
}

/// Recent losses and gradient norms, to tell an exploding step from a noisy one.
#[derive(Default)]
struct DivergenceWatch {
    losses: std::collections::VecDeque<f64>,
    grad_norms: std::collections::VecDeque<f64>,
}

/// Steps of history the running median is taken over, and how many it needs first.
const DIVERGENCE_WINDOW: usize = 50;
const DIVERGENCE_MIN_HISTORY: usize = 10;

impl DivergenceWatch {
    /// The history kept in metrics.jsonl (already cut back to the checkpoint on resume).
    fn from_metrics(path: &Path) -> Self {
        let mut watch = Self::default();
        for line in crate::metrics::read_metrics(path).unwrap_or_default() {
            if let (Some(loss), Some(norm)) = (line["loss"].as_f64(), line["grad_norm"].as_f64()) {
                watch.push(loss, norm);
            }
        }
        watch
    }

    fn push(&mut self, loss: f64, grad_norm: f64) {
        for (history, value) in [(&mut self.losses, loss), (&mut self.grad_norms, grad_norm)] {
            history.push_back(value);
            if history.len() > DIVERGENCE_WINDOW {
                history.pop_front();
            }
        }
    }

    /// Why this step's numbers say the run diverged, if they do: over `factor` times the
    /// running median.
    fn exploded(&self, loss: f64, grad_norm: f64, factor: f64) -> Option<String> {
        if factor <= 0.0 || self.losses.len() < DIVERGENCE_MIN_HISTORY {
            return None;
        }
        let median = |history: &std::collections::VecDeque<f64>| {
            let mut sorted: Vec<f64> = history.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        };
        let (typical_loss, typical_norm) = (median(&self.losses), median(&self.grad_norms));
        if loss > factor * typical_loss.max(1e-3) {
            return Some(format!(
                "loss {loss:.4} is over {factor} times its running median {typical_loss:.4}"
            ));
        }
        if grad_norm > factor * typical_norm.max(1e-3) {
            return Some(format!(
                "gradient norm {grad_norm:.4} is over {factor} times its running median {typical_norm:.4}"
            ));
        }
        None
    }
}

impl<B: AutodiffBackend, M: Trainable<B>> Trainer<B, M> {
    /// Prepares a run: attaches LoRA when configured, freezes what must not train, and
    /// resumes from a checkpoint when asked. Returns the trainer and the recipe state that
    /// was saved with the checkpoint (`None` on a fresh start).
    pub fn start(
        model: M,
        config: TrainConfig,
        lora: Option<LoraConfig>,
        seed: u64,
        run_dir: &Path,
        resume: &Resume,
    ) -> Result<(Self, Option<Value>)> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
        let model = match &lora {
            Some(lora_config) => model.attach_lora(lora_config, seed)?,
            None => model,
        };
        let model = set_trainable(model, &|name: &str| {
            is_trainable(&config, lora.as_ref(), name)
        });
        let checkpoints = CheckpointDir::new(run_dir);
        let peer = current_peer();
        if peer.is_leader() {
            checkpoints.clean_leftovers()?;
        }
        let checkpoint = match resume {
            Resume::No => None,
            Resume::Auto => {
                let found = checkpoints.latest_valid(|warning| eprintln!("warning: {warning}"))?;
                if found.is_none() {
                    crate::leader_println!(
                        "no checkpoint in {}: starting fresh",
                        checkpoints.root.display()
                    );
                }
                found
            }
            Resume::From(path) => {
                let checkpoint = open_checkpoint(path)?;
                if peer.is_leader() {
                    // This run writes its own history from that step on; newer checkpoints
                    // of the folder would outrank it in `--resume auto` and in pruning.
                    for moved in checkpoints.supersede_after(checkpoint.step)? {
                        println!(
                            "resuming from step {}: moved the newer checkpoint to {}",
                            checkpoint.step,
                            moved.display()
                        );
                    }
                }
                Some(checkpoint)
            }
        };
        let lineage = checkpoint
            .as_ref()
            .and_then(Checkpoint::lineage)
            .unwrap_or_else(new_lineage);
        let adam = AdamWConfig {
            beta1: config.betas[0],
            beta2: config.betas[1],
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        let run_name = run_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "run".into());
        if peer.is_distributed() {
            distributed::register::<B::InnerBackend>(&peer, &model.device())?;
        }
        // Non-leading peers keep their own metrics under RUN/peers/N and stay quiet.
        let metrics_dir = if peer.is_leader() {
            run_dir.to_path_buf()
        } else {
            run_dir.join("peers").join(peer.rank().to_string())
        };
        std::fs::create_dir_all(&metrics_dir)
            .with_context(|| format!("cannot create {}", metrics_dir.display()))?;
        let mut trainer = Self {
            model,
            optimizer: AdamW::new(adam),
            progress: Progress::silent(&run_name, config.steps),
            config,
            lora,
            step: 0,
            seed,
            run_dir: run_dir.to_path_buf(),
            checkpoints,
            metrics: MetricsLog::open(&metrics_dir, checkpoint.as_ref().map(|c| c.step))?,
            trackers: Trackers::default(),
            lineage,
            last_saved: None,
            base_model: None,
            frozen_sha256: None,
            divergence: DivergenceWatch::default(),
            stop: stop_requested(),
            peer,
            stop_vote: std::cell::Cell::new(false),
            step_tokens: std::cell::Cell::new(0),
        };
        let recipe_state = match checkpoint {
            Some(checkpoint) => Some(trainer.restore(&checkpoint)?),
            None => None,
        };
        if trainer.peer.is_distributed() {
            trainer.check_peers_start_alike()?;
        }
        if trainer.peer.is_leader() {
            // The run is known to start: its resolved config may now replace the old record.
            crate::run_dir::commit_config(run_dir)?;
            let backlog = crate::metrics::read_metrics(&trainer.metrics.path)?
                .into_iter()
                .filter_map(|line| line.as_object().cloned())
                .filter(|line| line.get("step").and_then(Value::as_u64).unwrap_or(0) > 0)
                .collect();
            let start = TrackerStart {
                run_dir,
                run_name: &run_name,
                resolved_config: &resolved_config(run_dir),
                backlog,
                // Also without a checkpoint: a run killed before its first one has sent
                // steps that its fresh start recomputes.
                resuming: *resume != Resume::No,
            };
            trainer.trackers = Trackers::start(
                trainer.config.tensorboard,
                trainer.config.wandb.as_ref(),
                start,
            )?;
        }
        trainer.divergence = DivergenceWatch::from_metrics(&trainer.metrics.path);
        trainer.progress = if trainer.peer.is_leader() {
            Progress::new(
                &run_name,
                trainer.config.steps,
                trainer.step,
                trainer.config.log_every,
            )
        } else {
            Progress::silent(&run_name, trainer.config.steps)
        };
        Ok((trainer, recipe_state))
    }

    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<Value> {
        let state = checkpoint.state()?;
        let source = checkpoint.tensors("model")?;
        let model = self.model.clone();
        let loaded = if let Some(lora) = self
            .lora
            .clone()
            .filter(|_| state["model_tensors"] == "adapters")
        {
            // The frozen base is the model the recipe built: check it is the one trained on.
            let base: FrozenBase = serde_json::from_value(state["base"].clone())
                .context("state.json: `base` missing or malformed")?;
            let sha256 = weights::fingerprint_where(&model, &|name| !lora.trains(name));
            if sha256 != base.sha256 {
                bail!(
                    "checkpoint {} holds LoRA adapters trained on another base model than this run \
                     loaded ({}): its frozen weights differ",
                    checkpoint.dir.display(),
                    base.describe()
                );
            }
            self.frozen_sha256 = Some(sha256);
            weights::load_from_source_where(model, &source, &|name| lora.trains(name))
        } else {
            weights::load_from_source(model, &source)
        };
        let (model, unused) =
            loaded.with_context(|| format!("restoring {}", checkpoint.dir.display()))?;
        if !unused.is_empty() {
            bail!(
                "checkpoint {} holds tensors this run lacks: {}",
                checkpoint.dir.display(),
                unused.join(", ")
            );
        }
        // Loaded parameters come back trainable: apply the freezing again.
        self.model = set_trainable(model, &|name: &str| {
            is_trainable(&self.config, self.lora.as_ref(), name)
        });
        let optimizer_steps = state["optimizer_steps"]
            .as_u64()
            .context("state.json: `optimizer_steps` missing")?;
        let device = self.model.device();
        self.optimizer
            .load_state(&checkpoint.tensors("optimizer")?, optimizer_steps, &device)?;
        self.step = checkpoint.step;
        let saved_peers = state["peers"].as_u64().unwrap_or(1) as usize;
        if saved_peers != self.peer.world() && self.peer.is_leader() {
            let per_peer = self.config.batch_size * self.config.grad_accum;
            println!(
                "note: the checkpoint was written by a run of {saved_peers} peer(s) and this run has {}: \
                 the global batch changes from {} to {} sequences per step ({per_peer} per peer); \
                 the step count, learning-rate schedule and data order carry on",
                self.peer.world(),
                per_peer * saved_peers,
                per_peer * self.peer.world()
            );
        }
        crate::leader_println!(
            "resumed from {} (step {})",
            checkpoint.dir.display(),
            checkpoint.step
        );
        Ok(state["recipe"].clone())
    }

    /// Every peer must start from the same step and weights. Across machines each node reads
    /// its own run folder, and a node that lacks the checkpoint would otherwise train from
    /// scratch beside the others.
    fn check_peers_start_alike(&self) -> Result<()> {
        let device = self.model.device();
        let fingerprint = weights_fingerprint(&self.model);
        // 24 bits of the hash: exact in an f32.
        let short_print = u32::from_str_radix(&fingerprint[..6], 16)? as f32;
        let gather =
            |value: f32| distributed::gather_scalar::<B::InnerBackend>(&self.peer, value, &device);
        let (steps, prints) = (gather(self.step as f32)?, gather(short_print)?);
        let alike = |values: &[f32]| values.iter().all(|v| *v == values[0]);
        if !alike(&steps) || !alike(&prints) {
            let starts: Vec<String> = steps
                .iter()
                .zip(&prints)
                .enumerate()
                .map(|(rank, (step, print))| {
                    format!("peer {rank}: step {step}, weights {:06x}", *print as u32)
                })
                .collect();
            bail!(
                "the peers start from different states ({}): every node must resume from the \
                 same checkpoint; share the run folder, or copy RUN/checkpoints to every node",
                starts.join("; ")
            );
        }
        Ok(())
    }

    /// The next step's micro-batches of `rows`: the sampler draws the global batch (the same
    /// on every peer) and this peer keeps its contiguous shard of each micro-batch.
    pub fn next_micro_batches(
        &self,
        sampler: &mut datasets::EpochSampler,
        rows: &[datasets::TokenRow],
        pad_id: u32,
    ) -> Result<Vec<TokenBatch>> {
        Ok(self
            .next_micro_batch_indices(sampler)?
            .into_iter()
            .flat_map(|indices| {
                let picked: Vec<&datasets::TokenRow> = indices.iter().map(|&i| &rows[i]).collect();
                self.token_batches(&picked, pad_id)
            })
            .collect())
    }

    /// One micro-batch of `rows`, or several of similar length with `split_by_length`.
    pub fn token_batches(&self, rows: &[&datasets::TokenRow], pad_id: u32) -> Vec<TokenBatch> {
        if self.config.split_by_length {
            TokenBatch::split_by_length(rows, pad_id, SPLIT_BATCH_COST)
        } else {
            vec![TokenBatch::from_rows(rows, pad_id)]
        }
    }

    /// This peer's sample indices for each micro-batch of the next step (for batches of any
    /// kind: see [`next_micro_batches`](Self::next_micro_batches)).
    pub fn next_micro_batch_indices(
        &self,
        sampler: &mut datasets::EpochSampler,
    ) -> Result<Vec<Vec<usize>>> {
        let world = self.peer.world();
        (0..self.config.grad_accum)
            .map(|_| {
                let global = sampler.next_indices(self.config.batch_size * world);
                distributed::shard(&self.peer, &global)
            })
            .collect()
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.config.steps
    }

    pub fn lr(&self) -> f64 {
        self.config.schedule().lr_at(self.step)
    }

    /// The loss of one update over `micro_batches` of any kind and its gradients. The loss is
    /// the mean over every target of all micro-batches together (each objective divides by
    /// the step's total, [`MicroBatchShare::total_targets`]), so accumulating micro-batches
    /// gives the gradients of one large batch.
    pub fn loss_and_gradients_on<Batch: MicroBatch>(
        &self,
        micro_batches: &[Batch],
        objective: &ModuleObjective<'_, B, M, Batch>,
    ) -> Result<(f64, Gradients<B::InnerBackend>)> {
        let mut total_targets: usize = micro_batches.iter().map(MicroBatch::num_targets).sum();
        let device = self.model.device();
        if self.peer.is_distributed() {
            // The loss is a token mean over the global batch: every peer divides by its total.
            total_targets = self.sum_over_peers(&[total_targets as f64])?[0].round() as usize;
        }
        if total_targets == 0 {
            bail!(
                "step {}: the batch has no target tokens to train on",
                self.step + 1
            );
        }
        // Dropout draws from the backend generator: seeding it per step keeps resume exact.
        B::seed(
            &device,
            self.seed.wrapping_add(self.step.wrapping_mul(0x9E37_79B9)),
        );
        let mut gradients: Option<Gradients<B::InnerBackend>> = None;
        let mut loss = 0.0;
        for (index, batch) in micro_batches.iter().enumerate() {
            let share = MicroBatchShare {
                index,
                count: micro_batches.len(),
                peers: self.peer.world(),
                total_targets,
            };
            let micro_loss = objective(&self.model, batch, share);
            let value: f32 = micro_loss.clone().into_scalar().elem();
            // With peers, a bad loss is reported after the all-reduce, by every peer at once
            // (bailing out alone would leave the others waiting).
            if !value.is_finite() && !self.peer.is_distributed() {
                bail!(
                    "loss is {value} at step {} (micro-batch {index}); nothing was saved from this \
                     step. Lower the learning rate or check the data; {}",
                    self.step + 1,
                    self.where_to_resume()
                );
            }
            loss += value as f64;
            let step_gradients = Gradients::of(&self.model, &micro_loss.backward());
            match &mut gradients {
                Some(sum) => sum.accumulate(step_gradients),
                None => gradients = Some(step_gradients),
            }
        }
        // A peer with nothing to train on this step still sends (zero) gradients.
        let mut gradients = gradients.unwrap_or_else(|| Gradients::zeros_for(&self.model));
        if self.peer.is_distributed() {
            let names: Vec<String> = gradients.tensors.keys().cloned().collect();
            let mut tensors: Vec<Tensor<B::InnerBackend, 1>> =
                std::mem::take(&mut gradients.tensors)
                    .into_values()
                    .collect();
            let stop = self.stop.load(Ordering::SeqCst) as i32 as f32;
            let tokens = input_elements(micro_batches) as f32;
            tensors.push(Tensor::from_floats([loss as f32, stop, tokens], &device));
            let mut summed = distributed::all_reduce_sum_many(&self.peer, tensors)?;
            let [total, stops, tokens]: [f32; 3] = summed
                .pop()
                .expect("loss, stop vote and tokens")
                .into_data()
                .to_vec::<f32>()?
                .try_into()
                .expect("three values");
            self.stop_vote.set(stops > 0.0);
            self.step_tokens.set(tokens.round() as usize);
            loss = total as f64;
            gradients.tensors = names.into_iter().zip(summed).collect();
            if !loss.is_finite() {
                bail!(
                    "loss is {loss} at step {} on some peer; nothing was saved from this step. \
                     Lower the learning rate or check the data; {}",
                    self.step + 1,
                    self.where_to_resume()
                );
            }
        }
        Ok((loss, gradients))
    }

    /// One optimizer update of the module over `micro_batches` of any kind (see
    /// [`loss_and_gradients_on`](Self::loss_and_gradients_on)), with global-norm clipping and
    /// the step's learning rate.
    pub fn train_step_on<Batch: MicroBatch>(
        &mut self,
        micro_batches: &[Batch],
        objective: &ModuleObjective<'_, B, M, Batch>,
    ) -> Result<StepStats> {
        let start = Instant::now();
        let (loss, mut gradients) = self.loss_and_gradients_on(micro_batches, objective)?;
        let tokens = if self.peer.is_distributed() {
            self.step_tokens.get()
        } else {
            input_elements(micro_batches)
        };
        let grad_norm = if self.config.max_grad_norm > 0.0 {
            gradients.clip_global_norm(self.config.max_grad_norm)
        } else {
            gradients.global_norm()
        };
        if !grad_norm.is_finite() {
            bail!(
                "gradient norm is {grad_norm} at step {}; {}",
                self.step + 1,
                self.where_to_resume()
            );
        }
        if let Some(why) = self
            .divergence
            .exploded(loss, grad_norm, self.config.divergence_factor)
        {
            bail!(
                "the run diverged at step {}: {why} (train.divergence_factor = {}); nothing \
                 was saved from this step. Lower the learning rate; {}",
                self.step + 1,
                self.config.divergence_factor,
                self.where_to_resume()
            );
        }
        self.divergence.push(loss, grad_norm);
        let lr = self.lr();
        self.model = self.optimizer.step(self.model.clone(), &gradients, lr);
        self.step += 1;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Sums `values` over the peers of a data-parallel run (as they are on one device), e.g.
    /// counts that each peer made on its own shard.
    pub fn sum_over_peers(&self, values: &[f64]) -> Result<Vec<f64>> {
        if !self.peer.is_distributed() {
            return Ok(values.to_vec());
        }
        let local: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let summed =
            distributed::sum_values::<B::InnerBackend>(&self.peer, &local, &self.model.device())?;
        Ok(summed.into_iter().map(f64::from).collect())
    }

    /// Counts a step that had nothing to train on (on-policy SFT with no correct sample):
    /// the schedule moves on, the weights and optimizer do not.
    pub fn skip_step(&mut self) {
        self.step += 1;
    }

    /// Logs a step's numbers: metrics.jsonl, the progress display, Weights & Biases.
    pub fn log(&mut self, scalars: &[(&str, f64)]) -> Result<()> {
        let line = self.metrics.log(self.step, scalars)?;
        self.progress.update(self.step, scalars);
        if let Some(map) = line.as_object() {
            self.trackers.log(map)?;
        }
        Ok(())
    }

    /// Ends the run's telemetry: closes the progress bar, finishes the W&B run with the
    /// last logged numbers as its summary, and draws the curves into `RUN/plots/`.
    pub fn finish(&mut self) {
        self.progress.finish();
        if self.peer.is_distributed() {
            // Peers must end on the same weights; the fingerprint lets anyone check.
            println!(
                "peer {} of {}: weights sha256 {}",
                self.peer.rank(),
                self.peer.world(),
                weights_fingerprint(&self.model)
            );
        }
        if !self.peer.is_leader() {
            return;
        }
        let summary = crate::metrics::read_metrics(&self.metrics.path)
            .ok()
            .and_then(|lines| lines.last().and_then(|l| l.as_object().cloned()))
            .unwrap_or_default();
        self.trackers.finish(summary);
        match crate::plot::plot_run(&self.run_dir) {
            Ok(files) => println!(
                "plots: {} curves in {}",
                files.len(),
                self.run_dir.join("plots").display()
            ),
            Err(error) => eprintln!("warning: no plots: {error:#}"),
        }
    }

    pub fn should_evaluate(&self) -> bool {
        let every = self.config.eval_every;
        (every > 0 && self.step.is_multiple_of(every)) || self.is_done()
    }

    /// Saves a checkpoint when one is due (every `save_every` steps, at the end, or on a
    /// stop signal). `recipe_state` is returned by [`start`](Self::start) on resume.
    pub fn end_of_step(&mut self, recipe_state: impl FnOnce() -> Value) -> Result<Next> {
        let stopping = if self.peer.is_distributed() {
            self.stop_vote.get()
        } else {
            self.stop.load(Ordering::SeqCst)
        };
        let every = self.config.save_every;
        let due = stopping || self.is_done() || (every > 0 && self.step.is_multiple_of(every));
        if due && self.peer.is_leader() {
            self.save_checkpoint(recipe_state())?;
        }
        if stopping {
            println!(
                "stopped by signal at step {}; checkpoint saved, resume with --resume auto",
                self.step
            );
            return Ok(Next::Stop);
        }
        Ok(Next::Continue)
    }

    /// What a user can resume from after this run stops on an error.
    fn where_to_resume(&self) -> String {
        let newest = self.last_saved.clone().or_else(|| {
            self.checkpoints
                .latest_valid_of(Some(&self.lineage), |_| {})
                .ok()
                .flatten()
        });
        match newest {
            Some(checkpoint) => format!(
                "the newest checkpoint, {} (step {}), is intact: resume with --resume {}",
                checkpoint.dir.display(),
                checkpoint.step,
                checkpoint.dir.display()
            ),
            None => "no checkpoint of this run exists yet".into(),
        }
    }

    /// Saves a checkpoint: the weights and optimizer state, `state.json`, and what makes the
    /// folder loadable by Hugging Face tools. A full run stores every weight with its
    /// `config.json` (`from_pretrained(step folder)` works); a LoRA run stores its adapters
    /// only, beside the same adapters in the PEFT layout (`AutoPeftModelForCausalLM`), and
    /// names the frozen base with its fingerprint instead of storing it again.
    pub fn save_checkpoint(&mut self, recipe_state: Value) -> Result<Checkpoint> {
        let mut state = json!({
            "lineage": self.lineage,
            "base_model": self.base_model,
            "step": self.step,
            "optimizer_steps": self.optimizer.steps,
            "seed": self.seed,
            // Every random draw derives from (seed, step): this is the whole RNG state.
            "rng": "derived from (seed, step)",
            "model_config": self.model.config_json(),
            "lora": self.lora,
            "peers": self.peer.world(),
            "recipe": recipe_state,
        });
        let weights = named_tensors(&self.model);
        let (tensor_files, json_files) = match self.lora.clone() {
            None => {
                // A language model's config makes the folder a Hugging Face model folder.
                let config = self.model.config_json();
                let json_files = match config.get("architectures") {
                    Some(_) => vec![(
                        "config.json".to_string(),
                        hf_folder::config_with_dtype(&config, StoreDtype::F32),
                    )],
                    None => vec![],
                };
                (vec![("model".to_string(), weights)], json_files)
            }
            Some(lora_config) => {
                let base = self.frozen_base()?;
                // What the adapter trains: its own tensors and `modules_to_save`.
                let trained: Vec<_> = weights
                    .into_iter()
                    .filter(|(name, _)| lora_config.trains(name))
                    .collect();
                let peft = lora::peft_adapter_tensors(trained.clone())?;
                let peft_config = lora::peft_adapter_config(
                    &lora_config,
                    &base.folder(&self.run_dir).display().to_string(),
                );
                state["model_tensors"] = json!("adapters");
                state["base"] = serde_json::to_value(&base)?;
                (
                    vec![
                        ("model".to_string(), trained),
                        ("adapter_model".to_string(), peft),
                    ],
                    vec![("adapter_config.json".to_string(), peft_config)],
                )
            }
        };
        let mut tensor_files = tensor_files;
        tensor_files.push(("optimizer".into(), self.optimizer.state_tensors()));
        let contents = CheckpointContents {
            tensor_files,
            json_files,
            state,
        };
        let saved = self
            .checkpoints
            .save(self.step, &contents, self.config.keep_last)?;
        self.last_saved = Some(saved.clone());
        Ok(saved)
    }

    /// The frozen weights of a LoRA run: the folder the run loaded them from, or, for a model
    /// that has none on disk (trained from scratch, or changed by its recipe), `RUN/base`,
    /// written once; with their fingerprint, computed once.
    fn frozen_base(&mut self) -> Result<FrozenBase> {
        let lora = self
            .lora
            .clone()
            .context("the frozen base of a run without LoRA")?;
        if self.frozen_sha256.is_none() {
            self.frozen_sha256 = Some(weights::fingerprint_where(&self.model, &|name| {
                !lora.trains(name)
            }));
        }
        let sha256 = self.frozen_sha256.clone().expect("just computed");
        let folder = match &self.base_model {
            Some(folder) => Some(folder.canonicalize().unwrap_or_else(|_| folder.clone())),
            None => {
                let dir = self.run_dir.join(FrozenBase::RUN_FOLDER);
                if !dir.join("config.json").exists() {
                    let frozen: Vec<_> = named_tensors(&self.model)
                        .into_iter()
                        .filter(|(name, _)| !lora.trains(name))
                        .collect();
                    let tokenizer = self.run_dir.join(crate::export::RUN_TOKENIZER_DIR);
                    let tokenizer = tokenizer.exists().then_some(tokenizer);
                    hf_folder::save_hf_folder(
                        &dir,
                        &self.model.config_json(),
                        &frozen,
                        StoreDtype::F32,
                        tokenizer.as_deref(),
                    )?;
                }
                None
            }
        };
        Ok(FrozenBase { folder, sha256 })
    }

    /// The model for evaluation and generation: no gradient tracking.
    pub fn eval_model(&self) -> M::InnerModule {
        self.model.valid()
    }
}

/// The language-model trainer: token batches, next-token loss, Hugging Face exports.
impl<B: AutodiffBackend> Trainer<B, CausalLm<B>> {
    /// The loss of one update over `micro_batches` and its gradients: the next-token loss, a
    /// mean over every selected token of all micro-batches together.
    pub fn loss_and_gradients(
        &self,
        micro_batches: &[TokenBatch],
    ) -> Result<(f64, Gradients<B::InnerBackend>)> {
        self.loss_and_gradients_of(micro_batches, &next_token_objective)
    }

    /// As [`loss_and_gradients`](Self::loss_and_gradients) with another objective.
    pub fn loss_and_gradients_of(
        &self,
        micro_batches: &[TokenBatch],
        objective: &Objective<'_, B>,
    ) -> Result<(f64, Gradients<B::InnerBackend>)> {
        let device = self.model.device();
        self.loss_and_gradients_on(micro_batches, &|model, batch, share| {
            objective(model, DeviceBatch::new(batch, &device), share)
        })
    }

    /// One optimizer update over `micro_batches` (see [`loss_and_gradients`](Self::loss_and_gradients)),
    /// with global-norm clipping and the step's learning rate.
    pub fn train_step(&mut self, micro_batches: &[TokenBatch]) -> Result<StepStats> {
        self.train_step_of(micro_batches, &next_token_objective)
    }

    /// As [`train_step`](Self::train_step), minimising another objective.
    pub fn train_step_of(
        &mut self,
        micro_batches: &[TokenBatch],
        objective: &Objective<'_, B>,
    ) -> Result<StepStats> {
        let device = self.model.device();
        self.train_step_on(micro_batches, &|model, batch, share| {
            objective(model, DeviceBatch::new(batch, &device), share)
        })
    }

    /// Exports the newest valid checkpoint as a Hugging Face folder at `out` (LoRA merged,
    /// the adapter alongside in the PEFT layout).
    pub fn export_latest(&self, out: &Path) -> Result<()> {
        if self.peer.is_leader() {
            self.export_latest_checkpoint(out)?;
        }
        if self.peer.is_distributed() {
            // The other peers may load the export next (a later stage starts from it).
            distributed::barrier::<B::InnerBackend>(&self.peer, &self.model.device())?;
        }
        Ok(())
    }

    fn export_latest_checkpoint(&self, out: &Path) -> Result<()> {
        let last = match self.last_saved.clone() {
            Some(saved) => Some(saved),
            None => self
                .checkpoints
                .latest_valid_of(Some(&self.lineage), |warning| {
                    eprintln!("warning: {warning}")
                })?,
        };
        let last = last.with_context(|| {
            format!(
                "{} has no checkpoint to export",
                self.checkpoints.root.display()
            )
        })?;
        crate::export::export_checkpoint(&last.dir, out, checkpoints::StoreDtype::F32)?;
        println!("exported {}", out.display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(glob_match(
            "*norm*",
            "model.layers.0.input_layernorm.weight"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(glob_match("lm_head.weight", "lm_head.weight"));
        assert!(!glob_match("lm_head", "lm_head.weight"));
    }
}
