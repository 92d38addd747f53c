//! LLM4TSF (EIT-NLP, arXiv 2602.14744): forecasting through a language-model backbone, the
//! series aligned to the backbone's embedding space before it (`pre`) or not (`post`).
//!
//! 1. Load the series, split it chronologically (70/10/20), standardise it with the training
//!    part; every (window, channel) is a sample (channel independence).
//! 2. Normalise each input window by its own mean and deviation, cut it into patches (16
//!    values every 8), encode each patch (linear, layer norm, dropout).
//! 3. `pre`: the patches attend to a dictionary of the top principal directions of the
//!    backbone's token embeddings (multi-head cross-attention, dropout, residual, layer norm);
//!    the backbone is frozen. `post`: the patch embeddings enter the backbone directly; the
//!    backbone trains (or stays frozen, `backbone.trainable = false`).
//! 4. A fixed text prompt precedes the patches; the backbone's last hidden states at the
//!    patch positions go to a flatten head; the forecast is de-normalised; MSE on the horizon.
//! 5. Two baselines on the same split: the last input value repeated, and DLinear (trend by a
//!    moving average, a linear map each for trend and remainder). `summary.md`: test MSE and
//!    MAE on the standardised and the original scale, validation MSE beside them.

use crate::common::{prepare_run_dir, resume_sampler, write_summary, ModelSection, RunSection};
use crate::evaluate::mean;
use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::series::{chronological_split, load_series_csv, window_starts, Scaler, Series};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use trainer::config::{ensure, ensure_count, ensure_fraction, Validate};
use trainer::leader_println;
use trainer::model::init::ParamInit;
use trainer::model::layers::Linear;
use trainer::model::llama::{Caches, TokenSlots};
use trainer::model::series::{
    denormalise, normalise, patch, patch_count, FlattenHead, PatchEncoder,
};
use trainer::train::{MicroBatch, MicroBatchShare, Next, Resume, TrainConfig, Trainable, Trainer};
use trainer::CausalLm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alignment {
    Pre,
    Post,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llm4tsfConfig {
    /// `pre` or `post` (`trainer recipe llm4tsf --alignment pre|post`).
    pub alignment: Alignment,
    pub run: RunSection,
    /// The backbone: a Hugging Face folder, or a fresh model of a given shape.
    pub model: ModelSection,
    #[serde(default)]
    pub backbone: BackboneSection,
    pub series: SeriesSection,
    pub train: TrainConfig,
    pub dlinear: DLinearSection,
    #[serde(default)]
    pub eval: EvalSection,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSection {
    /// Keep the first `layers` layers (0: all).
    #[serde(default)]
    pub layers: usize,
    /// The same architecture with fresh random weights (the control for pretraining).
    #[serde(default)]
    pub random_init: bool,
    /// Whether the backbone trains; default: frozen for `pre`, trained for `post`.
    pub trainable: Option<bool>,
}

fn default_split() -> [f64; 3] {
    [0.7, 0.1, 0.2]
}
fn default_patch_length() -> usize {
    16
}
fn default_patch_stride() -> usize {
    8
}
fn default_dropout() -> f64 {
    0.1
}
fn default_dictionary_size() -> usize {
    500
}
fn default_heads() -> usize {
    8
}
fn default_prompt() -> String {
    "Forecast the future values of the given time series.".into()
}
fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesSection {
    /// A CSV in the ETT layout: a date column, then numeric channel columns.
    pub csv: PathBuf,
    /// Channels to use (default: every column after the date).
    #[serde(default)]
    pub columns: Vec<String>,
    pub input_length: usize,
    pub horizon: usize,
    #[serde(default = "default_split")]
    pub split: [f64; 3],
    /// Steps between training windows.
    #[serde(default = "one")]
    pub train_stride: usize,
    /// Steps between validation and test windows.
    #[serde(default = "one")]
    pub eval_stride: usize,
    #[serde(default = "default_patch_length")]
    pub patch_length: usize,
    #[serde(default = "default_patch_stride")]
    pub patch_stride: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Principal directions of the token embeddings in the pre-alignment dictionary (at most
    /// the hidden size).
    #[serde(default = "default_dictionary_size")]
    pub dictionary_size: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    #[serde(default = "default_prompt")]
    pub prompt: String,
}

fn default_kernel() -> usize {
    25
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DLinearSection {
    /// Moving-average window of the trend (odd).
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    pub train: TrainConfig,
}

fn default_eval_batch() -> usize {
    64
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            batch_size: default_eval_batch(),
        }
    }
}

impl Validate for Llm4tsfConfig {
    fn validate(&self, _: &str) -> Result<()> {
        self.model.validate("model")?;
        self.train.validate("train")?;
        self.dlinear.train.validate("dlinear.train")?;
        let s = &self.series;
        for (key, value) in [
            ("series.input_length", s.input_length),
            ("series.horizon", s.horizon),
            ("series.train_stride", s.train_stride),
            ("series.eval_stride", s.eval_stride),
            ("series.patch_stride", s.patch_stride),
            ("series.heads", s.heads),
            ("series.dictionary_size", s.dictionary_size),
            ("eval.batch_size", self.eval.batch_size),
        ] {
            ensure_count(key, value as u64)?;
        }
        ensure(
            s.patch_length >= 1 && s.patch_length <= s.input_length,
            "series.patch_length",
            s.patch_length,
            "between 1 and series.input_length",
        )?;
        ensure_fraction("series.dropout", s.dropout)?;
        ensure(
            self.dlinear.kernel % 2 == 1,
            "dlinear.kernel",
            self.dlinear.kernel,
            "odd",
        )
    }
}

/// A micro-batch of samples: `rows` input windows and the horizons that follow them.
pub struct SeriesBatch {
    pub inputs: Vec<f32>,
    pub targets: Vec<f32>,
    pub rows: usize,
}

impl MicroBatch for SeriesBatch {
    fn num_targets(&self) -> usize {
        self.targets.len()
    }

    fn num_inputs(&self) -> usize {
        self.inputs.len()
    }
}

/// The (window start, channel) samples of one part of the standardised series.
struct Samples<'a> {
    series: &'a Series,
    samples: Vec<(usize, usize)>,
    input_length: usize,
    horizon: usize,
}

impl<'a> Samples<'a> {
    fn new(
        series: &'a Series,
        range: std::ops::Range<usize>,
        s: &SeriesSection,
        stride: usize,
    ) -> Self {
        let starts = window_starts(range, s.input_length, s.horizon, stride);
        let channels = series.channels.len();
        Self {
            series,
            samples: starts
                .iter()
                .flat_map(|&t| (0..channels).map(move |c| (t, c)))
                .collect(),
            input_length: s.input_length,
            horizon: s.horizon,
        }
    }

    fn batch(&self, indices: &[usize]) -> SeriesBatch {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for &i in indices {
            let (start, channel) = self.samples[i];
            let split = start + self.input_length;
            inputs.extend(self.series.channel(channel, start..split));
            targets.extend(self.series.channel(channel, split..split + self.horizon));
        }
        SeriesBatch {
            inputs,
            targets,
            rows: indices.len(),
        }
    }
}

/// A model that maps input windows `[rows, input_length]` to forecasts `[rows, horizon]`.
pub trait Forecast<B: Backend> {
    fn forecast(&self, inputs: Tensor<B, 2>) -> Tensor<B, 2>;
    fn device(&self) -> B::Device;
}

/// The batch's inputs and targets on the device.
fn batch_tensors<B: Backend>(
    batch: &SeriesBatch,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inputs = Tensor::<B, 1>::from_floats(batch.inputs.as_slice(), device)
        .reshape([batch.rows as i32, -1]);
    let targets = Tensor::<B, 1>::from_floats(batch.targets.as_slice(), device)
        .reshape([batch.rows as i32, -1]);
    (inputs, targets)
}

/// Summed squared error of a micro-batch over the step's target count: the step's MSE.
fn mse_objective<B: Backend, M: Forecast<B>>(
    model: &M,
    batch: &SeriesBatch,
    share: MicroBatchShare,
) -> Tensor<B, 1> {
    let (inputs, targets) = batch_tensors::<B>(batch, &model.device());
    (model.forecast(inputs) - targets)
        .square()
        .sum()
        .div_scalar(share.total_targets as f64)
}

// ---------------------------------------------------------------------------------------
// The LLM forecaster.

/// Patches attend to a fixed dictionary of directions of the backbone's embedding space.
#[derive(Module, Debug)]
pub struct DictionaryAligner<B: Backend> {
    pub attention: MultiHeadAttention<B>,
    pub dropout: Dropout,
    pub norm: LayerNorm<B>,
    /// `[entries, d_model]`, frozen (principal directions of the token embeddings).
    pub dictionary: Param<Tensor<B, 2>>,
}

impl<B: Backend> DictionaryAligner<B> {
    fn forward(&self, patches: Tensor<B, 3>) -> Tensor<B, 3> {
        let [rows, _, _] = patches.dims();
        let [entries, d_model] = self.dictionary.val().dims();
        let dictionary = self
            .dictionary
            .val()
            .reshape([1, entries, d_model])
            .expand([rows, entries, d_model]);
        let attended = self
            .attention
            .forward(MhaInput::new(
                patches.clone(),
                dictionary.clone(),
                dictionary,
            ))
            .context;
        self.norm.forward(patches + self.dropout.forward(attended))
    }
}

#[derive(Module, Debug)]
pub struct LlmForecaster<B: Backend> {
    pub encoder: PatchEncoder<B>,
    pub aligner: Option<DictionaryAligner<B>>,
    pub backbone: CausalLm<B>,
    pub head: FlattenHead<B>,
    /// The prompt's token ids.
    #[module(skip)]
    pub prompt: Vec<i64>,
    /// Patch length and stride.
    #[module(skip)]
    pub patching: (usize, usize),
}

impl<B: Backend> Forecast<B> for LlmForecaster<B> {
    fn forecast(&self, inputs: Tensor<B, 2>) -> Tensor<B, 2> {
        let (normed, stats) = normalise(inputs);
        let (length, stride) = self.patching;
        let mut patches = self.encoder.forward(patch(normed, length, stride));
        if let Some(aligner) = &self.aligner {
            patches = aligner.forward(patches);
        }
        let [rows, count, d_model] = patches.dims();
        let device = patches.device();
        let prompt_ids =
            Tensor::<B, 1, Int>::from_ints(self.prompt.as_slice(), &device).reshape([1, -1]);
        let prompt = self.backbone.embed(prompt_ids);
        let prompt_length = prompt.dims()[1];
        let hidden = Tensor::cat(
            vec![prompt.expand([rows, prompt_length, d_model]), patches],
            1,
        );
        let total = prompt_length + count;
        let positions = Tensor::<B, 1, Int>::arange(0..total as i64, &device)
            .reshape([1, total])
            .expand([rows, total]);
        let context = self.backbone.context(TokenSlots::at_positions(positions));
        let decoded = self.backbone.decode(
            hidden,
            &context,
            Caches::default(),
            &mut self.backbone.inference_plan(),
        );
        // Only the patch positions are decoded into the forecast.
        let at_patches =
            self.backbone
                .final_norm(decoded.hidden)
                .slice(s![.., prompt_length..total, ..]);
        denormalise(self.head.forward(at_patches), &stats)
    }

    fn device(&self) -> B::Device {
        self.backbone.device()
    }
}

impl<B: AutodiffBackend> Trainable<B> for LlmForecaster<B> {
    fn config_json(&self) -> Value {
        json!({
            "kind": "llm4tsf",
            "aligned": self.aligner.is_some(),
            "patching": self.patching,
            "backbone": self.backbone.config.to_json(),
        })
    }

    fn device(&self) -> B::Device {
        self.backbone.device()
    }
}

/// The top `count` principal directions of `embeddings` (`[vocab, d_model]`): centred, the
/// eigenvectors of its covariance with the largest eigenvalues (the right singular vectors
/// of the centred matrix), unit length, largest first.
pub fn principal_directions(embeddings: &[f32], d_model: usize, count: usize) -> Vec<Vec<f32>> {
    let rows = embeddings.len() / d_model;
    let mut mean = vec![0.0f64; d_model];
    for row in embeddings.chunks(d_model) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64 / rows as f64;
        }
    }
    let mut covariance = nalgebra::DMatrix::<f64>::zeros(d_model, d_model);
    let mut centred = vec![0.0f64; d_model];
    for row in embeddings.chunks(d_model) {
        for (c, (v, m)) in centred.iter_mut().zip(row.iter().zip(&mean)) {
            *c = *v as f64 - m;
        }
        let x = nalgebra::DVector::from_column_slice(&centred);
        covariance.ger(1.0, &x, &x, 1.0);
    }
    let eigen = nalgebra::SymmetricEigen::new(covariance);
    let mut order: Vec<usize> = (0..d_model).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    order
        .into_iter()
        .take(count.min(d_model))
        .map(|i| {
            let column = eigen.eigenvectors.column(i);
            let norm = column.norm().max(1e-12);
            column.iter().map(|v| (v / norm) as f32).collect()
        })
        .collect()
}

