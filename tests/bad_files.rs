//! Broken model folders give an error that names the file and the tensor or key, never a panic.

mod common;

use checkpoints::{write_safetensors, HostTensor, StoreDtype, WeightSource};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use trainer::{CausalLm, Cpu};

fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/hf/llama-gqa")
}

/// A copy of the fixture that `damage` may break.
fn damaged(name: &str, damage: impl FnOnce(&Path)) -> PathBuf {
    let dir = scratch_dir(name);
    copy_dir(&fixture(), &dir);
    damage(&dir);
    dir
}

fn load_error(dir: &Path) -> String {
    match CausalLm::<Cpu>::load(dir, &Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(error) => format!("{error:#}"),
    }
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            error.contains(part),
            "error `{error}` does not mention `{part}`"
        );
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, serde_json::to_string(&config).unwrap()).unwrap();
}

/// Rewrites model.safetensors through `edit` on its (name, tensor) list.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, HostTensor)>)) {
    let path = dir.join("model.safetensors");
    let source = WeightSource::open(std::slice::from_ref(&path)).unwrap();
    let mut tensors: Vec<(String, HostTensor)> = source
        .names()
        .map(|n| (n.to_string(), source.get(n).unwrap()))
        .collect();
    edit(&mut tensors);
    write_safetensors(&path, &tensors, StoreDtype::F32, None).unwrap();
}

#[test]
fn bad_json_names_the_file() {
    let dir = damaged("bad-json", |d| {
        std::fs::write(d.join("config.json"), "{\"hidden_size\": 64,").unwrap()
    });
    assert_mentions(&load_error(&dir), &["config.json", "not valid JSON"]);
}

#[test]
fn missing_or_mistyped_key_names_the_key_and_file() {
    let dir = damaged("missing-key", |d| {
        edit_config(d, |c| {
            drop(c.as_object_mut().unwrap().remove("hidden_size"))
        })
    });
    assert_mentions(
        &load_error(&dir),
        &["config.json", "`hidden_size`", "missing"],
    );
    let dir = damaged("typed-key", |d| {
        edit_config(d, |c| c["num_hidden_layers"] = "two".into())
    });
    assert_mentions(&load_error(&dir), &["config.json", "`num_hidden_layers`"]);
    let dir = damaged("unknown-arch", |d| {
        edit_config(d, |c| c["model_type"] = "gpt2".into())
    });
    assert_mentions(&load_error(&dir), &["`model_type`", "gpt2"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = damaged("wrong-shape", |d| {
        edit_config(d, |c| c["intermediate_size"] = 100.into())
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "model.safetensors",
            "`model.layers.0.mlp.gate_proj.weight`",
            "[96, 64]",
            "[100, 64]",
        ],
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = damaged("missing-tensor", |d| {
        edit_weights(d, |t| t.retain(|(n, _)| n != "model.norm.weight"))
    });
    assert_mentions(
        &load_error(&dir),
        &["`model.norm.weight`", "missing", "model.safetensors"],
    );

    let dir = damaged("extra-tensor", |d| {
        edit_weights(d, |t| {
            t.push((
                "model.layers.9.mlp.up_proj.weight".into(),
                HostTensor::new(vec![1], vec![0.0]),
            ))
        })
    });
    assert_mentions(
        &load_error(&dir),
        &["model.layers.9.mlp.up_proj.weight", "does not use"],
    );
}

#[test]
fn unknown_dtype_names_tensor_and_type() {
    let dir = damaged("int-dtype", |d| {
        // Rebuild the file with one tensor stored as I32.
        let path = d.join("model.safetensors");
        let source = WeightSource::open(std::slice::from_ref(&path)).unwrap();
        let tensors: Vec<(String, HostTensor)> = source
            .names()
            .map(|n| (n.to_string(), source.get(n).unwrap()))
            .collect();
        let encoded: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = tensors
            .iter()
            .map(|(n, t)| {
                if n == "model.norm.weight" {
                    let ints: Vec<u8> = t
                        .data
                        .iter()
                        .flat_map(|&v| (v as i32).to_le_bytes())
                        .collect();
                    (n.clone(), t.shape.clone(), ints, safetensors::Dtype::I32)
                } else {
                    (
                        n.clone(),
                        t.shape.clone(),
                        t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        safetensors::Dtype::F32,
                    )
                }
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = encoded
            .iter()
            .map(|(n, s, b, dt)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    });
    assert_mentions(
        &load_error(&dir),
        &["`model.norm.weight`", "I32", "model.safetensors"],
    );
}

#[test]
fn truncated_weights_and_missing_shard_name_the_file() {
    let dir = damaged("truncated", |d| {
        let path = d.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_mentions(&load_error(&dir), &["model.safetensors"]);

    let sharded = scratch_dir("missing-shard");
    copy_dir(
        &repo_root().join("tests/fixtures/hf/llama3-tied-bf16-sharded"),
        &sharded,
    );
    std::fs::remove_file(sharded.join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(&load_error(&sharded), &["model-00002-of-00003.safetensors"]);

    let missing = scratch_dir("no-weights");
    std::fs::copy(fixture().join("config.json"), missing.join("config.json")).unwrap();
    assert_mentions(&load_error(&missing), &["model.safetensors"]);
}

#[test]
fn the_binary_reports_errors_without_panicking() {
    let dir = damaged("cli-bad-json", |d| {
        std::fs::write(d.join("config.json"), "nonsense").unwrap()
    });
    let output = Command::new(trainer_bin())
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
