//! GGUF -> Hugging Face folder: config.json from the architecture's metadata, tensors renamed
//! from llama.cpp's names to transformers', q/k rows put back in Hugging Face's rotary order,
//! and the tokenizer rebuilt from the vocabulary.

use super::tokenizer::rebuild_tokenizer;
use super::{GgufFile, MetaValue};
use crate::atomic;
use crate::hf_folder::{
    save_hf_folder, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use crate::safetensors_io::{HostTensor, StoreDtype};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// What an import did, for the command's report.
#[derive(Debug)]
pub struct ImportSummary {
    pub architecture: String,
    pub model_name: Option<String>,
    pub parameters: usize,
    /// Tensor count per GGML type name.
    pub tensor_types: BTreeMap<String, usize>,
}

/// Hugging Face name of a llama.cpp tensor (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

/// llama.cpp's converter interleaves the two rotary halves of each head's rows
/// (`reshape(heads, 2, d/2, n).swapaxes(1, 2)`); this is the inverse.
pub fn unpermute_rows(tensor: &HostTensor, heads: usize) -> Result<HostTensor> {
    let rows = tensor.shape[0];
    let row_len: usize = tensor.shape[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("{rows} rows cannot be split into {heads} heads with two rotary halves");
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut data = vec![0f32; tensor.data.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = head * head_dim + i * 2 + j;
                let to = head * head_dim + j * half + i;
                data[to * row_len..(to + 1) * row_len]
                    .copy_from_slice(&tensor.data[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    Ok(HostTensor::new(tensor.shape.clone(), data))
}

fn hf_config(gguf: &GgufFile, eos: Option<u64>, bos: Option<u64>) -> Result<(String, Value)> {
    let arch = gguf
        .require("general.architecture")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (model_type, class) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        other => bail!(
            "{}: architecture `{other}` is not supported (llama, qwen2 are)",
            gguf.path.display()
        ),
    };
    let key = |name: &str| format!("{arch}.{name}");
    let hidden = gguf.require_u64(&key("embedding_length"))?;
    let heads = gguf.require_u64(&key("attention.head_count"))?;
    let kv_heads = match gguf.get(&key("attention.head_count_kv")) {
        Some(_) => gguf.require_u64(&key("attention.head_count_kv"))?,
        None => heads,
    };
    let head_dim = match gguf.get(&key("attention.key_length")) {
        Some(v) => v.as_u64().unwrap_or(hidden / heads),
        None => hidden / heads,
    };
    let float = |name: &str, default: f64| -> Result<f64> {
        match gguf.get(&key(name)) {
            None => Ok(default),
            Some(v) => v.as_f64().with_context(|| {
                format!(
                    "{}: metadata `{}` is not a number",
                    gguf.path.display(),
                    key(name)
                )
            }),
        }
    };
    if let Some(kind) = gguf
        .get(&key("rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        if kind != "none" {
            bail!(
                "{}: rope scaling `{kind}` in GGUF metadata is not supported yet",
                gguf.path.display()
            );
        }
    }
    if gguf.tensor("rope_freqs.weight").is_some() {
        bail!(
            "{}: the model carries `rope_freqs.weight` (Llama 3.1-style rope scaling stored as \
             factors), which this importer cannot map back to a config yet",
            gguf.path.display()
        );
    }
    let embedding = gguf
        .tensor("token_embd.weight")
        .with_context(|| format!("{}: no tensor `token_embd.weight`", gguf.path.display()))?;
    let vocab_size = embedding.dims.get(1).copied().unwrap_or(0);
    let config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": gguf.require_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": gguf.require_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        // Stored as f32 in GGUF: print it as f32 so 1e-5 reads 1e-5, not 9.99999974e-6.
        "rms_norm_eps": shortest_decimal(float("attention.layer_norm_rms_epsilon", 1e-6)?),
        "rope_theta": float("rope.freq_base", 10000.0)?,
        "max_position_embeddings": gguf.require_u64(&key("context_length"))?,
        "attention_bias": model_type == "qwen2",
        "mlp_bias": false,
        "tie_word_embeddings": gguf.tensor("output.weight").is_none(),
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    Ok((arch, config))
}

fn shortest_decimal(value: f64) -> f64 {
    (value as f32).to_string().parse().unwrap_or(value)
}

/// Converts `gguf_path` into a Hugging Face folder at `out_dir` (weights stored as `dtype`).
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: StoreDtype) -> Result<ImportSummary> {
    let gguf = GgufFile::open(gguf_path)?;
    let tokenizer = rebuild_tokenizer(&gguf)?;
    let (architecture, config) = hf_config(&gguf, tokenizer.eos_token_id, tokenizer.bos_token_id)?;
    let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;

    let mut tensors = Vec::with_capacity(gguf.tensors.len());
    let mut tensor_types = BTreeMap::new();
    for info in &gguf.tensors {
        let Some(hf_name) = hf_tensor_name(&info.name) else {
            bail!(
                "{}: tensor `{}` ({}) has no Hugging Face counterpart in a {architecture} model",
                gguf.path.display(),
                info.name,
                info.ggml_type.name()
            );
        };
        let mut tensor = gguf.dequantized(info)?;
        // Only llama's converter permutes q/k; qwen2 keeps Hugging Face's order.
        if architecture == "llama" {
            let permuted_heads = match info.name.rsplit('.').nth(1) {
                Some("attn_q") => Some(heads),
                Some("attn_k") => Some(kv_heads),
                _ => None,
            };
            if let Some(h) = permuted_heads {
                tensor = unpermute_rows(&tensor, h)
                    .with_context(|| format!("tensor `{}`", info.name))?;
            }
        }
        *tensor_types
            .entry(info.ggml_type.name().to_string())
            .or_insert(0) += 1;
        tensors.push((hf_name, tensor));
    }

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).map(|s| s + "\n");
    atomic::write_file(
        &out_dir.join(TOKENIZER_FILE),
        serde_json::to_string(&tokenizer.tokenizer_json)?.as_bytes(),
    )?;
    atomic::write_file(
        &out_dir.join(TOKENIZER_CONFIG_FILE),
        pretty(&tokenizer.tokenizer_config)?.as_bytes(),
    )?;
    let generation = json!({
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    });
    atomic::write_file(
        &out_dir.join(GENERATION_CONFIG_FILE),
        pretty(&generation)?.as_bytes(),
    )?;
    let parameters = tensors.iter().map(|(_, t)| t.data.len()).sum();
    // Written last (config.json last of all): an interrupted import leaves no complete folder.
    save_hf_folder(out_dir, &config, &tensors, dtype, None)?;
    Ok(ImportSummary {
        architecture,
        model_name: gguf
            .get("general.name")
            .and_then(MetaValue::as_str)
            .map(String::from),
        parameters,
        tensor_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_k.weight").unwrap(),
            "model.layers.12.self_attn.k_proj.weight"
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_q.bias").unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_tensor_name("rope_freqs.weight").is_none());
        assert!(hf_tensor_name("blk.x.attn_q.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of four rows, one value per row: HF order [a0 a1 b0 b1] per head
        // (halves a, b) becomes [a0 b0 a1 b1] in llama.cpp.
        let gguf_order = HostTensor::new(vec![8, 1], vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let hf = unpermute_rows(&gguf_order, 2).unwrap();
        assert_eq!(hf.data, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
        assert!(unpermute_rows(&gguf_order, 3).is_err());
    }
}
