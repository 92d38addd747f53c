//! Recipe configs: a TOML file, `--set a.b=value` overrides on top, then strict typing.
//! An unknown key or a wrong type is an error naming the key and the file.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::{Table, Value};

/// Range checks of a typed config, run before anything is loaded or trained. Each error names
/// the key (`prefix.field`) and the allowed range.
pub trait Validate {
    /// `prefix` is where this section sits in the file (`train`, `warmup.train`).
    fn validate(&self, prefix: &str) -> Result<()>;
}

/// `prefix.field`, or `field` at the top level.
pub fn key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// Fails with "`key` = value: must be allowed" unless `ok`.
pub fn ensure(ok: bool, key: &str, value: impl std::fmt::Display, allowed: &str) -> Result<()> {
    if !ok {
        bail!("`{key}` = {value}: must be {allowed}");
    }
    Ok(())
}

/// A finite number greater than zero.
pub fn ensure_positive(key: &str, value: f64) -> Result<()> {
    ensure(
        value.is_finite() && value > 0.0,
        key,
        value,
        "a finite number > 0",
    )
}

/// A finite number at least zero.
pub fn ensure_non_negative(key: &str, value: f64) -> Result<()> {
    ensure(
        value.is_finite() && value >= 0.0,
        key,
        value,
        "a finite number >= 0",
    )
}

/// A count of at least one.
pub fn ensure_count(key: &str, value: u64) -> Result<()> {
    ensure(value >= 1, key, value, "at least 1")
}

/// A probability of keeping something: in (0, 1].
pub fn ensure_probability(key: &str, value: f64) -> Result<()> {
    ensure(value > 0.0 && value <= 1.0, key, value, "in (0, 1]")
}

/// A fraction in [0, 1) (dropout, sparsity).
pub fn ensure_fraction(key: &str, value: f64) -> Result<()> {
    ensure((0.0..1.0).contains(&value), key, value, "in [0, 1)")
}

/// Reads `path`, applies `overrides` (`a.b=value`, value in TOML syntax or a bare string),
/// deserializes into `T` and checks its ranges. Returns the typed config and the resolved
/// table.
pub fn load_config<T: DeserializeOwned + Validate>(
    path: &Path,
    overrides: &[String],
) -> Result<(T, Table)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let table = parse_config(&text, &path.display().to_string(), overrides)?;
    Ok((checked(&table, &path.display().to_string())?, table))
}

/// The table of a config's `text` (from `source`, named in errors) with `overrides` applied.
pub fn parse_config(text: &str, source: &str, overrides: &[String]) -> Result<Table> {
    let mut table: Table = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("config {source} is not valid TOML: {e}"))?;
    for item in overrides {
        apply_override(&mut table, item).with_context(|| format!("--set {item}"))?;
    }
    Ok(table)
}

/// Deserializes a resolved table into `T` and checks its ranges.
pub fn checked<T: DeserializeOwned + Validate>(table: &Table, source: &str) -> Result<T> {
    let config: T = typed(table, source)?;
    config
        .validate("")
        .with_context(|| format!("config {source}"))?;
    Ok(config)
}

/// Deserializes a table, naming the offending key on error.
pub fn typed<T: DeserializeOwned>(table: &Table, source: &str) -> Result<T> {
    serde_path_to_error::deserialize(Value::Table(table.clone())).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            String::new()
        } else {
            format!(" key `{path}`:")
        };
        anyhow::anyhow!("config {source}:{key} {}", e.inner())
    })
}

/// Sets `a.b.c = value` in `table`, creating tables on the way.
pub fn apply_override(table: &mut Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("expected key=value");
    };
    let key = key.trim();
    let value = parse_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).context("empty key")?;
    let mut current = table;
    for (depth, part) in parts.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        current = match entry {
            Value::Table(t) => t,
            _ => bail!("`{}` is not a table", parts[..=depth].join(".")),
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// `3` -> integer, `1e-4` -> float, `true`, `[1, 2]`, `"x"`; anything else is a string.
fn parse_value(raw: &str) -> Value {
    match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        Err(_) => Value::String(raw.into()),
    }
}

/// Serializes a config table back to TOML text (written into the run directory).
pub fn to_toml(table: &Table) -> String {
    toml::to_string_pretty(table).unwrap_or_else(|_| format!("{table:?}"))
}

/// Glob match with `*` standing for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lr: f64,
        steps: usize,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        train: Inner,
    }

    impl Validate for Outer {
        fn validate(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    fn write(text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("cfg-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn overrides_apply_with_types() {
        let path = write("name = \"a\"\n[train]\nlr = 0.1\nsteps = 3\n");
        let (config, table): (Outer, _) = load_config(
            &path,
            &[
                "train.lr=1e-4".into(),
                "name=run-b".into(),
                "train.steps=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (config.name.as_str(), config.train.lr, config.train.steps),
            ("run-b", 1e-4, 7)
        );
        assert!(to_toml(&table).contains("steps = 7"));
    }

    #[test]
    fn unknown_key_and_wrong_type_name_key_and_file() {
        let path = write("name = \"a\"\n[train]\nlr = 0.1\nsteps = 3\nbogus = 1\n");
        let err = load_config::<Outer>(&path, &[]).unwrap_err().to_string();
        assert!(
            err.contains("bogus") && err.contains(&path.display().to_string()),
            "{err}"
        );
        let path = write("name = \"a\"\n[train]\nlr = 0.1\nsteps = 3\n");
        let err = load_config::<Outer>(&path, &["train.steps=many".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.steps") && err.contains(".toml"),
            "{err}"
        );
        let err = load_config::<Outer>(&path, &["train.lr.x=1".into()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("`train.lr` is not a table"),
            "{err:#}"
        );
    }
}
