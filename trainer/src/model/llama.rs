//! The Llama family of decoder-only models (Llama 2/3, Qwen2/2.5, SmolLM2): token embedding,
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, tied or untied head.
//!
//! Field names mirror the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`),
//! so a parameter's module path is its key in `model.safetensors`.
//!
//! Built for the recipes: attention takes an explicit mask and explicit position ids, each
//! layer can gate its attention and MLP per token, the layers can be driven one by one (so a
//! recipe may shorten or extend the hidden sequence between them), and every linear can carry
//! a LoRA adapter.

use super::init::ParamInit;
use super::layers::{Embedding, Linear, Precision, RmsNorm, Rope, RopeTables, SwiGluMlp};
use super::router::LayerRouter;
use crate::weights;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use checkpoints::hf_folder::{save_hf_folder, HfFolder, CONFIG_FILE};
use checkpoints::StoreDtype;
use serde_json::{json, Value};
use std::path::Path;

/// The config.json key that says a model carries SkipGPT routers.
pub const SKIP_ROUTERS_KEY: &str = "skipgpt_routers";

/// The subset of a Hugging Face `config.json` this family needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama` or `qwen2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Bias on q, k and v projections (always on for Qwen2).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// SkipGPT token routers on every layer (`"skipgpt_routers": true` in config.json);
    /// their weights are `model.layers.N.router.{attn,mlp}.{fc1,fc2}.{weight,bias}`.
    pub skip_routers: bool,
    /// The original config.json, written back unchanged on save (keeps keys we do not use).
    pub original: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f32,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: f32,
    },
}

impl LlamaConfig {
    /// A small config for models trained from scratch (tests, the default recipe runs).
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 8 / 3 / 8 * 8,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: true,
            max_position_embeddings: 2048,
            bos_token_id: None,
            eos_token_ids: vec![],
            skip_routers: false,
            original: None,
        }
    }

    /// Reads `config.json` of a Hugging Face folder. Understands both the `transformers` 4
    /// layout (`rope_theta` + `rope_scaling`) and the 5 layout (`rope_parameters`).
    pub fn from_json(json: &Value, source: &str) -> Result<Self> {
        let key_error = |key: &str, what: &str| anyhow::anyhow!("{source}: `{key}` {what}");
        let usize_key = |key: &str| -> Result<usize> {
            json.get(key)
                .ok_or_else(|| key_error(key, "is missing"))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| key_error(key, "must be a non-negative integer"))
        };
        let f64_or = |key: &str, default: f64| -> Result<f64> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| key_error(key, "must be a number")),
            }
        };
        let bool_or = |key: &str, default: bool| -> Result<bool> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| key_error(key, "must be true or false")),
            }
        };

        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| key_error("model_type", "is missing"))?
            .to_string();
        if !matches!(model_type.as_str(), "llama" | "qwen2") {
            bail!("{source}: `model_type` is `{model_type}`; supported: llama, qwen2");
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("{source}: `hidden_act` is `{act}`; only silu is supported");
            }
        }
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_key_value_heads = match json.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_key("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads,
            Some(_) => usize_key("head_dim")?,
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            bail!(
                "{source}: `num_attention_heads` ({num_attention_heads}) must be a positive \
                 multiple of `num_key_value_heads` ({num_key_value_heads})"
            );
        }
        if head_dim % 2 != 0 {
            bail!("{source}: `head_dim` ({head_dim}) must be even for rotary positions");
        }

        // transformers 5 puts theta and scaling together in `rope_parameters`.
        let rope_parameters = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(theta) => theta
                .as_f64()
                .ok_or_else(|| key_error("rope_parameters.rope_theta", "must be a number"))?,
            None => f64_or("rope_theta", 10000.0)?,
        };
        let scaling =
            rope_parameters.or_else(|| json.get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling {
            Some(s) => parse_rope_scaling(s, source)?,
            None => None,
        };

        let eos_token_ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            Some(v) => vec![v
                .as_u64()
                .ok_or_else(|| key_error("eos_token_id", "must be an id or a list of ids"))?
                as u32],
        };
        let is_qwen2 = model_type == "qwen2";
        Ok(Self {
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            attention_bias: is_qwen2 || bool_or("attention_bias", false)?,
            mlp_bias: bool_or("mlp_bias", false)?,
            tie_word_embeddings: bool_or("tie_word_embeddings", false)?,
            max_position_embeddings: json
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            bos_token_id: json
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as u32),
            eos_token_ids,
            model_type,
            skip_routers: bool_or(SKIP_ROUTERS_KEY, false)?,
            original: Some(json.clone()),
        })
    }

    /// The config.json to save: the original one if the model was loaded, else a fresh one in
    /// the layout both `transformers` 4 and 5 read.
    pub fn to_json(&self) -> Value {
        let mut config = match &self.original {
            Some(original) => original.clone(),
            None => self.fresh_json(),
        };
        if let Some(map) = config.as_object_mut() {
            if self.skip_routers {
                map.insert(SKIP_ROUTERS_KEY.into(), Value::Bool(true));
            } else {
                map.remove(SKIP_ROUTERS_KEY);
            }
        }
        config
    }

    fn fresh_json(&self) -> Value {
        let architecture = if self.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let mut config = json!({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        });
        if let Some(scaling) = &self.rope_scaling {
            config["rope_scaling"] = match scaling {
                RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                } => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_context,
                }),
            };
        }
        config
    }

    /// The same config with `original` dropped, to compare what the model uses.
    pub fn without_original(&self) -> Self {
        Self {
            original: None,
            ..self.clone()
        }
    }

    pub fn rope(&self) -> Rope {
        let base = Rope::default_inv_freq(self.rope_theta, self.head_dim);
        let inv_freq = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }) => Rope::llama3_inv_freq(
                &base,
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_context,
            ),
        };
        Rope {
            inv_freq,
            attention_scaling: 1.0,
        }
    }

    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attention = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attention + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}

