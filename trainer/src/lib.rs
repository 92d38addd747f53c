//! The engine shared by every recipe: model modules, weight loading and saving,
//! generation, the training loop with its optimizer, schedule, checkpoints and metrics,
//! LoRA, configs, and the devices they run on.

pub mod backend;
pub mod config;
pub mod cpu_fused;
pub mod distributed;
pub mod export;
pub mod generate;
pub mod launch;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod run_dir;
pub mod sampling;
pub mod schedule;
pub mod tensorboard;
pub mod trackers;
pub mod train;
pub mod wandb;
pub mod weights;

pub use backend::{Cpu, CpuAutodiff, CpuDevice};
pub use model::llama::{CausalLm, LlamaConfig};
