//! SkipGPT (EIT-NLP, ICML 2025): dynamic pruning of a decoder, per token, deciding separately
//! for each layer's attention and MLP.
//!
//! 1. (`[pretrain]`, optional) SkipGPT presupposes a pretrained model; the CPU default config
//!    first trains a small dense one on the shipped corpus.
//! 2. Stage `router`: every layer gets two routers (`trainer/src/model/router.rs`); the base is
//!    frozen and only the routers train, on
//!    `LM loss + lambda * |mean gate - keep target|`, the mean taken over all real tokens,
//!    layers and both module kinds (one global budget). Gates are straight-through
//!    Gumbel-softmax; the temperature anneals linearly from 5 to 1. An optional curriculum
//!    lowers the keep target in steps.
//! 3. Stage `lora`: routers frozen, LoRA (r 16, alpha 32 on q, v and gate projections) trains
//!    with the plain LM loss on the routed model.
//! 4. Held-out perplexity of the dense, routed and routed+LoRA models, the measured keep ratio
//!    per layer and module kind (with real skipping), a routing map, and the pruned models as
//!    Hugging Face folders with the routers under `model.layers.N.router.{attn,mlp}.*`.
//!
//! `router.mode = joint` is the paper's other variant: routers and LoRA train together in one
//! stage on the router loss (`RUN/joint`), in place of the two stages.
//!
//! One deviation, on purpose: inference routes deterministically (argmax, no noise) while the
//! public code keeps the Gumbel noise at evaluation. So that training ends on the routing that
//! inference uses, the noise is faded out over the end of the router stage
//! (`router.noise_fade = [start, end]`, fractions of the stage). `router.eval_noise` adds the
//! official code's noisy evaluation to the table.

use crate::common::{batches_in_order, prepare_run_dir, resume_sampler, ModelSection, RunSection};
use crate::evaluate::{perplexity_interval, perplexity_ratio_interval};
use crate::stages::{finished_stage, train_stage, SftStage, StageContext};
use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::{TextTokenizer, TokenBatch, TokenRow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::cell::Cell;
use std::path::PathBuf;
use trainer::config::{
    ensure, ensure_count, ensure_fraction, ensure_non_negative, ensure_positive,
    ensure_probability, Validate,
};
use trainer::leader_println;
use trainer::lora::LoraConfig;
use trainer::loss::{token_nll, token_nll_sum};
use trainer::model::init::ParamInit;
use trainer::model::llama::{LayerDecisions, LayerExec, LayerGates, LlamaConfig};
use trainer::model::router::LayerRouter;
use trainer::model::router::{straight_through_gate, RoutedModules};
use trainer::train::{DeviceBatch, MicroBatchShare, Next, Resume, TrainConfig, Trainer};
use trainer::CausalLm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipGptConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub corpus: CorpusSection,
    /// Dense training of the base model on the corpus first (for models made from scratch).
    pub pretrain: Option<TrainConfig>,
    pub router: RouterSection,
    pub lora: LoraSection,
    /// The stages this run goes through, in order (`trainer recipe skipgpt --stage ...` picks one).
    #[serde(default = "both_stages")]
    pub stages: Vec<Stage>,
    #[serde(default = "eight")]
    pub eval_batch_size: usize,
    /// The controls at the routers' keep ratio, in the table: random routing and static
    /// module dropping on the base, and the dense base with the same LoRA stage.
    #[serde(default = "yes")]
    pub controls: bool,
}

fn yes() -> bool {
    true
}

impl Validate for SkipGptConfig {
    fn validate(&self, _: &str) -> Result<()> {
        self.model.validate("model")?;
        ensure(
            self.corpus.seq_len >= 2,
            "corpus.seq_len",
            self.corpus.seq_len,
            "at least 2",
        )?;
        ensure_probability("corpus.eval_fraction", self.corpus.eval_fraction)?;
        if let Some(pretrain) = &self.pretrain {
            pretrain.validate("pretrain")?;
        }
        let router = &self.router;
        ensure_fraction("router.sparsity", router.sparsity)?;
        ensure_non_negative("router.lambda", router.lambda)?;
        ensure_positive("router.temperature_start", router.temperature_start)?;
        ensure_positive("router.temperature_end", router.temperature_end)?;
        for (i, at) in router.noise_fade.iter().enumerate() {
            ensure(
                (0.0..=1.0).contains(at),
                &format!("router.noise_fade[{i}]"),
                at,
                "in [0, 1]",
            )?;
        }
        ensure(
            router.noise_fade[0] <= router.noise_fade[1],
            "router.noise_fade",
            format!("{:?}", router.noise_fade),
            "[start, end] with start <= end",
        )?;
        ensure_probability("router.curriculum_step", router.curriculum_step)?;
        router.train.validate("router.train")?;
        self.lora.adapter.validate("lora.adapter")?;
        self.lora.train.validate("lora.train")?;
        for (key, train) in [
            ("router.train", &router.train),
            ("lora.train", &self.lora.train),
        ] {
            ensure(
                !train.split_by_length,
                &format!("{key}.split_by_length"),
                true,
                "false: the router loss is a mean per micro-batch, which splitting would reweight",
            )?;
        }
        ensure_count("eval_batch_size", self.eval_batch_size as u64)
    }
}

fn both_stages() -> Vec<Stage> {
    vec![Stage::Router, Stage::Lora]
}

fn eight() -> usize {
    8
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Router,
    Lora,
}

impl Stage {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "router" => Ok(Self::Router),
            "lora" => Ok(Self::Lora),
            other => bail!("unknown skipgpt stage `{other}` (router or lora)"),
        }
    }
}

