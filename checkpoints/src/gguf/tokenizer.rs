//! Rebuilds a Hugging Face `tokenizer.json` and `tokenizer_config.json` from the vocabulary,
//! merges, token types, special ids and chat template a GGUF file stores, the way
//! `transformers` does when it loads a GGUF (`integrations/gguf/gguf_tokenizer_mapping.py`),
//! so both give the same ids.

use super::{GgufFile, MetaValue};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};

/// llama.cpp's token types.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The pre-tokenizer split of the vocabularies whose merges were learned on a split other than
/// GPT-2's (llama.cpp's `tokenizer.ggml.pre`); others use the byte-level default.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's reversible byte -> printable character table (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for byte in 0..=255u32 {
        let printable = (0x21..=0x7E).contains(&byte)
            || (0xA1..=0xAC).contains(&byte)
            || (0xAE..=0xFF).contains(&byte);
        table[byte as usize] = if printable {
            char::from_u32(byte).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    table
}

fn string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let items = gguf
        .require(key)?
        .as_array()
        .with_context(|| format!("{}: metadata `{key}` is not an array", gguf.path.display()))?;
    items
        .iter()
        .map(|v| {
            v.as_str().with_context(|| {
                format!(
                    "{}: metadata `{key}` holds a non-string",
                    gguf.path.display()
                )
            })
        })
        .collect()
}

fn special_token<'a>(gguf: &GgufFile, tokens: &[&'a str], key: &str) -> Result<Option<&'a str>> {
    let Some(value) = gguf.get(key) else {
        return Ok(None);
    };
    let id = value.as_u64().filter(|&id| (id as usize) < tokens.len());
    match id {
        Some(id) => Ok(Some(tokens[id as usize])),
        None => bail!(
            "{}: metadata `{key}` ({value:?}) is not a token id below the vocabulary size {}",
            gguf.path.display(),
            tokens.len()
        ),
    }
}

/// The rebuilt tokenizer: `tokenizer.json`, `tokenizer_config.json` and the eos id.
pub struct RebuiltTokenizer {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
}

pub fn rebuild_tokenizer(gguf: &GgufFile) -> Result<RebuiltTokenizer> {
    let model = gguf
        .require("tokenizer.ggml.model")?
        .as_str()
        .unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer model `{model}` is not supported; only byte-level BPE (`gpt2`, used by \
             Llama 3, Qwen2, SmolLM) can be rebuilt so far, not SentencePiece (`llama`)",
            gguf.path.display()
        );
    }
    let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
    let merges = string_array(gguf, "tokenizer.ggml.merges")?;
    let token_types: Vec<u64> = match gguf.get("tokenizer.ggml.token_type") {
        Some(MetaValue::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };

    // Tokens are stored in the byte alphabet already; one with other characters is respelled
    // byte by byte, as transformers does.
    let alphabet = byte_alphabet();
    let in_alphabet: BTreeSet<char> = alphabet.iter().copied().collect();
    let spelled = |token: &str| -> String {
        if token.chars().all(|c| in_alphabet.contains(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(spelled(token), json!(id));
    }
    let merge_pairs = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => bail!(
                "{}: merge `{m}` is not two tokens separated by a space",
                gguf.path.display()
            ),
        })
        .collect::<Result<Vec<_>>>()?;

    let mut added_tokens = Vec::new();
    for (id, (token, &kind)) in tokens.iter().zip(&token_types).enumerate() {
        let control = kind == CONTROL && token.chars().all(|c| in_alphabet.contains(&c));
        if control || kind == USER_DEFINED {
            added_tokens.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": control,
            }));
        }
    }

    let pre = gguf
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let pre_tokenizer = match split_regex(pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };

    let bos = special_token(gguf, &tokens, "tokenizer.ggml.bos_token_id")?;
    let eos = special_token(gguf, &tokens, "tokenizer.ggml.eos_token_id")?;
    let unk = special_token(gguf, &tokens, "tokenizer.ggml.unknown_token_id")?;
    let pad = special_token(gguf, &tokens, "tokenizer.ggml.padding_token_id")?;
    let add_bos = gguf
        .get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);
    let bos_token_id = gguf
        .get("tokenizer.ggml.bos_token_id")
        .and_then(MetaValue::as_u64);
    let post_processor = match (add_bos, bos, bos_token_id) {
        (true, Some(bos), Some(id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
        }),
        _ => Value::Null,
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merge_pairs,
        },
    });
    let mut tokenizer_config: HashMap<&str, Value> = HashMap::from([
        ("tokenizer_class", json!("PreTrainedTokenizerFast")),
        ("add_bos_token", json!(add_bos)),
        ("bos_token", json!(bos)),
        ("eos_token", json!(eos)),
        ("unk_token", json!(unk)),
        ("pad_token", json!(pad)),
        ("model_max_length", json!(gguf.context_length())),
    ]);
    if let Some(template) = gguf
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        tokenizer_config.insert("chat_template", json!(template));
    }
    Ok(RebuiltTokenizer {
        tokenizer_json,
        tokenizer_config: json!(tokenizer_config),
        bos_token_id,
        eos_token_id: gguf
            .get("tokenizer.ggml.eos_token_id")
            .and_then(MetaValue::as_u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let table = byte_alphabet();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], '\u{120}'); // Ġ
        assert_eq!(table[b'\n' as usize], '\u{10A}'); // Ċ
        assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 256);
    }
}
