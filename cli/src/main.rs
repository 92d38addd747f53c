//! `trainer`: run recipes, generate text, and export checkpoints.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use datasets::synthetic::{task_pairs, Style, Task};
use datasets::{ChatMessage, TextTokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::backend::DeviceSpec;
use trainer::distributed::Cluster;
use trainer::export::export_checkpoint;
use trainer::generate::{generate_streaming, GenerationConfig};
use trainer::sampling::SamplingParams;
use trainer::train::Resume;
use trainer::{with_backend, CausalLm};

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Training and fine-tuning recipes on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the recipes, one line each.
    Recipes,
    /// Run a recipe: `trainer recipe sft --config recipes/configs/sft/tiny.toml`.
    Recipe(RecipeCommand),
    /// The configs built into the binary: `list`, `show NAME`, `cp NAME FILE`.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Write built-in synthetic data sets as JSONL.
    Data(DataArgs),
    /// Generate a continuation of a prompt with a Hugging Face model folder.
    Generate(GenerateArgs),
    /// Loss and perplexity of a model folder on a data file, and with a verifier the accuracy
    /// and length of its greedy answers: one table, and JSON.
    Eval(EvalArgs),
    /// Talk with a model folder through its chat template: one user turn a line on stdin,
    /// answers streamed as they are generated.
    Chat(ChatArgs),
    /// Draw the curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots/*.png.
    Plot { run_dir: PathBuf },
    /// Accuracy against response length of finished on-policy SFT runs (their summary.json):
    /// one table, and a plot with 95% intervals (the base model of the first run as a point).
    Compare {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The plot to write (the table goes beside it, as .md).
        #[arg(long)]
        out: PathBuf,
    },
    /// Probe a finished run. `embedlens`: what the visual tokens of a hidrop run's full-token
    /// model mean to its language model (sink, dead, alive), with removal and injection tests;
    /// writes RUN/embedlens.md.
    Probe {
        /// The probe: `embedlens`.
        probe: String,
        #[arg(long)]
        run: PathBuf,
        /// Override a key of the run's config (`--set probe.nearest=5`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer).
    Export(ExportArgs),
    /// Convert a GGUF file (llama.cpp) into a Hugging Face folder, dequantizing to `--dtype`.
    Import(ImportArgs),
    /// Serve Burn's global orchestrator for a run over several machines; each node then runs
    /// `trainer recipe ... --orchestrator HOST:PORT --node-rank R --num-nodes N --node-address ME:PORT`.
    Orchestrator {
        /// `[HOST:]PORT` to listen on (Burn listens on every interface at PORT).
        #[arg(long)]
        bind: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Name each built-in config and the command that runs it.
    List,
    /// Print a built-in config.
    Show { name: String },
    /// Copy a built-in config to FILE, to edit and run with `--config FILE`.
    Cp { name: String, file: PathBuf },
}

#[derive(clap::Args)]
struct ImportArgs {
    /// GGUF file to read (v2 or v3; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K tensors).
    #[arg(long)]
    gguf: PathBuf,
    /// Folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Stored precision: f32 (exact for every quant type), bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Records: .jsonl, .json, .csv or .parquet (see the README's data section).
    #[arg(long)]
    data: PathBuf,
    /// The data's name for one of our fields: `--field prompt=question` (repeatable).
    #[arg(long = "field", value_name = "OURS=THEIRS")]
    fields: Vec<String>,
    /// plain or chat (the tokenizer's chat template).
    #[arg(long, default_value = "plain")]
    template: String,
    /// Score greedy answers: `final-answer` (the last `#### x` or `\boxed{x}` against the
    /// reference's).
    #[arg(long, conflicts_with = "verifier_command")]
    verifier: Option<String>,
    /// Score greedy answers with a command (JSON lines in, one score a line out).
    #[arg(long)]
    verifier_command: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Records are cut to this many tokens (default the model's context).
    #[arg(long)]
    max_length: Option<usize>,
    /// Also write the numbers as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct ChatArgs {
    /// Hugging Face model folder with a chat template.
    #[arg(long)]
    model: PathBuf,
    /// A system prompt opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Default: generation_config.json's, else 256.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Default: generation_config.json's (greedy when it says do_sample = false), else 0.7.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Default: generation_config.json's, else 1.0.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print each prompt as the chat template renders it (to stderr).
    #[arg(long)]
    show_template: bool,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct RecipeCommand {
    /// Recipe name (see `trainer recipes`).
    name: String,
    /// TOML config file, or the name of a built-in one (`trainer config list`); default the
    /// recipe's built-in `RECIPE/tiny`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// `auto` (newest valid checkpoint of the run folder) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// Start over in a run folder that holds an earlier run: its contents are moved to a
    /// sibling folder RUN.old-N first (nothing is deleted).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// One stage of a multi-stage recipe (skipgpt: `router` or `lora`).
    #[arg(long)]
    stage: Option<String>,
    /// llm4tsf: `pre` or `post` alignment (the same as `--set alignment=...`).
    #[arg(long)]
    alignment: Option<String>,
    /// Data-parallel on this node's devices, one peer each: `cpu,cpu` or `cuda:0,cuda:1`.
    #[arg(long, value_name = "DEVICES")]
    devices: Option<String>,
    /// Several machines: `HOST:PORT` of `trainer orchestrator`.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["node_rank", "num_nodes", "node_address"])]
    orchestrator: Option<String>,
    /// This node's rank, 0 .. --num-nodes (node 0 writes checkpoints and logs).
    #[arg(long, requires = "orchestrator")]
    node_rank: Option<usize>,
    /// Nodes in the run; every node brings the same number of --devices.
    #[arg(long, requires = "orchestrator")]
    num_nodes: Option<usize>,
    /// `HOST:PORT` at which the other nodes reach this one (it listens on PORT).
    #[arg(long, value_name = "HOST:PORT", requires = "orchestrator")]
    node_address: Option<String>,
}

#[derive(clap::Args)]
struct DataArgs {
    /// Task: `arithmetic` (two-step word problems ending in `#### answer`),
    /// `arithmetic-chain` (five steps over two-digit numbers: the steps do work), `shapes`
    /// (visual questions about rendered shapes: OUT is a folder of PNGs and questions.jsonl),
    /// or `stream` (frame streams with observations and a question: OUT holds streams.jsonl,
    /// and frames/ with `--frames images`).
    task: String,
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// concise, verbose or direct (the answer alone)
    #[arg(long, default_value = "verbose")]
    style: String,
    /// `stream` only: frames as `features` (vectors in the JSONL) or `images` (PNG files).
    #[arg(long, default_value = "features")]
    frames: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Index of the first problem (disjoint ranges give disjoint sets).
    #[arg(long, default_value_t = 0)]
    first: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false, id = "source")]
struct ExportSource {
    /// Hugging Face model folder to read.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training checkpoint folder (`RUN/checkpoints/step-...`); LoRA is merged, and the
    /// adapter is also written in the PEFT layout to OUT/adapter.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    source: ExportSource,
    /// A PEFT LoRA adapter folder to merge into `--model` (written again to OUT/adapter).
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
    /// Keep only these layers of `--model`, in this order (`0,1,5`); config.json says the new
    /// depth.
    #[arg(
        long,
        requires = "model",
        conflicts_with = "adapter",
        value_delimiter = ','
    )]
    keep_layers: Option<Vec<usize>>,
    /// Folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Stored precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn main() {
    trainer::backend::keep_freed_memory();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Recipes => {
            for recipe in recipes::ALL {
                println!("{:<14} {}", recipe.name, recipe.summary);
            }
            Ok(())
        }
        Command::Recipe(args) => {
            let recipe = recipes::find(&args.name)?;
            let mut overrides = args.overrides;
            if let Some(alignment) = &args.alignment {
                if recipe.name != "llm4tsf" {
                    bail!("--alignment is for llm4tsf, not {}", recipe.name);
                }
                overrides.push(format!("alignment={alignment}"));
            }
            (recipe.run)(&recipes::RecipeArgs {
                config: recipes::ConfigSource::choose(recipe, args.config.as_deref())?,
                overrides,
                resume: Resume::parse(args.resume.as_deref()),
                overwrite: args.overwrite,
                stage: args.stage,
                devices: args
                    .devices
                    .as_deref()
                    .map(trainer::distributed::parse_devices)
                    .unwrap_or_default(),
                cluster: match (
                    args.orchestrator,
                    args.node_rank,
                    args.num_nodes,
                    args.node_address,
                ) {
                    (Some(orchestrator), Some(rank), Some(nodes), Some(address)) => {
                        Some(Cluster::new(&orchestrator, rank, nodes, &address)?)
                    }
                    _ => None,
                },
            })
        }
        Command::Config { action } => run_config(action),
        Command::Orchestrator { bind } => trainer::distributed::serve_orchestrator(&bind),
        Command::Data(args) if args.task == "shapes" => {
            trainer::config::ensure_count("--count", args.count)?;
            let task = datasets::shapes::ShapesTask::default();
            let records = task.records(args.seed, args.count as usize, &Default::default())?;
            let path = datasets::shapes::write_vqa_folder(&records, &args.out)?;
            println!("wrote {} questions to {}", records.len(), path.display());
            Ok(())
        }
        Command::Data(args) if args.task == "stream" => {
            use datasets::stream::{write_stream_folder, FrameKind, StreamTask};
            trainer::config::ensure_count("--count", args.count)?;
            let frames = match args.frames.as_str() {
                "features" => FrameKind::Features,
                "images" => FrameKind::Images,
                other => bail!("unknown --frames `{other}` (features or images)"),
            };
            let task = StreamTask {
                frames,
                ..StreamTask::default()
            };
            let records = task.records(args.seed, args.count as usize, &Default::default())?;
            let path = write_stream_folder(&records, task.format(), &args.out)?;
            println!(
                "wrote {} streams to {} (frames: {})",
                records.len(),
                path.display(),
                serde_json::to_string(&task.format())?
            );
            Ok(())
        }
        Command::Data(args) => {
            let Some(task) = Task::parse(&args.task) else {
                bail!(
                    "unknown task `{}` (available: arithmetic, arithmetic-chain, shapes, stream)",
                    args.task
                );
            };
            let style = match args.style.as_str() {
                "concise" => Style::Concise,
                "verbose" => Style::Verbose,
                "direct" => Style::Direct,
                other => bail!("unknown style `{other}` (concise, verbose or direct)"),
            };
            trainer::config::ensure_count("--count", args.count)?;
            let pairs = task_pairs(task, args.seed, args.first, args.count, style);
            datasets::records::write_jsonl(&args.out, &pairs)?;
            println!("wrote {} problems to {}", pairs.len(), args.out.display());
            Ok(())
        }
        Command::Probe {
            probe,
            run,
            overrides,
        } => match probe.as_str() {
            "embedlens" => {
                println!("{}", recipes::hidrop::probe_run(&run, &overrides)?);
                Ok(())
            }
            other => bail!("unknown probe `{other}` (available: embedlens)"),
        },
        Command::Generate(args) => run_generate(args),
        Command::Eval(args) => run_eval(args),
        Command::Chat(args) => run_chat(args),
        Command::Compare { runs, out } => run_compare(&runs, &out),
        Command::Plot { run_dir } => {
            for file in trainer::plot::plot_run(&run_dir)? {
                println!("{}", file.display());
            }
            Ok(())
        }
        Command::Export(args) => {
            let dtype = checkpoints::StoreDtype::parse(&args.dtype)?;
            match (args.source.model, args.source.checkpoint) {
                (Some(model_dir), _) if args.adapter.is_some() => {
                    let adapter = args.adapter.as_deref().expect("checked");
                    trainer::export::export_peft_adapter(&model_dir, adapter, &args.out, dtype)?
                }
                (Some(model_dir), _) => {
                    let mut model =
                        CausalLm::<trainer::Cpu>::load(&model_dir, &Default::default())?;
                    if let Some(keep) = &args.keep_layers {
                        model = model.retain_layers(keep)?;
                    }
                    model.save(&args.out, dtype, Some(&model_dir))?;
                }
                (None, Some(checkpoint)) => export_checkpoint(&checkpoint, &args.out, dtype)?,
                (None, None) => unreachable!("clap requires a source"),
            }
            println!("wrote {}", args.out.display());
            Ok(())
        }
        Command::Import(args) => {
            let dtype = checkpoints::StoreDtype::parse(&args.dtype)?;
            let summary = checkpoints::gguf::import::import_gguf(&args.gguf, &args.out, dtype)?;
            let types: Vec<String> = summary
                .tensor_types
                .iter()
                .map(|(name, count)| format!("{count} {name}"))
                .collect();
            println!(
                "imported {} ({}, {:.1}M parameters; tensors: {}) into {}",
                summary.model_name.as_deref().unwrap_or("model"),
                summary.architecture,
                summary.parameters as f64 / 1e6,
                types.join(", "),
                args.out.display()
            );
            Ok(())
        }
    }
}

