//! Our Llama-family model against `transformers` on the fixtures of
//! `scripts/make_hf_fixtures.py`: logits, greedy generation, tokenizer, save and reload.

mod common;

use checkpoints::{StoreDtype, WeightSource};
use common::*;
use datasets::TextTokenizer;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use trainer::generate::{generate, GenerationConfig};
use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use trainer::sampling::SamplingParams;
use trainer::weights::named_tensors;
use trainer::{CausalLm, Cpu};

const TOLERANCE: f32 = 1e-4;
/// Two logits this close may be ordered either way by another CPU's rounding (both sides
/// are within `TOLERANCE` of the reference).
const TIE: f32 = 4.0 * TOLERANCE;

struct Fixture {
    name: String,
    reference: Value,
    logits: WeightSource,
}

impl Fixture {
    fn open(dir: &Path) -> Self {
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        Self {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            reference: serde_json::from_str(&text).unwrap(),
            logits: WeightSource::open(&[dir.join("reference.safetensors")]).unwrap(),
        }
    }

    fn ids(&self, key: &str) -> Vec<Vec<u32>> {
        serde_json::from_value(self.reference[key].clone()).unwrap()
    }
}

fn logits_of(model: &CausalLm<Cpu>, rows: &[Vec<u32>]) -> (Vec<f32>, PaddedBatch) {
    let device = Default::default();
    let batch = PaddedBatch::left_padded(rows, 0);
    let logits = model.forward(
        token_tensor(&batch.tokens, &device),
        int_tensor(&batch.positions(), &device),
        causal_mask(&batch.valid, batch.width(), &device),
    );
    (logits.into_data().to_vec().unwrap(), batch)
}

/// Logits of every single prompt and of the left-padded batch match `transformers`.
fn check_logits(model: &CausalLm<Cpu>, fixture: &Fixture) {
    let prompts = fixture.ids("prompt_ids");
    for (i, prompt) in prompts.iter().enumerate() {
        let (ours, _) = logits_of(model, std::slice::from_ref(prompt));
        let theirs = fixture.logits.get(&format!("single_{i}_logits")).unwrap();
        let error = max_abs_diff(&ours, &theirs.data);
        assert!(
            error < TOLERANCE,
            "{}: single prompt {i}: max abs error {error}",
            fixture.name
        );
    }

    let (ours, batch) = logits_of(model, &prompts);
    assert_eq!(
        batch.tokens,
        fixture.ids("batch_input_ids"),
        "same left padding as the fixture"
    );
    let theirs = fixture.logits.get("batch_logits").unwrap();
    let vocab = theirs.shape[2];
    let mut compared = 0;
    for (row, valid) in batch.valid.iter().enumerate() {
        for (col, _) in valid.iter().enumerate().filter(|(_, &v)| v) {
            let at = (row * batch.width() + col) * vocab;
            let error = max_abs_diff(&ours[at..at + vocab], &theirs.data[at..at + vocab]);
            assert!(
                error < TOLERANCE,
                "{}: batch row {row} col {col}: error {error}",
                fixture.name
            );
            compared += 1;
        }
    }
    assert!(
        compared > prompts[0].len(),
        "padding rows were compared too"
    );
}

#[test]
fn logits_match_transformers_single_and_left_padded() {
    for dir in hf_fixtures() {
        let fixture = Fixture::open(&dir);
        let model = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
        check_logits(&model, &fixture);
    }
}

#[test]
fn greedy_generation_reproduces_transformers() {
    for dir in hf_fixtures() {
        let fixture = Fixture::open(&dir);
        let model = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
        let expected = fixture.ids("greedy_single");
        let config = GenerationConfig {
            max_new_tokens: expected[0].len(),
            sampling: SamplingParams::greedy(),
            seed: 0,
            stop_tokens: vec![],
            pad_id: 0,
        };
        let prompts = fixture.ids("prompt_ids");
        for (i, (prompt, expected)) in prompts.iter().zip(&expected).enumerate() {
            let ours = generate(&model, std::slice::from_ref(prompt), &config).unwrap();
            let what = format!("{}: prompt {i} alone", fixture.name);
            assert_greedy_agrees(&model, prompt, &ours.tokens[0], expected, TIE, &what);
        }
        let batched = generate(&model, &prompts, &config).unwrap();
        let reference = fixture.ids("greedy_batch");
        for (i, prompt) in prompts.iter().enumerate() {
            let what = format!("{}: prompt {i} in the batch", fixture.name);
            assert_greedy_agrees(
                &model,
                prompt,
                &batched.tokens[i],
                &reference[i],
                TIE,
                &what,
            );
        }
    }
}

