//! The streaming layout shared by the streaming recipes (TaYS, Speak-While-Watching): an input
//! stream (the prompt, then frame groups as they arrive) and an output stream (one reasoning
//! unit per frame group, then the answer), laid out in one sequence for training.
//!
//! A unit is `<unit> words... <sep>` (`<unit> <skip> <sep>` where the group has nothing to
//! say). The opening `<unit>` is given, not predicted: every generated token is then predicted
//! from an output token, which sees the earlier units, and frame tokens never produce logits.
//!
//! Modes (who sees whom; rows are in arrival order):
//! - `batch`: prompt, all frame groups, then the units and the answer; causal.
//! - `interleaved`: prompt, F0, U0, F1, U1, ..., answer; causal (frames see earlier text).
//! - `tays`: the interleaved order under the streaming mask: an input token sees earlier input
//!   only; an output token sees everything before it (unit i: prompt, frame groups 0..i,
//!   units 0..i-1, itself causally). Frames never see text, so they can be encoded while text
//!   is written.
//!
//! Position schemes (tays; batch and interleaved are `continuous`):
//! - `continuous`: the index in arrival order (the standard; frame group i+1's positions then
//!   depend on how long unit i was, so frames wait for text);
//! - `group-decoupled`: input and output each count from 0 (outputs overlap the input's range);
//! - `gap-isolated`: outputs count from a large offset (default 10000);
//! - `overlapped`: a unit continues from the end of the input it follows (positions shared with
//!   the frames that arrive while it is written).

use anyhow::{bail, Context as _, Result};
use burn::prelude::*;
use burn::tensor::TensorData;
use datasets::stream::{FrameFormat, StreamRecord, SKIP};
use datasets::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use trainer::loss::token_nll_sum;
use trainer::model::init::ParamInit;
use trainer::model::llama::{Caches, KvCache, LayerExec};
use trainer::model::mask::{int_tensor, token_tensor};
use trainer::model::vision::{Projector, VisionConfig, VisionTower};
use trainer::train::{MicroBatch, MicroBatchShare, Trainable};
use trainer::CausalLm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Batch,
    Interleaved,
    Tays,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PositionScheme {
    Continuous,
    GroupDecoupled,
    GapIsolated,
    Overlapped,
}

impl PositionScheme {
    pub fn all() -> Vec<Self> {
        vec![
            Self::Continuous,
            Self::GroupDecoupled,
            Self::GapIsolated,
            Self::Overlapped,
        ]
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Continuous => "continuous",
            Self::GroupDecoupled => "group-decoupled",
            Self::GapIsolated => "gap-isolated",
            Self::Overlapped => "overlapped",
        }
    }
}

/// A part of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Prompt,
    Frames(usize),
    Unit(usize),
    Answer,
}

impl Segment {
    pub fn is_input(self) -> bool {
        matches!(self, Self::Prompt | Self::Frames(_))
    }
}

/// The segments of a stream of `groups` frame groups in arrival order.
pub fn arrival_order(mode: Mode, groups: usize) -> Vec<Segment> {
    let mut order = vec![Segment::Prompt];
    match mode {
        Mode::Batch => {
            order.extend((0..groups).map(Segment::Frames));
            order.extend((0..groups).map(Segment::Unit));
        }
        Mode::Interleaved | Mode::Tays => {
            order.extend((0..groups).flat_map(|g| [Segment::Frames(g), Segment::Unit(g)]));
        }
    }
    order.push(Segment::Answer);
    order
}

/// Hands out position ids token by token, segments fed in arrival order (training lays whole
/// segments out; inference feeds units a token at a time).
#[derive(Debug, Clone)]
pub struct PositionCounter {
    scheme: PositionScheme,
    gap_offset: i64,
    arrival: i64,
    input: i64,
    output: i64,
    /// Next position of an output token under `overlapped`.
    overlapped: i64,
}

impl PositionCounter {
    pub fn new(scheme: PositionScheme, gap_offset: i64) -> Self {
        Self {
            scheme,
            gap_offset,
            arrival: 0,
            input: 0,
            output: 0,
            overlapped: 0,
        }
    }

