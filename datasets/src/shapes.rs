//! Visual question answering: a built-in seeded task (rendered shapes) and a loader for user
//! data (image files + a JSONL of questions).
//!
//! The built-in task draws 1 to `max_objects` shapes (square, circle, triangle, cross) in
//! five colours and two sizes into distinct cells of a grid on a black canvas, with a little
//! pixel noise, and asks one question with a one- or two-word answer: the colour of a shape,
//! the shape of a colour, how many shapes, whether one is big or small, or which quadrant it
//! is in. Questions are only asked where the answer is unique.
//!
//! A record's prompt holds one `<image>` placeholder where the image's visual tokens go.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Where a record's image goes in its prompt.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// An RGB image, values in [0, 1], channel-major (`[3, size, size]` flattened).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub size: usize,
    pub pixels: Vec<f32>,
}

impl Image {
    pub fn black(size: usize) -> Self {
        Self {
            size,
            pixels: vec![0.0; 3 * size * size],
        }
    }

    pub(crate) fn set(&mut self, x: usize, y: usize, rgb: [f32; 3]) {
        let plane = self.size * self.size;
        for (c, value) in rgb.into_iter().enumerate() {
            self.pixels[c * plane + y * self.size + x] = value;
        }
    }

    /// Reads a PNG (or any format the `image` crate decodes), which must be `size` x `size`.
    pub fn read(path: &Path, size: usize) -> Result<Self> {
        let decoded = image::open(path)
            .with_context(|| format!("cannot read image {}", path.display()))?
            .to_rgb8();
        let (width, height) = decoded.dimensions();
        if (width as usize, height as usize) != (size, size) {
            bail!(
                "image {} is {width}x{height}; this model takes {size}x{size} images",
                path.display()
            );
        }
        let plane = size * size;
        let mut pixels = vec![0.0; 3 * plane];
        for (x, y, pixel) in decoded.enumerate_pixels() {
            for c in 0..3 {
                pixels[c * plane + y as usize * size + x as usize] = pixel[c] as f32 / 255.0;
            }
        }
        Ok(Self { size, pixels })
    }

    pub fn write_png(&self, path: &Path) -> Result<()> {
        let plane = self.size * self.size;
        let side = self.size as u32;
        let buffer = image::RgbImage::from_fn(side, side, |x, y| {
            let at = y as usize * self.size + x as usize;
            image::Rgb(std::array::from_fn(|c| {
                (self.pixels[c * plane + at].clamp(0.0, 1.0) * 255.0).round() as u8
            }))
        });
        buffer
            .save(path)
            .with_context(|| format!("cannot write image {}", path.display()))
    }
}

/// One question about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaRecord {
    pub image: Image,
    /// Holds exactly one [`IMAGE_PLACEHOLDER`].
    pub prompt: String,
    pub answer: String,
    /// What identifies the question (layout and question): held-out sets drop any record whose
    /// key is in the training set.
    pub key: String,
}

// ---------------------------------------------------------------------------------------
// The built-in task.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    Square,
    Circle,
    Triangle,
    Cross,
}

