//! SkipGPT: routed forwards agree, the sparsity loss and gate mean, which parameters train in
//! each stage, the export with routers, and a short run of all stages through the binary.

mod common;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::prelude::*;
use checkpoints::{StoreDtype, WeightSource};
use common::*;
use datasets::{TokenBatch, TokenRow};
use recipes::skipgpt::{
    evaluate_deciding, evaluate_routed, evaluate_routed_with_noise, flops_kept, gated_forward,
    least_important_modules, routed_forward, router_loss, with_routers, without_routers, Decider,
};
use serde_json::Value;
use std::collections::BTreeMap;
use trainer::model::init::ParamInit;
use trainer::model::llama::LlamaConfig;
use trainer::model::llama::{LayerDecisions, LayerExec};
use trainer::model::router::RoutedModules;
use trainer::train::{DeviceBatch, MicroBatchShare, Resume, TrainConfig, Trainer};
use trainer::weights::named_tensors;
use trainer::{CausalLm, Cpu};

type Train = Autodiff<Cpu>;

fn tiny_routed<B: Backend>(seed: u64) -> CausalLm<B> {
    tiny_routed_over(seed, RoutedModules::Both)
}

fn tiny_routed_over<B: Backend>(seed: u64, modules: RoutedModules) -> CausalLm<B> {
    let config = LlamaConfig::tiny(64, 32, 3, 4, 2);
    let model = CausalLm::<B>::new(
        &config,
        &mut ParamInit::normal(seed, 0.3),
        &Default::default(),
    );
    with_routers(model, seed + 1, modules)
}

/// The forward that multiplies every module by its router's hard gate (nothing skipped).
fn hard_gated_forward(
    model: &CausalLm<Cpu>,
    tokens: Tensor<Cpu, 2, Int>,
    positions: Tensor<Cpu, 2, Int>,
    allowed: Tensor<Cpu, 4, Bool>,
) -> Tensor<Cpu, 3> {
    model.forward_with(tokens, positions, allowed, &mut |index, hidden| {
        let router = model.model.layers[index].router.as_ref().unwrap();
        LayerExec::Gated(router.hard_gates(hidden.clone()))
    })
}

