//! Training throughput of the engine (forward, backward, global-norm clip, AdamW) on fixed
//! Llama configs, for comparison with `scripts/bench_torch.py` on the same machine.
//!
//!     cargo bench -p trainer --bench train_throughput -- cpu 10m --batch 2 --seq 256 --steps 3
//!     cargo bench -p trainer --features cuda --bench train_throughput -- cuda 125m
//!
//! Arguments: device (cpu, cuda, cuda:N), size (10m, 125m, 350m), and optionally `--batch B`
//! (default 8), `--seq S` (1024), `--steps N` (10, after 2 warm-up steps),
//! `--peak-tflops T` (the device's peak, for model FLOPs utilisation) and `--peers P` (the
//! same step on P data-parallel peers of B/P rows each, as `--devices cpu,cpu` runs it:
//! on CPU one process of a small model keeps about one core busy). Prints one line of
//! `key=value` pairs; `scripts/bench-train` runs it next to PyTorch.

use burn::tensor::backend::AutodiffBackend;
use datasets::{TokenBatch, TokenRow};
use std::time::Instant;
use trainer::backend::DeviceSpec;
use trainer::distributed::{self, Peer};
use trainer::model::init::ParamInit;
use trainer::model::layers::Precision;
use trainer::train::{Resume, TrainConfig, Trainer};
use trainer::{with_backend, CausalLm, LlamaConfig};

/// The fixed configs, shared with `scripts/bench_torch.py` (keep them in step).
fn bench_config(size: &str) -> LlamaConfig {
    // (vocab, hidden, layers, heads, MLP)
    let (vocab, hidden, layers, heads, mlp) = match size {
        "10m" => (8192, 320, 6, 5, 864),
        "125m" => (32000, 768, 12, 12, 2048),
        "350m" => (32000, 1024, 24, 16, 2816),
        other => panic!("unknown size `{other}` (10m, 125m, 350m)"),
    };
    let mut config = LlamaConfig::tiny(vocab, hidden, layers, heads, heads);
    config.intermediate_size = mlp;
    config.max_position_embeddings = 4096;
    config
}

struct Options {
    device: DeviceSpec,
    size: String,
    batch: usize,
    seq: usize,
    steps: usize,
    peers: usize,
    peak_tflops: Option<f64>,
    precision: Precision,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    let positional: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || !args[i - 1].starts_with("--")))
        .map(|(_, a)| a)
        .collect();
    Options {
        device: DeviceSpec::parse(positional.first().map_or("cpu", |s| s.as_str()))
            .expect("a device"),
        size: positional.get(1).map_or("10m".into(), |s| s.to_string()),
        batch: value("--batch").map_or(8, |v| v.parse().expect("--batch")),
        seq: value("--seq").map_or(1024, |v| v.parse().expect("--seq")),
        steps: value("--steps").map_or(10, |v| v.parse().expect("--steps")),
        peers: value("--peers").map_or(1, |v| v.parse().expect("--peers")),
        peak_tflops: value("--peak-tflops").map(|v| v.parse().expect("--peak-tflops")),
        precision: match value("--precision").as_deref() {
            None | Some("f32") => Precision::F32,
            Some("bf16") => Precision::Bf16,
            Some(other) => panic!("--precision {other}: expected f32 or bf16"),
        },
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The benchmark on one device, or on `--peers` threads that are peers of one data-parallel
/// run (peer 0 prints).
fn run<B: AutodiffBackend>(device: B::Device, options: &Options) {
    assert!(
        options.batch.is_multiple_of(options.peers),
        "--batch must be a multiple of --peers"
    );
    if options.peers == 1 {
        return run_peer::<B>(device, options);
    }
    std::thread::scope(|scope| {
        for rank in 0..options.peers {
            let device = device.clone();
            std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn_scoped(scope, move || {
                    distributed::run_as(Peer::new(rank, options.peers, None), || {
                        run_peer::<B>(device, options);
                        distributed::leave();
                    })
                })
                .expect("a peer thread");
        }
    });
}

fn run_peer<B: AutodiffBackend>(device: B::Device, options: &Options) {
    let config = bench_config(&options.size);
    let rank = distributed::current_peer().rank();
    let rows_per_peer = options.batch / options.peers;
    let model = CausalLm::<B>::new(&config, &mut ParamInit::normal(0, 0.02), &device)
        .with_precision(options.precision);
    let train: TrainConfig = toml::from_str(&format!(
        "steps = {}\nbatch_size = {}\nlr = 3e-4\nweight_decay = 0.1\nmax_grad_norm = 1.0\nlog_every = 0",
        options.steps + 2,
        rows_per_peer
    ))
    .expect("train config");
    let run_dir = std::env::temp_dir().join(format!("train-bench-{}", std::process::id()));
    let (mut trainer, _) =
        Trainer::start(model, train, None, 0, &run_dir, &Resume::No).expect("trainer");
    let rows: Vec<TokenRow> = (rank * rows_per_peer..(rank + 1) * rows_per_peer)
        .map(|b| {
            let tokens: Vec<u32> = (0..=options.seq)
                .map(|i| ((i * 7919 + b * 104_729) % config.vocab_size) as u32)
                .collect();
            TokenRow::all_trained(tokens)
        })
        .collect();
    let batch = TokenBatch::from_rows(&rows.iter().collect::<Vec<_>>(), 0);
    // Warm-up: kernel compilation and autotuning happen here.
    for _ in 0..2 {
        trainer
            .train_step(std::slice::from_ref(&batch))
            .expect("step");
    }
    let start = Instant::now();
    for _ in 0..options.steps {
        // Each step reads its loss back, so the device has finished it.
        trainer
            .train_step(std::slice::from_ref(&batch))
            .expect("step");
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&run_dir);
    if rank > 0 {
        return;
    }

    let tokens_per_s = (options.steps * options.batch * options.seq) as f64 / seconds;
    // Model FLOPs per token (PaLM's appendix B): 6 N for the weights + 12 L s d for attention
    // scores and values. The tied embedding counts once, as the output head.
    let n = config.num_parameters() as f64;
    let attention = 12.0
        * config.num_hidden_layers as f64
        * options.seq as f64
        * (config.num_attention_heads * config.head_dim) as f64;
    let flops_per_token = 6.0 * n + attention;
    let achieved_tflops = tokens_per_s * flops_per_token / 1e12;
    let mfu = options.peak_tflops.map_or("n/a".to_string(), |peak| {
        format!("{:.1}%", 100.0 * achieved_tflops / peak)
    });
    println!(
        "impl=burn precision={:?} device={:?} size={} params={:.1}M batch={} peers={} seq={} steps={} tokens_per_s={:.0} \
         step_ms={:.1} model_tflops={:.2} mfu={} peak_host_rss_mib={:.0}",
        options.precision,
        options.device,
        options.size,
        config.num_parameters() as f64 / 1e6,
        options.batch,
        options.peers,
        options.seq,
        options.steps,
        tokens_per_s,
        1000.0 * seconds / options.steps as f64,
        achieved_tflops,
        mfu,
        peak_rss_mib()
    );
}

fn main() -> anyhow::Result<()> {
    trainer::backend::keep_freed_memory();
    let options = options();
    let device = options.device;
    with_backend!(device, |B, dev| run::<burn::backend::Autodiff<B>>(
        dev, &options
    ));
    Ok(())
}
