//! A run folder never loses work, through the real binary: one writer at a time, no silent
//! overwrite, damaged checkpoints never crowd out good ones, numbers checked before the run
//! starts, divergence stopped before it is saved, generation bounded by the context, data
//! losses counted, and SIGKILL at any moment (checkpoint writes included) resumed exactly.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every file under `dir` with its bytes, by relative path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_path_buf();
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Folders left by interrupted checkpoint writes.
fn leftovers(run: &Path) -> Vec<String> {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_second_process_on_a_locked_run_folder_fails_fast() {
    let lone = scratch_dir("lock-lone");
    run_to_end(sft_command(&test_config(), &lone, &[]));

    let run = scratch_dir("lock-shared");
    let mut first = sft_command(&test_config(), &run, &[])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut first, &run, 8);
    let started = Instant::now();
    let second = sft_command(&test_config(), &run, &["--resume", "auto"])
        .output()
        .unwrap();
    let stderr = stderr_of(&second);
    assert!(!second.status.success());
    assert!(
        stderr.contains("in use") && stderr.contains(&format!("pid {}", first.id())),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not refused fast"
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(
        model_tensors(&checkpoint(&run, 40)),
        model_tensors(&checkpoint(&lone, 40)),
        "the first run ended as a lone run does"
    );
}

#[test]
fn a_rerun_without_resume_is_refused_and_overwrite_moves_the_old_run_aside() {
    let run = scratch_dir("rerun");
    let _ = std::fs::remove_dir_all(run.with_file_name("rerun.old-1"));
    run_to_end(sft_command(&test_config(), &run, &[]));
    let before = snapshot(&run);

    let output = sft_command(&test_config(), &run, &["--set", "train.lr=1e-3"])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--resume auto") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert!(
        before == snapshot(&run),
        "the refused run changed the folder"
    );

    let output = run_to_end(sft_command(&test_config(), &run, &["--overwrite"]));
    assert!(String::from_utf8_lossy(&output.stdout).contains("rerun.old-1"));
    let aside = run.with_file_name("rerun.old-1");
    let mut kept = snapshot(&aside);
    // The lock file stays with the folder being written; everything else moved intact.
    let mut expected = before.clone();
    expected.remove(Path::new(".lock"));
    kept.remove(Path::new(".lock"));
    assert!(kept == expected, "the old run was not moved aside intact");
    assert!(checkpoint(&run, 40).exists());

    let output = sft_command(&test_config(), &run, &["--overwrite", "--resume", "auto"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[test]
fn a_resume_refused_for_a_config_mismatch_keeps_the_recorded_config() {
    let run = scratch_dir("mismatch");
    run_to_end(sft_command(&test_config(), &run, &[]));
    let recorded = std::fs::read(run.join("config.toml")).unwrap();
    let output = sft_command(
        &test_config(),
        &run,
        &[
            "--set",
            "model.scratch.hidden_size=64",
            "--set",
            "train.steps=50",
            "--resume",
            "auto",
        ],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr_of(&output).contains("shape"),
        "{}",
        stderr_of(&output)
    );
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), recorded);

    // A resume that starts does record its config.
    run_to_end(sft_command(
        &test_config(),
        &run,
        &["--set", "train.steps=48", "--resume", "auto"],
    ));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("steps = 48"), "{config}");
}

