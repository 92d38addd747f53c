//! A Hugging Face tokenizer (tokenizer.json) with the chat template of tokenizer_config.json.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

impl TextTokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` (special tokens and
    /// chat template) or `chat_template.jinja` from a model folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        if !path.exists() {
            bail!("{} has no tokenizer.json", dir.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let mut tokenizer = Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
        };
        let config_path = dir.join("tokenizer_config.json");
        if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            let config: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
            tokenizer.chat_template = chat_template_of(&config);
            tokenizer.bos_token = token_text(&config["bos_token"]);
            tokenizer.eos_token = token_text(&config["eos_token"]);
            tokenizer.pad_token = token_text(&config["pad_token"]);
        }
        let jinja_path = dir.join("chat_template.jinja");
        if tokenizer.chat_template.is_none() && jinja_path.exists() {
            tokenizer.chat_template = Some(
                std::fs::read_to_string(&jinja_path)
                    .with_context(|| format!("cannot read {}", jinja_path.display()))?,
            );
        }
        Ok(tokenizer)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("cannot tokenize text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Ids that end a generated answer: the eos token of tokenizer_config.json.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.eos_token
            .iter()
            .filter_map(|t| self.token_id(t))
            .collect()
    }

    /// Id used to pad batches: the pad token, else eos, else 0.
    pub fn pad_id(&self) -> u32 {
        [&self.pad_token, &self.eos_token]
            .into_iter()
            .flatten()
            .find_map(|t| self.token_id(t))
            .unwrap_or(0)
    }

    /// Renders `messages` with the model's chat template (Jinja, as `transformers` does).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this tokenizer has no chat template (tokenizer_config.json `chat_template`)");
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(|e| anyhow::anyhow!("chat template failed: {e}"))
    }
}

/// `chat_template` is a string, or a list of named templates of which we take `default`.
fn chat_template_of(config: &Value) -> Option<String> {
    match &config["chat_template"] {
        Value::String(t) => Some(t.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Special tokens are written either as a string or as `{"content": ...}`.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