    /// Marks the start of `segment` (an overlapped unit starts after the input it follows).
    pub fn begin(&mut self, segment: Segment) {
        if !segment.is_input() {
            self.overlapped = self.overlapped.max(self.input);
        }
    }

    /// The position of the next token, input or output.
    pub fn next(&mut self, input: bool) -> i64 {
        let position = match (self.scheme, input) {
            (PositionScheme::Continuous, _) => self.arrival,
            (_, true) => self.input,
            (PositionScheme::GroupDecoupled, false) => self.output,
            (PositionScheme::GapIsolated, false) => self.gap_offset + self.output,
            (PositionScheme::Overlapped, false) => self.overlapped,
        };
        self.arrival += 1;
        if input {
            self.input += 1;
        } else {
            self.output += 1;
            self.overlapped += 1;
        }
        position
    }

    pub fn segment(&mut self, segment: Segment, len: usize) -> Vec<i64> {
        self.begin(segment);
        (0..len).map(|_| self.next(segment.is_input())).collect()
    }
}

/// Whether a query may attend a key, both given by their row in arrival order and whether
/// they are input.
pub fn may_attend(mode: Mode, query: (usize, bool), key: (usize, bool)) -> bool {
    key.0 <= query.0 && (mode != Mode::Tays || !query.1 || key.1)
}

/// The special tokens of the output stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Specials {
    pub unit: u32,
    pub sep: u32,
    pub skip: u32,
    pub eos: u32,
}

impl Specials {
    pub fn of(tokenizer: &TextTokenizer) -> Result<Self> {
        let id = |name: &str| {
            tokenizer
                .token_id(name)
                .with_context(|| format!("the tokenizer has no {name} token (the streaming recipes need <unit>, <sep> and {SKIP})"))
        };
        Ok(Self {
            unit: id("<unit>")?,
            sep: id("<sep>")?,
            skip: id(SKIP)?,
            eos: *tokenizer
                .stop_ids()
                .first()
                .context("the tokenizer names no end-of-text token")?,
        })
    }
}

/// One stream, tokenized.
#[derive(Debug, Clone)]
pub struct StreamExample {
    pub prompt: Vec<u32>,
    /// Per group, its frames' values one after another.
    pub groups: Vec<Vec<f32>>,
    /// Each `<unit> ... <sep>`.
    pub units: Vec<Vec<u32>>,
    /// The answer's tokens and the end of text.
    pub answer: Vec<u32>,
}

pub fn tokenize(
    records: &[StreamRecord],
    tokenizer: &TextTokenizer,
    specials: Specials,
    what: &str,
) -> Result<Vec<StreamExample>> {
    let unknown = tokenizer.token_id("[UNK]");
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let encode = |text: &str| -> Result<Vec<u32>> {
                let ids = tokenizer.encode(text, false)?;
                if ids.is_empty() || unknown.is_some_and(|u| ids.contains(&u)) {
                    bail!(
                        "{what} stream {}: the tokenizer cannot read {text:?}",
                        i + 1
                    );
                }
                Ok(ids)
            };
            let units = record
                .observations
                .iter()
                .map(|o| Ok([vec![specials.unit], encode(o)?, vec![specials.sep]].concat()))
                .collect::<Result<_>>()?;
            let mut answer = encode(&record.answer)?;
            answer.push(specials.eos);
            Ok(StreamExample {
                prompt: encode(&record.question)?,
                groups: record.groups.iter().map(|g| g.concat()).collect(),
                units,
                answer,
            })
        })
        .collect()
}

/// One stream laid out in arrival order: what each row is, its position, and what it is
/// trained to predict.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The text token of each row; `None` for a frame token.
    pub tokens: Vec<Option<u32>>,
    /// For frame tokens, their index among the stream's frame tokens.
    pub frame_index: Vec<Option<usize>>,
    pub input: Vec<bool>,
    pub positions: Vec<i64>,
    /// The next output token, where it is trained on, and its loss weight.
    pub targets: Vec<Option<(u32, f32)>>,
}

