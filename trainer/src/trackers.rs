//! Where a run's metrics go besides metrics.jsonl and the progress display: TensorBoard event
//! files (offline, `train.tensorboard`) and Weights & Biases (`[train.wandb]`). Both receive
//! each training step exactly once, under grouped names (`train/loss`, `eval/loss`,
//! `train/learning_rate`: see [`crate::metrics::tracker_name`]).

use crate::tensorboard::TensorBoardWriter;
use crate::wandb::{WandbConfig, WandbRun};
use anyhow::Result;
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Default)]
pub struct Trackers {
    tensorboard: Option<TensorBoardWriter>,
    wandb: Option<WandbRun>,
}

/// What a run hands its trackers at the start.
pub struct TrackerStart<'a> {
    pub run_dir: &'a Path,
    pub run_name: &'a str,
    pub resolved_config: &'a Value,
    /// The metrics lines already in metrics.jsonl: a resumed run's history up to its
    /// checkpoint, which trackers may lack (a crash, an outage).
    pub backlog: Vec<Map<String, Value>>,
    pub resuming: bool,
}

impl Trackers {
    pub fn start(
        tensorboard: bool,
        wandb: Option<&WandbConfig>,
        start: TrackerStart,
    ) -> Result<Self> {
        let tensorboard = match tensorboard {
            true => Some(TensorBoardWriter::create(start.run_dir, &start.backlog)?),
            false => None,
        };
        let wandb = match wandb {
            Some(config) => {
                let mut run = WandbRun::start(
                    config,
                    start.run_name,
                    start.resolved_config,
                    start.resuming,
                )?;
                // The server keeps what it already holds and takes the rest.
                for line in &start.backlog {
                    run.log(line);
                }
                Some(run)
            }
            None => None,
        };
        Ok(Self { tensorboard, wandb })
    }

    /// One metrics line (`step`, `time`, scalars). Never waits for the network.
    pub fn log(&mut self, line: &Map<String, Value>) -> Result<()> {
        if let Some(wandb) = &mut self.wandb {
            wandb.log(line);
        }
        if let Some(tensorboard) = &mut self.tensorboard {
            tensorboard.log(line)?;
        }
        Ok(())
    }

    /// Ends the W&B run with `summary` (the last metrics line) and says what reached it.
    pub fn finish(&mut self, summary: Map<String, Value>) {
        if let Some(wandb) = self.wandb.take() {
            let report = wandb.finish(summary, 0);
            println!(
                "wandb: sent {} history lines, {} unsent",
                report.sent_lines, report.unsent_lines
            );
            if report.already_sent > 0 {
                println!(
                    "wandb: {} lines were on the server from before the resume",
                    report.already_sent
                );
            }
        }
        if let Some(tensorboard) = &self.tensorboard {
            println!("tensorboard: {}", tensorboard.path.display());
        }
    }
}
