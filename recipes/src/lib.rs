//! Recipes: each one a file that reads like its paper's algorithm, built on the engine in
//! `trainer`. Default configs live in `recipes/configs/<recipe>/`, each starting with the
//! command that runs it.

pub mod common;
pub mod onpolicy_sft;
pub mod sft;
pub mod skipgpt;
pub mod verify;

use anyhow::{bail, Result};
use common::RunSection;
use std::path::{Path, PathBuf};
use trainer::backend::DeviceSpec;
use trainer::config::load_config;
use trainer::distributed::{self, Cluster, Peer};
use trainer::train::Resume;
use trainer::with_backend;

/// How `trainer recipe` was called.
pub struct RecipeArgs {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub resume: Resume,
    /// `--overwrite`: move an earlier run in the run folder aside and start over.
    pub overwrite: bool,
    /// `--stage`: run one stage of a multi-stage recipe.
    pub stage: Option<String>,
    /// `--devices`: one data-parallel peer per device (empty: the config's one device).
    pub devices: Vec<String>,
    /// `--orchestrator --node-rank --num-nodes --node-address`: this node's place in a run
    /// over several machines.
    pub cluster: Option<Cluster>,
}

impl RecipeArgs {
    fn is_data_parallel(&self) -> bool {
        self.devices.len() > 1 || self.cluster.is_some()
    }
}

/// One line of `trainer recipes`, and how to run it.
pub struct RecipeInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub default_config: &'static str,
    pub run: fn(&RecipeArgs) -> Result<()>,
}

/// Every recipe this build can run.
pub const ALL: &[RecipeInfo] = &[
    RecipeInfo {
        name: "onpolicy-sft",
        summary: "shorter chains of thought: SFT on the model's own correct samples that finish inside a length cap",
        default_config: "recipes/configs/onpolicy-sft/tiny.toml",
        run: run_onpolicy_sft,
    },
    RecipeInfo {
        name: "skipgpt",
        summary: "token routers that skip attention and MLP per token (router stage, then LoRA); real skipping at inference",
        default_config: "recipes/configs/skipgpt/tiny.toml",
        run: run_skipgpt,
    },
    RecipeInfo {
        name: "sft",
        summary: "supervised fine-tuning on prompt/response or chat records (full or LoRA)",
        default_config: "recipes/configs/sft/tiny.toml",
        run: run_sft,
    },
];

pub fn find(name: &str) -> Result<&'static RecipeInfo> {
    ALL.iter().find(|r| r.name == name).ok_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|r| r.name).collect();
        anyhow::anyhow!("unknown recipe `{name}` (available: {})", names.join(", "))
    })
}

fn no_stages(args: &RecipeArgs, recipe: &str) -> Result<()> {
    match &args.stage {
        Some(stage) => bail!("recipe {recipe} has no stages (got --stage {stage})"),
        None => Ok(()),
    }
}

fn run_sft(args: &RecipeArgs) -> Result<()> {
    no_stages(args, "sft")?;
    let (config, resolved): (sft::SftConfig, _) = load_config(&args.config, &args.overrides)?;
    run_on_each_device(args, &config.run, |run, device| {
        let config = sft::SftConfig {
            run,
            ..config.clone()
        };
        with_backend!(device, |B, device| sft::run::<burn::backend::Autodiff<B>>(
            config,
            &resolved,
            &args.resume,
            device
        ))
    })
}

/// Runs `work` once on the config's device, or, data-parallel, once per device of
/// `--devices` on threads that are this node's peers of one run. `work` gets the config's
/// `[run]` with its device set, and that device, checked to be usable.
fn run_on_each_device(
    args: &RecipeArgs,
    run: &RunSection,
    work: impl Fn(RunSection, DeviceSpec) -> Result<()> + Sync,
) -> Result<()> {
    let devices = if args.devices.is_empty() {
        vec![run.device.clone()]
    } else {
        args.devices.clone()
    };
    let specs = devices
        .iter()
        .map(|d| DeviceSpec::parse(d))
        .collect::<Result<Vec<_>>>()?;
    if specs
        .iter()
        .any(|s| std::mem::discriminant(s) != std::mem::discriminant(&specs[0]))
    {
        // Peers of different backends would join different collectives and wait forever.
        bail!(
            "--devices {} mixes CPU and GPU devices: a run uses one kind",
            devices.join(",")
        );
    }
    for spec in &specs {
        spec.ensure_available()?;
    }
    // The leading node owns the run folder for the whole run (other nodes only read it, or
    // write their own peers/N).
    let leads = args.cluster.as_ref().is_none_or(|c| c.node_rank == 0);
    let _lock = match leads {
        true => Some(trainer::run_dir::claim(
            &run.dir,
            &args.resume,
            args.overwrite,
        )?),
        false => None,
    };
    let work = |index: usize| {
        let run = RunSection {
            device: devices[index].clone(),
            ..run.clone()
        };
        work(run, specs[index])
    };
    if !args.is_data_parallel() {
        return work(0);
    }
    std::thread::scope(|scope| {
        let peers: Vec<_> = (0..devices.len())
            .map(|local_rank| {
                let peer = Peer::new(local_rank, devices.len(), args.cluster.as_ref());
                let rank = peer.rank();
                let work = &work;
                std::thread::Builder::new()
                    .name(format!("peer-{local_rank}"))
                    // Backward passes recurse through the graph: give peers the main thread's room.
                    .stack_size(64 << 20)
                    .spawn_scoped(scope, move || {
                        let outcome = distributed::run_as(peer, || {
                            let outcome = work(local_rank);
                            if outcome.is_ok() {
                                distributed::leave();
                            }
                            outcome
                        });
                        if let Err(error) = &outcome {
                            // The other peers would wait for this one forever: end the run.
                            eprintln!("error: data-parallel peer {rank}: {error:#}");
                            std::process::exit(1);
                        }
                        outcome
                    })
            })
            .collect::<std::io::Result<_>>()?;
        for (rank, peer) in peers.into_iter().enumerate() {
            peer.join()
                .map_err(|_| anyhow::anyhow!("data-parallel peer {rank} panicked"))??;
        }
        Ok(())
    })
}

fn run_onpolicy_sft(args: &RecipeArgs) -> Result<()> {
    no_stages(args, "onpolicy-sft")?;
    let (config, resolved): (onpolicy_sft::OnPolicyConfig, _) =
        load_config(&args.config, &args.overrides)?;
    run_on_each_device(args, &config.run, |run, device| {
        let config = onpolicy_sft::OnPolicyConfig {
            run,
            ..config.clone()
        };
        with_backend!(device, |B, device| onpolicy_sft::run::<
            burn::backend::Autodiff<B>,
        >(
            config,
            &resolved,
            &args.resume,
            device
        ))
    })
}

fn run_skipgpt(args: &RecipeArgs) -> Result<()> {
    let (mut config, resolved): (skipgpt::SkipGptConfig, _) =
        load_config(&args.config, &args.overrides)?;
    if let Some(stage) = &args.stage {
        config.stages = vec![skipgpt::Stage::parse(stage)?];
    }
    run_on_each_device(args, &config.run, |run, device| {
        let config = skipgpt::SkipGptConfig {
            run,
            ..config.clone()
        };
        with_backend!(
            device,
            |B, device| skipgpt::run::<burn::backend::Autodiff<B>>(config, &resolved, device)
        )
    })
}

/// The default config path of a recipe, relative to the repository root.
pub fn default_config(info: &RecipeInfo) -> &Path {
    Path::new(info.default_config)
}
