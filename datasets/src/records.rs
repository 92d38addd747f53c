//! Training records from JSONL, JSON-array or CSV files: prompt/response pairs, chat
//! conversations, or plain text.
//!
//! A JSON record is read by its fields, with the names TRL uses too: `{"prompt", "response"}`
//! or `{"prompt", "completion"}` (strings, or TRL's conversational message lists),
//! `{"messages": [{"role", "content"}...]}`, or `{"text"}` (every token trained on). Other
//! fields (`id`, `source`, ...) are ignored, but one that looks like a misspelt known field
//! (`promt`) is an error, as is a record of no known layout. A `.jsonl` file holds one record a
//! line; a `.json` file one JSON array of records (or JSON lines). CSV files have `prompt` and
//! `response` columns. Every error names the file and the line (or array index).

use crate::tokenizer::ChatMessage;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    PromptResponse {
        prompt: String,
        response: String,
    },
    Chat {
        messages: Vec<ChatMessage>,
    },
    /// Plain text, every token trained on (language modelling).
    Text {
        text: String,
    },
}

/// The field names a record is read by.
const KNOWN_FIELDS: [&str; 5] = ["prompt", "response", "completion", "messages", "text"];

/// Reads a `.jsonl`, `.json` or `.csv` file, chosen by extension.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let records = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => load_jsonl(path)?,
        Some("csv") => load_csv(path)?,
        _ => bail!(
            "{}: unknown data format (expected .jsonl, .json or .csv)",
            path.display()
        ),
    };
    if records.is_empty() {
        bail!("{} holds no records", path.display());
    }
    Ok(records)
}

/// Records of a JSON-lines file, or of a file holding one JSON array of records.
pub fn load_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: not a JSON array of records ({e})", path.display())
        })?;
        return items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                parse_record(item).with_context(|| format!("{}: record [{index}]", path.display()))
            })
            .collect();
    }
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", path.display(), index + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: not JSON ({e})", where_()))?;
        records.push(parse_record(&value).with_context(where_)?);
    }
    Ok(records)
}

/// One record from its JSON object (see the module comment for the layouts).
pub fn parse_record(value: &Value) -> Result<Record> {
    let Some(fields) = value.as_object() else {
        bail!("not a JSON object");
    };
    for name in fields.keys() {
        if let Some(known) = KNOWN_FIELDS
            .iter()
            .find(|known| *known != name && strsim::levenshtein(known, name) <= 2)
        {
            bail!("unknown field `{name}` (did you mean `{known}`?)");
        }
    }
    let string = |key: &str| -> Result<Option<&str>> {
        match fields.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => bail!("`{key}` must be a string"),
        }
    };
    if let Some(messages) = fields.get("messages") {
        return Ok(Record::Chat {
            messages: messages_of(messages, "messages")?,
        });
    }
    let answer_key = ["response", "completion"]
        .into_iter()
        .find(|k| fields.contains_key(*k));
    match (fields.get("prompt"), answer_key) {
        (Some(Value::Array(_)), Some(key)) => {
            // TRL's conversational prompt-completion: message lists on both sides.
            let mut messages = messages_of(&fields["prompt"], "prompt")?;
            messages.extend(messages_of(&fields[key], key)?);
            Ok(Record::Chat { messages })
        }
        (Some(_), Some(key)) => Ok(Record::PromptResponse {
            prompt: string("prompt")?.expect("present").to_string(),
            response: string(key)?.expect("present").to_string(),
        }),
        (Some(_), None) => bail!("has `prompt` but no `response` (or `completion`)"),
        (None, Some(key)) => bail!("has `{key}` but no `prompt`"),
        (None, None) => match string("text")? {
            Some(text) => Ok(Record::Text {
                text: text.to_string(),
            }),
            None => bail!(
                "not a record: expected {{\"prompt\", \"response\"}}, {{\"prompt\", \"completion\"}}, \
                 {{\"messages\": [...]}} or {{\"text\"}} (fields: {})",
                fields.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

/// A non-empty list of `{"role", "content"}` messages under `key`.
fn messages_of(value: &Value, key: &str) -> Result<Vec<ChatMessage>> {
    let messages: Vec<ChatMessage> = serde_json::from_value(value.clone())
        .with_context(|| format!("`{key}` must be a list of {{\"role\", \"content\"}} messages"))?;
    if messages.is_empty() {
        bail!("`{key}` is empty");
    }
    Ok(messages)
}

pub fn load_csv(path: &Path) -> Result<Vec<Record>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (prompt_col, response_col) = (column("prompt")?, column("response")?);
    let mut records = Vec::new();
    for (index, row) in reader.records().enumerate() {
        // Line numbers count the header as line 1.
        let row = row.map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), index + 2))?;
        let field = |col: usize| row.get(col).map(str::to_string);
        match (field(prompt_col), field(response_col)) {
            (Some(prompt), Some(response)) => {
                records.push(Record::PromptResponse { prompt, response })
            }
            _ => bail!(
                "{}:{}: missing prompt or response",
                path.display(),
                index + 2
            ),
        }
    }
    Ok(records)
}

