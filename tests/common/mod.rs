//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use checkpoints::WeightSource;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Hugging Face parity fixtures made by `scripts/make_hf_fixtures.py`.
pub fn hf_fixtures() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/fixtures/hf");
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.join("reference.json").exists())
        .collect();
    folders.sort();
    assert!(
        folders.len() >= 4,
        "expected the four fixture models in {}",
        dir.display()
    );
    folders
}

/// A fresh empty folder under the target directory, unique to this test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn trainer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_trainer")
}

/// The tiny sft config of the end-to-end tests.
pub fn test_config() -> PathBuf {
    repo_root().join("tests/fixtures/configs/sft-tiny-test.toml")
}

/// `trainer recipe RECIPE --config CONFIG --set run.dir=RUN_DIR EXTRA...` from the repository root.
pub fn recipe_command(recipe: &str, config: &Path, run_dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(trainer_bin());
    command
        .current_dir(repo_root())
        .args(["recipe", recipe, "--config", config.to_str().unwrap()])
        .args(["--set", &format!("run.dir={}", run_dir.display())])
        .args(extra);
    command
}

/// `trainer recipe sft` on `config`, writing into `run_dir`.
pub fn sft_command(config: &Path, run_dir: &Path, extra: &[&str]) -> Command {
    recipe_command("sft", config, run_dir, extra)
}

/// `trainer recipe onpolicy-sft` on the short on-policy test config.
pub fn onpolicy_command(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/onpolicy-test.toml");
    recipe_command("onpolicy-sft", &config, run_dir, extra)
}

/// `trainer recipe skipgpt` on the tiny all-stage test config.
pub fn skipgpt_command(run_dir: &Path, extra: &[&str]) -> Command {
    let config = repo_root().join("tests/fixtures/configs/skipgpt-test.toml");
    recipe_command("skipgpt", &config, run_dir, extra)
}

/// Fails the test with the command's output unless it succeeded.
pub fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "trainer failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn run_to_end(mut command: Command) -> Output {
    let output = command.output().unwrap();
    assert_succeeded(&output);
    output
}

pub fn checkpoint(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoints/step-{step:08}"))
}

/// Starts `command`, SIGKILLs it once checkpoint `step` exists (no chance to clean up), and
/// checks that it had not reached checkpoint `last`, so a resume has work left.
pub fn kill_after_checkpoint(mut command: Command, run_dir: &Path, step: u64, last: u64) {
    let mut child = command.stdout(Stdio::null()).spawn().unwrap();
    wait_for_checkpoint(&mut child, run_dir, step);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !checkpoint(run_dir, last).exists(),
        "the run finished before it was killed"
    );
}

/// Runs `command()` twice, each time SIGKILLing it 3 checkpoints after the newest one of the
/// model trained in `stage` (a recipe's per-model folder), so both kills land inside that
/// model's training.
pub fn kill_twice_inside(command: impl Fn() -> Command, stage: &Path) {
    for _ in 0..2 {
        let mut child = command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let newest = if stage.exists() {
            checkpoint_steps(stage).first().copied().unwrap_or(0)
        } else {
            0
        };
        wait_for_checkpoint(&mut child, stage, newest + 3);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Checks that a refused run wrote nothing in `run_dir` but its lock, and removes it.
pub fn assert_nothing_written(run_dir: &Path) {
    let written: Vec<_> = std::fs::read_dir(run_dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        written.iter().all(|name| name == ".lock"),
        "nothing is written before the data is read: {written:?}"
    );
    let _ = std::fs::remove_dir_all(run_dir);
}

pub fn wait_for_checkpoint(child: &mut Child, run_dir: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint(run_dir, step).join("manifest.json").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before checkpoint {step}"
        );
        assert!(
            Instant::now() < deadline,
            "no checkpoint {step} after two minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Steps of the checkpoints in a run folder, newest first.
pub fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    checkpoints::run_checkpoints::CheckpointDir::new(run_dir)
        .list()
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect()
}

/// Every tensor of a checkpoint's model, in name order.
pub fn model_tensors(checkpoint_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let source = WeightSource::open(&[checkpoint_dir.join("model.safetensors")]).unwrap();
    source
        .names()
        .map(|n| (n.to_string(), source.get(n).unwrap().data))
        .collect()
}

/// (step, loss) of every line of metrics.jsonl.
pub fn loss_curve(run_dir: &Path) -> Vec<(u64, f64)> {
    trainer::metrics::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|line| {
            (
                line["step"].as_u64().unwrap(),
                line["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Logits of the last position of `tokens` (one unpadded row).
pub fn last_logits(model: &trainer::CausalLm<trainer::Cpu>, tokens: &[u32]) -> Vec<f32> {
    use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
    let device = Default::default();
    let batch = PaddedBatch::left_padded(&[tokens.to_vec()], 0);
    let logits: Vec<f32> = model
        .forward(
            token_tensor(&batch.tokens, &device),
            int_tensor(&batch.positions(), &device),
            causal_mask(&batch.valid, batch.width(), &device),
        )
        .into_data()
        .to_vec()
        .unwrap();
    let vocab = model.config.vocab_size;
    logits[logits.len() - vocab..].to_vec()
}

/// Greedy decoding computed elsewhere (a reference made by `transformers` on another CPU)
/// agrees with ours up to near-ties: where the two first differ, our logits for both tokens
/// must lie within `tie` of each other, since rounding on another machine may pick either.
/// What follows a tie is not compared (the two continue from different text). Returns how
/// many tokens matched.
pub fn assert_greedy_agrees(
    model: &trainer::CausalLm<trainer::Cpu>,
    prompt: &[u32],
    ours: &[u32],
    theirs: &[u32],
    tie: f32,
    what: &str,
) -> usize {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    let Some(at) = ours.iter().zip(theirs).position(|(a, b)| a != b) else {
        return ours.len();
    };
    let context: Vec<u32> = prompt.iter().chain(&ours[..at]).copied().collect();
    let logits = last_logits(model, &context);
    let (a, b) = (logits[ours[at] as usize], logits[theirs[at] as usize]);
    assert!(
        (a - b).abs() <= tie,
        "{what}: greedy token {at} is {} here and {} in the reference, and not a near-tie \
         (logits {a} vs {b}); ours {ours:?}, reference {theirs:?}",
        ours[at],
        theirs[at]
    );
    eprintln!("{what}: near-tie at token {at} ({a} vs {b}); compared up to there");
    at
}
