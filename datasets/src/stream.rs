//! Frame streams for the streaming recipes (`tays`): a question, frame groups that arrive one
//! after another, one observation per group (`<skip>` where nothing happens) and a final
//! answer that needs the whole stream.
//!
//! The built-in task is a seeded toy video: coloured objects in the cells of a grid appear,
//! move and change colour, at most one event per frame group. Frames come as feature vectors
//! (one token per cell: a one-hot colour or empty, a one-hot cell) or as rendered images.
//! The user's streams come as JSONL ([`load_stream_jsonl`]); each frame is an image file or a
//! matrix of feature vectors.

use crate::shapes::{Image, COLOURS};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The observation of a frame group where nothing happens.
pub const SKIP: &str = "<skip>";

/// What one frame is: `tokens` feature vectors of `dim` values, or a square RGB image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum FrameFormat {
    Features { tokens: usize, dim: usize },
    Images { size: usize },
}

impl FrameFormat {
    /// Values per frame (features `[tokens, dim]` or pixels `[3, size, size]`, flattened).
    pub fn values(self) -> usize {
        match self {
            Self::Features { tokens, dim } => tokens * dim,
            Self::Images { size } => 3 * size * size,
        }
    }
}

/// One stream: frame groups (each of frames, each frame's values flattened), one observation
/// per group, the question and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    pub groups: Vec<Vec<Vec<f32>>>,
    pub observations: Vec<String>,
    pub question: String,
    pub answer: String,
    /// What identifies the stream's content and question: held-out sets leave out every key
    /// of the training set.
    pub key: String,
}

// ---------------------------------------------------------------------------------------
// The built-in task.

/// How the built-in task draws its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    Features,
    Images,
}

/// The kinds of final question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamQuestion {
    /// `how many moves ?` (a count over the whole stream)
    Moves,
    /// `where is the red one ?` (the last position of an object; it may have changed colour)
    Where,
    /// `which appeared first ?` (the order of events; the colour it had when it appeared)
    First,
}

impl StreamQuestion {
    pub fn all() -> Vec<Self> {
        vec![Self::Moves, Self::Where, Self::First]
    }
}

fn default_groups() -> usize {
    6
}
fn default_frames_per_group() -> usize {
    2
}
fn default_grid() -> usize {
    2
}
fn default_max_objects() -> usize {
    3
}
fn default_event_chance() -> f64 {
    0.7
}
fn default_noise() -> f32 {
    0.05
}
fn default_image_size() -> usize {
    16
}

/// The built-in task's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamTask {
    /// Frame groups per stream (one observation each).
    #[serde(default = "default_groups")]
    pub groups: usize,
    #[serde(default = "default_frames_per_group")]
    pub frames_per_group: usize,
    /// Cells per side.
    #[serde(default = "default_grid")]
    pub grid: usize,
    #[serde(default = "default_max_objects")]
    pub max_objects: usize,
    /// The chance that something happens in a group.
    #[serde(default = "default_event_chance")]
    pub event_chance: f64,
    /// Uniform noise amplitude on every feature or pixel.
    #[serde(default = "default_noise")]
    pub noise: f32,
    #[serde(default = "features")]
    pub frames: FrameKind,
    /// Side of the rendered frames (`frames = "images"`).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "StreamQuestion::all")]
    pub questions: Vec<StreamQuestion>,
}

fn features() -> FrameKind {
    FrameKind::Features
}

impl Default for StreamTask {
    fn default() -> Self {
        Self {
            groups: default_groups(),
            frames_per_group: default_frames_per_group(),
            grid: default_grid(),
            max_objects: default_max_objects(),
            event_chance: default_event_chance(),
            noise: default_noise(),
            frames: features(),
            image_size: default_image_size(),
            questions: StreamQuestion::all(),
        }
    }
}

/// One event between two frames.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Appear { colour: usize, cell: usize },
    Move { colour: usize, to: usize },
    Turn { from: usize, to: usize },
}

impl Event {
    fn describe(self) -> String {
        let name = |c: usize| COLOURS[c].0;
        match self {
            Self::Appear { colour, cell } => format!("{} appears at {cell}", name(colour)),
            Self::Move { colour, to } => format!("{} moves to {to}", name(colour)),
            Self::Turn { from, to } => format!("{} turns {}", name(from), name(to)),
        }
    }
}