/// The backbone: loaded (or re-initialised), cut to its first layers, at run precision.
fn load_backbone<B: Backend>(
    config: &Llm4tsfConfig,
    device: &B::Device,
) -> Result<crate::common::LoadedModel<B>> {
    let mut loaded = config.model.load::<B>(&config.run, device)?;
    if config.backbone.random_init {
        let fresh = CausalLm::new(
            &loaded.model.config,
            &mut ParamInit::normal(config.run.seed ^ 0xB0, 0.02),
            device,
        );
        loaded.model = fresh.with_precision(config.run.precision);
    }
    let layers = config.backbone.layers;
    if layers > 0 {
        if layers > loaded.model.num_layers() {
            bail!(
                "backbone.layers = {layers}, but the model has {}",
                loaded.model.num_layers()
            );
        }
        loaded.model = loaded
            .model
            .retain_layers(&(0..layers).collect::<Vec<_>>())?;
    }
    Ok(loaded)
}

fn build_forecaster<B: Backend>(
    config: &Llm4tsfConfig,
    backbone: CausalLm<B>,
    prompt: Vec<i64>,
    device: &B::Device,
) -> Result<LlmForecaster<B>> {
    let s = &config.series;
    let d_model = backbone.config.hidden_size;
    let mut init = ParamInit::normal(config.run.seed, 0.02);
    let aligner = match config.alignment {
        Alignment::Post => None,
        Alignment::Pre => {
            if !d_model.is_multiple_of(s.heads) {
                bail!(
                    "series.heads = {} must divide the backbone's hidden size {d_model}",
                    s.heads
                );
            }
            let embeddings = backbone.embedding_matrix();
            let directions = principal_directions(&embeddings, d_model, s.dictionary_size);
            let entries = directions.len();
            let flat: Vec<f32> = directions.into_iter().flatten().collect();
            B::seed(device, config.run.seed);
            Some(DictionaryAligner {
                attention: MultiHeadAttentionConfig::new(d_model, s.heads)
                    .with_dropout(s.dropout)
                    .init(device),
                dropout: DropoutConfig::new(s.dropout).init(),
                norm: LayerNormConfig::new(d_model).init(device),
                dictionary: Param::from_data(TensorData::new(flat, [entries, d_model]), device),
            })
        }
    };
    let patches = patch_count(s.input_length, s.patch_length, s.patch_stride);
    Ok(LlmForecaster {
        encoder: PatchEncoder::new(s.patch_length, d_model, s.dropout, &mut init, device),
        aligner,
        head: FlattenHead::new(patches, d_model, s.horizon, &mut init, device),
        backbone,
        prompt,
        patching: (s.patch_length, s.patch_stride),
    })
}