/// Two rows of different lengths (the second padded), all tokens trained.
fn batch() -> TokenBatch {
    let row = TokenRow::all_trained;
    let long = row((0..17).map(|i| (i * 7 + 3) % 64).collect());
    let short = row((0..11).map(|i| (i * 5 + 1) % 64).collect());
    TokenBatch::from_rows(&[&long, &short], 0)
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn real_skipping_equals_the_gated_forward_with_hard_gates() {
    let model = tiny_routed::<Cpu>(3);
    let batch = batch();
    let device = Default::default();
    let on_device = DeviceBatch::<Cpu>::new(&batch, &device);
    let (gated, _) = gated_forward(&model, &on_device, 1.0, None).unwrap();
    let (skipping, decisions) = routed_forward(
        &model,
        on_device.tokens.clone(),
        on_device.positions.clone(),
        on_device.allowed.clone(),
    );
    let multiplied = hard_gated_forward(
        &model,
        on_device.tokens,
        on_device.positions,
        on_device.allowed,
    );
    let flags: Vec<bool> = decisions
        .iter()
        .flat_map(|d| d.attn.iter().chain(&d.mlp).copied())
        .collect();
    assert!(
        flags.contains(&true) && flags.contains(&false),
        "the routers must skip some modules and run others for this test to mean anything"
    );
    let (gated, skipping, multiplied) = (values(gated), values(skipping), values(multiplied));
    // Padded positions are not compared: their rows are meaningless in every forward.
    let (width, vocab) = (batch.width(), 64);
    for (row, segment) in batch.segment.iter().enumerate() {
        for col in (0..width).filter(|&c| segment[c] != 0) {
            let at = (row * width + col) * vocab..(row * width + col + 1) * vocab;
            let error = max_abs_diff(&gated[at.clone()], &skipping[at.clone()]);
            assert!(error < 1e-4, "row {row} col {col}: {error}");
            assert!(max_abs_diff(&multiplied[at.clone()], &skipping[at]) < 1e-4);
        }
    }
}

#[test]
fn skipped_modules_are_not_applied() {
    let model = tiny_routed::<Cpu>(4);
    let device = Default::default();
    let on_device = DeviceBatch::<Cpu>::new(&batch(), &device);
    let tokens = on_device.tokens.clone();
    let logits = model.forward_with(
        on_device.tokens,
        on_device.positions,
        on_device.allowed,
        &mut |_, hidden| {
            let [b, s, _] = hidden.dims();
            LayerExec::Skipping(LayerDecisions {
                attn: vec![false; b * s],
                mlp: vec![false; b * s],
            })
        },
    );
    // Everything skipped: the layers are the identity and the logits are the head of the
    // embeddings.
    let expected = model.head(model.embed(tokens));
    assert!(max_abs_diff(&values(logits), &values(expected)) < 1e-6);
}

#[test]
fn sparsity_loss_is_lambda_times_the_distance_to_the_keep_target() {
    let device = Default::default();
    let model = tiny_routed::<Train>(5);
    let on_device = DeviceBatch::<Train>::new(&batch(), &device);
    let share = MicroBatchShare {
        index: 0,
        count: 2,
        peers: 1,
        total_targets: on_device.num_targets,
    };
    let (logits, mean_gate) = gated_forward(&model, &on_device, 1.0, None).unwrap();
    let gate: f32 = mean_gate.clone().into_scalar();
    let (loss, lm) = router_loss(logits, mean_gate, &on_device, share, 0.75, 20.0);
    let (loss, lm): (f32, f32) = (loss.into_scalar(), lm.into_scalar());
    // Two micro-batches: each carries half of the budget term.
    let budget = 20.0 * (gate - 0.75).abs() / 2.0;
    assert!((loss - lm - budget).abs() < 1e-4, "{loss} {lm} {budget}");

    // The mean counts real tokens only, over every layer and both module kinds.
    let (_, decisions) = routed_forward(
        &model.valid(),
        on_device.tokens.inner(),
        on_device.positions.inner(),
        on_device.allowed.inner(),
    );
    let real: Vec<bool> = batch().segment.iter().flatten().map(|&s| s != 0).collect();
    let (mut on, mut total) = (0, 0);
    for d in &decisions {
        for flags in [&d.attn, &d.mlp] {
            on += flags.iter().zip(&real).filter(|(f, r)| **f && **r).count();
            total += real.iter().filter(|r| **r).count();
        }
    }
    assert!((gate - on as f32 / total as f32).abs() < 1e-5);
}

fn train_config(text: &str) -> TrainConfig {
    toml::from_str(text).unwrap()
}

fn parameters(model: &CausalLm<Train>) -> BTreeMap<String, Vec<f32>> {
    named_tensors(&model.valid())
        .into_iter()
        .map(|(name, tensor)| (name, tensor.data))
        .collect()
}

/// Which parameters moved between two snapshots.
fn changed(before: &BTreeMap<String, Vec<f32>>, after: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
    after
        .iter()
        .filter(|(name, values)| before.get(*name) != Some(values))
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn router_stage_trains_only_routers_and_lora_stage_only_adapters() {
    let rows = vec![batch()];
    let mut config = train_config("steps = 2\nbatch_size = 2\nlr = 1e-2\nlog_every = 100");
    config.train_only = vec!["*.router.*".into()];
    let dir = scratch_dir("skipgpt-freezing-router");
    let model = tiny_routed::<Train>(6);
    let (mut trainer, _) = Trainer::start(model, config, None, 0, &dir, &Resume::No).unwrap();
    let before = parameters(&trainer.model);
    let objective = |model: &CausalLm<Train>, batch: DeviceBatch<Train>, share: MicroBatchShare| {
        let (logits, gate) = gated_forward(model, &batch, 2.0, None).unwrap();
        router_loss(logits, gate, &batch, share, 0.5, 20.0).0
    };
    trainer.train_step_of(&rows, &objective).unwrap();
    let moved = changed(&before, &parameters(&trainer.model));
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|n| n.contains(".router.")), "{moved:?}");
    assert!(moved.iter().any(|n| n.contains(".router.attn.fc1.weight")));

    // LoRA stage: adapters train; routers and the base stay.
    let lora =
        toml::from_str("rank = 4\nalpha = 8.0\ntargets = [\"q_proj\", \"v_proj\", \"gate_proj\"]")
            .unwrap();
    let config = train_config("steps = 2\nbatch_size = 2\nlr = 1e-2\nlog_every = 100");
    let dir = scratch_dir("skipgpt-freezing-lora");
    let model = trainer.model.clone();
    let (mut trainer, _) = Trainer::start(model, config, Some(lora), 0, &dir, &Resume::No).unwrap();
    // Two steps: LoRA's B starts at zero, so A only moves from the second step on.
    let before = parameters(&trainer.model);
    trainer.train_step(&rows).unwrap();
    trainer.train_step(&rows).unwrap();
    let moved = changed(&before, &parameters(&trainer.model));
    assert!(moved.iter().all(|n| n.contains(".lora.")), "{moved:?}");
    for target in ["q_proj", "v_proj", "gate_proj"] {
        assert!(
            moved.iter().any(|n| n.contains(target)),
            "{target}: {moved:?}"
        );
    }
}