/// Which colour sits in each cell.
type Scene = Vec<Option<usize>>;

impl StreamTask {
    pub fn cells(&self) -> usize {
        self.grid * self.grid
    }

    pub fn format(&self) -> FrameFormat {
        match self.frames {
            FrameKind::Features => FrameFormat::Features {
                tokens: self.cells(),
                dim: COLOURS.len() + 1 + self.cells(),
            },
            FrameKind::Images => FrameFormat::Images {
                size: self.image_size,
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = |cond: bool, what: &str| {
            if cond {
                Ok(())
            } else {
                bail!("stream task: {what}")
            }
        };
        ok(self.groups >= 2, "groups must be at least 2")?;
        ok(
            self.frames_per_group >= 1,
            "frames_per_group must be at least 1",
        )?;
        ok(
            self.grid >= 1 && self.cells() <= 10,
            "grid must be 1 to 3 (cells are named 0 to 9)",
        )?;
        ok(
            (1..=self.cells().min(COLOURS.len() - 1)).contains(&self.max_objects),
            "max_objects must be between 1 and the number of cells (and leave a colour free)",
        )?;
        ok(
            (0.0..=1.0).contains(&self.event_chance) && self.event_chance > 0.0,
            "event_chance must be in (0, 1]",
        )?;
        ok(
            self.frames == FrameKind::Features || self.image_size >= 2 * self.grid,
            "image_size must give each cell at least 2 pixels",
        )?;
        ok(
            !self.questions.is_empty(),
            "`questions` names no kind of question",
        )
    }

    /// Record `index` of the stream `seed` (the same pair always gives the same record).
    pub fn record(&self, seed: u64, index: u64) -> StreamRecord {
        let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        loop {
            if let Some(record) = self.try_record(&mut rng) {
                return record;
            }
        }
    }

    /// A stream and a question with a unique answer, or `None` (drawn again).
    fn try_record(&self, rng: &mut StdRng) -> Option<StreamRecord> {
        let cells = self.cells();
        let mut scene: Scene = vec![None; cells];
        // Per group: the event and the frame of the group it shows from.
        let mut events: Vec<Option<(Event, usize)>> = Vec::with_capacity(self.groups);
        let mut scenes_per_frame: Vec<Vec<Scene>> = Vec::with_capacity(self.groups);
        let mut first_colour = None;
        let mut moves = 0;
        for _ in 0..self.groups {
            let event = if rng.random_bool(self.event_chance) {
                self.draw_event(&scene, rng)
            } else {
                None
            };
            let at = rng.random_range(0..self.frames_per_group);
            let before = scene.clone();
            if let Some(event) = event {
                match event {
                    Event::Appear { colour, cell } => {
                        scene[cell] = Some(colour);
                        first_colour.get_or_insert(colour);
                    }
                    Event::Move { colour, to } => {
                        let from = scene.iter().position(|&c| c == Some(colour))?;
                        scene[from] = None;
                        scene[to] = Some(colour);
                        moves += 1;
                    }
                    Event::Turn { from, to } => {
                        let cell = scene.iter().position(|&c| c == Some(from))?;
                        scene[cell] = Some(to);
                    }
                }
            }
            scenes_per_frame.push(
                (0..self.frames_per_group)
                    .map(|f| {
                        if f < at {
                            before.clone()
                        } else {
                            scene.clone()
                        }
                    })
                    .collect(),
            );
            events.push(event.map(|e| (e, at)));
        }
        let first_colour = first_colour?;
        let present: Vec<(usize, usize)> = scene
            .iter()
            .enumerate()
            .filter_map(|(cell, c)| c.map(|c| (cell, c)))
            .collect();
        let kind = self.questions[rng.random_range(0..self.questions.len())];
        let (question, answer) = match kind {
            StreamQuestion::Moves => ("how many moves ?".to_string(), moves.to_string()),
            StreamQuestion::Where => {
                let &(cell, colour) = present.get(rng.random_range(0..present.len().max(1)))?;
                (
                    format!("where is the {} one ?", COLOURS[colour].0),
                    cell.to_string(),
                )
            }
            StreamQuestion::First => (
                "which appeared first ?".to_string(),
                COLOURS[first_colour].0.to_string(),
            ),
        };
        let observations: Vec<String> = events
            .iter()
            .map(|e| e.map_or(SKIP.to_string(), |(e, _)| e.describe()))
            .collect();
        let key = format!(
            "{}|{}|{question}",
            events
                .iter()
                .map(|e| e.map_or("-".into(), |(e, at)| format!("{e:?}@{at}")))
                .collect::<Vec<_>>()
                .join(","),
            self.groups
        );
        let groups = scenes_per_frame
            .iter()
            .map(|frames| frames.iter().map(|s| self.frame(s, rng)).collect())
            .collect();
        Some(StreamRecord {
            groups,
            observations,
            question,
            answer,
            key,
        })
    }

    /// One possible event in `scene`, chosen uniformly among the kinds that can happen.
    fn draw_event(&self, scene: &Scene, rng: &mut StdRng) -> Option<Event> {
        let free_cells: Vec<usize> = (0..scene.len()).filter(|&c| scene[c].is_none()).collect();
        let present: Vec<usize> = scene.iter().flatten().copied().collect();
        let free_colours: Vec<usize> = (0..COLOURS.len())
            .filter(|c| !present.contains(c))
            .collect();
        let pick = |v: &[usize], rng: &mut StdRng| v[rng.random_range(0..v.len())];
        let mut kinds = vec![];
        if present.len() < self.max_objects && !free_cells.is_empty() {
            kinds.push(0);
        }
        if !present.is_empty() && !free_cells.is_empty() {
            kinds.push(1);
        }
        if !present.is_empty() && !free_colours.is_empty() {
            kinds.push(2);
        }
        Some(match *kinds.get(rng.random_range(0..kinds.len().max(1)))? {
            0 => Event::Appear {
                colour: pick(&free_colours, rng),
                cell: pick(&free_cells, rng),
            },
            1 => Event::Move {
                colour: pick(&present, rng),
                to: pick(&free_cells, rng),
            },
            _ => Event::Turn {
                from: pick(&present, rng),
                to: pick(&free_colours, rng),
            },
        })
    }

    /// One frame of `scene`: features or a rendered image, with noise.
    fn frame(&self, scene: &Scene, rng: &mut StdRng) -> Vec<f32> {
        let noise = |v: f32| v + self.noise * (rng.random::<f32>() * 2.0 - 1.0);
        match self.frames {
            FrameKind::Features => {
                let cells = self.cells();
                let dim = COLOURS.len() + 1 + cells;
                let mut values = vec![0.0; cells * dim];
                for (cell, colour) in scene.iter().enumerate() {
                    values[cell * dim + colour.unwrap_or(COLOURS.len())] = 1.0;
                    values[cell * dim + COLOURS.len() + 1 + cell] = 1.0;
                }
                values.into_iter().map(noise).collect()
            }
            FrameKind::Images => {
                let mut image = Image::black(self.image_size);
                let side = self.image_size / self.grid;
                for (cell, colour) in scene.iter().enumerate() {
                    let Some(colour) = colour else { continue };
                    let (row, col) = (cell / self.grid, cell % self.grid);
                    for y in row * side + side / 4..(row + 1) * side - side / 4 {
                        for x in col * side + side / 4..(col + 1) * side - side / 4 {
                            image.set(x, y, COLOURS[*colour].1);
                        }
                    }
                }
                image.pixels.into_iter().map(noise).collect()
            }
        }
    }

    /// `count` records of stream `seed`, without any whose key is in `exclude`; fails when the
    /// task is too small to give that many.
    pub fn records(
        &self,
        seed: u64,
        count: usize,
        exclude: &HashSet<String>,
    ) -> Result<Vec<StreamRecord>> {
        let tries = 20 * count as u64 + 10_000;
        let records: Vec<StreamRecord> = (0..tries)
            .map(|index| self.record(seed, index))
            .filter(|record| !exclude.contains(&record.key))
            .take(count)
            .collect();
        if records.len() < count {
            bail!(
                "stream task: only {} of {count} streams found outside the earlier splits in {tries} \
                 draws; this task has too few distinct streams (more groups or cells)",
                records.len()
            );
        }
        Ok(records)
    }
}

// ---------------------------------------------------------------------------------------
// User data.

/// Reads a stream JSONL file, one stream per line:
/// `{"frames": [[frame, ...], ...], "observations": [...], "question": "...", "answer": "..."}`
/// with one list of frames per group and one observation per group (`<skip>` where nothing
/// happens). A frame is an image file (relative to the JSONL's folder) or a matrix of feature
/// vectors; every frame must match `format` and every group hold the same number of frames.
/// The first bad record is named (file, line, group, frame).
pub fn load_stream_jsonl(path: &Path, format: FrameFormat) -> Result<Vec<StreamRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut records = Vec::new();
    let mut frames_per_group = None;
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), number + 1);
        let record = parse_line(line, folder, format, &at)?;
        let counts: HashSet<usize> = record.groups.iter().map(Vec::len).collect();
        let per_group = *counts.iter().next().unwrap_or(&0);
        if counts.len() != 1 || per_group == 0 || frames_per_group.is_some_and(|n| n != per_group) {
            bail!(
                "{at}: frame groups of {:?} frames; every group of every stream must hold the same \
                 number of frames (at least 1){}",
                record.groups.iter().map(Vec::len).collect::<Vec<_>>(),
                frames_per_group.map_or(String::new(), |n| format!(" ({n} in earlier lines)"))
            );
        }
        frames_per_group = Some(per_group);
        records.push(record);
    }
    if records.is_empty() {
        bail!("{}: no streams", path.display());
    }
    Ok(records)
}