/// Plain text, cut into windows of `seq_len + 1` tokens; every `1 / eval_fraction`-th window is
/// held out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSection {
    pub train: PathBuf,
    pub seq_len: usize,
    #[serde(default = "five_percent")]
    pub eval_fraction: f64,
}

fn five_percent() -> f64 {
    0.05
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// `two-stage` (the paper's default: routers on the frozen base, then LoRA with the
    /// routers frozen) or `joint` (routers and LoRA together, in one stage of `router.train`
    /// steps on the router loss; `[lora.adapter]` shapes the adapter, `lora.train` is unused).
    #[serde(default)]
    pub mode: RouterMode,
    /// Target share of skipped modules (0.25: a quarter of all routed attention and MLP runs).
    pub sparsity: f64,
    /// Which modules get routers: `both` (the paper's, a router each), or its ablations:
    /// `attention` / `mlp` only (the other always runs; the target applies to the routed
    /// ones), or `block` (one router per layer deciding both modules).
    #[serde(default)]
    pub modules: RoutedModules,
    /// Also evaluate with Gumbel noise on the routers' logits, as the official code does
    /// (inference here is deterministic; the table then has both).
    #[serde(default)]
    pub eval_noise: bool,
    #[serde(default = "twenty")]
    pub lambda: f64,
    #[serde(default = "five")]
    pub temperature_start: f64,
    #[serde(default = "one")]
    pub temperature_end: f64,
    /// The Gumbel noise fades linearly from full at `noise_fade[0]` to none at `noise_fade[1]`
    /// (fractions of the stage's steps). `[1.0, 1.0]` keeps the noise throughout.
    #[serde(default = "default_noise_fade")]
    pub noise_fade: [f64; 2],
    /// Curriculum: the keep target starts at 1 and drops by `curriculum_step` every
    /// `curriculum_every` steps down to `1 - sparsity` (0 turns it off).
    #[serde(default)]
    pub curriculum_every: u64,
    #[serde(default = "tenth")]
    pub curriculum_step: f64,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    #[default]
    TwoStage,
    Joint,
}

fn twenty() -> f64 {
    20.0
}
fn five() -> f64 {
    5.0
}
fn one() -> f64 {
    1.0
}
fn tenth() -> f64 {
    0.1
}
fn default_noise_fade() -> [f64; 2] {
    [0.5, 0.8]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub adapter: LoraConfig,
    pub train: TrainConfig,
}

/// Temperature, noise scale and keep target of the router stage at a step: pure functions of
/// the step, so resuming needs no extra state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSchedule {
    pub temperature: f64,
    pub noise_scale: f64,
    pub keep_target: f64,
}

impl RouterSection {
    pub fn schedule_at(&self, step: u64) -> RouterSchedule {
        let steps = self.train.steps.max(1);
        let progress = step as f64 / (steps.saturating_sub(1)).max(1) as f64;
        let temperature =
            self.temperature_start + (self.temperature_end - self.temperature_start) * progress;
        let fraction = step as f64 / steps as f64;
        let [fade_start, fade_end] = self.noise_fade;
        let noise_scale = if fraction < fade_start {
            1.0
        } else if fraction >= fade_end {
            0.0
        } else {
            1.0 - (fraction - fade_start) / (fade_end - fade_start)
        };
        let final_keep = 1.0 - self.sparsity;
        let keep_target = match step.checked_div(self.curriculum_every) {
            Some(drops) => (1.0 - self.curriculum_step * drops as f64).max(final_keep),
            None => final_keep,
        };
        RouterSchedule {
            temperature,
            noise_scale,
            keep_target,
        }
    }
}

/// The corpus as training and held-out rows.
pub fn corpus_rows(
    corpus: &CorpusSection,
    tokenizer: &TextTokenizer,
) -> Result<(Vec<TokenRow>, Vec<TokenRow>)> {
    let text = std::fs::read_to_string(&corpus.train)
        .with_context(|| format!("cannot read corpus {}", corpus.train.display()))?;
    let tokens = tokenizer.encode(&text, false)?;
    let window = corpus.seq_len + 1;
    if tokens.len() < 2 * window {
        bail!(
            "{}: {} tokens are too few for windows of {window}",
            corpus.train.display(),
            tokens.len()
        );
    }
    let every = (1.0 / corpus.eval_fraction.clamp(1e-6, 0.5)).round() as usize;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (index, chunk) in tokens.chunks_exact(window).enumerate() {
        let row = TokenRow::all_trained(chunk.to_vec());
        if index % every == every - 1 {
            eval.push(row);
        } else {
            train.push(row);
        }
    }
    Ok((train, eval))
}

/// Gumbel(0, 1) noise `[batch, seq, 2]`, scaled, from a seeded host generator.
fn gumbel_noise<B: Backend>(
    rng: &mut StdRng,
    shape: [usize; 3],
    scale: f64,
    device: &B::Device,
) -> Tensor<B, 3> {
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            let u: f64 = rng.random::<f64>().clamp(1e-10, 1.0 - 1e-10);
            (-(-u.ln()).ln() * scale) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// The model with fresh routers on every layer (Kaiming-uniform weights, zero bias), over the
/// `modules` of each layer.
pub fn with_routers<B: Backend>(
    mut model: CausalLm<B>,
    seed: u64,
    modules: RoutedModules,
) -> CausalLm<B> {
    let device = model.device();
    let mut init = ParamInit::normal(seed, 0.0);
    let hidden = model.config.hidden_size;
    for layer in &mut model.model.layers {
        layer.router = Some(LayerRouter::new(hidden, modules, &mut init, &device));
    }
    model.config.skip_routers = true;
    model.config.routed_modules = modules;
    model
}

/// The dense model: routers removed, every module runs for every token.
pub fn without_routers<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for layer in &mut model.model.layers {
        layer.router = None;
    }
    model.config.skip_routers = false;
    model.config.routed_modules = RoutedModules::Both;
    model
}