/// How streams are laid out and weighted for training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamSetup {
    pub mode: Mode,
    pub scheme: PositionScheme,
    pub gap_offset: i64,
    pub skip_weight: f32,
    pub specials: Specials,
}

impl StreamSetup {
    /// A fresh position counter: the configured scheme under tays; batch and interleaved are
    /// continuous.
    pub fn position_counter(&self) -> PositionCounter {
        let scheme = match self.mode {
            Mode::Tays => self.scheme,
            Mode::Batch | Mode::Interleaved => PositionScheme::Continuous,
        };
        PositionCounter::new(scheme, self.gap_offset)
    }

    /// Lays out `example`, its frame groups of `frame_tokens` tokens each, in this setup's
    /// arrival order, positions and targets.
    pub fn lay_out(&self, example: &StreamExample, frame_tokens: usize) -> Layout {
        let Self {
            mode,
            specials,
            skip_weight,
            ..
        } = *self;
        let (prompt, units, answer) = (&example.prompt, &example.units, &example.answer);
        let mut counter = self.position_counter();
        let mut layout = Layout {
            tokens: vec![],
            frame_index: vec![],
            input: vec![],
            positions: vec![],
            targets: vec![],
        };
        // Rows of output tokens, in output order, to set targets afterwards.
        let mut outputs: Vec<usize> = vec![];
        for segment in arrival_order(mode, units.len()) {
            let text: &[u32] = match segment {
                Segment::Prompt => prompt,
                Segment::Frames(_) => &[],
                Segment::Unit(i) => &units[i],
                Segment::Answer => answer,
            };
            let len = match segment {
                Segment::Frames(_) => frame_tokens,
                _ => text.len(),
            };
            for (j, position) in counter.segment(segment, len).into_iter().enumerate() {
                if !segment.is_input() {
                    outputs.push(layout.tokens.len());
                }
                layout.tokens.push(text.get(j).copied());
                layout.frame_index.push(match segment {
                    Segment::Frames(g) => Some(g * frame_tokens + j),
                    _ => None,
                });
                layout.input.push(segment.is_input());
                layout.positions.push(position);
                layout.targets.push(None);
            }
        }
        for pair in outputs.windows(2) {
            let next = layout.tokens[pair[1]].expect("output rows hold text");
            if next != specials.unit {
                let weight = if next == specials.skip {
                    skip_weight
                } else {
                    1.0
                };
                layout.targets[pair[0]] = Some((next, weight));
            }
        }
        layout
    }
}

impl Layout {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Row-major `[len, len]`: whether row q may attend row k.
    pub fn allowed(&self, mode: Mode) -> Vec<bool> {
        let n = self.len();
        let mut allowed = Vec::with_capacity(n * n);
        for q in 0..n {
            allowed
                .extend((0..n).map(|k| may_attend(mode, (q, self.input[q]), (k, self.input[k]))));
        }
        allowed
    }
}

