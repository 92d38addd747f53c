//! The default configs and the files they name (tokenizers, data), compiled into the binary
//! so that an installed `trainer` runs them from any folder: `trainer config list`, `show`,
//! `cp`, and `trainer recipe NAME` without `--config`. A plain list of `include_bytes!`
//! rather than an embedding crate: a dozen files, and a test checks that none is missing.
//!
//! A config path such as `recipes/data/arithmetic-verbose.jsonl` is used as given when it
//! exists from the working folder (a clone); otherwise, when it names a shipped file or
//! folder, the shipped copy is unpacked once to a cache folder and the path points there.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A file of the repository carried inside the binary.
pub struct Shipped {
    /// Its path from the repository root (`recipes/...`).
    pub path: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! shipped {
    ($($path:literal),* $(,)?) => {
        &[$(Shipped {
            path: concat!("recipes/", $path),
            bytes: include_bytes!(concat!("../", $path)),
        }),*]
    };
}

/// The default configs, `recipes/configs/RECIPE/NAME.toml`, known as `RECIPE/NAME`.
pub const CONFIGS: &[Shipped] = shipped![
    "configs/hidrop/tiny.toml",
    "configs/layer-dominance/arithmetic.toml",
    "configs/layer-dominance/smollm2-135m.toml",
    "configs/layer-dominance/text.toml",
    "configs/layer-dominance/tiny.toml",
    "configs/llm4tsf/smollm2-135m.toml",
    "configs/llm4tsf/tiny.toml",
    "configs/onpolicy-sft/smollm2-135m.toml",
    "configs/onpolicy-sft/tiny.toml",
    "configs/sft/smollm2-135m.toml",
    "configs/sft/tiny.toml",
    "configs/skipgpt/smollm2-135m.toml",
    "configs/skipgpt/tiny.toml",
    "configs/tays/tiny.toml",
];

/// The files the configs name.
pub const ASSETS: &[Shipped] = shipped![
    "assets/arithmetic-tokenizer/tokenizer.json",
    "assets/arithmetic-tokenizer/tokenizer_config.json",
    "assets/kjv-tokenizer/tokenizer.json",
    "assets/kjv-tokenizer/tokenizer_config.json",
    "assets/shapes-tokenizer/tokenizer.json",
    "assets/shapes-tokenizer/tokenizer_config.json",
    "assets/stream-tokenizer/tokenizer.json",
    "assets/stream-tokenizer/tokenizer_config.json",
    "data/arithmetic-verbose.jsonl",
    "data/kjv-corpus.txt",
    "data/series/airline-passengers.csv",
    "data/series/co2-weekly.csv",
    "data/series/seattle-temps.csv",
    "data/series/sunspots-yearly.csv",
];

const CONFIG_PREFIX: &str = "recipes/configs/";

/// A built-in config's name: `sft/tiny` for `recipes/configs/sft/tiny.toml`.
pub fn config_name(config: &Shipped) -> &'static str {
    let name = config
        .path
        .strip_prefix(CONFIG_PREFIX)
        .unwrap_or(config.path);
    name.strip_suffix(".toml").unwrap_or(name)
}

/// The built-in config called `name` (`sft/tiny`; `recipes/configs/sft/tiny.toml` too).
pub fn find_config(name: &str) -> Option<&'static Shipped> {
    let name = name.strip_prefix(CONFIG_PREFIX).unwrap_or(name);
    let name = name.strip_suffix(".toml").unwrap_or(name);
    CONFIGS.iter().find(|config| config_name(config) == name)
}

/// The text of the built-in config `name`, or an error listing them all.
pub fn config_text(name: &str) -> Result<&'static str> {
    let config = find_config(name).with_context(|| {
        let names: Vec<&str> = CONFIGS.iter().map(config_name).collect();
        format!(
            "no built-in config `{name}` (available: {})",
            names.join(", ")
        )
    })?;
    std::str::from_utf8(config.bytes).context("a built-in config is not UTF-8")
}

