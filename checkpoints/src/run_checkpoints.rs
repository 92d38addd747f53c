//! Training checkpoints of a run: `RUN/checkpoints/step-00000100/` folders holding named
//! tensor files and a `state.json`, sealed by a `manifest.json` of SHA-256 checksums.
//!
//! A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed
//! into place, so a crash mid-save leaves the previous checkpoints untouched; a failed save
//! removes its temporary folder, and leftovers of a crash are cleaned at the next start. On
//! resume each candidate is verified against its manifest; a damaged one is reported and moved
//! to `checkpoints/damaged/`, so it never counts toward `keep_last`.
//!
//! Retention follows the run's lineage (the `lineage` of `state.json`: one id per fresh
//! start, kept by every resume): pruning keeps the newest `keep_last` checkpoints of the
//! lineage being written, and never the one just saved.

use crate::atomic;
use crate::safetensors_io::{write_safetensors, HostTensor, StoreDtype, WeightSource};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const STATE_FILE: &str = "state.json";
/// Where damaged checkpoints are moved, inside the checkpoints folder.
pub const DAMAGED_DIR: &str = "damaged";
/// Where checkpoints newer than the one a run resumed from are moved.
pub const SUPERSEDED_DIR: &str = "superseded";

/// What goes into one checkpoint: tensor files by name (`model`, `optimizer`, ...), other
/// JSON files by file name (`config.json`, `adapter_config.json`), and a JSON state (step,
/// data cursor, seeds).
pub struct CheckpointContents {
    pub tensor_files: Vec<(String, Vec<(String, HostTensor)>)>,
    pub json_files: Vec<(String, Value)>,
    pub state: Value,
}

/// A verified checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
}

impl Checkpoint {
    pub fn state(&self) -> Result<Value> {
        crate::read_json(&self.dir.join(STATE_FILE))
    }

    /// The lineage recorded in `state.json` (`None` for checkpoints that predate lineages).
    pub fn lineage(&self) -> Option<String> {
        self.state()
            .ok()
            .and_then(|state| state["lineage"].as_str().map(str::to_string))
    }

    pub fn tensors(&self, file: &str) -> Result<WeightSource> {
        WeightSource::open(&[self.dir.join(format!("{file}.safetensors"))])
    }
}

/// The checkpoint folder of a run.
pub struct CheckpointDir {
    pub root: PathBuf,
}

