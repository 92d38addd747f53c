//! The matrix products of one decoding step, timed alone: every linear layer of a Llama config
//! (the fixed model-throughput config, or `--model DIR`'s config.json) at `--rows N` (the batch:
//! one new token per sequence), as the model computes them (`x · wᵀ`, weights stored as
//! Hugging Face's [out, in]). Prints GFLOP/s per shape and the products' time per decoding step,
//! for the backend's own product and for the model's (`Precision::matmul_transposed`: on the CPU
//! the kernel of `model/cpu_matmul.rs`).
//! `scripts/bench_torch_matmul.py` times the same products with PyTorch (`F.linear`, MKL/oneDNN):
//! where both spend most of a decoding step in these products, their ratio bounds how far ahead of
//! `transformers.generate` our generation can get.
//!
//!     cargo bench -p trainer --bench matmul_shapes -- cpu --model models/smollm2-135m-instruct --rows 16
//!
//! Results go in BENCHMARKS.md with the machine and date.

use burn::prelude::*;
use burn::tensor::Distribution;
use std::time::Instant;
use trainer::backend::DeviceSpec;
use trainer::model::layers::Precision;
use trainer::{with_backend, LlamaConfig};

/// (name, out features, in features, how many per decoding step).
fn shapes(config: &LlamaConfig) -> Vec<(&'static str, usize, usize, usize)> {
    let (hidden, layers) = (config.hidden_size, config.num_hidden_layers);
    let (q, kv) = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    );
    let inter = config.intermediate_size;
    vec![
        ("q_proj", q, hidden, layers),
        ("k_proj / v_proj", kv, hidden, 2 * layers),
        ("o_proj", hidden, q, layers),
        ("gate_proj / up_proj", inter, hidden, 2 * layers),
        ("down_proj", hidden, inter, layers),
        ("lm_head", config.vocab_size, hidden, 1),
    ]
}

fn config_from_args() -> (String, LlamaConfig, usize) {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        })
    };
    let rows = value("--rows").map_or(4, |n| n.parse().expect("--rows: a number"));
    match value("--model") {
        Some(dir) => {
            let path = std::path::Path::new(dir).join("config.json");
            let text = std::fs::read_to_string(&path).expect("the model folder's config.json");
            let json = serde_json::from_str(&text).expect("config.json is JSON");
            let config = LlamaConfig::from_json(&json, &path.display().to_string()).unwrap();
            (dir.clone(), config, rows)
        }
        None => {
            // The model-throughput config: vocab 8192, hidden 384, 6 layers, 6 / 2 heads.
            let mut config = LlamaConfig::tiny(8192, 384, 6, 6, 2);
            config.intermediate_size = 1024;
            ("model-throughput config".into(), config, rows)
        }
    }
}

fn run<B: Backend>(device: B::Device, label: &str) {
    let (model, config, rows) = config_from_args();
    // (the backend's own product, the model's: the kernel of `cpu_matmul` on the CPU)
    let mut step_seconds = [0.0, 0.0];
    println!("{label}: {model}, {rows} rows; backend's product | model's product");
    for (name, out_features, in_features, per_step) in shapes(&config) {
        let normal = Distribution::Normal(0.0, 0.02);
        let w = Tensor::<B, 2>::random([out_features, in_features], normal, &device);
        let x = Tensor::<B, 2>::random([rows, in_features], normal, &device);
        let backend = || x.clone().matmul(w.clone().transpose());
        let model = || Precision::F32.matmul_transposed(x.clone(), w.clone());
        let flops = 2.0 * (rows * in_features * out_features) as f64;
        let mut line = format!("  {name:<20} {rows} x {in_features} · ({out_features} x {in_features})ᵀ, x{per_step} a step:");
        for (which, product) in [&backend as &dyn Fn() -> Tensor<B, 2>, &model]
            .into_iter()
            .enumerate()
        {
            let seconds = time(product);
            line += &format!(
                " {:>8.1} µs {:>6.1} GFLOP/s |",
                seconds * 1e6,
                flops / seconds / 1e9
            );
            step_seconds[which] += seconds * per_step as f64;
        }
        println!("{line}");
    }
    for (which, seconds) in ["backend", "model"].iter().zip(step_seconds) {
        println!(
            "impl=burn-{which} rows={rows} products_per_step_ms={:.2} tokens_per_s_if_only_products={:.1}",
            seconds * 1e3,
            rows as f64 / seconds
        );
    }
}

/// Seconds per call: a warm-up, then at least 10 calls and half a second.
fn time<B: Backend>(product: &dyn Fn() -> Tensor<B, 2>) -> f64 {
    // Reading one value waits for the device to finish.
    let call = || {
        let _ = product().slice([0..1, 0..1]).into_data();
    };
    call();
    let (mut repeats, start) = (0usize, Instant::now());
    while repeats < 10 || start.elapsed().as_secs_f64() < 0.5 {
        call();
        repeats += 1;
    }
    start.elapsed().as_secs_f64() / repeats as f64
}

fn main() -> anyhow::Result<()> {
    let device = DeviceSpec::from_bench_args();
    with_backend!(device, |B, dev| run::<B>(dev, &format!("{device:?}")));
    Ok(())
}
