//! Data-parallel training on CPU threads through the binary (`--devices cpu,cpu`): peers end
//! on identical weights equal to one peer with the doubled batch; a killed run resumes to the
//! same end; resuming on another peer count says what changes.

mod common;

use common::*;
use std::process::Stdio;

/// Peers print `peer R of W: weights sha256 H` when they finish.
fn peer_fingerprints(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("peer "))
        .filter_map(|rest| rest.split_once(": weights sha256 "))
        .map(|(who, hash)| (who.to_string(), hash.to_string()))
        .collect()
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
/// Two peers of batch 2 each.
const TWO_PEERS: [&str; 6] = [
    "--set",
    STEPS,
    "--set",
    "train.batch_size=2",
    "--devices",
    "cpu,cpu",
];

#[test]
fn two_peers_match_one_peer_with_the_doubled_batch() {
    let two = scratch_dir("dp-two-peers");
    let output = run_to_end(sft_command(&test_config(), &two, &TWO_PEERS));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let prints = peer_fingerprints(&stdout);
    assert_eq!(prints.len(), 2, "{stdout}");
    assert_eq!(prints[0].1, prints[1].1, "peers ended on different weights");

    let one = scratch_dir("dp-one-peer");
    run_to_end(sft_command(
        &test_config(),
        &one,
        &["--set", STEPS, "--set", "train.batch_size=4"],
    ));
    let difference = max_weight_difference(
        &model_tensors(&checkpoint(&two, 16)),
        &model_tensors(&checkpoint(&one, 16)),
    );
    assert!(difference < 1e-5, "max weight difference {difference}");
    let (curve_two, curve_one) = (loss_curve(&two), loss_curve(&one));
    assert_eq!(curve_two.len(), 16);
    for ((step, a), (_, b)) in curve_two.iter().zip(&curve_one) {
        assert!((a - b).abs() < 1e-5, "step {step}: loss {a} vs {b}");
    }
    // Only the leader writes the run's files; the other peer keeps its own metrics apart.
    assert!(two.join("peers/1/metrics.jsonl").exists());
    assert!(two.join("final/model.safetensors").exists());
}

#[test]
fn killed_two_peer_run_resumes_to_the_same_end() {
    let args = TWO_PEERS;
    let straight = scratch_dir("dp-straight");
    run_to_end(sft_command(&test_config(), &straight, &args));

    let killed = scratch_dir("dp-killed");
    let mut child = sft_command(&test_config(), &killed, &args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&mut child, &killed, 8);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !checkpoint(&killed, 16).exists(),
        "finished before the kill"
    );

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
fn data_parallel_is_refused_where_not_supported() {
    let output = std::process::Command::new(trainer_bin())
        .current_dir(repo_root())
        .args(["recipe", "skipgpt", "--devices", "cpu,cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("sft recipe so far"),
        "{stderr}"
    );
}
