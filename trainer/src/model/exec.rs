//! How one decoder layer runs, as data handed to the one decoder loop: every module for every
//! token, gated residual branches (the training forward of token routers), or real skipping of
//! the tokens each module does not execute.

use burn::prelude::*;

/// Per-token gates on a layer's two residual branches, each `[batch, seq, 1]`:
/// `h = h + g_attn * Attn(norm(h))`, `h = h + g_mlp * MLP(norm(h))`. `None` means always on.
#[derive(Debug, Clone)]
pub struct LayerGates<B: Backend> {
    pub attn: Option<Tensor<B, 3>>,
    pub mlp: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for LayerGates<B> {
    fn default() -> Self {
        Self {
            attn: None,
            mlp: None,
        }
    }
}

/// Which tokens (row-major over `[batch, seq]`) execute each module of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDecisions {
    pub attn: Vec<bool>,
    pub mlp: Vec<bool>,
}

impl LayerDecisions {
    /// Every token executes both modules.
    pub fn all(tokens: usize) -> Self {
        Self {
            attn: vec![true; tokens],
            mlp: vec![true; tokens],
        }
    }
}

/// How a layer runs.
#[derive(Debug, Clone)]
pub enum LayerExec<B: Backend> {
    /// Both modules for every token.
    Dense,
    /// Both modules for every token, each branch multiplied by its gate.
    Gated(LayerGates<B>),
    /// Each module only for the tokens that execute it: a skipped MLP is not computed, a
    /// skipped attention computes no query, scores or output (its key and value still are,
    /// so that other tokens see it as in the gated forward).
    Skipping(LayerDecisions),
}