#[test]
fn with_every_checkpoint_damaged_the_resumed_run_keeps_and_exports_its_own() {
    let lone = scratch_dir("damaged-lone");
    run_to_end(sft_command(&test_config(), &lone, &[]));

    let run = scratch_dir("damaged-all");
    run_to_end(sft_command(&test_config(), &run, &[]));
    let old = checkpoints::run_checkpoints::CheckpointDir::new(&run)
        .list()
        .unwrap();
    assert_eq!(old.len(), 2);
    for checkpoint in &old {
        let file = checkpoint.dir.join("model.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    let output = run_to_end(sft_command(&test_config(), &run, &["--resume", "auto"]));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("starting fresh"), "{stdout}");
    assert!(stderr_of(&output).contains("damaged"));

    // The damaged ones were moved aside, the new run's own newest checkpoints kept.
    let kept = checkpoint_steps(&run);
    assert_eq!(kept, vec![40, 32]);
    for step in [40, 32] {
        assert!(run
            .join(format!("checkpoints/damaged/step-{step:08}"))
            .exists());
    }
    assert_eq!(
        model_tensors(&checkpoint(&run, 40)),
        model_tensors(&checkpoint(&lone, 40))
    );
    let exported = model_tensors(&run.join("final"));
    assert_eq!(exported, model_tensors(&checkpoint(&lone, 40)));
}

#[test]
fn resuming_from_an_older_checkpoint_moves_the_newer_ones_aside() {
    let run = scratch_dir("branch");
    run_to_end(sft_command(
        &test_config(),
        &run,
        &["--set", "train.keep_last=5"],
    ));
    let older = checkpoint(&run, 16);
    let output = run_to_end(sft_command(
        &test_config(),
        &run,
        &[
            "--set",
            "train.keep_last=5",
            "--set",
            "train.lr=1e-3",
            "--resume",
            older.to_str().unwrap(),
        ],
    ));
    assert!(String::from_utf8_lossy(&output.stdout).contains("superseded"));
    for step in [24, 32, 40] {
        assert!(run
            .join(format!("checkpoints/superseded/step-{step:08}"))
            .exists());
    }
    // The new history is the folder's history now: the export is of the new step 40.
    assert_eq!(
        model_tensors(&run.join("final")),
        model_tensors(&checkpoint(&run, 40))
    );
    assert_ne!(
        model_tensors(&checkpoint(&run, 40)),
        model_tensors(&run.join("checkpoints/superseded/step-00000040"))
    );
}

/// Each bad number fails before any training step, naming its key.
#[test]
fn invalid_numbers_are_refused_before_training_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        ("train.lr=-1", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.steps=0", "train.steps"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.betas=[0.9, 1.5]", "train.betas[1]"),
        ("train.max_grad_norm=-2", "train.max_grad_norm"),
        ("train.divergence_factor=0.5", "train.divergence_factor"),
        ("data.max_length=1", "data.max_length"),
        (
            "model.scratch.num_attention_heads=3",
            "model.scratch.hidden_size",
        ),
    ];
    for (index, (setting, key)) in cases.iter().enumerate() {
        let run = scratch_dir(&format!("invalid-{index}"));
        let output = sft_command(&test_config(), &run, &["--set", setting])
            .output()
            .unwrap();
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{setting} was accepted");
        assert!(stderr.contains(&format!("`{key}`")), "{setting}: {stderr}");
        assert!(!run.join("metrics.jsonl").exists(), "{setting}: it trained");
    }
    let onpolicy = [
        ("sampling.top_p=2", "sampling.top_p"),
        ("sampling.temperature=-1", "sampling.temperature"),
        (
            "sampling.samples_per_prompt=0",
            "sampling.samples_per_prompt",
        ),
    ];
    for (setting, key) in onpolicy {
        let run = scratch_dir("invalid-onpolicy");
        let output = onpolicy_command(&run, &["--set", setting])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{setting} was accepted");
        assert!(
            stderr_of(&output).contains(&format!("`{key}`")),
            "{setting}"
        );
    }
    let model = repo_root().join("tests/fixtures/hf/llama-gqa");
    for (flag, value) in [
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "2"),
        ("--top-p", "-0.5"),
        ("--max-new-tokens", "0"),
    ] {
        let output = Command::new(trainer_bin())
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", "hi", flag, value])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flag} {value} was accepted");
        assert!(stderr_of(&output).contains(flag), "{flag} {value}");
    }
}

#[test]
fn divergence_stops_the_run_before_saving_and_names_the_checkpoint() {
    let run = scratch_dir("diverge");
    // 16 healthy steps, then a resume whose learning rate blows the run up at once; the
    // running median comes from the metrics of the healthy steps.
    run_to_end(sft_command(
        &test_config(),
        &run,
        &["--set", "train.steps=16"],
    ));
    let blow_up = [
        "--set",
        "train.lr=30",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.max_grad_norm=0",
        "--resume",
        "auto",
    ];
    let output = sft_command(&test_config(), &run, &blow_up)
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("diverged"), "{stderr}");
    let kept = checkpoint_steps(&run);
    // Nothing of the diverged steps was saved (the next checkpoint was due at step 24), and
    // the error names the checkpoint to go back to.
    assert_eq!(kept, vec![16, 8]);
    assert!(
        stderr.contains("step-00000016") && stderr.contains("--resume"),
        "{stderr}"
    );
    for (name, values) in model_tensors(&checkpoint(&run, 16)) {
        assert!(
            values.iter().all(|v| v.is_finite() && v.abs() < 100.0),
            "{name}"
        );
    }
    // Resuming from it with a sane learning rate finishes the run.
    run_to_end(sft_command(&test_config(), &run, &["--resume", "auto"]));
    assert!(checkpoint(&run, 40).exists());
}

