//! `trainer eval` and `trainer chat` through the binary.

mod common;

use common::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn trainer(args: &[&str]) -> Output {
    Command::new(trainer_bin())
        .current_dir(repo_root())
        .args(args)
        .output()
        .unwrap()
}

/// `trainer eval` on a model trained here: its loss on the run's held-out file is the run's
/// last `eval_loss` (a different path: the exported folder, read and batched anew); a
/// verifier command's scores make the accuracy, with its Wilson interval; table and JSON.
#[test]
fn eval_reports_loss_perplexity_and_verified_accuracy() {
    let scratch = scratch_dir("eval-cli");
    let held_out = scratch.join("held-out.jsonl");
    let all =
        std::fs::read_to_string(repo_root().join("recipes/data/arithmetic-verbose.jsonl")).unwrap();
    let lines: Vec<&str> = all.lines().take(8).collect();
    std::fs::write(&held_out, lines.join("\n")).unwrap();
    let run = scratch.join("run");
    let eval_file = format!("data.eval={}", held_out.display());
    let output = sft_command(
        &test_config(),
        &run,
        &["--set", "train.steps=20", "--set", &eval_file],
    )
    .output()
    .unwrap();
    assert_succeeded(&output);
    let metrics = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let run_eval_loss = metrics.last().unwrap()["eval_loss"].as_f64().unwrap();

    let json_path = scratch.join("eval.json");
    let model = run.join("final");
    // Scores 1, 0, 1, 0, ... whatever the answers: the accuracy must be exactly half.
    let output = trainer(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        held_out.to_str().unwrap(),
        "--max-length",
        "96",
        "--max-new-tokens",
        "12",
        "--verifier-command",
        "awk '{ print NR % 2 }'",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert_succeeded(&output);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let loss = report["loss"].as_f64().unwrap();
    assert!(
        (loss - run_eval_loss).abs() < 1e-4,
        "eval {loss} vs the run's {run_eval_loss}"
    );
    assert!((report["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    let (low, high) = (
        report["perplexity_95"][0].as_f64().unwrap(),
        report["perplexity_95"][1].as_f64().unwrap(),
    );
    assert!(low < loss.exp() && loss.exp() < high, "{report}");
    let generation = &report["generation"];
    assert_eq!(generation["prompts"], 8);
    assert_eq!(generation["accuracy"], 0.5);
    let (low, high) = recipes::evaluate::wilson_interval(4.0, 8);
    assert_eq!(generation["accuracy_95"], serde_json::json!([low, high]));
    let mean_length = generation["mean_length"].as_f64().unwrap();
    assert!(mean_length > 0.0 && mean_length <= 12.0);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("| perplexity (95% CI) |") && stdout.contains("| p90 length (tokens) |"),
        "{stdout}"
    );

    // The built-in verifier runs too; a data file in another layout needs --field.
    let output = trainer(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        held_out.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--verifier",
        "final-answer",
    ]);
    assert_succeeded(&output);
    let output = trainer(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "tests/fixtures/data/qa.parquet",
        "--field",
        "prompt=question",
        "--field",
        "response=answer",
    ]);
    assert_succeeded(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("| records | 6 |"));
    let output = trainer(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "tests/fixtures/data/qa.parquet",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("data.fields"));
}

/// A model folder with `generation_config.json` set to `settings`.
fn model_with_generation_config(name: &str, settings: &str) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    copy_dir(&repo_root().join("tests/fixtures/hf/llama-gqa"), &dir);
    std::fs::write(dir.join("generation_config.json"), settings).unwrap();
    dir
}

fn chat(model: &Path, extra: &[&str], input: &str) -> Output {
    let mut child = Command::new(trainer_bin())
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--show-template",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `trainer chat` over stdin: each line a user turn answered in order, the conversation
/// (system prompt, earlier turns and answers) rendered into each prompt, sampling defaults
/// from generation_config.json, and the first greedy answer that of `trainer generate --chat`.
#[test]
fn chat_keeps_the_conversation_and_follows_generation_config() {
    let greedy = model_with_generation_config(
        "chat-greedy",
        r#"{"do_sample": false, "max_new_tokens": 6, "eos_token_id": 2}"#,
    );
    let output = chat(
        &greedy,
        &["--system", "Be brief."],
        "first question\n\nsecond question\n",
    );
    assert_succeeded(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("temperature 0,") && stderr.contains("up to 6 tokens"),
        "{stderr}"
    );
    let prompts: Vec<&str> = stderr
        .split("[prompt]\n")
        .skip(1)
        .map(|p| p.split("\n[/prompt]").next().unwrap())
        .collect();
    assert_eq!(prompts.len(), 2, "one prompt per non-empty line: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(prompts[0].contains("Be brief.") && prompts[0].contains("first question"));
    let second = prompts[1];
    // The system prompt, the first turn and its answer, then the second turn, in order.
    let mut at = 0;
    for part in [
        "Be brief.",
        "first question",
        answers[0].trim(),
        "second question",
    ] {
        let found = second[at..].find(part).unwrap_or_else(|| {
            panic!("{part:?} missing (in order) from the second prompt: {second}")
        });
        at += found + part.len();
    }

    // The first answer is greedy, as `trainer generate --chat` gives it (no system prompt).
    let alone = chat(&greedy, &[], "first question\n");
    let generate = trainer(&[
        "generate",
        "--model",
        greedy.to_str().unwrap(),
        "--chat",
        "--prompt",
        "first question",
        "--max-new-tokens",
        "6",
    ]);
    assert_succeeded(&generate);
    assert_eq!(
        String::from_utf8_lossy(&alone.stdout),
        String::from_utf8_lossy(&generate.stdout)
    );

    let sampling = model_with_generation_config(
        "chat-sampling",
        r#"{"do_sample": true, "temperature": 0.3, "top_p": 0.9}"#,
    );
    let output = chat(&sampling, &["--max-new-tokens", "3"], "hello\n");
    assert_succeeded(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("temperature 0.3, top_p 0.9, up to 3 tokens"),
        "{stderr}"
    );
}