// ---------------------------------------------------------------------------------------
// Baselines.

/// DLinear (Zeng et al., 2023): trend = moving average (ends padded by repetition),
/// forecast = linear(trend) + linear(input - trend), shared across channels.
#[derive(Module, Debug)]
pub struct DLinear<B: Backend> {
    pub trend: Linear<B>,
    pub seasonal: Linear<B>,
    #[module(skip)]
    pub kernel: usize,
}

impl<B: Backend> DLinear<B> {
    fn new(
        input_length: usize,
        horizon: usize,
        kernel: usize,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        // Both maps start as the average of the window, as in the reference code.
        let average = vec![1.0 / input_length as f32; input_length * horizon];
        let weight = || TensorData::new(average.clone(), [horizon, input_length]);
        let mut init = ParamInit::normal(seed, 0.0);
        let mut trend = Linear::new(input_length, horizon, true, &mut init, device);
        let mut seasonal = Linear::new(input_length, horizon, true, &mut init, device);
        trend.weight = Param::from_data(weight(), device);
        seasonal.weight = Param::from_data(weight(), device);
        Self {
            trend,
            seasonal,
            kernel,
        }
    }

    /// The moving average as a matrix `[length, length]`: row i averages the `kernel` values
    /// around i, positions before the start or past the end counting as the end value.
    fn averaging(length: usize, kernel: usize, device: &B::Device) -> Tensor<B, 2> {
        let half = (kernel / 2) as i64;
        let mut matrix = vec![0.0f32; length * length];
        for i in 0..length as i64 {
            for offset in -half..=half {
                let j = (i + offset).clamp(0, length as i64 - 1) as usize;
                matrix[i as usize * length + j] += 1.0 / kernel as f32;
            }
        }
        Tensor::from_data(TensorData::new(matrix, [length, length]), device)
    }
}