fn parse_line(line: &str, folder: &Path, format: FrameFormat, at: &str) -> Result<StreamRecord> {
    let value: Value = serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
    let field = |name: &str| {
        value.get(name).with_context(|| {
            format!("{at}: no \"{name}\" (a stream has frames, observations, question, answer)")
        })
    };
    let text = |name: &str| -> Result<String> {
        let v = field(name)?;
        let s = v
            .as_str()
            .with_context(|| format!("{at}: \"{name}\" must be a string"))?;
        if s.trim().is_empty() {
            bail!("{at}: \"{name}\" is empty");
        }
        Ok(s.to_string())
    };
    let groups_json = field("frames")?
        .as_array()
        .with_context(|| format!("{at}: \"frames\" must be a list of frame groups"))?;
    let observations: Vec<String> = field("observations")?
        .as_array()
        .with_context(|| format!("{at}: \"observations\" must be a list of strings"))?
        .iter()
        .map(|o| o.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .with_context(|| format!("{at}: \"observations\" must be a list of strings"))?;
    if groups_json.is_empty() {
        bail!("{at}: no frame groups");
    }
    if observations.len() != groups_json.len() {
        bail!(
            "{at}: {} observations for {} frame groups (one per group; \"{SKIP}\" where nothing happens)",
            observations.len(),
            groups_json.len()
        );
    }
    let mut groups = Vec::with_capacity(groups_json.len());
    for (g, group) in groups_json.iter().enumerate() {
        let frames = group
            .as_array()
            .with_context(|| format!("{at}: frame group {g} must be a list of frames"))?;
        let mut parsed = Vec::with_capacity(frames.len());
        for (f, frame) in frames.iter().enumerate() {
            let here = format!("{at}: group {g}, frame {f}");
            parsed.push(parse_frame(frame, folder, format, &here)?);
        }
        groups.push(parsed);
    }
    let (question, answer) = (text("question")?, text("answer")?);
    Ok(StreamRecord {
        key: line.to_string(),
        groups,
        observations,
        question,
        answer,
    })
}

fn parse_frame(frame: &Value, folder: &Path, format: FrameFormat, here: &str) -> Result<Vec<f32>> {
    match (frame, format) {
        (Value::String(file), FrameFormat::Images { size }) => {
            Ok(Image::read(&folder.join(file), size)
                .with_context(|| format!("{here}: bad image"))?
                .pixels)
        }
        (Value::Array(rows), FrameFormat::Features { tokens, dim }) => {
            let values: Vec<f32> = rows
                .iter()
                .map(|row| row.as_array())
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{here}: a feature frame is a list of {tokens} vectors"))?
                .into_iter()
                .flatten()
                .map(|v| v.as_f64().map(|v| v as f32))
                .collect::<Option<_>>()
                .with_context(|| format!("{here}: feature values must be numbers"))?;
            if rows.len() != tokens || values.len() != tokens * dim {
                bail!(
                    "{here}: {} vectors of {} values in all; this model takes {tokens} vectors of {dim}",
                    rows.len(),
                    values.len()
                );
            }
            if values.iter().any(|v| !v.is_finite()) {
                bail!("{here}: a feature value is not finite");
            }
            Ok(values)
        }
        (_, FrameFormat::Images { .. }) => {
            bail!("{here}: this run takes image frames (a file name per frame)")
        }
        (_, FrameFormat::Features { tokens, dim }) => {
            bail!("{here}: this run takes feature frames ({tokens} vectors of {dim} values)")
        }
    }
}

/// Writes streams as a JSONL file (images as PNGs beside it): `trainer data stream`, the
/// layout [`load_stream_jsonl`] reads.
pub fn write_stream_folder(
    records: &[StreamRecord],
    format: FrameFormat,
    out: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out.join("frames"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let mut lines = String::new();
    for (i, record) in records.iter().enumerate() {
        let mut groups = vec![];
        for (g, group) in record.groups.iter().enumerate() {
            let mut frames = vec![];
            for (f, values) in group.iter().enumerate() {
                frames.push(match format {
                    FrameFormat::Images { size } => {
                        let name = format!("frames/{i:05}-{g}-{f}.png");
                        Image {
                            size,
                            pixels: values.clone(),
                        }
                        .write_png(&out.join(&name))?;
                        json!(name)
                    }
                    FrameFormat::Features { dim, .. } => json!(values
                        .chunks(dim)
                        .map(|row| row.iter().map(|v| (v * 1e4).round() / 1e4).collect())
                        .collect::<Vec<Vec<f32>>>()),
                });
            }
            groups.push(frames);
        }
        let line = json!({
            "frames": groups,
            "observations": record.observations,
            "question": record.question,
            "answer": record.answer,
        });
        lines += &serde_json::to_string(&line)?;
        lines.push('\n');
    }
    let path = out.join("streams.jsonl");
    std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_seeded_and_observations_follow_the_scene() {
        let task = StreamTask::default();
        let a = task.record(3, 7);
        assert_eq!(a, task.record(3, 7));
        assert_ne!(a.key, task.record(3, 8).key);
        assert_eq!(a.groups.len(), task.groups);
        assert_eq!(a.observations.len(), task.groups);
        let FrameFormat::Features { tokens, dim } = task.format() else {
            unreachable!()
        };
        for group in &a.groups {
            assert_eq!(group.len(), task.frames_per_group);
            assert!(group.iter().all(|f| f.len() == tokens * dim));
        }
        // Replay the observations on an empty scene: the last frame must show that scene.
        let colour = |name: &str| COLOURS.iter().position(|c| c.0 == name).unwrap();
        let mut scene: Scene = vec![None; task.cells()];
        for (obs, group) in a.observations.iter().zip(&a.groups) {
            let words: Vec<&str> = obs.split(' ').collect();
            match words.as_slice() {
                [SKIP] => {}
                [c, "appears", "at", cell] => {
                    scene[cell.parse::<usize>().unwrap()] = Some(colour(c))
                }
                [c, "moves", "to", cell] => {
                    let from = scene.iter().position(|&x| x == Some(colour(c))).unwrap();
                    scene[from] = None;
                    scene[cell.parse::<usize>().unwrap()] = Some(colour(c));
                }
                [c, "turns", to] => {
                    let at = scene.iter().position(|&x| x == Some(colour(c))).unwrap();
                    scene[at] = Some(colour(to));
                }
                other => panic!("unexpected observation {other:?}"),
            }
            let last = group.last().unwrap();
            for (cell, expected) in scene.iter().enumerate() {
                let row = &last[cell * dim..cell * dim + COLOURS.len() + 1];
                let shown = (0..row.len())
                    .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                    .unwrap();
                assert_eq!(
                    shown,
                    expected.unwrap_or(COLOURS.len()),
                    "cell {cell} after {obs}"
                );
            }
        }
    }

    #[test]
    fn every_kind_of_question_is_asked_and_answered_from_the_stream() {
        let task = StreamTask::default();
        let records = task.records(1, 300, &HashSet::new()).unwrap();
        for prefix in ["how many moves", "where is the", "which appeared first"] {
            assert!(
                records.iter().any(|r| r.question.starts_with(prefix)),
                "{prefix}"
            );
        }
        for r in &records {
            if r.question.starts_with("how many moves") {
                let moves = r
                    .observations
                    .iter()
                    .filter(|o| o.contains("moves"))
                    .count();
                assert_eq!(r.answer, moves.to_string());
            }
            if r.question.starts_with("which appeared first") {
                let first = r
                    .observations
                    .iter()
                    .find(|o| o.contains("appears"))
                    .unwrap();
                assert!(first.starts_with(&r.answer));
            }
        }
        assert!(records
            .iter()
            .any(|r| r.observations.iter().any(|o| o == SKIP)));
    }

    #[test]
    fn held_out_streams_leave_out_training_keys_and_small_tasks_are_refused() {
        let task = StreamTask::default();
        let train = task.records(0, 200, &HashSet::new()).unwrap();
        let seen: HashSet<String> = train.iter().map(|r| r.key.clone()).collect();
        let test = task.records(9, 100, &seen).unwrap();
        assert!(test.iter().all(|r| !seen.contains(&r.key)));
        let tiny = StreamTask {
            groups: 2,
            grid: 1,
            max_objects: 1,
            frames_per_group: 1,
            ..StreamTask::default()
        };
        let every: HashSet<String> = tiny
            .records(0, 2000, &HashSet::new())
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        match tiny.records(1, 10, &every) {
            Ok(_) => panic!("a task with {} distinct streams gave 10 more", every.len()),
            Err(err) => assert!(
                err.to_string().contains("too few distinct streams"),
                "{err}"
            ),
        }
    }

    #[test]
    fn written_streams_read_back_and_bad_records_are_named() {
        let dir = std::env::temp_dir().join(format!("stream-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for kind in [FrameKind::Features, FrameKind::Images] {
            let task = StreamTask {
                frames: kind,
                noise: 0.0,
                ..StreamTask::default()
            };
            let records = task.records(0, 3, &HashSet::new()).unwrap();
            let path = write_stream_folder(&records, task.format(), &dir).unwrap();
            let back = load_stream_jsonl(&path, task.format()).unwrap();
            assert_eq!(back.len(), 3);
            for (a, b) in records.iter().zip(&back) {
                assert_eq!(a.observations, b.observations);
                assert_eq!(a.answer, b.answer);
                let diff = a
                    .groups
                    .iter()
                    .flatten()
                    .flatten()
                    .zip(b.groups.iter().flatten().flatten());
                assert!(diff.map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) < 0.01);
            }
        }
        let format = StreamTask::default().format();
        let bad = dir.join("bad.jsonl");
        let cases = [
            (
                r#"{"frames": [[[[1]]]], "observations": [], "question": "q", "answer": "a"}"#,
                "0 observations for 1 frame groups",
            ),
            (
                r#"{"frames": [[[[1, 2]]]], "observations": ["x"], "question": "q", "answer": "a"}"#,
                "group 0, frame 0: 1 vectors",
            ),
            (
                r#"{"frames": [["a.png"]], "observations": ["x"], "question": "q", "answer": "a"}"#,
                "takes feature frames",
            ),
            (
                r#"{"frames": [], "observations": [], "question": "q", "answer": "a"}"#,
                "no frame groups",
            ),
            (
                r#"{"observations": [], "question": "q", "answer": "a"}"#,
                "no \"frames\"",
            ),
        ];
        for (line, expected) in cases {
            std::fs::write(&bad, format!("{line}\n")).unwrap();
            let err = format!("{:#}", load_stream_jsonl(&bad, format).unwrap_err());
            assert!(
                err.contains("bad.jsonl:1") && err.contains(expected),
                "{err}"
            );
        }
        let image_err = format!("{:#}", {
            std::fs::write(&bad, r#"{"frames": [["missing.png"]], "observations": ["x"], "question": "q", "answer": "a"}"#).unwrap();
            load_stream_jsonl(&bad, FrameFormat::Images { size: 16 }).unwrap_err()
        });
        assert!(
            image_err.contains("group 0, frame 0: bad image") && image_err.contains("missing.png"),
            "{image_err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
