//! The engine shared by every recipe: model modules, weight loading and saving,
//! generation, and the devices they run on.

pub mod backend;
pub mod generate;
pub mod model;
pub mod sampling;
pub mod weights;

pub use backend::{Cpu, CpuDevice};
pub use model::llama::{CausalLm, LlamaConfig};
