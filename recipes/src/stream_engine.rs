//! Streaming inference in real time: frame groups arrive at a fixed interval while text is
//! generated greedily, batch size 1.
//!
//! - `batch` and `tays`: two key/value caches. A frame thread encodes the prompt and each
//!   frame group into the frame cache as the group arrives and hands the cache over; the text
//!   thread writes the units and the answer into the text cache, reading the frame cache as a
//!   read-only prefix of which it sees the groups its mask allows (unit i: groups 0..i; batch:
//!   all, so it waits for the last group). Under `continuous` positions frame group i+1's
//!   positions come after unit i, so the frame thread waits for the text thread to give them.
//! - `interleaved`: one cache on one thread; frames see the text before them, so each group is
//!   encoded after the unit before it is written, and the unit after it.
//!
//! Both paths use the same layer loop and masks as training (a test checks that generation
//! equals the argmax of the training forward of what it generated).

use crate::streaming::{
    Mode, PositionCounter, PositionScheme, Segment, Specials, StreamExample, StreamSetup,
};
use burn::prelude::*;
use burn::tensor::TensorData;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use trainer::model::llama::{Caches, KvCache};
use trainer::model::mask::int_tensor;

use crate::streaming::StreamModel;

/// When frames arrive and how much text may be written.
#[derive(Debug, Clone, Copy)]
pub struct StreamClock {
    /// Group i arrives `(i + 1) * interval` after the question (zero: all at once).
    pub interval: Duration,
    pub max_unit_tokens: usize,
    pub max_answer_tokens: usize,
}

/// What one stream produced and when.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRun {
    /// Each `<unit> ...` as generated (ending in `<sep>` unless cut at the cap).
    pub units: Vec<Vec<u32>>,
    /// The answer as generated (ending in the end of text unless cut at the cap).
    pub answer: Vec<u32>,
    /// From the first group's arrival to the first generated token.
    pub first_token_s: f64,
    /// From the last group's arrival to the end of the answer.
    pub delay_after_last_s: f64,
    /// From the first group's arrival to the end of the answer.
    pub answer_done_s: f64,
    pub generated_tokens: usize,
    /// Time spent generating text (the text thread's forward passes).
    pub decode_s: f64,
}

/// Runs `hidden: [1, n, h]` at `positions` through every layer: the rows attend the first
/// `visible` tokens of `prefix`, everything in `cache` and each other causally, and are
/// appended to `cache`. Returns the last hidden states.
fn run_rows<B: Backend>(
    model: &StreamModel<B>,
    hidden: Tensor<B, 3>,
    positions: &[i64],
    prefix: Option<(&KvCache<B>, usize)>,
    cache: &mut KvCache<B>,
) -> Tensor<B, 3> {
    let lm = &model.language_model;
    let device = model.device();
    let n = positions.len();
    let prefix_len = prefix.map_or(0, |(p, _)| p.len_of(0));
    let visible = prefix.map_or(0, |(_, v)| v);
    let cached = cache.len_of(0);
    let keys = prefix_len + cached + n;
    let mut allowed = Vec::with_capacity(n * keys);
    for q in 0..n {
        allowed.extend((0..prefix_len).map(|k| k < visible));
        allowed.extend((0..cached).map(|_| true));
        allowed.extend((0..n).map(|k| k <= q));
    }
    let allowed =
        Tensor::<B, 4, Bool>::from_data(TensorData::new(allowed, [1, 1, n, keys]), &device);
    let context = lm.masked_context(int_tensor(&[positions.to_vec()], &device), allowed);
    let caches = Caches {
        prefix: prefix.map(|(p, _)| p),
        cache: Some(cache),
    };
    lm.decode(hidden, &context, caches, &mut lm.inference_plan())
        .hidden
}

fn embed_text<B: Backend>(model: &StreamModel<B>, tokens: &[u32]) -> Tensor<B, 3> {
    let device = model.device();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    model.language_model.embed(int_tensor(&[ids], &device))
}

fn embed_frames<B: Backend>(model: &StreamModel<B>, values: &[f32]) -> Tensor<B, 3> {
    model.frame_tokens(values).unsqueeze()
}

