//! Data-parallel training on CPU through the binary, as threads of one process
//! (`--devices cpu,cpu`) and as two processes joined through `trainer orchestrator` on
//! loopback: peers end on identical weights equal to one peer with the doubled batch; a
//! killed run resumes to the same end; resuming on another peer count says what changes;
//! on-policy SFT and SkipGPT run on peers too.

mod common;

use common::*;
use datasets::{TokenBatch, TokenRow};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Peers print `peer R of W: weights sha256 H` when they finish.
fn peer_fingerprints(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("peer "))
        .filter_map(|rest| rest.split_once(": weights sha256 "))
        .map(|(who, hash)| (who.to_string(), hash.to_string()))
        .collect()
}

/// A run of two peers through `stages` trainers printed both peers' weights after each one,
/// and they were the same.
fn assert_two_peers_agree(output: &Output, stages: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let prints = peer_fingerprints(&stdout);
    assert_eq!(prints.len(), 2 * stages, "{stdout}");
    for stage in prints.chunks(2) {
        assert_eq!(
            stage[0].1, stage[1].1,
            "peers ended on different weights: {stage:?}"
        );
    }
}

fn max_weight_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            max_abs_diff(va, vb)
        })
        .fold(0.0, f32::max)
}

const STEPS: &str = "train.steps=16";
const TWO_CPUS: [&str; 2] = ["--devices", "cpu,cpu"];
/// Two peers of batch 2 each.
const TWO_PEERS: [&str; 6] = [
    "--set",
    STEPS,
    "--set",
    "train.batch_size=2",
    "--devices",
    "cpu,cpu",
];

/// The run in `two` (two peers of batch 2) ended where one peer with batch 4 ends, with the
/// same loss curve (float tolerance: the gradients are summed in another order).
fn assert_matches_one_peer_with_the_doubled_batch(two: &std::path::Path, scratch: &str) {
    let one = scratch_dir(scratch);
    run_to_end(sft_command(
        &test_config(),
        &one,
        &["--set", STEPS, "--set", "train.batch_size=4"],
    ));
    let difference = max_weight_difference(
        &model_tensors(&checkpoint(two, 16)),
        &model_tensors(&checkpoint(&one, 16)),
    );
    assert!(difference < 1e-5, "max weight difference {difference}");
    let (curve_two, curve_one) = (loss_curve(two), loss_curve(&one));
    assert_eq!(curve_two.len(), 16);
    for ((step, a), (_, b)) in curve_two.iter().zip(&curve_one) {
        assert!((a - b).abs() < 1e-5, "step {step}: loss {a} vs {b}");
    }
}

#[test]
fn two_peers_match_one_peer_with_the_doubled_batch() {
    let two = scratch_dir("dp-two-peers");
    let output = run_to_end(sft_command(&test_config(), &two, &TWO_PEERS));
    assert_two_peers_agree(&output, 1);

    assert_matches_one_peer_with_the_doubled_batch(&two, "dp-one-peer");
    // Only the leader writes the run's files; the other peer keeps its own metrics apart.
    assert!(two.join("peers/1/metrics.jsonl").exists());
    assert!(two.join("final/model.safetensors").exists());
}

/// `run.device = "cpu,cpu"` in the config runs two peers as `--devices cpu,cpu` does, and
/// `--devices` overrides it.
#[test]
fn a_config_that_names_two_devices_runs_two_peers() {
    let two = scratch_dir("dp-config-devices");
    let output = run_to_end(sft_command(
        &test_config(),
        &two,
        &[
            "--set",
            STEPS,
            "--set",
            "train.batch_size=2",
            "--set",
            "run.device=cpu,cpu",
        ],
    ));
    assert_two_peers_agree(&output, 1);
    assert_matches_one_peer_with_the_doubled_batch(&two, "dp-config-one-peer");

    let one = scratch_dir("dp-config-overridden");
    let output = run_to_end(sft_command(
        &test_config(),
        &one,
        &[
            "--set",
            "train.steps=2",
            "--set",
            "run.device=cpu,cpu",
            "--devices",
            "cpu",
        ],
    ));
    assert!(peer_fingerprints(&String::from_utf8_lossy(&output.stdout)).is_empty());
    assert!(!one.join("peers").exists());
}

