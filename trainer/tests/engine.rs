//! The training engine on a tiny model: accumulation, clipping, AdamW, freezing, LoRA.

use burn::prelude::*;
use datasets::{TokenBatch, TokenRow};
use trainer::lora::{self, LoraConfig};
use trainer::model::init::ParamInit;
use trainer::optim::Gradients;
use trainer::train::{Resume, TrainConfig, Trainer};
use trainer::weights::named_tensors;
use trainer::{CausalLm, Cpu, CpuAutodiff, LlamaConfig};

fn tiny_model<B: Backend>() -> CausalLm<B> {
    let config = LlamaConfig::tiny(40, 32, 2, 4, 2);
    CausalLm::new(&config, &mut ParamInit::normal(5, 0.2), &Default::default())
}

/// Rows of different lengths with prompt tokens that are not trained on.
fn rows() -> Vec<TokenRow> {
    (0..4)
        .map(|r| {
            let len = 6 + 2 * r;
            TokenRow {
                tokens: (0..len).map(|i| ((i * 7 + r * 3) % 40) as u32).collect(),
                loss_mask: (0..len).map(|i| i >= 2 + r).collect(),
                segment: vec![1; len],
            }
        })
        .collect()
}

fn config(steps: u64) -> TrainConfig {
    toml::from_str(&format!(
        "steps = {steps}\nbatch_size = 4\nlr = 0.01\nweight_decay = 0.1\nmax_grad_norm = 0.5"
    ))
    .unwrap()
}

fn run_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn start(
    model: CausalLm<CpuAutodiff>,
    config: TrainConfig,
    lora: Option<LoraConfig>,
    name: &str,
) -> Trainer<CpuAutodiff> {
    Trainer::start(model, config, lora, 0, &run_dir(name), &Resume::No)
        .unwrap()
        .0
}

fn weights_of<B: Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<f32>)> {
    named_tensors(model)
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect()
}

#[test]
fn accumulating_micro_batches_equals_one_large_batch() {
    let rows = rows();
    let all: Vec<&TokenRow> = rows.iter().collect();
    let trainer = start(tiny_model(), config(1), None, "accumulate");
    let (large_loss, large) = trainer
        .loss_and_gradients(&[TokenBatch::from_rows(&all, 0)])
        .unwrap();
    // Uneven micro-batches: 1 row, then 3 rows with more targets.
    let micro = [
        TokenBatch::from_rows(&all[..1], 0),
        TokenBatch::from_rows(&all[1..], 0),
    ];
    let (accumulated_loss, accumulated) = trainer.loss_and_gradients(&micro).unwrap();
    assert_same_loss_and_gradients((large_loss, &large), (accumulated_loss, &accumulated));
    // Summing instead of averaging would be off by the micro-batch count: make sure the
    // comparison can tell.
    let norm = large.global_norm();
    assert!(norm > 1e-3 && (accumulated.global_norm() - norm).abs() < 1e-5 * norm);
}

fn assert_same_loss_and_gradients(
    (loss_a, a): (f64, &Gradients<Cpu>),
    (loss_b, b): (f64, &Gradients<Cpu>),
) {
    assert!((loss_a - loss_b).abs() < 1e-5, "{loss_a} vs {loss_b}");
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, g) in &a.tensors {
        let x: Vec<f32> = g.to_data().to_vec().unwrap();
        let y: Vec<f32> = b.tensors[name].to_data().to_vec().unwrap();
        let scale = x.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let error = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(
            error <= 1e-5 * scale.max(1e-3),
            "{name}: {error} (largest gradient {scale})"
        );
    }
}

#[test]
fn splitting_micro_batches_by_length_pads_less_for_the_same_gradients() {
    // Short and long rows mixed, as in SFT data: one batch pads the short ones to the longest.
    let rows: Vec<TokenRow> = [30, 200, 40, 190, 35, 180, 45, 170]
        .iter()
        .enumerate()
        .map(|(r, &len)| TokenRow {
            tokens: (0..len).map(|i| ((i * 7 + r * 3) % 40) as u32).collect(),
            loss_mask: (0..len).map(|i| i >= 2).collect(),
            segment: vec![1; len],
        })
        .collect();
    let trainer = |split: bool, name: &str| {
        let mut config = config(1);
        config.batch_size = rows.len();
        config.split_by_length = split;
        start(tiny_model(), config, None, name)
    };
    let (whole, split) = (trainer(false, "split-off"), trainer(true, "split-on"));
    let batches = |trainer: &Trainer<CpuAutodiff>| {
        let mut sampler = datasets::EpochSampler::new(rows.len(), 3);
        trainer.next_micro_batches(&mut sampler, &rows, 0).unwrap()
    };
    let (one, pieces) = (batches(&whole), batches(&split));
    let padded = |batches: &[TokenBatch]| -> usize {
        batches.iter().map(|b| b.inputs.len() * b.width()).sum()
    };
    assert_eq!(one.len(), 1);
    assert!(pieces.len() > 1 && padded(&pieces) < padded(&one));
    let (loss_one, gradients_one) = whole.loss_and_gradients(&one).unwrap();
    let (loss_pieces, gradients_pieces) = split.loss_and_gradients(&pieces).unwrap();
    assert_same_loss_and_gradients((loss_one, &gradients_one), (loss_pieces, &gradients_pieces));
}

