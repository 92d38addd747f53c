//! Model modules. `layers` holds the building blocks every family shares (linear with an
//! optional LoRA adapter, RMSNorm, rotary positions), `attention` the attention module with its
//! editable context and per-layer key/value stores, `exec` how a layer runs (dense, gated,
//! skipping), `config` the family's config.json, `vision` the ViT encoder and projector,
//! `token_pruning` the operators that choose which tokens go on, `cpu_matmul` the CPU
//! product of the linear layers in inference; each model family has one file (`llama`)
//! holding its layers and the one decoder loop.

pub mod attention;
pub mod config;
pub mod cpu_matmul;
pub mod exec;
pub mod init;
pub mod layers;
pub mod llama;
pub mod mask;
pub mod router;
pub mod series;
pub mod token_pruning;
pub mod vision;