/// Logits with real skipping as the routers decide (inference), and each layer's decisions
/// (everything runs in a layer without a router).
pub fn routed_forward<B: Backend>(
    model: &CausalLm<B>,
    tokens: Tensor<B, 2, Int>,
    positions: Tensor<B, 2, Int>,
    allowed: Tensor<B, 4, Bool>,
) -> (Tensor<B, 3>, Vec<LayerDecisions>) {
    routed_forward_with_noise(model, tokens, positions, allowed, None)
}

/// As [`routed_forward`], with Gumbel noise on every router's logits when `noise` is given
/// (SkipGPT's official code evaluates so; `router.eval_noise`).
pub fn routed_forward_with_noise<B: Backend>(
    model: &CausalLm<B>,
    tokens: Tensor<B, 2, Int>,
    positions: Tensor<B, 2, Int>,
    allowed: Tensor<B, 4, Bool>,
    mut noise: Option<&mut StdRng>,
) -> (Tensor<B, 3>, Vec<LayerDecisions>) {
    let mut decisions = Vec::with_capacity(model.num_layers());
    let logits = model.forward_with(tokens, positions, allowed, &mut |index, hidden| {
        let layer = &model.model.layers[index];
        let exec = match (noise.as_deref_mut(), &layer.router) {
            (Some(rng), Some(router)) => {
                let [b, s, _] = hidden.dims();
                let device = hidden.device();
                let mut draw = || gumbel_noise(rng, [b, s, 2], 1.0, &device);
                LayerExec::Skipping(router.noisy_decisions(hidden, &mut draw))
            }
            _ => layer.inference_exec(hidden),
        };
        decisions.push(match &exec {
            LayerExec::Skipping(chosen) => chosen.clone(),
            _ => {
                let [b, s, _] = hidden.dims();
                LayerDecisions::all(b * s)
            }
        });
        exec
    });
    (logits, decisions)
}

/// The training forward: every module runs and is multiplied by its straight-through gate.
/// Returns the logits and the mean gate over real tokens, layers and the routed module kinds.
/// Without noise the gates equal the deterministic ones inference uses.
pub fn gated_forward<B: Backend>(
    model: &CausalLm<B>,
    batch: &DeviceBatch<B>,
    temperature: f64,
    mut noise: Option<(&mut StdRng, f64)>,
) -> Result<(Tensor<B, 3>, Tensor<B, 1>)> {
    if let Some(index) = model.model.layers.iter().position(|l| l.router.is_none()) {
        bail!("layer {index} has no router");
    }
    let [b, s] = batch.tokens.dims();
    let valid = batch.valid.clone().unsqueeze_dim::<3>(2);
    let device = model.device();
    let mut gate_sum = Tensor::<B, 1>::zeros([1], &device);
    let mut plan = |index: usize, hidden: &Tensor<B, 3>| {
        let router = model.model.layers[index].router.as_ref().expect("checked");
        let mut gate = |logits: Tensor<B, 3>| {
            let noise = noise
                .as_mut()
                .filter(|(_, scale)| *scale > 0.0)
                .map(|(rng, scale)| gumbel_noise(rng, [b, s, 2], *scale, &device));
            straight_through_gate(logits, noise, temperature)
        };
        let attn = router
            .attn
            .as_ref()
            .map(|r| gate(r.forward(hidden.clone())));
        // Block routing: one decision (one noise draw) for both modules.
        let mlp = match router.block {
            true => attn.clone(),
            false => router.mlp.as_ref().map(|r| gate(r.forward(hidden.clone()))),
        };
        let gates = LayerGates { attn, mlp };
        for g in [&gates.attn, &gates.mlp].into_iter().flatten() {
            gate_sum = gate_sum.clone() + (g.clone() * valid.clone()).sum();
        }
        LayerExec::Gated(gates)
    };
    let logits = model.forward_with(
        batch.tokens.clone(),
        batch.positions.clone(),
        batch.allowed.clone(),
        &mut plan,
    );
    let decisions = (model.config.routed_modules.count() * model.num_layers()) as f64;
    let mean_gate = gate_sum / batch.valid.clone().sum().mul_scalar(decisions);
    Ok((logits, mean_gate))
}

/// `LM loss + lambda * |mean gate - keep target|`, the LM loss a token mean over the step.
pub fn router_loss<B: Backend>(
    logits: Tensor<B, 3>,
    mean_gate: Tensor<B, 1>,
    batch: &DeviceBatch<B>,
    share: MicroBatchShare,
    keep_target: f64,
    lambda: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let lm = token_nll_sum(logits, batch.targets.clone(), batch.selected.clone())
        .div_scalar(share.total_targets as f64);
    let budget = mean_gate
        .sub_scalar(keep_target)
        .abs()
        .mul_scalar(lambda / (share.count * share.peers) as f64);
    (lm.clone() + budget, lm)
}