impl<B: Backend> Forecast<B> for DLinear<B> {
    fn forecast(&self, inputs: Tensor<B, 2>) -> Tensor<B, 2> {
        let [_, length] = inputs.dims();
        let averaging = Self::averaging(length, self.kernel, &inputs.device());
        let trend = inputs.clone().matmul(averaging.transpose());
        self.trend.forward(trend.clone()) + self.seasonal.forward(inputs - trend)
    }

    fn device(&self) -> B::Device {
        self.trend.weight.lazy_device()
    }
}

impl<B: AutodiffBackend> Trainable<B> for DLinear<B> {
    fn config_json(&self) -> Value {
        json!({ "kind": "dlinear", "kernel": self.kernel })
    }

    fn device(&self) -> B::Device {
        Forecast::device(self)
    }
}

/// The last input value, repeated over the horizon.
struct LastValue {
    horizon: usize,
}

impl<B: Backend> Forecast<B> for (LastValue, B::Device) {
    fn forecast(&self, inputs: Tensor<B, 2>) -> Tensor<B, 2> {
        let [_, length] = inputs.dims();
        inputs
            .slice(s![.., length - 1..length])
            .repeat_dim(1, self.0.horizon)
    }

    fn device(&self) -> B::Device {
        self.1.clone()
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation.

/// Forecast errors on one part: MSE and MAE on the standardised scale and on the original
/// one (per channel, the errors times the channel's deviation), with a 95% bootstrap interval
/// of the standardised MSE over windows (windows overlap, so the interval is optimistic).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ForecastErrors {
    pub mse: f64,
    pub mae: f64,
    pub mse_95: (f64, f64),
    pub mse_original: f64,
    pub mae_original: f64,
    pub windows: usize,
}

fn evaluate<B: Backend, M: Forecast<B> + ?Sized>(
    model: &M,
    samples: &Samples,
    scaler: &Scaler,
    batch_size: usize,
) -> ForecastErrors {
    let device = model.device();
    // Per sample: summed squared and absolute errors, standardised.
    let mut per_sample: Vec<(f64, f64)> = Vec::with_capacity(samples.samples.len());
    let indices: Vec<usize> = (0..samples.samples.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = samples.batch(chunk);
        let (inputs, targets) = batch_tensors::<B>(&batch, &device);
        let errors = model.forecast(inputs) - targets;
        let squared: Vec<f32> = errors
            .clone()
            .square()
            .sum_dim(1)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let absolute: Vec<f32> = errors
            .abs()
            .sum_dim(1)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        per_sample.extend(
            squared
                .into_iter()
                .zip(absolute)
                .map(|(s, a)| (s as f64, a as f64)),
        );
    }
    let horizon = samples.horizon as f64;
    let mse = mean(per_sample.iter().map(|(s, _)| s / horizon));
    let mae = mean(per_sample.iter().map(|(_, a)| a / horizon));
    let scale = |i: usize| scaler.std[samples.samples[i].1] as f64;
    let mse_original = mean(
        per_sample
            .iter()
            .enumerate()
            .map(|(i, (s, _))| s / horizon * scale(i).powi(2)),
    );
    let mae_original = mean(
        per_sample
            .iter()
            .enumerate()
            .map(|(i, (_, a))| a / horizon * scale(i)),
    );
    let sums: Vec<(f64, usize)> = per_sample.iter().map(|(s, _)| (s / horizon, 1)).collect();
    ForecastErrors {
        mse,
        mae,
        mse_95: crate::evaluate::bootstrap_mean_interval(&sums, 1000, 0),
        mse_original,
        mae_original,
        windows: per_sample.len(),
    }
}

// ---------------------------------------------------------------------------------------
// The run.

/// The standardised series' parts, the scaler, and the evaluation batch size.
struct Parts<'a> {
    train: Samples<'a>,
    val: Samples<'a>,
    test: Samples<'a>,
    scaler: Scaler,
    eval_batch: usize,
}

