//! A vision-language model made of the shared modules (ViT tower, projector, a Llama-family
//! language model) and the one place its layers run with visual tokens: a recipe-side loop
//! over the language model's layer calls ([`CausalLm::run_layer`]) in which a
//! [`VisualSchedule`] says at which layer the visual tokens enter, after which layers they are
//! pruned to how many, and at which layer they leave.
//!
//! - The full-token baseline ([`VisualSchedule::full`]): every visual token from layer 0.
//! - HiDrop: late entry, pruning scored by the next layer's attention from the last prompt
//!   token, early exit.
//! - EmbedLens's interventions: given visual tokens removed, or all injected at layer L.
//!
//! Text and visual tokens are kept as two parts with their own attention contexts and put side
//! by side for each layer: attention follows position ids (see `model::attention`), so text
//! keeps the positions it has in the full sequence whether or not the visual tokens are there
//! (persistent positions), and kept visual tokens keep theirs.

use anyhow::{bail, Result};
use burn::prelude::*;
use datasets::shapes::{VqaRecord, IMAGE_PLACEHOLDER};
use datasets::TextTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;
use trainer::loss::token_nll_sum;
use trainer::model::init::ParamInit;
use trainer::model::llama::{Context, KvAccess, LayerExec, TokenSlots};
use trainer::model::mask::{int_tensor, token_tensor};
use trainer::model::token_pruning::{attention_received, hard_top_k, random_k, rank_sigmoid_top_k};
use trainer::model::vision::{Projector, VisionConfig, VisionTower};
use trainer::train::{MicroBatch, MicroBatchShare, Trainable};
use trainer::CausalLm;

/// One question, tokenized: the prompt's text before and after its image, and the answer
/// (ending in the end-of-text token).
#[derive(Debug, Clone)]
pub struct VqaExample {
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    pub answer: Vec<u32>,
    pub pixels: Vec<f32>,
}

/// Tokenizes records; `what` names the set in errors.
pub fn tokenize(
    records: &[VqaRecord],
    tokenizer: &TextTokenizer,
    eos: u32,
    what: &str,
) -> Result<Vec<VqaExample>> {
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let Some((before, after)) = record.prompt.split_once(IMAGE_PLACEHOLDER) else {
                bail!("{what} record {}: no {IMAGE_PLACEHOLDER} in the prompt", i + 1);
            };
            let after = tokenizer.encode(after, false)?;
            if after.is_empty() {
                bail!(
                    "{what} record {}: the prompt must go on after {IMAGE_PLACEHOLDER} (the question)",
                    i + 1
                );
            }
            let mut answer = tokenizer.encode(&record.answer, false)?;
            answer.push(eos);
            Ok(VqaExample {
                before: tokenizer.encode(before, false)?,
                after,
                answer,
                pixels: record.image.pixels.clone(),
            })
        })
        .collect()
}

/// The tokenized splits and what every model needs to read them.
pub struct Prepared {
    pub tokenizer: TextTokenizer,
    pub tokenizer_dir: PathBuf,
    pub train: Vec<VqaExample>,
    pub dev: Vec<VqaExample>,
    pub test: Vec<VqaExample>,
    pub pad_id: u32,
    pub source: String,
}

/// A padded batch of questions: text tokens (right-padded) at their positions in the full
/// sequence, the visual tokens' positions, next-token targets on the answers.
#[derive(Debug, Clone)]
pub struct VqaBatch {
    /// `[rows, 3, size, size]` flattened.
    pub pixels: Vec<f32>,
    pub image_size: usize,
    pub tokens: Vec<Vec<u32>>,
    pub positions: Vec<Vec<i64>>,
    pub valid: Vec<Vec<bool>>,
    /// The next token of each text token, and whether it is trained on (answers only).
    pub targets: Vec<Vec<u32>>,
    pub selected: Vec<Vec<bool>>,
    pub visual_positions: Vec<Vec<i64>>,
    /// False on visual tokens removed before layer 0 (EmbedLens's interventions).
    pub visual_valid: Vec<Vec<bool>>,
    /// Per row, the text index of the last prompt token: the query that scores visual tokens.
    pub query: Vec<i64>,
    /// Seeds the random-selection control.
    pub seed: u64,
}

