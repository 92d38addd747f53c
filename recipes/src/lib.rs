//! Recipes: each one a file that reads like its paper's algorithm, built on the engine in
//! `trainer`. Default configs live in `recipes/configs/<recipe>/`, each starting with the
//! command that runs it, and are compiled into the binary ([`builtin`]).

pub mod builtin;
pub mod common;
pub mod embedlens;
pub mod evaluate;
pub mod hidrop;
pub mod layer_dominance;
pub mod llm4tsf;
pub mod onpolicy_sft;
pub mod sft;
pub mod skipgpt;
pub mod stages;
pub mod stream_engine;
pub mod streaming;
pub mod tays;
pub mod verify;
pub mod vision_lm;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use common::RunSection;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use trainer::config::{checked, parse_config, Validate};
use trainer::distributed::Cluster;
use trainer::launch::{run_on_each_device, Launch};
use trainer::train::Resume;
use trainer::with_backend;

/// Where a run's config comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    File(PathBuf),
    /// A config compiled into the binary, by name (`sft/tiny`).
    Builtin(&'static str),
}

impl ConfigSource {
    /// `--config X`: the file X when there is one, else the built-in config called X;
    /// without `--config`, the recipe's default built-in config.
    pub fn choose(recipe: &RecipeInfo, config: Option<&Path>) -> Result<Self> {
        let Some(path) = config else {
            return Ok(Self::Builtin(recipe.default_config));
        };
        if path.is_file() {
            return Ok(Self::File(path.to_path_buf()));
        }
        match builtin::find_config(&path.to_string_lossy()) {
            Some(shipped) => Ok(Self::Builtin(builtin::config_name(shipped))),
            None => {
                let names: Vec<&str> = builtin::CONFIGS.iter().map(builtin::config_name).collect();
                bail!(
                    "no config file {} and no built-in config of that name (built-in: {})",
                    path.display(),
                    names.join(", ")
                )
            }
        }
    }

    /// The config with `overrides` applied and shipped paths resolved (see [`builtin`]),
    /// typed and checked, and its resolved table.
    pub fn load<C: RecipeConfig>(&self, overrides: &[String]) -> Result<(C, toml::Table)> {
        let (text, source) = match self {
            Self::File(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?,
                path.display().to_string(),
            ),
            Self::Builtin(name) => (
                builtin::config_text(name)?.to_string(),
                format!("built-in {name}"),
            ),
        };
        let mut table = parse_config(&text, &source, overrides)?;
        builtin::resolve_shipped_paths(&mut table)?;
        Ok((checked(&table, &source)?, table))
    }
}

/// How `trainer recipe` was called.
pub struct RecipeArgs {
    pub config: ConfigSource,
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

/// One line of `trainer recipes`, and how to run it.
pub struct RecipeInfo {
    pub name: &'static str,
    pub summary: &'static str,
    /// The built-in config run without `--config`.
    pub default_config: &'static str,
    pub run: fn(&RecipeArgs) -> Result<()>,
}

/// Every recipe this build can run.
pub const ALL: &[RecipeInfo] = &[
    RecipeInfo {
        name: "hidrop",
        summary: "vision-language training with visual tokens injected late, pruned across layers by a differentiable top-k and dropped at an early exit; full-token baseline, controls and the EmbedLens probe beside it",
        default_config: "hidrop/tiny",
        run: launch::<hidrop::HidropConfig>,
    },
    RecipeInfo {
        name: "layer-dominance",
        summary: "few-layer dominance: score each layer by how much it changes the representation, keep the top ones, fine-tune briefly, compare",
        default_config: "layer-dominance/tiny",
        run: launch::<layer_dominance::LayerDominanceConfig>,
    },
    RecipeInfo {
        name: "llm4tsf",
        summary: "forecasting through a language-model backbone, series aligned to its embeddings before it (pre) or not (post); DLinear and last-value baselines",
        default_config: "llm4tsf/tiny",
        run: launch::<llm4tsf::Llm4tsfConfig>,
    },
    RecipeInfo {
        name: "onpolicy-sft",
        summary: "shorter chains of thought: SFT on the model's own correct samples that finish inside a length cap",
        default_config: "onpolicy-sft/tiny",
        run: launch::<onpolicy_sft::OnPolicyConfig>,
    },
    RecipeInfo {
        name: "skipgpt",
        summary: "token routers that skip attention and MLP per token (router stage, then LoRA); real skipping at inference",
        default_config: "skipgpt/tiny",
        run: launch::<skipgpt::SkipGptConfig>,
    },
    RecipeInfo {
        name: "tays",
        summary: "think as you see: reasoning units written while video frames arrive (streaming mask, decoupled positions), against batch and interleaved baselines; stream-parallel inference with frame and text caches, and the four position schemes",
        default_config: "tays/tiny",
        run: launch::<tays::TaysConfig>,
    },
    RecipeInfo {
        name: "sft",
        summary: "supervised fine-tuning on prompt/response or chat records (full or LoRA)",
        default_config: "sft/tiny",
        run: launch::<sft::SftConfig>,
    },
];

pub fn find(name: &str) -> Result<&'static RecipeInfo> {
    ALL.iter().find(|r| r.name == name).ok_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|r| r.name).collect();
        anyhow::anyhow!("unknown recipe `{name}` (available: {})", names.join(", "))
    })
}