/// Trains `model` on the training samples (resumable in `run_dir`), logging the validation
/// MSE at each evaluation; returns the trained model for evaluation (`None`: stopped).
fn train_forecaster<B: AutodiffBackend, M: Trainable<B> + Forecast<B>>(
    model: M,
    train_config: TrainConfig,
    seed: u64,
    run_dir: &Path,
    resume: &Resume,
    parts: &Parts,
) -> Result<Option<M::InnerModule>>
where
    M::InnerModule: Forecast<B::InnerBackend>,
{
    let (train, val) = (&parts.train, &parts.val);
    let (mut trainer, saved) = Trainer::start(model, train_config, None, seed, run_dir, resume)?;
    let mut sampler = resume_sampler(&saved, "sampler", train.samples.len(), seed)?;
    while !trainer.is_done() {
        let batches: Vec<SeriesBatch> = trainer
            .next_micro_batch_indices(&mut sampler)?
            .iter()
            .map(|indices| train.batch(indices))
            .collect();
        let stats = trainer.train_step_on(&batches, &mse_objective)?;
        let mut scalars = stats.scalars();
        if trainer.should_evaluate() {
            let errors = evaluate(&trainer.eval_model(), val, &parts.scaler, parts.eval_batch);
            scalars.push(("eval_mse", errors.mse));
            scalars.push(("eval_mae", errors.mae));
        }
        trainer.log(&scalars)?;
        if trainer.end_of_step(|| json!({ "sampler": sampler.state }))? == Next::Stop {
            return Ok(None);
        }
    }
    trainer.finish();
    Ok(Some(trainer.eval_model()))
}

