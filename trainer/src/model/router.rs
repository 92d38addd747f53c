//! SkipGPT's token routers (EIT-NLP, ICML 2025) and the forward pass that really skips.
//!
//! Each decoder layer gets two routers, one for attention and one for the MLP, both reading the
//! layer's input hidden state: `Linear(d, d/4) -> ReLU -> Linear(d/4, 2)`. Channel 0 of the
//! two logits means "execute", channel 1 "skip". Training uses straight-through Gumbel-softmax
//! gates; inference takes the argmax, without noise.
//!
//! What a skipped attention module saves: the token's query, its attention scores and its
//! output projection. Its key and value are still computed, because the training forward (which
//! computes every module and multiplies by the gate) lets other tokens attend to it; keeping
//! them makes the skipping forward equal to the gated one.

use super::init::ParamInit;
use super::layers::Linear;
use super::llama::{grouped_attention, CausalLm, KvCache, LayerGates};
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};
use burn::tensor::IndexingUpdateOp;

#[derive(Module, Debug)]
pub struct TokenRouter<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> TokenRouter<B> {
    /// Kaiming-uniform weights (`bound = sqrt(6 / fan_in)`, as `nn.init.kaiming_uniform_`),
    /// zero biases.
    pub fn new(hidden: usize, init: &mut ParamInit, device: &B::Device) -> Self {
        let inner = (hidden / 4).max(1);
        let layer = |d_in: usize, d_out: usize, init: &mut ParamInit| Linear {
            weight: init.uniform([d_out, d_in], (6.0 / d_in as f32).sqrt(), device),
            bias: Some(init.constant([d_out], 0.0, device)),
            lora: None,
            precision: Default::default(),
        };
        Self {
            fc1: layer(hidden, inner, init),
            fc2: layer(inner, 2, init),
        }
    }

    /// `[batch, seq, hidden] -> [batch, seq, 2]` (execute, skip).
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(relu(self.fc1.forward(hidden)))
    }
}

#[derive(Module, Debug)]
pub struct LayerRouter<B: Backend> {
    pub attn: TokenRouter<B>,
    pub mlp: TokenRouter<B>,
}

impl<B: Backend> LayerRouter<B> {
    pub fn new(hidden: usize, init: &mut ParamInit, device: &B::Device) -> Self {
        Self {
            attn: TokenRouter::new(hidden, init, device),
            mlp: TokenRouter::new(hidden, init, device),
        }
    }

    /// Deterministic gates (argmax, no noise), as inference uses them.
    pub fn hard_gates(&self, hidden: Tensor<B, 3>) -> LayerGates<B> {
        LayerGates {
            attn: Some(hard_gate(self.attn.forward(hidden.clone()))),
            mlp: Some(hard_gate(self.mlp.forward(hidden))),
        }
    }
}

/// 1 where the router executes the module (logit 0 >= logit 1), else 0: `[b, s, 2] -> [b, s, 1]`.
pub fn hard_gate<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, _] = logits.dims();
    let execute = logits.clone().slice([0..b, 0..s, 0..1]);
    let skip = logits.slice([0..b, 0..s, 1..2]);
    execute.greater_equal(skip).float()
}

/// Straight-through Gumbel-softmax gate: the forward value is the hard choice of
/// `argmax(logits + noise)`, the gradient that of `softmax((logits + noise) / temperature)`.
/// `noise` is Gumbel(0, 1) noise of the same shape (scaled, or absent for no noise).
pub fn straight_through_gate<B: Backend>(
    logits: Tensor<B, 3>,
    noise: Option<Tensor<B, 3>>,
    temperature: f64,
) -> Tensor<B, 3> {
    let perturbed = match noise {
        Some(noise) => logits + noise,
        None => logits,
    };
    let soft = softmax(perturbed.clone().div_scalar(temperature), 2);
    let [b, s, _] = soft.dims();
    let soft_execute = soft.slice([0..b, 0..s, 0..1]);
    let hard_execute = hard_gate(perturbed);
    hard_execute - soft_execute.clone().detach() + soft_execute
}

/// Which tokens (row-major over `[batch, seq]`) execute each module of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDecisions {
    pub attn: Vec<bool>,
    pub mlp: Vec<bool>,
}

