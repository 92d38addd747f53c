//! Model modules. `layers` holds the building blocks every family shares (linear with an
//! optional LoRA adapter, RMSNorm, rotary positions); each model family has one file.

pub mod init;
pub mod layers;
pub mod llama;
pub mod mask;
pub mod router;