/// `router.mode = joint`: routers and LoRA adapters train together (the routers as the
/// adapter's `modules_to_save`) and nothing else moves; the checkpoint holds both, a resumed
/// run gets both back, and the export merges the adapters and keeps the trained routers.
#[test]
fn joint_mode_trains_routers_and_adapters_together_and_saves_both() {
    let rows = vec![batch()];
    let lora: trainer::lora::LoraConfig = toml::from_str(
        "rank = 4\nalpha = 8.0\ntargets = [\"q_proj\", \"v_proj\"]\nmodules_to_save = [\"*.router.*\"]",
    )
    .unwrap();
    let config = train_config("steps = 3\nbatch_size = 2\nlr = 1e-2\nlog_every = 100");
    let dir = scratch_dir("skipgpt-joint");
    let start = |resume: &Resume| {
        Trainer::start(
            tiny_routed::<Train>(6),
            config.clone(),
            Some(lora.clone()),
            0,
            &dir,
            resume,
        )
        .unwrap()
        .0
    };
    let mut trainer = start(&Resume::No);
    let before = parameters(&trainer.model);
    let objective = |model: &CausalLm<Train>, batch: DeviceBatch<Train>, share: MicroBatchShare| {
        let (logits, gate) = gated_forward(model, &batch, 2.0, None).unwrap();
        router_loss(logits, gate, &batch, share, 0.5, 20.0).0
    };
    // Two steps: LoRA's B starts at zero, so A only moves from the second step on.
    for _ in 0..2 {
        trainer.train_step_of(&rows, &objective).unwrap();
    }
    let trained = parameters(&trainer.model);
    let moved = changed(&before, &trained);
    assert!(
        moved
            .iter()
            .all(|n| n.contains(".router.") || n.contains(".lora.")),
        "{moved:?}"
    );
    for part in [
        ".router.attn.",
        ".router.mlp.",
        "q_proj.lora.",
        "v_proj.lora.",
    ] {
        assert!(moved.iter().any(|n| n.contains(part)), "{part}: {moved:?}");
    }

    trainer.save_checkpoint(serde_json::json!({})).unwrap();
    let resumed = start(&Resume::Auto);
    assert_eq!(resumed.step, trainer.step);
    assert_eq!(parameters(&resumed.model), trained);

    let out = dir.join("export");
    trainer.export_latest(&out).unwrap();
    let source = WeightSource::open(&[out.join("model.safetensors")]).unwrap();
    assert!(!source.names().any(|n| n.contains("lora")));
    let exported = CausalLm::<Cpu>::load(&out, &Default::default()).unwrap();
    let exported: BTreeMap<String, Vec<f32>> = named_tensors(&exported)
        .into_iter()
        .map(|(name, tensor)| (name, tensor.data))
        .collect();
    let router = "model.layers.1.router.mlp.fc1.weight";
    assert_eq!(exported[router], trained[router]);
    assert_ne!(exported[router], before[router]);
}

#[test]
fn routed_model_saves_with_documented_router_names_and_reloads() {
    let model = tiny_routed::<Cpu>(7);
    let dir = scratch_dir("skipgpt-export");
    model.save(&dir, StoreDtype::F32, None).unwrap();
    let source = WeightSource::open(&[dir.join("model.safetensors")]).unwrap();
    for kind in ["attn", "mlp"] {
        for part in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
            let name = format!("model.layers.2.router.{kind}.{part}");
            assert!(source.contains(&name), "{name}");
        }
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["skipgpt_routers"], true);
    let back = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
    let device = Default::default();
    let on_device = DeviceBatch::<Cpu>::new(&batch(), &device);
    let (a, da) = routed_forward(
        &model,
        on_device.tokens.clone(),
        on_device.positions.clone(),
        on_device.allowed.clone(),
    );
    let (b, db) = routed_forward(
        &back,
        on_device.tokens,
        on_device.positions,
        on_device.allowed,
    );
    assert_eq!(da, db);
    assert_eq!(values(a), values(b));
}

