//! Everything that touches files on disk: Hugging Face model folders (config.json,
//! safetensors single or sharded), GGUF files (read and imported as HF folders), the mapping between our parameter names and other
//! layouts, and atomic writes.
//!
//! This crate knows nothing about Burn: tensors cross it as [`HostTensor`] (shape + f32 data),
//! so file-format code stays independent of the backend.

pub mod atomic;
pub mod gguf;
pub mod hf_folder;
pub mod names;
pub mod run_checkpoints;
pub mod safetensors_io;

pub use hf_folder::save_hf_folder;
pub use hf_folder::{read_json, HfFolder};
pub use safetensors_io::{write_safetensors, HostTensor, StoreDtype, WeightSource};