impl VqaBatch {
    /// `with_answers = false` leaves the answers out (a prefill of the prompts).
    pub fn new(
        examples: &[&VqaExample],
        num_patches: usize,
        image_size: usize,
        pad_id: u32,
        with_answers: bool,
        seed: u64,
    ) -> Self {
        let text = |e: &VqaExample| {
            let answer: &[u32] = if with_answers { &e.answer } else { &[] };
            [e.before.as_slice(), &e.after, answer].concat()
        };
        let width = examples.iter().map(|e| text(e).len()).max().unwrap_or(0);
        let mut batch = Self {
            pixels: examples.iter().flat_map(|e| e.pixels.clone()).collect(),
            image_size,
            tokens: vec![],
            positions: vec![],
            valid: vec![],
            targets: vec![],
            selected: vec![],
            visual_positions: vec![],
            visual_valid: vec![vec![true; num_patches]; examples.len()],
            query: vec![],
            seed,
        };
        for example in examples {
            let row = text(example);
            let before = example.before.len();
            let prompt = before + example.after.len();
            let mut positions: Vec<i64> = (0..row.len())
                .map(|j| (j + if j < before { 0 } else { num_patches }) as i64)
                .collect();
            let mut targets = vec![pad_id; width];
            let mut selected = vec![false; width];
            for j in prompt.saturating_sub(1)..row.len().saturating_sub(1) {
                targets[j] = row[j + 1];
                selected[j] = true;
            }
            positions.resize(width, 0);
            let mut valid = vec![true; row.len()];
            valid.resize(width, false);
            let mut tokens = row;
            tokens.resize(width, pad_id);
            batch.tokens.push(tokens);
            batch.positions.push(positions);
            batch.valid.push(valid);
            batch.targets.push(targets);
            batch.selected.push(selected);
            batch
                .visual_positions
                .push((before..before + num_patches).map(|p| p as i64).collect());
            batch.query.push(prompt as i64 - 1);
        }
        batch
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

impl MicroBatch for VqaBatch {
    fn num_targets(&self) -> usize {
        self.selected.iter().flatten().filter(|&&s| s).count()
    }

    fn num_inputs(&self) -> usize {
        let text: usize = self.valid.iter().flatten().filter(|&&v| v).count();
        text + self.visual_positions.iter().map(Vec::len).sum::<usize>()
    }
}

/// How visual tokens are chosen at a pruning layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Selection {
    /// By the attention they receive, through HiDrop's rank-sigmoid top-k; kept features are
    /// scaled by their soft mask.
    Differentiable { lambda: f64, temperature: f64 },
    /// By the attention they receive, hard top-k (the control for the soft mask).
    Hard,
    /// At random, same budget (the control for choosing by attention).
    Random,
}

/// When visual tokens take part: they enter before layer `entry_layer`, after each layer of
/// `prune` `(layer, keep)` only the `keep` best go on, and before `exit_layer` they leave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisualSchedule {
    pub entry_layer: usize,
    pub prune: Vec<(usize, usize)>,
    pub exit_layer: Option<usize>,
    pub selection: Selection,
}

impl VisualSchedule {
    /// Every visual token in every layer (the usual vision-language model).
    pub fn full() -> Self {
        Self::injected_at(0)
    }

    /// Every visual token from layer `layer` on.
    pub fn injected_at(layer: usize) -> Self {
        Self {
            entry_layer: layer,
            prune: vec![],
            exit_layer: None,
            selection: Selection::Hard,
        }
    }

    /// Visual tokens present in each of `layers` layers, of `n` per image.
    pub fn tokens_per_layer(&self, layers: usize, n: usize) -> Vec<usize> {
        let mut present = 0;
        (0..layers)
            .map(|layer| {
                if layer == self.entry_layer {
                    present = n;
                }
                if Some(layer) == self.exit_layer {
                    present = 0;
                }
                let here = present;
                if let Some(&(_, keep)) = self.prune.iter().find(|(after, _)| *after == layer) {
                    present = present.min(keep);
                }
                here
            })
            .collect()
    }

    /// The share of visual tokens present, averaged over layers.
    pub fn kept_share(&self, layers: usize, n: usize) -> f64 {
        let counts = self.tokens_per_layer(layers, n);
        counts.iter().sum::<usize>() as f64 / (layers * n) as f64
    }
}

/// What a forward pass gives: next-token logits at the text tokens, and the visual tokens
/// present in each layer (their positions).
pub struct VlmOutput<B: Backend> {
    pub logits: Tensor<B, 3>,
    pub visual_positions: Vec<Option<Tensor<B, 2, Int>>>,
}

