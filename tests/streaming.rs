//! The tays recipe through the binary: exact resume after SIGKILL, both tables, the user's
//! streams (image frames written by `trainer data stream`), and bad stream data refused before
//! anything trains.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn tays(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/tays-test.toml");
    recipe_command("tays", &config, run_dir, extra)
}

const VARIANTS: [&str; 6] = [
    "batch",
    "interleaved",
    "tays-group-decoupled",
    "tays-continuous",
    "tays-gap-isolated",
    "tays-overlapped",
];

/// Each model's accuracies (times differ from run to run).
fn accuracies(run_dir: &Path) -> Vec<(Value, Value, Value, Value)> {
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    summary["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["variant"].clone(),
                m["test"].clone(),
                m["test_units"].clone(),
                m["dev"].clone(),
            )
        })
        .collect()
}

#[test]
fn tays_resumes_exactly_after_sigkill_and_prints_both_tables() {
    let straight = scratch_dir("tays-straight");
    let output = run_to_end(tays(&straight, &[]));
    let printed = String::from_utf8_lossy(&output.stdout);
    for row in [
        "## Batch, interleaved and TaYS",
        "| batch (all frames, then reasoning) |",
        "| interleaved (one causal sequence) |",
        "| TaYS, group-decoupled positions |",
        "Targets: TaYS's first token within two frame intervals",
        "## Position schemes under parallel streaming",
        "| TaYS, continuous positions |",
        "| TaYS, gap-isolated positions |",
        "| TaYS, overlapped positions |",
    ] {
        assert!(printed.contains(row), "missing {row}:\n{printed}");
    }
    assert_eq!(accuracies(&straight).len(), 6);
    for variant in VARIANTS {
        let folder = straight.join(variant).join("final");
        assert!(folder.join("model.safetensors").exists(), "{variant}");
        assert!(
            folder.join("language_model/config.json").exists(),
            "{variant}"
        );
    }

    // Killed twice inside the interleaved model's training, then resumed to the end.
    let killed = scratch_dir("tays-killed");
    run_to_end(tays(
        &killed,
        &["--set", r#"modes=["batch"]"#, "--set", "schemes=[]"],
    ));
    kill_twice_inside(
        || tays(&killed, &["--resume", "auto"]),
        &killed.join("interleaved"),
    );
    assert!(
        checkpoint_steps(&killed.join("interleaved"))[0] < 12,
        "killed before the end"
    );
    run_to_end(tays(&killed, &["--resume", "auto"]));
    for variant in VARIANTS {
        assert_eq!(
            model_tensors(&checkpoint(&killed.join(variant), 12)),
            model_tensors(&checkpoint(&straight.join(variant), 12)),
            "{variant}"
        );
    }
    assert_eq!(accuracies(&killed), accuracies(&straight));
}

#[test]
fn user_streams_of_image_frames_train_and_evaluate() {
    let dir = scratch_dir("tays-user-data");
    let data = dir.join("data");
    let output = Command::new(trainer_bin())
        .args([
            "data", "stream", "--frames", "images", "--count", "10", "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_succeeded(&output);
    let streams = data.join("streams.jsonl");
    assert!(data.join("frames/00000-0-0.png").exists());
    let file = format!("{:?}", streams.display().to_string());
    let run_dir = dir.join("run");
    let output = run_to_end(tays(
        &run_dir,
        &[
            "--set",
            &format!("data.train={file}"),
            "--set",
            &format!("data.dev={file}"),
            "--set",
            &format!("data.test={file}"),
            "--set",
            r#"data.frames={kind="images", size=16}"#,
            "--set",
            "vision={image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16}",
            "--set",
            r#"modes=["tays"]"#,
            "--set",
            "schemes=[]",
            "--set",
            "train.steps=3",
        ],
    ));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("| TaYS, group-decoupled positions |"),
        "{printed}"
    );
    assert!(printed.contains("10 held-out test streams"), "{printed}");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("tays-group-decoupled/final/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["vision_config"]["patch_size"], 8);
}

#[test]
fn bad_stream_data_is_named_and_nothing_trains() {
    let dir = scratch_dir("tays-bad-data");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, line: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{line}\n")).unwrap();
        format!("{:?}", path.display().to_string())
    };
    let frame = "[[1, 0], [0, 1]]";
    let good = write(
        "dev.jsonl",
        &format!(
            r#"{{"frames": [[{frame}], [{frame}]], "observations": ["red appears at 0", "<skip>"], "question": "which appeared first ?", "answer": "red"}}"#
        ),
    );
    let cases = [
        (
            format!(
                r#"{{"frames": [[{frame}], [{frame}]], "observations": ["<skip>"], "question": "q", "answer": "a"}}"#
            ),
            "1 observations for 2 frame groups",
        ),
        (
            format!(
                r#"{{"frames": [[{frame}], [[[1, 0, 0]]]], "observations": ["<skip>", "<skip>"], "question": "q", "answer": "a"}}"#
            ),
            "group 1, frame 0",
        ),
        (
            format!(
                r#"{{"frames": [[{frame}], [{frame}, {frame}]], "observations": ["<skip>", "<skip>"], "question": "q", "answer": "a"}}"#
            ),
            "same number of frames",
        ),
        (
            format!(
                r#"{{"frames": [[{frame}], [{frame}]], "observations": ["<skip>", "<skip>"], "question": "q", "answer": ""}}"#
            ),
            "\"answer\" is empty",
        ),
    ];
    for (line, what) in cases {
        let train = write("train.jsonl", &line);
        let run_dir = dir.join("run");
        let output = tays(
            &run_dir,
            &[
                "--set",
                &format!("data.train={train}"),
                "--set",
                &format!("data.dev={good}"),
                "--set",
                &format!("data.test={good}"),
                "--set",
                r#"data.frames={kind="features", tokens=2, dim=2}"#,
            ],
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains("train.jsonl:1") && stderr.contains(what),
            "{what}: {stderr}"
        );
        assert_nothing_written(&run_dir);
    }
}