pub fn run<B: AutodiffBackend>(
    config: Llm4tsfConfig,
    resolved: &toml::Table,
    resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let s = &config.series;
    let raw = load_series_csv(&s.csv, &s.columns)?;
    let split = chronological_split(raw.len(), s.split, s.input_length)
        .with_context(|| format!("{}", s.csv.display()))?;
    let scaler = Scaler::fit(&raw, split.train.clone());
    let series = scaler.transform(&raw);
    let parts = Parts {
        train: Samples::new(&series, split.train.clone(), s, s.train_stride),
        val: Samples::new(&series, split.val.clone(), s, s.eval_stride),
        test: Samples::new(&series, split.test.clone(), s, s.eval_stride),
        scaler,
        eval_batch: config.eval.batch_size,
    };
    for (part, samples) in [
        ("training", &parts.train),
        ("validation", &parts.val),
        ("test", &parts.test),
    ] {
        if samples.samples.is_empty() {
            bail!(
                "{}: the {part} part is too short for one window of {} + {} steps",
                s.csv.display(),
                s.input_length,
                s.horizon
            );
        }
    }
    leader_println!(
        "llm4tsf: {} ({} steps, {} channel(s)); windows {} + {}; samples: {} train, {} validation, {} test",
        s.csv.display(),
        raw.len(),
        raw.channels.len(),
        s.input_length,
        s.horizon,
        parts.train.samples.len(),
        parts.val.samples.len(),
        parts.test.samples.len()
    );

    let loaded = load_backbone::<B>(&config, &device)?;
    prepare_run_dir(&config.run.dir, resolved, &loaded.tokenizer_dir)?;
    let prompt: Vec<i64> = loaded
        .tokenizer
        .encode(&s.prompt, true)?
        .into_iter()
        .map(i64::from)
        .collect();
    let forecaster = build_forecaster(&config, loaded.model, prompt, &device)?;
    let mut train_config = config.train.clone();
    let trainable = config
        .backbone
        .trainable
        .unwrap_or(config.alignment == Alignment::Post);
    if !trainable {
        train_config.freeze.push("backbone.*".into());
    }
    train_config.freeze.push("aligner.dictionary".into());
    let seed = config.run.seed;
    let Some(llm) = train_forecaster(
        forecaster,
        train_config,
        seed,
        &config.run.dir,
        resume,
        &parts,
    )?
    else {
        return Ok(());
    };
    let dlinear = DLinear::<B>::new(
        s.input_length,
        s.horizon,
        config.dlinear.kernel,
        seed,
        &device,
    );
    let dlinear_dir = config.run.dir.join("dlinear");
    let Some(dlinear) = train_forecaster(
        dlinear,
        config.dlinear.train.clone(),
        seed,
        &dlinear_dir,
        resume,
        &parts,
    )?
    else {
        return Ok(());
    };

    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }
    let alignment = match config.alignment {
        Alignment::Pre => "pre",
        Alignment::Post => "post",
    };
    let last_value = (LastValue { horizon: s.horizon }, device.clone());
    let scored = |name: String, model: &dyn Forecast<B::InnerBackend>| {
        let test = evaluate(model, &parts.test, &parts.scaler, parts.eval_batch);
        let val = evaluate(model, &parts.val, &parts.scaler, parts.eval_batch);
        (name, test, val)
    };
    let rows = vec![
        scored(format!("LLM ({alignment}-alignment)"), &llm),
        scored("DLinear".into(), &dlinear),
        scored("last value repeated".into(), &last_value),
    ];
    export(&llm, &config.run.dir.join("final"))?;
    let table = summary_table(&config, &raw, &rows);
    println!("{table}");
    let numbers = json!({
        "csv": s.csv,
        "input_length": s.input_length,
        "horizon": s.horizon,
        "alignment": config.alignment,
        "backbone_random_init": config.backbone.random_init,
        "backbone_layers": llm.backbone.num_layers(),
        "models": rows.iter().map(|(name, test, val)| json!({ "model": name, "test": test, "validation": val })).collect::<Vec<_>>(),
    });
    write_summary(&config.run.dir, &table, &numbers)
}

