//! Recipes: each one a file that reads like its paper's algorithm, built on the engine in
//! `trainer`. Default configs live in `recipes/configs/<recipe>/`, each starting with the
//! command that runs it.

pub mod common;
pub mod onpolicy_sft;
pub mod sft;
pub mod skipgpt;
pub mod verify;

use anyhow::Result;
use std::path::{Path, PathBuf};
use trainer::backend::DeviceSpec;
use trainer::config::load_config;
use trainer::train::Resume;
use trainer::with_backend;

/// How `trainer recipe` was called.
pub struct RecipeArgs {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub resume: Resume,
    /// `--stage`: run one stage of a multi-stage recipe.
    pub stage: Option<String>,
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
        Some(stage) => anyhow::bail!("recipe {recipe} has no stages (got --stage {stage})"),
        None => Ok(()),
    }
}

fn run_sft(args: &RecipeArgs) -> Result<()> {
    no_stages(args, "sft")?;
    let (config, resolved): (sft::SftConfig, _) = load_config(&args.config, &args.overrides)?;
    let device = DeviceSpec::parse(&config.run.device)?.ensure_available()?;
    with_backend!(device, |B, device| sft::run::<burn::backend::Autodiff<B>>(
        config,
        &resolved,
        &args.resume,
        device
    ))
}

fn run_onpolicy_sft(args: &RecipeArgs) -> Result<()> {
    no_stages(args, "onpolicy-sft")?;
    let (config, resolved): (onpolicy_sft::OnPolicyConfig, _) =
        load_config(&args.config, &args.overrides)?;
    let device = DeviceSpec::parse(&config.run.device)?.ensure_available()?;
    with_backend!(device, |B, device| onpolicy_sft::run::<
        burn::backend::Autodiff<B>,
    >(
        config,
        &resolved,
        &args.resume,
        device
    ))
}

fn run_skipgpt(args: &RecipeArgs) -> Result<()> {
    let (mut config, resolved): (skipgpt::SkipGptConfig, _) =
        load_config(&args.config, &args.overrides)?;
    if let Some(stage) = &args.stage {
        config.stages = vec![skipgpt::Stage::parse(stage)?];
    }
    let device = DeviceSpec::parse(&config.run.device)?.ensure_available()?;
    with_backend!(
        device,
        |B, device| skipgpt::run::<burn::backend::Autodiff<B>>(config, &resolved, device)
    )
}

/// The default config path of a recipe, relative to the repository root.
pub fn default_config(info: &RecipeInfo) -> &Path {
    Path::new(info.default_config)
}
