//! TaYS, Think-as-You-See (EIT-NLP, CVPR 2026, arXiv 2603.02872), and the position schemes of
//! Speak-While-Watching (EIT-NLP, arXiv 2601.06843): train a model to reason while the frames
//! of a video are still arriving, then run perception and generation in parallel.
//!
//! 1. Each stream is laid out in arrival order ([`crate::streaming`]): the question, then frame
//!    group i followed by reasoning unit i (one observation, `<skip>` where nothing happens),
//!    then the answer.
//! 2. Stream-constrained training: the streaming mask (unit i sees the prompt, frame groups
//!    0..i and units 0..i-1; frames never see text), output positions as the scheme says
//!    (TaYS: restarting at 0, `group-decoupled`), loss weight `skip_weight` on `<skip>`.
//! 3. The baselines from the same data, initialisation and steps: `batch` (all frames before any
//!    reasoning) and `interleaved` (frames and units in one causal sequence).
//! 4. Stream-parallel inference ([`crate::stream_engine`]): frames are encoded into a frame
//!    cache as they arrive while the text thread decodes into its own cache.
//!
//! The first table compares batch, interleaved and TaYS: held-out accuracy (95% intervals),
//! time to first token, delay after the last frame and tokens/s, at a stated frame rate; the
//! second, TaYS trained and run under each of the four position schemes.

use crate::common::{
    export_with_language_model, load_exported, prepare_run_dir, train_variant, write_summary,
    ModelSection, RunSection, VariantTraining,
};
use crate::evaluate::{median, Accuracy};
use crate::stream_engine::{run_stream, StreamClock, StreamRun};
use crate::streaming::{
    tokenize, Mode, PositionScheme, Specials, StreamBatch, StreamExample, StreamModel, StreamSetup,
};
use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::stream::{load_stream_jsonl, FrameFormat, StreamRecord, StreamTask};
use datasets::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use trainer::config::{ensure, ensure_count, Validate};
use trainer::leader_println;
use trainer::model::init::ParamInit;
use trainer::model::vision::VisionConfig;
use trainer::train::{Resume, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaysConfig {
    pub run: RunSection,
    /// The language model (`scratch` with a tokenizer, or a Hugging Face folder).
    pub model: ModelSection,
    /// The ViT that encodes image frames (image frames only).
    pub vision: Option<VisionConfig>,
    pub data: StreamData,
    #[serde(default)]
    pub stream: StreamSection,
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalSection,
    /// The models of the first table, trained from one config: `batch`, `interleaved`, `tays`.
    #[serde(default = "all_modes")]
    pub modes: Vec<Mode>,
    /// The position schemes of the second table (TaYS trained under each); empty: no table.
    #[serde(default = "PositionScheme::all")]
    pub schemes: Vec<PositionScheme>,
}

fn all_modes() -> Vec<Mode> {
    vec![Mode::Batch, Mode::Interleaved, Mode::Tays]
}

/// Streams: the built-in task, or JSONL files of the user's (all three splits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamData {
    #[serde(default)]
    pub task: StreamTask,
    #[serde(default)]
    pub train_count: usize,
    #[serde(default)]
    pub dev_count: usize,
    #[serde(default)]
    pub test_count: usize,
    pub train: Option<PathBuf>,
    pub dev: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// What the user's frames are (`{ kind = "features", tokens = 4, dim = 10 }` or
    /// `{ kind = "images", size = 16 }`); the built-in task says its own.
    pub frames: Option<FrameFormat>,
}

impl StreamData {
    fn files(&self) -> Option<[&PathBuf; 3]> {
        Some([
            self.train.as_ref()?,
            self.dev.as_ref()?,
            self.test.as_ref()?,
        ])
    }

    pub fn format(&self) -> FrameFormat {
        match (self.files(), self.frames) {
            (Some(_), Some(format)) => format,
            _ => self.task.format(),
        }
    }
}