fn summary_table(
    config: &Llm4tsfConfig,
    raw: &Series,
    rows: &[(String, ForecastErrors, ForecastErrors)],
) -> String {
    let s = &config.series;
    let backbone = match (&config.model.path, config.backbone.random_init) {
        (Some(path), false) => format!("{} (pretrained)", path.display()),
        (Some(path), true) => format!("{} architecture, random weights", path.display()),
        (None, _) => "a model trained from scratch (random weights)".into(),
    };
    let mut table = format!(
        "# LLM4TSF on {} ({}), input {}, horizon {}\n\nBackbone: {backbone}. Test part: {} windows. \
         Standardised = scaled by the training part's mean and deviation; original = in the data's units.\n\n\
         | model | test MSE, standardised (95% CI) | test MAE, standardised | test MSE, original | test MAE, original | validation MSE, standardised |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        s.csv.display(),
        raw.channels.join(", "),
        s.input_length,
        s.horizon,
        rows.first().map(|r| r.1.windows).unwrap_or(0),
    );
    for (name, test, val) in rows {
        table += &format!(
            "| {name} | {:.4} [{:.4}, {:.4}] | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            test.mse,
            test.mse_95.0,
            test.mse_95.1,
            test.mae,
            test.mse_original,
            test.mae_original,
            val.mse
        );
    }
    table
}

