//! Supervised fine-tuning: next-token loss on response tokens of prompt/response or chat
//! records. On-policy SFT and the LoRA stage of SkipGPT reuse its pieces.

use crate::common::{batches_in_order, prepare_run_dir, row_sampler, ModelSection, RunSection};
use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use datasets::examples::{pack, tokenize_record};
use datasets::{EpochSampler, Template, TokenBatch, TokenRow};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use trainer::config::{ensure, key, Validate};
use trainer::leader_println;
use trainer::lora::LoraConfig;
use trainer::train::{evaluate_loss, Next, Resume, TrainConfig, Trainer};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainConfig,
    pub lora: Option<LoraConfig>,
}

impl Validate for SftConfig {
    fn validate(&self, _: &str) -> Result<()> {
        self.model.validate("model")?;
        self.data.validate("data")?;
        self.train.validate("train")?;
        match &self.lora {
            Some(lora) => lora.validate("lora"),
            None => Ok(()),
        }
    }
}

impl Validate for DataSection {
    fn validate(&self, prefix: &str) -> Result<()> {
        ensure(
            self.max_length >= 2,
            &key(prefix, "max_length"),
            self.max_length,
            "at least 2 (a token to predict from and one to predict)",
        )?;
        datasets::records::check_field_map(&self.fields)
    }
}

fn plain() -> Template {
    Template::Plain
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A .jsonl, .json, .csv or .parquet file of records.
    pub train: PathBuf,
    /// Held-out records; without it, `eval_count` records of `train` are held out.
    pub eval: Option<PathBuf>,
    #[serde(default)]
    pub eval_count: usize,
    #[serde(default = "plain")]
    pub template: Template,
    pub max_length: usize,
    /// Concatenate examples into rows of `max_length` tokens.
    #[serde(default)]
    pub packing: bool,
    /// The data's own field names for ours, e.g. `{prompt = "question", response = "answer"}`.
    #[serde(default)]
    pub fields: datasets::records::FieldMap,
}

/// What tokenization did to a data set's records: said at loading and kept in the run folder
/// (`data_report.json`), so that no record disappears without a count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataReport {
    /// The file, or the built-in set, the records came from.
    pub source: String,
    pub records: usize,
    /// Cut to `max_length` tokens (their end, usually part of the response, is not trained on).
    pub truncated: usize,
    /// Left out: no response token within `max_length`.
    pub dropped: usize,
}

impl DataReport {
    /// Cuts `rows` to `max_length` and leaves out those with nothing to train on, counting
    /// both, and says so.
    pub fn cut_and_count(
        source: &str,
        rows: impl IntoIterator<Item = TokenRow>,
        max_length: usize,
    ) -> (Vec<TokenRow>, Self) {
        let mut report = Self {
            source: source.to_string(),
            ..Self::default()
        };
        let mut kept = Vec::new();
        for mut row in rows {
            report.records += 1;
            report.truncated += row.truncate(max_length) as usize;
            if row.num_targets() == 0 {
                report.dropped += 1;
            } else {
                kept.push(row);
            }
        }
        leader_println!(
            "data: {source}: {} records, {} cut to max_length = {max_length}, {} dropped (no \
             response token within max_length)",
            report.records,
            report.truncated,
            report.dropped
        );
        (kept, report)
    }

    /// Writes `reports` to `dir/data_report.json` (the leading peer only).
    pub fn write_all(dir: &Path, reports: &[DataReport]) -> Result<()> {
        if !trainer::distributed::current_peer().is_leader() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        checkpoints::atomic::write_file(
            &dir.join("data_report.json"),
            &serde_json::to_vec_pretty(reports)?,
        )
    }
}

/// Tokenized records of a file (cut to `max_length`; rows with nothing to train on are left
/// out and counted).
fn tokenize_file(
    path: &std::path::Path,
    tokenizer: &datasets::TextTokenizer,
    data: &DataSection,
) -> Result<(Vec<TokenRow>, DataReport)> {
    let records = datasets::records::load_records(path, &data.fields)?;
    tokenize_records(&path.display().to_string(), &records, tokenizer, data)
}