/// `router.modules = attention` / `mlp`: the other module has no router and always runs; one
/// router step trains only the routers there are; the gate mean covers the routed modules;
/// the export says which modules are routed and reloads to the same decisions.
#[test]
fn routing_one_module_kind_leaves_the_other_running() {
    for (modules, routed, unrouted, column) in [
        (RoutedModules::Attention, "attn", "mlp", 1),
        (RoutedModules::Mlp, "mlp", "attn", 0),
    ] {
        let model = tiny_routed_over::<Train>(9, modules);
        let names: Vec<String> = parameters(&model).into_keys().collect();
        assert!(names
            .iter()
            .any(|n| n.contains(&format!(".router.{routed}."))));
        assert!(!names
            .iter()
            .any(|n| n.contains(&format!(".router.{unrouted}."))));

        // One router step: only the routed kind's routers exist to move, and they do.
        let mut config = train_config("steps = 1\nbatch_size = 2\nlr = 1e-2\nlog_every = 100");
        config.train_only = vec!["*.router.*".into()];
        let dir = scratch_dir(&format!("skipgpt-only-{routed}"));
        let (mut trainer, _) = Trainer::start(model, config, None, 0, &dir, &Resume::No).unwrap();
        let before = parameters(&trainer.model);
        let objective =
            |model: &CausalLm<Train>, batch: DeviceBatch<Train>, share: MicroBatchShare| {
                let (logits, gate) = gated_forward(model, &batch, 2.0, None).unwrap();
                let value: f32 = gate.clone().into_scalar().elem();
                assert!((0.0..=1.0).contains(&value), "{value}");
                router_loss(logits, gate, &batch, share, 0.5, 20.0).0
            };
        trainer.train_step_of(&[batch()], &objective).unwrap();
        let moved = changed(&before, &parameters(&trainer.model));
        assert!(!moved.is_empty());
        assert!(
            moved
                .iter()
                .all(|n| n.contains(&format!(".router.{routed}."))),
            "{moved:?}"
        );

        // Every token runs the unrouted module; the keep ratio counts it as kept.
        let model = trainer.model.valid();
        let eval = evaluate_routed(&model, &[batch()]);
        assert!(
            eval.keep.iter().all(|kinds| kinds[column] == 1.0),
            "{eval:?}"
        );
        let dir = scratch_dir(&format!("skipgpt-only-{routed}-export"));
        model.save(&dir, StoreDtype::F32, None).unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["skipgpt_routed_modules"], serde_json::json!(modules));
        let back = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
        assert_eq!(back.config.routed_modules, modules);
        assert_eq!(evaluate_routed(&back, &[batch()]), eval);
    }
}

/// `router.modules = block`: one router per layer; attention and MLP share every decision,
/// in the training forward (one noise draw) and at inference; export and reload keep it.
#[test]
fn block_routing_decides_both_modules_at_once() {
    let model = tiny_routed_over::<Cpu>(10, RoutedModules::Block);
    let names: Vec<String> = named_tensors(&model).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.contains(".router.attn.")));
    assert!(
        !names.iter().any(|n| n.contains(".router.mlp.")),
        "{names:?}"
    );
    let device = Default::default();
    let on_device = DeviceBatch::<Cpu>::new(&batch(), &device);
    let (_, decisions) = routed_forward(
        &model,
        on_device.tokens.clone(),
        on_device.positions.clone(),
        on_device.allowed.clone(),
    );
    for d in &decisions {
        assert_eq!(d.attn, d.mlp);
    }
    assert!(
        decisions.iter().any(|d| d.attn.contains(&false)),
        "some token skips"
    );
    // The training forward's gate mean (both kinds counted, no noise) is the keep ratio that
    // real skipping measures.
    let (_, mean_gate) = gated_forward(&model, &on_device, 1.0, None).unwrap();
    let mean: f32 = mean_gate.into_scalar().elem();
    let measured = evaluate_routed(&model, &[batch()]).overall_keep;
    assert!((mean as f64 - measured).abs() < 1e-6, "{mean} {measured}");

    let dir = scratch_dir("skipgpt-block-export");
    model.save(&dir, StoreDtype::F32, None).unwrap();
    let back = CausalLm::<Cpu>::load(&dir, &Default::default()).unwrap();
    assert_eq!(back.config.routed_modules, RoutedModules::Block);
    assert_eq!(
        evaluate_routed(&back, &[batch()]),
        evaluate_routed(&model, &[batch()])
    );
}