/// `final/`: the whole forecaster's weights, and the backbone as a Hugging Face folder.
fn export<B: Backend>(model: &LlmForecaster<B>, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let tensors = trainer::weights::named_tensors(model);
    checkpoints::write_safetensors(
        &out.join("forecaster.safetensors"),
        &tensors,
        checkpoints::StoreDtype::F32,
        None,
    )?;
    model
        .backbone
        .save(&out.join("backbone"), checkpoints::StoreDtype::F32, None)?;
    println!("exported {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::Cpu;

    #[test]
    fn the_dictionary_is_orthonormal_and_ordered_by_variance() {
        // Points spread mostly along (1, 1, 0), less along (1, -1, 0), least along z.
        let mut points = Vec::new();
        for i in 0..200 {
            let (a, b, c) = (
                (i % 17) as f32 - 8.0,
                (i % 5) as f32 - 2.0,
                ((i % 3) as f32 - 1.0) * 0.1,
            );
            points.extend([a + b + 3.0, a - b - 1.0, c]);
        }
        let directions = principal_directions(&points, 3, 500);
        assert_eq!(directions.len(), 3, "at most the dimension");
        for (i, u) in directions.iter().enumerate() {
            for (j, v) in directions.iter().enumerate() {
                let dot: f32 = u.iter().zip(v).map(|(a, b)| a * b).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-5, "{i}.{j} = {dot}");
            }
        }
        let first = &directions[0];
        assert!(
            (first[0].abs() - 0.5f32.sqrt()).abs() < 1e-2 && first[2].abs() < 1e-3,
            "{first:?}"
        );
        assert!(directions[2][2].abs() > 0.999, "{:?}", directions[2]);
    }

    #[test]
    fn dlinear_trend_is_a_padded_moving_average() {
        let device = Default::default();
        let matrix: Vec<f32> = DLinear::<Cpu>::averaging(6, 3, &device)
            .into_data()
            .to_vec()
            .unwrap();
        for row in matrix.chunks(6) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // Row 0 averages (x0, x0, x1): the start repeated.
        assert!((matrix[0] - 2.0 / 3.0).abs() < 1e-6 && (matrix[1] - 1.0 / 3.0).abs() < 1e-6);
        let model = DLinear::<Cpu>::new(6, 2, 3, 0, &device);
        let constant = Tensor::<Cpu, 2>::ones([1, 6], &device) * 4.0;
        // At initialisation both maps average the window: a constant series stays constant.
        let forecast: Vec<f32> = model.forecast(constant).into_data().to_vec().unwrap();
        assert!(
            forecast.iter().all(|v| (v - 4.0).abs() < 1e-5),
            "{forecast:?}"
        );
    }
}
