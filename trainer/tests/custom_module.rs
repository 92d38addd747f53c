//! The trainer trains a module that is not `CausalLm`, on a batch type of its own: a linear
//! encoder over continuous inputs feeding the decoder (through `decode` on input embeddings)
//! and a regression head, with an MSE objective. It checkpoints the whole module and, after
//! SIGKILL and `--resume auto`, ends on the weights of an uninterrupted run.
//!
//! The training runs in a child process (this test binary run again on the ignored test
//! `child_trains_the_regressor`), so that the parent can SIGKILL it.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trainer::lora::LoraConfig;
use trainer::model::init::ParamInit;
use trainer::model::layers::Linear;
use trainer::model::llama::{Caches, TokenSlots};
use trainer::train::{MicroBatch, MicroBatchShare, Next, Resume, TrainConfig, Trainable, Trainer};
use trainer::{CausalLm, CpuAutodiff, LlamaConfig};

const FEATURES: usize = 3;
const WINDOW: usize = 6;
const BATCH: usize = 8;
const STEPS: u64 = 30;

/// Continuous series in, one value out.
#[derive(Module, Debug)]
pub struct Regressor<B: Backend> {
    pub encoder: Linear<B>,
    pub decoder: CausalLm<B>,
    pub head: Linear<B>,
}

impl<B: Backend> Regressor<B> {
    fn new(device: &B::Device) -> Self {
        let mut init = ParamInit::normal(17, 0.1);
        let config = LlamaConfig::tiny(8, 32, 2, 4, 2);
        Self {
            encoder: Linear::new(FEATURES, 32, true, &mut init, device),
            decoder: CausalLm::new(&config, &mut init, device),
            head: Linear::new(32, 1, true, &mut init, device),
        }
    }

    /// `inputs: [batch, window, features] -> [batch]`: the head on the last position.
    fn predict(&self, inputs: Tensor<B, 3>) -> Tensor<B, 1> {
        let [batch, window, _] = inputs.dims();
        let device = inputs.device();
        let positions = Tensor::<B, 1, Int>::arange(0..window as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([batch, window]);
        let context = self.decoder.context(TokenSlots::at_positions(positions));
        let decoded = self.decoder.decode(
            self.encoder.forward(inputs),
            &context,
            Caches::default(),
            &mut self.decoder.inference_plan(),
        );
        let last = self
            .decoder
            .final_norm(decoded.hidden)
            .slice(s![.., window - 1..window, ..]);
        self.head.forward(last).reshape([batch])
    }
}

impl<B: AutodiffBackend> Trainable<B> for Regressor<B> {
    fn config_json(&self) -> Value {
        json!({ "kind": "regressor", "features": FEATURES, "decoder": self.decoder.config.to_json() })
    }

    fn device(&self) -> B::Device {
        self.decoder.device()
    }

    fn attach_lora(mut self, config: &LoraConfig, seed: u64) -> anyhow::Result<Self> {
        self.decoder = trainer::lora::attach(self.decoder, config, seed)?;
        Ok(self)
    }
}

/// Windows of a noisy sine and the value that follows each: made from the step number, so
/// a resumed run sees the same data without a data cursor.
struct SeriesBatch {
    inputs: Vec<f32>,
    targets: Vec<f32>,
}

impl SeriesBatch {
    fn for_step(step: u64) -> Self {
        let value = |t: f32| (t * 0.7).sin() + 0.3 * (t * 1.9).cos();
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for row in 0..BATCH {
            let start = (step as usize * BATCH + row) as f32 * 0.37;
            for i in 0..WINDOW {
                let t = start + i as f32;
                inputs.extend([value(t), value(t) - value(t - 1.0), 1.0]);
            }
            targets.push(value(start + WINDOW as f32));
        }
        Self { inputs, targets }
    }
}

impl SeriesBatch {
    /// Rows `range` of the batch (a data-parallel peer's shard).
    fn rows(&self, range: std::ops::Range<usize>) -> Self {
        let width = WINDOW * FEATURES;
        Self {
            inputs: self.inputs[range.start * width..range.end * width].to_vec(),
            targets: self.targets[range].to_vec(),
        }
    }
}

impl MicroBatch for SeriesBatch {
    fn num_targets(&self) -> usize {
        self.targets.len()
    }

