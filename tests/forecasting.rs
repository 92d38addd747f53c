//! The llm4tsf recipe through the binary: exact resume after SIGKILL, the frozen backbone of
//! pre-alignment against the trained one of post-alignment, and the summary table.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

fn llm4tsf(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/llm4tsf-test.toml");
    recipe_command("llm4tsf", &config, run_dir, extra)
}

fn summary(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap()
}

/// Tensors of a checkpoint's model whose names start with `prefix`.
fn tensors_under(checkpoint_dir: &Path, prefix: &str) -> Vec<(String, Vec<f32>)> {
    model_tensors(checkpoint_dir)
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect()
}

#[test]
fn llm4tsf_resumes_exactly_after_sigkill() {
    let straight = scratch_dir("tsf-straight");
    run_to_end(llm4tsf(&straight, &[]));
    let table = std::fs::read_to_string(straight.join("summary.md")).unwrap();
    for row in ["LLM (pre-alignment)", "DLinear", "last value repeated"] {
        assert!(table.contains(row), "{table}");
    }
    assert!(straight.join("final/backbone/config.json").exists());

    let killed = scratch_dir("tsf-killed");
    let mut lives = 0;
    loop {
        lives += 1;
        let mut child = llm4tsf(&killed, &["--resume", "auto"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let newest = checkpoint_steps(&killed).first().copied().unwrap_or(0);
        wait_for_checkpoint(&mut child, &killed, newest + 7);
        child.kill().unwrap();
        child.wait().unwrap();
        if lives == 2 {
            break;
        }
    }
    let steps = checkpoint_steps(&killed);
    assert!(steps[0] < 40, "killed before the end: {steps:?}");
    run_to_end(llm4tsf(&killed, &["--resume", "auto"]));
    assert_eq!(
        model_tensors(&checkpoint(&killed, 40)),
        model_tensors(&checkpoint(&straight, 40))
    );
    // Same run, same numbers: the summaries agree exactly.
    assert_eq!(summary(&killed)["models"], summary(&straight)["models"]);
}

#[test]
fn pre_alignment_freezes_the_backbone_and_post_trains_it() {
    let pre = scratch_dir("tsf-pre");
    run_to_end(llm4tsf(&pre, &["--set", "train.steps=4"]));
    let post = scratch_dir("tsf-post");
    let output = llm4tsf(&post, &["--alignment", "post", "--set", "train.steps=4"])
        .output()
        .unwrap();
    assert_succeeded(&output);
    assert_eq!(summary(&post)["alignment"], "post");
    assert_eq!(
        tensors_under(&checkpoint(&pre, 1), "backbone."),
        tensors_under(&checkpoint(&pre, 4), "backbone."),
        "pre-alignment trained its backbone"
    );
    assert_ne!(
        tensors_under(&checkpoint(&post, 1), "backbone."),
        tensors_under(&checkpoint(&post, 4), "backbone."),
        "post-alignment left its backbone as it was"
    );
    // The dictionary never trains; the aligner around it does.
    assert_eq!(
        tensors_under(&checkpoint(&pre, 1), "aligner.dictionary"),
        tensors_under(&checkpoint(&pre, 4), "aligner.dictionary")
    );
    assert_ne!(
        tensors_under(&checkpoint(&pre, 1), "aligner.attention"),
        tensors_under(&checkpoint(&pre, 4), "aligner.attention")
    );
    assert!(tensors_under(&checkpoint(&post, 4), "aligner").is_empty());
    // --alignment belongs to llm4tsf only.
    let wrong = Command::new(trainer_bin())
        .args(["recipe", "sft", "--alignment", "pre"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("--alignment is for llm4tsf"));
}