fn parse_rope_scaling(scaling: &Value, source: &str) -> Result<Option<RopeScaling>> {
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| -> Result<f32> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| {
                anyhow::anyhow!("{source}: rope scaling `{key}` is missing or not a number")
            })
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_context: number("original_max_position_embeddings")?,
        }),
        other => {
            bail!("{source}: rope type `{other}` is not supported (default, linear, llama3 are)")
        }
    })
}

/// Per-token gates on a layer's two residual branches, each `[batch, seq, 1]`:
/// `h = h + g_attn * Attn(norm(h))`, `h = h + g_mlp * MLP(norm(h))`. `None` means always on.
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

/// What attention needs besides the hidden states: rotary tables for the query positions and
/// a boolean mask `[batch, 1, queries, keys]` in which `true` means "may attend".
#[derive(Debug, Clone)]
pub struct AttentionContext<B: Backend> {
    pub rope: RopeTables<B>,
    pub allowed: Tensor<B, 4, Bool>,
}

/// Keys and values of earlier positions, one entry per layer, each `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let bias = config.attention_bias;
        Self {
            q_proj: Linear::new(h, q, bias, init, device),
            k_proj: Linear::new(h, kv, bias, init, device),
            v_proj: Linear::new(h, kv, bias, init, device),
            o_proj: Linear::new(q, h, false, init, device),
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        }
    }

    /// `x: [batch, seq, hidden]`. With a cache, the new keys and values are appended to it
    /// and the queries attend over everything cached.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: &AttentionContext<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let q = context
            .rope
            .apply(heads(self.q_proj.forward(x.clone()), self.num_heads));
        let mut k = context
            .rope
            .apply(heads(self.k_proj.forward(x.clone()), self.num_kv_heads));
        let mut v = heads(self.v_proj.forward(x), self.num_kv_heads);
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 2);
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let out = grouped_attention(q, k, v, context.allowed.clone().bool_not());
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// `softmax(q k^T / sqrt(head_dim)) v` for queries `q: [batch, heads, queries, head_dim]` and
/// keys and values `[batch, kv_heads, keys, head_dim]`, each key/value head serving
/// `heads / kv_heads` consecutive query heads (grouped-query attention, as `repeat_kv` in
/// `transformers`). The queries of a group are stacked as the rows of one matrix product, so
/// keys and values are never copied per query head (that copy of the whole KV cache took half
/// of the decoding time). `blocked: [batch, 1, queries, keys]` is true where a query may not
/// look. Returns `[batch, heads, queries, head_dim]`.
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    blocked: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let [batch, heads, queries, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let groups = heads / kv_heads;
    let scores = q
        .reshape([batch, kv_heads, groups * queries, head_dim])
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((head_dim as f64).powf(-0.5))
        .reshape([batch, kv_heads, groups, queries, keys]);
    // f32::MIN rather than -inf: a fully masked row (a padding query) stays finite.
    let scores = scores.mask_fill(blocked.unsqueeze_dim::<5>(2), f32::MIN);
    softmax(scores, 4)
        .reshape([batch, kv_heads, groups * queries, keys])
        .matmul(v)
        .reshape([batch, heads, queries, head_dim])
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: SwiGluMlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// SkipGPT's per-token routers (`None` for a dense model).
    pub router: Option<LayerRouter<B>>,
}