/// What real skipping measured on held-out rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedEval {
    pub perplexity: f64,
    /// 95% bootstrap interval over the held-out windows.
    #[serde(default)]
    pub perplexity_95: (f64, f64),
    /// Each held-out row's (summed NLL, target count), for paired comparisons.
    #[serde(skip)]
    pub row_nll: Vec<(f64, usize)>,
    /// Share of real tokens that execute each layer's (attention, MLP).
    pub keep: Vec<[f64; 2]>,
    /// Over all layers and both kinds: the keep ratio in modules.
    pub overall_keep: f64,
    /// The decoder layers' matrix-product FLOPs per token that ran, over the dense model's
    /// (a skipped attention still computes its key and value; the scores count the context
    /// each token attends to).
    pub flops_keep: f64,
}

/// Who decides, per layer, which tokens run each module during an evaluation.
pub enum Decider<'a> {
    /// The model's routers, deterministically (inference), or with seeded Gumbel noise.
    Routers { noise: Option<u64> },
    /// Each token runs module kind k of layer l with probability `keep[l][k]` (seeded): the
    /// random-routing control.
    Random { keep: &'a [[f64; 2]], seed: u64 },
    /// Whole modules dropped for every token (`dropped[l][k]`): the static-dropping control.
    Static { dropped: &'a [[bool; 2]] },
}

/// Held-out perplexity and keep ratios of a model, computed with real skipping (a dense model
/// keeps everything).
pub fn evaluate_routed<B: Backend>(model: &CausalLm<B>, batches: &[TokenBatch]) -> RoutedEval {
    evaluate_deciding(model, batches, Decider::Routers { noise: None })
}

/// As [`evaluate_routed`], with the routers' decisions drawn with Gumbel noise from `seed`
/// when given (the official code's evaluation).
pub fn evaluate_routed_with_noise<B: Backend>(
    model: &CausalLm<B>,
    batches: &[TokenBatch],
    seed: Option<u64>,
) -> RoutedEval {
    evaluate_deciding(model, batches, Decider::Routers { noise: seed })
}

/// Held-out perplexity, keep ratios and FLOPs kept of `model` run with real skipping as
/// `decider` says.
pub fn evaluate_deciding<B: Backend>(
    model: &CausalLm<B>,
    batches: &[TokenBatch],
    decider: Decider<'_>,
) -> RoutedEval {
    let seed = match decider {
        Decider::Routers { noise } => noise,
        Decider::Random { seed, .. } => Some(seed),
        Decider::Static { .. } => None,
    };
    let mut rng = seed.map(StdRng::seed_from_u64);
    let device = model.device();
    let layers = model.num_layers();
    // (summed NLL, target count) of every held-out row.
    let mut row_nll: Vec<(f64, usize)> = Vec::new();
    let mut kept = vec![[0usize; 2]; layers];
    let (mut real_tokens, mut context) = (0usize, 0usize);
    for batch in batches {
        let real: Vec<bool> = batch.segment.iter().flatten().map(|&s| s != 0).collect();
        real_tokens += real.iter().filter(|&&r| r).count();
        // Each real token attends to itself and the real tokens before it in its row.
        for row in &batch.segment {
            context += (1..=row.iter().filter(|&&s| s != 0).count()).sum::<usize>();
        }
        let on_device = DeviceBatch::<B>::new(batch, &device);
        let (logits, decisions) = match &decider {
            Decider::Routers { .. } => routed_forward_with_noise(
                model,
                on_device.tokens,
                on_device.positions,
                on_device.allowed,
                rng.as_mut(),
            ),
            fixed => {
                let mut decisions = Vec::new();
                let logits = model.forward_with(
                    on_device.tokens,
                    on_device.positions,
                    on_device.allowed,
                    &mut |index, hidden| {
                        let [b, s, _] = hidden.dims();
                        let chosen = match fixed {
                            Decider::Random { keep, .. } => {
                                let rng = rng.as_mut().expect("seeded");
                                let mut draw =
                                    |p: f64| (0..b * s).map(|_| rng.random::<f64>() < p).collect();
                                LayerDecisions {
                                    attn: draw(keep[index][0]),
                                    mlp: draw(keep[index][1]),
                                }
                            }
                            Decider::Static { dropped } => LayerDecisions {
                                attn: vec![!dropped[index][0]; b * s],
                                mlp: vec![!dropped[index][1]; b * s],
                            },
                            Decider::Routers { .. } => unreachable!("routed above"),
                        };
                        decisions.push(chosen.clone());
                        LayerExec::Skipping(chosen)
                    },
                );
                (logits, decisions)
            }
        };
        let selected = on_device.selected;
        let sums = (token_nll(logits, on_device.targets) * selected.clone()).sum_dim(1);
        let counts = selected.sum_dim(1);
        let sums = sums
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64");
        let counts = counts
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64");
        row_nll.extend(sums.into_iter().zip(counts).map(|(s, c)| (s, c as usize)));
        for (layer, decision) in decisions.iter().enumerate() {
            for (kind, flags) in [&decision.attn, &decision.mlp].into_iter().enumerate() {
                kept[layer][kind] += flags.iter().zip(&real).filter(|(f, r)| **f && **r).count();
            }
        }
    }
    let share = |count: usize| count as f64 / real_tokens.max(1) as f64;
    let keep: Vec<[f64; 2]> = kept.iter().map(|[a, m]| [share(*a), share(*m)]).collect();
    let overall_keep = keep.iter().map(|[a, m]| a + m).sum::<f64>() / (2 * layers.max(1)) as f64;
    let mean_context = context as f64 / real_tokens.max(1) as f64;
    let nll: f64 = row_nll.iter().map(|r| r.0).sum();
    let targets: usize = row_nll.iter().map(|r| r.1).sum();
    RoutedEval {
        perplexity: (nll / targets.max(1) as f64).exp(),
        perplexity_95: perplexity_interval(&row_nll, 1000, 0),
        row_nll,
        flops_keep: flops_kept(&model.config, &keep, mean_context),
        keep,
        overall_keep,
    }
}

/// The decoder layers' matrix-product FLOPs per token that run at keep ratios `keep`, over the
/// dense model's, for tokens attending to `mean_context` keys on average.
pub fn flops_kept(config: &LlamaConfig, keep: &[[f64; 2]], mean_context: f64) -> f64 {
    let h = config.hidden_size as f64;
    let q = (config.num_attention_heads * config.head_dim) as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let i = config.intermediate_size as f64;
    // What a skipped attention saves: the query and output projections and the scores and
    // weighted sum over the context; its key and value projections always run.
    let attention_skippable = 2.0 * h * q * 2.0 + 2.0 * 2.0 * mean_context * q;
    let attention_fixed = 2.0 * h * kv * 2.0;
    let mlp = 2.0 * 3.0 * h * i;
    let dense = (attention_skippable + attention_fixed + mlp) * keep.len() as f64;
    let ran: f64 = keep
        .iter()
        .map(|[a, m]| a * attention_skippable + attention_fixed + m * mlp)
        .sum();
    ran / dense.max(f64::MIN_POSITIVE)
}

/// The static-dropping control: the `count` modules (of `2 x layers`) whose removal raises the
/// loss on `batches` least, each scored alone (a cheap importance score: one evaluation per
/// module). `dropped[l] = [attention, MLP]`.
pub fn least_important_modules<B: Backend>(
    model: &CausalLm<B>,
    batches: &[TokenBatch],
    count: usize,
) -> Vec<[bool; 2]> {
    let layers = model.num_layers();
    let mut scores = Vec::new();
    for layer in 0..layers {
        for kind in 0..2 {
            let mut dropped = vec![[false; 2]; layers];
            dropped[layer][kind] = true;
            let eval = evaluate_deciding(model, batches, Decider::Static { dropped: &dropped });
            scores.push((eval.perplexity, layer, kind));
        }
    }
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut dropped = vec![[false; 2]; layers];
    for &(_, layer, kind) in scores.iter().take(count) {
        dropped[layer][kind] = true;
    }
    dropped
}

/// Measured speed with real skipping (the routers deciding per token), on this machine.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MeasuredSpeed {
    /// Forward tokens per second over the held-out batches (the best of two passes).
    pub prefill_tokens_per_s: f64,
    /// Greedy decoding with the KV cache: new tokens per second for 8 prompts of up to 64
    /// held-out tokens, 32 new tokens each (no stop token), prompt processing included.
    pub decode_tokens_per_s: f64,
}