fn run_config(action: ConfigAction) -> Result<()> {
    use recipes::builtin::{config_name, config_text, CONFIGS};
    match action {
        ConfigAction::List => {
            for config in CONFIGS {
                let name = config_name(config);
                let recipe = name.split('/').next().unwrap_or(name);
                println!("{name:<26} trainer recipe {recipe} --config {name}");
            }
        }
        ConfigAction::Show { name } => print!("{}", config_text(&name)?),
        ConfigAction::Cp { name, file } => {
            let text = config_text(&name)?;
            if file.exists() {
                bail!("{} exists already: not overwritten", file.display());
            }
            std::fs::write(&file, text)
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!(
                "wrote {} (run it with --config {})",
                file.display(),
                file.display()
            );
        }
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    use trainer::config::{ensure, ensure_non_negative, ensure_probability};
    ensure(
        args.max_new_tokens >= 1,
        "--max-new-tokens",
        args.max_new_tokens,
        "at least 1",
    )?;
    ensure_non_negative("--temperature", args.temperature as f64)?;
    ensure_probability("--top-p", args.top_p as f64)?;
    let device = DeviceSpec::parse(&args.device)?.ensure_available()?;
    let tokenizer = TextTokenizer::from_folder(&args.model)?;
    let text = if args.chat {
        tokenizer.apply_chat_template(&[ChatMessage::new("user", &args.prompt)], true)?
    } else {
        args.prompt.clone()
    };
    // Chat-rendered text already holds its special tokens.
    let prompt = tokenizer.encode(&text, !args.chat)?;
    with_backend!(device, |B, device| {
        let model = CausalLm::<B>::load(&args.model, &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let mut stop_tokens = model.config.eos_token_ids.clone();
        stop_tokens.extend(tokenizer.stop_ids());
        let room = trainer::generate::room_for_new_tokens(&model, std::slice::from_ref(&prompt))?;
        if args.max_new_tokens > room {
            eprintln!(
                "warning: --max-new-tokens {} is more than the model's context leaves after the \
                 prompt ({} of {} positions taken): generating at most {room}",
                args.max_new_tokens,
                prompt.len(),
                model.config.max_position_embeddings
            );
        }
        let config = GenerationConfig {
            max_new_tokens: args.max_new_tokens.min(room),
            sampling: SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
            },
            seed: args.seed,
            stop_tokens,
            pad_id: tokenizer.pad_id(),
        };
        let start = Instant::now();
        let (generated, printed) = stream_reply(&model, &tokenizer, prompt, &config)?;
        let seconds = start.elapsed().as_secs_f64();
        println!("{}", printed.rest);
        if generated.tokens[0].len() == room && !generated.stopped[0] {
            eprintln!(
                "[stopped at the model's context length, {} positions]",
                model.config.max_position_embeddings
            );
        }
        eprintln!(
            "[{} tokens in {seconds:.2}s, {:.1} tokens/s]",
            generated.num_tokens(),
            generated.num_tokens() as f64 / seconds
        );
    });
    Ok(())
}

/// What [`stream_reply`] printed, and the end of the text it held back (a byte-level token
/// can end mid-character: such text waits for the next token).
struct Printed {
    rest: String,
}

/// Generates a continuation of one prompt, printing each token's text as soon as it is
/// chosen (decoded with the tokens before it, since one character may span several
/// byte-level tokens).
fn stream_reply<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    tokenizer: &TextTokenizer,
    prompt: Vec<u32>,
    config: &GenerationConfig,
) -> Result<(trainer::generate::Generated, Printed)> {
    let mut tokens = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout();
    let generated = generate_streaming(model, &[prompt], config, |_, token| {
        tokens.push(token);
        if let Ok(text) = tokenizer.decode(&tokens, true) {
            if let Some(new) = text
                .strip_prefix(printed.as_str())
                .filter(|t| !t.contains('\u{fffd}'))
            {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
                printed = text;
            }
        }
    })?;
    let text = tokenizer.decode(&generated.tokens[0], true)?;
    let rest = text
        .strip_prefix(printed.as_str())
        .unwrap_or("")
        .to_string();
    Ok((generated, Printed { rest }))
}