/// Streams laid out and right-padded to one width.
#[derive(Debug, Clone)]
pub struct StreamBatch {
    /// Text tokens (the pad id on frame rows and padding), `[rows, width]`.
    pub tokens: Vec<Vec<u32>>,
    /// Per row, the index of each frame token among the batch's frame tokens (0 elsewhere).
    pub frame_rows: Vec<Vec<i64>>,
    pub is_frame: Vec<Vec<bool>>,
    /// Every stream's frames one after another, and how many frames that is.
    pub frames: Vec<f32>,
    pub num_frames: usize,
    pub positions: Vec<Vec<i64>>,
    /// `[rows, width, width]` flattened.
    pub allowed: Vec<bool>,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

impl StreamBatch {
    pub fn new(
        examples: &[&StreamExample],
        setup: &StreamSetup,
        frame_tokens: usize,
        pad_id: u32,
    ) -> Self {
        let layouts: Vec<Layout> = examples
            .iter()
            .map(|e| setup.lay_out(e, frame_tokens))
            .collect();
        let width = layouts.iter().map(Layout::len).max().unwrap_or(0);
        let mut batch = Self {
            tokens: vec![],
            frame_rows: vec![],
            is_frame: vec![],
            frames: vec![],
            num_frames: 0,
            positions: vec![],
            allowed: Vec::with_capacity(examples.len() * width * width),
            targets: vec![],
            weights: vec![],
        };
        let mut frame_offset = 0;
        for (example, layout) in examples.iter().zip(&layouts) {
            let n = layout.len();
            let mut tokens: Vec<u32> = layout.tokens.iter().map(|t| t.unwrap_or(pad_id)).collect();
            let mut frame_rows: Vec<i64> = layout
                .frame_index
                .iter()
                .map(|f| f.map_or(0, |f| (frame_offset + f) as i64))
                .collect();
            let mut is_frame: Vec<bool> = layout.frame_index.iter().map(Option::is_some).collect();
            let mut positions = layout.positions.clone();
            let mut targets: Vec<u32> = layout
                .targets
                .iter()
                .map(|t| t.map_or(pad_id, |t| t.0))
                .collect();
            let mut weights: Vec<f32> = layout
                .targets
                .iter()
                .map(|t| t.map_or(0.0, |t| t.1))
                .collect();
            tokens.resize(width, pad_id);
            frame_rows.resize(width, 0);
            is_frame.resize(width, false);
            positions.resize(width, 0);
            targets.resize(width, pad_id);
            weights.resize(width, 0.0);
            let allowed = layout.allowed(setup.mode);
            for q in 0..width {
                // A padding row sees nothing (its output is never used).
                batch
                    .allowed
                    .extend((0..width).map(|k| q < n && k < n && allowed[q * n + k]));
            }
            batch.tokens.push(tokens);
            batch.frame_rows.push(frame_rows);
            batch.is_frame.push(is_frame);
            batch.positions.push(positions);
            batch.targets.push(targets);
            batch.weights.push(weights);
            for group in &example.groups {
                batch.frames.extend_from_slice(group);
            }
            frame_offset += example.groups.len() * frame_tokens;
        }
        batch.num_frames = batch.frames.len();
        batch
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    pub fn width(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }
}

impl MicroBatch for StreamBatch {
    fn num_targets(&self) -> usize {
        self.weights.iter().flatten().filter(|&&w| w > 0.0).count()
    }

