//! Forward and generation throughput of a fixed small Llama config, or of a Hugging Face
//! model folder (`--model DIR`), at batch 4 or `--batch N`. Generation is also measured with
//! the batch split over two threads, as two data-parallel peers of `onpolicy-sft` sample
//! (on CPU one thread of a small model keeps about one core busy). Generation figures are the
//! median of five runs, as `scripts/bench_torch_generate.py` reports `transformers.generate`.
//!
//!     cargo bench -p trainer --bench model_throughput             # CPU
//!     cargo bench -p trainer --features cuda --bench model_throughput -- cuda
//!     cargo bench -p trainer --bench model_throughput -- cpu --model models/smollm2-135m-instruct --batch 16
//!
//! Prints tokens/s; results go in BENCHMARKS.md with the machine and date.

use burn::prelude::*;
use std::path::PathBuf;
use std::time::Instant;
use trainer::backend::DeviceSpec;
use trainer::generate::{generate, GenerationConfig};
use trainer::launch::{on_cores_of_its_own, share_of_cores};
use trainer::model::init::ParamInit;
use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use trainer::sampling::SamplingParams;
use trainer::{with_backend, CausalLm, LlamaConfig};

const PROMPT: usize = 128;
const NEW_TOKENS: usize = 64;

fn bench_config() -> LlamaConfig {
    // ~10M parameters: vocab 8192, hidden 384, 6 layers, 6 heads / 2 KV heads.
    let mut config = LlamaConfig::tiny(8192, 384, 6, 6, 2);
    config.intermediate_size = 1024;
    config
}

/// `--model DIR` and `--batch N` from the command line (after the device).
struct Options {
    model: Option<PathBuf>,
    batch: usize,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        })
    };
    Options {
        model: value("--model").map(PathBuf::from),
        batch: value("--batch").map_or(4, |n| n.parse().expect("--batch: a number")),
    }
}

fn run<B: Backend>(device: B::Device, label: &str, options: &Options) {
    let model = match &options.model {
        Some(dir) => CausalLm::<B>::load(dir, &device).expect("a Hugging Face model folder"),
        None => CausalLm::<B>::new(&bench_config(), &mut ParamInit::normal(0, 0.02), &device),
    };
    let config = model.config.clone();
    let batch_size = options.batch;
    let prompts: Vec<Vec<u32>> = (0..batch_size)
        .map(|b| {
            (0..PROMPT)
                .map(|i| ((i * 31 + b * 7) % config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let batch = PaddedBatch::left_padded(&prompts, 0);
    let forward = || {
        let logits = model.forward(
            token_tensor(&batch.tokens, &device),
            int_tensor(&batch.positions(), &device),
            causal_mask(&batch.valid, batch.width(), &device),
        );
        // Reading one value waits for the device to finish.
        let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
    };
    forward(); // warm-up
    let repeats = 5;
    let start = Instant::now();
    for _ in 0..repeats {
        forward();
    }
    let seconds = start.elapsed().as_secs_f64();
    let forward_tps = (repeats * batch_size * PROMPT) as f64 / seconds;

    let gen_config = GenerationConfig {
        max_new_tokens: NEW_TOKENS,
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        },
        seed: 0,
        stop_tokens: vec![],
        pad_id: 0,
    };
    let _ = generate(&model, &prompts, &gen_config).unwrap(); // warm-up
    let gen_tps = median_rate(|| {
        generate(&model, &prompts, &gen_config)
            .unwrap()
            .num_tokens()
    });

    // Two threads, each generating for its half of the prompts (the weights are shared), each
    // in a pool of half the cores as the recipe's peers run.
    let halves: Vec<&[Vec<u32>]> = prompts.chunks(batch_size.div_ceil(2)).collect();
    let half_the_cores = Some(share_of_cores(2));
    let split_tps = median_rate(|| {
        std::thread::scope(|scope| {
            let peers: Vec<_> = halves
                .iter()
                .map(|half| {
                    let (model, gen_config) = (model.clone(), &gen_config);
                    scope.spawn(move || {
                        on_cores_of_its_own(half_the_cores, || {
                            generate(&model, half, gen_config).unwrap().num_tokens()
                        })
                    })
                })
                .collect();
            peers.into_iter().map(|peer| peer.join().unwrap()).sum()
        })
    });

    println!(
        "{label}: {:.1}M params, batch {batch_size} x {PROMPT} tokens | forward {forward_tps:.0} tokens/s | \
         generation ({NEW_TOKENS} new tokens per sequence, KV cache) {gen_tps:.1} tokens/s, \
         split over two threads {split_tps:.1} tokens/s",
        config.num_parameters() as f64 / 1e6
    );
}

/// Generation runs timed, each on its own; `bench_torch_generate.py` times as many.
const GENERATION_RUNS: usize = 5;

/// The median over [`GENERATION_RUNS`] runs of `run` of the tokens it made per second (one
/// run of the small config lasts half a second, where this shared machine's spread is wide).
fn median_rate(mut run: impl FnMut() -> usize) -> f64 {
    let mut rates: Vec<f64> = (0..GENERATION_RUNS)
        .map(|_| {
            let start = Instant::now();
            let tokens = run();
            tokens as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[GENERATION_RUNS / 2]
}

fn main() -> anyhow::Result<()> {
    trainer::backend::keep_freed_memory();
    let device = DeviceSpec::from_bench_args();
    let options = options();
    with_backend!(device, |B, dev| run::<B>(
        dev,
        &format!("{device:?}"),
        &options
    ));
    Ok(())
}