#[test]
fn evaluation_counts_keep_ratios_per_layer_and_kind() {
    let model = tiny_routed::<Cpu>(8);
    let eval = evaluate_routed(&model, &[batch()]);
    assert_eq!(eval.keep.len(), 3);
    let mean = eval.keep.iter().map(|[a, m]| a + m).sum::<f64>() / 6.0;
    assert!((mean - eval.overall_keep).abs() < 1e-12);
    assert!(eval.perplexity.is_finite() && eval.perplexity > 1.0);
    // The interval resamples the two rows: it holds the perplexity and has width.
    let (low, high) = eval.perplexity_95;
    assert!(
        low <= eval.perplexity && eval.perplexity <= high && low < high,
        "{eval:?}"
    );
    let dense = evaluate_routed(&without_routers(model.clone()), &[batch()]);
    assert_eq!(dense.overall_keep, 1.0);
    assert_ne!(dense.perplexity, eval.perplexity);
}

#[test]
fn all_stages_run_report_and_export_through_the_binary() {
    let run_dir = scratch_dir("skipgpt-run");
    let output = skipgpt_command(&run_dir, &["--stage", "lora"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("--stage router"),
        "{stderr}"
    );

    let output = skipgpt_command(&run_dir, &[]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    for name in ["dense", "routers", "routers + LoRA"] {
        let entry = &summary[name];
        assert!(entry["perplexity"].as_f64().unwrap() > 1.0, "{name}");
        assert_eq!(entry["keep"].as_array().unwrap().len(), 2, "{name}");
    }
    assert_eq!(summary["dense"]["overall_keep"], 1.0);
    assert_eq!(summary["dense"]["flops_keep"], 1.0);
    // The controls at the routers' keep ratio, and the dense base with the same LoRA stage.
    let names: Vec<&String> = summary.as_object().unwrap().keys().collect();
    for control in [
        "control: random routing",
        "control: static dropping",
        "control: dense + LoRA",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(control)),
            "{control}: {names:?}"
        );
    }
    // Each row against the routers, with a paired interval over the same held-out rows.
    let paired = &summary["perplexity ratio against routers (paired 95% CI)"];
    for name in ["routers + LoRA", "dense"] {
        let ratio: Vec<f64> = serde_json::from_value(paired[name].clone()).unwrap();
        let slack = 1e-9 * ratio[0];
        assert!(
            ratio[1] - slack <= ratio[0] && ratio[0] <= ratio[2] + slack,
            "{name}: {ratio:?}"
        );
    }
    assert!(run_dir.join("lora-dense/final/config.json").exists());
    for model in ["dense", "routers + LoRA"] {
        let speed = &summary["speed"][model];
        assert!(
            speed["prefill_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
        assert!(
            speed["decode_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
    }
    let routers = summary["routers"]["flops_keep"].as_f64().unwrap();
    assert!(routers > 0.0 && routers <= 1.0);
    let map = image::open(run_dir.join("plots/routing-map.png")).unwrap();
    assert!(map.width() > 100 && map.height() > 100);

    // The final model: base + routers + merged LoRA, routing at inference.
    let final_dir = run_dir.join("lora/final");
    let source = WeightSource::open(&[final_dir.join("model.safetensors")]).unwrap();
    assert!(source.contains("model.layers.1.router.mlp.fc2.bias"));
    assert!(!source.names().any(|n| n.contains("lora")));
    let model = CausalLm::<Cpu>::load(&final_dir, &Default::default()).unwrap();
    assert!(model.config.skip_routers);

    // Running again into the folder needs --resume, which reuses the finished stages.
    let output = skipgpt_command(&run_dir, &[]).output().unwrap();
    assert!(!output.status.success());
    let output = skipgpt_command(&run_dir, &["--resume", "auto"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(stdout.contains("router stage: reusing"), "{stdout}");

    // The official code's noisy evaluation, beside the deterministic one, on the same models.
    let output = skipgpt_command(
        &run_dir,
        &["--resume", "auto", "--set", "router.eval_noise=true"],
    )
    .output()
    .unwrap();
    assert!(output.status.success());
    let noisy: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(noisy["routers + LoRA"], summary["routers + LoRA"]);
    let entry = &noisy["routers + LoRA, noisy evaluation"];
    assert!(entry["perplexity"].as_f64().unwrap() > 1.0, "{noisy}");
    assert_ne!(entry["keep"], summary["routers + LoRA"]["keep"]);
}

/// `router.mode = joint` through the binary: one stage trains routers and LoRA, the table has
/// the jointly trained model, the controls at its keep ratio, and its measured speed.
#[test]
fn joint_mode_runs_one_stage_through_the_binary() {
    let run_dir = scratch_dir("skipgpt-joint-run");
    let joint = ["--set", "router.mode=joint"];
    let output = skipgpt_command(&run_dir, &[&joint[..], &["--stage", "lora"]].concat())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("joint"),
        "{stderr}"
    );

    run_to_end(skipgpt_command(&run_dir, &joint));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let entry = &summary["routers + LoRA, trained jointly"];
    assert!(entry["perplexity"].as_f64().unwrap() > 1.0, "{summary}");
    assert!(summary.get("routers").is_none(), "{summary}");
    let names: Vec<&String> = summary.as_object().unwrap().keys().collect();
    for control in ["control: random routing", "control: dense + LoRA"] {
        assert!(
            names.iter().any(|n| n.starts_with(control)),
            "{control}: {names:?}"
        );
    }
    assert!(
        summary["speed"]["routers + LoRA, trained jointly"]["decode_tokens_per_s"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
    );
    assert!(!run_dir.join("router").exists() && !run_dir.join("lora").exists());
    let final_dir = run_dir.join("joint/final");
    let source = WeightSource::open(&[final_dir.join("model.safetensors")]).unwrap();
    assert!(source.contains("model.layers.1.router.attn.fc2.bias"));
    assert!(!source.names().any(|n| n.contains("lora")));
    assert!(
        CausalLm::<Cpu>::load(&final_dir, &Default::default())
            .unwrap()
            .config
            .skip_routers
    );
}

/// FLOPs kept: all of them when everything runs; without attention queries and MLPs only the
/// key and value projections; an MLP costs what its three products cost.
#[test]
fn flops_kept_counts_what_skipping_saves() {
    let config = LlamaConfig::tiny(64, 32, 3, 4, 2);
    assert!((flops_kept(&config, &[[1.0, 1.0]; 3], 10.0) - 1.0).abs() < 1e-12);
    let (h, i) = (32.0, config.intermediate_size as f64);
    let q = (config.num_attention_heads * config.head_dim) as f64;
    let kv = (config.num_key_value_heads * config.head_dim) as f64;
    let total = 4.0 * h * q + 4.0 * 10.0 * q + 4.0 * h * kv + 6.0 * h * i;
    let nothing = flops_kept(&config, &[[0.0, 0.0]; 3], 10.0);
    assert!((nothing - 4.0 * h * kv / total).abs() < 1e-12, "{nothing}");
    let no_mlp = flops_kept(&config, &[[1.0, 0.0]; 3], 10.0);
    assert!(
        (no_mlp - (1.0 - 6.0 * h * i / total)).abs() < 1e-12,
        "{no_mlp}"
    );
    // Longer contexts make attention a larger share.
    assert!(
        flops_kept(&config, &[[0.0, 1.0]; 3], 1000.0) < flops_kept(&config, &[[0.0, 1.0]; 3], 10.0)
    );
}

/// The random and static controls: random routing draws each decision from its keep ratio
/// (seeded); static dropping drops exactly the asked number of modules for every token.
#[test]
fn random_and_static_controls_skip_as_asked() {
    let model = without_routers(tiny_routed::<Cpu>(12));
    let batches = [batch()];
    let dense = evaluate_routed(&model, &batches);
    let all = [[1.0, 1.0]; 3];
    let kept_all = evaluate_deciding(
        &model,
        &batches,
        Decider::Random {
            keep: &all,
            seed: 1,
        },
    );
    assert_eq!(kept_all.perplexity, dense.perplexity);
    let half = [[0.5, 0.5]; 3];
    let a = evaluate_deciding(
        &model,
        &batches,
        Decider::Random {
            keep: &half,
            seed: 1,
        },
    );
    let b = evaluate_deciding(
        &model,
        &batches,
        Decider::Random {
            keep: &half,
            seed: 1,
        },
    );
    assert_eq!(a, b);
    assert!(a.overall_keep > 0.2 && a.overall_keep < 0.8, "{a:?}");
    let dropped = least_important_modules(&model, &batches, 2);
    assert_eq!(dropped.iter().flatten().filter(|&&d| d).count(), 2);
    let eval = evaluate_deciding(&model, &batches, Decider::Static { dropped: &dropped });
    assert!((eval.overall_keep - 4.0 / 6.0).abs() < 1e-12, "{eval:?}");
    for (layer, [attn, mlp]) in eval.keep.iter().enumerate() {
        assert_eq!(*attn, if dropped[layer][0] { 0.0 } else { 1.0 });
        assert_eq!(*mlp, if dropped[layer][1] { 0.0 } else { 1.0 });
    }
    // The modules dropped are the two whose single removal cost the least.
    let single = |layer: usize, kind: usize| {
        let mut one = vec![[false; 2]; 3];
        one[layer][kind] = true;
        evaluate_deciding(&model, &batches, Decider::Static { dropped: &one }).perplexity
    };
    let worst_dropped = (0..3)
        .flat_map(|l| (0..2).map(move |k| (l, k)))
        .filter(|&(l, k)| dropped[l][k])
        .map(|(l, k)| single(l, k))
        .fold(f64::MIN, f64::max);
    for (l, k) in (0..3).flat_map(|l| (0..2).map(move |k| (l, k))) {
        if !dropped[l][k] {
            assert!(single(l, k) >= worst_dropped);
        }
    }
}

/// Noisy evaluation draws from its seed: the same seed decides the same, another seed or no
/// noise decides differently.
#[test]
fn noisy_evaluation_is_seeded_and_differs_from_the_deterministic_one() {
    let model = tiny_routed::<Cpu>(11);
    let batches = [batch()];
    let plain = evaluate_routed(&model, &batches);
    let once = evaluate_routed_with_noise(&model, &batches, Some(1));
    assert_eq!(once, evaluate_routed_with_noise(&model, &batches, Some(1)));
    assert_ne!(once.keep, plain.keep);
    assert_ne!(
        once.keep,
        evaluate_routed_with_noise(&model, &batches, Some(2)).keep
    );
    assert_eq!(plain, evaluate_routed_with_noise(&model, &batches, None));
}

/// Greedy continuation by full gated forwards over the growing sequence.
fn greedy_by_full_forwards(model: &CausalLm<Cpu>, prompt: &[u32], steps: usize) -> Vec<u32> {
    use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
    let device = Default::default();
    let mut sequence = prompt.to_vec();
    for _ in 0..steps {
        let batch = PaddedBatch::left_padded(std::slice::from_ref(&sequence), 0);
        let logits = values(hard_gated_forward(
            model,
            token_tensor(&batch.tokens, &device),
            int_tensor(&batch.positions(), &device),
            causal_mask(&batch.valid, batch.width(), &device),
        ));
        let last = &logits[(sequence.len() - 1) * 64..sequence.len() * 64];
        let next = (0..64)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        sequence.push(next as u32);
    }
    sequence[prompt.len()..].to_vec()
}

#[test]
fn generation_with_routers_skips_and_matches_the_gated_forward() {
    use trainer::generate::{generate, GenerationConfig};
    use trainer::sampling::SamplingParams;
    let model = tiny_routed::<Cpu>(9);
    let prompts: Vec<Vec<u32>> = vec![
        (0..9).map(|i| (i * 11 + 2) % 64).collect(),
        (0..5).map(|i| (i * 13 + 5) % 64).collect(),
    ];
    let config = GenerationConfig {
        max_new_tokens: 8,
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
        },
        seed: 0,
        stop_tokens: vec![],
        pad_id: 0,
    };
    // Batched and left-padded, through the KV cache and the skipping forward.
    let generated = generate(&model, &prompts, &config).unwrap().tokens;
    for (prompt, tokens) in prompts.iter().zip(&generated) {
        assert_eq!(tokens, &greedy_by_full_forwards(&model, prompt, 8));
    }
}
