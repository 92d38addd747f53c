//! The hidrop recipe and the EmbedLens probe through the binary: exact resume after SIGKILL,
//! the table with its controls, the probe on the finished run, and bad visual data refused
//! before anything trains.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn hidrop(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/hidrop-test.toml");
    recipe_command("hidrop", &config, run_dir, extra)
}

fn summary(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap()
}

/// Each model's accuracies (times differ from run to run).
fn accuracies(run_dir: &Path) -> Vec<(Value, Value, Value)> {
    summary(run_dir)["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["variant"].clone(), m["test"].clone(), m["dev"].clone()))
        .collect()
}

#[test]
fn hidrop_resumes_exactly_after_sigkill_and_the_probe_reads_its_run() {
    let straight = scratch_dir("hidrop-straight");
    let output = run_to_end(hidrop(&straight, &[]));
    let printed = String::from_utf8_lossy(&output.stdout);
    for row in [
        "full tokens (baseline)",
        "| HiDrop |",
        "control: random keep, same budget",
        "control: hard top-k, no soft mask",
        "EmbedLens probe",
        "| sink |",
        "| dead |",
        "| alive |",
    ] {
        assert!(printed.contains(row), "missing {row}:\n{printed}");
    }
    let models = summary(&straight)["models"].as_array().unwrap().clone();
    assert_eq!(models.len(), 4);
    // Entry 1, pruned to 4 then 1 of 16, exit 3, over 4 layers: (16 + 4) / 64.
    assert!((models[1]["kept_share"].as_f64().unwrap() - 20.0 / 64.0).abs() < 1e-9);
    for variant in ["full", "hidrop", "random-keep", "hard-top-k"] {
        let folder = straight.join(variant).join("final");
        assert!(folder.join("model.safetensors").exists(), "{variant}");
        assert!(
            folder.join("language_model/config.json").exists(),
            "{variant}"
        );
    }

    // Killed twice inside the HiDrop model's training, then resumed to the end.
    let killed = scratch_dir("hidrop-killed");
    run_to_end(hidrop(&killed, &["--set", r#"variants=["full"]"#]));
    kill_twice_inside(
        || hidrop(&killed, &["--resume", "auto"]),
        &killed.join("hidrop"),
    );
    assert!(
        checkpoint_steps(&killed.join("hidrop"))[0] < 24,
        "killed before the end"
    );
    run_to_end(hidrop(&killed, &["--resume", "auto"]));
    for variant in ["full", "hidrop", "random-keep", "hard-top-k"] {
        assert_eq!(
            model_tensors(&checkpoint(&killed.join(variant), 24)),
            model_tensors(&checkpoint(&straight.join(variant), 24)),
            "{variant}"
        );
    }
    assert_eq!(accuracies(&killed), accuracies(&straight));

    // The probe on the finished run, standalone, with an override.
    let output = Command::new(trainer_bin())
        .args(["probe", "embedlens", "--run"])
        .arg(&straight)
        .args(["--set", "probe.nearest=2"])
        .output()
        .unwrap();
    assert_succeeded(&output);
    let table = std::fs::read_to_string(straight.join("embedlens.md")).unwrap();
    assert!(
        table.contains("the 2 nearest vocabulary ids decide"),
        "{table}"
    );
    assert!(table.contains("| 2 |"), "injection at layer 2:\n{table}");
}

#[test]
fn bad_visual_data_is_named_and_nothing_trains() {
    let dir = scratch_dir("hidrop-bad-data");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let write = |name: &str, lines: &[&str]| {
        let path = data.join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path.display().to_string()
    };
    // A real 16x16 image made by `trainer data shapes` would do; a missing one must be named.
    let good = write(
        "dev.jsonl",
        &[r#"{"image": "a.png", "prompt": "<image> q?", "answer": "x"}"#],
    );
    let cases = [
        (
            r#"{"image": "missing.png", "prompt": "<image> q?", "answer": "x"}"#,
            "train.jsonl:1",
            "missing.png",
        ),
        (
            r#"{"image": "a.png", "prompt": "q?", "answer": "x"}"#,
            "train.jsonl:1",
            "no <image> placeholder",
        ),
        (
            r#"{"image": "a.png", "prompt": "<image> <image> q?", "answer": "x"}"#,
            "train.jsonl:1",
            "2 <image> placeholders",
        ),
    ];
    for (line, place, what) in cases {
        let train = write("train.jsonl", &[line]);
        let run_dir = dir.join("run");
        let output = hidrop(
            &run_dir,
            &[
                "--set",
                &format!("data.train={train:?}"),
                "--set",
                &format!("data.dev={good:?}"),
                "--set",
                &format!("data.test={good:?}"),
            ],
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(place) && stderr.contains(what), "{stderr}");
        // The run folder holds at most its lock: no config, no model, no checkpoint.
        assert_nothing_written(&run_dir);
    }
}
