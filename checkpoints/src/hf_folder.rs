//! A Hugging Face model folder: config.json, weights (model.safetensors, or shards listed in
//! model.safetensors.index.json), tokenizer.json and tokenizer_config.json.

use crate::atomic;
use crate::safetensors_io::{write_safetensors, HostTensor, StoreDtype, WeightSource};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The files beside the weights that a model folder carries along: tokenizer, chat template,
/// special tokens, generation defaults. Copied into run folders and into every export.
pub const SIDE_FILES: [&str; 5] = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "chat_template.jinja",
    "special_tokens_map.json",
    GENERATION_CONFIG_FILE,
];

/// Parses a JSON file; errors name the file (and the line and column for bad JSON).
pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

#[derive(Debug, Clone)]
pub struct HfFolder {
    pub dir: PathBuf,
}

impl HfFolder {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        Ok(Self { dir })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn config(&self) -> Result<Value> {
        read_json(&self.path(CONFIG_FILE))
    }

    /// tokenizer_config.json, if the folder has one (it carries the chat template).
    pub fn tokenizer_config(&self) -> Result<Option<Value>> {
        let path = self.path(TOKENIZER_CONFIG_FILE);
        if path.exists() {
            read_json(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The safetensors files holding the weights: the single file, or the shards of the index.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let single = self.path(WEIGHTS_FILE);
        if single.exists() {
            return Ok(vec![single]);
        }
        let index_path = self.path(WEIGHTS_INDEX_FILE);
        if !index_path.exists() {
            bail!(
                "{} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}",
                self.dir.display()
            );
        }
        let index = read_json(&index_path)?;
        let Some(weight_map) = index.get("weight_map").and_then(Value::as_object) else {
            bail!("{}: missing object `weight_map`", index_path.display());
        };
        let mut shards = BTreeSet::new();
        for (tensor, file) in weight_map {
            let Some(file) = file.as_str() else {
                bail!(
                    "{}: weight_map[`{tensor}`] is not a file name",
                    index_path.display()
                );
            };
            shards.insert(file.to_string());
        }
        Ok(shards.into_iter().map(|f| self.path(&f)).collect())
    }

    /// Opens the weights and checks the index (if any) against the shards' contents.
    pub fn weights(&self) -> Result<WeightSource> {
        let files = self.weight_files()?;
        let source = WeightSource::open(&files)?;
        let index_path = self.path(WEIGHTS_INDEX_FILE);
        if files.len() > 1 || !self.path(WEIGHTS_FILE).exists() {
            let index = read_json(&index_path)?;
            for (tensor, file) in index["weight_map"].as_object().into_iter().flatten() {
                if !source.contains(tensor) {
                    bail!(
                        "{} lists tensor `{tensor}` in {}, which does not hold it",
                        index_path.display(),
                        file.as_str().unwrap_or("?")
                    );
                }
            }
        }
        Ok(source)
    }
}

/// A model's config.json saying the stored precision: `dtype` is what transformers 5 reads,
/// `torch_dtype` what 4 reads.
pub fn config_with_dtype(config: &Value, dtype: StoreDtype) -> Value {
    let mut config = config.clone();
    config["torch_dtype"] = Value::String(dtype.torch_name().into());
    config["dtype"] = Value::String(dtype.torch_name().into());
    config
}

/// Writes a Hugging Face folder: config.json, model.safetensors (in `dtype`), and copies of
/// the tokenizer files from `tokenizer_from` when given. Each file is written atomically.
pub fn save_hf_folder(
    out_dir: &Path,
    config: &Value,
    tensors: &[(String, HostTensor)],
    dtype: StoreDtype,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let config = config_with_dtype(config, dtype);
    let config_text = serde_json::to_string_pretty(&config)? + "\n";
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&out_dir.join(WEIGHTS_FILE), tensors, dtype, Some(metadata))?;
    // A stale index would point loaders at old shards: the single file replaces it.
    let _ = std::fs::remove_file(out_dir.join(WEIGHTS_INDEX_FILE));
    if let Some(source_dir) = tokenizer_from {
        for file in SIDE_FILES {
            let from = source_dir.join(file);
            if from.exists() && source_dir != out_dir {
                let bytes = std::fs::read(&from)
                    .with_context(|| format!("cannot read {}", from.display()))?;
                atomic::write_file(&out_dir.join(file), &bytes)?;
            }
        }
    }
    // config.json last: a folder with a config is a complete folder.
    atomic::write_file(&out_dir.join(CONFIG_FILE), config_text.as_bytes())
}
