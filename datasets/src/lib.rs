//! Data for the recipes: tokenizers with chat templates, record sources, batching, and
//! built-in synthetic tasks.

pub mod tokenizer;

pub use tokenizer::{ChatMessage, TextTokenizer};