#[derive(Module, Debug)]
pub struct VisionLanguageModel<B: Backend> {
    pub vision_tower: VisionTower<B>,
    pub multi_modal_projector: Projector<B>,
    pub language_model: CausalLm<B>,
}

impl<B: Backend> VisionLanguageModel<B> {
    pub fn new(
        vision: &VisionConfig,
        language_model: CausalLm<B>,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Self {
        Self {
            vision_tower: VisionTower::new(vision, init, device),
            multi_modal_projector: Projector::new(
                vision.hidden_size,
                language_model.config.hidden_size,
                init,
                device,
            ),
            language_model,
        }
    }

    pub fn num_patches(&self) -> usize {
        self.vision_tower.config.num_patches()
    }

    /// The visual tokens of `batch`'s images in the language model's embedding space,
    /// `[rows, patches, hidden]`.
    pub fn visual_tokens(&self, batch: &VqaBatch) -> Tensor<B, 3> {
        let size = batch.image_size;
        let images = Tensor::<B, 1>::from_floats(batch.pixels.as_slice(), &self.device())
            .reshape([batch.rows(), 3, size, size]);
        self.multi_modal_projector
            .forward(self.vision_tower.forward(images))
    }

    pub fn device(&self) -> B::Device {
        self.language_model.device()
    }

    /// Runs the language model's layers on `batch` with its visual tokens as `schedule` says.
    pub fn forward(&self, batch: &VqaBatch, schedule: &VisualSchedule) -> VlmOutput<B> {
        let lm = &self.language_model;
        let device = self.device();
        let slots = |positions: &[Vec<i64>], valid: &[Vec<bool>]| {
            lm.context(TokenSlots::from_rows(positions, valid, &device))
        };
        let text_context = slots(&batch.positions, &batch.valid);
        let mut text = lm.embed(token_tensor(&batch.tokens, &device));
        let text_len = text.dims()[1];
        let query = int_tensor(
            &batch.query.iter().map(|&q| vec![q]).collect::<Vec<_>>(),
            &device,
        );
        let entering = (schedule.entry_layer < lm.num_layers()).then(|| {
            (
                slots(&batch.visual_positions, &batch.visual_valid),
                self.visual_tokens(batch),
            )
        });
        let mut visual: Option<(Context<B>, Tensor<B, 3>)> = None;
        let mut visual_positions = Vec::with_capacity(lm.num_layers());
        for layer in 0..lm.num_layers() {
            if layer == schedule.entry_layer {
                visual = entering.clone();
            }
            if Some(layer) == schedule.exit_layer {
                visual = None;
            }
            visual_positions.push(
                visual
                    .as_ref()
                    .map(|(context, _)| context.tokens.positions.clone()),
            );
            let (context, hidden) = match &visual {
                Some((visual_context, visual_hidden)) => (
                    Context::cat(&[&text_context, visual_context]),
                    Tensor::cat(vec![text, visual_hidden.clone()], 1),
                ),
                None => (text_context.clone(), text),
            };
            let hidden = lm
                .run_layer(layer, hidden, &context, KvAccess::none(), &LayerExec::Dense)
                .hidden;
            let Some((visual_context, _)) = visual.take() else {
                text = hidden;
                continue;
            };
            let total = hidden.dims()[1];
            text = hidden.clone().slice(s![.., 0..text_len, ..]);
            let visual_hidden = hidden.clone().slice(s![.., text_len..total, ..]);
            let n = total - text_len;
            let keep = schedule
                .prune
                .iter()
                .find(|(after, _)| *after == layer)
                .map(|&(_, keep)| keep.min(n));
            visual = Some(match keep {
                Some(k) if layer + 1 < lm.num_layers() && k < n => {
                    let scores = || {
                        let next = &lm.model.layers[layer + 1];
                        let normed = next.input_layernorm.forward(hidden.clone().detach());
                        let probs =
                            next.self_attn
                                .probabilities_of(normed, &context, query.clone());
                        attention_received(probs, text_len..total)
                    };
                    match schedule.selection {
                        Selection::Differentiable {
                            lambda,
                            temperature,
                        } => {
                            let top = rank_sigmoid_top_k(scores(), k, lambda, temperature);
                            let (kept_context, kept) =
                                visual_context.select(visual_hidden, top.indices);
                            (kept_context, kept * top.mask.unsqueeze_dim(2))
                        }
                        Selection::Hard => {
                            visual_context.select(visual_hidden, hard_top_k(scores(), k))
                        }
                        Selection::Random => visual_context.select(
                            visual_hidden,
                            random_k(
                                batch.rows(),
                                n,
                                k,
                                batch.seed ^ (layer as u64).wrapping_mul(0x9E37_79B9),
                                &device,
                            ),
                        ),
                    }
                }
                _ => (visual_context, visual_hidden),
            });
        }
        VlmOutput {
            logits: lm.head(text),
            visual_positions,
        }
    }

    /// Next-token loss on the answers, a mean over the step's answer tokens.
    pub fn answer_loss(
        &self,
        batch: &VqaBatch,
        schedule: &VisualSchedule,
        share: MicroBatchShare,
    ) -> Tensor<B, 1> {
        let device = self.device();
        let logits = self.forward(batch, schedule).logits;
        let selected: Vec<f32> = batch
            .selected
            .iter()
            .flatten()
            .map(|&s| s as u8 as f32)
            .collect();
        let selected = Tensor::<B, 1>::from_floats(selected.as_slice(), &device)
            .reshape([batch.rows(), batch.tokens[0].len()]);
        token_nll_sum(logits, token_tensor(&batch.targets, &device), selected)
            .div_scalar(share.total_targets as f64)
    }

    /// Per row, whether greedy decoding gives the reference answer exactly: the argmax at
    /// every answer position is the reference token (so greedy decoding never leaves it).
    pub fn answers_correct(&self, batch: &VqaBatch, schedule: &VisualSchedule) -> Vec<bool> {
        let logits = self.forward(batch, schedule).logits;
        let [rows, width, _] = logits.dims();
        let argmax: Vec<i64> = logits
            .argmax(2)
            .reshape([rows * width])
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("ints");
        (0..rows)
            .map(|r| {
                (0..width)
                    .filter(|&j| batch.selected[r][j])
                    .all(|j| argmax[r * width + j] == batch.targets[r][j] as i64)
            })
            .collect()
    }
}

/// Whether each of `examples` is answered right under `schedule` (in batches); `prepare`
/// may edit each batch first (EmbedLens removes tokens).
pub fn correctness<B: Backend>(
    model: &VisionLanguageModel<B>,
    examples: &[VqaExample],
    schedule: &VisualSchedule,
    batch_size: usize,
    pad_id: u32,
    prepare: &mut dyn FnMut(usize, &mut VqaBatch),
) -> Vec<bool> {
    let mut correct = Vec::with_capacity(examples.len());
    for (index, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
        let refs: Vec<&VqaExample> = chunk.iter().collect();
        let mut batch = VqaBatch::new(
            &refs,
            model.num_patches(),
            model.vision_tower.config.image_size,
            pad_id,
            true,
            index as u64,
        );
        prepare(index * batch_size.max(1), &mut batch);
        correct.extend(model.answers_correct(&batch, schedule));
    }
    correct
}

impl<B: burn::tensor::backend::AutodiffBackend> Trainable<B> for VisionLanguageModel<B> {
    fn config_json(&self) -> Value {
        json!({
            "kind": "vision-language",
            "vision_config": self.vision_tower.config,
            "text_config": self.language_model.config.to_json(),
        })
    }