#[test]
fn global_norm_clipping_matches_hand_computation() {
    let device = Default::default();
    let mut gradients = Gradients::<Cpu> {
        tensors: [
            ("a".to_string(), Tensor::from_floats([3.0, 4.0], &device)),
            ("b".to_string(), Tensor::from_floats([12.0], &device)),
        ]
        .into(),
    };
    // sqrt(9 + 16 + 144) = 13, over the tensors together (per tensor it would be 5 and 12).
    let norm = gradients.clip_global_norm(6.5);
    assert!((norm - 13.0).abs() < 1e-6);
    let scale = 6.5 / (13.0 + 1e-6);
    let a: Vec<f32> = gradients.tensors["a"].to_data().to_vec().unwrap();
    let b: Vec<f32> = gradients.tensors["b"].to_data().to_vec().unwrap();
    for (got, want) in a
        .iter()
        .chain(&b)
        .zip([3.0 * scale, 4.0 * scale, 12.0 * scale])
    {
        assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
    // Under the limit nothing changes.
    assert!((gradients.clip_global_norm(100.0) - 6.5).abs() < 1e-4);
    let b_again: Vec<f32> = gradients.tensors["b"].to_data().to_vec().unwrap();
    assert_eq!(b, b_again);
}

#[test]
fn first_adamw_step_moves_each_weight_by_lr_against_its_gradient_sign() {
    // With bias correction, step one is lr * g / (|g| + eps): about lr * sign(g).
    let mut cfg = config(1);
    cfg.weight_decay = 0.0;
    cfg.max_grad_norm = 0.0;
    cfg.warmup_steps = 0;
    let rows = rows();
    let all: Vec<&TokenRow> = rows.iter().collect();
    let mut trainer = start(tiny_model(), cfg, None, "adamw");
    let before = weights_of(&trainer.model);
    trainer
        .train_step(&[TokenBatch::from_rows(&all, 0)])
        .unwrap();
    let after = weights_of(&trainer.model);
    let (name, b) = &before[0];
    let moved: Vec<f32> = b
        .iter()
        .zip(&after[0].1)
        .map(|(x, y)| (y - x).abs())
        .collect();
    let moved_rows = moved.iter().filter(|&&d| d > 0.0).count();
    assert!(moved_rows > 0, "{name} did not move");
    for d in moved.iter().filter(|&&d| d > 0.0) {
        // Rows of tokens with tiny gradients move less (|g| ~ eps); most move by ~lr.
        assert!(*d <= 0.01 + 1e-6, "{name} moved {d}");
    }
    assert!(moved.iter().filter(|&&d| (d - 0.01).abs() < 1e-4).count() > moved_rows / 2);
}

#[test]
fn frozen_patterns_do_not_change() {
    let mut cfg = config(1);
    cfg.freeze = vec!["model.layers.0.*".into(), "*norm*".into()];
    let rows = rows();
    let all: Vec<&TokenRow> = rows.iter().collect();
    let mut trainer = start(tiny_model(), cfg, None, "freeze");
    let before = weights_of(&trainer.model);
    trainer
        .train_step(&[TokenBatch::from_rows(&all, 0)])
        .unwrap();
    for ((name, a), (_, b)) in before.iter().zip(weights_of(&trainer.model)) {
        let frozen = name.starts_with("model.layers.0.") || name.contains("norm");
        assert_eq!(frozen, *a == b, "{name}: frozen {frozen}");
    }
}

#[test]
fn lora_trains_only_adapters_and_merging_keeps_the_output() {
    let lora_config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "gate_proj".into()],
        modules_to_save: Vec::new(),
    };
    let rows = rows();
    let all: Vec<&TokenRow> = rows.iter().collect();
    let mut cfg = config(3);
    cfg.max_grad_norm = 0.0;
    let mut trainer = start(tiny_model(), cfg, Some(lora_config.clone()), "lora");
    let before = weights_of(&trainer.model);
    for _ in 0..3 {
        trainer
            .train_step(&[TokenBatch::from_rows(&all, 0)])
            .unwrap();
    }
    let after = weights_of(&trainer.model);
    let mut adapters = 0;
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if lora::is_adapter_parameter(name) {
            adapters += 1;
            if name.ends_with("lora_b") {
                assert_ne!(a, b, "{name} did not train");
            }
        } else {
            assert_eq!(a, b, "{name} is not an adapter but changed");
        }
    }
    assert_eq!(
        adapters,
        2 * 3 * 2,
        "q, v and gate of two layers, A and B each"
    );

    // Merged weights give the adapter-on forward.
    let model = trainer.eval_model();
    let batch = TokenBatch::from_rows(&all, 0);
    let device = Default::default();
    let forward = |m: &CausalLm<Cpu>| -> Vec<f32> {
        let b = trainer::train::DeviceBatch::<Cpu>::new(&batch, &device);
        m.forward(b.tokens, b.positions, b.allowed)
            .into_data()
            .to_vec()
            .unwrap()
    };
    let with_adapters = forward(&model);
    let merged = lora::merge(model);
    assert!(named_tensors(&merged)
        .iter()
        .all(|(n, _)| !lora::is_adapter_parameter(n)));
    let error = with_adapters
        .iter()
        .zip(forward(&merged))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(error < 1e-4, "merged output differs by {error}");
}

#[test]
fn nan_loss_is_a_clear_error() {
    let mut cfg = config(1);
    cfg.lr = f64::NAN;
    let rows = rows();
    let all: Vec<&TokenRow> = rows.iter().collect();
    let mut trainer = start(tiny_model(), cfg, None, "nan");
    trainer
        .train_step(&[TokenBatch::from_rows(&all, 0)])
        .unwrap(); // the NaN lr poisons the weights
    let error = trainer
        .train_step(&[TokenBatch::from_rows(&all, 0)])
        .unwrap_err()
        .to_string();
    // No checkpoint was saved: the message must not claim one is intact.
    assert!(
        error.contains("loss is NaN at step 2")
            && error.contains("no checkpoint of this run exists yet"),
        "{error}"
    );
}