#[test]
fn generation_stops_at_the_context_and_refuses_prompts_that_fill_it() {
    let model = scratch_dir("short-context-model");
    copy_dir(&repo_root().join("tests/fixtures/hf/llama-gqa"), &model);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 24.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let generate = |prompt: &str, max_new: &str| {
        Command::new(trainer_bin())
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", prompt, "--max-new-tokens", max_new])
            .output()
            .unwrap()
    };
    let started = Instant::now();
    let output = generate("a b", "100000");
    assert_succeeded(&output);
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("warning: --max-new-tokens 100000"),
        "{stderr}"
    );
    assert!(stderr.contains("context length"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));

    let long_prompt = vec!["word"; 40].join(" ");
    let output = generate(&long_prompt, "4");
    assert!(!output.status.success());
    assert!(
        stderr_of(&output).contains("max_position_embeddings"),
        "{}",
        stderr_of(&output)
    );

    let output = Command::new(trainer_bin())
        .args(["generate", "--model", "no/such/folder", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(stderr_of(&output).contains("does not exist"));
}

#[test]
fn dropped_and_truncated_records_are_counted() {
    let data = scratch_dir("data-report-input").join("records.jsonl");
    let long = vec!["many"; 200].join(" ");
    let lines = [
        serde_json::json!({"prompt": "2+2?", "response": "4"}),
        serde_json::json!({"prompt": "say a lot", "response": long}),
        serde_json::json!({"prompt": long, "response": "short"}),
        serde_json::json!({"prompt": "3+3?", "response": "6"}),
    ];
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&data, text.join("\n")).unwrap();
    let run = scratch_dir("data-report");
    let output = run_to_end(sft_command(
        &test_config(),
        &run,
        &[
            "--set",
            &format!("data.train={}", data.display()),
            "--set",
            "data.eval_count=0",
            "--set",
            "data.max_length=48",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=2",
        ],
    ));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("4 records, 2 cut to max_length = 48, 1 dropped"),
        "{stdout}"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("data_report.json")).unwrap())
            .unwrap();
    assert_eq!(report[0]["records"], 4);
    assert_eq!(report[0]["truncated"], 2);
    assert_eq!(report[0]["dropped"], 1);
}

/// SIGKILL at random moments (checkpoint writes included: one every step), 20 times on one
/// run; resumed each time, it ends on the weights and metrics of an uninterrupted run, with no
/// staging folder left.
#[test]
fn twenty_sigkills_at_random_moments_resume_to_the_uninterrupted_end() {
    let settings = [
        "--set",
        "train.steps=60",
        "--set",
        "train.save_every=1",
        "--set",
        "train.keep_last=2",
    ];
    let straight = scratch_dir("faults-straight");
    let started = Instant::now();
    let mut child = sft_command(&test_config(), &straight, &settings)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &straight, 1);
    let startup = started.elapsed();
    assert!(child.wait().unwrap().success());
    let training = started.elapsed() - startup;

    let run = scratch_dir("faults");
    let mut args = settings.to_vec();
    args.extend(["--resume", "auto"]);
    // Kill moments from a fixed generator, in units of this machine's step time: each life
    // runs until one or two more checkpoints exist, then dies somewhere in the next step
    // (inside a checkpoint write, often: one is written every step).
    let step_time = training / 60;
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut random = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut kills = 0;
    while kills < 20 && Instant::now() < deadline {
        let newest = checkpoint_steps(&run).first().copied().unwrap_or(0);
        let mut child = sft_command(&test_config(), &run, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_checkpoint(&mut child, &run, newest + 1 + random() % 2);
        let within_step = step_time.as_micros() as u64;
        std::thread::sleep(Duration::from_micros(random() % within_step.max(1)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished after {kills} kills"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert_eq!(kills, 20, "the kills took too long");
    run_to_end(sft_command(&test_config(), &run, &args));
    assert_eq!(
        model_tensors(&checkpoint(&run, 60)),
        model_tensors(&checkpoint(&straight, 60))
    );
    assert_eq!(loss_curve(&run), loss_curve(&straight));
    assert_eq!(
        leftovers(&run),
        Vec::<String>::new(),
        "staging folders left"
    );
}
