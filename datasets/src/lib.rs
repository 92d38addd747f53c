//! Data for the recipes: tokenizers with chat templates, record sources, tokenization with
//! loss masks, padding and packing, resumable shuffling, and built-in synthetic tasks.

pub mod examples;
pub mod records;
pub mod sampler;
pub mod series;
pub mod shapes;
pub mod stream;
pub mod synthetic;
pub mod tokenizer;

pub use examples::{Template, TokenBatch, TokenRow};
pub use records::Record;
pub use sampler::{EpochSampler, SamplerState};
pub use tokenizer::{ChatMessage, TextTokenizer};
