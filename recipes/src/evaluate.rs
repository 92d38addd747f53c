//! Generation and scoring shared by recipes and `trainer eval`: responses to prompts with
//! reference answers, judged by a verifier; their accuracy and lengths.

use crate::verify::{Judged, Verifier};
use anyhow::Result;
use burn::prelude::*;
use datasets::TextTokenizer;
use serde::Serialize;
use std::time::Instant;
use trainer::distributed::current_peer;
use trainer::generate::{generate, GenerationConfig};
use trainer::progress::Progress;
use trainer::CausalLm;

/// A prompt with its tokens and reference answer.
#[derive(Debug, Clone)]
pub struct TaskItem {
    pub prompt: String,
    pub tokens: Vec<u32>,
    pub answer: String,
}

/// Generates one response per entry of `prompts` (in batches) and scores it. A response that
/// hit the cap scores 0 whatever it says.
pub fn sample_and_score<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    verifier: &dyn Verifier,
    prompts: &[&TaskItem],
    generation: &GenerationConfig,
    batch_size: usize,
    progress_label: Option<&str>,
) -> Result<Sampled> {
    let start = Instant::now();
    let chunks = prompts.len().div_ceil(batch_size.max(1)) as u64;
    // Data-parallel peers evaluating side by side: the leader's bar stands for all.
    let progress = progress_label.map(|label| match current_peer().is_leader() {
        true => Progress::new(label, chunks, 0, 1),
        false => Progress::silent(label, chunks),
    });
    let mut out = Sampled {
        tokens: vec![],
        scores: vec![],
        verifier_scores: vec![],
        finished: vec![],
        seconds: 0.0,
    };
    for (chunk_index, chunk) in prompts.chunks(batch_size.max(1)).enumerate() {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|item| item.tokens.clone()).collect();
        let config = GenerationConfig {
            seed: generation.seed.wrapping_add(chunk_index as u64 * 7919),
            ..generation.clone()
        };
        let generated = generate(model, &inputs, &config)?;
        let texts: Vec<String> = generated
            .tokens
            .iter()
            .map(|t| tokenizer.decode(t, true))
            .collect::<Result<_>>()?;
        let judged: Vec<Judged> = chunk
            .iter()
            .zip(&texts)
            .map(|(item, text)| Judged {
                prompt: &item.prompt,
                response: text,
                answer: &item.answer,
            })
            .collect();
        let scores = verifier.score(&judged)?;
        for ((tokens, stopped), score) in generated
            .tokens
            .into_iter()
            .zip(generated.stopped)
            .zip(scores)
        {
            out.scores.push(final_score(score, stopped));
            out.verifier_scores.push(score);
            out.finished.push(stopped);
            out.tokens.push(tokens);
        }
        if let Some(progress) = &progress {
            let accuracy = mean(out.scores.iter().map(|&s| s as f64));
            progress.update(chunk_index as u64 + 1, &[("accuracy", accuracy)]);
        }
    }
    if let Some(progress) = &progress {
        progress.finish();
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

/// Samples, scores and lengths of responses to `prompts`.
pub struct Sampled {
    pub tokens: Vec<Vec<u32>>,
    /// The verifier's scores, 0 for responses cut by the cap ([`final_score`]).
    pub scores: Vec<f32>,
    /// The verifier's scores as it gave them.
    pub verifier_scores: Vec<f32>,
    /// Whether each response ended by itself (not cut by `max_new_tokens`).
    pub finished: Vec<bool>,
    pub seconds: f64,
}

/// A response cut by the length cap has no final answer: it scores 0, whatever the
/// verifier found in the unfinished text.
pub fn final_score(verifier_score: f32, finished: bool) -> f32 {
    if finished {
        verifier_score
    } else {
        0.0
    }
}

/// The value at quantile `p` (nearest rank).
pub fn percentile(values: &[usize], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    sum / count.max(1) as f64
}

/// A 95% Wilson score interval for a share of `successes` out of `n` (sound near 0 and 1
/// and for small `n`, where the normal approximation is not).
pub fn wilson_interval(successes: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, z) = (n as f64, 1.959_963_984_540_054);
    let share = successes / n;
    let centre = (share + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (share * (1.0 - share) / n + z * z / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Accuracy on held-out items with its 95% Wilson interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub interval_95: (f64, f64),
}

impl Accuracy {
    pub fn of(correct: &[bool]) -> Self {
        let hits = correct.iter().filter(|&&c| c).count();
        Self {
            correct: hits,
            total: correct.len(),
            accuracy: hits as f64 / correct.len().max(1) as f64,
            interval_95: wilson_interval(hits as f64, correct.len()),
        }
    }

    /// `83.0% [79.1, 86.4]`
    pub fn cell(&self) -> String {
        format!(
            "{:.1}% [{:.1}, {:.1}]",
            100.0 * self.accuracy,
            100.0 * self.interval_95.0,
            100.0 * self.interval_95.1
        )
    }
}

/// A 95% percentile-bootstrap interval for the perplexity of records given as (summed NLL,
/// token count): records are resampled (tokens within a record are not independent), with a
/// fixed seed so the interval is reproducible.
pub fn perplexity_interval(records: &[(f64, usize)], resamples: usize, seed: u64) -> (f64, f64) {
    let (low, high) = bootstrap_mean_interval(records, resamples, seed);
    (low.exp(), high.exp())
}

/// A 95% paired-bootstrap interval for the perplexity ratio of two models scored on the same
/// records, each given as (summed NLL, token count) in the same order: the records are resampled
/// together, so what both models find hard cancels out (much narrower than comparing the two
/// perplexities' own intervals).
pub fn perplexity_ratio_interval(
    a: &[(f64, usize)],
    b: &[(f64, usize)],
    resamples: usize,
    seed: u64,
) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "paired records");
    let differences: Vec<(f64, usize)> = a
        .iter()
        .zip(b)
        .map(|(&(nll_a, count), &(nll_b, _))| (nll_a - nll_b, count))
        .collect();
    let (low, high) = bootstrap_mean_interval(&differences, resamples, seed);
    (low.exp(), high.exp())
}