impl<B: Backend> DecoderLayer<B> {
    fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let mut mlp = SwiGluMlp::new(config.hidden_size, config.intermediate_size, init, device);
        if config.mlp_bias {
            for linear in [&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.down_proj] {
                linear.bias = Some(init.constant([linear.d_out()], 0.0, device));
            }
        }
        Self {
            self_attn: Attention::new(config, init, device),
            mlp,
            input_layernorm: RmsNorm::new(config.hidden_size, config.rms_norm_eps, init, device),
            post_attention_layernorm: RmsNorm::new(
                config.hidden_size,
                config.rms_norm_eps,
                init,
                device,
            ),
            router: config
                .skip_routers
                .then(|| LayerRouter::new(config.hidden_size, init, device)),
        }
    }

    /// The gates inference uses: deterministic routing when the layer has routers.
    pub fn inference_gates(&self, hidden: &Tensor<B, 3>) -> LayerGates<B> {
        match &self.router {
            Some(router) => router.hard_gates(hidden.clone()),
            None => LayerGates::default(),
        }
    }

    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        context: &AttentionContext<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        gates: &LayerGates<B>,
    ) -> Tensor<B, 3> {
        let attn =
            self.self_attn
                .forward(self.input_layernorm.forward(hidden.clone()), context, cache);
        let hidden = hidden + gated(attn, &gates.attn);
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(hidden.clone()));
        hidden + gated(mlp, &gates.mlp)
    }
}

fn gated<B: Backend>(branch: Tensor<B, 3>, gate: &Option<Tensor<B, 3>>) -> Tensor<B, 3> {
    match gate {
        Some(gate) => branch * gate.clone(),
        None => branch,
    }
}