fn default_gap_offset() -> i64 {
    10_000
}
fn default_skip_weight() -> f32 {
    0.5
}
fn group_decoupled() -> PositionScheme {
    PositionScheme::GroupDecoupled
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// TaYS's own position scheme (the first table's `tays` row).
    #[serde(default = "group_decoupled")]
    pub positions: PositionScheme,
    /// Where `gap-isolated` outputs start.
    #[serde(default = "default_gap_offset")]
    pub gap_offset: i64,
    /// Loss weight on `<skip>` targets.
    #[serde(default = "default_skip_weight")]
    pub skip_weight: f32,
}

impl Default for StreamSection {
    fn default() -> Self {
        Self {
            positions: group_decoupled(),
            gap_offset: default_gap_offset(),
            skip_weight: default_skip_weight(),
        }
    }
}

fn default_interval_ms() -> f64 {
    100.0
}
fn default_timed_streams() -> usize {
    10
}
fn default_unit_cap() -> usize {
    8
}
fn default_answer_cap() -> usize {
    4
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// A frame group arrives every this many milliseconds in the timed runs.
    #[serde(default = "default_interval_ms")]
    pub frame_interval_ms: f64,
    /// A second, faster frame rate at which perception and generation take about as long as
    /// each other (Speak-While-Watching's balanced load). Unset: a frame group every time
    /// TaYS writes a unit (its median unit time in the real-time runs); 0 leaves it out.
    pub balanced_interval_ms: Option<f64>,
    /// Test streams run in real time per model (in interleaved rounds); medians reported.
    #[serde(default = "default_timed_streams")]
    pub timed_streams: usize,
    #[serde(default = "default_unit_cap")]
    pub max_unit_tokens: usize,
    #[serde(default = "default_answer_cap")]
    pub max_answer_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            frame_interval_ms: default_interval_ms(),
            balanced_interval_ms: None,
            timed_streams: default_timed_streams(),
            max_unit_tokens: default_unit_cap(),
            max_answer_tokens: default_answer_cap(),
        }
    }
}

/// One trained model: a mode and (for tays) a position scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Variant {
    pub mode: Mode,
    pub scheme: PositionScheme,
}

impl Variant {
    pub fn name(self) -> String {
        match self.mode {
            Mode::Batch => "batch".into(),
            Mode::Interleaved => "interleaved".into(),
            Mode::Tays => format!("tays-{}", self.scheme.name()),
        }
    }

    fn describe(self) -> String {
        match self.mode {
            Mode::Batch => "batch (all frames, then reasoning)".into(),
            Mode::Interleaved => "interleaved (one causal sequence)".into(),
            Mode::Tays => format!("TaYS, {} positions", self.scheme.name()),
        }
    }
}

impl TaysConfig {
    /// Every model to train: the first table's, then the schemes table's (no repeats).
    pub fn variants(&self) -> Vec<Variant> {
        let mut variants: Vec<Variant> = self
            .modes
            .iter()
            .map(|&mode| Variant {
                mode,
                scheme: match mode {
                    Mode::Tays => self.stream.positions,
                    _ => PositionScheme::Continuous,
                },
            })
            .collect();
        for &scheme in &self.schemes {
            let variant = Variant {
                mode: Mode::Tays,
                scheme,
            };
            if !variants.contains(&variant) {
                variants.push(variant);
            }
        }
        variants
    }
}