    fn num_inputs(&self) -> usize {
        self.targets.len() * WINDOW
    }
}

fn mse<B: Backend>(
    model: &Regressor<B>,
    batch: &SeriesBatch,
    share: MicroBatchShare,
) -> Tensor<B, 1> {
    let device = model.decoder.device();
    let inputs = Tensor::<B, 1>::from_floats(batch.inputs.as_slice(), &device).reshape([
        batch.targets.len(),
        WINDOW,
        FEATURES,
    ]);
    let targets = Tensor::<B, 1>::from_floats(batch.targets.as_slice(), &device);
    (model.predict(inputs) - targets)
        .square()
        .sum()
        .div_scalar(share.total_targets as f64)
}

/// The whole run in this process: resumable, a checkpoint every step.
fn train(run_dir: &Path, resume: Resume) -> anyhow::Result<()> {
    let config: TrainConfig = toml::from_str(&format!(
        "steps = {STEPS}\nbatch_size = {BATCH}\nlr = 0.01\nwarmup_steps = 3\nsave_every = 1\nkeep_last = 2\nlog_every = 100"
    ))?;
    let model = Regressor::<CpuAutodiff>::new(&Default::default());
    let (mut trainer, _) = Trainer::start(model, config, None, 5, run_dir, &resume)?;
    while !trainer.is_done() {
        let batch = SeriesBatch::for_step(trainer.step);
        let stats = trainer.train_step_on(&[batch], &mse)?;
        trainer.log(&[("loss", stats.loss), ("grad_norm", stats.grad_norm)])?;
        if trainer.end_of_step(|| json!({}))? == Next::Stop {
            return Ok(());
        }
    }
    trainer.finish();
    Ok(())
}

#[test]
#[ignore = "run by the other tests of this file, in a child process"]
fn child_trains_the_regressor() {
    let dir = PathBuf::from(std::env::var("REGRESSOR_RUN_DIR").expect("REGRESSOR_RUN_DIR"));
    let resume = Resume::parse(std::env::var("REGRESSOR_RESUME").ok().as_deref());
    train(&dir, resume).unwrap();
}

fn child(run_dir: &Path, resume: bool) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "child_trains_the_regressor",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("REGRESSOR_RUN_DIR", run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        command.env("REGRESSOR_RESUME", "auto");
    }
    command
}

fn checkpoint(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoints/step-{step:08}"))
}