/// The text side: the text cache, positions, and the time spent.
struct TextWriter<'a, B: Backend> {
    model: &'a StreamModel<B>,
    cache: KvCache<B>,
    counter: PositionCounter,
    decode_s: f64,
    generated: usize,
    first_token: Option<Instant>,
}

impl<B: Backend> TextWriter<'_, B> {
    /// Feeds one output token; returns the greedy next token.
    fn feed(&mut self, token: u32, frames: Option<(&KvCache<B>, usize)>) -> u32 {
        let start = Instant::now();
        let position = self.counter.next(false);
        let hidden = run_rows(
            self.model,
            embed_text(self.model, &[token]),
            &[position],
            frames,
            &mut self.cache,
        );
        let logits = self.model.language_model.head(hidden);
        let next: i64 = logits
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("ints")[0];
        self.decode_s += start.elapsed().as_secs_f64();
        next as u32
    }

    /// Writes unit `i`: `<unit>` (given), then greedy tokens up to `<sep>` or `cap` of them.
    /// Every token is fed, the last too (what comes later sees the whole unit), so the token
    /// that would follow the unit comes back with it.
    fn write_unit(
        &mut self,
        i: usize,
        specials: Specials,
        cap: usize,
        frames: Option<(&KvCache<B>, usize)>,
    ) -> (Vec<u32>, u32) {
        self.counter.begin(Segment::Unit(i));
        let mut unit = vec![specials.unit];
        let mut next = self.feed(specials.unit, frames);
        while unit.last() != Some(&specials.sep) && unit.len() - 1 < cap {
            unit.push(next);
            self.count_generated();
            next = self.feed(next, frames);
        }
        (unit, next)
    }

    /// Writes the answer from `first` (chosen after the last unit) up to the end of text or
    /// `cap` tokens; its last token needs no feeding.
    fn write_answer(
        &mut self,
        first: u32,
        specials: Specials,
        cap: usize,
        frames: Option<(&KvCache<B>, usize)>,
    ) -> Vec<u32> {
        self.counter.begin(Segment::Answer);
        let mut answer = vec![first];
        self.count_generated();
        while answer.last() != Some(&specials.eos) && answer.len() < cap {
            let next = self.feed(*answer.last().expect("not empty"), frames);
            answer.push(next);
            self.count_generated();
        }
        answer
    }

    fn count_generated(&mut self) {
        self.generated += 1;
        self.first_token.get_or_insert_with(Instant::now);
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Runs one stream in real time (see the module comment).
pub fn run_stream<B: Backend>(
    model: &StreamModel<B>,
    example: &StreamExample,
    setup: &StreamSetup,
    clock: StreamClock,
) -> StreamRun {
    let (mode, specials) = (setup.mode, setup.specials);
    let groups = example.groups.len();
    let frame_tokens = model.tokens_per_frame() * example.groups[0].len() / model.format.values();
    let start = Instant::now();
    let arrival = |group: usize| start + clock.interval * (group as u32 + 1);
    let mut text = TextWriter {
        model,
        cache: model.new_cache(),
        counter: setup.position_counter(),
        decode_s: 0.0,
        generated: 0,
        first_token: None,
    };
    let mut units = Vec::with_capacity(groups);
    let answer;
    match mode {
        Mode::Interleaved => {
            let positions = text.counter.segment(Segment::Prompt, example.prompt.len());
            run_rows(
                model,
                embed_text(model, &example.prompt),
                &positions,
                None,
                &mut text.cache,
            );
            let mut next = specials.unit;
            for (i, group) in example.groups.iter().enumerate() {
                sleep_until(arrival(i));
                let positions = text.counter.segment(Segment::Frames(i), frame_tokens);
                run_rows(
                    model,
                    embed_frames(model, group),
                    &positions,
                    None,
                    &mut text.cache,
                );
                let (unit, after) = text.write_unit(i, specials, clock.max_unit_tokens, None);
                units.push(unit);
                next = after;
            }
            answer = text.write_answer(next, specials, clock.max_answer_tokens, None);
        }
        Mode::Batch | Mode::Tays => {
            let frames_wait_for_text =
                mode == Mode::Tays && setup.scheme == PositionScheme::Continuous;
            let (ready_tx, ready_rx) = mpsc::channel::<(usize, KvCache<B>)>();
            let (positions_tx, positions_rx) = mpsc::channel::<Vec<i64>>();
            let frame_model = model.clone();
            let prompt_len = example.prompt.len();
            answer = std::thread::scope(|scope| {
                scope.spawn(move || {
                    let model = &frame_model;
                    let mut cache = model.new_cache();
                    // Input positions do not depend on text except under continuous tays.
                    let mut counter = setup.position_counter();
                    let positions = counter.segment(Segment::Prompt, example.prompt.len());
                    run_rows(
                        model,
                        embed_text(model, &example.prompt),
                        &positions,
                        None,
                        &mut cache,
                    );
                    for (i, group) in example.groups.iter().enumerate() {
                        sleep_until(arrival(i));
                        let positions = if frames_wait_for_text {
                            match positions_rx.recv() {
                                Ok(positions) => positions,
                                Err(_) => return,
                            }
                        } else {
                            counter.segment(Segment::Frames(i), frame_tokens)
                        };
                        run_rows(
                            model,
                            embed_frames(model, group),
                            &positions,
                            None,
                            &mut cache,
                        );
                        if ready_tx.send((i + 1, cache.clone())).is_err() {
                            return;
                        }
                    }
                });
                text.counter.segment(Segment::Prompt, prompt_len);
                let mut frames: Option<(usize, KvCache<B>)> = None;
                let wait_for = |groups_needed: usize, frames: &mut Option<(usize, KvCache<B>)>| {
                    while frames
                        .as_ref()
                        .is_none_or(|(ready, _)| *ready < groups_needed)
                    {
                        *frames = Some(ready_rx.recv().expect("the frame thread stopped"));
                    }
                };
                let visible = |groups_seen: usize| prompt_len + groups_seen * frame_tokens;
                if mode == Mode::Batch {
                    for i in 0..groups {
                        text.counter.segment(Segment::Frames(i), frame_tokens);
                    }
                    wait_for(groups, &mut frames);
                }
                let mut next = specials.unit;
                for i in 0..groups {
                    if mode == Mode::Tays {
                        let positions = text.counter.segment(Segment::Frames(i), frame_tokens);
                        if frames_wait_for_text {
                            positions_tx
                                .send(positions)
                                .expect("the frame thread stopped");
                        }
                        wait_for(i + 1, &mut frames);
                    }
                    let seen = if mode == Mode::Batch { groups } else { i + 1 };
                    let cache = &frames.as_ref().expect("frames ready").1;
                    let frames = Some((cache, visible(seen)));
                    let (unit, after) = text.write_unit(i, specials, clock.max_unit_tokens, frames);
                    units.push(unit);
                    next = after;
                }
                let cache = &frames.as_ref().expect("frames ready").1;
                let frames = Some((cache, visible(groups)));
                text.write_answer(next, specials, clock.max_answer_tokens, frames)
            });
        }
    }
    let end = Instant::now();
    let first_frame = arrival(0);
    StreamRun {
        units,
        answer,
        first_token_s: text.first_token.map_or(f64::NAN, |t| {
            t.saturating_duration_since(first_frame).as_secs_f64()
        }),
        delay_after_last_s: end
            .saturating_duration_since(arrival(groups - 1))
            .as_secs_f64(),
        answer_done_s: end.saturating_duration_since(first_frame).as_secs_f64(),
        generated_tokens: text.generated,
        decode_s: text.decode_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::StreamBatch;
    use datasets::stream::FrameFormat;
    use trainer::model::config::LlamaConfig;
    use trainer::model::init::ParamInit;
    use trainer::CausalLm;

    type B = trainer::Cpu;

    const SPECIALS: Specials = Specials {
        unit: 1,
        sep: 2,
        skip: 3,
        eos: 0,
    };

    fn model() -> StreamModel<B> {
        let device = Default::default();
        let config = LlamaConfig::tiny(12, 32, 2, 4, 2);
        let mut init = ParamInit::normal(5, 0.3);
        let lm = CausalLm::new(&config, &mut init, &device);
        StreamModel::new(
            FrameFormat::Features { tokens: 2, dim: 3 },
            None,
            lm,
            &mut init,
            &device,
        )
        .unwrap()
    }

    fn setup(mode: Mode, scheme: PositionScheme) -> StreamSetup {
        StreamSetup {
            mode,
            scheme,
            gap_offset: 50,
            skip_weight: 1.0,
            specials: SPECIALS,
        }
    }

    fn example() -> StreamExample {
        let groups = (0..3)
            .map(|g| {
                (0..12)
                    .map(|i| ((g * 12 + i) as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        StreamExample {
            prompt: vec![5, 6, 7],
            groups,
            units: vec![],
            answer: vec![],
        }
    }

    /// Generation equals the argmax of the training forward of what it generated: the real
    /// path's caches, masks and positions are the training layout's.
    #[test]
    fn generation_matches_the_training_forward_in_every_mode_and_scheme() {
        let model = model();
        let clock = StreamClock {
            interval: Duration::ZERO,
            max_unit_tokens: 3,
            max_answer_tokens: 3,
        };
        let cases = [
            (Mode::Batch, PositionScheme::Continuous),
            (Mode::Interleaved, PositionScheme::Continuous),
        ]
        .into_iter()
        .chain(PositionScheme::all().into_iter().map(|s| (Mode::Tays, s)));
        let mut outputs = vec![];
        for (mode, scheme) in cases {
            let setup = setup(mode, scheme);
            let run = run_stream(&model, &example(), &setup, clock);
            assert_eq!(run.units.len(), 3);
            let mut generated = example();
            generated.units = run.units.clone();
            generated.answer = run.answer.clone();
            let batch = StreamBatch::new(&[&generated], &setup, 4, 0);
            let argmax: Vec<i64> = model
                .forward(&batch)
                .argmax(2)
                .flatten::<1>(0, 2)
                .into_data()
                .convert::<i64>()
                .to_vec()
                .unwrap();
            let mut checked = 0;
            for (row, target) in batch.targets[0].iter().enumerate() {
                if batch.weights[0][row] > 0.0 {
                    assert_eq!(argmax[row], *target as i64, "{mode:?} {scheme:?} row {row}");
                    checked += 1;
                }
            }
            // Every generated token was checked (as the target of the token before it), but
            // a generated `<unit>`: the layout takes that for a given opener.
            let generated = run.units.iter().flat_map(|u| &u[1..]).chain(&run.answer);
            let expected = generated.filter(|&&t| t != SPECIALS.unit).count();
            assert_eq!(checked, expected, "{mode:?} {scheme:?}");
            assert_eq!(
                run.generated_tokens,
                run.units.iter().map(|u| u.len() - 1).sum::<usize>() + run.answer.len()
            );
            outputs.push(run.units.concat());
        }
        // The schemes are different models of position: not all give the same text.
        outputs.dedup();
        assert!(outputs.len() > 1);
    }

    #[test]
    fn frames_arrive_in_real_time() {
        let model = model();
        let clock = StreamClock {
            interval: Duration::from_millis(30),
            max_unit_tokens: 2,
            max_answer_tokens: 2,
        };
        let started = Instant::now();
        let batch_setup = setup(Mode::Batch, PositionScheme::Continuous);
        let batch = run_stream(&model, &example(), &batch_setup, clock);
        // The last group arrives at 90 ms; batch writes nothing before it.
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert!(batch.first_token_s >= 0.06, "{}", batch.first_token_s);
        let tays_setup = setup(Mode::Tays, PositionScheme::GroupDecoupled);
        let tays = run_stream(&model, &example(), &tays_setup, clock);
        assert!(tays.first_token_s < batch.first_token_s);
        assert!(tays.generated_tokens > 0 && tays.decode_s > 0.0);
    }
}
