//! GGUF import against the `gguf` Python package and `transformers` loading the same GGUF
//! (fixtures of `scripts/make_gguf_fixtures.py`): dequantization per type, the tiny Llama's
//! logits, greedy tokens and tokenizer ids, SmolLM2 when it has been fetched, and bad files.

mod common;

use checkpoints::gguf::GgufFile;
use checkpoints::StoreDtype;
use common::*;
use datasets::{ChatMessage, TextTokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use trainer::generate::{generate, GenerationConfig};
use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use trainer::sampling::SamplingParams;
use trainer::{CausalLm, Cpu};

const LOGIT_TOLERANCE: f32 = 1e-3;
/// Top logits this close may be ordered either way by another CPU's rounding.
const TIE: f32 = 4.0 * LOGIT_TOLERANCE;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/gguf").join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn dequantizes_every_type_like_the_gguf_package() {
    let gguf = GgufFile::open(&fixture("dequant.gguf")).unwrap();
    let expected = read_json(&fixture("dequant.json"));
    let expected = expected.as_object().unwrap();
    assert_eq!(gguf.tensors.len(), 8);
    for (name, want) in expected {
        let tensor = gguf.read_f32(name).unwrap();
        let info = gguf.tensor(name).unwrap();
        assert_eq!(info.ggml_type.name(), want["type"].as_str().unwrap());
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(tensor.shape, shape, "{name}");
        let values: Vec<f32> = serde_json::from_value(want["values"].clone()).unwrap();
        let error = max_abs_diff(&tensor.data, &values);
        assert!(error <= 1e-6, "{name}: max abs error {error}");
        assert!(
            values.iter().any(|v| *v != 0.0),
            "{name}: fixture is all zeros"
        );
    }
}

/// Imports through the binary, as a user would.
fn import(gguf: &Path, out: &Path) {
    let output = Command::new(trainer_bin())
        .args(["import", "--gguf"])
        .arg(gguf)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn logits_of(model: &CausalLm<Cpu>, prompt: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let batch = PaddedBatch::left_padded(&[prompt.to_vec()], 0);
    let logits = model.forward(
        token_tensor(&batch.tokens, &device),
        int_tensor(&batch.positions(), &device),
        causal_mask(&batch.valid, batch.width(), &device),
    );
    logits.into_data().to_vec().unwrap()
}

/// Tokenizer ids, chat template, logits (at the reference's vocabulary columns) and greedy
/// tokens of an imported folder against what `transformers` computed from the GGUF.
fn check_against_reference(model_dir: &Path, reference: &Value) {
    let tokenizer = TextTokenizer::from_folder(model_dir).unwrap();
    let strings: Vec<String> = serde_json::from_value(reference["strings"].clone()).unwrap();
    for (text, want) in strings
        .iter()
        .zip(reference["string_ids"].as_array().unwrap())
    {
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            ids(want),
            "{text:?}"
        );
    }
    let chat: Vec<ChatMessage> = serde_json::from_value(reference["chat"].clone()).unwrap();
    let chat_text = tokenizer.apply_chat_template(&chat, true).unwrap();
    assert_eq!(chat_text, reference["chat_text"].as_str().unwrap());
    let prompt = tokenizer.encode(&chat_text, false).unwrap();
    assert_eq!(prompt, ids(&reference["chat_ids"]));

    let model = CausalLm::<Cpu>::load(model_dir, &Default::default()).unwrap();
    let logits = logits_of(&model, &prompt);
    let vocab = model.config.vocab_size;
    let columns = ids(&reference["logit_ids"]);
    let top_ids: Vec<Vec<u32>> = serde_json::from_value(reference["top_ids"].clone()).unwrap();
    for (position, want) in reference["logits"].as_array().unwrap().iter().enumerate() {
        let row = &logits[position * vocab..(position + 1) * vocab];
        let ours: Vec<f32> = columns.iter().map(|&c| row[c as usize]).collect();
        let want: Vec<f32> = serde_json::from_value(want.clone()).unwrap();
        let error = max_abs_diff(&ours, &want);
        assert!(
            error < LOGIT_TOLERANCE,
            "position {position}: max abs error {error}"
        );
        let argmax = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        let their_top = top_ids[position][0] as usize;
        assert!(
            argmax == their_top || row[argmax] - row[their_top] <= TIE,
            "position {position}: our top token {argmax}, theirs {their_top}, not a near-tie"
        );
    }

    let greedy = ids(&reference["greedy_ids"]);
    let config = GenerationConfig {
        max_new_tokens: greedy.len(),
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
        },
        seed: 0,
        stop_tokens: vec![],
        pad_id: tokenizer.pad_id(),
    };
    let generated = generate(&model, std::slice::from_ref(&prompt), &config).unwrap();
    assert_greedy_agrees(
        &model,
        &prompt,
        &generated.tokens[0],
        &greedy,
        TIE,
        "greedy continuation",
    );
}

