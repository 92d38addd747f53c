//! SkipGPT's token routers (EIT-NLP, ICML 2025): which tokens run each module of a layer.
//! The decoder loop runs a layer as its router decides (`LayerExec::Skipping`).
//!
//! Each decoder layer gets two routers, one for attention and one for the MLP (or only one of
//! them: [`RoutedModules`]), both reading the layer's input hidden state:
//! `Linear(d, d/4) -> ReLU -> Linear(d/4, 2)`. Channel 0 of the
//! two logits means "execute", channel 1 "skip". Training uses straight-through Gumbel-softmax
//! gates; inference takes the argmax, without noise.
//!
//! What a skipped attention module saves: the token's query, its attention scores and its
//! output projection. Its key and value are still computed, because the training forward (which
//! computes every module and multiplies by the gate) lets other tokens attend to it; keeping
//! them makes the skipping forward equal to the gated one.

use super::exec::{LayerDecisions, LayerGates};
use super::init::ParamInit;
use super::layers::Linear;
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};

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

/// Which modules of a layer have a router (the others always run): SkipGPT's default routes
/// both, each with its own router; its ablations route attention only, the MLP only, or the
/// whole block with one router (one decision per token for both modules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutedModules {
    #[default]
    Both,
    Attention,
    Mlp,
    /// One router per layer (stored as `attn`) whose decision runs or skips both modules.
    Block,
}

impl RoutedModules {
    pub fn attention(self) -> bool {
        self != Self::Mlp
    }
    pub fn mlp(self) -> bool {
        self != Self::Attention
    }
    /// Whether the MLP has a router of its own.
    fn own_mlp_router(self) -> bool {
        matches!(self, Self::Both | Self::Mlp)
    }
    /// Routed modules per layer.
    pub fn count(self) -> usize {
        self.attention() as usize + self.mlp() as usize
    }
}

#[derive(Module, Debug)]
pub struct LayerRouter<B: Backend> {
    pub attn: Option<TokenRouter<B>>,
    pub mlp: Option<TokenRouter<B>>,
    /// The attention router decides for the MLP too ([`RoutedModules::Block`]).
    pub block: bool,
}

impl<B: Backend> LayerRouter<B> {
    pub fn new(
        hidden: usize,
        routed: RoutedModules,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Self {
        let attn = routed
            .attention()
            .then(|| TokenRouter::new(hidden, init, device));
        let mlp = routed
            .own_mlp_router()
            .then(|| TokenRouter::new(hidden, init, device));
        Self {
            attn,
            mlp,
            block: routed == RoutedModules::Block,
        }
    }

    /// The router deciding for the MLP: its own, or in block routing the attention one.
    pub fn mlp_router(&self) -> Option<&TokenRouter<B>> {
        match self.block {
            true => self.attn.as_ref(),
            false => self.mlp.as_ref(),
        }
    }

    /// Deterministic gates (argmax, no noise), as inference uses them; `None` for a module
    /// without a router.
    pub fn hard_gates(&self, hidden: Tensor<B, 3>) -> LayerGates<B> {
        let gate = |router: &TokenRouter<B>| hard_gate(router.forward(hidden.clone()));
        LayerGates {
            attn: self.attn.as_ref().map(gate),
            mlp: self.mlp_router().map(gate),
        }
    }

    /// The deterministic decisions for the layer input `hidden`, as inference skips by them
    /// (every token runs a module without a router).
    pub fn decisions(&self, hidden: &Tensor<B, 3>) -> LayerDecisions {
        self.decide(hidden, None)
    }

    /// The decisions with `noise()` (Gumbel noise shaped like the logits, `[b, s, 2]`) added
    /// to each router's logits first: how SkipGPT's official code evaluates.
    pub fn noisy_decisions(
        &self,
        hidden: &Tensor<B, 3>,
        noise: &mut dyn FnMut() -> Tensor<B, 3>,
    ) -> LayerDecisions {
        self.decide(hidden, Some(noise))
    }

    fn decide(
        &self,
        hidden: &Tensor<B, 3>,
        mut noise: Option<&mut dyn FnMut() -> Tensor<B, 3>>,
    ) -> LayerDecisions {
        let [b, s, _] = hidden.dims();
        let mut flags = |router: Option<&TokenRouter<B>>| -> Vec<bool> {
            let Some(router) = router else {
                return vec![true; b * s];
            };
            let mut logits = router.forward(hidden.clone());
            if let Some(noise) = noise.as_mut() {
                logits = logits + noise();
            }
            hard_gate(logits)
                .into_data()
                .to_vec::<f32>()
                .expect("f32 gates")
                .into_iter()
                .map(|g| g > 0.5)
                .collect()
        };
        let attn = flags(self.attn.as_ref());
        // Block routing: the one decision (and noise draw) covers both modules.
        let mlp = match self.block {
            true => attn.clone(),
            false => flags(self.mlp.as_ref()),
        };
        LayerDecisions { attn, mlp }
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
