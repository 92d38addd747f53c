//! The training engine through the real binary: exact resume after SIGKILL, a clean stop on
//! SIGTERM, damaged checkpoints skipped, the default sft config, export, LoRA adapters.

mod common;

use checkpoints::WeightSource;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn resume_after_sigkill_is_bitwise_exact() {
    let straight = scratch_dir("resume-straight");
    run_to_end(sft_command(&test_config(), &straight, &[]));

    let killed = scratch_dir("resume-killed");
    kill_after_checkpoint(sft_command(&test_config(), &killed, &[]), &killed, 8, 40);

    let resumed = run_to_end(sft_command(&test_config(), &killed, &["--resume", "auto"]));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("resumed from"));

    assert_eq!(
        model_tensors(&checkpoint(&straight, 40)),
        model_tensors(&checkpoint(&killed, 40))
    );
    let curve = loss_curve(&straight);
    assert_eq!(
        curve.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    assert_eq!(
        curve,
        loss_curve(&killed),
        "loss curves differ (or a step was logged twice)"
    );

    // A damaged newest checkpoint is reported and the one before is used; resuming from it
    // still lands on the same weights.
    let newest = checkpoint(&straight, 40).join("model.safetensors");
    let expected = model_tensors(&checkpoint(&straight, 40));
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&newest, bytes).unwrap();
    let output = run_to_end(sft_command(
        &test_config(),
        &straight,
        &["--resume", "auto"],
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("step-00000040") && stderr.contains("damaged"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("step 32"));
    assert_eq!(model_tensors(&checkpoint(&straight, 40)), expected);
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_cleanly() {
    let run = scratch_dir("sigterm");
    let mut child = sft_command(&test_config(), &run, &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &run, 8);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("stopped by signal at step"), "{stdout}");
    let steps = checkpoint_steps(&run);
    assert!(steps[0] > 8 && steps[0] < 40, "newest checkpoint {steps:?}");
    // Resume from that checkpoint named explicitly.
    let named = checkpoint(&run, steps[0]);
    let output = run_to_end(sft_command(
        &test_config(),
        &run,
        &["--resume", named.to_str().unwrap()],
    ));
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("(step {})", steps[0])));
    assert!(checkpoint(&run, 40).exists());
}

#[test]
fn default_sft_config_learns_and_exports_a_loadable_model() {
    let run = scratch_dir("default-sft");
    let default = repo_root().join("recipes/configs/sft/tiny.toml");
    // The default run, shortened: same model, data and schedule shape.
    run_to_end(sft_command(
        &default,
        &run,
        &["--set", "train.steps=30", "--set", "train.warmup_steps=5"],
    ));
    let curve = loss_curve(&run);
    let (first, last) = (curve[0].1, curve.last().unwrap().1);
    assert!(last < 0.6 * first, "loss went from {first} to {last}");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("steps = 30"),
        "resolved config records the override:\n{config}"
    );

    // The exported folder loads back with the checkpoint's logits, and has a tokenizer.
    let exported =
        trainer::CausalLm::<trainer::Cpu>::load(&run.join("final"), &Default::default()).unwrap();
    let (from_checkpoint, _) =
        trainer::export::load_checkpoint_model(&checkpoint(&run, 30)).unwrap();
    let tokens = vec![vec![5u32, 17, 42, 8, 99]];
    let logits = |m: &trainer::CausalLm<trainer::Cpu>| -> Vec<f32> {
        use trainer::model::mask::*;
        let device = Default::default();
        let batch = PaddedBatch::left_padded(&tokens, 0);
        m.forward(
            token_tensor(&batch.tokens, &device),
            int_tensor(&batch.positions(), &device),
            causal_mask(&batch.valid, 5, &device),
        )
        .into_data()
        .to_vec()
        .unwrap()
    };
    assert_eq!(logits(&exported), logits(&from_checkpoint));
    assert!(run.join("final/tokenizer.json").exists());
}