#[test]
fn killed_two_peer_run_resumes_to_the_same_end() {
    let args = TWO_PEERS;
    let straight = scratch_dir("dp-straight");
    run_to_end(sft_command(&test_config(), &straight, &args));

    let killed = scratch_dir("dp-killed");
    kill_after_checkpoint(sft_command(&test_config(), &killed, &args), &killed, 8, 16);

    let mut resume = args.to_vec();
    resume.extend(["--resume", "auto"]);
    let output = run_to_end(sft_command(&test_config(), &killed, &resume));
    assert!(String::from_utf8_lossy(&output.stdout).contains("resumed from"));
    assert_eq!(
        model_tensors(&checkpoint(&straight, 16)),
        model_tensors(&checkpoint(&killed, 16))
    );

    // The same checkpoint on one peer: the global batch halves, and the run says so.
    let output = run_to_end(sft_command(
        &test_config(),
        &killed,
        &[
            "--set",
            "train.steps=20",
            "--set",
            "train.batch_size=2",
            "--resume",
            "auto",
        ],
    ));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("written by a run of 2 peer(s) and this run has 1")
            && stdout.contains("changes from 4 to 2"),
        "{stdout}"
    );
    assert!(checkpoint(&killed, 20).exists());
}

#[test]
fn skipgpt_stages_on_two_peers_agree() {
    let run = scratch_dir("dp-skipgpt");
    let output = run_to_end(skipgpt_command(&run, &TWO_CPUS));
    // Pre-training, router and LoRA stages, and the dense + LoRA control.
    assert_two_peers_agree(&output, 4);
    assert!(run.join("lora-dense/final/config.json").exists());
    assert!(run.join("summary.json").exists() && run.join("lora/final/config.json").exists());
    assert!(!run.join("peers/1/summary.json").exists());
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `trainer orchestrator` on a free loopback port; killed when dropped.
struct Orchestrator {
    child: Child,
    port: u16,
}

impl Orchestrator {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new(trainer_bin())
            .args(["orchestrator", "--bind", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, port }
    }

    /// Node `rank` of two, one CPU peer each, writing into `run_dir` (node 1 only writes
    /// its own metrics under `run_dir/peers/1`).
    fn node(&self, rank: usize, run_dir: &std::path::Path, extra: &[&str]) -> Command {
        let (orchestrator, rank_text) = (format!("127.0.0.1:{}", self.port), rank.to_string());
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "--set",
            STEPS,
            "--set",
            "train.batch_size=2",
            "--orchestrator",
            &orchestrator,
            "--node-rank",
            &rank_text,
            "--num-nodes",
            "2",
            "--node-address",
            &address,
        ];
        args.extend(extra);
        sft_command(&test_config(), run_dir, &args)
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs commands side by side and waits for all of them (two minutes at most).
fn run_together(commands: Vec<Command>) -> Vec<Output> {
    let children: Vec<Child> = commands
        .into_iter()
        .map(|mut c| {
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    while children
        .iter_mut()
        .any(|c| c.as_mut().unwrap().try_wait().unwrap().is_none())
    {
        if Instant::now() > deadline {
            for child in children.iter_mut().flatten() {
                let _ = child.kill();
            }
            panic!("nodes still running after two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .iter_mut()
        .map(|c| c.take().unwrap().wait_with_output().unwrap())
        .collect()
}

fn assert_all_succeeded(outputs: &[Output]) {
    outputs.iter().for_each(assert_succeeded);
}

#[test]
fn two_nodes_through_the_orchestrator_match_one_peer_with_the_doubled_batch() {
    let orchestrator = Orchestrator::start();
    let two = scratch_dir("mn-two-nodes");
    let outputs = run_together(vec![
        orchestrator.node(0, &two, &[]),
        orchestrator.node(1, &two, &[]),
    ]);
    assert_all_succeeded(&outputs);
    let prints: Vec<_> = outputs
        .iter()
        .flat_map(|o| peer_fingerprints(&String::from_utf8_lossy(&o.stdout)))
        .collect();
    assert_eq!(prints.len(), 2, "{prints:?}");
    assert_eq!(prints[0].0, "0 of 2");
    assert_eq!(prints[1].0, "1 of 2");
    assert_eq!(prints[0].1, prints[1].1, "nodes ended on different weights");

    assert_matches_one_peer_with_the_doubled_batch(&two, "mn-one-peer");
    // Node 1 wrote no checkpoint of its own.
    assert!(two.join("peers/1/metrics.jsonl").exists());
    assert!(!two.join("peers/1/checkpoints").exists());
}

#[test]
fn killed_two_node_run_resumes_against_the_same_orchestrator() {
    let orchestrator = Orchestrator::start();
    let straight = scratch_dir("mn-straight");
    assert_all_succeeded(&run_together(vec![
        orchestrator.node(0, &straight, &[]),
        orchestrator.node(1, &straight, &[]),
    ]));

    // Kill node 1 mid-run: node 0 loses its peer and stops with an error.
    let killed = scratch_dir("mn-killed");
    let mut leader = orchestrator.node(0, &killed, &[]);
    let mut leader = leader
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut other = orchestrator.node(1, &killed, &[]);
    let mut other = other
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut leader, &killed, 8);
    other.kill().unwrap();
    other.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "node 0 kept waiting for its lost peer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let leader = leader.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&leader.stderr);
    assert!(
        !leader.status.success() && stderr.contains("all-reduce on peer 0 failed"),
        "{stderr}"
    );
    assert!(
        !checkpoint(&killed, 16).exists(),
        "finished before the kill"
    );

    // A node that lacks the checkpoint (its own empty folder) is caught before training.
    let elsewhere = scratch_dir("mn-elsewhere");
    let outputs = run_together(vec![
        orchestrator.node(0, &killed, &["--resume", "auto"]),
        orchestrator.node(1, &elsewhere, &["--resume", "auto"]),
    ]);
    let stderr = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(
        !outputs[0].status.success() && stderr.contains("the peers start from different states"),
        "{stderr}"
    );

    // Both nodes restarted against the same orchestrator reach the same end.
    let outputs = run_together(vec![
        orchestrator.node(0, &killed, &["--resume", "auto"]),
        orchestrator.node(1, &killed, &["--resume", "auto"]),
    ]);
    assert_all_succeeded(&outputs);
    assert!(String::from_utf8_lossy(&outputs[0].stdout).contains("resumed from"));
    assert_eq!(
        model_tensors(&checkpoint(&straight, 16)),
        model_tensors(&checkpoint(&killed, 16))
    );
}

/// A stop request (SIGTERM) to one node is a vote every peer sees in its next all-reduce: all
/// stop after the same step, the leader saves it, and every process exits cleanly.
#[test]
fn sigterm_to_one_node_stops_every_node_with_a_checkpoint() {
    let orchestrator = Orchestrator::start();
    let run = scratch_dir("mn-sigterm");
    let long = ["--set", "train.steps=100000"];
    let spawn = |rank| {
        orchestrator
            .node(rank, &run, &long)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut leader, other) = (spawn(0), spawn(1));
    wait_for_checkpoint(&mut leader, &run, 8);
    let status = Command::new("kill")
        .args(["-TERM", &other.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let outputs = [leader, other].map(|child| child.wait_with_output().unwrap());
    assert_all_succeeded(&outputs);
    let stopped_at = |output: &Output| -> u64 {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("stopped by signal at step"))
            .unwrap_or_else(|| panic!("no stop line in:\n{stdout}"));
        line.split_whitespace()
            .nth(5)
            .unwrap()
            .trim_end_matches(';')
            .parse()
            .unwrap()
    };
    let step = stopped_at(&outputs[0]);
    assert_eq!(
        step,
        stopped_at(&outputs[1]),
        "the nodes stopped at different steps"
    );
    assert!(checkpoint(&run, step).join("manifest.json").exists());
}

/// Two optimizer steps of a tiny model on `batch` (or on nothing), as the current thread's peer;
/// the weights at the end.
fn two_steps_on(batch: Option<&TokenBatch>, run_dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    use trainer::model::init::ParamInit;
    use trainer::train::{Resume, TrainConfig, Trainer};
    type B = trainer::CpuAutodiff;
    let config = trainer::LlamaConfig::tiny(40, 16, 2, 4, 2);
    let model =
        trainer::CausalLm::<B>::new(&config, &mut ParamInit::normal(3, 0.2), &Default::default());
    let train: TrainConfig =
        toml::from_str("steps = 2\nbatch_size = 2\nlr = 1e-2\nlog_every = 0").unwrap();
    let (mut trainer, _) = Trainer::start(model, train, None, 0, run_dir, &Resume::No).unwrap();
    for _ in 0..2 {
        let batches: Vec<TokenBatch> = batch.into_iter().cloned().collect();
        trainer.train_step(&batches).unwrap();
    }
    trainer::weights::named_tensors(&trainer.model)
        .into_iter()
        .map(|(name, tensor)| (name, tensor.data))
        .collect()
}

/// On-policy SFT keeps only correct samples, so a peer may have nothing to train on in a step:
/// it sends zero gradients, and the step equals the other peer's batch alone on one device.
#[test]
fn a_peer_with_nothing_to_train_on_sends_zero_gradients() {
    let rows: Vec<TokenRow> = (0..2)
        .map(|r| TokenRow::all_trained((0..9).map(|i| (i * 7 + r * 11) % 40).collect()))
        .collect();
    let batch = TokenBatch::from_rows(&rows.iter().collect::<Vec<_>>(), 0);
    let alone = two_steps_on(Some(&batch), &scratch_dir("dp-zero-alone"));

    let run_dir = scratch_dir("dp-zero-peers");
    let (with_rows, without_rows) = std::thread::scope(|scope| {
        let peer = |rank| trainer::distributed::Peer::new(rank, 2, None);
        let (dir_0, dir_1) = (run_dir.clone(), run_dir.clone());
        let batch = &batch;
        let first = scope.spawn(move || {
            trainer::distributed::run_as(peer(0), || two_steps_on(Some(batch), &dir_0))
        });
        let second = scope
            .spawn(move || trainer::distributed::run_as(peer(1), || two_steps_on(None, &dir_1)));
        (first.join().unwrap(), second.join().unwrap())
    });
    assert_eq!(with_rows, without_rows, "peers ended on different weights");
    assert_eq!(with_rows, alone, "adding zeros should change nothing");
}

#[test]
fn onpolicy_sft_on_two_peers_agrees_and_resumes_exactly() {
    let straight = scratch_dir("dp-onpolicy-straight");
    let output = run_to_end(onpolicy_command(&straight, &TWO_CPUS));
    assert_two_peers_agree(&output, 1);
    assert!(
        straight.join("summary.md").exists() && straight.join("final/model.safetensors").exists()
    );

    let killed = scratch_dir("dp-onpolicy-killed");
    kill_after_checkpoint(onpolicy_command(&killed, &TWO_CPUS), &killed, 2, 6);
    run_to_end(onpolicy_command(
        &killed,
        &["--devices", "cpu,cpu", "--resume", "auto"],
    ));
    assert_eq!(
        model_tensors(&checkpoint(&straight, 6)),
        model_tensors(&checkpoint(&killed, 6))
    );
    let kept = |run: &std::path::Path| -> Vec<f64> {
        trainer::metrics::read_metrics(&run.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|line| line["kept_share"].as_f64())
            .collect()
    };
    assert_eq!(kept(&straight), kept(&killed));
    assert!(
        kept(&straight).iter().any(|&k| k > 0.0),
        "nothing was trained on"
    );

    // The peers split the evaluations' prompts (5: two and three) and put the results back
    // together: the base model's greedy evaluation is the same as on one peer.
    let base_evaluation = |name: &str, devices: &str| {
        let run = scratch_dir(name);
        let set = [
            "--set",
            "task.train_count=19",
            "--set",
            "task.eval_count=5",
            "--set",
            "train.steps=1",
        ];
        run_to_end(onpolicy_command(
            &run,
            &[&["--devices", devices], &set[..]].concat(),
        ));
        trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap()[0].clone()
    };
    let one = base_evaluation("dp-onpolicy-eval-one", "cpu");
    let two = base_evaluation("dp-onpolicy-eval-two", "cpu,cpu");
    for key in [
        "eval_greedy_accuracy",
        "eval_mean_length",
        "eval_p90_length",
        "eval_truncated_share",
    ] {
        assert!(one[key].is_number(), "{key} missing: {one}");
        assert_eq!(one[key], two[key], "{key}");
    }

    // Prompts that cannot be split evenly are refused with the key named.
    let output = onpolicy_command(
        &scratch_dir("dp-onpolicy-odd"),
        &[
            "--devices",
            "cpu,cpu",
            "--set",
            "sampling.prompts_per_step=3",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("sampling.prompts_per_step"),
        "{stderr}"
    );
}

#[test]
fn mixed_device_kinds_are_refused() {
    // Peers of two kinds of device would join two collectives: refused up front.
    let output = sft_command(
        &test_config(),
        &scratch_dir("dp-mixed"),
        &["--devices", "cpu,cuda:0"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("mixes CPU and GPU"),
        "{stderr}"
    );
}
