//! EmbedLens (EIT-NLP, CVPR 2026, arXiv 2603.00510): what visual tokens mean to the language
//! model they enter.
//!
//! 1. Each visual token (after the projector) is compared by cosine with every row of the
//!    language model's input embedding matrix; its `nearest` closest vocabulary ids are kept.
//! 2. Classes, by rules the user picks: **sink** (norm above `sink_norm_factor` times the
//!    median, or a nearest id among `sink_anchor_tokens`), **dead** (a nearest id among
//!    `dead_anchor_tokens`, or — `dead_if_nearest_unused` — every nearest id a vocabulary entry
//!    the training text never uses: junk to the model), else **alive**.
//! 3. Interventions on held-out questions: each class removed before layer 0; as a control, the
//!    same number of random alive tokens removed from each image; and every visual token
//!    injected at layer L instead of 0 (text keeps its positions).
//!
//! The hidrop recipe runs it at its end, and `trainer probe embedlens --run RUN` on a finished
//! hidrop run's full-token model ([`crate::hidrop::probe_run`]).

use crate::evaluate::Accuracy;
use crate::vision_lm::{correctness, Prepared, VisionLanguageModel, VisualSchedule, VqaBatch};
use anyhow::{Context, Result};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use trainer::config::{ensure_count, Validate};

fn yes() -> bool {
    true
}
fn three() -> usize {
    3
}
fn default_sink_norm_factor() -> f64 {
    3.0
}
fn default_inject_layers() -> Vec<usize> {
    vec![0, 2, 4]
}

/// `[probe]`: how visual tokens are classified and which injection layers are tried.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How many nearest vocabulary ids decide a token's class.
    #[serde(default = "three")]
    pub nearest: usize,
    /// Sink: norm above this many times the median norm (0: off).
    #[serde(default = "default_sink_norm_factor")]
    pub sink_norm_factor: f64,
    #[serde(default)]
    pub sink_anchor_tokens: Vec<String>,
    #[serde(default)]
    pub dead_anchor_tokens: Vec<String>,
    #[serde(default = "yes")]
    pub dead_if_nearest_unused: bool,
    #[serde(default = "default_inject_layers")]
    pub inject_layers: Vec<usize>,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            enabled: true,
            nearest: three(),
            sink_norm_factor: default_sink_norm_factor(),
            sink_anchor_tokens: vec![],
            dead_anchor_tokens: vec![],
            dead_if_nearest_unused: true,
            inject_layers: default_inject_layers(),
        }
    }
}