/// A 95% percentile-bootstrap interval for `sum of values / sum of counts` over records given
/// as (value, count), resampling records with a fixed seed.
pub fn bootstrap_mean_interval(
    records: &[(f64, usize)],
    resamples: usize,
    seed: u64,
) -> (f64, f64) {
    use rand::{Rng, SeedableRng};
    if records.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let (mut total, mut count) = (0.0, 0usize);
            for _ in 0..records.len() {
                let (value, n) = records[rng.random_range(0..records.len())];
                total += value;
                count += n;
            }
            total / count.max(1) as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64) as usize).min(resamples - 1)];
    (at(0.025), at(0.975))
}

/// What `trainer eval` measures on a data file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub records: usize,
    /// Target tokens the loss is averaged over (responses, assistant turns, or all text).
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub perplexity_95: (f64, f64),
    /// With a verifier: greedy responses to records that have a reference answer.
    pub generation: Option<GenerationReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationReport {
    pub verifier: String,
    pub prompts: usize,
    pub accuracy: f64,
    pub accuracy_95: (f64, f64),
    pub mean_length: f64,
    pub p90_length: f64,
    /// Responses cut by `max_new_tokens`.
    pub truncated_share: f64,
}

impl EvalReport {
    /// One Markdown table.
    pub fn table(&self) -> String {
        let interval =
            |(low, high): (f64, f64), digits: usize| format!("[{low:.digits$}, {high:.digits$}]");
        let mut rows = vec![
            ("records".to_string(), self.records.to_string()),
            ("target tokens".to_string(), self.tokens.to_string()),
            ("loss (nats/token)".to_string(), format!("{:.4}", self.loss)),
            (
                "perplexity (95% CI)".to_string(),
                format!("{:.3} {}", self.perplexity, interval(self.perplexity_95, 3)),
            ),
        ];
        if let Some(g) = &self.generation {
            rows.push((
                format!("accuracy, {} (95% CI, {} prompts)", g.verifier, g.prompts),
                format!(
                    "{:.1}% {}",
                    100.0 * g.accuracy,
                    interval((100.0 * g.accuracy_95.0, 100.0 * g.accuracy_95.1), 1)
                ),
            ));
            rows.push((
                "mean length (tokens)".to_string(),
                format!("{:.1}", g.mean_length),
            ));
            rows.push((
                "p90 length (tokens)".to_string(),
                format!("{:.0}", g.p90_length),
            ));
            rows.push((
                "cut by max_new_tokens".to_string(),
                format!("{:.1}%", 100.0 * g.truncated_share),
            ));
        }
        let mut table = format!(
            "# {} on {}\n\n| measure | value |\n| --- | --- |\n",
            self.model, self.data
        );
        for (name, value) in rows {
            table += &format!("| {name} | {value} |\n");
        }
        table
    }
}