const SHAPES: [Shape; 4] = [Shape::Square, Shape::Circle, Shape::Triangle, Shape::Cross];
pub(crate) const COLOURS: [(&str, [f32; 3]); 5] = [
    ("red", [0.9, 0.1, 0.1]),
    ("green", [0.1, 0.8, 0.2]),
    ("blue", [0.15, 0.3, 0.95]),
    ("yellow", [0.95, 0.9, 0.1]),
    ("white", [0.95, 0.95, 0.95]),
];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Square => "square",
            Self::Circle => "circle",
            Self::Triangle => "triangle",
            Self::Cross => "cross",
        }
    }

    /// Whether the point `(u, v)`, in [-1, 1] across the shape's box, is inside.
    fn covers(self, u: f32, v: f32) -> bool {
        match self {
            Self::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
            Self::Circle => u * u + v * v <= 0.85,
            // Apex at the top, base at the bottom.
            Self::Triangle => (-0.9..=0.9).contains(&v) && u.abs() <= (v + 0.9) / 1.8 * 0.95,
            Self::Cross => (u.abs() <= 0.3 || v.abs() <= 0.3) && u.abs() <= 0.95 && v.abs() <= 0.95,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Object {
    shape: Shape,
    colour: usize,
    big: bool,
    cell: (usize, usize),
}

/// The built-in task's shape: canvas side in pixels, grid cells per side, most objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapesTask {
    pub image_size: usize,
    pub grid: usize,
    pub max_objects: usize,
    /// Uniform pixel noise amplitude.
    #[serde(default = "default_noise")]
    pub noise: f32,
    /// Which kinds of question are asked (default: all five).
    #[serde(default = "Question::all")]
    pub questions: Vec<Question>,
}

/// The kinds of question the built-in task asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Question {
    /// `what colour is the circle?` (a shape drawn once)
    Colour,
    /// `what shape is red?` (a colour drawn once)
    Shape,
    /// `how many shapes are there?`
    Count,
    /// `is the circle big or small?`
    Size,
    /// `where is the circle?` (top left, top right, bottom left, bottom right)
    Where,
}

impl Question {
    pub fn all() -> Vec<Self> {
        vec![
            Self::Colour,
            Self::Shape,
            Self::Count,
            Self::Size,
            Self::Where,
        ]
    }
}

fn default_noise() -> f32 {
    0.05
}

impl Default for ShapesTask {
    fn default() -> Self {
        Self {
            image_size: 32,
            grid: 4,
            max_objects: 3,
            noise: default_noise(),
            questions: Question::all(),
        }
    }
}

impl ShapesTask {
    pub fn validate(&self) -> Result<()> {
        if self.grid == 0 || self.image_size < 4 * self.grid {
            bail!(
                "shapes task: image_size {} is too small for a {}x{} grid (at least 4 pixels a cell)",
                self.image_size,
                self.grid,
                self.grid
            );
        }
        if self.questions.is_empty() {
            bail!("shapes task: `questions` names no kind of question");
        }
        if self.max_objects == 0 || self.max_objects > self.grid * self.grid {
            bail!(
                "shapes task: max_objects must be between 1 and the number of cells ({})",
                self.grid * self.grid
            );
        }
        Ok(())
    }

    /// Record `index` of the stream `seed` (the same pair always gives the same record).
    pub fn record(&self, seed: u64, index: u64) -> VqaRecord {
        let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        // A layout where none of the asked kinds of question has a unique answer is drawn again.
        let (objects, (question, answer)) = loop {
            let objects = self.layout(&mut rng);
            if let Some(asked) = self.question(&objects, &mut rng) {
                break (objects, asked);
            }
        };
        let image = self.render(&objects, &mut rng);
        let mut layout: Vec<String> = objects
            .iter()
            .map(|o| format!("{:?}{}{}{:?}", o.shape, o.colour, o.big, o.cell))
            .collect();
        layout.sort();
        VqaRecord {
            image,
            prompt: format!("{IMAGE_PLACEHOLDER}\nquestion: {question}\nanswer:"),
            answer: format!(" {answer}"),
            key: format!("{}|{question}", layout.join(",")),
        }
    }

    fn layout(&self, rng: &mut StdRng) -> Vec<Object> {
        let count = rng.random_range(1..=self.max_objects);
        let mut cells: Vec<(usize, usize)> = (0..self.grid)
            .flat_map(|r| (0..self.grid).map(move |c| (r, c)))
            .collect();
        (0..count)
            .map(|_| Object {
                cell: cells.swap_remove(rng.random_range(0..cells.len())),
                shape: SHAPES[rng.random_range(0..SHAPES.len())],
                colour: rng.random_range(0..COLOURS.len()),
                big: rng.random_bool(0.5),
            })
            .collect()
    }

