//! The layer-dominance recipe through the binary: the layers kept are the top-scoring ones,
//! the table holds the model and its controls, the pruned model is a Hugging Face folder of
//! that depth, and a SIGKILLed run resumes to the same result.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

fn layer_dominance(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/layer-dominance-test.toml");
    recipe_command("layer-dominance", &config, run_dir, extra)
}

/// A JSON array of numbers.
fn numbers_of(array: &Value) -> Vec<f64> {
    array
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn summary(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn keeps_the_top_layers_and_exports_the_pruned_model() {
    let run = scratch_dir("dominance");
    run_to_end(layer_dominance(&run, &[]));
    let numbers = summary(&run);
    let scores = numbers_of(&numbers["scores"]);
    let kept: Vec<usize> = numbers["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(kept.len(), 2);
    let lowest_kept = kept
        .iter()
        .map(|&l| scores[l])
        .fold(f64::INFINITY, f64::min);
    for layer in (0..4).filter(|l| !kept.contains(l)) {
        assert!(
            scores[layer] <= lowest_kept,
            "layer {layer} scored {} but was dropped: {scores:?}",
            scores[layer]
        );
    }
    let exported = run.join("finetune/final");
    let model = trainer::CausalLm::<trainer::Cpu>::load(&exported, &Default::default()).unwrap();
    assert_eq!(model.config.num_hidden_layers, 2);
    let table = std::fs::read_to_string(run.join("summary.md")).unwrap();
    for row in [
        "full (4 layers)",
        "fine-tuned",
        "control: first 2 layers",
        "control: random",
    ] {
        assert!(table.contains(row), "{row}: {table}");
    }
    let speed = &numbers["tokens_per_s"];
    assert!(speed["full"].as_f64().unwrap() > 0.0 && speed["pruned"].as_f64().unwrap() > 0.0);

    // SIGKILL during the fine-tune, then resume: the same result as the straight run.
    let killed = scratch_dir("dominance-killed");
    let mut child = layer_dominance(&killed, &["--set", "train.save_every=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &killed.join("finetune"), 2);
    child.kill().unwrap();
    child.wait().unwrap();
    run_to_end(layer_dominance(
        &killed,
        &["--set", "train.save_every=1", "--resume", "auto"],
    ));
    assert_eq!(summary(&killed)["perplexity"], numbers["perplexity"]);
}

#[test]
fn loss_increase_scores_one_evaluation_per_layer() {
    let run = scratch_dir("dominance-loss");
    run_to_end(layer_dominance(
        &run,
        &[
            "--set",
            "prune.score=loss-increase",
            "--set",
            "train.steps=1",
        ],
    ));
    let numbers = summary(&run);
    assert_eq!(numbers["score"], "loss-increase");
    // Removing a layer of a trained model costs something: every score is a loss increase.
    let scores = numbers_of(&numbers["scores"]);
    assert_eq!(scores.len(), 4);
    assert!(scores.iter().any(|&s| s > 0.0), "{scores:?}");
}

fn layer_dominance_on_records(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/layer-dominance-records-test.toml");
    recipe_command("layer-dominance", &config, run_dir, extra)
}

#[test]
fn records_are_scored_on_a_test_split_with_greedy_accuracy() {
    let run = scratch_dir("dominance-records");
    run_to_end(layer_dominance_on_records(&run, &[]));
    let numbers = summary(&run);
    // 20 held-out records: 10 dev (the fine-tune's evaluations), 10 test (the table).
    assert_eq!(numbers["splits"]["dev"], 10);
    assert_eq!(numbers["splits"]["test"], 10);
    assert_eq!(numbers["splits"]["train"], 1180);
    for model in [
        "full",
        "pruned",
        "fine_tuned",
        "first_layers",
        "random_layers",
        "full_fine_tuned",
    ] {
        let accuracy = &numbers["accuracy"][model];
        assert_eq!(accuracy["prompts"], 10, "{model}: {accuracy}");
        let share = accuracy["accuracy"].as_f64().unwrap();
        let interval = numbers_of(&accuracy["accuracy_95"]);
        assert!(
            interval[0] <= share && share <= interval[1],
            "{model}: {accuracy}"
        );
        assert!(numbers["perplexity"][model][0].as_f64().unwrap() > 1.0);
    }
    let table = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(table.contains("greedy accuracy (95% CI)"), "{table}");
}

#[test]
fn a_config_with_both_or_neither_data_source_is_refused() {
    let both = scratch_dir("dominance-both");
    let output = layer_dominance_on_records(
        &both,
        &[
            "--set",
            "corpus.train=recipes/data/kjv-corpus.txt",
            "--set",
            "corpus.seq_len=32",
        ],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exactly one of [corpus]"), "{stderr}");

    let verifier_on_text = scratch_dir("dominance-verifier-text");
    let output = layer_dominance(&verifier_on_text, &["--set", "verifier.kind=final-answer"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("[verifier] needs [data]"), "{stderr}");
    assert!(!verifier_on_text.join("checkpoints").exists());
}