/// Writes prompt/response records as JSONL.
pub fn write_jsonl(path: &Path, records: &[(String, String)]) -> Result<()> {
    let mut text = String::new();
    for (prompt, response) in records {
        text += &serde_json::json!({ "prompt": prompt, "response": response }).to_string();
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("records-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_both_record_kinds_and_csv() {
        let path = temp(
            "ok.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        );
        let records = load_records(&path).unwrap();
        assert_eq!(
            records[0],
            Record::PromptResponse {
                prompt: "a".into(),
                response: "b".into()
            }
        );
        assert!(matches!(&records[1], Record::Chat { messages } if messages[0].content == "hi"));

        let path = temp("ok.csv", "prompt,response\n\"1+1?\",\"2, of course\"\n");
        assert_eq!(
            load_records(&path).unwrap(),
            vec![Record::PromptResponse {
                prompt: "1+1?".into(),
                response: "2, of course".into()
            }]
        );
    }

    #[test]
    fn reads_trl_layouts_json_arrays_and_ignores_extra_fields() {
        let path = temp(
            "trl.jsonl",
            concat!(
                "{\"id\": 7, \"source\": \"web\", \"prompt\": \"a\", \"completion\": \"b\"}\n",
                "{\"text\": \"plain words\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}], ",
                "\"completion\": [{\"role\": \"assistant\", \"content\": \"r\"}]}\n",
            ),
        );
        let records = load_records(&path).unwrap();
        assert_eq!(
            records[0],
            Record::PromptResponse {
                prompt: "a".into(),
                response: "b".into()
            }
        );
        assert_eq!(
            records[1],
            Record::Text {
                text: "plain words".into()
            }
        );
        assert!(
            matches!(&records[2], Record::Chat { messages } if messages.len() == 2 && messages[1].role == "assistant")
        );
        let path = temp(
            "array.json",
            "[{\"prompt\": \"a\", \"response\": \"b\"}, {\"text\": \"t\"}]",
        );
        assert_eq!(load_records(&path).unwrap().len(), 2);
        let path = temp("bad-array.json", "[{\"text\": \"t\"}, {\"txet\": \"t\"}]");
        let err = format!("{:#}", load_records(&path).unwrap_err());
        assert!(
            err.contains("[1]") && err.contains("`txet`") && err.contains("`text`"),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_it() {
        let path = temp(
            "typo.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"promt\": \"a\", \"response\": \"b\"}\n",
        );
        let err = format!("{:#}", load_records(&path).unwrap_err());
        assert!(
            err.contains("typo.jsonl:2") && err.contains("`promt`") && err.contains("`prompt`"),
            "{err}"
        );
        // Also beside a complete record: a typo must not be silently dropped.
        let path = temp(
            "typo2.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\", \"responce\": \"c\"}\n",
        );
        assert!(format!("{:#}", load_records(&path).unwrap_err()).contains("`responce`"));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let path = temp(
            "bad.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
        );
        let err = load_records(&path).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        let path = temp(
            "bad2.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n\nnot json\n",
        );
        assert!(load_records(&path)
            .unwrap_err()
            .to_string()
            .contains("bad2.jsonl:4"));
        let path = temp("bad.csv", "prompt,answer\nx,y\n");
        assert!(load_records(&path)
            .unwrap_err()
            .to_string()
            .contains("`response`"));
    }
}