impl Validate for ProbeSection {
    fn validate(&self, prefix: &str) -> Result<()> {
        ensure_count(&format!("{prefix}.nearest"), self.nearest as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenClass {
    Sink,
    Dead,
    Alive,
}

impl TokenClass {
    fn name(self) -> &'static str {
        match self {
            Self::Sink => "sink",
            Self::Dead => "dead",
            Self::Alive => "alive",
        }
    }
}

/// The classification rules with token names resolved to ids.
pub struct Rules {
    pub nearest: usize,
    pub sink_norm_factor: f64,
    pub sink_ids: HashSet<usize>,
    pub dead_ids: HashSet<usize>,
    /// Vocabulary ids the training text uses (`None`: the unused-nearest rule is off).
    pub used_ids: Option<HashSet<usize>>,
}

/// The ids of the `n` rows of `embeddings` (`[vocab, dim]`) closest by cosine to `token`.
pub fn nearest_ids(token: &[f32], embeddings: &[f32], n: usize) -> Vec<usize> {
    let dim = token.len();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    let token_norm = norm(token);
    let mut scored: Vec<(f32, usize)> = embeddings
        .chunks(dim)
        .enumerate()
        .map(|(id, row)| {
            let dot: f32 = row.iter().zip(token).map(|(a, b)| a * b).sum();
            (dot / (norm(row) * token_norm), id)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(n).map(|(_, id)| id).collect()
}

/// Classes of `tokens` (`[count, dim]` flattened) against `embeddings` under `rules`; the
/// median norm is taken over all of `tokens`.
pub fn classify(tokens: &[f32], dim: usize, embeddings: &[f32], rules: &Rules) -> Vec<TokenClass> {
    let norms: Vec<f32> = tokens
        .chunks(dim)
        .map(|t| t.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0) as f64;
    tokens
        .chunks(dim)
        .zip(&norms)
        .map(|(token, &norm)| {
            let near = nearest_ids(token, embeddings, rules.nearest);
            let outlier =
                rules.sink_norm_factor > 0.0 && norm as f64 > rules.sink_norm_factor * median;
            if outlier || near.iter().any(|id| rules.sink_ids.contains(id)) {
                return TokenClass::Sink;
            }
            let unused = rules
                .used_ids
                .as_ref()
                .is_some_and(|used| near.iter().all(|id| !used.contains(id)));
            if unused || near.iter().any(|id| rules.dead_ids.contains(id)) {
                return TokenClass::Dead;
            }
            TokenClass::Alive
        })
        .collect()
}

/// One intervention's result.
#[derive(Debug, Clone, Serialize)]
pub struct Intervention {
    pub label: String,
    /// Share of visual tokens removed.
    pub removed: f64,
    pub accuracy: Accuracy,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub images: usize,
    /// Largest visual-token norm over the median one (what `sink_norm_factor` is compared with).
    pub max_norm_over_median: f64,
    pub tokens_per_image: usize,
    pub shares: Vec<(TokenClass, f64)>,
    pub rules: String,
    pub baseline: Accuracy,
    /// Per class: the class removed, and the control (as many random alive tokens removed).
    pub removals: Vec<(TokenClass, Intervention, Option<Intervention>)>,
    pub injections: Vec<(usize, Accuracy)>,
}

impl ProbeReport {
    pub fn table(&self) -> String {
        let mut table = format!(
            "## EmbedLens probe of the full-token model\n\n\
             {} held-out images, {} visual tokens each (largest norm {:.2} x the median). Classes: {}. \
             Removed tokens are taken out before layer 0; the control removes as many random alive \
             tokens from each image.\n\n\
             | visual tokens | share | accuracy with them removed (95% CI) | control: as many random alive removed |\n\
             | --- | --- | --- | --- |\n\
             | none removed | - | {} | - |\n",
            self.images,
            self.tokens_per_image,
            self.max_norm_over_median,
            self.rules,
            self.baseline.cell()
        );
        for (class, removed, control) in &self.removals {
            let share = self
                .shares
                .iter()
                .find(|(c, _)| c == class)
                .map_or(0.0, |s| s.1);
            let control = control.as_ref().map_or("-".to_string(), |c| {
                format!("{} ({:.1}% removed)", c.accuracy.cell(), 100.0 * c.removed)
            });
            table += &format!(
                "| {} | {:.1}% | {} | {control} |\n",
                class.name(),
                100.0 * share,
                removed.accuracy.cell()
            );
        }
        table += "\n| visual tokens injected at layer | test accuracy (95% CI) |\n| --- | --- |\n";
        for (layer, accuracy) in &self.injections {
            table += &format!("| {layer} | {} |\n", accuracy.cell());
        }
        table
    }
}

/// Runs the probe on `model` (trained with every visual token from layer 0) over the test
/// questions of `data`.
pub fn probe<B: Backend>(
    model: &VisionLanguageModel<B>,
    data: &Prepared,
    section: &ProbeSection,
    batch_size: usize,
) -> Result<ProbeReport> {
    let ids = |names: &[String], what: &str| -> Result<HashSet<usize>> {
        names
            .iter()
            .map(|name| {
                data.tokenizer
                    .token_id(name)
                    .map(|id| id as usize)
                    .with_context(|| {
                        format!("probe.{what}: `{name}` is not a token of the vocabulary")
                    })
            })
            .collect()
    };
    let used_ids = section.dead_if_nearest_unused.then(|| {
        data.train
            .iter()
            .flat_map(|e| e.before.iter().chain(&e.after).chain(&e.answer))
            .map(|&id| id as usize)
            .collect()
    });
    let rules = Rules {
        nearest: section.nearest,
        sink_norm_factor: section.sink_norm_factor,
        sink_ids: ids(&section.sink_anchor_tokens, "sink_anchor_tokens")?,
        dead_ids: ids(&section.dead_anchor_tokens, "dead_anchor_tokens")?,
        used_ids,
    };
    let patches = model.num_patches();
    let size = model.vision_tower.config.image_size;
    let dim = model.language_model.config.hidden_size;
    let embeddings = model.language_model.embedding_matrix();
    let mut tokens = Vec::with_capacity(data.test.len() * patches * dim);
    for chunk in data.test.chunks(batch_size.max(1)) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = VqaBatch::new(&refs, patches, size, data.pad_id, false, 0);
        let visual: Vec<f32> = model
            .visual_tokens(&batch)
            .into_data()
            .convert::<f32>()
            .to_vec()?;
        tokens.extend(visual);
    }
    let classes = classify(&tokens, dim, &embeddings, &rules);
    let mut norms: Vec<f64> = tokens
        .chunks(dim)
        .map(|t| t.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt())
        .collect();
    norms.sort_by(f64::total_cmp);
    let max_norm_over_median = norms.last().copied().unwrap_or(0.0)
        / norms
            .get(norms.len() / 2)
            .copied()
            .unwrap_or(1.0)
            .max(1e-12);
    let per_image: Vec<&[TokenClass]> = classes.chunks(patches).collect();
    let share = |class: TokenClass| {
        classes.iter().filter(|&&c| c == class).count() as f64 / classes.len().max(1) as f64
    };
    let full = VisualSchedule::full();
    let evaluate = |remove: &dyn Fn(usize) -> Vec<bool>| {
        let mut removed = 0usize;
        let correct = correctness(
            model,
            &data.test,
            &full,
            batch_size,
            data.pad_id,
            &mut |first, batch| {
                for (r, row) in batch.visual_valid.iter_mut().enumerate() {
                    let gone = remove(first + r);
                    removed += gone.iter().filter(|&&g| g).count();
                    for (valid, gone) in row.iter_mut().zip(gone) {
                        *valid = !gone;
                    }
                }
            },
        );
        (
            Accuracy::of(&correct),
            removed as f64 / (data.test.len() * patches).max(1) as f64,
        )
    };
    let (baseline, _) = evaluate(&|_| vec![false; patches]);
    let mut removals = Vec::new();
    for class in [TokenClass::Sink, TokenClass::Dead, TokenClass::Alive] {
        let (accuracy, removed) =
            evaluate(&|image| per_image[image].iter().map(|&c| c == class).collect());
        let removed_class = Intervention {
            label: format!("{} removed", class.name()),
            removed,
            accuracy,
        };
        let control = (class != TokenClass::Alive).then(|| {
            let (accuracy, removed) = evaluate(&|image| {
                let count = per_image[image].iter().filter(|&&c| c == class).count();
                let mut alive: Vec<usize> = (0..patches)
                    .filter(|&j| per_image[image][j] == TokenClass::Alive)
                    .collect();
                alive.shuffle(&mut StdRng::seed_from_u64(image as u64 ^ 0xE1B));
                let mut gone = vec![false; patches];
                for &j in alive.iter().take(count) {
                    gone[j] = true;
                }
                gone
            });
            Intervention {
                label: format!("as many random alive as {}", class.name()),
                removed,
                accuracy,
            }
        });
        removals.push((class, removed_class, control));
    }
    let layers = model.language_model.num_layers();
    let injections = section
        .inject_layers
        .iter()
        .filter(|&&layer| layer < layers)
        .map(|&layer| {
            let schedule = VisualSchedule::injected_at(layer);
            let correct = correctness(
                model,
                &data.test,
                &schedule,
                batch_size,
                data.pad_id,
                &mut |_, _| {},
            );
            (layer, Accuracy::of(&correct))
        })
        .collect();
    let mut rules_text = vec![format!(
        "the {} nearest vocabulary ids decide",
        section.nearest
    )];
    if section.sink_norm_factor > 0.0 {
        rules_text.push(format!(
            "sink = norm above {} x the median",
            section.sink_norm_factor
        ));
    }
    if !section.sink_anchor_tokens.is_empty() {
        rules_text.push(format!("sink = near {:?}", section.sink_anchor_tokens));
    }
    if !section.dead_anchor_tokens.is_empty() {
        rules_text.push(format!("dead = near {:?}", section.dead_anchor_tokens));
    }
    if section.dead_if_nearest_unused {
        rules_text.push("dead = every nearest id unused by the training text".into());
    }
    Ok(ProbeReport {
        images: data.test.len(),
        max_norm_over_median,
        tokens_per_image: patches,
        shares: [TokenClass::Sink, TokenClass::Dead, TokenClass::Alive]
            .into_iter()
            .map(|c| (c, share(c)))
            .collect(),
        rules: rules_text.join("; "),
        baseline,
        removals,
        injections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_classed_by_norm_anchors_and_unused_neighbours() {
        // Vocabulary of 4 ids in 2-d: 0 along x, 1 along y, 2 along -x, 3 along -y.
        let embeddings = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
        let tokens = [
            1.0, 0.1, // near 0: alive
            0.1, 1.0, // near 1: alive
            -1.0, 0.1, // near 2: the dead anchor
            0.2, -1.0, // near 3: unused by the training text
            9.0, 9.5, // a norm far above the median: sink
            1.0, -0.05, // near 0 then 3: alive (one nearest id is used)
        ];
        let rules = Rules {
            nearest: 1,
            sink_norm_factor: 3.0,
            sink_ids: HashSet::new(),
            dead_ids: HashSet::from([2]),
            used_ids: Some(HashSet::from([0, 1, 2])),
        };
        use TokenClass::*;
        assert_eq!(
            classify(&tokens, 2, &embeddings, &rules),
            vec![Alive, Alive, Dead, Dead, Sink, Alive]
        );
        // With two nearest ids, the last token's second neighbour (3) is unused but its
        // first (0) is used: still alive. An anchor among the nearest makes a sink.
        let rules = Rules {
            nearest: 2,
            sink_ids: HashSet::from([1]),
            sink_norm_factor: 0.0,
            ..rules
        };
        let classes = classify(&tokens, 2, &embeddings, &rules);
        assert_eq!(classes[5], Alive);
        assert_eq!(classes[1], Sink);
        assert_eq!(nearest_ids(&[0.0, 2.0], &embeddings, 2)[0], 1);
    }
}