#[test]
fn lora_run_exports_merged_model_and_peft_adapter() {
    let run = scratch_dir("lora-sft");
    run_to_end(sft_command(
        &test_config(),
        &run,
        &[
            "--set",
            "train.steps=4",
            "--set",
            "lora.rank=4",
            "--set",
            "lora.alpha=8",
            "--set",
            "lora.targets=[\"q_proj\", \"v_proj\"]",
        ],
    ));
    let out = scratch_dir("lora-export");
    let status = Command::new(trainer_bin())
        .args([
            "export",
            "--checkpoint",
            checkpoint(&run, 4).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["r"], 4);
    let tensors = WeightSource::open(&[out.join("adapter/adapter_model.safetensors")]).unwrap();
    let names: Vec<&str> = tensors.names().collect();
    assert!(
        names.contains(&"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
        "{names:?}"
    );
    assert_eq!(names.len(), 2 * 2 * 2);
    // The merged folder holds plain weights only and loads.
    trainer::CausalLm::<trainer::Cpu>::load(&out, &Default::default()).unwrap();
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let run = scratch_dir("bad-config");
    let output = sft_command(&test_config(), &run, &["--set", "train.learning_rate=1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("learning_rate") && stderr.contains("sft-tiny-test.toml"),
        "{stderr}"
    );
    let output = sft_command(&test_config(), &run, &["--set", "train.steps=forty"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("train.steps"), "{stderr}");
}

#[test]
fn bf16_precision_trains_near_f32_and_keeps_f32_weights() {
    let steps = ["--set", "train.steps=16"];
    let full = scratch_dir("precision-f32");
    run_to_end(sft_command(&test_config(), &full, &steps));
    let half = scratch_dir("precision-bf16");
    run_to_end(sft_command(
        &test_config(),
        &half,
        &[steps[0], steps[1], "--set", "run.precision=bf16"],
    ));
    let (curve_full, curve_half) = (loss_curve(&full), loss_curve(&half));
    assert_eq!(curve_full.len(), curve_half.len());
    let mut largest_gap: f64 = 0.0;
    for ((step, a), (_, b)) in curve_full.iter().zip(&curve_half) {
        assert!(
            (a - b).abs() < 0.01 * a,
            "step {step}: f32 loss {a}, bf16 loss {b}"
        );
        largest_gap = largest_gap.max((a - b).abs());
    }
    assert!(
        largest_gap > 0.0,
        "the bf16 run computed exactly like the f32 one"
    );
    // Master weights stay f32 in checkpoints.
    let bytes = std::fs::read(checkpoint(&half, 16).join("model.safetensors")).unwrap();
    let stored = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in stored.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }

    let output = sft_command(&test_config(), &half, &["--set", "run.precision=fp8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("run.precision") && stderr.contains("bf16"),
        "{stderr}"
    );
}

/// PEFT interop against the committed adapter that `scripts/check-peft-loads-ours` made with
/// `peft` (tests/fixtures/peft/). Our reader must compute PEFT's logits with it, our writer must
/// give back the same keys, shapes, values and config fields, and the merged export must compute
/// the same logits; the script recorded that `peft` loaded what our writer wrote. Nothing here
/// depends on the last bits of a computation (tolerances, no hashes).
#[test]
fn peft_adapters_read_and_written_like_peft() {
    let fixture = repo_root().join("tests/fixtures/peft");
    let read = |file: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture.join(file)).unwrap()).unwrap()
    };
    let record = read("peft_loads_ours.json");
    assert_eq!(record["loaded"], true);
    for key in [
        "max_abs_error_adapter_vs_peft",
        "max_abs_error_merged_vs_peft",
    ] {
        assert!(record[key].as_f64().unwrap() < 1e-4, "{key}: {record}");
    }
    let reference = read("reference.json");
    let floats =
        |key: &str| -> Vec<f32> { serde_json::from_value(reference[key].clone()).unwrap() };
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let (want, without) = (
        floats("logits_with_adapter"),
        floats("logits_without_adapter"),
    );
    assert!(
        max_abs_diff(&want, &without) > 1e-2,
        "the fixture adapter must change the logits"
    );
    let base_dir = repo_root().join(reference["base_model"].as_str().unwrap());
    let adapter_dir = fixture.join("adapter");
    let logits = |model: &trainer::CausalLm<trainer::Cpu>| -> Vec<f32> {
        let device = Default::default();
        let batch = trainer::model::mask::PaddedBatch::left_padded(&ids, 0);
        model
            .forward(
                trainer::model::mask::token_tensor(&batch.tokens, &device),
                trainer::model::mask::int_tensor(&batch.positions(), &device),
                trainer::model::mask::causal_mask(&batch.valid, batch.width(), &device),
            )
            .into_data()
            .to_vec()
            .unwrap()
    };

    // Reading: our model with PEFT's adapter computes PEFT's logits.
    let base = trainer::CausalLm::<trainer::Cpu>::load(&base_dir, &Default::default()).unwrap();
    let (adapted, config) = trainer::lora::load_peft_adapter(base, &adapter_dir).unwrap();
    assert_eq!((config.rank, config.alpha), (4, 16.0));
    let error = max_abs_diff(&logits(&adapted), &want);
    assert!(
        error < 1e-4,
        "our logits with the PEFT adapter: error {error}"
    );

    // Writing, through the binary: the same tensors under the same keys, the same config.
    let out = scratch_dir("peft-export");
    let exported = Command::new(trainer_bin())
        .args(["export", "--model"])
        .arg(&base_dir)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_succeeded(&exported);
    let theirs = WeightSource::open(&[adapter_dir.join("adapter_model.safetensors")]).unwrap();
    let ours = WeightSource::open(&[out.join("adapter/adapter_model.safetensors")]).unwrap();
    // The adapter's own tensors (PEFT also saves `lm_head`'s base weight when it is a target;
    // the base model has it already, so we do not write it again).
    let names = |source: &WeightSource| {
        let mut names: Vec<String> = source
            .names()
            .filter(|n| n.contains(".lora_"))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&ours), names(&theirs), "adapter key names");
    for name in names(&theirs) {
        let (a, b) = (ours.get(&name).unwrap(), theirs.get(&name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        assert!(max_abs_diff(&a.data, &b.data) <= 1e-7, "{name} changed");
    }
    let config_of = |dir: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours_config, theirs_config) = (config_of(&out.join("adapter")), config_of(&adapter_dir));
    for key in ["peft_type", "bias", "fan_in_fan_out"] {
        assert_eq!(
            ours_config[key], theirs_config[key],
            "adapter_config.json `{key}`"
        );
    }
    for key in ["r", "lora_alpha"] {
        assert_eq!(
            ours_config[key].as_f64(),
            theirs_config[key].as_f64(),
            "adapter_config.json `{key}`"
        );
    }
    let targets = |config: &Value| {
        let mut list: Vec<String> =
            serde_json::from_value(config["target_modules"].clone()).unwrap();
        list.sort();
        list
    };
    assert_eq!(targets(&ours_config), targets(&theirs_config));
    assert_eq!(
        ours_config["base_model_name_or_path"].as_str().unwrap(),
        base_dir.display().to_string(),
        "the adapter names the model it goes on"
    );

    // The merged export computes the adapted logits on its own.
    let merged = trainer::CausalLm::<trainer::Cpu>::load(&out, &Default::default()).unwrap();
    let error = max_abs_diff(&logits(&merged), &want);
    assert!(error < 1e-4, "merged export: error {error}");

    // A LoRA training run exports its adapter in the same layout (keys and shapes).
    let run = scratch_dir("peft-run");
    run_to_end(sft_command(
        &repo_root().join("tests/fixtures/configs/sft-lora-peft.toml"),
        &run,
        &[],
    ));
    let trained_out = scratch_dir("peft-trained-export");
    trainer::export::export_checkpoint(
        &checkpoint(&run, 3),
        &trained_out,
        checkpoints::StoreDtype::F32,
    )
    .unwrap();
    let trained =
        WeightSource::open(&[trained_out.join("adapter/adapter_model.safetensors")]).unwrap();
    assert_eq!(names(&trained), names(&theirs));
    for name in names(&theirs) {
        assert_eq!(
            trained.get(&name).unwrap().shape,
            theirs.get(&name).unwrap().shape
        );
    }
    let trained_config = config_of(&trained_out.join("adapter"));
    assert_eq!(targets(&trained_config), targets(&theirs_config));
    // It names the model the run started from, not the merged export (PEFT would apply the
    // adapter twice).
    assert_eq!(
        trained_config["base_model_name_or_path"].as_str().unwrap(),
        base_dir.display().to_string()
    );
}

/// The model folder's side files reach `final/` and exports, and config.json says its dtype in
/// both the transformers 4 and 5 keys.
#[test]
fn exports_carry_the_generation_config_and_chat_template() {
    let model = scratch_dir("side-files-model");
    copy_dir(&repo_root().join("tests/fixtures/hf/llama-gqa"), &model);
    let template =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    std::fs::write(model.join("chat_template.jinja"), template).unwrap();
    assert!(model.join("generation_config.json").exists());
    let run = scratch_dir("side-files-run");
    run_to_end(sft_command(
        &repo_root().join("tests/fixtures/configs/sft-lora-peft.toml"),
        &run,
        &["--set", &format!("model.path={}", model.display())],
    ));
    let out = scratch_dir("side-files-export");
    let exported = Command::new(trainer_bin())
        .args(["export", "--model"])
        .arg(run.join("final"))
        .args(["--dtype", "bf16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_succeeded(&exported);
    for dir in [run.join("final"), out.clone()] {
        for file in [
            "generation_config.json",
            "chat_template.jinja",
            "tokenizer.json",
        ] {
            assert_eq!(
                std::fs::read(dir.join(file)).unwrap(),
                std::fs::read(model.join(file)).unwrap(),
                "{}: {file}",
                dir.display()
            );
        }
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    assert_eq!(config["torch_dtype"], "bfloat16");
}

/// A PEFT adapter we cannot compute is refused with the reason, not loaded wrongly.
#[test]
fn unsupported_peft_adapters_are_refused_by_name() {
    let fixture = repo_root().join("tests/fixtures/peft/adapter");
    let base_dir = repo_root().join("tests/fixtures/hf/llama-gqa");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let cases: [(&str, Value, &str); 3] = [
        ("use_rslora", Value::Bool(true), "use_rslora"),
        (
            "target_modules",
            Value::String(".*proj".into()),
            "target_modules",
        ),
        ("peft_type", Value::String("IA3".into()), "peft_type"),
    ];
    for (key, value, named) in cases {
        let dir = scratch_dir(&format!("peft-bad-{key}"));
        copy_dir(&fixture, &dir);
        let mut changed = config.clone();
        changed[key] = value;
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string(&changed).unwrap(),
        )
        .unwrap();
        let base = trainer::CausalLm::<trainer::Cpu>::load(&base_dir, &Default::default()).unwrap();
        let error = trainer::lora::load_peft_adapter(base, &dir).unwrap_err();
        assert!(format!("{error:#}").contains(named), "{key}: {error:#}");
    }
}

/// Every scalar of every metrics line except the wall-clock ones.
fn deterministic_metrics(run_dir: &Path) -> Vec<Vec<(String, f64)>> {
    trainer::metrics::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|line| {
            line.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "time" && !k.ends_with("per_s"))
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn onpolicy_sft_resumes_exactly() {
    let straight = scratch_dir("onpolicy-straight");
    run_to_end(onpolicy_command(&straight, &[]));
    let killed = scratch_dir("onpolicy-killed");
    // SIGKILL once the step-2 checkpoint exists, then resume for the rest.
    kill_after_checkpoint(onpolicy_command(&killed, &[]), &killed, 2, 6);
    run_to_end(onpolicy_command(&killed, &["--resume", "auto"]));

    let metrics = deterministic_metrics(&straight);
    assert_eq!(metrics, deterministic_metrics(&killed));
    // Something was trained on: the run is not trivially exact.
    assert!(
        metrics
            .iter()
            .flatten()
            .any(|(k, v)| k == "kept_share" && *v > 0.0),
        "{metrics:?}"
    );
    assert!(metrics.iter().flatten().any(|(k, _)| k == "loss"));
    assert_eq!(
        model_tensors(&checkpoint(&straight, 6)),
        model_tensors(&checkpoint(&killed, 6))
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(killed.join("summary.json")).unwrap())
            .unwrap();
    assert!(
        summary["base"]["mean_length"].as_f64().unwrap() > 0.0,
        "base numbers survive the resume"
    );
}

/// `sampling.updates_per_rollout = 3`: one rollout every three steps, an update each step,
/// and a run killed between a rollout's updates resumes to the same weights (the mini-batches
/// still to train on are part of the checkpoint).
#[test]
fn onpolicy_sft_takes_several_updates_per_rollout_and_resumes_between_them() {
    let three = ["--set", "sampling.updates_per_rollout=3"];
    let straight = scratch_dir("onpolicy-updates-straight");
    run_to_end(onpolicy_command(&straight, &three));
    let metrics = deterministic_metrics(&straight);
    // Each rollout that kept n responses (of 4 prompts x 8 samples) is followed by min(3, n)
    // updates, the first in its own step; none kept skips the step; no rollout comes early.
    let value =
        |line: &Vec<(String, f64)>, key: &str| line.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let mut next_rollout = 1.0;
    let mut multi_update_rollouts = 0;
    for line in &metrics[1..] {
        let step = value(line, "step").unwrap();
        match value(line, "kept_share") {
            Some(share) => {
                assert_eq!(step, next_rollout, "rollout at step {step}: {metrics:?}");
                let kept = (share * 32.0).round() as usize;
                let updates = kept.min(3);
                multi_update_rollouts += (updates > 1) as usize;
                next_rollout = step + updates.max(1) as f64;
                assert_eq!(value(line, "loss").is_some(), kept > 0, "{metrics:?}");
            }
            None => {
                assert!(
                    step < next_rollout,
                    "a rollout was due at step {step}: {metrics:?}"
                );
                assert!(value(line, "loss").is_some(), "{metrics:?}");
            }
        }
    }
    assert!(
        multi_update_rollouts > 0,
        "no rollout had several updates: {metrics:?}"
    );

    let killed = scratch_dir("onpolicy-updates-killed");
    // Checkpoints every 2 steps: some fall between a rollout's updates.
    kill_after_checkpoint(onpolicy_command(&killed, &three), &killed, 2, 6);
    let mut resumed = three.to_vec();
    resumed.extend(["--resume", "auto"]);
    run_to_end(onpolicy_command(&killed, &resumed));
    assert_eq!(metrics, deterministic_metrics(&killed));
    assert_eq!(
        model_tensors(&checkpoint(&straight, 6)),
        model_tensors(&checkpoint(&killed, 6))
    );
    // Three updates per rollout differ from one.
    let one = scratch_dir("onpolicy-updates-one");
    run_to_end(onpolicy_command(&one, &[]));
    assert_ne!(
        model_tensors(&checkpoint(&straight, 6)),
        model_tensors(&checkpoint(&one, 6))
    );
}

/// `trainer data` writes the built-in tasks in every style, and on-policy SFT trains on the
/// chain task (five steps over two-digit numbers) from config.
#[test]
fn built_in_tasks_are_written_by_the_binary_and_train() {
    let dir = scratch_dir("data-tasks");
    let write = |task: &str, style: &str| -> Vec<Value> {
        let out = dir.join(format!("{task}-{style}.jsonl"));
        let output = Command::new(trainer_bin())
            .args([
                "data", task, "--count", "20", "--style", style, "--seed", "3", "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert_succeeded(&output);
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let direct = write("arithmetic-chain", "direct");
    let verbose = write("arithmetic-chain", "verbose");
    assert_eq!(direct.len(), 20);
    for (d, v) in direct.iter().zip(&verbose) {
        assert_eq!(d["prompt"], v["prompt"]);
        let answer = d["response"].as_str().unwrap().trim();
        assert!(answer.starts_with("#### "), "{answer}");
        let steps = v["response"].as_str().unwrap();
        assert!(steps.ends_with(answer), "{steps}");
        let equations = steps.matches(" = ").count() - steps.matches("Check: ").count();
        assert_eq!(equations, 5, "{steps}");
    }
    let simple = write("arithmetic", "concise");
    assert_ne!(simple[0]["prompt"], direct[0]["prompt"]);
    let output = Command::new(trainer_bin())
        .args(["data", "algebra", "--out"])
        .arg(dir.join("x.jsonl"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("arithmetic-chain"));

    let run = scratch_dir("onpolicy-chain");
    run_to_end(onpolicy_command(
        &run,
        &[
            "--set",
            "task.source=arithmetic-chain",
            "--set",
            "train.steps=2",
        ],
    ));
    assert!(run.join("summary.json").exists());
}

/// Evaluations during training run on dev prompts, the table on test prompts; sampled
/// accuracy is avg@k with a 95% interval, and sampled lengths stand next to greedy ones.
#[test]
fn onpolicy_sft_evaluates_on_dev_during_training_and_reports_test_with_intervals() {
    let run = scratch_dir("onpolicy-dev-test");
    run_to_end(onpolicy_command(
        &run,
        &[
            "--set",
            "task.source=arithmetic",
            "--set",
            "task.dev_count=4",
            "--set",
            "eval.samples_per_prompt=3",
        ],
    ));
    let lines = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let base = &lines[0];
    assert_eq!(base["step"], 0);
    assert!(base.get("eval_greedy_accuracy").is_some(), "{base}");
    // The base on dev at step 0; eval_every = 3: dev evaluations at steps 3 and 6, none on
    // test after the base.
    let dev_steps: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("dev_greedy_accuracy").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(dev_steps, [0, 3, 6]);
    assert!(lines[1..]
        .iter()
        .all(|l| l.get("eval_greedy_accuracy").is_none()));

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for model in ["base", "trained"] {
        let r = &summary[model];
        for (value, interval) in [
            ("greedy_accuracy", "greedy_accuracy_95"),
            ("sampled_accuracy", "sampled_accuracy_95"),
        ] {
            let v = r[value].as_f64().unwrap();
            let [low, high] = [0, 1].map(|i| r[interval][i].as_f64().unwrap());
            assert!(low <= v && v <= high, "{model} {value}: {r}");
        }
        assert!(r["sampled_mean_length"].as_f64().unwrap() > 0.0);
    }
    let table = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(table.contains("avg@3"), "{table}");
}

/// The offline-SFT control trains on the built-in task's concise references in the same loop,
/// and `trainer compare` tabulates and plots finished runs side by side.
#[test]
fn offline_reference_control_trains_and_runs_compare_side_by_side() {
    let chain = ["--set", "task.source=arithmetic", "--set", "train.steps=2"];
    let offline = scratch_dir("onpolicy-offline");
    let mut settings = chain.to_vec();
    settings.extend(["--set", "sampling.source=concise-references"]);
    run_to_end(onpolicy_command(&offline, &settings));
    let lines = trainer::metrics::read_metrics(&offline.join("metrics.jsonl")).unwrap();
    let trained: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(trained.len(), 2);
    assert!(trained
        .iter()
        .all(|l| l["reference_mean_length"].as_f64().unwrap() > 3.0));
    assert!(trained.iter().all(|l| l.get("sample_accuracy").is_none()));

    let on_policy = scratch_dir("onpolicy-compared");
    run_to_end(onpolicy_command(&on_policy, &chain));
    let plot = scratch_dir("compare").join("sweep.png");
    let output = Command::new(trainer_bin())
        .arg("compare")
        .args([&on_policy, &offline])
        .arg("--out")
        .arg(&plot)
        .output()
        .unwrap();
    assert_succeeded(&output);
    assert!(image::open(&plot).unwrap().width() > 100);
    let table = std::fs::read_to_string(plot.with_extension("md")).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].starts_with("| base |") && rows[2].starts_with("| onpolicy-offline |"));

    // A task file has no references to train on.
    let output = onpolicy_command(
        &scratch_dir("onpolicy-offline-file"),
        &["--set", "sampling.source=concise-references"],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs a built-in task"));
}

/// A Parquet file as the Hub ships them (pyarrow, Snappy), its columns named by
/// `data.fields`, trains through the binary; without the mapping the error names the row and
/// the fields found, and how to map them.
#[test]
fn sft_trains_on_parquet_with_a_field_mapping() {
    let run = scratch_dir("parquet-run");
    let data = [
        "--set",
        "data.train=tests/fixtures/data/qa.parquet",
        "--set",
        "data.eval_count=2",
        "--set",
        "train.steps=3",
    ];
    let mut mapped = data.to_vec();
    mapped.extend([
        "--set",
        "data.fields.prompt=question",
        "--set",
        "data.fields.response=answer",
    ]);
    let output = sft_command(&test_config(), &run, &mapped).output().unwrap();
    assert_succeeded(&output);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("data_report.json")).unwrap())
            .unwrap();
    assert_eq!(report[0]["records"], 6, "{report}");

    let unmapped = sft_command(&test_config(), &scratch_dir("parquet-unmapped"), &data)
        .output()
        .unwrap();
    assert!(!unmapped.status.success());
    let stderr = String::from_utf8_lossy(&unmapped.stderr);
    assert!(
        stderr.contains("qa.parquet: row 0")
            && stderr.contains("question")
            && stderr.contains("data.fields"),
        "{stderr}"
    );
}

/// From a folder outside the clone: the built-in configs are listed, shown and copied, and
/// `trainer recipe sft` runs its built-in default config, its tokenizer and data unpacked
/// from the binary.
#[test]
fn builtin_configs_run_from_any_folder() {
    let elsewhere = scratch_dir("outside-the-clone");
    let trainer = |args: &[&str]| {
        Command::new(trainer_bin())
            .current_dir(&elsewhere)
            .env("TRAINER_CACHE", elsewhere.join("cache"))
            .args(args)
            .output()
            .unwrap()
    };
    let list = trainer(&["config", "list"]);
    assert_succeeded(&list);
    let list = String::from_utf8_lossy(&list.stdout);
    for name in [
        "sft/tiny",
        "onpolicy-sft/tiny",
        "skipgpt/tiny",
        "sft/smollm2-135m",
    ] {
        assert!(list.contains(name), "{list}");
    }
    let shown = trainer(&["config", "show", "sft/tiny"]);
    let on_disk =
        std::fs::read_to_string(repo_root().join("recipes/configs/sft/tiny.toml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&shown.stdout), on_disk);
    assert_succeeded(&trainer(&["config", "cp", "sft/tiny", "mine.toml"]));
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("mine.toml")).unwrap(),
        on_disk
    );
    let again = trainer(&["config", "cp", "sft/tiny", "mine.toml"]);
    assert!(!again.status.success(), "an existing file was overwritten");

    let short = [
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "data.eval_count=2",
        "--set",
        "train.eval_every=2",
    ];
    let mut args = vec!["recipe", "sft"];
    args.extend(short);
    assert_succeeded(&trainer(&args));
    assert!(elsewhere
        .join("runs/sft-tiny/final/model.safetensors")
        .exists());
    // The copied config runs too: its `recipes/...` paths resolve to the shipped files.
    let mut args = vec![
        "recipe",
        "sft",
        "--config",
        "mine.toml",
        "--set",
        "run.dir=runs/mine",
    ];
    args.extend(short);
    assert_succeeded(&trainer(&args));
    assert!(elsewhere.join("runs/mine/final/model.safetensors").exists());
    let unknown = trainer(&["recipe", "sft", "--config", "sft/tinny"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("sft/tinny") && stderr.contains("sft/tiny"),
        "{stderr}"
    );
}

/// A short LoRA run (rank 2 on `q_proj`) on the scratch model of the tiny test config.
const SCRATCH_LORA: [&str; 10] = [
    "--set",
    "train.steps=4",
    "--set",
    "train.save_every=2",
    "--set",
    "lora.rank=2",
    "--set",
    "lora.alpha=4",
    "--set",
    "lora.targets=[\"q_proj\"]",
];

/// Step checkpoints open with Hugging Face tools. A full run's step folder holds config.json
/// and HF-named weights; a LoRA run's holds the adapters only (ours and PEFT's layout) plus
/// the base's folder and fingerprint, not the frozen base again. The outcomes of
/// `from_pretrained` on such folders, recorded by scripts/check-peft-loads-ours, are checked
/// with tolerances (nothing computed here is compared bitwise).
#[test]
fn step_checkpoints_load_in_hugging_face_tools() {
    let full = scratch_dir("hf-step-full");
    run_to_end(sft_command(
        &test_config(),
        &full,
        &["--set", "train.steps=2", "--set", "train.save_every=2"],
    ));
    let step = checkpoint(&full, 2);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float32");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    // Our own loader reads the step folder as a model folder, weights equal to the export's.
    let from_step = trainer::CausalLm::<trainer::Cpu>::load(&step, &Default::default()).unwrap();
    let exported =
        trainer::CausalLm::<trainer::Cpu>::load(&full.join("final"), &Default::default()).unwrap();
    assert_eq!(
        trainer::train::weights_fingerprint(&from_step),
        trainer::train::weights_fingerprint(&exported)
    );

    // LoRA on a model folder: adapters only, naming that folder.
    let lora = scratch_dir("hf-step-lora");
    let lora_config = repo_root().join("tests/fixtures/configs/sft-lora-peft.toml");
    run_to_end(sft_command(&lora_config, &lora, &[]));
    let step = checkpoint(&lora, 3);
    let model = WeightSource::open(&[step.join("model.safetensors")]).unwrap();
    assert!(
        model.names().all(trainer::lora::is_adapter_parameter),
        "frozen weights stored again"
    );
    let base_size =
        std::fs::metadata(repo_root().join("tests/fixtures/hf/llama-gqa/model.safetensors"))
            .unwrap()
            .len();
    assert!(
        std::fs::metadata(step.join("model.safetensors"))
            .unwrap()
            .len()
            < base_size / 4
    );
    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("adapter_config.json")).unwrap())
            .unwrap();
    let named = Path::new(adapter["base_model_name_or_path"].as_str().unwrap()).to_path_buf();
    assert_eq!(
        named,
        repo_root()
            .join("tests/fixtures/hf/llama-gqa")
            .canonicalize()
            .unwrap()
    );
    assert!(
        WeightSource::open(&[step.join("adapter_model.safetensors")])
            .unwrap()
            .names()
            .all(|n| n.contains(".lora_"))
    );

    // LoRA on a model trained from scratch: the frozen base is written once, to RUN/base.
    let scratch_lora = scratch_dir("hf-step-scratch-lora");
    let settings = SCRATCH_LORA;
    run_to_end(sft_command(&test_config(), &scratch_lora, &settings));
    let base =
        trainer::CausalLm::<trainer::Cpu>::load(&scratch_lora.join("base"), &Default::default())
            .unwrap();
    assert_eq!(base.config.num_hidden_layers, 2);
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint(&scratch_lora, 4).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Path::new(adapter["base_model_name_or_path"].as_str().unwrap()),
        scratch_lora.join("base").canonicalize().unwrap()
    );

    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/peft/hf_loads_checkpoints.json"))
            .unwrap(),
    )
    .unwrap();
    for key in [
        "auto_peft_adapter_merged_vs_our_merged",
        "lora_step_checkpoint_merged_vs_our_merged",
        "full_step_checkpoint_vs_export",
    ] {
        assert!(record[key].as_f64().unwrap() <= 1e-5, "{key}: {record}");
    }
    // Unmerged against merged differs by rounding only, as much as PEFT against itself.
    let floor = record["peft_unmerged_vs_peft_merged"].as_f64().unwrap();
    assert!(
        record["auto_peft_adapter_unmerged_vs_our_merged"]
            .as_f64()
            .unwrap()
            <= floor * 1.01 + 1e-7
    );
    assert!(
        record["lora_step_checkpoint_unmerged_vs_our_merged"]
            .as_f64()
            .unwrap()
            < 1e-4
    );
    let files: Vec<&str> = record["lora_step_checkpoint_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"adapter_model.safetensors") && !files.contains(&"config.json"),
        "{files:?}"
    );
}

/// A LoRA checkpoint resumed over another base model is refused, naming the checkpoint.
#[test]
fn lora_resume_on_another_base_is_refused() {
    let run = scratch_dir("lora-base-changed");
    let settings = SCRATCH_LORA;
    run_to_end(sft_command(&test_config(), &run, &settings));
    // Resume with a different scratch seed: the base the recipe builds is not the trained one.
    let mut resumed = settings.to_vec();
    resumed.extend([
        "--set",
        "run.seed=99",
        "--set",
        "train.steps=6",
        "--resume",
        "auto",
    ]);
    let output = sft_command(&test_config(), &run, &resumed)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another base model") && stderr.contains("step-00000004"),
        "{stderr}"
    );
}