    /// `count` records of stream `seed`, without any whose key is in `exclude`.
    /// Fails when the task is too small to give that many outside `exclude` (held-out sets
    /// of a task with few distinct questions).
    pub fn records(
        &self,
        seed: u64,
        count: usize,
        exclude: &HashSet<String>,
    ) -> Result<Vec<VqaRecord>> {
        let tries = 20 * count as u64 + 10_000;
        let records: Vec<VqaRecord> = (0..tries)
            .map(|index| self.record(seed, index))
            .filter(|record| !exclude.contains(&record.key))
            .take(count)
            .collect();
        if records.len() < count {
            bail!(
                "shapes task: only {} of {count} questions found outside the earlier splits in {tries} \
                 draws; this task has too few distinct questions (more grid cells or objects, or fewer questions)",
                records.len()
            );
        }
        Ok(records)
    }

    fn render(&self, objects: &[Object], rng: &mut StdRng) -> Image {
        let mut image = Image::black(self.image_size);
        let cell = self.image_size as f32 / self.grid as f32;
        for object in objects {
            let scale = if object.big { 1.0 } else { 0.6 };
            let (row, col) = object.cell;
            let (cx, cy) = ((col as f32 + 0.5) * cell, (row as f32 + 0.5) * cell);
            let half = cell / 2.0 * scale;
            for y in 0..self.image_size {
                for x in 0..self.image_size {
                    let u = (x as f32 + 0.5 - cx) / half;
                    // Image rows grow downwards; v grows upwards.
                    let v = (cy - (y as f32 + 0.5)) / half;
                    if u.abs() <= 1.0 && v.abs() <= 1.0 && object.shape.covers(u, -v) {
                        image.set(x, y, COLOURS[object.colour].1);
                    }
                }
            }
        }
        for value in &mut image.pixels {
            *value = (*value + rng.random_range(-self.noise..=self.noise)).clamp(0.0, 1.0);
        }
        image
    }

