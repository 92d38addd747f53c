//! The `config.json` of the Llama family (Llama 2/3, Qwen2/2.5, SmolLM2): what the model
//! files read and write, in both the `transformers` 4 and 5 layouts.

use super::layers::Rope;
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// The config.json key that says a model carries SkipGPT routers.
pub const SKIP_ROUTERS_KEY: &str = "skipgpt_routers";
/// The config.json key that says which modules the routers cover, when not both
/// (`"attention"` or `"mlp"`).
pub const ROUTED_MODULES_KEY: &str = "skipgpt_routed_modules";

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
    /// Which modules the routers cover (`"skipgpt_routed_modules"`; both when absent).
    pub routed_modules: super::router::RoutedModules,
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
            routed_modules: Default::default(),
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
            routed_modules: match json.get(ROUTED_MODULES_KEY) {
                None => Default::default(),
                Some(value) => serde_json::from_value(value.clone()).map_err(|_| {
                    anyhow::anyhow!(
                        "config.json: `{ROUTED_MODULES_KEY}` = {value}: expected \"both\", \"attention\" or \"mlp\""
                    )
                })?,
            },
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
            // The depth may have changed since loading (`retain_layers`).
            map.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
            if let Some(Value::Array(kinds)) = map.get_mut("layer_types") {
                kinds.truncate(self.num_hidden_layers);
            }
            if self.skip_routers {
                map.insert(SKIP_ROUTERS_KEY.into(), Value::Bool(true));
            } else {
                map.remove(SKIP_ROUTERS_KEY);
            }
            match self.routed_modules {
                super::router::RoutedModules::Both => map.remove(ROUTED_MODULES_KEY),
                routed => map.insert(ROUTED_MODULES_KEY.into(), json!(routed)),
            };
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