/// The routers' deterministic decisions for the layer input `hidden`.
pub fn router_decisions<B: Backend>(
    router: &LayerRouter<B>,
    hidden: &Tensor<B, 3>,
) -> LayerDecisions {
    let flags = |router: &TokenRouter<B>| -> Vec<bool> {
        let gate = hard_gate(router.forward(hidden.clone()));
        gate.into_data()
            .to_vec::<f32>()
            .expect("f32 gates")
            .into_iter()
            .map(|g| g > 0.5)
            .collect()
    };
    LayerDecisions {
        attn: flags(&router.attn),
        mlp: flags(&router.mlp),
    }
}

fn indices(flags: &[bool], offset: usize) -> Vec<i64> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, &on)| on)
        .map(|(i, _)| (i + offset) as i64)
        .collect()
}

fn index_tensor<B: Backend>(indices: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(indices.to_vec(), [indices.len()]), device)
}

impl<B: Backend> CausalLm<B> {
    /// Logits with real skipping: each module runs only for the tokens its router executes.
    /// Returns the decisions of every layer as well. Equal to [`forward`](Self::forward)
    /// (which multiplies by the same hard gates) up to float rounding.
    pub fn forward_skipping(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
    ) -> (Tensor<B, 3>, Vec<LayerDecisions>) {
        self.skipping_forward(tokens, positions, allowed, None, |layer, hidden| {
            self.own_decisions(layer, hidden)
        })
    }

    /// The routers' decisions for a layer input (everything runs in a layer without routers).
    fn own_decisions(&self, layer: usize, hidden: &Tensor<B, 3>) -> LayerDecisions {
        match &self.model.layers[layer].router {
            Some(router) => router_decisions(router, hidden),
            None => {
                let [b, s, _] = hidden.dims();
                LayerDecisions {
                    attn: vec![true; b * s],
                    mlp: vec![true; b * s],
                }
            }
        }
    }