/// How to evaluate: the data, its template and field names, and generation settings.
pub struct EvalSettings<'a> {
    pub data: &'a std::path::Path,
    pub fields: &'a datasets::records::FieldMap,
    pub template: datasets::Template,
    /// Longer records are cut (their end is not scored).
    pub max_length: usize,
    pub batch_size: usize,
    pub verifier: Option<(&'a str, &'a dyn Verifier)>,
    pub max_new_tokens: usize,
}

/// Loss and perplexity of `model` on the records of `settings.data`, and with a verifier the
/// accuracy and lengths of its greedy responses to the records' prompts.
pub fn evaluate_records<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    model_name: &str,
    settings: &EvalSettings,
) -> Result<EvalReport> {
    use datasets::examples::tokenize_record;
    let records = datasets::records::load_records(settings.data, settings.fields)?;
    let rows = records
        .iter()
        .map(|record| tokenize_record(tokenizer, settings.template, record, settings.max_length))
        .collect::<Result<Vec<_>>>()?;
    let batches = crate::common::batches_in_order(&rows, settings.batch_size, tokenizer.pad_id());
    let losses = trainer::train::row_losses(model, &batches);
    let nll: f64 = losses.iter().map(|(sum, _)| sum).sum();
    let tokens: usize = losses.iter().map(|(_, count)| count).sum();
    anyhow::ensure!(
        tokens > 0,
        "{}: no token to score (max_length {} leaves no response token)",
        settings.data.display(),
        settings.max_length
    );
    let loss = nll / tokens as f64;

    let generation = match settings.verifier {
        None => None,
        Some((name, verifier)) => {
            let items = task_items(&records, tokenizer, settings.template)?;
            anyhow::ensure!(
                !items.is_empty(),
                "{}: no record has a reference answer to verify (prompt/response or a chat ending in an assistant turn)",
                settings.data.display()
            );
            Some(greedy_accuracy(
                model,
                tokenizer,
                &items,
                (name, verifier),
                settings.max_new_tokens,
                settings.batch_size,
            )?)
        }
    };
    Ok(EvalReport {
        model: model_name.to_string(),
        data: settings.data.display().to_string(),
        records: records.len(),
        tokens,
        loss,
        perplexity: loss.exp(),
        perplexity_95: perplexity_interval(&losses, 1000, 0),
        generation,
    })
}

/// The records that carry a reference answer, as prompts (in `template`) with the answer to
/// check: a prompt/response record, or a chat ending in an assistant turn.
pub fn task_items(
    records: &[datasets::records::Record],
    tokenizer: &TextTokenizer,
    template: datasets::Template,
) -> Result<Vec<TaskItem>> {
    use datasets::records::Record;
    let mut items = Vec::new();
    for record in records {
        let (prompt, tokens, reference) = match record {
            Record::PromptResponse { prompt, response } => (
                prompt.clone(),
                datasets::examples::prompt_tokens(tokenizer, template, prompt)?,
                response,
            ),
            Record::Chat { messages } if messages.last().is_some_and(|m| m.role == "assistant") => {
                let asked = &messages[..messages.len() - 1];
                let text = tokenizer.apply_chat_template(asked, true)?;
                (
                    text.clone(),
                    tokenizer.encode(&text, false)?,
                    &messages[messages.len() - 1].content,
                )
            }
            _ => continue,
        };
        // The reference's final answer when it states one, else all of it.
        let answer =
            crate::verify::final_answer(reference).unwrap_or_else(|| reference.trim().to_string());
        items.push(TaskItem {
            prompt,
            tokens,
            answer,
        });
    }
    Ok(items)
}