fn step_folder_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hexadecimal of `bytes` (how digests are written).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CheckpointDir {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            root: run_dir.join("checkpoints"),
        }
    }

    /// Writes the checkpoint of `step` atomically, then deletes all but the newest `keep_last`
    /// of its lineage (`contents.state["lineage"]`). A failed save leaves nothing behind.
    pub fn save(
        &self,
        step: u64,
        contents: &CheckpointContents,
        keep_last: usize,
    ) -> Result<Checkpoint> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let final_dir = self.root.join(step_folder_name(step));
        let staging = self.root.join(format!(
            ".staging-{}-{}",
            step_folder_name(step),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&staging);
        if let Err(error) = write_staging(&staging, step, contents) {
            let _ = fs::remove_dir_all(&staging);
            return Err(error.context(format!("saving checkpoint {}", final_dir.display())));
        }

        // Replacing an existing checkpoint of the same step: move it aside first, so that at
        // every instant one complete copy exists.
        let displaced = self.root.join(format!(
            ".old-{}-{}",
            step_folder_name(step),
            std::process::id()
        ));
        let had_old = final_dir.exists();
        if had_old {
            fs::rename(&final_dir, &displaced)?;
        }
        if let Err(error) = fs::rename(&staging, &final_dir) {
            let _ = fs::remove_dir_all(&staging);
            if had_old {
                let _ = fs::rename(&displaced, &final_dir);
            }
            return Err(error)
                .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()));
        }
        atomic::sync_parent(&final_dir);
        if had_old {
            let _ = fs::remove_dir_all(&displaced);
        }
        let saved = Checkpoint {
            dir: final_dir,
            step,
        };
        self.prune(keep_last, contents.state["lineage"].as_str(), &saved)?;
        Ok(saved)
    }

    /// Removes what an interrupted save left: staging folders, and a displaced old copy whose
    /// replacement exists (one whose replacement never landed is put back). Call it only while
    /// holding the run folder's lock.
    pub fn clean_leftovers(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".staging-") {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            } else if let Some(rest) = name.strip_prefix(".old-") {
                // `.old-step-00000008-PID`: the step folder's name before the last dash.
                let original = rest.rsplit_once('-').map_or(rest, |(folder, _)| folder);
                let target = self.root.join(original);
                if target.exists() {
                    fs::remove_dir_all(entry.path())?;
                } else {
                    fs::rename(entry.path(), &target)?;
                }
            }
        }
        Ok(())
    }

    /// Moves every checkpoint newer than `step` to `checkpoints/superseded/` (a run resumed
    /// from an older checkpoint writes its own history from there). Returns what was moved.
    pub fn supersede_after(&self, step: u64) -> Result<Vec<PathBuf>> {
        let mut moved = Vec::new();
        for newer in self.list()?.into_iter().filter(|c| c.step > step) {
            moved.push(self.move_into(&newer, SUPERSEDED_DIR)?);
        }
        Ok(moved)
    }

    /// Moves a checkpoint folder into `checkpoints/SUB/` under a free name.
    fn move_into(&self, checkpoint: &Checkpoint, sub: &str) -> Result<PathBuf> {
        let folder = self.root.join(sub);
        fs::create_dir_all(&folder)?;
        let name = step_folder_name(checkpoint.step);
        let target = std::iter::once(folder.join(&name))
            .chain((1..).map(|n| folder.join(format!("{name}.{n}"))))
            .find(|candidate| !candidate.exists())
            .expect("an unbounded list of names");
        fs::rename(&checkpoint.dir, &target).with_context(|| {
            format!(
                "cannot move {} to {}",
                checkpoint.dir.display(),
                target.display()
            )
        })?;
        Ok(target)
    }

    /// Checkpoint folders by step, newest first, unverified.
    pub fn list(&self) -> Result<Vec<Checkpoint>> {
        let mut found = Vec::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(found);
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
                found.push(Checkpoint {
                    dir: entry.path(),
                    step,
                });
            }
        }
        found.sort_by_key(|c| std::cmp::Reverse(c.step));
        Ok(found)
    }

    /// Deletes the checkpoints of `lineage` beyond the newest `keep_last` (at least one),
    /// never `saved`. Checkpoints of other lineages are not this run's to delete.
    fn prune(&self, keep_last: usize, lineage: Option<&str>, saved: &Checkpoint) -> Result<()> {
        let ours: Vec<Checkpoint> = self
            .list()?
            .into_iter()
            .filter(|c| {
                lineage.is_none() || c.lineage().is_none() || c.lineage().as_deref() == lineage
            })
            .collect();
        for old in ours.into_iter().skip(keep_last.max(1)) {
            if old.dir == saved.dir {
                continue;
            }
            fs::remove_dir_all(&old.dir)
                .with_context(|| format!("cannot remove {}", old.dir.display()))?;
        }
        Ok(())
    }

    /// The newest checkpoint that passes verification. Damaged ones are reported through
    /// `warn` and moved to `checkpoints/damaged/`. `None` when the run has no checkpoint yet.
    pub fn latest_valid(&self, warn: impl FnMut(String)) -> Result<Option<Checkpoint>> {
        self.latest_valid_of(None, warn)
    }

    /// As [`latest_valid`](Self::latest_valid), among the checkpoints of one lineage.
    pub fn latest_valid_of(
        &self,
        lineage: Option<&str>,
        mut warn: impl FnMut(String),
    ) -> Result<Option<Checkpoint>> {
        for candidate in self.list()? {
            match verify(&candidate.dir) {
                Ok(()) if lineage.is_none() || candidate.lineage().as_deref() == lineage => {
                    return Ok(Some(candidate))
                }
                Ok(()) => {}
                Err(error) => {
                    let moved = self.move_into(&candidate, DAMAGED_DIR);
                    warn(format!(
                        "checkpoint {} is damaged ({error:#}); {}; trying the previous one",
                        candidate.dir.display(),
                        match moved {
                            Ok(to) => format!("moved to {}", to.display()),
                            Err(error) => format!("could not move it aside: {error:#}"),
                        }
                    ))
                }
            }
        }
        Ok(None)
    }
}

