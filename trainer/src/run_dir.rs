//! Who may write a run folder, and what happens to what is already in it.
//!
//! One process writes a run folder at a time: it holds an OS lock on `RUN/.lock` (released by
//! the OS when the process ends, crash or not), and a second process is refused with the
//! holder's pid. A folder that already holds a run is continued only with `--resume`, or
//! moved aside with `--overwrite`; nothing in it is deleted or silently replaced.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lock";

/// `--resume`: start fresh, continue from the newest valid checkpoint, or from a given one.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    Auto,
    From(PathBuf),
}

impl Resume {
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            None => Self::No,
            Some("auto") => Self::Auto,
            Some(path) => Self::From(PathBuf::from(path)),
        }
    }
}

/// The lock on a run folder; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    pub dir: PathBuf,
}

/// Takes the run folder's lock, creating the folder if needed.
pub fn lock(dir: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create run folder {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "run folder {} is in use by another trainer process (pid {}); wait for it to \
                 end, or give this run another run.dir",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            );
        }
        Err(TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    Ok(RunLock {
        file,
        dir: dir.to_path_buf(),
    })
}

impl RunLock {
    /// Writes this process's pid into the lock file, for the message a second process gets.
    /// Done once the run is accepted, so that a refused run leaves the folder as it was.
    fn sign(&mut self) -> Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}", std::process::id())?;
        Ok(self.file.sync_all()?)
    }
}

/// What a run folder holds besides its lock, sorted (empty for a new or empty folder).
pub fn contents(dir: &Path) -> Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name != LOCK_FILE {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Locks the run folder and decides what its old contents become: continued (`--resume`),
/// moved to a sibling `RUN.old-N` (`--overwrite`), or, when neither was asked for, left
/// untouched while the run is refused.
pub fn claim(dir: &Path, resume: &Resume, overwrite: bool) -> Result<RunLock> {
    if overwrite && *resume != Resume::No {
        bail!("--overwrite starts the run over and --resume continues it: give one of them");
    }
    let mut lock = lock(dir)?;
    let old = contents(dir)?;
    if old.is_empty() || *resume != Resume::No {
        lock.sign()?;
        return Ok(lock);
    }
    if !overwrite {
        bail!(
            "run folder {} already holds a run ({}): continue it with --resume auto, or start \
             over with --overwrite (which moves the old contents to a sibling folder), or set \
             another run.dir",
            dir.display(),
            old.join(", ")
        );
    }
    let aside = free_sibling(dir)?;
    std::fs::create_dir_all(&aside)
        .with_context(|| format!("cannot create {}", aside.display()))?;
    for name in &old {
        std::fs::rename(dir.join(name), aside.join(name)).with_context(|| {
            format!(
                "cannot move {} into {}",
                dir.join(name).display(),
                aside.display()
            )
        })?;
    }
    println!(
        "--overwrite: moved the earlier run in {} to {}",
        dir.display(),
        aside.display()
    );
    lock.sign()?;
    Ok(lock)
}

/// The resolved config of a run, `RUN/config.toml`.
pub const CONFIG_FILE: &str = "config.toml";
/// A resumed run's resolved config waits here until the run is known to start, so that a
/// resume refused for a config mismatch leaves the run's record as it was.
const PENDING_CONFIG_FILE: &str = ".config-pending.toml";

/// Records the resolved config: at once for a fresh run folder, or, where checkpoints exist
/// (a resume), once [`commit_config`] says the run started.
pub fn write_config(dir: &Path, text: &str) -> Result<()> {
    let resuming = dir.join("checkpoints").exists() && dir.join(CONFIG_FILE).exists();
    let file = if resuming {
        PENDING_CONFIG_FILE
    } else {
        CONFIG_FILE
    };
    checkpoints::atomic::write_file(&dir.join(file), text.as_bytes())
}

/// Makes a pending config the run's record (called once the run has started).
pub fn commit_config(dir: &Path) -> Result<()> {
    let pending = dir.join(PENDING_CONFIG_FILE);
    if pending.exists() {
        std::fs::rename(&pending, dir.join(CONFIG_FILE))
            .with_context(|| format!("cannot rename {}", pending.display()))?;
    }
    Ok(())
}

/// The first `RUN.old-N` that does not exist yet.
fn free_sibling(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("run.dir {} has no folder name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    (1..)
        .map(|n| dir.with_file_name(format!("{name}.old-{n}")))
        .find(|candidate| !candidate.exists())
        .context("no free name for the old run")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("run-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for n in 1..3 {
            let _ = std::fs::remove_dir_all(dir.with_file_name(format!(
                "{}.old-{n}",
                dir.file_name().unwrap().to_string_lossy()
            )));
        }
        dir
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = fresh("lock");
        let mut held = lock(&dir).unwrap();
        held.sign().unwrap();
        let error = lock(&dir).unwrap_err().to_string();
        assert!(error.contains(&std::process::id().to_string()), "{error}");
        drop(held);
        lock(&dir).unwrap();
    }

    #[test]
    fn an_old_run_is_refused_kept_or_moved_aside() {
        let dir = fresh("claim");
        drop(claim(&dir, &Resume::No, false).unwrap());
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        let error = claim(&dir, &Resume::No, false).unwrap_err().to_string();
        assert!(
            error.contains("--resume auto") && error.contains("metrics.jsonl"),
            "{error}"
        );
        assert!(dir.join("metrics.jsonl").exists());
        drop(claim(&dir, &Resume::Auto, false).unwrap());
        assert!(dir.join("metrics.jsonl").exists());
        assert!(claim(&dir, &Resume::Auto, true).is_err());
        drop(claim(&dir, &Resume::No, true).unwrap());
        assert_eq!(contents(&dir).unwrap(), Vec::<String>::new());
        let aside = dir.with_file_name(format!(
            "{}.old-1",
            dir.file_name().unwrap().to_string_lossy()
        ));
        assert_eq!(
            std::fs::read_to_string(aside.join("metrics.jsonl")).unwrap(),
            "{}\n"
        );
    }
}