    /// A question of an asked kind with a unique answer about `objects`, if there is one.
    fn question(&self, objects: &[Object], rng: &mut StdRng) -> Option<(String, String)> {
        let unique = |same: &dyn Fn(&Object, &Object) -> bool| -> Vec<Object> {
            objects
                .iter()
                .filter(|o| objects.iter().filter(|p| same(o, p)).count() == 1)
                .copied()
                .collect()
        };
        let unique_shape = unique(&|a, b| a.shape == b.shape);
        let unique_colour = unique(&|a, b| a.colour == b.colour);
        let possible: Vec<Question> = self
            .questions
            .iter()
            .copied()
            .filter(|kind| match kind {
                Question::Count => true,
                Question::Shape => !unique_colour.is_empty(),
                _ => !unique_shape.is_empty(),
            })
            .collect();
        if possible.is_empty() {
            return None;
        }
        let kind = possible[rng.random_range(0..possible.len())];
        let pick = |from: &[Object], rng: &mut StdRng| from[rng.random_range(0..from.len())];
        Some(match kind {
            Question::Colour => {
                let o = pick(&unique_shape, rng);
                (
                    format!("what colour is the {}?", o.shape.name()),
                    COLOURS[o.colour].0.into(),
                )
            }
            Question::Shape => {
                let o = pick(&unique_colour, rng);
                (
                    format!("what shape is {}?", COLOURS[o.colour].0),
                    o.shape.name().into(),
                )
            }
            Question::Count => (
                "how many shapes are there?".into(),
                objects.len().to_string(),
            ),
            Question::Size => {
                let o = pick(&unique_shape, rng);
                let size = if o.big { "big" } else { "small" };
                (
                    format!("is the {} big or small?", o.shape.name()),
                    size.into(),
                )
            }
            Question::Where => {
                let o = pick(&unique_shape, rng);
                let half = self.grid / 2;
                let vertical = if o.cell.0 < half { "top" } else { "bottom" };
                let horizontal = if o.cell.1 < half { "left" } else { "right" };
                (
                    format!("where is the {}?", o.shape.name()),
                    format!("{vertical} {horizontal}"),
                )
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// User data: a JSONL of questions beside the image files.

/// One line of a VQA JSONL file. `image` is relative to the JSONL file's folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaLine {
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Several images: refused (one image per question), named so the error can say so.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    pub prompt: String,
    pub answer: String,
}

/// Reads a VQA JSONL file: `{"image": "a.png", "prompt": "<image>\n...", "answer": "..."}`
/// per line. Every image must be `image_size` square and every prompt hold exactly one
/// placeholder; the first bad record is named in the error.
pub fn load_vqa_jsonl(path: &Path, image_size: usize) -> Result<Vec<VqaRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), number + 1);
        let parsed: VqaLine = serde_json::from_str(line).with_context(|| {
            format!("{at}: not a VQA record ({{\"image\", \"prompt\", \"answer\"}})")
        })?;
        let mut images: Vec<PathBuf> = parsed.image.into_iter().collect();
        images.extend(parsed.images);
        let placeholders = parsed.prompt.matches(IMAGE_PLACEHOLDER).count();
        if placeholders == 0 {
            bail!("{at}: the prompt has no {IMAGE_PLACEHOLDER} placeholder for its image");
        }
        if placeholders > images.len() {
            bail!(
                "{at}: the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholders but the record names {} image(s)",
                images.len()
            );
        }
        if images.len() != 1 || placeholders != 1 {
            bail!(
                "{at}: {} images and {placeholders} placeholders; the vision recipes take one image per question",
                images.len()
            );
        }
        if parsed.answer.trim().is_empty() {
            bail!("{at}: the answer is empty");
        }
        let image = Image::read(&folder.join(&images[0]), image_size)
            .with_context(|| format!("{at}: bad image"))?;
        records.push(VqaRecord {
            image,
            key: format!("{}|{}", images[0].display(), parsed.prompt),
            prompt: parsed.prompt,
            answer: parsed.answer,
        });
    }
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(records)
}

