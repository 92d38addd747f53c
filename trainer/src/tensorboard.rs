//! TensorBoard event files, written directly: an offline tracker that `tensorboard --logdir`
//! reads. Written here rather than through a crate: the format is two small protobuf
//! messages (Event, Summary.Value) in TFRecord framing, and the Rust TensorBoard crates are
//! unmaintained and pull in a protobuf code generator.
//!
//! A resumed run rewrites its event file from metrics.jsonl (already cut back to the
//! checkpoint), so each training step appears once however often the run was killed.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Where a run's event files live: `RUN/tensorboard/`.
pub const TENSORBOARD_DIR: &str = "tensorboard";

pub struct TensorBoardWriter {
    pub path: PathBuf,
    file: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Starts a fresh event file in `RUN/tensorboard/` holding `backlog` (metrics lines),
    /// then removes older event files there.
    pub fn create(run_dir: &Path, backlog: &[Map<String, Value>]) -> Result<Self> {
        let dir = run_dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let wall_time = now();
        // TensorBoard orders a folder's files by name: the newest must sort last.
        let name = format!("events.out.tfevents.{:020.6}.trainer", wall_time);
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.write_event(&event(
            wall_time,
            0,
            EventBody::FileVersion("brain.Event:2"),
        ))?;
        for line in backlog {
            writer.log(line)?;
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let old = entry.path();
            let is_events = old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents."));
            if is_events && old != writer.path {
                std::fs::remove_file(&old)
                    .with_context(|| format!("cannot remove {}", old.display()))?;
            }
        }
        Ok(writer)
    }

    /// Writes one metrics line (`step`, `time`, scalars) as one event, and flushes it so a
    /// running TensorBoard sees it.
    pub fn log(&mut self, line: &Map<String, Value>) -> Result<()> {
        let step = line.get("step").and_then(Value::as_u64).unwrap_or(0);
        let wall_time = line.get("time").and_then(Value::as_f64).unwrap_or_else(now);
        let values: Vec<(String, f32)> = crate::metrics::tracker_scalars(line)
            .filter_map(|(name, value)| Some((name, value.as_f64()? as f32)))
            .collect();
        self.write_event(&event(wall_time, step, EventBody::Scalars(&values)))
    }

    fn write_event(&mut self, data: &[u8]) -> Result<()> {
        let written = write_record(&mut self.file, data).and_then(|()| self.file.flush());
        written.with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// TFRecord framing: length, its masked CRC-32C, the data, the data's masked CRC-32C.
pub fn write_record(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let length = (data.len() as u64).to_le_bytes();
    out.write_all(&length)?;
    out.write_all(&masked_crc(&length).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc(data).to_le_bytes())
}

/// The checksum TFRecords store: CRC-32C rotated and offset, so that CRCs of data that
/// holds CRCs stay well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

/// An `Event` message: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
/// summary = 5 (Summary: repeated Value value = 1; Value: tag = 1, simple_value = 2 (float)).
fn event(wall_time: f64, step: u64, body: EventBody) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    put_varint(&mut out, step);
    match body {
        EventBody::FileVersion(version) => put_bytes(&mut out, 0x1a, version.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut message = Vec::new();
                put_bytes(&mut message, 0x0a, tag.as_bytes());
                message.push(0x15);
                message.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 0x0a, &message);
            }
            put_bytes(&mut out, 0x2a, &summary);
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field: its tag byte, the length as a varint, the bytes.
fn put_bytes(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}