/// Tokenized `records` (cut to `data.max_length`; rows with nothing to train on are left out
/// and counted under `source`).
pub fn tokenize_records(
    source: &str,
    records: &[datasets::records::Record],
    tokenizer: &datasets::TextTokenizer,
    data: &DataSection,
) -> Result<(Vec<TokenRow>, DataReport)> {
    let rows = records
        .iter()
        .map(|record| tokenize_record(tokenizer, data.template, record, usize::MAX))
        .collect::<Result<Vec<_>>>()?;
    Ok(DataReport::cut_and_count(source, rows, data.max_length))
}

pub fn run<B: AutodiffBackend>(
    config: SftConfig,
    resolved: &toml::Table,
    resume: &Resume,
    device: B::Device,
) -> Result<()> {
    let seed = config.run.seed;
    let loaded = config.model.load::<B>(&config.run, &device)?;
    let pad_id = loaded.tokenizer.pad_id();

    let (mut rows, train_report) =
        tokenize_file(&config.data.train, &loaded.tokenizer, &config.data)?;
    let mut reports = vec![train_report];
    let eval_rows = match &config.data.eval {
        Some(path) => {
            let (rows, report) = tokenize_file(path, &loaded.tokenizer, &config.data)?;
            reports.push(report);
            rows
        }
        None => rows.split_off(rows.len().saturating_sub(config.data.eval_count)),
    };
    if config.data.packing {
        rows = pack(&rows, config.data.max_length);
    }
    rows.retain(|row| row.num_targets() > 0);
    if rows.is_empty() {
        bail!(
            "{}: no record has response tokens within max_length",
            config.data.train.display()
        );
    }
    let eval_batches = batches_in_order(&eval_rows, config.train.batch_size, pad_id);

    prepare_run_dir(&config.run.dir, resolved, &loaded.tokenizer_dir)?;
    DataReport::write_all(&config.run.dir, &reports)?;
    let (mut trainer, saved) = Trainer::start(
        loaded.model,
        config.train.clone(),
        config.lora.clone(),
        seed,
        &config.run.dir,
        resume,
    )?;
    trainer.base_model = config.model.base_folder();
    let mut sampler = row_sampler(&saved, &rows, &trainer, seed)?;
    leader_println!(
        "sft: {} training rows, {} held out, {} steps of {} x {} sequences x {} peer(s)",
        rows.len(),
        eval_rows.len(),
        config.train.steps,
        config.train.grad_accum,
        config.train.batch_size,
        trainer.peer.world()
    );

    if train_on_rows(&mut trainer, &rows, &eval_batches, &mut sampler, pad_id)? == Next::Stop {
        return Ok(());
    }
    trainer.finish();
    trainer.export_latest(&config.run.dir.join("final"))
}

/// Plain SFT until the trainer's step budget is spent: shuffled micro-batches of `rows`,
/// evaluation on `eval_batches`, checkpoints holding the sampler's cursor.
pub fn train_on_rows<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    rows: &[TokenRow],
    eval_batches: &[TokenBatch],
    sampler: &mut EpochSampler,
    pad_id: u32,
) -> Result<Next> {
    while !trainer.is_done() {
        let micro_batches = trainer.next_micro_batches(sampler, rows, pad_id)?;
        let stats = trainer.train_step(&micro_batches)?;
        let mut scalars = stats.scalars();
        if trainer.should_evaluate() && !eval_batches.is_empty() {
            scalars.push((
                "eval_loss",
                evaluate_loss(&trainer.eval_model(), eval_batches),
            ));
        }
        trainer.log(&scalars)?;
        if trainer.end_of_step(|| json!({ "sampler": sampler.state }))? == Next::Stop {
            return Ok(Next::Stop);
        }
    }
    Ok(Next::Continue)
}