/// Writes a complete checkpoint (tensor files, state, manifest) into `staging`.
fn write_staging(staging: &Path, step: u64, contents: &CheckpointContents) -> Result<()> {
    fs::create_dir_all(staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let mut manifest = BTreeMap::new();
    for (name, tensors) in &contents.tensor_files {
        let file = format!("{name}.safetensors");
        // `format: pt`, as torch writes it: transformers and peft refuse files without it.
        let metadata = [("format".to_string(), "pt".to_string())].into();
        write_safetensors(
            &staging.join(&file),
            tensors,
            StoreDtype::F32,
            Some(metadata),
        )?;
        manifest.insert(file.clone(), sha256_hex(&fs::read(staging.join(&file))?));
    }
    for (file, value) in &contents.json_files {
        let bytes = serde_json::to_vec_pretty(value)?;
        atomic::write_file(&staging.join(file), &bytes)?;
        manifest.insert(file.clone(), sha256_hex(&bytes));
    }
    let state = serde_json::to_vec_pretty(&contents.state)?;
    atomic::write_file(&staging.join(STATE_FILE), &state)?;
    manifest.insert(STATE_FILE.to_string(), sha256_hex(&state));
    let manifest = serde_json::json!({ "step": step, "sha256": manifest });
    atomic::write_file(
        &staging.join(MANIFEST_FILE),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    atomic::sync_parent(&staging.join(MANIFEST_FILE));
    Ok(())
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.exists() {
        bail!("no {MANIFEST_FILE}: the save did not finish");
    }
    let manifest = crate::read_json(&manifest_path)?;
    let Some(files) = manifest["sha256"].as_object() else {
        bail!("{} has no `sha256` table", manifest_path.display());
    };
    for (file, expected) in files {
        let path = dir.join(file);
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if Some(sha256_hex(&bytes).as_str()) != expected.as_str() {
            bail!("{} does not match its checksum", path.display());
        }
    }
    Ok(())
}

/// Opens a checkpoint named on the command line, verified.
pub fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
    verify(dir).with_context(|| format!("checkpoint {}", dir.display()))?;
    let manifest = crate::read_json(&dir.join(MANIFEST_FILE))?;
    let step = manifest["step"]
        .as_u64()
        .context("manifest.json has no `step`")?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(value: f32) -> CheckpointContents {
        CheckpointContents {
            json_files: vec![],
            tensor_files: vec![(
                "model".into(),
                vec![("w".into(), HostTensor::new(vec![2], vec![value, 1.0]))],
            )],
            state: serde_json::json!({ "step": value }),
        }
    }

    fn fresh(name: &str) -> CheckpointDir {
        let dir = std::env::temp_dir().join(format!("ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        CheckpointDir::new(&dir)
    }

    #[test]
    fn keeps_the_last_k_and_finds_the_newest() {
        let dir = fresh("keep");
        for step in [10, 20, 30, 40] {
            dir.save(step, &contents(step as f32), 2).unwrap();
        }
        let steps: Vec<u64> = dir.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![40, 30]);
        let latest = dir.latest_valid(|w| panic!("{w}")).unwrap().unwrap();
        assert_eq!(latest.step, 40);
        assert_eq!(
            latest.tensors("model").unwrap().get("w").unwrap().data,
            vec![40.0, 1.0]
        );
    }

    #[test]
    fn flipped_byte_and_truncation_are_detected_and_skipped() {
        for damage in ["flip", "truncate", "unfinished"] {
            let dir = fresh(damage);
            dir.save(1, &contents(1.0), 3).unwrap();
            let newest = dir.save(2, &contents(2.0), 3).unwrap();
            let file = newest.dir.join("model.safetensors");
            let mut bytes = fs::read(&file).unwrap();
            match damage {
                "flip" => {
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x01;
                    fs::write(&file, bytes).unwrap();
                }
                "truncate" => fs::write(&file, &bytes[..bytes.len() / 2]).unwrap(),
                _ => fs::remove_file(newest.dir.join(MANIFEST_FILE)).unwrap(),
            }
            let mut warnings = vec![];
            let chosen = dir.latest_valid(|w| warnings.push(w)).unwrap().unwrap();
            assert_eq!(chosen.step, 1, "{damage}");
            assert_eq!(warnings.len(), 1, "{damage}");
            assert!(warnings[0].contains("step-00000002"), "{}", warnings[0]);
        }
    }

    #[test]
    fn a_failed_save_leaves_nothing_behind_and_keeps_the_old_checkpoints() {
        let dir = fresh("failed-save");
        dir.save(1, &contents(1.0), 3).unwrap();
        // A tensor file name the file system cannot take fails the save half-way.
        let mut broken = contents(2.0);
        broken.tensor_files.push(("no/such/folder".into(), vec![]));
        assert!(dir.save(2, &broken, 3).is_err());
        let names: Vec<String> = fs::read_dir(&dir.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step-00000001".to_string()]);
        assert_eq!(
            dir.latest_valid(|w| panic!("{w}")).unwrap().unwrap().step,
            1
        );
    }

    #[test]
    fn damaged_checkpoints_move_aside_and_other_lineages_are_not_pruned() {
        let dir = fresh("lineage");
        let of = |lineage: &str, value: f32| {
            let mut c = contents(value);
            c.state = serde_json::json!({ "lineage": lineage });
            c
        };
        dir.save(50, &of("other", 50.0), 1).unwrap();
        for step in [1, 2, 3] {
            dir.save(step, &of("ours", step as f32), 2).unwrap();
        }
        // Ours keep the newest two; the other lineage's higher step is not ours to delete.
        let steps: Vec<u64> = dir.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![50, 3, 2]);
        let newest_ours = dir
            .latest_valid_of(Some("ours"), |w| panic!("{w}"))
            .unwrap();
        assert_eq!(newest_ours.unwrap().step, 3);

        fs::write(dir.root.join("step-00000003/state.json"), "{}").unwrap();
        let mut warnings = vec![];
        let chosen = dir
            .latest_valid_of(Some("ours"), |w| warnings.push(w))
            .unwrap();
        assert_eq!(chosen.unwrap().step, 2);
        assert!(warnings[0].contains("damaged"), "{warnings:?}");
        assert!(dir.root.join("damaged/step-00000003").exists());
    }

    #[test]
    fn leftovers_of_a_crash_are_cleaned_and_a_displaced_checkpoint_put_back() {
        let dir = fresh("leftovers");
        dir.save(4, &contents(4.0), 3).unwrap();
        fs::create_dir_all(dir.root.join(".staging-step-00000005-77")).unwrap();
        // A crash between moving step 4 aside and moving its replacement in.
        fs::rename(
            dir.root.join("step-00000004"),
            dir.root.join(".old-step-00000004-77"),
        )
        .unwrap();
        dir.clean_leftovers().unwrap();
        let names: Vec<String> = fs::read_dir(&dir.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step-00000004".to_string()]);
        verify(&dir.root.join("step-00000004")).unwrap();
    }

    #[test]
    fn a_leftover_staging_folder_is_ignored() {
        let dir = fresh("staging");
        dir.save(5, &contents(5.0), 3).unwrap();
        // A crash mid-save leaves a staging folder behind: it is not a checkpoint.
        fs::create_dir_all(dir.root.join(".staging-step-00000006-1")).unwrap();
        assert_eq!(
            dir.latest_valid(|w| panic!("{w}")).unwrap().unwrap().step,
            5
        );
    }
}