    fn num_inputs(&self) -> usize {
        self.rows() * self.width()
    }
}

/// A language model reading frame streams: frames become tokens through a small encoder (a
/// projector over feature vectors, or a ViT tower and projector over images).
#[derive(Module, Debug)]
pub struct StreamModel<B: Backend> {
    pub vision_tower: Option<VisionTower<B>>,
    pub frame_projector: Projector<B>,
    pub language_model: CausalLm<B>,
    #[module(skip)]
    pub format: FrameFormat,
}

impl<B: Backend> StreamModel<B> {
    pub fn new(
        format: FrameFormat,
        vision: Option<&VisionConfig>,
        language_model: CausalLm<B>,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Result<Self> {
        let hidden = language_model.config.hidden_size;
        let (vision_tower, features) = match (format, vision) {
            (FrameFormat::Features { dim, .. }, _) => (None, dim),
            (FrameFormat::Images { size }, Some(vision)) => {
                if vision.image_size != size {
                    bail!(
                        "frames are {size}x{size} images but vision.image_size is {}",
                        vision.image_size
                    );
                }
                (
                    Some(VisionTower::new(vision, init, device)),
                    vision.hidden_size,
                )
            }
            (FrameFormat::Images { .. }, None) => {
                bail!("image frames need a [vision] section (the ViT that encodes them)")
            }
        };
        Ok(Self {
            vision_tower,
            frame_projector: Projector::new(features, hidden, init, device),
            language_model,
            format,
        })
    }

    pub fn device(&self) -> B::Device {
        self.language_model.device()
    }

    /// Tokens per frame.
    pub fn tokens_per_frame(&self) -> usize {
        match (&self.vision_tower, self.format) {
            (Some(tower), _) => tower.config.num_patches(),
            (None, FrameFormat::Features { tokens, .. }) => tokens,
            (None, FrameFormat::Images { .. }) => unreachable!("image frames have a tower"),
        }
    }

    /// `values` of whole frames to their tokens in the language model's space, `[tokens, hidden]`.
    pub fn frame_tokens(&self, values: &[f32]) -> Tensor<B, 2> {
        let device = self.device();
        let frames = values.len() / self.format.values();
        let raw = Tensor::<B, 1>::from_floats(values, &device);
        let features = match (&self.vision_tower, self.format) {
            (Some(tower), FrameFormat::Images { size }) => {
                tower.forward(raw.reshape([frames, 3, size, size]))
            }
            (_, FrameFormat::Features { tokens, dim }) => raw.reshape([frames, tokens, dim]),
            (None, FrameFormat::Images { .. }) => unreachable!("image frames have a tower"),
        };
        let tokens = self.frame_projector.forward(features);
        let [f, t, h] = tokens.dims();
        tokens.reshape([f * t, h])
    }

    /// Next-token logits `[rows, width, vocab]` of a laid-out batch.
    pub fn forward(&self, batch: &StreamBatch) -> Tensor<B, 3> {
        let lm = &self.language_model;
        let device = self.device();
        let (rows, width) = (batch.rows(), batch.width());
        let text = lm.embed(token_tensor(&batch.tokens, &device));
        let hidden_size = text.dims()[2];
        let frames = self.frame_tokens(&batch.frames);
        let frame_rows = int_tensor(&batch.frame_rows, &device).reshape([rows * width]);
        let placed = frames
            .select(0, frame_rows)
            .reshape([rows, width, hidden_size]);
        let is_frame: Vec<bool> = batch.is_frame.iter().flatten().copied().collect();
        let is_frame =
            Tensor::<B, 3, Bool>::from_data(TensorData::new(is_frame, [rows, width, 1]), &device)
                .expand([rows, width, hidden_size]);
        let hidden = text.mask_where(is_frame, placed);
        let allowed = Tensor::<B, 4, Bool>::from_data(
            TensorData::new(batch.allowed.clone(), [rows, 1, width, width]),
            &device,
        );
        let context = lm.masked_context(int_tensor(&batch.positions, &device), allowed);
        let decoded = lm.decode(hidden, &context, Caches::default(), &mut |_, _| {
            LayerExec::Dense
        });
        lm.head(decoded.hidden)
    }

    /// The weighted next-token loss on the output stream, over the step's target tokens.
    pub fn loss(&self, batch: &StreamBatch, share: MicroBatchShare) -> Tensor<B, 1> {
        let device = self.device();
        let weights: Vec<f32> = batch.weights.iter().flatten().copied().collect();
        let weights = Tensor::<B, 1>::from_floats(weights.as_slice(), &device)
            .reshape([batch.rows(), batch.width()]);
        token_nll_sum(
            self.forward(batch),
            token_tensor(&batch.targets, &device),
            weights,
        )
        .div_scalar(share.total_targets as f64)
    }

    /// What `config.json` of an exported model says.
    pub fn config_json(&self) -> Value {
        json!({
            "model_type": "stream",
            "frames": self.format,
            "vision_config": self.vision_tower.as_ref().map(|t| t.config),
            "text_config": self.language_model.config.to_json(),
        })
    }

    /// An empty key/value store for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.language_model.num_layers())
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> Trainable<B> for StreamModel<B> {
    fn config_json(&self) -> Value {
        StreamModel::config_json(self)
    }

    fn device(&self) -> B::Device {
        StreamModel::device(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::stream::StreamTask;
    use std::collections::HashSet;

    #[test]
    fn the_shipped_tokenizer_reads_every_word_of_the_built_in_task() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/stream-tokenizer");
        let tokenizer = TextTokenizer::from_folder(&dir).unwrap();
        let specials = Specials::of(&tokenizer).unwrap();
        let records = StreamTask::default()
            .records(0, 300, &HashSet::new())
            .unwrap();
        let examples = tokenize(&records, &tokenizer, specials, "built-in").unwrap();
        for (record, example) in records.iter().zip(&examples) {
            // One token per word, the unit's opener and closer around them.
            for (observation, unit) in record.observations.iter().zip(&example.units) {
                assert_eq!(
                    unit.len(),
                    observation.split(' ').count() + 2,
                    "{observation}"
                );
                assert_eq!(
                    (unit[0], unit[unit.len() - 1]),
                    (specials.unit, specials.sep)
                );
            }
            assert_eq!(example.answer.last(), Some(&specials.eos));
        }
        let mut unknown = records[0].clone();
        unknown.question = "how many zebras ?".into();
        let err = tokenize(&[unknown], &tokenizer, specials, "user").unwrap_err();
        assert!(
            err.to_string()
                .contains("user stream 1: the tokenizer cannot read"),
            "{err}"
        );
    }

    const SPECIALS: Specials = Specials {
        unit: 1,
        sep: 2,
        skip: 3,
        eos: 0,
    };

    /// Prompt of 2 tokens, 2 groups of 2 frame tokens, units `<unit> 7 <sep>` and
    /// `<unit> <skip> <sep>`, answer `9 <eos>`.
    fn small(mode: Mode, scheme: PositionScheme) -> Layout {
        lay_out(mode, scheme, &[5, 6], 2, &[vec![1, 7, 2], vec![1, 3, 2]])
    }

    /// A stream of `prompt`, frame groups of `frame_tokens`, `units` and the answer `9 <eos>`
    /// laid out with gap offset 100 and skip weight 0.5.
    fn lay_out(
        mode: Mode,
        scheme: PositionScheme,
        prompt: &[u32],
        frame_tokens: usize,
        units: &[Vec<u32>],
    ) -> Layout {
        let setup = StreamSetup {
            mode,
            scheme,
            gap_offset: 100,
            skip_weight: 0.5,
            specials: SPECIALS,
        };
        let example = StreamExample {
            prompt: prompt.to_vec(),
            groups: vec![],
            units: units.to_vec(),
            answer: vec![9, 0],
        };
        setup.lay_out(&example, frame_tokens)
    }

    /// Rows by letter: p prompt, f frame, u unit text, a answer.
    fn kinds(layout: &Layout) -> String {
        (0..layout.len())
            .map(
                |i| match (layout.input[i], layout.frame_index[i], layout.tokens[i]) {
                    (true, Some(_), _) => 'f',
                    (true, None, _) => 'p',
                    (false, _, Some(9 | 0)) => 'a',
                    _ => 'u',
                },
            )
            .collect()
    }

    #[test]
    fn rows_follow_each_modes_arrival_order() {
        assert_eq!(
            kinds(&small(Mode::Batch, PositionScheme::Continuous)),
            "ppffffuuuuuuaa"
        );
        for mode in [Mode::Interleaved, Mode::Tays] {
            assert_eq!(
                kinds(&small(mode, PositionScheme::Continuous)),
                "ppffuuuffuuuaa"
            );
        }
        let layout = small(Mode::Tays, PositionScheme::Continuous);
        let frames: Vec<Option<usize>> = layout.frame_index.clone();
        assert_eq!(&frames[2..4], &[Some(0), Some(1)]);
        assert_eq!(&frames[7..9], &[Some(2), Some(3)]);
    }

    #[test]
    fn positions_of_each_scheme_by_hand() {
        // Rows (tays order): p p f f u u u f f u u u a a
        let expect = |scheme, positions: &[i64]| {
            assert_eq!(small(Mode::Tays, scheme).positions, positions, "{scheme:?}");
        };
        expect(
            PositionScheme::Continuous,
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        );
        // Input counts 0..5 on its own; output restarts at 0 and runs on.
        expect(
            PositionScheme::GroupDecoupled,
            &[0, 1, 2, 3, 0, 1, 2, 4, 5, 3, 4, 5, 6, 7],
        );
        expect(
            PositionScheme::GapIsolated,
            &[0, 1, 2, 3, 100, 101, 102, 4, 5, 103, 104, 105, 106, 107],
        );
        // Unit 0 continues after frame group 0 (4); unit 1 after group 1 (6), overlapping
        // nothing earlier; the answer continues the output.
        expect(
            PositionScheme::Overlapped,
            &[0, 1, 2, 3, 4, 5, 6, 4, 5, 7, 8, 9, 10, 11],
        );
        // Batch and interleaved are continuous whatever the scheme says.
        for mode in [Mode::Batch, Mode::Interleaved] {
            let layout = small(mode, PositionScheme::GapIsolated);
            assert_eq!(layout.positions, (0..14).collect::<Vec<i64>>());
        }
    }

    #[test]
    fn overlapped_units_longer_than_a_group_never_go_back() {
        let layout = lay_out(
            Mode::Tays,
            PositionScheme::Overlapped,
            &[5],
            1,
            &[vec![1, 7, 7, 7, 2], vec![1, 3, 2]],
        );
        // p f u u u u u f u u u a a: unit 0 at 2..7; frame 1 at 2 (input count);
        // unit 1 starts at max(input end 3, output 7) = 7.
        assert_eq!(
            layout.positions,
            vec![0, 1, 2, 3, 4, 5, 6, 2, 7, 8, 9, 10, 11]
        );
    }

    #[test]
    fn masks_of_each_mode_by_hand() {
        // Rows (tays/interleaved): p0 p1 f0 f1 u0 u1 u2 f2 f3 v0 v1 v2 a0 a1
        let grid = |mode| {
            let layout = small(mode, PositionScheme::Continuous);
            let allowed = layout.allowed(mode);
            let n = layout.len();
            (0..n)
                .map(|q| {
                    (0..n)
                        .map(|k| if allowed[q * n + k] { '1' } else { '.' })
                        .collect()
                })
                .collect::<Vec<String>>()
        };
        #[rustfmt::skip]
        let tays = [
            "1.............", // p0
            "11............", // p1
            "111...........", // f0: the prompt and itself
            "1111..........",
            "11111.........", // unit 0: prompt, group 0, itself causally
            "111111........",
            "1111111.......",
            "1111...1......", // group 1's frames: prompt, group 0, never the text
            "1111...11.....",
            "1111111111....", // unit 1: prompt, groups 0-1, unit 0, itself
            "11111111111...",
            "111111111111..",
            "1111111111111.", // the answer sees everything before it
            "11111111111111",
        ];
        assert_eq!(grid(Mode::Tays), tays);
        // Interleaved: plain causal (frames see the earlier unit).
        let causal: Vec<String> = (0..14)
            .map(|q| (0..14).map(|k| if k <= q { '1' } else { '.' }).collect())
            .collect();
        assert_eq!(grid(Mode::Interleaved), causal);
        assert_eq!(grid(Mode::Batch), causal);
    }

    #[test]
    fn targets_skip_unit_openers_and_weight_skips() {
        let layout = small(Mode::Tays, PositionScheme::GroupDecoupled);
        // Output rows in order: <unit> 7 <sep> | <unit> <skip> <sep> | 9 <eos>
        let targets: Vec<Option<(u32, f32)>> = (0..layout.len())
            .filter(|&i| !layout.input[i])
            .map(|i| layout.targets[i])
            .collect();
        assert_eq!(
            targets,
            vec![
                Some((7, 1.0)),
                Some((2, 1.0)),
                None, // next is <unit>: given, not predicted
                Some((3, 0.5)),
                Some((2, 1.0)),
                Some((9, 1.0)),
                Some((0, 1.0)),
                None,
            ]
        );
        assert!((0..layout.len())
            .filter(|&i| layout.input[i])
            .all(|i| layout.targets[i].is_none()));
    }
}