fn run_eval(args: EvalArgs) -> Result<()> {
    use recipes::evaluate::{evaluate_records, EvalSettings};
    use recipes::verify::{Verifier, VerifierConfig};
    let template = match args.template.as_str() {
        "plain" => datasets::Template::Plain,
        "chat" => datasets::Template::Chat,
        other => bail!("--template {other}: expected plain or chat"),
    };
    let mut fields = datasets::records::FieldMap::new();
    for item in &args.fields {
        let (ours, theirs) = item
            .split_once('=')
            .with_context(|| format!("--field {item}: expected OURS=THEIRS"))?;
        fields.insert(ours.trim().to_string(), theirs.trim().to_string());
    }
    datasets::records::check_field_map(&fields)?;
    trainer::config::ensure_count("--batch-size", args.batch_size as u64)?;
    trainer::config::ensure_count("--max-new-tokens", args.max_new_tokens as u64)?;
    let verifier: Option<(String, Box<dyn Verifier>)> =
        match (&args.verifier, &args.verifier_command) {
            (Some(name), _) if name == "final-answer" => {
                Some((name.clone(), VerifierConfig::FinalAnswer.build()))
            }
            (Some(other), _) => {
                bail!("--verifier {other}: expected final-answer (or give --verifier-command)")
            }
            (None, Some(command)) => Some((
                format!("`{command}`"),
                VerifierConfig::Command {
                    command: command.clone(),
                }
                .build(),
            )),
            (None, None) => None,
        };
    let device = DeviceSpec::parse(&args.device)?.ensure_available()?;
    let tokenizer = TextTokenizer::from_folder(&args.model)?;
    with_backend!(device, |B, device| {
        let model = CausalLm::<B>::load(&args.model, &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let settings = EvalSettings {
            data: &args.data,
            fields: &fields,
            template,
            max_length: args
                .max_length
                .unwrap_or(model.config.max_position_embeddings),
            batch_size: args.batch_size,
            verifier: verifier
                .as_ref()
                .map(|(name, v)| (name.as_str(), v.as_ref())),
            max_new_tokens: args.max_new_tokens,
        };
        let report = evaluate_records(
            &model,
            &tokenizer,
            &args.model.display().to_string(),
            &settings,
        )?;
        println!("{}", report.table());
        let json = serde_json::to_string_pretty(&report)?;
        if let Some(path) = &args.json {
            std::fs::write(path, &json)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        println!("{json}");
    });
    Ok(())
}

fn run_chat(args: ChatArgs) -> Result<()> {
    use std::io::BufRead;
    let defaults = trainer::generate::GenerationDefaults::from_folder(&args.model)?;
    let temperature = args.temperature.or(defaults.temperature).unwrap_or(0.7);
    let top_p = args.top_p.or(defaults.top_p).unwrap_or(1.0);
    let max_new_tokens = args
        .max_new_tokens
        .or(defaults.max_new_tokens)
        .unwrap_or(256);
    trainer::config::ensure_non_negative("--temperature", temperature as f64)?;
    trainer::config::ensure_probability("--top-p", top_p as f64)?;
    trainer::config::ensure_count("--max-new-tokens", max_new_tokens as u64)?;
    let device = DeviceSpec::parse(&args.device)?.ensure_available()?;
    let tokenizer = TextTokenizer::from_folder(&args.model)?;
    let mut conversation: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|system| ChatMessage::new("system", system))
        .collect();
    // Fail before the first question when the folder has no chat template.
    tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .with_context(|| format!("{} cannot chat", args.model.display()))?;
    with_backend!(device, |B, device| {
        let model = CausalLm::<B>::load(&args.model, &device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let mut stop_tokens = model.config.eos_token_ids.clone();
        stop_tokens.extend(&defaults.eos_token_ids);
        stop_tokens.extend(tokenizer.stop_ids());
        eprintln!(
            "chat with {} (temperature {temperature}, top_p {top_p}, up to {max_new_tokens} tokens a turn); one message a line, end with Ctrl-D",
            args.model.display()
        );
        for (turn, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("cannot read stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            conversation.push(ChatMessage::new("user", line.trim()));
            let text = tokenizer.apply_chat_template(&conversation, true)?;
            if args.show_template {
                eprintln!("[prompt]\n{text}\n[/prompt]");
            }
            let prompt = tokenizer.encode(&text, false)?;
            let room =
                trainer::generate::room_for_new_tokens(&model, std::slice::from_ref(&prompt))?;
            if room == 0 {
                bail!(
                    "the conversation fills the model's context ({} positions)",
                    model.config.max_position_embeddings
                );
            }
            let config = GenerationConfig {
                max_new_tokens: max_new_tokens.min(room),
                sampling: SamplingParams { temperature, top_p },
                seed: args.seed.wrapping_add(turn as u64),
                stop_tokens: stop_tokens.clone(),
                pad_id: tokenizer.pad_id(),
            };
            let (generated, printed) = stream_reply(&model, &tokenizer, prompt, &config)?;
            println!("{}", printed.rest);
            let reply = tokenizer.decode(&generated.tokens[0], true)?;
            conversation.push(ChatMessage::new("assistant", reply.trim()));
        }
    });
    Ok(())
}

/// `trainer compare`: the test-split numbers of on-policy SFT runs side by side.
fn run_compare(runs: &[PathBuf], out: &Path) -> Result<()> {
    use recipes::onpolicy_sft::EvalResult;
    use trainer::plot::TradeoffPoint;
    let mut rows: Vec<(String, EvalResult)> = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        let path = run.join("summary.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (is the run finished?)", path.display()))?;
        let summary: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let result = |key: &str| -> Result<EvalResult> {
            serde_json::from_value(summary[key].clone()).with_context(|| {
                format!(
                    "{}: no `{key}` evaluation (not an on-policy SFT run?)",
                    path.display()
                )
            })
        };
        if index == 0 {
            rows.push(("base".to_string(), result("base")?));
        }
        let name = run.file_name().map_or_else(
            || run.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        rows.push((name, result("trained")?));
    }
    let interval = |(low, high): (f64, f64)| format!("[{:.1}, {:.1}]", 100.0 * low, 100.0 * high);
    let mut table = String::from(
        "| run | greedy accuracy (95% CI) | greedy mean length | sampled accuracy (95% CI) | sampled mean length |\n| --- | --- | --- | --- | --- |\n",
    );
    for (name, r) in &rows {
        table += &format!(
            "| {name} | {:.1}% {} | {:.1} | {:.1}% {} | {:.1} |\n",
            100.0 * r.greedy_accuracy,
            interval(r.greedy_accuracy_95),
            r.mean_length,
            100.0 * r.sampled_accuracy,
            interval(r.sampled_accuracy_95),
            r.sampled_mean_length
        );
    }
    print!("{table}");
    let points: Vec<TradeoffPoint> = rows
        .iter()
        .map(|(name, r)| TradeoffPoint {
            label: name.clone(),
            x: r.mean_length,
            y: 100.0 * r.greedy_accuracy,
            y_interval: (
                100.0 * r.greedy_accuracy_95.0,
                100.0 * r.greedy_accuracy_95.1,
            ),
        })
        .collect();
    trainer::plot::plot_tradeoff(
        out,
        &points,
        ("greedy mean length (tokens)", "greedy accuracy (%)"),
        "accuracy against length, test prompts",
    )?;
    let table_path = out.with_extension("md");
    std::fs::write(&table_path, &table)
        .with_context(|| format!("cannot write {}", table_path.display()))?;
    println!("{}\n{}", out.display(), table_path.display());
    Ok(())
}