#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A Llama-family language model with its head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the head is tied to the token embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: LlamaConfig,
    #[module(skip)]
    pub rope: Rope,
    /// What the linear layers and a tied head multiply in (see [`Precision`]).
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> CausalLm<B> {
    pub fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let embed_tokens = Embedding {
            weight: init.tensor([config.vocab_size, config.hidden_size], device),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer::new(config, init, device))
            .collect();
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, init, device);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| Linear::new(config.hidden_size, config.vocab_size, false, init, device));
        Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config: config.clone(),
            rope: config.rope(),
            precision: Precision::F32,
        }
    }

    /// Loads a Hugging Face folder (config.json + safetensors, single or sharded).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let folder = HfFolder::new(dir)?;
        let config_path = folder.path(CONFIG_FILE);
        let config = LlamaConfig::from_json(&folder.config()?, &config_path.display().to_string())?;
        let source = folder.weights()?;
        let model = Self::new(&config, &mut ParamInit::Lazy, device);
        let (model, unused) = weights::load_from_source(model, &source)?;
        let unused: Vec<_> = unused
            .into_iter()
            .filter(|k| !checkpoints::names::is_ignorable_hf_key(k))
            .collect();
        if !unused.is_empty() {
            bail!(
                "{} holds tensors this model does not use: {} (does config.json match the weights?)",
                source.describe(),
                unused.join(", ")
            );
        }
        Ok(model)
    }

    /// Saves config.json and model.safetensors (plus the tokenizer files of `tokenizer_from`).
    pub fn save(&self, dir: &Path, dtype: StoreDtype, tokenizer_from: Option<&Path>) -> Result<()> {
        let tensors = weights::named_tensors(self);
        save_hf_folder(dir, &self.config.to_json(), &tensors, dtype, tokenizer_from)
            .with_context(|| format!("saving model to {}", dir.display()))
    }

    /// Runs the linear layers' matmuls (and a tied head's) in `precision`; weights stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for (_, linear) in self.linears_mut() {
            linear.precision = precision;
        }
        self.precision = precision;
        self
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`), for
    /// attaching adapters by name.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            let attn = &mut layer.self_attn;
            for (name, linear) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                out.push((format!("{prefix}.self_attn.{name}"), linear));
            }
            let mlp = &mut layer.mlp;
            for (name, linear) in [
                ("gate_proj", &mut mlp.gate_proj),
                ("up_proj", &mut mlp.up_proj),
                ("down_proj", &mut mlp.down_proj),
            ] {
                out.push((format!("{prefix}.mlp.{name}"), linear));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Adds fresh SkipGPT routers to every layer (Kaiming-uniform weights, zero bias).
    pub fn with_routers(mut self, seed: u64) -> Self {
        let device = self.device();
        let mut init = ParamInit::normal(seed, 0.0);
        let hidden = self.config.hidden_size;
        for layer in &mut self.model.layers {
            layer.router = Some(LayerRouter::new(hidden, &mut init, &device));
        }
        self.config.skip_routers = true;
        self
    }

    /// The dense model: routers removed, every module runs for every token.
    pub fn without_routers(mut self) -> Self {
        for layer in &mut self.model.layers {
            layer.router = None;
        }
        self.config.skip_routers = false;
        self
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.lazy_device()
    }

    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(tokens)
    }

    pub fn attention_context(
        &self,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
    ) -> AttentionContext<B> {
        AttentionContext {
            rope: self.rope.tables(positions),
            allowed,
        }
    }

    /// Final norm and output head: `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = self.model.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [batch, seq, dim] = hidden.dims();
                let embedding = self.model.embed_tokens.weight.val();
                let vocab = embedding.dims()[0];
                self.precision
                    .matmul_transposed(hidden.reshape([batch * seq, dim]), embedding)
                    .reshape([batch, seq, vocab])
            }
        }
    }

    /// Logits for `tokens: [batch, seq]` at `positions: [batch, seq]` under mask `allowed`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let context = self.attention_context(positions, allowed);
        let mut hidden = self.embed(tokens);
        for layer in &self.model.layers {
            let gates = layer.inference_gates(&hidden);
            hidden = layer.forward(hidden, &context, None, &gates);
        }
        self.head(hidden)
    }

    /// As [`forward`](Self::forward), attending also over `cache` and appending to it.
    /// `allowed` covers all keys: `[batch, 1, new, cached + new]`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        if self.config.skip_routers {
            // A routed model really skips while generating, too.
            return self.forward_skipping_cached(tokens, positions, allowed, cache);
        }
        let context = self.attention_context(positions, allowed);
        let mut hidden = self.embed(tokens);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            let gates = layer.inference_gates(&hidden);
            hidden = layer.forward(hidden, &context, Some(slot), &gates);
        }
        self.head(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::Cpu;

    /// What `grouped_attention` replaces: every key/value head copied per query head
    /// (`repeat_kv` in `transformers`), then plain attention.
    fn attention_with_copied_heads(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        blocked: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 4> {
        let [batch, heads, _, head_dim] = q.dims();
        let [_, kv_heads, keys, _] = k.dims();
        let repeat = |x: Tensor<B, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([batch, kv_heads, heads / kv_heads, keys, head_dim])
                .reshape([batch, heads, keys, head_dim])
        };
        let scores = q
            .matmul(repeat(k).swap_dims(2, 3))
            .mul_scalar((head_dim as f64).powf(-0.5))
            .mask_fill(blocked, f32::MIN);
        softmax(scores, 3).matmul(repeat(v))
    }

    #[test]
    fn grouped_attention_equals_attention_over_copied_heads() {
        let device = Default::default();
        let mut init = ParamInit::normal(11, 1.0);
        let (batch, heads, kv_heads, queries, keys, head_dim) = (2, 6, 2, 3, 5, 4);
        let q: Tensor<B, 4> = init
            .tensor([batch, heads, queries, head_dim], &device)
            .val();
        let k: Tensor<B, 4> = init
            .tensor([batch, kv_heads, keys, head_dim], &device)
            .val();
        let v: Tensor<B, 4> = init
            .tensor([batch, kv_heads, keys, head_dim], &device)
            .val();
        // Causal over the last `queries` keys, and the first key of row 1 is padding.
        let mut blocked = vec![false; batch * queries * keys];
        for (row, query, key) in (0..batch)
            .flat_map(|b| (0..queries).flat_map(move |q| (0..keys).map(move |k| (b, q, k))))
        {
            let causal = key > keys - queries + query;
            blocked[(row * queries + query) * keys + key] = causal || (row == 1 && key == 0);
        }
        let blocked = Tensor::<B, 1, Bool>::from_bool(
            burn::tensor::TensorData::new(blocked, [batch * queries * keys]),
            &device,
        )
        .reshape([batch, 1, queries, keys]);
        let expected =
            attention_with_copied_heads(q.clone(), k.clone(), v.clone(), blocked.clone());
        let got = grouped_attention(q, k, v, blocked);
        assert_eq!(got.dims(), [batch, heads, queries, head_dim]);
        let difference: f32 = (got - expected).abs().max().into_scalar();
        assert!(difference < 1e-5, "max difference {difference}");
    }
}