impl Validate for TaysConfig {
    fn validate(&self, _prefix: &str) -> Result<()> {
        self.model.validate("model")?;
        if let Some(vision) = &self.vision {
            vision.validate("vision")?;
        }
        let given = [&self.data.train, &self.data.dev, &self.data.test]
            .iter()
            .filter(|f| f.is_some())
            .count();
        ensure(
            given == 0 || given == 3,
            "data",
            format!("{given} of train/dev/test"),
            "all three JSONL files or none (the built-in task)",
        )?;
        if given == 0 {
            self.data.task.validate()?;
            for (field, count) in [
                ("data.train_count", self.data.train_count),
                ("data.dev_count", self.data.dev_count),
                ("data.test_count", self.data.test_count),
            ] {
                ensure_count(field, count as u64)?;
            }
        } else {
            ensure(
                self.data.frames.is_some(),
                "data.frames",
                "missing",
                "what the files' frames are: { kind = \"features\", tokens = N, dim = D } or { kind = \"images\", size = S }",
            )?;
        }
        if let FrameFormat::Images { size } = self.data.format() {
            ensure(
                self.vision.as_ref().is_some_and(|v| v.image_size == size),
                "vision",
                self.vision.as_ref().map_or("missing".to_string(), |v| {
                    format!("image_size {}", v.image_size)
                }),
                &format!("a [vision] section with image_size = {size} (the frames' size)"),
            )?;
        }
        ensure(
            !self.variants().is_empty(),
            "modes",
            "[]",
            "at least one model (modes or schemes)",
        )?;
        ensure(
            self.stream.skip_weight.is_finite() && self.stream.skip_weight >= 0.0,
            "stream.skip_weight",
            self.stream.skip_weight,
            "a weight of at least 0",
        )?;
        for (key, value) in [
            ("eval.frame_interval_ms", Some(self.eval.frame_interval_ms)),
            ("eval.balanced_interval_ms", self.eval.balanced_interval_ms),
        ] {
            let Some(value) = value else { continue };
            ensure(
                value.is_finite() && value >= 0.0,
                key,
                value,
                "milliseconds, at least 0",
            )?;
        }
        ensure_count("eval.max_unit_tokens", self.eval.max_unit_tokens as u64)?;
        ensure_count("eval.max_answer_tokens", self.eval.max_answer_tokens as u64)
    }
}

/// The tokenized splits and what every model needs to read them.
pub struct Prepared {
    pub tokenizer_dir: PathBuf,
    pub specials: Specials,
    pub pad_id: u32,
    pub train: Vec<StreamExample>,
    pub dev: Vec<StreamExample>,
    pub test: Vec<StreamExample>,
    pub source: String,
}

fn load_splits(config: &TaysConfig) -> Result<([Vec<StreamRecord>; 3], String)> {
    let data = &config.data;
    if let Some(files) = data.files() {
        let format = data.format();
        let [train, dev, test] = files.map(|f| load_stream_jsonl(f, format));
        return Ok(([train?, dev?, test?], files[0].display().to_string()));
    }
    let (task, seed) = (&data.task, config.run.seed);
    let train = task.records(seed, data.train_count, &HashSet::new())?;
    let mut seen: HashSet<String> = train.iter().map(|r| r.key.clone()).collect();
    let dev = task.records(seed ^ 0xDE5, data.dev_count, &seen)?;
    seen.extend(dev.iter().map(|r| r.key.clone()));
    let test = task.records(seed ^ 0x7E57, data.test_count, &seen)?;
    let source = format!(
        "built-in stream task ({} groups of {} frames, {}x{} cells, up to {} objects, {:?} frames)",
        task.groups, task.frames_per_group, task.grid, task.grid, task.max_objects, task.frames
    );
    Ok(([train, dev, test], source))
}

pub fn prepare(config: &TaysConfig, tokenizer_dir: PathBuf) -> Result<Prepared> {
    let tokenizer = TextTokenizer::from_folder(&tokenizer_dir)?;
    let specials = Specials::of(&tokenizer)?;
    let ([train, dev, test], source) = load_splits(config)?;
    let groups = train[0].groups.len();
    for (what, records) in [("dev", &dev), ("test", &test)] {
        if let Some(r) = records.iter().find(|r| r.groups.len() != groups) {
            bail!(
                "{what} streams: a stream of {} frame groups among training streams of {groups} \
                 (question {:?}); every stream must have the same number of groups",
                r.groups.len(),
                r.question
            );
        }
    }
    Ok(Prepared {
        train: tokenize(&train, &tokenizer, specials, "training")?,
        dev: tokenize(&dev, &tokenizer, specials, "dev")?,
        test: tokenize(&test, &tokenizer, specials, "test")?,
        pad_id: tokenizer.pad_id(),
        specials,
        tokenizer_dir,
        source,
    })
}

/// A fresh model of the config's shape (the same weights for every variant: same seed).
fn fresh_model<B: Backend>(config: &TaysConfig, device: &B::Device) -> Result<StreamModel<B>> {
    let loaded = config.model.load::<B>(&config.run, device)?;
    StreamModel::new(
        config.data.format(),
        config.vision.as_ref(),
        loaded.model,
        &mut ParamInit::normal(config.run.seed ^ 0x57_4EA4, 0.02),
        device,
    )
}