    /// As [`forward_skipping`](Self::forward_skipping), attending also over `cache` and
    /// appending the new keys and values to it (generation with a routed model).
    /// `allowed` covers all keys: `[batch, 1, new, cached + new]`.
    pub fn forward_skipping_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        self.skipping_forward(tokens, positions, allowed, Some(cache), |layer, hidden| {
            self.own_decisions(layer, hidden)
        })
        .0
    }

    /// The skipping forward with decisions from `decide(layer, layer_input)` (benchmarks
    /// drive it with decisions of a chosen sparsity).
    pub fn forward_with_decisions(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        decide: impl FnMut(usize, &Tensor<B, 3>) -> LayerDecisions,
    ) -> (Tensor<B, 3>, Vec<LayerDecisions>) {
        self.skipping_forward(tokens, positions, allowed, None, decide)
    }

    fn skipping_forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        mut cache: Option<&mut KvCache<B>>,
        mut decide: impl FnMut(usize, &Tensor<B, 3>) -> LayerDecisions,
    ) -> (Tensor<B, 3>, Vec<LayerDecisions>) {
        let device = self.device();
        let rope_all = self.rope.tables(positions.clone());
        let mut hidden = self.embed(tokens);
        let [batch, seq, dim] = hidden.dims();
        let mut all_decisions = Vec::with_capacity(self.num_layers());
        for (index, layer) in self.model.layers.iter().enumerate() {
            let decisions = decide(index, &hidden);
            let attn = &layer.self_attn;
            let head_dim = attn.head_dim;

            // Attention: keys and values of every token, queries of the executed ones only.
            let normed = layer.input_layernorm.forward(hidden.clone());
            let split = |t: Tensor<B, 3>, n: usize| {
                let [b, s, _] = t.dims();
                t.reshape([b, s, n, head_dim]).swap_dims(1, 2)
            };
            let keys = rope_all.apply(split(
                attn.k_proj.forward(normed.clone()),
                attn.num_kv_heads,
            ));
            let values = split(attn.v_proj.forward(normed.clone()), attn.num_kv_heads);
            let (keys, values) = match cache.as_mut() {
                Some(cache) => {
                    let slot = &mut cache.layers[index];
                    let (keys, values) = match slot.take() {
                        Some((past_k, past_v)) => (
                            Tensor::cat(vec![past_k, keys], 2),
                            Tensor::cat(vec![past_v, values], 2),
                        ),
                        None => (keys, values),
                    };
                    *slot = Some((keys.clone(), values.clone()));
                    (keys, values)
                }
                None => (keys, values),
            };
            let mut flat = hidden.reshape([batch * seq, dim]);
            for row in 0..batch {
                let picked = indices(&decisions.attn[row * seq..(row + 1) * seq], 0);
                if picked.is_empty() {
                    continue;
                }
                let at = index_tensor::<B>(&picked, &device);
                let x = normed
                    .clone()
                    .slice([row..row + 1, 0..seq, 0..dim])
                    .select(1, at.clone());
                let query_positions = positions
                    .clone()
                    .slice([row..row + 1, 0..seq])
                    .select(1, at.clone());
                let queries = self
                    .rope
                    .tables(query_positions)
                    .apply(split(attn.q_proj.forward(x), attn.num_heads));
                // Through ints: selecting rows of a bool tensor loses its dtype on Flex.
                let blocked = allowed
                    .clone()
                    .slice(s![row..row + 1])
                    .int()
                    .select(2, at)
                    .equal_elem(0);
                let out = grouped_attention(
                    queries,
                    keys.clone().slice(s![row..row + 1]),
                    values.clone().slice(s![row..row + 1]),
                    blocked,
                ); // [1, heads, picked, head_dim]
                let out = out
                    .swap_dims(1, 2)
                    .reshape([picked.len(), attn.num_heads * head_dim]);
                let update = attn.o_proj.forward(out);
                let rows: Vec<i64> = picked.iter().map(|&t| t + (row * seq) as i64).collect();
                flat = flat.select_assign(
                    0,
                    index_tensor::<B>(&rows, &device),
                    update,
                    IndexingUpdateOp::Add,
                );
            }

            // MLP: only the executed tokens, gathered from the whole batch.
            let picked = indices(&decisions.mlp, 0);
            if !picked.is_empty() {
                let at = index_tensor::<B>(&picked, &device);
                let x = layer
                    .post_attention_layernorm
                    .forward(flat.clone().select(0, at.clone()));
                let update = layer
                    .mlp
                    .forward(x.unsqueeze_dim::<3>(0))
                    .squeeze_dim::<2>(0);
                flat = flat.select_assign(0, at, update, IndexingUpdateOp::Add);
            }
            hidden = flat.reshape([batch, seq, dim]);
            all_decisions.push(decisions);
        }
        (self.head(hidden), all_decisions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn router_shapes_and_initialisation() {
        let device = Default::default();
        let router = TokenRouter::<Cpu>::new(64, &mut ParamInit::normal(0, 0.0), &device);
        assert_eq!(router.fc1.weight.dims(), [16, 64]);
        assert_eq!(router.fc2.weight.dims(), [2, 16]);
        let bound = (6.0f32 / 64.0).sqrt();
        let w: Vec<f32> = router.fc1.weight.val().into_data().to_vec().unwrap();
        assert!(w.iter().all(|v| v.abs() <= bound));
        assert!(
            w.iter().any(|v| v.abs() > bound * 0.9),
            "uses the whole range"
        );
        let b: Vec<f32> = router
            .fc1
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec()
            .unwrap();
        assert!(b.iter().all(|v| *v == 0.0));
        let logits = router.forward(Tensor::ones([3, 5, 64], &device));
        assert_eq!(logits.dims(), [3, 5, 2]);
    }

    #[test]
    fn hard_gate_is_argmax_and_straight_through_keeps_its_value() {
        let device = Default::default();
        let logits = Tensor::<Cpu, 3>::from_floats([[[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]], &device);
        let hard: Vec<f32> = hard_gate(logits.clone()).into_data().to_vec().unwrap();
        assert_eq!(hard, vec![1.0, 0.0, 1.0]);
        let st: Vec<f32> = straight_through_gate(logits.clone(), None, 5.0)
            .into_data()
            .to_vec()
            .unwrap();
        for (a, b) in st.iter().zip(&hard) {
            assert!((a - b).abs() < 1e-6);
        }
        // Noise can flip a decision.
        let noise = Tensor::<Cpu, 3>::from_floats([[[0.0, 5.0], [0.0, 0.0], [0.0, 0.0]]], &device);
        let flipped: Vec<f32> = straight_through_gate(logits, Some(noise), 1.0)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(flipped[0].abs() < 1e-6);
    }
}