/// A recipe's config: its `[run]` table, its stages, and the run itself on any backend.
pub trait RecipeConfig: DeserializeOwned + Validate + Clone + Sync {
    /// The recipe's name, as `trainer recipe NAME` takes it.
    const NAME: &'static str;

    fn run_section(&mut self) -> &mut RunSection;

    /// Applies `--stage NAME`; recipes without stages refuse it.
    fn select_stage(&mut self, stage: &str) -> Result<()> {
        bail!("recipe {} has no stages (got --stage {stage})", Self::NAME)
    }

    /// The run on one device (one data-parallel peer).
    fn run<B: AutodiffBackend>(
        self,
        resolved: &toml::Table,
        resume: &Resume,
        device: B::Device,
    ) -> Result<()>;
}

/// Reads the recipe's config and runs it on each device of the call (see
/// [`run_on_each_device`]).
fn launch<C: RecipeConfig>(args: &RecipeArgs) -> Result<()> {
    let (mut config, resolved): (C, _) = args.config.load(&args.overrides)?;
    if let Some(stage) = &args.stage {
        config.select_stage(stage)?;
    }
    let run = config.run_section().clone();
    // `--devices` wins over the config's `run.device`, which may name several peers too.
    let config_devices = trainer::distributed::parse_devices(&run.device);
    let launch = Launch {
        devices: if args.devices.is_empty() {
            &config_devices
        } else {
            &args.devices
        },
        config_device: &run.device,
        cluster: args.cluster.as_ref(),
        run_dir: &run.dir,
        resume: &args.resume,
        overwrite: args.overwrite,
    };
    run_on_each_device(&launch, |device, spec| {
        let mut config = config.clone();
        config.run_section().device = device;
        with_backend!(spec, |B, device| config.run::<burn::backend::Autodiff<B>>(
            &resolved,
            &args.resume,
            device
        ))
    })
}

/// A recipe whose config has a `run` section and no stages, run by `module::run`.
macro_rules! single_stage_recipe {
    ($config:ty, $name:literal, $module:ident) => {
        impl RecipeConfig for $config {
            const NAME: &'static str = $name;

            fn run_section(&mut self) -> &mut RunSection {
                &mut self.run
            }

            fn run<B: AutodiffBackend>(
                self,
                resolved: &toml::Table,
                resume: &Resume,
                device: B::Device,
            ) -> Result<()> {
                $module::run::<B>(self, resolved, resume, device)
            }
        }
    };
}

single_stage_recipe!(sft::SftConfig, "sft", sft);
single_stage_recipe!(onpolicy_sft::OnPolicyConfig, "onpolicy-sft", onpolicy_sft);
single_stage_recipe!(llm4tsf::Llm4tsfConfig, "llm4tsf", llm4tsf);
single_stage_recipe!(hidrop::HidropConfig, "hidrop", hidrop);
single_stage_recipe!(tays::TaysConfig, "tays", tays);
single_stage_recipe!(
    layer_dominance::LayerDominanceConfig,
    "layer-dominance",
    layer_dominance
);

impl RecipeConfig for skipgpt::SkipGptConfig {
    const NAME: &'static str = "skipgpt";

    fn run_section(&mut self) -> &mut RunSection {
        &mut self.run
    }

    fn select_stage(&mut self, stage: &str) -> Result<()> {
        self.stages = vec![skipgpt::Stage::parse(stage)?];
        Ok(())
    }

    /// Stages resume by themselves (`--resume auto` lets a run folder be continued at all).
    fn run<B: AutodiffBackend>(
        self,
        resolved: &toml::Table,
        _resume: &Resume,
        device: B::Device,
    ) -> Result<()> {
        skipgpt::run::<B>(self, resolved, device)
    }
}
