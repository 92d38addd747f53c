//! Building blocks shared by the model families.

use super::init::ParamInit;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// The float type the linear layers multiply in. Weights, gradients, optimizer state, norms,
/// attention softmax and the loss stay in f32, as under PyTorch's autocast: with `bf16`
/// only the matmuls of the linear layers (and a tied output head) run in bfloat16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// `x[rows, in] @ w[out, in]^T` in this precision; the result is f32.
    pub fn matmul_transposed<B: Backend>(self, x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            // Inference on the CPU: a product that does not re-pack the weights; training on
            // the CPU: one that writes the weight's gradient in its own layout.
            Self::F32 => super::cpu_matmul::matmul_transposed(&x, &w).unwrap_or_else(|| {
                crate::cpu_fused::matmul_transposed(x, w)
                    .unwrap_or_else(|(x, w)| x.matmul(w.transpose()))
            }),
            Self::Bf16 => x
                .cast(FloatDType::BF16)
                .matmul(w.cast(FloatDType::BF16).transpose())
                .cast(FloatDType::F32),
        }
    }
}

/// A linear layer in the Hugging Face layout: `weight` is `[out, in]`, so checkpoints load
/// without transposes. It can carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
    /// What the main matmul runs in (the adapter, small, stays f32).
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> Linear<B> {
    pub fn new(
        d_in: usize,
        d_out: usize,
        bias: bool,
        init: &mut ParamInit,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: init.tensor([d_out, d_in], device),
            bias: bias.then(|| init.constant([d_out], 0.0, device)),
            lora: None,
            precision: Precision::F32,
        }
    }

    pub fn d_in(&self) -> usize {
        self.weight.lazy_shape()[1]
    }

    pub fn d_out(&self) -> usize {
        self.weight.lazy_shape()[0]
    }

    /// `x @ weight^T + bias (+ LoRA)`, over any number of leading dimensions.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut y = matmul_last(x.clone(), self.weight.val(), self.precision);
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze();
        }
        if let Some(lora) = &self.lora {
            y = y + lora.forward(x);
        }
        y
    }
}

/// `x[..., in] @ w[out, in]^T` for any rank of `x`.
fn matmul_last<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    precision: Precision,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = x.shape().num_elements() / d_in;
    let y = precision.matmul_transposed(x.reshape([rows, d_in]), w);
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// Low-rank adapter: `scale * (x @ A^T) @ B^T`, with `A: [r, in]`, `B: [out, r]`.
/// B starts at zero so a fresh adapter leaves the layer's output unchanged.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    /// alpha / rank
    #[module(skip)]
    pub scale: f32,
    /// Dropout on the adapter's input, active only while gradients are tracked.
    #[module(skip)]
    pub dropout: f32,
}

impl<B: Backend> Lora<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout as f64;
            let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
            x * mask.div_scalar(keep)
        } else {
            x
        };
        let down = matmul_last(x, self.lora_a.val(), Precision::F32);
        matmul_last(down, self.lora_b.val(), Precision::F32).mul_scalar(self.scale)
    }
}