/// Writes records as a folder of PNGs and `questions.jsonl` (the layout
/// [`load_vqa_jsonl`] reads): `trainer data shapes`.
pub fn write_vqa_folder(records: &[VqaRecord], out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out.join("images"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let mut lines = String::new();
    for (i, record) in records.iter().enumerate() {
        let name = PathBuf::from("images").join(format!("{i:05}.png"));
        record.image.write_png(&out.join(&name))?;
        let line = VqaLine {
            image: Some(name),
            images: vec![],
            prompt: record.prompt.clone(),
            answer: record.answer.clone(),
        };
        lines += &serde_json::to_string(&line)?;
        lines.push('\n');
    }
    let path = out.join("questions.jsonl");
    std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_seeded_and_answers_name_what_is_drawn() {
        let task = ShapesTask::default();
        let a = task.record(7, 3);
        assert_eq!(a, task.record(7, 3));
        assert_ne!(a.key, task.record(7, 4).key);
        assert_eq!(a.prompt.matches(IMAGE_PLACEHOLDER).count(), 1);
        assert_eq!(a.image.pixels.len(), 3 * 32 * 32);
        let mut kinds = HashSet::new();
        for index in 0..200 {
            let record = task.record(1, index);
            let question = record.prompt.split("question: ").nth(1).unwrap();
            kinds.insert(question.split(' ').take(2).collect::<Vec<_>>().join(" "));
            if question.starts_with("how many") {
                let count: usize = record.answer.trim().parse().unwrap();
                assert!((1..=3).contains(&count));
            }
        }
        assert_eq!(kinds.len(), 5, "every kind of question is asked: {kinds:?}");
    }

    #[test]
    fn a_single_big_square_is_drawn_in_its_cell() {
        let task = ShapesTask {
            noise: 0.0,
            ..ShapesTask::default()
        };
        let object = Object {
            shape: Shape::Square,
            colour: 0,
            big: true,
            cell: (0, 3),
        };
        let image = task.render(&[object], &mut StdRng::seed_from_u64(0));
        let red = |x: usize, y: usize| image.pixels[y * 32 + x];
        assert!(red(28, 4) > 0.5, "inside the top-right cell");
        assert_eq!(red(4, 4), 0.0, "the top-left cell is empty");
        assert_eq!(red(28, 28), 0.0, "the bottom-right cell is empty");
    }

    #[test]
    fn a_single_kind_of_question_is_always_found() {
        let task = ShapesTask {
            questions: vec![Question::Colour],
            ..ShapesTask::default()
        };
        for index in 0..300 {
            assert!(task.record(2, index).prompt.contains("what colour is the"));
        }
    }

    #[test]
    fn excluded_keys_are_left_out() {
        let task = ShapesTask::default();
        let first = task.records(5, 10, &HashSet::new()).unwrap();
        let exclude: HashSet<String> = first.iter().take(4).map(|r| r.key.clone()).collect();
        let rest = task.records(5, 6, &exclude).unwrap();
        assert!(rest.iter().all(|r| !exclude.contains(&r.key)));
        assert_eq!(rest[0], first[4]);
        let tiny = ShapesTask {
            grid: 1,
            max_objects: 1,
            questions: vec![Question::Size],
            ..ShapesTask::default()
        };
        let all = tiny.records(0, 2000, &HashSet::new()).unwrap();
        let seen: HashSet<String> = all.iter().map(|r| r.key.clone()).collect();
        let error = tiny.records(1, 5, &seen).unwrap_err();
        assert!(
            error.to_string().contains("too few distinct questions"),
            "{error}"
        );
    }

    #[test]
    fn a_written_folder_reads_back_and_bad_records_are_named() {
        let dir = std::env::temp_dir().join(format!("shapes-vqa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let task = ShapesTask::default();
        let records = task.records(3, 4, &HashSet::new()).unwrap();
        let path = write_vqa_folder(&records, &dir).unwrap();
        let read = load_vqa_jsonl(&path, 32).unwrap();
        assert_eq!(read.len(), 4);
        for (a, b) in read.iter().zip(&records) {
            assert_eq!((&a.prompt, &a.answer), (&b.prompt, &b.answer));
            let worst = a
                .image
                .pixels
                .iter()
                .zip(&b.image.pixels)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst <= 0.5 / 255.0 + 1e-6, "8-bit rounding only: {worst}");
        }
        let error = load_vqa_jsonl(&path, 48).unwrap_err();
        assert!(
            format!("{error:#}").contains(":1: bad image")
                && format!("{error:#}").contains("32x32"),
            "{error:#}"
        );

        let bad = |line: &str| {
            let file = dir.join("bad.jsonl");
            let good = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                &file,
                format!("{}{line}\n", good.lines().next().unwrap().to_owned() + "\n"),
            )
            .unwrap();
            format!("{:#}", load_vqa_jsonl(&file, 32).unwrap_err())
        };
        let missing = bad(r#"{"image": "images/nope.png", "prompt": "<image> q", "answer": "a"}"#);
        assert!(
            missing.contains("bad.jsonl:2") && missing.contains("nope.png"),
            "{missing}"
        );
        let none = bad(r#"{"image": "images/00000.png", "prompt": "q", "answer": "a"}"#);
        assert!(
            none.contains("bad.jsonl:2") && none.contains("no <image> placeholder"),
            "{none}"
        );
        let more =
            bad(r#"{"image": "images/00000.png", "prompt": "<image><image> q", "answer": "a"}"#);
        assert!(
            more.contains("bad.jsonl:2") && more.contains("2 <image> placeholders"),
            "{more}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