    fn device(&self) -> B::Device {
        VisionLanguageModel::device(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::model::llama::Caches;
    use trainer::{Cpu, LlamaConfig};

    type B = Cpu;

    const PATCHES: usize = 4;

    fn tiny_model() -> VisionLanguageModel<B> {
        tiny_model_on::<B>()
    }

    fn tiny_model_on<M: Backend>() -> VisionLanguageModel<M> {
        let device = Default::default();
        let config = LlamaConfig::tiny(20, 16, 4, 2, 1);
        let lm = CausalLm::new(&config, &mut ParamInit::normal(3, 0.2), &device);
        let vision = VisionConfig {
            image_size: 8,
            patch_size: 4,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
        };
        VisionLanguageModel::new(&vision, lm, &mut ParamInit::normal(4, 0.2), &device)
    }

    /// Two questions whose images sit at different places of their prompts.
    fn examples() -> Vec<VqaExample> {
        let pixels = |shift: f32| {
            (0..3 * 64)
                .map(|i| ((i as f32 * 0.37 + shift).sin() + 1.0) / 2.0)
                .collect()
        };
        vec![
            VqaExample {
                before: vec![1],
                after: vec![5, 6, 7],
                answer: vec![8, 0],
                pixels: pixels(0.0),
            },
            VqaExample {
                before: vec![2, 3, 4],
                after: vec![9],
                answer: vec![10, 11, 0],
                pixels: pixels(1.0),
            },
        ]
    }

    fn batch(examples: &[VqaExample]) -> VqaBatch {
        let refs: Vec<&VqaExample> = examples.iter().collect();
        VqaBatch::new(&refs, PATCHES, 8, 0, true, 1)
    }

    fn values(t: Tensor<B, 3>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// The logits of one row decoded the ordinary way: the whole sequence (text with the
    /// visual tokens at the placeholder) at positions 0, 1, 2, ... through `CausalLm::decode`.
    fn ordinary_logits(
        model: &VisionLanguageModel<B>,
        b: &VqaBatch,
        row: usize,
        example: &VqaExample,
    ) -> Vec<f32> {
        let device = Default::default();
        let lm = &model.language_model;
        let visual = model.visual_tokens(b).slice(s![row..row + 1, .., ..]);
        let embed = |ids: &[u32]| lm.embed(token_tensor(&[ids.to_vec()], &device));
        let after: Vec<u32> = [example.after.as_slice(), &example.answer].concat();
        let hidden = Tensor::cat(vec![embed(&example.before), visual, embed(&after)], 1);
        let n = hidden.dims()[1];
        let positions = vec![(0..n as i64).collect::<Vec<_>>()];
        let context = lm.context(TokenSlots::from_rows(&positions, &[vec![true; n]], &device));
        let decoded = lm.decode(hidden, &context, Caches::default(), &mut |_, _| {
            LayerExec::Dense
        });
        let logits = lm.head(decoded.hidden);
        // The text rows only, in text order.
        let before = example.before.len();
        let text_rows: Vec<usize> = (0..before).chain(before + PATCHES..n).collect();
        text_rows
            .iter()
            .flat_map(|&i| values(logits.clone().slice(s![.., i..i + 1, ..])))
            .collect()
    }

    fn row_logits(logits: &Tensor<B, 3>, row: usize, len: usize) -> Vec<f32> {
        values(logits.clone().slice(s![row..row + 1, 0..len, ..]))
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
    }

    #[test]
    fn all_visual_tokens_from_layer_0_is_the_ordinary_forward() {
        let model = tiny_model();
        let examples = examples();
        let b = batch(&examples);
        let out = model.forward(&b, &VisualSchedule::full());
        for (row, example) in examples.iter().enumerate() {
            let len = example.before.len() + example.after.len() + example.answer.len();
            assert!(
                close(
                    &row_logits(&out.logits, row, len),
                    &ordinary_logits(&model, &b, row, example)
                ),
                "row {row}"
            );
        }
        assert!(out.visual_positions.iter().all(Option::is_some));
    }

    #[test]
    fn text_keeps_its_positions_when_the_visual_tokens_are_not_there() {
        let model = tiny_model();
        let examples = examples();
        let b = batch(&examples);
        let layers = model.language_model.num_layers();
        // Visual tokens never enter: the text alone, at the positions it has in the full
        // sequence (with the gap where the image would be).
        let out = model.forward(&b, &VisualSchedule::injected_at(layers));
        assert!(out.visual_positions.iter().all(Option::is_none));
        let device = Default::default();
        let lm = &model.language_model;
        let at = |positions: Vec<Vec<i64>>| {
            let valid = b.valid.clone();
            let context = lm.context(TokenSlots::from_rows(&positions, &valid, &device));
            let decoded = lm.decode(
                lm.embed(token_tensor(&b.tokens, &device)),
                &context,
                Caches::default(),
                &mut |_, _| LayerExec::Dense,
            );
            lm.head(decoded.hidden)
        };
        let persistent = at(b.positions.clone());
        let contiguous = at(b
            .tokens
            .iter()
            .map(|r| (0..r.len() as i64).collect())
            .collect());
        let len = 6; // row 0: 1 + 3 + 2 text tokens
        let got = row_logits(&out.logits, 0, len);
        assert!(close(&got, &row_logits(&persistent, 0, len)));
        assert!(
            !close(&got, &row_logits(&contiguous, 0, len)),
            "positions matter here"
        );
        // Injected later, text before the entry layer is the same computation as without
        // images; what comes out differs (the images are seen).
        let late = model.forward(&b, &VisualSchedule::injected_at(2));
        assert!(late.visual_positions[..2].iter().all(Option::is_none));
        assert!(!close(&row_logits(&late.logits, 0, len), &got));
    }

    #[test]
    fn pruning_keeps_k_tokens_at_their_positions_and_early_exit_removes_all() {
        let model = tiny_model();
        let examples = examples();
        let b = batch(&examples);
        for selection in [
            Selection::Differentiable {
                lambda: 1.0,
                temperature: 0.1,
            },
            Selection::Hard,
            Selection::Random,
        ] {
            let schedule = VisualSchedule {
                entry_layer: 1,
                prune: vec![(1, 3), (2, 1)],
                exit_layer: Some(3),
                selection,
            };
            let out = model.forward(&b, &schedule);
            let present: Vec<Option<Vec<i64>>> = out
                .visual_positions
                .iter()
                .map(|p| {
                    p.clone()
                        .map(|t| t.into_data().convert::<i64>().to_vec().unwrap())
                })
                .collect();
            assert_eq!(present[0], None, "{selection:?}: not entered yet");
            // Row 0's image sits at positions 1..5, row 1's at 3..7.
            assert_eq!(present[1], Some(vec![1, 2, 3, 4, 3, 4, 5, 6]));
            let after_first = present[2].clone().unwrap();
            assert_eq!(after_first.len(), 2 * 3, "{selection:?}: 3 kept per row");
            for (row, kept) in after_first.chunks(3).enumerate() {
                let first = [1, 3][row];
                assert!(
                    kept.windows(2).all(|w| w[0] < w[1]),
                    "{selection:?}: in order {kept:?}"
                );
                assert!(
                    kept.iter().all(|p| (first..first + 4).contains(p)),
                    "{selection:?}: {kept:?}"
                );
            }
            let after_second = present[3].clone();
            assert_eq!(after_second, None, "{selection:?}: gone at the exit layer");
            assert_eq!(schedule.tokens_per_layer(4, PATCHES), vec![0, 4, 3, 0]);
        }
    }

    #[test]
    fn the_papers_tok64_schedule_averages_64_visual_tokens_per_layer() {
        for exit in 19..=32 {
            let schedule = VisualSchedule {
                entry_layer: 9,
                prune: vec![(10, 215), (14, 10), (16, 5), (18, 1)],
                exit_layer: (exit < 32).then_some(exit),
                selection: Selection::Hard,
            };
            let mean = schedule.kept_share(32, 576) * 576.0;
            assert!((63.8..=64.3).contains(&mean), "exit {exit}: {mean}");
        }
    }

    #[test]
    fn removed_visual_tokens_change_the_answer_logits_and_loss_covers_answers_only() {
        let model = tiny_model();
        let examples = examples();
        let mut b = batch(&examples);
        assert_eq!(b.num_targets(), 2 + 3);
        assert_eq!(b.query, vec![3, 3]);
        let full = model.forward(&b, &VisualSchedule::full()).logits;
        b.visual_valid[0] = vec![false; PATCHES];
        let removed = model.forward(&b, &VisualSchedule::full()).logits;
        assert!(!close(
            &row_logits(&full, 0, 6),
            &row_logits(&removed, 0, 6)
        ));
        assert!(
            close(&row_logits(&full, 1, 7), &row_logits(&removed, 1, 7)),
            "other rows untouched"
        );
    }

    #[test]
    fn the_answer_loss_reaches_the_vision_tower_under_every_schedule() {
        let model = tiny_model_on::<burn::backend::Autodiff<Cpu>>();
        let examples = examples();
        let batch = batch(&examples);
        let share = MicroBatchShare {
            index: 0,
            count: 1,
            peers: 1,
            total_targets: batch.num_targets(),
        };
        for schedule in [
            VisualSchedule::full(),
            VisualSchedule {
                entry_layer: 1,
                prune: vec![(1, 2)],
                exit_layer: Some(3),
                selection: Selection::Differentiable {
                    lambda: 1.0,
                    temperature: 0.1,
                },
            },
        ] {
            let grads = model.answer_loss(&batch, &schedule, share).backward();
            let grad = model
                .vision_tower
                .patch_embedding
                .weight
                .grad(&grads)
                .expect("a gradient");
            let size: f32 = grad.abs().sum().into_scalar();
            assert!(size > 0.0, "{schedule:?}");
        }
    }
}
