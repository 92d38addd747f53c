//! Vision modules shared by the vision-language recipes: a small ViT patch encoder (the CLIP
//! vision tower's layout and names: `patch_embedding`, `position_embedding`, pre-norm layers
//! with `self_attn.{q,k,v,out}_proj` and `mlp.fc1/fc2`, `post_layernorm`) and the LLaVA
//! projector (`linear_1`, GELU, `linear_2`) into the language model's embedding space.
//!
//! The patch embedding is a linear map over flattened `patch x patch x 3` pixels, which is
//! what CLIP's stride-`patch` convolution computes.

use super::attention::grouped_attention;
use super::init::ParamInit;
use super::layers::Linear;
use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use serde::{Deserialize, Serialize};

/// The vision tower's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
}

impl VisionConfig {
    /// Visual tokens per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn validate(&self, prefix: &str) -> anyhow::Result<()> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            anyhow::bail!(
                "{prefix}.patch_size = {} must divide {prefix}.image_size = {}",
                self.patch_size,
                self.image_size
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            anyhow::bail!(
                "{prefix}.hidden_size = {} must be a multiple of {prefix}.num_attention_heads = {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(())
    }
}

/// `[batch, 3, size, size] -> [batch, patches, 3 * patch * patch]`, patches in raster order
/// (row by row), each flattened channel-major as a convolution's kernel is.
pub fn patchify<B: Backend>(images: Tensor<B, 4>, patch: usize) -> Tensor<B, 3> {
    let [batch, channels, height, width] = images.dims();
    let (rows, cols) = (height / patch, width / patch);
    images
        .reshape([batch, channels, rows, patch, cols, patch])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([batch, rows * cols, channels * patch * patch])
}

#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
}

impl<B: Backend> VisionAttention<B> {
    /// `[batch, n, dim] -> [batch, heads, n, head_dim]`.
    fn heads(&self, t: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, n, dim] = t.dims();
        t.reshape([batch, n, self.num_heads, dim / self.num_heads])
            .swap_dims(1, 2)
    }

    /// Every patch attends to every patch (no mask, no positions: those were added to the
    /// embeddings).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, n, dim] = x.dims();
        let q = self.heads(self.q_proj.forward(x.clone()));
        let k = self.heads(self.k_proj.forward(x.clone()));
        let v = self.heads(self.v_proj.forward(x));
        let open = Tensor::<B, 4, Int>::zeros([batch, 1, n, n], &q.device()).equal_elem(1);
        let (out, _) = grouped_attention(q, k, v, open, None, false);
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([batch, n, dim]))
    }

    /// The attention probabilities `[batch, heads, q, n]` of the rows `queries: [batch, q]` of
    /// `x` over all of them: what token pruning inside a ViT scores tokens by (a tracker's
    /// template centre attending to its search region, say).
    pub fn probabilities_of(&self, x: Tensor<B, 3>, queries: Tensor<B, 2, Int>) -> Tensor<B, 4> {
        let [batch, n, dim] = x.dims();
        let q_count = queries.dims()[1];
        let rows = x.clone().gather(
            1,
            queries
                .reshape([batch, q_count, 1])
                .expand([batch, q_count, dim]),
        );
        let q = self.heads(self.q_proj.forward(rows));
        let k = self.heads(self.k_proj.forward(x));
        let open = Tensor::<B, 4, Int>::zeros([batch, 1, q_count, n], &q.device()).equal_elem(1);
        let (_, probs) = grouped_attention(q, k.clone(), k, open, None, true);
        probs.expect("asked for probabilities")
    }
}

#[derive(Module, Debug)]
pub struct VisionMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

#[derive(Module, Debug)]
pub struct VisionLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: VisionAttention<B>,
    pub layer_norm2: LayerNorm<B>,
    pub mlp: VisionMlp<B>,
}

impl<B: Backend> VisionLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let inner = gelu(self.mlp.fc1.forward(self.layer_norm2.forward(x.clone())));
        x + self.mlp.fc2.forward(inner)
    }
}

/// The ViT patch encoder: images to one vector per patch.
#[derive(Module, Debug)]
pub struct VisionTower<B: Backend> {
    pub patch_embedding: Linear<B>,
    /// `[patches, hidden]`, learned.
    pub position_embedding: Param<Tensor<B, 2>>,
    pub layers: Vec<VisionLayer<B>>,
    pub post_layernorm: LayerNorm<B>,
    #[module(skip)]
    pub config: VisionConfig,
}