fn weights(checkpoint: &Path) -> Vec<(String, Vec<f32>)> {
    let source = checkpoints::WeightSource::open(&[checkpoint.join("model.safetensors")]).unwrap();
    source
        .names()
        .map(|n| (n.to_string(), source.get(n).unwrap().data))
        .collect()
}

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("custom-module-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn succeeded(mut command: Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_custom_module_trains_checkpoints_and_resumes_exactly_after_sigkill() {
    let straight = fresh("straight");
    succeeded(child(&straight, false));

    let killed = fresh("killed");
    let mut running = child(&killed, false).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint(&killed, 10).join("manifest.json").exists() {
        assert!(
            running.try_wait().unwrap().is_none(),
            "ended before step 10"
        );
        assert!(
            Instant::now() < deadline,
            "no checkpoint 10 after two minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    running.kill().unwrap();
    running.wait().unwrap();
    assert!(
        !checkpoint(&killed, STEPS).exists(),
        "finished before the kill"
    );
    succeeded(child(&killed, true));

    let expected = weights(&checkpoint(&straight, STEPS));
    assert_eq!(weights(&checkpoint(&killed, STEPS)), expected);
    // The whole module is in the checkpoint, under its own names and with its own config.
    for part in [
        "encoder.weight",
        "decoder.model.layers.1.mlp.up_proj.weight",
        "head.bias",
    ] {
        assert!(expected.iter().any(|(n, _)| n == part), "{part}");
    }
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint(&straight, STEPS).join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["model_config"]["kind"], "regressor");

    // It learned something: the loss of the last steps is well below that of the first.
    let losses: Vec<f64> = std::fs::read_to_string(straight.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    assert!(last < 0.5 * first, "loss went from {first} to {last}");
}

#[test]
fn lora_attaches_to_the_language_model_inside_a_custom_module() {
    let model = Regressor::<CpuAutodiff>::new(&Default::default());
    let lora: LoraConfig =
        toml::from_str("rank = 2\nalpha = 4.0\ntargets = [\"q_proj\", \"v_proj\"]").unwrap();
    let config: TrainConfig = toml::from_str("steps = 2\nbatch_size = 8\nlr = 0.01").unwrap();
    let (mut trainer, _) =
        Trainer::start(model, config, Some(lora), 0, &fresh("lora"), &Resume::No).unwrap();
    let before = trainer::weights::named_tensors(&trainer.model);
    trainer
        .train_step_on(&[SeriesBatch::for_step(0), SeriesBatch::for_step(1)], &mse)
        .unwrap();
    let after = trainer::weights::named_tensors(&trainer.model);
    let moved: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|((_, a), (_, b))| a.data != b.data)
        .map(|((name, _), _)| name.as_str())
        .collect();
    // Adapters only: B starts at zero, so the first step moves the B matrices alone.
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|n| n.contains(".lora.")), "{moved:?}");
    assert!(moved
        .iter()
        .any(|n| n.starts_with("decoder.model.layers.0.self_attn.q_proj")));
}

/// Three steps of the regressor on the batches `batch_for(step)` gives, as the current
/// thread's peer; the weights at the end.
fn three_steps(batch_for: impl Fn(u64) -> SeriesBatch, dir: &Path) -> Vec<(String, Vec<f32>)> {
    let model = Regressor::<CpuAutodiff>::new(&Default::default());
    let config: TrainConfig = toml::from_str("steps = 3\nbatch_size = 4\nlr = 0.01").unwrap();
    let (mut trainer, _) = Trainer::start(model, config, None, 0, dir, &Resume::No).unwrap();
    while !trainer.is_done() {
        let batch = batch_for(trainer.step);
        trainer.train_step_on(&[batch], &mse).unwrap();
    }
    trainer::weights::named_tensors(&trainer.model)
        .into_iter()
        .map(|(name, tensor)| (name, tensor.data))
        .collect()
}

#[test]
fn data_parallel_peers_sum_the_gradients_of_a_custom_module() {
    let alone = three_steps(SeriesBatch::for_step, &fresh("dp-alone"));
    let dir = fresh("dp-peers");
    let (first, second) = std::thread::scope(|scope| {
        let peer = |rank| trainer::distributed::Peer::new(rank, 2, None);
        let half = |rank: usize| {
            let dir = dir.clone();
            move || {
                trainer::distributed::run_as(peer(rank), || {
                    three_steps(
                        |step| SeriesBatch::for_step(step).rows(rank * 4..rank * 4 + 4),
                        &dir,
                    )
                })
            }
        };
        let first = scope.spawn(half(0));
        let second = scope.spawn(half(1));
        (first.join().unwrap(), second.join().unwrap())
    });
    assert_eq!(first, second, "peers ended on different weights");
    for ((name, a), (_, b)) in first.iter().zip(&alone) {
        let gap = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            gap < 1e-5,
            "{name}: two half batches differ from the whole by {gap}"
        );
    }
    let moved = alone
        .iter()
        .zip(three_steps(
            |_| SeriesBatch::for_step(99),
            &fresh("dp-other"),
        ))
        .any(|((_, a), (_, b))| a != &b);
    assert!(moved, "the data must matter for this test to mean anything");
}