pub fn measure_speed<B: Backend>(
    model: &CausalLm<B>,
    batches: &[TokenBatch],
) -> Result<MeasuredSpeed> {
    let device = model.device();
    let tokens: usize = batches.iter().flat_map(|b| &b.inputs).map(Vec::len).sum();
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let start = std::time::Instant::now();
        for batch in batches {
            let on_device = DeviceBatch::<B>::new(batch, &device);
            let (logits, _) = routed_forward(
                model,
                on_device.tokens,
                on_device.positions,
                on_device.allowed,
            );
            let _ = logits.sum().into_scalar();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    let prompts: Vec<Vec<u32>> = batches
        .iter()
        .flat_map(|b| &b.inputs)
        .take(8)
        .map(|row| row[..row.len().min(64)].to_vec())
        .collect();
    let generation = trainer::generate::GenerationConfig {
        max_new_tokens: 32,
        sampling: trainer::sampling::SamplingParams::greedy(),
        seed: 0,
        stop_tokens: Vec::new(),
        pad_id: 0,
    };
    let start = std::time::Instant::now();
    let generated = trainer::generate::generate(model, &prompts, &generation)?;
    let new_tokens: usize = generated.tokens.iter().map(Vec::len).sum();
    Ok(MeasuredSpeed {
        prefill_tokens_per_s: tokens as f64 / best,
        decode_tokens_per_s: new_tokens as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Stage `router`: fresh routers on the frozen base; exported to `RUN/router/final`. With
/// `router.mode = joint` LoRA trains beside the routers (`RUN/joint/final`, adapters merged).
/// Resumable like any run; skipped when its export exists.
fn router_stage<B: AutodiffBackend>(
    base: CausalLm<B>,
    rows: &[TokenRow],
    eval_batches: &[TokenBatch],
    config: &SkipGptConfig,
    context: &StageContext<'_>,
) -> Result<Option<PathBuf>> {
    let joint = config.router.mode == RouterMode::Joint;
    let dir = config.run.dir.join(if joint { "joint" } else { "router" });
    if let Some(exported) = finished_stage("router stage", &dir) {
        return Ok(Some(exported));
    }
    let exported = dir.join("final");
    let (seed, pad_id) = (context.seed, context.pad_id);
    let mut train = config.router.train.clone();
    // Two-stage: only the routers train. Joint: the adapters, and the routers beside them.
    let lora = joint.then(|| LoraConfig {
        modules_to_save: vec![ROUTER_PARAMETERS.into()],
        ..config.lora.adapter.clone()
    });
    if !joint {
        train.train_only = vec![ROUTER_PARAMETERS.into()];
    }
    prepare_run_dir(&dir, context.resolved, context.tokenizer_dir)?;
    let model = with_routers(base, seed, config.router.modules);
    let (mut trainer, saved) = Trainer::start(model, train, lora, seed, &dir, &Resume::Auto)?;
    let mut sampler = resume_sampler(&saved, "sampler", rows.len(), seed)?;
    leader_println!(
        "router stage: target sparsity {:.0}%, {} steps ({})",
        100.0 * config.router.sparsity,
        config.router.train.steps,
        if joint {
            "routers and LoRA train together"
        } else {
            "base frozen, routers train"
        }
    );
    let router = &config.router;
    let peer = trainer.peer.clone();
    while !trainer.is_done() {
        let micro_batches = trainer.next_micro_batches(&mut sampler, rows, pad_id)?;
        let schedule = router.schedule_at(trainer.step);
        let step = trainer.step;
        let (lm_loss, train_keep) = (Cell::new(0.0), Cell::new(0.0));
        let objective = |model: &CausalLm<B>, batch: DeviceBatch<B>, share: MicroBatchShare| {
            let mut rng = StdRng::seed_from_u64(
                seed ^ (step << 16) ^ share.index as u64 ^ ((peer.rank() as u64) << 40),
            );
            let noise = Some((&mut rng, schedule.noise_scale));
            let (logits, mean_gate) = gated_forward(model, &batch, schedule.temperature, noise)
                .expect("routers were just added");
            let keep: f32 = mean_gate.clone().into_scalar().elem();
            let (loss, lm) = router_loss(
                logits,
                mean_gate,
                &batch,
                share,
                schedule.keep_target,
                router.lambda,
            );
            let lm: f32 = lm.clone().into_scalar().elem();
            lm_loss.set(lm_loss.get() + lm as f64);
            train_keep.set(train_keep.get() + keep as f64 / share.count as f64);
            loss
        };
        let stats = trainer.train_step_of(&micro_batches, &objective)?;
        // Each peer's LM loss is its share of the global mean; its keep ratio a local mean.
        let [lm_loss, keep_sum]: [f64; 2] = trainer
            .sum_over_peers(&[lm_loss.get(), train_keep.get()])?
            .try_into()
            .expect("two sums");
        let mut scalars = stats.scalars();
        scalars.extend([
            ("lm_loss", lm_loss),
            ("keep", keep_sum / peer.world() as f64),
            ("keep_target", schedule.keep_target),
            ("temperature", schedule.temperature),
            ("noise_scale", schedule.noise_scale),
        ]);
        if trainer.should_evaluate() && !eval_batches.is_empty() && peer.is_leader() {
            let eval = evaluate_routed(&trainer.eval_model(), eval_batches);
            scalars.push(("eval_perplexity", eval.perplexity));
            scalars.push(("eval_keep", eval.overall_keep));
        }
        trainer.log(&scalars)?;
        if trainer.end_of_step(|| json!({ "sampler": sampler.state }))? == Next::Stop {
            return Ok(None);
        }
    }
    trainer.finish();
    trainer.export_latest(&exported)?;
    Ok(Some(exported))
}

/// With `--resume auto` (needed for a run folder that holds an earlier run) every stage
/// resumes from its newest checkpoint and a finished stage is reused.
pub fn run<B: AutodiffBackend>(
    config: SkipGptConfig,
    resolved: &toml::Table,
    device: B::Device,
) -> Result<()> {
    let joint = config.router.mode == RouterMode::Joint;
    let router_dir = config.run.dir.join("router").join("final");
    let lora_only = config.stages.contains(&Stage::Lora) && !config.stages.contains(&Stage::Router);
    if lora_only && joint {
        bail!(
            "router.mode = joint trains routers and LoRA together in the router stage: there is \
             no separate lora stage to run"
        );
    }
    if lora_only && !router_dir.join("config.json").exists() {
        bail!(
            "stage lora needs the routed model {}: run `--stage router` first",
            router_dir.display()
        );
    }
    let seed = config.run.seed;
    let loaded = config.model.load::<B>(&config.run, &device)?;
    let (tokenizer, tokenizer_dir) = (loaded.tokenizer, loaded.tokenizer_dir);
    let pad_id = tokenizer.pad_id();
    let (rows, eval_rows) = corpus_rows(&config.corpus, &tokenizer)?;
    let eval_batches = batches_in_order(&eval_rows, config.eval_batch_size, pad_id);
    prepare_run_dir(&config.run.dir, resolved, &tokenizer_dir)?;
    leader_println!(
        "skipgpt: {} training windows, {} held out, stages {:?}",
        rows.len(),
        eval_rows.len(),
        config.stages
    );

    let context = StageContext {
        resolved,
        tokenizer_dir: &tokenizer_dir,
        seed,
        pad_id,
    };

    // The dense base: pretrained here on the corpus, or the model as loaded.
    let base = match &config.pretrain {
        Some(pretrain) => {
            let stage = SftStage {
                name: "pretrain (dense, on the corpus)",
                dir: config.run.dir.join("pretrain"),
                train: pretrain,
                lora: None,
                rows: &rows,
                eval_batches: &eval_batches,
            };
            match train_stage(loaded.model, &stage, &context)? {
                Some(exported) => config.run.load_model::<B>(&exported, &device)?,
                None => return Ok(()), // stopped by a signal
            }
        }
        None => loaded.model,
    };

    if config.stages.contains(&Stage::Router)
        && router_stage(base.clone(), &rows, &eval_batches, &config, &context)?.is_none()
    {
        return Ok(());
    }
    let lora_stage = SftStage {
        name: "lora stage (routers frozen)",
        dir: config.run.dir.join("lora"),
        train: &config.lora.train,
        lora: Some(config.lora.adapter.clone()),
        rows: &rows,
        eval_batches: &eval_batches,
    };
    if config.stages.contains(&Stage::Lora) && !joint {
        let routed = config.run.load_model::<B>(&router_dir, &device)?;
        if train_stage(routed, &lora_stage, &context)?.is_none() {
            return Ok(());
        }
    }
    // The control for "LoRA only trained longer": the same LoRA training on the dense base
    // (in joint mode as long as the joint stage).
    let control = SftStage {
        name: "control: lora stage on the dense base",
        dir: config.run.dir.join("lora-dense"),
        train: if joint {
            &config.router.train
        } else {
            &config.lora.train
        },
        ..lora_stage
    };
    let lora_trained = if joint {
        config.stages.contains(&Stage::Router)
    } else {
        config.stages.contains(&Stage::Lora)
    };
    if config.controls && lora_trained && train_stage(base.clone(), &control, &context)?.is_none() {
        return Ok(());
    }
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(()); // the leader measures and reports
    }
    let calibration = batches_in_order(
        &rows[..CALIBRATION_ROWS.min(rows.len())],
        config.eval_batch_size,
        pad_id,
    );
    let routed_models = match config.router.mode {
        RouterMode::TwoStage => vec![
            ("routers", router_dir),
            ("routers + LoRA", config.run.dir.join("lora").join("final")),
        ],
        RouterMode::Joint => vec![(
            "routers + LoRA, trained jointly",
            config.run.dir.join("joint").join("final"),
        )],
    };
    report(
        &config,
        &base,
        &routed_models,
        control.train.steps,
        (&eval_batches, &calibration),
        &device,
    )
}

/// The routers' parameters (`model.layers.N.router.*`).
const ROUTER_PARAMETERS: &str = "*.router.*";

/// Training rows the static-dropping control scores modules on.
const CALIBRATION_ROWS: usize = 32;

/// Perplexity next to the dense model, keep ratios, the routing map; `RUN/summary.{md,json}`.
/// `routed_models`: the routed models' rows and export folders, in training order (the
/// controls match the first one's keep ratio, the speed is measured on the last one).
fn report<B: AutodiffBackend>(
    config: &SkipGptConfig,
    base: &CausalLm<B>,
    routed_models: &[(&str, PathBuf)],
    control_lora_steps: u64,
    (eval_batches, calibration): (&[TokenBatch], &[TokenBatch]),
    device: &B::Device,
) -> Result<()> {
    type Eval<B> = <B as AutodiffBackend>::InnerBackend;
    let dense = without_routers(base.valid());
    let mut rows = vec![("dense".to_string(), evaluate_routed(&dense, eval_batches))];
    let trained: Vec<&(&str, PathBuf)> = routed_models
        .iter()
        .filter(|(_, dir)| dir.join("config.json").exists())
        .collect();
    for (name, dir) in &trained {
        let model = config.run.load_model::<Eval<B>>(dir, device)?;
        rows.push((name.to_string(), evaluate_routed(&model, eval_batches)));
        if config.router.eval_noise {
            let noisy = evaluate_routed_with_noise(&model, eval_batches, Some(config.run.seed));
            rows.push((format!("{name}, noisy evaluation"), noisy));
        }
    }
    let routers = trained
        .first()
        .and_then(|(first, _)| rows.iter().find(|(n, _)| n == first))
        .map(|(_, e)| e.clone());
    if let (true, Some(routers)) = (config.controls, routers) {
        let random = Decider::Random {
            keep: &routers.keep,
            seed: config.run.seed,
        };
        rows.push((
            "control: random routing at the routers' keep ratios".to_string(),
            evaluate_deciding(&dense, eval_batches, random),
        ));
        let modules = 2 * dense.num_layers();
        let count = ((1.0 - routers.overall_keep) * modules as f64).round() as usize;
        let dropped = least_important_modules(&dense, calibration, count);
        rows.push((
            format!("control: static dropping of {count} of {modules} modules"),
            evaluate_deciding(&dense, eval_batches, Decider::Static { dropped: &dropped }),
        ));
        let dense_lora = config.run.dir.join("lora-dense").join("final");
        if dense_lora.join("config.json").exists() {
            let model = config.run.load_model::<Eval<B>>(&dense_lora, device)?;
            rows.push((
                format!("control: dense + LoRA, {control_lora_steps} steps"),
                evaluate_routed(&model, eval_batches),
            ));
        }
    }
    let routed = match config.router.modules {
        RoutedModules::Both => String::new(),
        modules => format!(
            " (routers on {} only; the keep ratio counts every module)",
            json!(modules).as_str().unwrap_or("?")
        ),
    };
    // Ratios are given against the first routed model (what the controls are matched to).
    let reference = trained.first().map_or("dense", |(name, _)| *name);
    let mut table = format!(
        "# SkipGPT, target sparsity {:.0}%{routed}\n\n| model | held-out perplexity (95% CI) | against {reference} (paired 95% CI) | keep ratio, modules | keep ratio, FLOPs |\n| --- | --- | --- | --- | --- |\n",
        100.0 * config.router.sparsity
    );
    let mut summary_ratios = serde_json::Map::new();
    for (name, eval) in &rows {
        let (low, high) = eval.perplexity_95;
        let against = match rows.iter().find(|(n, _)| n == reference) {
            Some((_, base)) if name != reference => {
                let ratio = eval.perplexity / base.perplexity;
                let (r_low, r_high) =
                    perplexity_ratio_interval(&eval.row_nll, &base.row_nll, 1000, 0);
                summary_ratios.insert(name.clone(), json!([ratio, r_low, r_high]));
                format!("{ratio:.3}x [{r_low:.3}, {r_high:.3}]")
            }
            _ => String::new(),
        };
        table += &format!(
            "| {name} | {:.3} [{low:.2}, {high:.2}] | {against} | {:.1}% | {:.1}% |\n",
            eval.perplexity,
            100.0 * eval.overall_keep,
            100.0 * eval.flops_keep
        );
    }
    table += "\nFLOPs: the decoder layers' matrix products per token (a skipped attention still \
              computes its key and value). Controls run on the dense base without LoRA (random \
              routing, static dropping of the modules whose removal costs the least loss on \
              training rows) or train it with the same LoRA stage.\n";
    if let Some((name, last)) = rows
        .iter()
        .rev()
        .find(|(n, _)| n.starts_with("routers") && !n.ends_with("noisy evaluation"))
    {
        table += &format!("\nKeep ratio per layer ({name}):\n\n| layer | attention | MLP |\n| --- | --- | --- |\n");
        for (layer, [attn, mlp]) in last.keep.iter().enumerate() {
            table += &format!("| {layer} | {:.1}% | {:.1}% |\n", 100.0 * attn, 100.0 * mlp);
        }
        let plot = config.run.dir.join("plots").join("routing-map.png");
        trainer::plot::plot_routing_map(
            &plot,
            &last.keep,
            &format!("keep ratio per layer and module ({name})"),
        )?;
        println!("routing map: {}", plot.display());
    }
    // Speed of the trained routed model against dense, measured (not modelled).
    let mut speeds = serde_json::Map::new();
    if let Some((name, dir)) = trained.last() {
        let routed = config.run.load_model::<Eval<B>>(dir, device)?;
        let [dense_speed, routed_speed] =
            [&dense, &routed].map(|model| measure_speed(model, eval_batches));
        let (dense_speed, routed_speed) = (dense_speed?, routed_speed?);
        table += &format!(
            "\nMeasured speed on this machine (real skipping): prefill {:.0} tokens/s dense, {:.0} \
             {name} ({:.2}x); greedy decoding {:.1} new tokens/s dense, {:.1} {name} ({:.2}x).\n",
            dense_speed.prefill_tokens_per_s,
            routed_speed.prefill_tokens_per_s,
            routed_speed.prefill_tokens_per_s / dense_speed.prefill_tokens_per_s,
            dense_speed.decode_tokens_per_s,
            routed_speed.decode_tokens_per_s,
            routed_speed.decode_tokens_per_s / dense_speed.decode_tokens_per_s,
        );
        speeds.insert("dense".into(), json!(dense_speed));
        speeds.insert(name.to_string(), json!(routed_speed));
    }
    print!("\n{table}");
    let mut summary: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|(name, eval)| (name.clone(), json!(eval)))
        .collect();
    summary.insert("speed".into(), speeds.into());
    summary.insert(
        format!("perplexity ratio against {reference} (paired 95% CI)"),
        summary_ratios.into(),
    );
    crate::common::write_summary(&config.run.dir, &table, &summary.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_batches_by_length_is_refused_for_the_router_loss() {
        let text = crate::builtin::config_text("skipgpt/tiny").unwrap();
        let config = |set: &[&str]| {
            let overrides: Vec<String> = set.iter().map(|s| s.to_string()).collect();
            let table = trainer::config::parse_config(text, "skipgpt/tiny", &overrides).unwrap();
            trainer::config::checked::<SkipGptConfig>(&table, "skipgpt/tiny")
        };
        assert!(config(&[]).is_ok());
        for key in ["router.train", "lora.train"] {
            let error = config(&[&format!("{key}.split_by_length=true")]).unwrap_err();
            let error = format!("{error:#}");
            assert!(error.contains(&format!("{key}.split_by_length")), "{error}");
        }
    }

    fn section(curriculum_every: u64) -> RouterSection {
        RouterSection {
            mode: RouterMode::TwoStage,
            sparsity: 0.25,
            modules: RoutedModules::Both,
            eval_noise: false,
            lambda: 20.0,
            temperature_start: 5.0,
            temperature_end: 1.0,
            noise_fade: [0.5, 0.8],
            curriculum_every,
            curriculum_step: 0.1,
            train: toml::from_str("steps = 101\nbatch_size = 1\nlr = 1e-3").unwrap(),
        }
    }

    #[test]
    fn temperature_anneals_linearly_from_5_to_1() {
        let router = section(0);
        assert_eq!(router.schedule_at(0).temperature, 5.0);
        assert!((router.schedule_at(50).temperature - 3.0).abs() < 1e-12);
        assert_eq!(router.schedule_at(100).temperature, 1.0);
    }

    #[test]
    fn noise_fades_out_and_curriculum_steps_down() {
        let router = section(0);
        assert_eq!(router.schedule_at(10).noise_scale, 1.0);
        let middle = router.schedule_at(66).noise_scale;
        assert!(middle > 0.0 && middle < 1.0, "{middle}");
        assert_eq!(router.schedule_at(90).noise_scale, 0.0);
        assert_eq!(router.schedule_at(0).keep_target, 0.75);

        let curriculum = section(10);
        let keeps: Vec<f64> = [0, 9, 10, 25, 30, 100]
            .iter()
            .map(|&s| curriculum.schedule_at(s).keep_target)
            .collect();
        let want = [1.0, 1.0, 0.9, 0.8, 0.75, 0.75];
        for (k, w) in keeps.iter().zip(want) {
            assert!((k - w).abs() < 1e-9, "{keeps:?}");
        }
    }
}