/// Points every string of `table` that names a shipped file or folder missing from the
/// working folder at its unpacked copy.
pub fn resolve_shipped_paths(table: &mut toml::Table) -> Result<()> {
    for (_, value) in table.iter_mut() {
        match value {
            toml::Value::Table(inner) => resolve_shipped_paths(inner)?,
            toml::Value::String(text) => {
                if let Some(unpacked) = unpacked_path(text)? {
                    *text = unpacked.display().to_string();
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where the shipped `path` (a file, or a folder of shipped files) is unpacked, when `path`
/// does not exist from the working folder; `None` when it exists or is not shipped.
fn unpacked_path(path: &str) -> Result<Option<PathBuf>> {
    let wanted = path.trim_end_matches('/');
    let files: Vec<&Shipped> = ASSETS
        .iter()
        .filter(|asset| {
            asset.path == wanted
                || asset
                    .path
                    .strip_prefix(wanted)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .collect();
    if files.is_empty() || Path::new(path).exists() {
        return Ok(None);
    }
    let root = cache_dir()?;
    for file in files {
        let target = root.join(file.path);
        let current = std::fs::read(&target).ok();
        if current.as_deref() != Some(file.bytes) {
            std::fs::create_dir_all(target.parent().expect("a shipped file has a folder"))
                .with_context(|| format!("cannot unpack shipped files to {}", root.display()))?;
            checkpoints::atomic::write_file(&target, file.bytes)?;
        }
    }
    Ok(Some(root.join(wanted)))
}

/// `$TRAINER_CACHE`, else `$XDG_CACHE_HOME/trainer`, else `~/.cache/trainer`; one folder per
/// version so that two installed versions do not share files.
fn cache_dir() -> Result<PathBuf> {
    let base = match (
        std::env::var_os("TRAINER_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    ) {
        (Some(dir), _, _) => PathBuf::from(dir),
        (None, Some(dir), _) => Path::new(&dir).join("trainer"),
        (None, None, Some(home)) => Path::new(&home).join(".cache/trainer"),
        (None, None, None) => {
            bail!("no folder to unpack shipped files to: set TRAINER_CACHE (or HOME)")
        }
    };
    Ok(base.join(format!("shipped-{}", env!("CARGO_PKG_VERSION"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under recipes/configs, recipes/assets and recipes/data is shipped, byte for
    /// byte: a config added to the folder but not to the lists fails here.
    #[test]
    fn every_config_and_asset_is_shipped() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut on_disk = Vec::new();
        for folder in ["configs", "assets", "data"] {
            let mut stack = vec![root.join(folder)];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        stack.push(path);
                    } else {
                        let relative = path.strip_prefix(root).unwrap().display().to_string();
                        on_disk.push(format!("recipes/{relative}"));
                    }
                }
            }
        }
        on_disk.sort();
        let mut shipped: Vec<&Shipped> = CONFIGS.iter().chain(ASSETS).collect();
        shipped.sort_by_key(|s| s.path);
        let names: Vec<&str> = shipped.iter().map(|s| s.path).collect();
        assert_eq!(names, on_disk);
        for file in shipped {
            let path = root.join(file.path.strip_prefix("recipes/").unwrap());
            assert_eq!(std::fs::read(path).unwrap(), file.bytes, "{}", file.path);
        }
    }

    #[test]
    fn configs_are_found_by_name_or_path() {
        assert!(config_text("sft/tiny").unwrap().contains("[train]"));
        assert_eq!(
            config_text("recipes/configs/sft/tiny.toml").unwrap(),
            config_text("sft/tiny").unwrap()
        );
        let error = config_text("sft/tinny").unwrap_err().to_string();
        assert!(
            error.contains("sft/tiny") && error.contains("skipgpt/tiny"),
            "{error}"
        );
    }

    #[test]
    fn missing_shipped_paths_point_at_unpacked_copies() {
        let cache = std::env::temp_dir().join(format!("shipped-test-{}", std::process::id()));
        std::env::set_var("TRAINER_CACHE", &cache);
        let mut table: toml::Table = toml::from_str(
            "[model]\ntokenizer = \"recipes/assets/kjv-tokenizer\"\n[data]\nother = \"recipes/data/none.txt\"",
        )
        .unwrap();
        // From the crate's folder `recipes/assets/...` does not exist: it is unpacked.
        resolve_shipped_paths(&mut table).unwrap();
        let tokenizer = PathBuf::from(table["model"]["tokenizer"].as_str().unwrap());
        assert!(tokenizer.starts_with(&cache), "{tokenizer:?}");
        assert_eq!(
            std::fs::read(tokenizer.join("tokenizer.json")).unwrap(),
            ASSETS[2].bytes
        );
        assert_eq!(
            table["data"]["other"].as_str(),
            Some("recipes/data/none.txt")
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