/// Root-mean-square norm, computed as `transformers` does: `weight * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(dim: usize, eps: f64, init: &mut ParamInit, device: &B::Device) -> Self {
        Self {
            weight: init.constant([dim], 1.0, device),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match crate::cpu_fused::rms_norm(x, self.weight.val(), self.eps) {
            Ok(normed) => return normed,
            Err((x, _)) => x,
        };
        let variance = x.clone().square().mean_dim(D - 1);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze()
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), tokens)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct SwiGluMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> SwiGluMlp<B> {
    pub fn new(hidden: usize, inner: usize, init: &mut ParamInit, device: &B::Device) -> Self {
        Self {
            gate_proj: Linear::new(hidden, inner, false, init, device),
            up_proj: Linear::new(hidden, inner, false, init, device),
            down_proj: Linear::new(inner, hidden, false, init, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        let gated = match crate::cpu_fused::silu_gate(gate, up) {
            Ok(gated) => gated,
            Err((gate, up)) => silu(gate) * up,
        };
        self.down_proj.forward(gated)
    }
}

/// Rotary position embedding in the Hugging Face convention (`rotate_half`: the two halves
/// of each head are the two coordinates of a rotated pair).
#[derive(Debug, Clone)]
pub struct Rope {
    /// One inverse frequency per rotated pair: `head_dim / 2` values.
    pub inv_freq: Vec<f32>,
    /// Multiplier on cos and sin (1 except for some scaled variants).
    pub attention_scaling: f32,
}

/// cos and sin for a batch of positions, each `[batch, 1, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    /// The tables spread over every head, made once per head count and shared by all layers:
    /// element-wise products of same-shaped contiguous tensors take the CPU backend's fast
    /// path, where a broadcast over heads walks every element through strided indexing.
    spread: std::sync::Arc<std::sync::Mutex<Vec<SpreadTables<B>>>>,
}

/// `[batch, seq, heads, head_dim]` cos and sin, and the `[head_dim, head_dim]` matrix that
/// rotates halves.
#[derive(Debug, Clone)]
struct SpreadTables<B: Backend> {
    heads: usize,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    rotation: Tensor<B, 2>,
}

impl Rope {
    /// Plain frequencies `1 / theta^(2i / head_dim)`, in f32 as `transformers` computes them.
    pub fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect()
    }

    /// Llama 3's scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    /// blend in between (`_compute_llama3_parameters` in `transformers`).
    pub fn llama3_inv_freq(
        base: &[f32],
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    ) -> Vec<f32> {
        let low_freq_wavelen = original_context / low_freq_factor;
        let high_freq_wavelen = original_context / high_freq_factor;
        base.iter()
            .map(|&freq| {
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen > low_freq_wavelen {
                    freq / factor
                } else if wavelen < high_freq_wavelen {
                    freq
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            })
            .collect()
    }

    pub fn tables<B: Backend>(&self, positions: Tensor<B, 2, Int>) -> RopeTables<B> {
        let device = positions.device();
        let half = self.inv_freq.len();
        let inv_freq =
            Tensor::<B, 1>::from_floats(self.inv_freq.as_slice(), &device).reshape([1, 1, half]);
        let freqs = positions.float().unsqueeze_dim::<3>(2) * inv_freq; // [b, s, half]
        let angles = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
        let mut cos = angles.clone().cos();
        let mut sin = angles.sin();
        if self.attention_scaling != 1.0 {
            cos = cos.mul_scalar(self.attention_scaling);
            sin = sin.mul_scalar(self.attention_scaling);
        }
        RopeTables::new(cos, sin)
    }
}

impl<B: Backend> RopeTables<B> {
    /// Tables from cos and sin, each `[batch, 1, seq, head_dim]`.
    pub fn new(cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Self {
        Self {
            cos,
            sin,
            spread: Default::default(),
        }
    }

    /// Rotates `x: [batch, seq, heads, head_dim]` (the layout the projections produce):
    /// `x * cos + rotate_half(x) * sin`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let tables = self.spread_over(h);
        let x = match crate::cpu_fused::rope(x, &tables.cos, &tables.sin) {
            Ok(rotated) => return rotated,
            Err(x) => x,
        };
        // rotate_half(x) = [-x2, x1] as one product with a signed permutation: exact (each
        // output is one input times ±1) and free of the strided copies of slicing and cat.
        let rotated = x
            .clone()
            .reshape([b * s * h, d])
            .matmul(tables.rotation)
            .reshape([b, s, h, d]);
        x * tables.cos + rotated * tables.sin
    }

    fn spread_over(&self, heads: usize) -> SpreadTables<B> {
        let mut made = self.spread.lock().expect("rope tables lock");
        if let Some(tables) = made.iter().find(|t| t.heads == heads) {
            return tables.clone();
        }
        let [b, _, s, d] = self.cos.dims();
        // Reshaping the expanded view copies it into a contiguous tensor.
        let spread = |t: &Tensor<B, 4>| {
            t.clone()
                .swap_dims(1, 2)
                .expand([b, s, heads, d])
                .reshape([b * s, heads * d])
                .reshape([b, s, heads, d])
        };
        let half = d / 2;
        let mut rotation = vec![0f32; d * d];
        for j in 0..half {
            rotation[(j + half) * d + j] = -1.0; // output j takes -x[j + d/2]
            rotation[j * d + j + half] = 1.0; // output j + d/2 takes x[j]
        }
        let device = self.cos.device();
        let tables = SpreadTables {
            heads,
            cos: spread(&self.cos),
            sin: spread(&self.sin),
            rotation: Tensor::from_data(TensorData::new(rotation, [d, d]), &device),
        };
        made.push(tables.clone());
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::ParamInit;
    use burn::tensor::DType;

    type B = burn::backend::Autodiff<crate::Cpu>;

    /// The rotation as `transformers` writes it: `x * cos + rotate_half(x) * sin`, with
    /// `rotate_half` slicing the halves apart; ours multiplies by a signed permutation
    /// instead, which must give the same bits, also for the second head count of a table.
    #[test]
    fn rope_rotation_equals_rotate_half_bit_for_bit() {
        let device = Default::default();
        let mut init = ParamInit::normal(3, 1.0);
        let rope = Rope {
            inv_freq: Rope::default_inv_freq(10000.0, 8),
            attention_scaling: 1.0,
        };
        let positions = Tensor::<crate::Cpu, 2, Int>::from_data([[0i64, 1, 2], [5, 3, 0]], &device);
        let tables = rope.tables(positions);
        for heads in [4, 2, 4] {
            let x: Tensor<crate::Cpu, 4> = init.tensor([2, 3, heads, 8], &device).val();
            let ours = tables.apply(x.clone());
            let x = x.swap_dims(1, 2); // [batch, heads, seq, head_dim]
            let first = x.clone().slice(s![.., .., .., 0..4]);
            let second = x.clone().slice(s![.., .., .., 4..8]);
            let rotated = Tensor::cat(vec![second.neg(), first], 3);
            let expected = x * tables.cos.clone() + rotated * tables.sin.clone();
            assert_eq!(
                ours.swap_dims(1, 2).into_data().to_vec::<f32>().unwrap(),
                expected.into_data().to_vec::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn bf16_linear_rounds_like_bfloat16_and_trains_f32_weights() {
        let device = Default::default();
        let mut init = ParamInit::normal(7, 1.0);
        let mut linear = Linear::<B>::new(64, 32, true, &mut init, &device);
        let x: Tensor<B, 3> = init.tensor([2, 5, 64], &device).val();
        let exact = linear.forward(x.clone());
        linear.precision = Precision::Bf16;
        let rounded = linear.forward(x.clone());
        assert_eq!(rounded.dtype(), DType::F32, "the output comes back as f32");
        // bfloat16 keeps 8 significant bits: products of 64 terms of size ~1 err by ~1e-2,
        // and never by nothing at all.
        let error: f32 = (rounded.clone() - exact.clone()).abs().max().into_scalar();
        let scale: f32 = exact.abs().max().into_scalar();
        assert!(
            error > 0.0 && error < 0.05 * scale,
            "error {error} at scale {scale}"
        );
        // Gradients reach the f32 weights through the casts.
        let grads = rounded.sum().backward();
        let weight_grad = linear.weight.grad(&grads).unwrap();
        assert_eq!(weight_grad.dtype(), DType::F32);
        assert_eq!(weight_grad.dims(), [32, 64]);
    }
}