fn load_final<B: Backend>(
    config: &TaysConfig,
    folder: &Path,
    device: &B::Device,
) -> Result<StreamModel<B>> {
    load_exported(fresh_model::<B>(config, device)?, folder)
}

/// `final/`: the whole model and the language model as a Hugging Face folder.
fn export<B: Backend>(model: &StreamModel<B>, out: &Path, tokenizer_dir: &Path) -> Result<()> {
    export_with_language_model(
        model,
        &model.config_json(),
        &model.language_model,
        out,
        tokenizer_dir,
    )
}

/// Trains one model in `RUN/<name>` (resumable) and exports it; reuses an existing export.
/// `None` when a signal stopped training.
fn train_model<B: AutodiffBackend>(
    config: &TaysConfig,
    variant: Variant,
    data: &Prepared,
    resolved: &toml::Table,
    device: &B::Device,
) -> Result<Option<StreamModel<B::InnerBackend>>> {
    let setup = setup_of(config, variant, data);
    let frame_tokens = frame_tokens_per_group(config, &data.train[0]);
    let training = VariantTraining {
        dir: config.run.dir.join(variant.name()),
        name: variant.name(),
        describe: format!(
            "{} training streams, {} steps",
            data.train.len(),
            config.train.steps
        ),
        train: &config.train,
        seed: config.run.seed,
        num_examples: data.train.len(),
        batch: &|indices, _, _| {
            let rows: Vec<&StreamExample> = indices.iter().map(|&i| &data.train[i]).collect();
            StreamBatch::new(&rows, &setup, frame_tokens, data.pad_id)
        },
        loss: &|model: &StreamModel<B>, batch, share| model.loss(batch, share),
        dev_accuracy: &|model| {
            let all_there = clock(config, Duration::ZERO);
            evaluate(model, &data.dev, &setup, all_there)
                .answers
                .accuracy
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

fn setup_of(config: &TaysConfig, variant: Variant, data: &Prepared) -> StreamSetup {
    StreamSetup {
        mode: variant.mode,
        scheme: variant.scheme,
        gap_offset: config.stream.gap_offset,
        skip_weight: config.stream.skip_weight,
        specials: data.specials,
    }
}

/// Tokens a frame group becomes (each frame: a token per feature vector, or per ViT patch).
fn frame_tokens_per_group(config: &TaysConfig, example: &StreamExample) -> usize {
    let format = config.data.format();
    let per_frame = match (format, &config.vision) {
        (FrameFormat::Images { .. }, Some(vision)) => vision.num_patches(),
        (FrameFormat::Features { tokens, .. }, _) => tokens,
        (FrameFormat::Images { .. }, None) => unreachable!("validated: image frames have [vision]"),
    };
    per_frame * example.groups[0].len() / format.values()
}

fn clock(config: &TaysConfig, interval: Duration) -> StreamClock {
    StreamClock {
        interval,
        max_unit_tokens: config.eval.max_unit_tokens,
        max_answer_tokens: config.eval.max_answer_tokens,
    }
}

/// Accuracy of generated answers and units on `examples`, each stream run through the real
/// streaming path with every frame already there (the text a model writes does not depend on
/// when frames arrive: its mask fixes what each unit sees).
pub struct Evaluation {
    pub answers: Accuracy,
    /// Units written exactly as the reference observation.
    pub units: Accuracy,
}

fn evaluate<B: Backend>(
    model: &StreamModel<B>,
    examples: &[StreamExample],
    setup: &StreamSetup,
    clock: StreamClock,
) -> Evaluation {
    let (mut answers, mut units) = (vec![], vec![]);
    for example in examples {
        let run = run_stream(model, example, setup, clock);
        answers.push(run.answer == example.answer);
        units.extend(run.units.iter().zip(&example.units).map(|(a, b)| a == b));
    }
    Evaluation {
        answers: Accuracy::of(&answers),
        units: Accuracy::of(&units),
    }
}

/// The boring explanation of any accuracy: the answer guessed from the question alone (the
/// most common training answer to the same question; ties go to the smallest token ids).
pub fn question_prior(train: &[StreamExample], test: &[StreamExample]) -> Accuracy {
    let mut counts: HashMap<&[u32], HashMap<&[u32], usize>> = HashMap::new();
    for example in train {
        *counts
            .entry(&example.prompt)
            .or_default()
            .entry(&example.answer)
            .or_default() += 1;
    }
    let correct: Vec<bool> = test
        .iter()
        .map(|example| {
            counts
                .get(example.prompt.as_slice())
                .is_some_and(|answers| {
                    let best = answers
                        .iter()
                        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                        .map(|(answer, _)| *answer);
                    best == Some(example.answer.as_slice())
                })
        })
        .collect();
    Accuracy::of(&correct)
}

/// One model's row.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    pub test: Accuracy,
    pub test_units: Accuracy,
    pub dev: Accuracy,
    /// At `eval.frame_interval_ms`.
    pub real_time: Latency,
    /// At `eval.balanced_interval_ms`.
    pub balanced: Option<Latency>,
}

/// Medians over the timed streams, in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub first_token_s: f64,
    pub delay_after_last_s: f64,
    pub answer_done_s: f64,
    pub tokens_per_s: f64,
    pub generated_tokens: f64,
    /// Time spent writing one unit (the text thread's forward passes).
    pub unit_write_s: f64,
}

impl Latency {
    fn of(runs: &[StreamRun]) -> Self {
        let of = |f: &dyn Fn(&StreamRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            first_token_s: of(&|r| r.first_token_s),
            delay_after_last_s: of(&|r| r.delay_after_last_s),
            answer_done_s: of(&|r| r.answer_done_s),
            tokens_per_s: of(&|r| r.generated_tokens as f64 / r.decode_s.max(1e-9)),
            generated_tokens: of(&|r| r.generated_tokens as f64),
            unit_write_s: of(&|r| r.decode_s / r.units.len() as f64),
        }
    }
}

/// Each model's latencies on the first `eval.timed_streams` test streams, a frame group
/// arriving every `interval_ms`; the models take turns on each stream so that drifts of the
/// machine's speed hit all of them alike.
fn latencies<B: Backend>(
    config: &TaysConfig,
    data: &Prepared,
    models: &[(Variant, StreamModel<B>)],
    interval_ms: f64,
) -> Vec<Latency> {
    let timed = config.eval.timed_streams.min(data.test.len());
    leader_println!(
        "tays: {timed} test streams in real time per model, a frame group every {interval_ms} ms"
    );
    let interval = Duration::from_secs_f64(interval_ms / 1000.0);
    let mut runs: Vec<Vec<StreamRun>> = vec![vec![]; models.len()];
    for example in &data.test[..timed] {
        for (i, (variant, model)) in models.iter().enumerate() {
            let setup = setup_of(config, *variant, data);
            runs[i].push(run_stream(model, example, &setup, clock(config, interval)));
        }
    }
    runs.iter().map(|r| Latency::of(r)).collect()
}

pub fn run<B: AutodiffBackend>(
    config: TaysConfig,
    resolved: &toml::Table,
    _resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let data = prepare(&config, config.model.tokenizer_folder()?)?;
    leader_println!(
        "tays: {}; {} train, {} dev, {} test streams",
        data.source,
        data.train.len(),
        data.dev.len(),
        data.test.len()
    );
    prepare_run_dir(&config.run.dir, resolved, &data.tokenizer_dir)?;
    let mut models = Vec::new();
    for variant in config.variants() {
        let Some(model) = train_model::<B>(&config, variant, &data, resolved, &device)? else {
            return Ok(());
        };
        models.push((variant, model));
    }
    if !trainer::distributed::current_peer().is_leader() {
        return Ok(());
    }
    leader_println!("tays: evaluating on {} test streams", data.test.len());
    let accuracies: Vec<(Evaluation, Accuracy)> = models
        .iter()
        .map(|(variant, model)| {
            let setup = setup_of(&config, *variant, &data);
            let all_there = clock(&config, Duration::ZERO);
            let test = evaluate(model, &data.test, &setup, all_there);
            let dev = evaluate(model, &data.dev, &setup, all_there);
            (test, dev.answers)
        })
        .collect();
    let timed = config.eval.timed_streams.min(data.test.len());
    let real_time = latencies(&config, &data, &models, config.eval.frame_interval_ms);
    let balanced_ms = config.eval.balanced_interval_ms.unwrap_or_else(|| {
        let tays = models
            .iter()
            .position(|(v, _)| v.mode == Mode::Tays)
            .unwrap_or(0);
        (1000.0 * real_time[tays].unit_write_s * 10.0).round() / 10.0
    });
    let balanced = (balanced_ms > 0.0).then(|| latencies(&config, &data, &models, balanced_ms));
    let results: Vec<VariantResult> = models
        .iter()
        .zip(accuracies)
        .enumerate()
        .map(|(i, ((variant, _), (test, dev)))| VariantResult {
            variant: *variant,
            test: test.answers,
            test_units: test.units,
            dev,
            real_time: real_time[i],
            balanced: balanced.as_ref().map(|b| b[i]),
        })
        .collect();
    let prior = question_prior(&data.train, &data.test);
    let mut table = summary_table(&config, &data, &results, &models[0].1, balanced_ms);
    table += &format!(
        "\nControl, the question alone: the most common training answer to each test question is \
         right on {} of the test streams.\n",
        prior.cell()
    );
    println!("{table}");
    let numbers = json!({
        "source": data.source,
        "frame_interval_ms": config.eval.frame_interval_ms,
        "balanced_interval_ms": balanced_ms,
        "question_prior": prior,
        "timed_streams": timed,
        "models": results,
    });
    write_summary(&config.run.dir, &table, &numbers)
}

fn ms(seconds: f64) -> String {
    format!("{:.0} ms", seconds * 1000.0)
}

fn row(r: &VariantResult) -> String {
    let t = &r.real_time;
    let balanced = r.balanced.map_or("-".into(), |b| {
        format!("{} / {}", ms(b.answer_done_s), ms(b.delay_after_last_s))
    });
    format!(
        "| {} | {} | {} | {:.1}% | {} | {} | {:.0} | {:.0} | {balanced} |\n",
        r.variant.describe(),
        r.test.cell(),
        r.test_units.cell(),
        100.0 * r.dev.accuracy,
        ms(t.first_token_s),
        ms(t.delay_after_last_s),
        t.tokens_per_s,
        t.generated_tokens,
    )
}

fn header(balanced_ms: f64) -> String {
    format!(
        "| model | test accuracy (95% CI) | units right (95% CI) | dev accuracy | time to first token | \
         delay after last frame | tokens/s | tokens written | frames every {balanced_ms} ms: answer done / delay after last frame |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
}

fn summary_table<B: Backend>(
    config: &TaysConfig,
    data: &Prepared,
    results: &[VariantResult],
    model: &StreamModel<B>,
    balanced_ms: f64,
) -> String {
    let groups = data.test[0].groups.len();
    let interval = config.eval.frame_interval_ms;
    let mut table = format!(
        "# TaYS on the {source}\n\n\
         {layers}-layer language model, {tokens} frame tokens per group, {groups} groups per stream. \
         Accuracy: the generated answer exactly right on {test} held-out test streams (dev: {dev}); \
         units right: generated units equal to the reference observation; 95% Wilson intervals. \
         Times: medians over {timed} test streams run in real time on the real streaming path, a \
         frame group arriving every {interval} ms (the stream lasts {length} ms); time to first \
         token from the first group's arrival, delay from the last group's arrival to the end of \
         the answer; tokens/s over the text thread's forward passes. The last column runs the same \
         streams with a frame group every {balanced_ms} ms, about as fast as TaYS writes a unit here \
         (balanced perception and generation; Speak-While-Watching's setting): answer done is from \
         the first group's arrival.\n\n",
        source = data.source,
        layers = model.language_model.num_layers(),
        tokens = frame_tokens_per_group(config, &data.test[0]),
        test = data.test.len(),
        dev = data.dev.len(),
        timed = config.eval.timed_streams.min(data.test.len()),
        length = interval * groups as f64,
    );
    let main: Vec<&VariantResult> = config
        .modes
        .iter()
        .filter_map(|&mode| {
            results.iter().find(|r| {
                r.variant.mode == mode
                    && (mode != Mode::Tays || r.variant.scheme == config.stream.positions)
            })
        })
        .collect();
    if !main.is_empty() {
        table += "## Batch, interleaved and TaYS\n\n";
        table += &header(balanced_ms);
        for r in &main {
            table += &row(r);
        }
        let find = |mode| main.iter().find(|r| r.variant.mode == mode);
        if let (Some(batch), Some(tays)) = (find(Mode::Batch), find(Mode::Tays)) {
            let met = |ok: bool| if ok { "met" } else { "NOT met" };
            let (tays_t, batch_t) = (&tays.real_time, &batch.real_time);
            let first_ok = tays_t.first_token_s <= 2.0 * interval / 1000.0;
            let delay_ok = tays_t.delay_after_last_s <= 0.5 * batch_t.delay_after_last_s;
            let accuracy_ok = tays.test.accuracy >= batch.test.interval_95.0;
            table += &format!(
                "\nTargets: TaYS's first token within two frame intervals of the first frame ({} against \
                 {}: {}); its delay after the last frame at most half of batch's ({} against {}: {}); \
                 its accuracy at least batch's minus the interval ({:.1}% against {:.1}%: {}).\n",
                ms(tays_t.first_token_s),
                ms(2.0 * interval / 1000.0),
                met(first_ok),
                ms(tays_t.delay_after_last_s),
                ms(batch_t.delay_after_last_s),
                met(delay_ok),
                100.0 * tays.test.accuracy,
                100.0 * batch.test.interval_95.0,
                met(accuracy_ok),
            );
        }
    }
    let schemes: Vec<&VariantResult> = config
        .schemes
        .iter()
        .filter_map(|&scheme| {
            results
                .iter()
                .find(|r| r.variant.mode == Mode::Tays && r.variant.scheme == scheme)
        })
        .collect();
    if !schemes.is_empty() {
        table += &format!(
            "\n## Position schemes under parallel streaming\n\nEach trained with the streaming \
             mask and its positions, same data, initialisation and steps; run on the parallel \
             path (under `continuous`, a frame group's positions follow the unit before it, so \
             frames wait for text). Gap offset {}.\n\n",
            config.stream.gap_offset
        );
        table += &header(balanced_ms);
        for r in schemes {
            table += &row(r);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: u32, answer: u32) -> StreamExample {
        StreamExample {
            prompt: vec![prompt],
            groups: vec![],
            units: vec![],
            answer: vec![answer, 0],
        }
    }

    #[test]
    fn the_question_prior_answers_the_most_common_training_answer() {
        let train = [example(1, 5), example(1, 5), example(1, 6), example(2, 7)];
        // Question 1 -> 5 (right, then wrong), 2 -> 7 (right), 3 never seen (wrong).
        let test = [example(1, 5), example(1, 6), example(2, 7), example(3, 7)];
        let prior = question_prior(&train, &test);
        assert_eq!((prior.correct, prior.total), (2, 4));
    }

    #[test]
    fn variants_cover_the_modes_and_every_scheme_once() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/tays/tiny.toml"
        ))
        .unwrap();
        let names = |overrides: &[String]| -> Vec<String> {
            let table = trainer::config::parse_config(&text, "tiny", overrides).unwrap();
            let config: TaysConfig = trainer::config::checked(&table, "tiny").unwrap();
            config.variants().iter().map(|v| v.name()).collect()
        };
        assert_eq!(names(&[]), ["batch", "interleaved", "tays-group-decoupled"]);
        // The schemes table's command (the config's header) adds the other three.
        let schemes = r#"schemes=["continuous", "group-decoupled", "gap-isolated", "overlapped"]"#;
        assert_eq!(
            names(&[schemes.to_string()]),
            [
                "batch",
                "interleaved",
                "tays-group-decoupled",
                "tays-continuous",
                "tays-gap-isolated",
                "tays-overlapped"
            ]
        );
    }
}
