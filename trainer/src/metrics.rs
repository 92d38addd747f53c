//! `metrics.jsonl`: one JSON object per logged step. Resuming first drops lines past the
//! checkpoint's step, so a step never appears twice.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    pub path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log of `run_dir`; with `resume_step`, keeps only lines up to that step.
    pub fn open(run_dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        match resume_step {
            Some(step) if path.exists() => {
                let text = std::fs::read_to_string(&path)?;
                let kept: String = text
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<Value>(line)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s <= step)
                    })
                    .map(|line| format!("{line}\n"))
                    .collect();
                checkpoints::atomic::write_file(&path, kept.as_bytes())?;
            }
            Some(_) => {}
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { path, file })
    }

    /// Appends `{"step", "time", ...scalars}`.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<Value> {
        let mut object = Map::new();
        object.insert("step".into(), step.into());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        object.insert("time".into(), now.into());
        for (name, value) in scalars {
            object.insert((*name).into(), Value::from(*value));
        }
        let line = Value::Object(object);
        writeln!(self.file, "{line}")
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(line)
    }
}

/// The name a metric has in trackers (W&B, TensorBoard), grouped as their users expect:
/// `eval_loss` -> `eval/loss`, `lr` -> `train/learning_rate`, `train_tokens_per_s` ->
/// `train/tokens_per_s`, anything else `train/NAME`. metrics.jsonl keeps the short names.
pub fn tracker_name(name: &str) -> String {
    if name == "lr" {
        return "train/learning_rate".into();
    }
    match name.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{}", name.strip_prefix("train_").unwrap_or(name)),
    }
}

/// The numbers of a metrics line under their tracker names (`step` and `time` left out).
pub fn tracker_scalars(line: &Map<String, Value>) -> impl Iterator<Item = (String, Value)> + '_ {
    line.iter()
        .filter(|(name, value)| !matches!(name.as_str(), "step" | "time") && value.is_number())
        .map(|(name, value)| (tracker_name(name), value.clone()))
}

/// Reads every line of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: bad JSON", path.display(), i + 1))
        })
        .collect()
}