impl<B: Backend> VisionTower<B> {
    pub fn new(config: &VisionConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let d = config.hidden_size;
        let p = config.patch_size;
        let norm = || LayerNormConfig::new(d).init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| VisionLayer {
                layer_norm1: norm(),
                self_attn: VisionAttention {
                    q_proj: Linear::new(d, d, true, init, device),
                    k_proj: Linear::new(d, d, true, init, device),
                    v_proj: Linear::new(d, d, true, init, device),
                    out_proj: Linear::new(d, d, true, init, device),
                    num_heads: config.num_attention_heads,
                },
                layer_norm2: norm(),
                mlp: VisionMlp {
                    fc1: Linear::new(d, config.intermediate_size, true, init, device),
                    fc2: Linear::new(config.intermediate_size, d, true, init, device),
                },
            })
            .collect();
        Self {
            patch_embedding: Linear::new(3 * p * p, d, true, init, device),
            position_embedding: init.tensor([config.num_patches(), d], device),
            layers,
            post_layernorm: norm(),
            config: *config,
        }
    }

    /// `[batch, 3, size, size]` (values in [0, 1]) to `[batch, patches, hidden]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        // Centre the pixels, as CLIP's image processor normalises them.
        let patches = patchify(images * 2.0 - 1.0, self.config.patch_size);
        let mut x =
            self.patch_embedding.forward(patches) + self.position_embedding.val().unsqueeze();
        for layer in &self.layers {
            x = layer.forward(x);
        }
        self.post_layernorm.forward(x)
    }
}

/// LLaVA's projector: vision features to the language model's embedding space.
#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> Projector<B> {
    pub fn new(d_vision: usize, d_text: usize, init: &mut ParamInit, device: &B::Device) -> Self {
        Self {
            linear_1: Linear::new(d_vision, d_text, true, init, device),
            linear_2: Linear::new(d_text, d_text, true, init, device),
        }
    }

    pub fn forward(&self, features: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear_2.forward(gelu(self.linear_1.forward(features)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::Cpu;

    #[test]
    fn patches_are_taken_in_raster_order_channel_major() {
        let device = Default::default();
        // 1 image, 3 channels, 4x4 pixels, value = 100 c + 10 y + x.
        let values: Vec<f32> = (0..3)
            .flat_map(|c| {
                (0..4).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))
            })
            .collect();
        let images = Tensor::<B, 1>::from_floats(values.as_slice(), &device).reshape([1, 3, 4, 4]);
        let patches: Vec<f32> = patchify(images, 2).into_data().to_vec().unwrap();
        // Patch 1 is the top-right 2x2: rows 0-1, columns 2-3.
        let second = &patches[12..24];
        assert_eq!(
            second,
            &[2., 3., 12., 13., 102., 103., 112., 113., 202., 203., 212., 213.]
        );
    }

    #[test]
    fn tokens_can_be_pruned_between_vit_layers_with_the_shared_operators() {
        use crate::model::token_pruning::{attention_received, rank_sigmoid_top_k};
        let device = Default::default();
        let config = VisionConfig {
            image_size: 8,
            patch_size: 2,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
        };
        let tower = VisionTower::<B>::new(&config, &mut ParamInit::normal(5, 0.3), &device);
        let images = Tensor::<B, 4>::random(
            [2, 3, 8, 8],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let patches = patchify(images, 2);
        let x = tower.patch_embedding.forward(patches) + tower.position_embedding.val().unsqueeze();
        let x = tower.layers[0].forward(x);
        // Token 0 (say, a template's centre) scores the others for the next layer.
        let normed = tower.layers[1].layer_norm1.forward(x.clone());
        let probs = tower.layers[1]
            .self_attn
            .probabilities_of(normed, Tensor::zeros([2, 1], &device));
        assert_eq!(probs.dims(), [2, 2, 1, 16]);
        let sums: Vec<f32> = probs.clone().sum_dim(3).into_data().to_vec().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        let top = rank_sigmoid_top_k(attention_received(probs, 1..16), 5, 1.0, 0.1);
        let kept = x
            .slice(s![.., 1..16, ..])
            .gather(1, top.indices.reshape([2, 5, 1]).expand([2, 5, 8]));
        assert_eq!(tower.layers[1].forward(kept).dims(), [2, 5, 8]);
    }

    #[test]
    fn the_tower_maps_images_to_one_vector_per_patch() {
        let device = Default::default();
        let config = VisionConfig {
            image_size: 8,
            patch_size: 4,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
        };
        let tower = VisionTower::<B>::new(&config, &mut ParamInit::normal(0, 0.02), &device);
        let out = tower.forward(Tensor::ones([2, 3, 8, 8], &device));
        assert_eq!(out.dims(), [2, 4, 16]);
        let projector = Projector::<B>::new(16, 24, &mut ParamInit::normal(1, 0.02), &device);
        assert_eq!(projector.forward(out).dims(), [2, 4, 24]);
    }
}