#[test]
fn tiny_llama_import_matches_transformers() {
    let out = scratch_dir("gguf-tiny-llama");
    import(&fixture("tiny-llama.gguf"), &out);
    let reference = read_json(&fixture("tiny-llama-reference.json"));
    check_against_reference(&out, &reference);

    // The rebuilt tokenizer keeps ChatML specials whole and the user-defined token whole
    // but not special (decoding with skip_special_tokens keeps it).
    let tokenizer = TextTokenizer::from_folder(&out).unwrap();
    let think = tokenizer.encode("<think>", false).unwrap();
    assert_eq!(think.len(), 1);
    assert_eq!(tokenizer.decode(&think, true).unwrap(), "<think>");
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["rms_norm_eps"].as_f64().unwrap(), 1e-5);
}

/// The imported folder can also be written in bf16; logits move by rounding only.
#[test]
fn import_in_bf16_stays_close() {
    let out = scratch_dir("gguf-tiny-bf16");
    checkpoints::gguf::import::import_gguf(&fixture("tiny-llama.gguf"), &out, StoreDtype::Bf16)
        .unwrap();
    let reference = read_json(&fixture("tiny-llama-reference.json"));
    let model = CausalLm::<Cpu>::load(&out, &Default::default()).unwrap();
    let logits = logits_of(&model, &ids(&reference["chat_ids"]));
    let want: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let flat: Vec<f32> = want.concat();
    let error = max_abs_diff(&logits, &flat);
    assert!(error > 0.0 && error < 0.1, "bf16 logits error {error}");
}

/// Runs when `scripts/get-smollm2` has imported the model (not committed: 540 MB).
#[test]
fn smollm2_import_matches_transformers() {
    let dir = std::env::var_os("TRAINER_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/smollm2-135m-instruct"));
    if !dir.join("config.json").exists() {
        eprintln!(
            "skipped: {} not found (run scripts/get-smollm2)",
            dir.display()
        );
        return;
    }
    check_against_reference(&dir, &read_json(&fixture("smollm2-reference.json")));
}

#[test]
fn bad_gguf_files_are_named() {
    let dir = scratch_dir("gguf-bad-files");
    let good = std::fs::read(fixture("dequant.gguf")).unwrap();

    let not_gguf = dir.join("not.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 this is a zip").unwrap();
    let err = GgufFile::open(&not_gguf).err().unwrap().to_string();
    assert!(
        err.contains("not.gguf") && err.contains("not a GGUF"),
        "{err}"
    );

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &good[..good.len() - 100]).unwrap();
    let err = format!("{:#}", GgufFile::open(&truncated).err().unwrap());
    assert!(err.contains("truncated") && err.contains("q6_k"), "{err}");

    let header_cut = dir.join("header-cut.gguf");
    std::fs::write(&header_cut, &good[..40]).unwrap();
    let err = format!("{:#}", GgufFile::open(&header_cut).err().unwrap());
    assert!(err.contains("header-cut.gguf"), "{err}");

    // Relabel tensor `q4_0` as IQ4_NL (same block geometry, no dequantizer here).
    let mut relabelled = good.clone();
    let name_at = good.windows(4).position(|w| w == b"q4_0").unwrap();
    let type_at = name_at + 4 + 4 + 2 * 8; // name, n_dims, two dims
    assert_eq!(relabelled[type_at], 2, "Q4_0's type id");
    relabelled[type_at] = 20;
    let path = dir.join("relabelled.gguf");
    std::fs::write(&path, &relabelled).unwrap();
    let err = format!(
        "{:#}",
        GgufFile::open(&path).unwrap().read_f32("q4_0").unwrap_err()
    );
    assert!(err.contains("`q4_0`") && err.contains("IQ4_NL"), "{err}");

    // The dequantization fixture is not a model: the import says what is missing.
    let output = Command::new(trainer_bin())
        .args(["import", "--gguf"])
        .arg(fixture("dequant.gguf"))
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("tokenizer.ggml.model"), "{stderr}");
    assert!(!dir.join("out/config.json").exists());
}
