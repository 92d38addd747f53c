//! SkipGPT's real skipping: forward tokens/s when a share of attention and MLP runs is
//! skipped, against the dense forward.
//!
//!     cargo bench -p trainer --bench skip_throughput             # CPU
//!     cargo bench -p trainer --features cuda --bench skip_throughput -- cuda
//!
//! Decisions are drawn at random per token, layer and module kind at the given sparsity (a
//! trained router's decisions cost the same to follow). Results go in BENCHMARKS.md.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use trainer::backend::DeviceSpec;
use trainer::model::init::ParamInit;
use trainer::model::llama::{LayerDecisions, LayerExec};
use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use trainer::{with_backend, CausalLm, LlamaConfig};

const BATCH: usize = 2;
const SEQ: usize = 512;
const REPEATS: usize = 4;

fn run<B: Backend>(device: B::Device, label: &str) {
    // ~30M parameters, Llama proportions: hidden 512, 8 layers, MLP 1536, 8 heads / 2 KV heads.
    let mut config = LlamaConfig::tiny(8192, 512, 8, 8, 2);
    config.intermediate_size = 1536;
    let model = CausalLm::<B>::new(&config, &mut ParamInit::normal(0, 0.02), &device);
    let prompts: Vec<Vec<u32>> = (0..BATCH)
        .map(|b| (0..SEQ).map(|i| ((i * 31 + b * 7) % 8192) as u32).collect())
        .collect();
    let batch = PaddedBatch::left_padded(&prompts, 0);
    let inputs = || {
        (
            token_tensor::<B>(&batch.tokens, &device),
            int_tensor::<B>(&batch.positions(), &device),
            causal_mask::<B>(&batch.valid, batch.width(), &device),
        )
    };
    let time = |f: &dyn Fn()| {
        f(); // warm-up
        let start = Instant::now();
        for _ in 0..REPEATS {
            f();
        }
        (REPEATS * BATCH * SEQ) as f64 / start.elapsed().as_secs_f64()
    };
    let dense_forward = || {
        let (t, p, m) = inputs();
        let _ = model.forward(t, p, m).slice([0..1, 0..1, 0..1]).into_data();
    };
    let dense = time(&dense_forward);
    println!(
        "{label}: {:.1}M params, batch {BATCH} x {SEQ} tokens | dense forward {dense:.0} tokens/s",
        config.num_parameters() as f64 / 1e6
    );
    for sparsity in [0.0, 0.25, 0.4] {
        let tps = time(&|| {
            let mut rng = StdRng::seed_from_u64(0);
            let (t, p, m) = inputs();
            let logits = model.forward_with(t, p, m, &mut |_, hidden| {
                let [b, s, _] = hidden.dims();
                let mut draw = || {
                    (0..b * s)
                        .map(|_| rng.random::<f64>() >= sparsity)
                        .collect()
                };
                LayerExec::Skipping(LayerDecisions {
                    attn: draw(),
                    mlp: draw(),
                })
            });
            let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
        });
        println!(
            "{label}: skipping forward at {:>2.0}% sparsity {tps:.0} tokens/s ({:.2}x dense)",
            100.0 * sparsity,
            tps / dense
        );
    }
    // Measured again last, so the order of the runs does not favour the skipping forward.
    println!(
        "{label}: dense forward again {:.0} tokens/s",
        time(&dense_forward)
    );
}

fn main() -> anyhow::Result<()> {
    let device = DeviceSpec::from_bench_args();
    with_backend!(device, |B, dev| run::<B>(dev, &format!("{device:?}")));
    Ok(())
}