/// Greedy responses of `model` to `items`, judged by the named verifier: accuracy (95%
/// interval) and lengths.
pub fn greedy_accuracy<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    items: &[TaskItem],
    (name, verifier): (&str, &dyn Verifier),
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<GenerationReport> {
    let mut stop_tokens = model.config.eos_token_ids.clone();
    stop_tokens.extend(tokenizer.stop_ids());
    let generation = GenerationConfig {
        max_new_tokens,
        sampling: trainer::sampling::SamplingParams::greedy(),
        seed: 0,
        stop_tokens,
        pad_id: tokenizer.pad_id(),
    };
    let prompts: Vec<&TaskItem> = items.iter().collect();
    let sampled = sample_and_score(
        model,
        tokenizer,
        verifier,
        &prompts,
        &generation,
        batch_size,
        None,
    )?;
    let lengths: Vec<usize> = sampled.tokens.iter().map(Vec::len).collect();
    // As the verifier judged them: a cut response may still state its answer (the cut share
    // is reported beside).
    let correct: f64 = sampled.verifier_scores.iter().map(|&s| s as f64).sum();
    Ok(GenerationReport {
        verifier: name.to_string(),
        prompts: items.len(),
        accuracy: correct / items.len().max(1) as f64,
        accuracy_95: wilson_interval(correct, items.len()),
        mean_length: mean(lengths.iter().map(|&l| l as f64)),
        p90_length: percentile(&lengths, 0.9),
        truncated_share: mean(sampled.finished.iter().map(|&f| (!f) as u8 as f64)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_known_values() {
        // 8 of 10: the textbook Wilson interval is [0.490, 0.943].
        let (low, high) = wilson_interval(8.0, 10);
        assert!(
            (low - 0.4902).abs() < 1e-3 && (high - 0.9433).abs() < 1e-3,
            "{low} {high}"
        );
        let (low, high) = wilson_interval(0.0, 20);
        assert_eq!(low, 0.0);
        assert!(high > 0.1 && high < 0.2);
    }

    #[test]
    fn perplexity_interval_holds_the_estimate_and_narrows_with_data() {
        let records: Vec<(f64, usize)> = (0..40).map(|i| (1.0 + (i % 5) as f64, 2)).collect();
        let point = (records.iter().map(|r| r.0).sum::<f64>() / 80.0).exp();
        let (low, high) = perplexity_interval(&records, 1000, 0);
        assert!(low < point && point < high, "{low} {point} {high}");
        let more: Vec<(f64, usize)> = records.iter().cycle().take(400).copied().collect();
        let (low2, high2) = perplexity_interval(&more, 1000, 0);
        assert!(high2 - low2 < (high - low) / 2.0);
    }

    /// Model b is model a plus a small, steady loss on every record, while the records
    /// themselves differ a lot: the paired interval of the ratio holds the true ratio and is
    /// tight, where the two models' own intervals overlap.
    #[test]
    fn paired_ratio_interval_sees_a_steady_difference_the_separate_intervals_miss() {
        let a: Vec<(f64, usize)> = (0..50).map(|i| (10.0 + (i % 7) as f64 * 8.0, 10)).collect();
        let b: Vec<(f64, usize)> = a.iter().map(|&(nll, n)| (nll + 0.5, n)).collect();
        let ratio = (0.5f64 / 10.0).exp();
        let (low, high) = perplexity_ratio_interval(&b, &a, 1000, 0);
        assert!(low <= ratio && ratio <= high, "{low} {ratio} {high}");
        assert!(
            high - low < 1e-9,
            "a constant difference leaves no spread: {low} {high}"
        );
        let (a_low, a_high) = perplexity_interval(&a, 1000, 0);
        let (b_low, _) = perplexity_interval(&b, 1000, 0);
        assert!(
            b_low < a_high && a_low < b_low,
            "the separate intervals overlap"
        );
        // Differences that vary: a real interval around the ratio, above 1.
        let c: Vec<(f64, usize)> = a
            .iter()
            .enumerate()
            .map(|(i, &(nll, n))| (nll + 0.2 + (i % 3) as f64 * 0.3, n))
            .collect();
        let (low, high) = perplexity_ratio_interval(&c, &a, 1000, 0);
        assert!(1.0 < low && low < high, "{low} {high}");
    }
}