#[test]
fn tokenizer_matches_the_fixture_ids() {
    for dir in hf_fixtures() {
        let fixture = Fixture::open(&dir);
        let tokenizer = TextTokenizer::from_folder(&dir).unwrap();
        let prompts: Vec<String> =
            serde_json::from_value(fixture.reference["prompts"].clone()).unwrap();
        for (prompt, ids) in prompts.iter().zip(fixture.ids("prompt_ids")) {
            assert_eq!(tokenizer.encode(prompt, true).unwrap(), ids);
            assert_eq!(tokenizer.decode(&ids, false).unwrap(), *prompt);
        }
        let chat = tokenizer
            .apply_chat_template(&[datasets::ChatMessage::new("user", "2+2?")], true)
            .unwrap();
        assert_eq!(
            chat,
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            tokenizer.stop_ids(),
            vec![tokenizer.token_id("<|im_end|>").unwrap()]
        );
    }
}

#[test]
fn saved_then_reloaded_models_give_the_same_logits() {
    for dir in hf_fixtures() {
        let fixture = Fixture::open(&dir);
        let model = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
        let (before, _) = logits_of(&model, &fixture.ids("prompt_ids"));
        for dtype in [StoreDtype::F32, StoreDtype::Bf16] {
            let out = scratch_dir(&format!("reload-{}-{dtype:?}", fixture.name));
            model.save(&out, dtype, Some(&dir)).unwrap();
            let reloaded = CausalLm::<Cpu>::load(&out, &Default::default()).unwrap();
            assert_eq!(
                reloaded.config.without_original(),
                model.config.without_original()
            );
            match dtype {
                StoreDtype::F32 => {
                    let (after, _) = logits_of(&reloaded, &fixture.ids("prompt_ids"));
                    assert_eq!(
                        before, after,
                        "{}: f32 round trip must be exact",
                        fixture.name
                    );
                }
                _ => {
                    // bf16 keeps each weight rounded to nearest, nothing else.
                    let original = named_tensors(&model);
                    let back = named_tensors(&reloaded);
                    assert_eq!(original.len(), back.len());
                    for ((name, a), (name_back, b)) in original.iter().zip(&back) {
                        assert_eq!(name, name_back);
                        let rounded: Vec<f32> = a
                            .data
                            .iter()
                            .map(|&v| half::bf16::from_f32(v).to_f32())
                            .collect();
                        assert_eq!(rounded, b.data, "{}: {name}", fixture.name);
                    }
                }
            }
            assert!(out.join("tokenizer.json").exists());
        }
    }
}

/// `scripts/check_transformers_loads_ours.py` loaded what `trainer export` wrote into
/// `transformers` and recorded the result with a hash of the files it loaded. The files we
/// write today must hash the same, or the record no longer speaks for them.
#[test]
fn transformers_loaded_what_we_save() {
    for dir in hf_fixtures() {
        let record_path = dir.join("transformers_loads_ours.json");
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap_or_else(|_| {
                panic!(
                    "{} missing: run scripts/check-transformers-loads-ours",
                    record_path.display()
                )
            }))
            .unwrap();
        assert_eq!(record["loaded"], true, "{}", record_path.display());
        assert!(record["max_abs_error"].as_f64().unwrap() < TOLERANCE as f64);

        let model = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
        let out = scratch_dir(&format!(
            "export-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        model.save(&out, StoreDtype::F32, Some(&dir)).unwrap();
        for file in ["config.json", "model.safetensors"] {
            let digest = hex(&Sha256::digest(std::fs::read(out.join(file)).unwrap()));
            assert_eq!(
                record["sha256"][file],
                digest,
                "{}: {file} differs from what transformers loaded",
                dir.display()
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
